"""Probe for the CUDA-graph failure of the Hopper backward (bench/NOTES.md, 2026-12-03): capture
flash_attn_backward on a side stream, replay it, and compare every output with the eager call, under
the conditions that might matter. One line per replay: max |replay - eager| / max |eager| per output.

    PYTHONPATH=. python3 bench/graph_probe.py                       # the test's shape, fresh process
    PYTHONPATH=. python3 bench/graph_probe.py --before det          # a forced deterministic Hopper backward first
    PYTHONPATH=. python3 bench/graph_probe.py --pool async          # CuPy's stream-ordered allocator
    PYTHONPATH=. python3 bench/graph_probe.py --keep                # keep the capture's temporaries alive
    FLASHCUPY_SM90_BWD=0 PYTHONPATH=. python3 bench/graph_probe.py  # the mma.sync backward

--keep holds every CuPy allocation made during the capture (an allocator wrapper) until the
replays are done: if the failure goes away, the graph was reading or writing memory the pool had
handed to someone else after the capture.
"""

from __future__ import annotations

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", choices=("none", "det", "nondet"), default="none")
    ap.add_argument("--pool", choices=("default", "async"), default="default")
    ap.add_argument("--keep", action="store_true", help="hold the capture's allocations until the end")
    ap.add_argument("--causal", type=int, choices=(0, 1), default=0)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=6, default=(2, 333, 517, 4, 2, 128),
                    metavar=("B", "SQ", "SK", "H", "HK", "D"))
    args = ap.parse_args()

    import cupy as cp

    import flashcupy
    from flashcupy import _gpu, _gpu_sm90_bwd
    from flashcupy._arrays import bfloat16
    from flashcupy._validate import check_qkv
    from flashcupy.testing import random_inputs

    if args.pool == "async":
        cp.cuda.set_allocator(cp.cuda.MemoryAsyncPool().malloc)
    rng = np.random.default_rng(0)
    causal = bool(args.causal)
    if args.before != "none":
        q0, k0, v0, do0 = (cp.asarray(x) for x in random_inputs(rng, 1, 257, 257, 2, 2, 128, bfloat16(), grad=True))
        r0 = flashcupy.flash_attn_forward(q0, k0, v0, causal=True)
        shape0 = check_qkv(q0, k0, v0, None)
        _gpu.backward(do0, q0, k0, v0, r0.out, r0.lse, shape0, causal=True, deterministic=args.before == "det",
                      config=_gpu_sm90_bwd.config_for(128, True))
        cp.cuda.Device().synchronize()
    b, sq, sk, h, hk, d = args.shape
    q, k, v, do = (cp.asarray(x) for x in random_inputs(rng, b, sq, sk, h, hk, d, bfloat16(), grad=True))
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal)
    eager = [x.copy() for x in flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=causal)]
    cp.cuda.Device().synchronize()

    kept = []
    base_alloc = cp.cuda.get_allocator()

    def keeping_alloc(nbytes):  # every allocation of the capture, held until the end of the script
        kept.append(base_alloc(nbytes))
        return kept[-1]

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        if args.keep:
            cp.cuda.set_allocator(keeping_alloc)
        stream.begin_capture()
        try:
            got = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=causal)
        finally:
            graph = stream.end_capture()
            cp.cuda.set_allocator(base_alloc)
        print(f"captured: {len(kept)} allocations recorded" if args.keep else "captured")
        for r in range(args.replays):
            for x in got:
                x.fill(0)
            graph.launch(stream)
            stream.synchronize()
            errs = []
            for name, g, e in zip(("dq", "dk", "dv"), got, eager):
                ge, ee = g.astype(cp.float32), e.astype(cp.float32)
                errs.append(f"{name} {float(cp.abs(ge - ee).max() / cp.abs(ee).max()):.2e}")
            print(f"replay {r}: max |replay - eager| / max |eager|: {', '.join(errs)}", flush=True)
    print(f"path: {flashcupy.interface.kernel_path(q.dtype, d, on_gpu=True)} (FLASHCUPY_SM90_BWD decides the "
          f"backward), before={args.before}, pool={args.pool}, keep={args.keep}, causal={causal}")


if __name__ == "__main__":
    main()
