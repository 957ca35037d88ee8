"""Decode-step speed of flash_attn_with_kvcache (issue 17) against torch SDPA, in one run on one GPU.

    PYTHONPATH=. python bench/bench_decode.py [--batches 1 8 32 128] [--caches 1024 8192 32768 131072]
        [--paged] [--json out.json]

bf16, hd128, 32 query / 8 KV heads, seqlen_q 1 by default. Reports per case the time of one call
(CUDA events around --repeat back-to-back calls, after a warm-up; the host's Python time is inside
whenever the GPU waits for it) and the K/V bytes read per second (batch x cache x nheads_k x head_dim
x 2 tensors x 2 bytes / time) as a fraction of the HBM copy bandwidth measured in the same run (a
device-to-device copy of 1 GiB: 2 bytes moved per byte copied). cache_seqlens is an int (every row the
same length; an int32 array adds one host read per call to the validation). Peers: torch SDPA with
enable_gqa (flash, cuDNN, efficient; whichever runs), on the same cache as (batch, nheads_k, cache, hd).
"""

from __future__ import annotations

import argparse
import json

import cupy as cp
import numpy as np


def bf16_normal(rng, shape):
    """Standard-normal bf16 drawn on the GPU as float32's top 16 bits (no bf16 kernel needed)."""
    from flashcupy._arrays import bfloat16

    x = rng.standard_normal(shape, dtype=cp.float32)
    return (x.view(cp.uint32) >> 16).astype(cp.uint16).view(bfloat16())


def timed(fn, repeat):
    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / repeat  # ms


def graphed(fn):
    """fn captured once in a CUDA graph (CuPy stream capture); returns its replay on the null stream's
    order (the capture stream is synchronised first), so timed() measures the kernels alone."""
    stream = cp.cuda.Stream(non_blocking=True)
    fn()  # compile and warm outside the capture
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    return lambda: graph.launch(cp.cuda.Stream.null)


def copy_bandwidth():
    a = cp.empty(1 << 30, dtype=cp.uint8)
    b = cp.empty_like(a)
    ms = timed(lambda: cp.copyto(b, a), 10)
    return 2 * a.nbytes / (ms * 1e-3)


def torch_peers(q, k, v, repeat):
    """{backend: ms} of torch SDPA on the cache (q (B, 1, H, D) -> (B, H, 1, D); k, v (B, Hk, S, D))."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        return {"torch": f"unavailable: {e}"}
    tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
    out = {}

    def torch_graphed(call):
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            call()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            call()
        return g.replay
    for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call():
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
        try:
            call()
            torch.cuda.synchronize()
            out[name] = timed(call, repeat)
            out[name + "/graph"] = timed(torch_graphed(call), repeat)
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {str(e)[:80]}"
    return out


KEYS = ("flashcupy", "flashcupy/graph", "flashcupy-paged", "sdpa-flash", "sdpa-flash/graph", "sdpa-cudnn",
        "sdpa-cudnn/graph", "sdpa-efficient", "sdpa-efficient/graph")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--caches", nargs="+", type=int, default=[1024, 8192, 32768, 131072])
    ap.add_argument("--heads", nargs=2, type=int, default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--paged", action="store_true", help="also a paged cache (page 256, shuffled pages)")
    ap.add_argument("--max-gib", type=float, default=40.0, help="skip cases whose K + V exceed this")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import flashcupy

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    bw = copy_bandwidth()
    print(f"== {name}: HBM copy bandwidth {bw / 1e12:.2f} TB/s")
    h, hk = a.heads
    d = a.head_dim
    rows = []
    rng = cp.random.default_rng(0)
    for batch in a.batches:
        for cache in a.caches:
            kv_bytes = 2 * batch * cache * hk * d * 2
            if kv_bytes / 2**30 > a.max_gib:
                continue
            k, v = bf16_normal(rng, (batch, cache, hk, d)), bf16_normal(rng, (batch, cache, hk, d))
            q = bf16_normal(rng, (batch, 1, h, d))
            res = {"batch": batch, "cache": cache, "kv_bytes": kv_bytes}
            ours = lambda: flashcupy.flash_attn_with_kvcache(q, k, v, cache_seqlens=cache)  # noqa: E731
            res["flashcupy"] = timed(ours, a.repeat)
            res["flashcupy/graph"] = timed(graphed(ours), a.repeat)
            if a.paged:
                page = 256
                nb = cache // page
                perm = cp.asarray(np.random.default_rng(0).permutation(batch * nb).astype(np.int32))
                table = perm.reshape(batch, nb)
                kp = cp.empty((batch * nb, page, hk, d), dtype=k.dtype)
                vp = cp.empty_like(kp)
                kp[perm] = k.reshape(batch * nb, page, hk, d)
                vp[perm] = v.reshape(batch * nb, page, hk, d)
                res["flashcupy-paged"] = timed(lambda: flashcupy.flash_attn_with_kvcache(
                    q, kp, vp, cache_seqlens=cache, block_table=table), a.repeat)
                kp = vp = None
            if not a.no_peers:
                res.update(torch_peers(q, k, v, a.repeat))
            rows.append(res)
            line = f"b{batch:>4} cache {cache:>7}"
            for key in KEYS:
                if isinstance(res.get(key), float):
                    frac = kv_bytes / (res[key] * 1e-3) / bw
                    line += f"  {key} {res[key] * 1e3:8.1f} us {frac:5.2f}"
            print(line, flush=True)
            k = v = None  # free before the next case's cache
            cp.get_default_memory_pool().free_all_blocks()
    print("\n== fraction of HBM copy bandwidth (K/V bytes / time / copy bandwidth); eager calls and CUDA-graph "
          "replays (kernels alone); ours / best SDPA in the same mode")
    for r in rows:
        line = f"b{r['batch']:>4} cache {r['cache']:>7}:"
        for mode in ("", "/graph"):
            peers = [r[p + mode] for p in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient") if isinstance(r.get(p + mode), float)]
            best = min(peers) if peers else None
            ours = r["flashcupy" + mode]
            line += (f"  {mode[1:] or 'eager'}: ours {r['kv_bytes'] / (ours * 1e-3) / bw:.2f}"
                     + (f" best SDPA {r['kv_bytes'] / (best * 1e-3) / bw:.2f} ratio {best / ours:.2f}" if best else ""))
        if "flashcupy-paged" in r:
            line += f"  paged eager {r['kv_bytes'] / (r['flashcupy-paged'] * 1e-3) / bw:.2f}"
        print(line)
    if a.json:
        json.dump({"device": name, "copy_bandwidth": bw, "rows": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
