"""float32 / float64 kernels (issue 9) vs naive CuPy and torch SDPA's efficient backend (float32), same
inputs, same run; optional sweep of SIMT configs to steer _configs.py.

Method: FA benchmark shape (nheads * head_dim = 2048, batch * seqlen = 16384), CUDA-event timing via
cupyx.profiler.benchmark (median of n_repeat after warm-up), TFLOP/s by the FA formula (fwd
4*B*H*S^2*D, halved for causal; bwd 2.5x). Peers that cannot run a case are skipped with a note.

    PYTHONPATH=. python bench/bench_simt.py --dtypes float32 float64 --head-dims 64 128 --seqlens 1024 4096
    PYTHONPATH=. python bench/bench_simt.py --dtypes float32 --head-dims 64 --seqlens 4096 --sweep
    PYTHONPATH=. python bench/bench_simt.py --dtypes float64 --head-dims 64 128 --seqlens 4096 --sweep
    PYTHONPATH=. python bench/bench_simt.py --summary-from a.json b.json   # one summary table of saved runs

float32 --sweep times the SIMT configs of FWD_SWEEP / BWD_SWEEP for the head dims listed there (hd128:
occupancy vs register blocking, bench/NOTES.md "fp32 hd128 forward and fp64 hd128 backward").

float32 with --tf32 also times the allow_tf32 path (TF32 tensor cores, "flashcupy-tf32") and, with
--sweep, the TF32 configs of TF32_FWD_SWEEP / TF32_BWD_SWEEP; SDPA's efficient backend (float32, which
runs 3xTF32 tensor-core products) is timed for fwd and bwd (autograd of its forward).

    PYTHONPATH=. python bench/bench_simt.py --dtypes float32 --head-dims 64 128 --seqlens 4096 --tf32 --sweep

float64 --sweep times the DMMA (FP64 tensor core) configs of DMMA_FWD_SWEEP / DMMA_BWD_SWEEP, with
their instruction (katom 4: m8n8k4, 8: m16n8k8, 16: m16n8k16; the last two need sm_90), and the
DFMA kernel's default for comparison. A summary table (best per case, ratio to naive) ends the run.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

# float32 SIMT forward (FWD_SWEEP) and float64 DMMA backward (DMMA_BWD_SWEEP): in flashcupy._configs, which the
# tests read them from (tests/helpers.py sweep_candidates)
from flashcupy._configs import DMMA_BWD_SWEEP
from flashcupy._configs import SIMT_FWD_SWEEP as FWD_SWEEP

# float32 SIMT backward: head_dim -> [(block_m, block_n, nwarps)]
BWD_SWEEP = {64: [(32, 64, 4), (64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 32, 4)]}
# float64 DMMA: head_dim -> [(block_m, block_n, nwarps, katom)] and
# [(kv_block_m, kv_block_n, kv_nwarps, d_split, dq_block_m, dq_block_n, dq_nwarps, kv_katom, dq_katom)]
DMMA_FWD_SWEEP = {
    64: [(64, 32, 4, 16), (64, 32, 4, 8), (64, 32, 4, 4), (64, 64, 4, 16), (128, 32, 8, 16), (32, 32, 4, 4),
         (32, 64, 4, 4)],
    128: [(64, 16, 4, 16), (64, 16, 4, 8), (64, 16, 4, 4), (128, 16, 8, 16), (32, 32, 4, 4), (32, 16, 4, 4)],
}


# float32 TF32 (allow_tf32): head_dim -> [(block_m, block_n, nwarps)] and
# [(kv_block_m, kv_block_n, kv_nwarps, d_split, dq_block_m, dq_block_n, dq_nwarps, kv_stages)] (16 rows per warp)
TF32_FWD_SWEEP = {
    64: [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 8), (64, 128, 4)],
    128: [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 8)],
}
TF32_BWD_SWEEP = {
    64: [(32, 64, 4, 1, 64, 64, 4, 2), (64, 64, 4, 1, 64, 64, 4, 2), (32, 128, 8, 1, 128, 64, 8, 2),
         (32, 64, 4, 1, 64, 32, 4, 1), (16, 64, 4, 1, 64, 32, 4, 2)],
    128: [(32, 64, 4, 1, 64, 32, 4, 1), (32, 64, 4, 1, 64, 32, 4, 2), (32, 128, 8, 1, 128, 32, 8, 1),
          (16, 64, 4, 1, 64, 16, 4, 1), (32, 32, 2, 1, 32, 32, 2, 1)],
}


def flops(batch, nheads, seqlen, head_dim, causal, mode):
    f = 4 * batch * nheads * seqlen * seqlen * head_dim // (2 if causal else 1)
    return {"fwd": 1.0, "bwd": 2.5}[mode] * f


def is_tf32(provider: str) -> bool:
    """The allow_tf32 rows: the default ("flashcupy-tf32") and the TF32 sweep ("tf32-...")."""
    return provider == "flashcupy-tf32" or provider.startswith("tf32-")


def summary(rows):
    """Per case and mode: the default (flashcupy), the best swept config, naive and SDPA, with ratios."""
    cases = {}
    for r in rows:
        cases.setdefault((r["dtype"], r["mode"], r["head_dim"], r["seqlen"], r["causal"]), []).append(r)
    print("\n| dtype | mode | hd | seqlen | causal | flashcupy TF/s | best config (TF/s) | naive | /naive | sdpa-eff | /sdpa "
          "| tf32 TF/s | tf32 /sdpa | tf32 /naive | best tf32 config (TF/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (dt, mode, hd, s, c), rs in cases.items():
        by = {r["provider"]: r["tflops"] for r in rs}
        fc = by.get("flashcupy")
        best = max((r for r in rs if r["provider"] not in ("naive", "sdpa-efficient", "flashcupy-det")
                    and not is_tf32(r["provider"])), key=lambda r: r["tflops"])
        nv, sd = by.get("naive"), by.get("sdpa-efficient")

        def f(x):
            return "-" if x is None else f"{x:.2f}"

        def ratio(a, b):
            return "-" if a is None or b is None else f"{a / b:.2f}"

        tf = by.get("flashcupy-tf32")
        tfs = [r for r in rs if is_tf32(r["provider"])]
        best_tf = max(tfs, key=lambda r: r["tflops"]) if tfs else None
        best_tf = "-" if best_tf is None else f"{best_tf['provider']} ({best_tf['tflops']:.2f})"
        print(f"| {dt} | {mode} | {hd} | {s} | {'yes' if c else 'no'} | {f(fc)} | {best['provider']} "
              f"({best['tflops']:.2f}) | {f(nv)} | {ratio(fc, nv)} | {f(sd)} | {ratio(fc, sd)} "
              f"| {f(tf)} | {ratio(tf, sd)} | {ratio(tf, nv)} | {best_tf} |")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd"])
    ap.add_argument("--sweep", action="store_true", help="also time candidate SIMT configs")
    ap.add_argument("--tf32", action="store_true", help="float32: also time allow_tf32=True (TF32 tensor cores)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--summary-from", nargs="+", default=None, help="print the summary of saved --json runs")
    args = ap.parse_args(argv)
    if args.summary_from:
        rows = [r for fn in args.summary_from for r in json.load(open(fn))["rows"]]
        summary(rows)
        return 0

    import cupy as cp
    from cupyx.profiler import benchmark

    import flashcupy
    from flashcupy import _gpu_simt
    from flashcupy._configs import (DmmaBwdConfig, DmmaFwdConfig, SimtBwdConfig, SimtFwdConfig, simt_bwd_config,
                                    simt_elem, simt_fwd_config)
    from flashcupy._validate import check_qkv

    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        torch = None
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"# device: {dev}; cupy {cp.__version__}; torch {getattr(torch, '__version__', None)}", flush=True)

    def ms(fn):
        t = benchmark(fn, n_repeat=args.repeat, n_warmup=3).gpu_times
        return float(np.median(t)) * 1e3

    rows = []
    for dtype_name in args.dtypes:
        dtype = np.dtype(dtype_name)
        for head_dim in args.head_dims:
            nheads = 2048 // head_dim
            for seqlen in args.seqlens:
                batch = max(1, 16384 // seqlen)
                rs = cp.random.RandomState(0)
                q, k, v, do = (rs.standard_normal((batch, seqlen, nheads, head_dim)).astype(dtype) for _ in range(4))
                shape = check_qkv(q, k, v)
                for causal in map(bool, args.causal):
                    res = flashcupy.flash_attn_forward(q, k, v, causal=causal)
                    impls = {}
                    if "fwd" in args.modes:
                        impls["flashcupy", "fwd"] = lambda: flashcupy.flash_attn_forward(q, k, v, causal=causal)
                    if "bwd" in args.modes:
                        impls["flashcupy", "bwd"] = lambda: flashcupy.flash_attn_backward(
                            do, q, k, v, res.out, res.lse, causal=causal)
                        impls["flashcupy-det", "bwd"] = lambda: flashcupy.flash_attn_backward(
                            do, q, k, v, res.out, res.lse, causal=causal, deterministic=True)
                    if args.tf32 and dtype == np.float32:
                        res32 = flashcupy.flash_attn_forward(q, k, v, causal=causal, allow_tf32=True)
                        if "fwd" in args.modes:
                            impls["flashcupy-tf32", "fwd"] = lambda: flashcupy.flash_attn_forward(
                                q, k, v, causal=causal, allow_tf32=True)
                        if "bwd" in args.modes:
                            impls["flashcupy-tf32", "bwd"] = lambda: flashcupy.flash_attn_backward(
                                do, q, k, v, res32.out, res32.lse, causal=causal, allow_tf32=True)
                        for bm, bn, nw in TF32_FWD_SWEEP.get(head_dim, []) if args.sweep and "fwd" in args.modes else []:
                            cfg = DmmaFwdConfig(head_dim, bm, bn, nw, 8, elem="float")
                            impls[f"tf32-{bm}x{bn}w{nw}", "fwd"] = (
                                lambda cfg=cfg: _gpu_simt.forward(q, k, v, shape, causal=causal, config=cfg))
                        for c in TF32_BWD_SWEEP.get(head_dim, []) if args.sweep and "bwd" in args.modes else []:
                            cfg = DmmaBwdConfig(head_dim, *c[:7], 8, 8, kv_stages=c[7], elem="float")
                            impls[f"tf32-kv{c[0]}x{c[1]}w{c[2]}s{c[3]}b{c[7]}+dq{c[4]}x{c[5]}w{c[6]}", "bwd"] = (
                                lambda cfg=cfg: _gpu_simt.backward(do, q, k, v, res32.out, res32.lse, shape,
                                                                   causal=causal, deterministic=False, config=cfg))
                    if args.sweep and dtype == np.float32:
                        elem = simt_elem(dtype)
                        for bm, bn, nw, mc in FWD_SWEEP.get(head_dim, []) if "fwd" in args.modes else []:
                            cfg = SimtFwdConfig(elem, head_dim, bm, bn, nw, mc)
                            impls[f"fwd{bm}x{bn}w{nw}c{mc}", "fwd"] = (
                                lambda cfg=cfg: _gpu_simt.forward(q, k, v, shape, causal=causal, config=cfg))
                        for bm, bn, nw in BWD_SWEEP.get(head_dim, []) if "bwd" in args.modes else []:
                            cfg = SimtBwdConfig(elem, head_dim, bm, bn, nw)
                            impls[f"bwd{bm}x{bn}w{nw}", "bwd"] = (
                                lambda cfg=cfg: _gpu_simt.backward(do, q, k, v, res.out, res.lse, shape, causal=causal,
                                                                   deterministic=False, config=cfg))
                    if args.sweep and dtype == np.float64:
                        for bm, bn, nw, ka in DMMA_FWD_SWEEP.get(head_dim, []) if "fwd" in args.modes else []:
                            cfg = DmmaFwdConfig(head_dim, bm, bn, nw, ka)
                            impls[f"dmma{bm}x{bn}w{nw}k{ka}", "fwd"] = (
                                lambda cfg=cfg: _gpu_simt.forward(q, k, v, shape, causal=causal, config=cfg))
                        for c in DMMA_BWD_SWEEP.get(head_dim, []) if "bwd" in args.modes else []:
                            cfg = DmmaBwdConfig(head_dim, *c)
                            name = (f"kv{c[0]}x{c[1]}w{c[2]}s{c[3]}k{c[7]}" + (f"b{c[9]}" if len(c) > 9 else "")
                                    + f"+dq{c[4]}x{c[5]}w{c[6]}k{c[8]}")
                            impls[name, "bwd"] = (
                                lambda cfg=cfg: _gpu_simt.backward(do, q, k, v, res.out, res.lse, shape, causal=causal,
                                                                   deterministic=False, config=cfg))
                        if "fwd" in args.modes:
                            cfg = simt_fwd_config(head_dim, dtype, causal)
                            impls["dfma-default", "fwd"] = (
                                lambda cfg=cfg: _gpu_simt.forward(q, k, v, shape, causal=causal, config=cfg))
                        if "bwd" in args.modes:
                            cfg = simt_bwd_config(head_dim, dtype, causal)
                            impls["dfma-default", "bwd"] = (
                                lambda cfg=cfg: _gpu_simt.backward(do, q, k, v, res.out, res.lse, shape,
                                                                   causal=causal, deterministic=False, config=cfg))
                    if "fwd" in args.modes and seqlen <= 4096:
                        def naive(q=q, k=k, v=v):
                            s = cp.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) * (head_dim ** -0.5)
                            if causal:
                                s = s + cp.triu(cp.full((seqlen, seqlen), -cp.inf, dtype=s.dtype), 1)
                            p = cp.exp(s - s.max(-1, keepdims=True))
                            p /= p.sum(-1, keepdims=True)
                            return cp.matmul(p, v.transpose(0, 2, 1, 3))
                        impls["naive", "fwd"] = naive
                    if torch is not None and dtype == np.float32 and "fwd" in args.modes:
                        tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))

                        def sdpa():
                            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.no_grad():
                                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                        impls["sdpa-efficient", "fwd"] = sdpa
                    if torch is not None and dtype == np.float32 and "bwd" in args.modes:
                        gq, gk, gv = (torch.from_dlpack(x).transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
                        tdo = torch.from_dlpack(do).transpose(1, 2)
                        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                            tout = torch.nn.functional.scaled_dot_product_attention(gq, gk, gv, is_causal=causal)

                        def sdpa_bwd():
                            return torch.autograd.grad(tout, (gq, gk, gv), tdo, retain_graph=True)
                        impls["sdpa-efficient", "bwd"] = sdpa_bwd
                    for (name, mode), fn in impls.items():
                        try:
                            t = ms(fn)
                        except Exception as e:  # a peer or config that cannot run this case
                            print(f"# {name} {mode} {dtype_name} hd{head_dim} s{seqlen}: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        f = flops(batch, nheads, seqlen, head_dim, causal, mode)
                        rows.append(dict(provider=name, mode=mode, dtype=dtype_name, head_dim=head_dim, seqlen=seqlen,
                                         batch=batch, nheads=nheads, causal=causal, ms=t, tflops=f / t / 1e9))
                        print(f"{name:<16}{mode:<5}{dtype_name:<8}{head_dim:>4}{seqlen:>7}{str(causal):>7}"
                              f"{t:>10.3f} ms{f / t / 1e9:>8.2f} TF/s", flush=True)
                        if args.json:  # after every row: a run cut short by a timeout keeps what it measured
                            with open(args.json, "w") as fh:
                                json.dump(dict(device=dev, rows=rows), fh, indent=1)
                del q, k, v, do, res
                cp.get_default_memory_pool().free_all_blocks()
    summary(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
