"""Kernel-tuning benchmark: flashcupy's fused kernels vs torch SDPA (flash, cuDNN, efficient) and naive
CuPy, same inputs, same run. Also sweeps candidate kernel configs (--sweep) to steer _configs.py.

Method (DESIGN.md): FA benchmark shape (hidden = nheads * head_dim = 2048, batch * seqlen = 16384),
triton.testing.do_bench (CUDA events, L2 flushed between repetitions, median), TFLOP/s by the FA
formula (fwd 4*B*H*Sq*Sk*D, halved for causal; bwd 2.5x; fwd+bwd 3.5x).

    PYTHONPATH=. python bench/bench_kernels.py --modes fwd --head-dims 64 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np


def flops(batch, nheads, seqlen, head_dim, causal, mode):
    f = 4 * batch * nheads * seqlen * seqlen * head_dim // (2 if causal else 1)
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * f


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["fwd"])
    ap.add_argument("--dtypes", nargs="+", default=["bf16"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--providers", nargs="+", default=["flashcupy", "flash", "cudnn", "efficient", "naive"])
    ap.add_argument("--sweep", action="store_true", help="also time candidate forward configs")
    ap.add_argument("--dropout", type=float, default=0.0, help="also time flashcupy and SDPA flash with this dropout_p")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import cupy as cp
    import torch
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashcupy
    from flashcupy import _gpu
    from flashcupy._arrays import bfloat16
    from flashcupy._configs import BwdConfig, FwdConfig
    from flashcupy._validate import check_qkv

    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}; cupy {cp.__version__}", flush=True)
    rows = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    for dtype_name in args.dtypes:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        cdt = {"bf16": bfloat16(), "fp16": np.dtype(np.float16)}[dtype_name]
        for head_dim in args.head_dims:
            nheads = 2048 // head_dim
            for seqlen in args.seqlens:
                batch = max(1, 16384 // seqlen)
                g = torch.Generator(device="cuda").manual_seed(0)
                tq, tk, tv, tdo = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=tdt,
                                               generator=g) for _ in range(4))
                q, k, v, do = (cp.from_dlpack(t) for t in (tq, tk, tv, tdo))
                for causal in map(bool, args.causal):
                    shape = check_qkv(q, k, v)
                    for mode in args.modes:
                        impls = {}
                        if "flashcupy" in args.providers:
                            if mode == "fwd":
                                impls["flashcupy"] = lambda: flashcupy.flash_attn_forward(q, k, v, causal=causal)
                            else:
                                res = flashcupy.flash_attn_forward(q, k, v, causal=causal)
                                bwd = lambda: flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=causal)
                                if mode == "bwd":
                                    impls["flashcupy"] = bwd
                                else:
                                    def fb():
                                        r = flashcupy.flash_attn_forward(q, k, v, causal=causal)
                                        flashcupy.flash_attn_backward(do, q, k, v, r.out, r.lse, causal=causal)
                                    impls["flashcupy"] = fb
                            if args.dropout and mode == "fwd+bwd":
                                def fb_drop():
                                    r = flashcupy.flash_attn_forward(q, k, v, causal=causal, dropout_p=args.dropout)
                                    flashcupy.flash_attn_backward(do, q, k, v, r.out, r.lse, causal=causal,
                                                                  dropout_p=args.dropout, rng_state=r.rng_state)
                                impls[f"fc-drop{args.dropout}"] = fb_drop
                            if args.sweep and mode == "bwd":
                                from flashcupy._configs import bwd_config
                                base = bwd_config(head_dim, None, causal)
                                res = flashcupy.flash_attn_forward(q, k, v, causal=causal)
                                for bm, bn in [(64, 64), (32, 64), (64, 128), (32, 128)]:
                                    cfg = BwdConfig(base.head_dim, bm, bn, base.d_split, base.dq_block_m, base.dq_block_n, True)
                                    impls[f"fcb{bm}x{bn}"] = (lambda cfg=cfg, res=res: _gpu.backward(
                                        do, q, k, v, res.out, res.lse, shape, causal=causal, deterministic=False, config=cfg))
                                impls["fc-determ"] = (lambda res=res: flashcupy.flash_attn_backward(
                                    do, q, k, v, res.out, res.lse, causal=causal, deterministic=True))
                            if args.sweep and mode == "fwd":
                                for bm, bn, nw, qr in [(128, 64, 4, False), (128, 64, 4, True), (128, 128, 8, True),
                                                       (128, 32, 4, False)]:
                                    cfg = FwdConfig(head_dim, bm, bn, nw, qr)
                                    impls[f"fc{bm}x{bn}w{nw}{'q' if qr else ''}"] = (
                                        lambda cfg=cfg: _gpu.forward(q, k, v, shape, causal=causal, config=cfg))
                        # torch peers in BHSD views (no copy) of the same data
                        bq, bk, bv, bdo = (t.transpose(1, 2) for t in (tq, tk, tv, tdo))
                        for prov, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                            if prov not in args.providers:
                                continue

                            def run(backend=backend):
                                with sdpa_kernel(backend):
                                    if mode == "fwd":
                                        with torch.no_grad():
                                            return torch.nn.functional.scaled_dot_product_attention(bq, bk, bv, is_causal=causal)
                                    a, b, c = (x.detach().requires_grad_() for x in (bq, bk, bv))
                                    o = torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal)
                                    o.backward(bdo)
                            impls[prov] = run
                            if args.dropout and prov == "flash" and mode == "fwd+bwd":
                                def run_drop():
                                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                                        a, b, c = (x.detach().requires_grad_() for x in (bq, bk, bv))
                                        torch.nn.functional.scaled_dot_product_attention(
                                            a, b, c, is_causal=causal, dropout_p=args.dropout).backward(bdo)
                                impls[f"flash-drop{args.dropout}"] = run_drop
                        if "naive" in args.providers and mode == "fwd" and seqlen <= 4096:
                            # CuPy has no bf16 matmul: naive attention runs on fp16 copies of the inputs.
                            hq, hk, hv = (cp.from_dlpack(t.to(torch.float16)) for t in (tq, tk, tv))

                            def naive(q=hq, k=hk, v=hv):
                                s = cp.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) * (head_dim ** -0.5)
                                if causal:
                                    s = s + cp.triu(cp.full((seqlen, seqlen), -cp.inf, dtype=s.dtype), 1)
                                p = cp.exp(s - s.max(-1, keepdims=True))
                                p = p / p.sum(-1, keepdims=True)
                                return cp.matmul(p, v.transpose(0, 2, 1, 3))
                            impls["naive"] = naive
                        f = flops(batch, nheads, seqlen, head_dim, causal, mode)
                        for name, fn in impls.items():
                            try:
                                if mode == "bwd" and name in ("flash", "cudnn", "efficient"):
                                    # peers time fwd+bwd through autograd; subtract their forward
                                    t_fb = bench(fn)
                                    with sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                                                      "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]):
                                        with torch.no_grad():
                                            t_f = bench(lambda: torch.nn.functional.scaled_dot_product_attention(bq, bk, bv, is_causal=causal))
                                    ms = t_fb - t_f
                                else:
                                    ms = bench(fn)
                            except Exception as e:  # a peer that cannot run this case
                                print(f"# {name} {dtype_name} hd{head_dim} s{seqlen} causal={causal}: {type(e).__name__}: {str(e)[:100]}")
                                continue
                            rows.append(dict(provider=name, mode=mode, dtype=dtype_name, head_dim=head_dim, seqlen=seqlen,
                                             batch=batch, nheads=nheads, causal=causal, ms=ms, tflops=f / ms / 1e9))
                del tq, tk, tv, tdo, q, k, v, do
                torch.cuda.empty_cache()
                cp.get_default_memory_pool().free_all_blocks()

    # table: provider | shape | ms | TFLOP/s | ratio to flash (and cudnn)
    ref = {(r["mode"], r["dtype"], r["head_dim"], r["seqlen"], r["causal"], r["provider"]): r for r in rows}
    print(f"{'provider':<16}{'mode':<8}{'dtype':<6}{'hd':>4}{'seqlen':>7}{'causal':>7}{'ms':>9}{'TF/s':>8}{'/flash':>8}{'/cudnn':>8}")
    for r in rows:
        key = (r["mode"], r["dtype"], r["head_dim"], r["seqlen"], r["causal"])
        fl = ref.get(key + ("flash",))
        cd = ref.get(key + ("cudnn",))
        rf = r["tflops"] / fl["tflops"] if fl else math.nan
        rc = r["tflops"] / cd["tflops"] if cd else math.nan
        print(f"{r['provider']:<16}{r['mode']:<8}{r['dtype']:<6}{r['head_dim']:>4}{r['seqlen']:>7}{str(r['causal']):>7}"
              f"{r['ms']:>9.3f}{r['tflops']:>8.1f}{rf:>8.2f}{rc:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
