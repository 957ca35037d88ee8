"""One Hopper backward at the FA benchmark shape, for Nsight Compute (issue 15):

    PYTHONPATH=. ncu --kernel-name regex:flash_bwd_sm90_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 bench/profile_sm90_bwd.py --head-dim 128 --causal

Runs the backward twice (the first compiles; profile the second) with the config of
flashcupy._gpu_sm90_bwd.SWEEP picked by --config (its index; default: config_for's choice).
"""

import argparse


def main():
    import cupy as cp

    from flashcupy import _gpu, _gpu_sm90_bwd
    from flashcupy._arrays import bfloat16
    from flashcupy._validate import check_qkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--config", type=int, default=None, help="index into _gpu_sm90_bwd.SWEEP")
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    cfg = (_gpu_sm90_bwd.config_for(args.head_dim, args.causal) if args.config is None
           else _gpu_sm90_bwd.SWEEP[args.config])
    batch, nheads = max(1, 16384 // args.seqlen), 2048 // args.head_dim
    rs = cp.random.RandomState(0)
    q, k, v, do = (rs.standard_normal((batch, args.seqlen, nheads, args.head_dim), dtype=cp.float32).astype(bfloat16())
                   for _ in range(4))
    shape = check_qkv(q, k, v)
    out, lse = _gpu.forward(q, k, v, shape, causal=args.causal)
    for _ in range(2):
        _gpu.backward(do, q, k, v, out, lse, shape, causal=args.causal, deterministic=args.deterministic,
                      config=cfg)
    cp.cuda.Device().synchronize()
    print(f"profiled {cfg.kernel_name('Bf16', args.causal, args.deterministic)}")


if __name__ == "__main__":
    main()
