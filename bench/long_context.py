"""Forward and backward at 1M tokens through the public API (issue 15's last test): batch 1, 4 query heads
over 1 KV head (GQA), head_dim 128, causal, bf16, on one GPU. Prints the time of the forward and of the
backward (CUDA events, after a warm-up call at --warmup-seqlen that compiles the same kernels), their
TFLOP/s by the FA formula, the kernel paths, and the memory: the CuPy pool's peak during each call
beyond what was held before it (a MemoryHook on every allocation), and the device's used memory from
cudaMemGetInfo before the inputs and at the end.

Before the Hopper backward (issue 15): 3.5 s forward and 12.9 s backward on an H200.

    PYTHONPATH=. python3 bench/long_context.py [--seqlen 1048576] [--reps 1] [--deterministic] [--json out.json]
    FLASHCUPY_SM90_BWD=0 PYTHONPATH=. python3 bench/long_context.py   # the backward without the Hopper family
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=1 << 20, help="tokens (seqlen_q = seqlen_k; default 1048576)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--nheads", type=int, default=4, help="query heads")
    ap.add_argument("--nheads-k", type=int, default=1, help="key / value heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--no-causal", dest="causal", action="store_false", help="full attention (default causal)")
    ap.add_argument("--deterministic", action="store_true", help="deterministic backward")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions of each direction (median printed)")
    ap.add_argument("--warmup-seqlen", type=int, default=4096, help="seqlen of the compiling warm-up call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.seqlen < 1 or args.reps < 1 or args.nheads % args.nheads_k:
        ap.error("expected --seqlen >= 1, --reps >= 1 and --nheads a multiple of --nheads-k")
    return args


def _random(shape, dtype, seed):
    """Standard-normal values in dtype, drawn on the GPU in float32 (bf16 from the top 16 bits)."""
    import cupy as cp

    from flashcupy._arrays import bfloat16

    x = cp.random.RandomState(seed).standard_normal(shape, dtype=cp.float32)
    if dtype == "bf16":
        return (x.view(cp.uint32) >> 16).astype(cp.uint16).view(bfloat16())
    return x.astype(cp.float16)


class _PeakPool:
    """Peak bytes the CuPy default pool hands out while active, beyond its use at entry (.extra)."""

    def __enter__(self):
        import cupy as cp

        pool = cp.get_default_memory_pool()

        class Hook(cp.cuda.MemoryHook):
            name = "long-context-peak"

            def __init__(self):
                self.peak = pool.used_bytes()

            def malloc_postprocess(self, **kwargs):
                self.peak = max(self.peak, pool.used_bytes())

        self.pool, self.hook = pool, Hook()
        self.base = self.hook.peak
        self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        self.hook.__exit__(*exc)
        self.extra = self.hook.peak - self.base


def _timed(fn, reps):
    """(last result, median ms) of fn on CuPy's current stream, by CUDA events."""
    import cupy as cp

    times, res = [], None
    for _ in range(reps):
        res = None  # free the previous result first: one result alive at a time
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        res = fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return res, statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import cupy as cp
    import numpy as np

    import flashcupy
    from flashcupy import _device, _dispatch
    from flashcupy._arrays import bfloat16
    from flashcupy.bench import attention_flops

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    b, s, h, hk, d = args.batch, args.seqlen, args.nheads, args.nheads_k, args.head_dim
    opts = dict(causal=args.causal)
    info = _device.current_device_info()
    dt = bfloat16() if args.dtype == "bf16" else np.dtype(np.float16)
    plans = dict(fwd=_dispatch.forward_plan(dt, d, args.causal, info),
                 bwd=_dispatch.backward_plan(dt, d, args.causal, info))
    paths = {direction: f"{_dispatch.path_name(p)}: {None if p is None else p.config}"
             for direction, p in plans.items()}
    print(f"# {dev}; b{b} s{s} h{h}/{hk} d{d} {args.dtype} causal={args.causal} deterministic={args.deterministic}; "
          f"FLASHCUPY_SM90_BWD={os.environ.get('FLASHCUPY_SM90_BWD')}", flush=True)
    for direction, path in paths.items():
        print(f"# {direction}: {path}", flush=True)

    def inputs(seqlen):
        q, do = (_random((b, seqlen, h, d), args.dtype, seed) for seed in (1, 4))
        k, v = (_random((b, seqlen, hk, d), args.dtype, seed) for seed in (2, 3))
        return q, k, v, do

    q, k, v, do = inputs(args.warmup_seqlen)  # compiles the kernels the long call runs
    fwd = flashcupy.flash_attn_forward(q, k, v, **opts)
    flashcupy.flash_attn_backward(do, q, k, v, forward=fwd, deterministic=args.deterministic)
    cp.cuda.Device().synchronize()
    del q, k, v, do, fwd
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    free0, total = cp.cuda.runtime.memGetInfo()

    q, k, v, do = inputs(s)
    input_bytes = sum(x.nbytes for x in (q, k, v, do))
    with _PeakPool() as fwd_mem:
        fwd, fwd_ms = _timed(lambda: flashcupy.flash_attn_forward(q, k, v, **opts), args.reps)
    with _PeakPool() as bwd_mem:
        grads, bwd_ms = _timed(lambda: flashcupy.flash_attn_backward(do, q, k, v, forward=fwd,
                                                                    deterministic=args.deterministic), args.reps)
    finite = bool(cp.isfinite(fwd.out.astype(cp.float32)).all()) and all(
        bool(cp.isfinite(g.astype(cp.float32)).all()) for g in grads)
    free1, _ = cp.cuda.runtime.memGetInfo()

    fl = {m: attention_flops(b, h, s, s, d, causal=args.causal, mode=m) for m in ("fwd", "bwd")}
    res = dict(device=dev, batch=b, seqlen=s, nheads=h, nheads_k=hk, head_dim=d, dtype=args.dtype, causal=args.causal,
               deterministic=args.deterministic, reps=args.reps, env={"FLASHCUPY_SM90_BWD": os.environ.get(
                   "FLASHCUPY_SM90_BWD"), "FLASHCUPY_SM90": os.environ.get("FLASHCUPY_SM90")},
               paths=paths,
               fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=fl["fwd"] / fwd_ms / 1e9, bwd_tflops=fl["bwd"] / bwd_ms / 1e9,
               input_gib=input_bytes / GIB, fwd_peak_extra_gib=fwd_mem.extra / GIB,
               bwd_peak_extra_gib=bwd_mem.extra / GIB, pool_total_gib=pool.total_bytes() / GIB,
               device_used_before_gib=(total - free0) / GIB, device_used_end_gib=(total - free1) / GIB,
               device_total_gib=total / GIB, finite=finite)
    for m, ms in (("forward", fwd_ms), ("backward", bwd_ms)):
        print(f"{m:<10}{ms / 1e3:8.3f} s  {res[m[:3] + '_tflops']:6.1f} TFLOP/s  "
              f"pool peak +{res[m[:3] + '_peak_extra_gib']:.2f} GiB", flush=True)
    print(f"memory    inputs (q, k, v, dout) {res['input_gib']:.2f} GiB; pool holds {res['pool_total_gib']:.2f} GiB; "
          f"device used {res['device_used_before_gib']:.2f} -> {res['device_used_end_gib']:.2f} of "
          f"{res['device_total_gib']:.0f} GiB; outputs finite: {finite}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
