"""The Hopper forward (cuda/flash_fwd_sm90.cu) against flashcupy's mma.sync forward and torch SDPA's
cuDNN and flash backends, same inputs, same run (issue 14).

Method (DESIGN.md): FA benchmark shape (nheads * head_dim = 2048, batch * seqlen = 16384), bf16 and
fp16, triton.testing.do_bench (CUDA events, L2 flushed, median), TFLOP/s = 4 B H S^2 D (halved for
causal) / time. Each flashcupy row is checked against SDPA's output (max |diff| printed).

    PYTHONPATH=. python3 bench/bench_sm90.py [--head-dims 64 128] [--seqlens 1024 4096 16384] [--json out.json]
"""

import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["bf16"])
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--sweep", action="store_true", help="also time every config of flashcupy._gpu_sm90.SWEEP")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import cupy as cp
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashcupy

    rows = []
    for dt in args.dtypes:
        tdtype = torch.bfloat16 if dt == "bf16" else torch.float16
        for hd in args.head_dims:
            for s in args.seqlens:
                h, b = 2048 // hd, max(1, 16384 // s)
                for causal in map(bool, args.causal):
                    torch.manual_seed(0)
                    tq, tk, tv = (torch.randn(b, s, h, hd, device="cuda", dtype=tdtype) for _ in range(3))
                    q, k, v = (cp.from_dlpack(x) for x in (tq, tk, tv))
                    flops = 4 * b * h * s * s * hd / (2 if causal else 1)
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), is_causal=causal).transpose(1, 2)
                    impls = {}
                    for name, flag in (("flashcupy-sm90", "1"), ("flashcupy-mma", "0")):
                        def run(flag=flag):
                            os.environ["FLASHCUPY_SM90"] = flag
                            return flashcupy.flash_attn_forward(q, k, v, causal=causal)
                        impls[name] = run
                    if args.sweep:
                        from flashcupy import _gpu, _gpu_sm90
                        from flashcupy._validate import check_qkv

                        shape = check_qkv(q, k, v)
                        for cfg in _gpu_sm90.SWEEP:
                            if cfg.head_dim == hd:
                                tag = (f"sm90-n{cfg.block_n}-s{cfg.stages}{'-ov' if cfg.overlap else ''}"
                                       f"{'-pp' if cfg.pingpong else ''}")
                                impls[tag] = lambda cfg=cfg, shape=shape: _gpu.forward(q, k, v, shape, causal=causal, config=cfg)
                    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                        def run_t(backend=backend):
                            with sdpa_kernel(backend):
                                return torch.nn.functional.scaled_dot_product_attention(
                                    tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), is_causal=causal)
                        impls[name] = run_t
                    for name, fn in impls.items():
                        try:
                            res = fn()
                            err = None
                            if name.startswith(("flashcupy", "sm90")):
                                out = torch.from_dlpack(res.out if hasattr(res, "out") else res[0])
                                err = float((out.float() - ref.float()).abs().max())
                            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                        except Exception as e:  # a backend that cannot run this case
                            print(f"# {name} {dt} hd{hd} s{s} causal={causal}: {type(e).__name__}: {str(e)[:160]}")
                            continue
                        rows.append(dict(provider=name, mode="fwd", dtype=dt, head_dim=hd, seqlen=s, batch=b, nheads=h,
                                         causal=causal, ms=ms, tflops=flops / ms / 1e9, max_diff_vs_sdpa=err))
                        print(f"{name:<16}{dt:<6}{hd:>4}{s:>7}{str(causal):>7}{ms:>10.3f} ms{flops / ms / 1e9:>8.1f} TF/s"
                              + (f"  max|diff| {err:.2e}" if err is not None else ""), flush=True)
                    os.environ.pop("FLASHCUPY_SM90", None)
    print("\n== ratios (TFLOP/s of flashcupy-sm90 / peer)")
    for r in rows:
        if r["provider"] != "flashcupy-sm90":
            continue
        peers = {x["provider"]: x["tflops"] for x in rows
                 if (x["dtype"], x["head_dim"], x["seqlen"], x["causal"]) == (r["dtype"], r["head_dim"], r["seqlen"], r["causal"])}
        ratio = "  ".join(f"{p} {r['tflops'] / t:.2f}x" for p, t in peers.items() if p != "flashcupy-sm90")
        print(f"{r['dtype']} hd{r['head_dim']} s{r['seqlen']} causal={r['causal']}: {r['tflops']:.0f} TF/s  {ratio}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
