"""The Hopper kernels against flashcupy's mma.sync kernels and their peers (torch SDPA cuDNN and flash,
FA3 where `flash_attn_interface` imports), same inputs, same run (issues 14 and 15).

Method (DESIGN.md): FA benchmark shape (nheads = 2048 / head_dim, batch = 16384 / seqlen), CUDA events
(flashcupy.bench.Timer: triton.testing.do_bench when it imports, else CuPy events; L2 flushed, warm-up,
median), TFLOP/s = 4 B H S^2 D (halved for causal; x2.5 for the backward, x3.5 for fwd+bwd) / time,
times the kept fraction of a block mask. Each flashcupy row is checked against a reference from the
same inputs (max |diff| printed): SDPA's default backend when dense, else the mma.sync forward (or the
FLASHCUPY_SM90_BWD=0 backward with --bwd-ab), which draws the same dropout keep bits.

    PYTHONPATH=. python3 bench/bench_sm90.py                 # the issue-14 table: fp16 + bf16, hd 64/128,
                                                             # causal and not, 1k..16k: 40 cases, ~200 timings
                                                             # (estimated 1-2 min on an H200 with the kernels in
                                                             # CuPy's cache; not yet measured)
    PYTHONPATH=. python3 bench/bench_sm90.py --hd256         # + hd 256: SWEEP's hd256 configs vs mma.sync, cuDNN
    PYTHONPATH=. python3 bench/bench_sm90.py --variants dropout mask --dtypes bf16
                       # Hopper forward with dropout_p 0.1 vs the mma.sync forward with it (and SDPA's), and
                       # with a 128x128 block mask at density 0.5 vs the mma.sync forward with the same mask
    PYTHONPATH=. python3 bench/bench_sm90.py --sweep         # + every config of flashcupy._gpu_sm90.SWEEP
    PYTHONPATH=. python3 bench/bench_sm90.py --bwd           # backward alone, hd 64/128/256, vs SDPA cuDNN / flash
    PYTHONPATH=. python3 bench/bench_sm90.py --bwd-ab        # the backward with FLASHCUPY_SM90_BWD=0 and =1,
                                                             # toggled between calls in one process
    PYTHONPATH=. python3 bench/bench_sm90.py --list          # the cases and providers, nothing run (no GPU)

--modes fwd bwd fwd+bwd picks the directions (--bwd is --modes bwd). The backward of flashcupy is
flash_attn_backward(dout, q, k, v, forward=fwd) on a forward made once (fwd+bwd: both, through the
public API); SDPA's is torch.autograd.grad on a retained graph. A short table prints last; --json
writes every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import NamedTuple

HIDDEN, TOKENS, BLOCK = 2048, 16384, 128
BWD_ENV = "FLASHCUPY_SM90_BWD"  # read by the backward's plan at each call
SEED = (1234, 0)  # dropout (seed, offset) of every flashcupy call: the same keep bits on both paths


class Case(NamedTuple):
    mode: str  # fwd, bwd, fwd+bwd
    variant: str  # dense, dropout, mask
    dtype: str  # fp16, bf16
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    nheads: int


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"], default=None,
                    help="directions to time (default fwd; bwd with --bwd / --bwd-ab)")
    ap.add_argument("--bwd", action="store_true", help="time the backward alone (same as --modes bwd)")
    ap.add_argument("--bwd-ab", action="store_true",
                    help=f"backward modes: time flashcupy with {BWD_ENV}=0 and =1 in this process")
    ap.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16"], default=["fp16", "bf16"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=None,
                    help="default 64 128 for the forward (256 with --hd256), 64 128 256 with backward modes")
    ap.add_argument("--hd256", action="store_true", help="add head_dim 256 (the hd256 configs of SWEEP)")
    ap.add_argument("--seqlens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", nargs="+", type=int, choices=[0, 1], default=[0, 1])
    ap.add_argument("--variants", nargs="+", choices=["dense", "dropout", "mask"], default=["dense"],
                    help="dense; dropout (--dropout-p); mask (a block mask of BLOCKxBLOCK tiles at --density)")
    ap.add_argument("--dropout-p", type=float, default=0.1)
    ap.add_argument("--density", type=float, default=0.5, help="kept fraction of the block mask's tiles")
    ap.add_argument("--deterministic", action="store_true",
                    help="backward modes: also flashcupy with deterministic=True (flashcupy-det)")
    ap.add_argument("--sweep", action="store_true",
                    help="forward: also every config of flashcupy._gpu_sm90.SWEEP; backward: of _gpu_sm90_bwd.SWEEP")
    ap.add_argument("--peers", nargs="*", choices=["sdpa-cudnn", "sdpa-flash", "fa3"],
                    default=["sdpa-cudnn", "sdpa-flash", "fa3"], help="peers to time (fa3 only where it imports)")
    ap.add_argument("--no-mma", action="store_true", help="forward: skip flashcupy's mma.sync rows")
    ap.add_argument("--no-check", action="store_true", help="skip the max|diff| check against the reference")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=50.0)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--list", action="store_true", help="print the cases and providers and stop (no GPU needed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.modes is None:
        args.modes = ["bwd"] if (args.bwd or args.bwd_ab) else ["fwd"]
    elif args.bwd and "bwd" not in args.modes:
        args.modes.append("bwd")
    if args.head_dims is None:
        args.head_dims = [64, 128, 256] if any(m != "fwd" for m in args.modes) else [64, 128]
    if args.hd256 and 256 not in args.head_dims:
        args.head_dims.append(256)
    if not 0 < args.dropout_p < 1:
        ap.error(f"--dropout-p: expected 0 < p < 1, got {args.dropout_p}")
    if not 0 < args.density <= 1:
        ap.error(f"--density: expected 0 < density <= 1, got {args.density}")
    return args


def cases(args) -> list:
    out = []
    for mode in args.modes:
        for variant in args.variants:
            for dt in args.dtypes:
                for hd in args.head_dims:
                    for s in args.seqlens:
                        for causal in map(bool, args.causal):
                            out.append(Case(mode, variant, dt, hd, s, causal, max(1, TOKENS // s),
                                            max(1, HIDDEN // hd)))
    return out


def _tag(cfg) -> str:
    return (f"sm90-n{cfg.block_n}-s{cfg.stages}{'-ov' if cfg.overlap else ''}"
            f"{'-pp' if cfg.pingpong else ''}")


def sm90_configs(head_dim: int, causal: bool, sweep: bool) -> list:
    """(provider name, Sm90FwdConfig) of the Hopper forward rows: config_for's choice as flashcupy-sm90
    (head_dim <= 128), every SWEEP config of the head dim with --sweep, and SWEEP's configs of a head dim
    that config_for does not serve (256: nothing chosen before it is measured)."""
    from flashcupy import _gpu_sm90

    if head_dim > 128:
        return [(_tag(c), c) for c in _gpu_sm90.SWEEP if c.head_dim == 256]
    chosen = _gpu_sm90.config_for(head_dim, causal)
    rows = [("flashcupy-sm90", chosen)]
    if sweep:
        rows += [(_tag(c), c) for c in _gpu_sm90.SWEEP if c.head_dim == chosen.head_dim and c != chosen]
    return rows


def _bwd_tag(cfg) -> str:
    return f"sm90b-m{cfg.block_m}-s{cfg.stages}-ov{cfg.overlap}{f'-lpt{cfg.lpt}' if cfg.lpt else ''}"


def _sm90_bwd_chosen():
    from flashcupy import _gpu_sm90_bwd

    return {_gpu_sm90_bwd.config_for(64), _gpu_sm90_bwd.config_for(128)}


def sm90_bwd_configs(head_dim: int) -> list:
    """(provider name, Sm90BwdConfig) of every backward SWEEP config of the head dim (--sweep)."""
    from flashcupy import _gpu_sm90_bwd

    tile = 64 if head_dim <= 64 else 128
    return [(_bwd_tag(c), c) for c in _gpu_sm90_bwd.SWEEP if c.head_dim == tile and head_dim <= 128]


def providers(case: Case, args) -> list:
    """Provider names of a case, the reference-bearing base first (flashcupy-mma, flashcupy-bwd0)."""
    if case.mode == "fwd":
        names = [] if args.no_mma else ["flashcupy-mma"]
        names += [n for n, cfg in sm90_configs(case.head_dim, case.causal, args.sweep)
                  if case.variant != "mask" or cfg.takes_block_mask(BLOCK, BLOCK)]  # whole tiles only
    else:
        names = ["flashcupy-bwd0", "flashcupy-bwd1"] if args.bwd_ab else ["flashcupy"]
        if getattr(args, "deterministic", False) and case.variant == "dense":
            names.append("flashcupy-det")
        if args.sweep and case.mode == "bwd" and case.variant == "dense":
            names += [n for n, _ in sm90_bwd_configs(case.head_dim)]
            if getattr(args, "deterministic", False):  # the Hopper kernel's own deterministic mode, forced
                names += [n + "-det" for n, c in sm90_bwd_configs(case.head_dim) if c in _sm90_bwd_chosen()]
    if case.variant == "mask":
        return names  # no block-sparse attention in SDPA or FA3
    peers = [p for p in args.peers if not (p == "fa3" and case.variant == "dropout")]  # FA3 has no dropout
    return names + peers


def is_ours(name: str) -> bool:
    return name.startswith(("flashcupy-sm90", "sm90-", "sm90b-", "flashcupy-bwd1")) or name in ("flashcupy", "flashcupy-det")


def base_of(case: Case) -> str:
    return "flashcupy-mma" if case.mode == "fwd" else "flashcupy-bwd0"


# ---------------------------------------------------------------------------------------------------
# the report (pure: rows in, text out)


def _key(r) -> tuple:
    return (r["mode"], r["variant"], r["dtype"], r["head_dim"], r["causal"], r["seqlen"])


def summary(rows: list) -> str:
    """One line per row of ours: its TFLOP/s, the peers' and the ratios; then min / median of the ratio
    to cuDNN per (mode, variant, dtype, head_dim) over seqlen >= 2k."""
    from flashcupy.bench import plain_table

    groups = {}
    for r in rows:
        groups.setdefault(_key(r), {})[r["provider"]] = r
    header = ["mode", "variant", "dtype", "hd", "causal", "seqlen", "ours", "TF/s", "cuDNN", "flash", "fa3", "base",
              "x cuDNN", "x flash", "x base"]
    table, keys, ratios = [], [], {}

    def tf(r):
        return "-" if r is None else f"{r['tflops']:.0f}"

    def ratio(mine, r):
        return "-" if r is None or not r["tflops"] else f"{mine['tflops'] / r['tflops']:.2f}"

    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5])):
        g = groups[key]
        mode = key[0]
        base = g.get("flashcupy-mma" if mode == "fwd" else "flashcupy-bwd0")
        for name, r in g.items():
            if not is_ours(name):
                continue
            cudnn, flash = g.get("sdpa-cudnn"), g.get("sdpa-flash")
            table.append([mode, key[1], key[2], key[3], "y" if key[4] else "n", key[5], name, tf(r), tf(cudnn),
                          tf(flash), tf(g.get("fa3")), tf(base), ratio(r, cudnn), ratio(r, flash), ratio(r, base)])
            keys.append(key[:5])
            if cudnn is not None and cudnn["tflops"] and key[5] >= 2048:
                ratios.setdefault((mode, key[1], key[2], key[3], name), []).append(r["tflops"] / cudnn["tflops"])
    text = [plain_table(header, table, groups=keys) if table else "(no rows of ours)"]
    if ratios:
        text.append("\n== x cuDNN at seqlen >= 2k (causal and not): min / median")
        for (mode, variant, dt, hd, name), xs in sorted(ratios.items()):
            text.append(f"{mode:<8}{variant:<8}{dt:<5}hd{hd:<4}{name:<26}{min(xs):.2f} / {statistics.median(xs):.2f}")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------------
# running (GPU)


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class _Inputs:
    """torch tensors (BSHD) of one (dtype, head_dim, seqlen) and their zero-copy CuPy views."""

    def __init__(self, case: Case):
        import cupy as cp
        import torch

        tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float16
        torch.manual_seed(0)
        shape = (case.batch, case.seqlen, case.nheads, case.head_dim)
        self.tq, self.tk, self.tv, self.tdo = (torch.randn(shape, device="cuda", dtype=tdtype) for _ in range(4))
        self.q, self.k, self.v, self.do = (cp.from_dlpack(x) for x in (self.tq, self.tk, self.tv, self.tdo))

    def bhsd(self):
        return tuple(x.transpose(1, 2) for x in (self.tq, self.tk, self.tv, self.tdo))


def _block_mask(case: Case, density: float):
    import numpy as np

    from flashcupy import bench
    from flashcupy.blocksparse import BlockMask

    m = bench.block_mask(case.seqlen, case.seqlen, density, causal=case.causal, block=BLOCK, seed=0)
    if m is None:  # density 1: every tile
        m = np.ones((-(-case.seqlen // BLOCK),) * 2, dtype=bool)
    return BlockMask(m, block_q=BLOCK, block_k=BLOCK), bench.kept_fraction(m, causal=case.causal)


def _torch_fn(name, case, inp, dropout_p):
    """fn() -> dict of BSHD torch outputs, for an SDPA backend or FA3."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = case.causal
    if name == "fa3":
        import flash_attn_interface

        def attn(q, k, v):  # BSHD
            res = flash_attn_interface.flash_attn_func(q, k, v, causal=causal)
            return res[0] if isinstance(res, tuple) else res
        q, k, v, do = inp.tq, inp.tk, inp.tv, inp.tdo

        def back(x):
            return x
    else:
        backend = SDPBackend.CUDNN_ATTENTION if name == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION

        def attn(q, k, v):  # BHSD views
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        q, k, v, do = inp.bhsd()

        def back(x):
            return x.transpose(1, 2)
    if case.mode == "fwd":
        def fn():
            with torch.no_grad():
                return {"out": back(attn(q, k, v))}
        return fn
    if case.mode == "bwd":
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        o = attn(a, b, c)

        def fn():
            return dict(zip(("dq", "dk", "dv"), map(back, torch.autograd.grad(o, (a, b, c), do, retain_graph=True))))
        return fn

    def fn():
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        o = attn(a, b, c)
        grads = torch.autograd.grad(o, (a, b, c), do)
        return dict(out=back(o), **dict(zip(("dq", "dk", "dv"), map(back, grads))))
    return fn


def _flashcupy_fn(name, case, inp, args, bmask, device):
    """(fn() -> dict of CuPy outputs, plan description) for a flashcupy provider."""
    import flashcupy
    from flashcupy import _configs, _dispatch, _gpu
    from flashcupy._validate import check_qkv

    drop = args.dropout_p if case.variant == "dropout" else 0.0
    sparse = None if bmask is None else (bmask.block_q, bmask.block_k)
    q, k, v, do = inp.q, inp.k, inp.v, inp.do
    if case.mode == "fwd":
        shape = check_qkv(q, k, v)
        dropout = (drop, SEED) if drop else None
        if name == "flashcupy-mma":
            cfg = _configs.fwd_config(case.head_dim, q.dtype, case.causal, device, sparse)
        else:
            cfg = dict(sm90_configs(case.head_dim, case.causal, True))[name]
            if bmask is not None and not cfg.takes_block_mask(bmask.block_q, bmask.block_k):
                raise ValueError(f"{cfg} does not take {bmask.block_q}x{bmask.block_k} blocks")

        def fn():
            out, _ = _gpu.forward(q, k, v, shape, causal=case.causal, dropout=dropout, block_mask=bmask, config=cfg)
            return {"out": out}
        return fn, str(cfg)
    if name.startswith("sm90b-"):  # one backward SWEEP config, on a forward made once (-det: deterministic)
        shape = check_qkv(q, k, v)
        det = name.endswith("-det")
        cfg = dict(sm90_bwd_configs(case.head_dim))[name.removesuffix("-det")]
        out, lse = _gpu.forward(q, k, v, shape, causal=case.causal)

        def fn():
            return dict(zip(("dq", "dk", "dv"), _gpu.backward(do, q, k, v, out, lse, shape, causal=case.causal,
                                                             deterministic=det, config=cfg)))
        return fn, str(cfg) + (" deterministic" if det else "")
    det = name == "flashcupy-det"
    plan = _dispatch.backward_plan(q.dtype, case.head_dim, case.causal, device, dropout=drop > 0, sparse_blocks=sparse,
                                   deterministic=det)
    opts = dict(causal=case.causal, dropout_p=drop, seed=SEED if drop else None, block_mask=bmask)
    if case.mode == "bwd":
        fwd = flashcupy.flash_attn_forward(q, k, v, **opts)

        def fn():
            return dict(zip(("dq", "dk", "dv"), flashcupy.flash_attn_backward(do, q, k, v, forward=fwd,
                                                                             deterministic=det)))
    else:
        def fn():
            fwd = flashcupy.flash_attn_forward(q, k, v, **opts)
            return dict(out=fwd.out, **dict(zip(("dq", "dk", "dv"), flashcupy.flash_attn_backward(
                do, q, k, v, forward=fwd, deterministic=det))))
    return fn, f"{_dispatch.path_name(plan)}: {None if plan is None else plan.config}"


def _max_diff(got: dict, ref: dict):
    import torch

    diffs = [float((torch.from_dlpack(got[n]).float() - torch.from_dlpack(ref[n]).float()).abs().max())
             for n in got if n in ref]
    return max(diffs) if diffs else None


def _sdpa_reference(case, inp):
    """SDPA's default backend on the dense problem: {'out'} or {'dq', 'dk', 'dv'} (and 'out'), BSHD."""
    import torch

    q, k, v, do = inp.bhsd()
    a, b, c = (x.detach().requires_grad_(case.mode != "fwd") for x in (q, k, v))
    with torch.set_grad_enabled(case.mode != "fwd"):
        o = torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=case.causal)
    ref = {"out": o.detach().transpose(1, 2)}
    if case.mode != "fwd":
        ref.update(zip(("dq", "dk", "dv"), (g.transpose(1, 2) for g in torch.autograd.grad(o, (a, b, c), do))))
    return ref


def run(args) -> list:
    import cupy as cp

    from flashcupy import _device
    from flashcupy.bench import Timer, attention_flops

    timer = Timer("gpu", args.warmup_ms, args.rep_ms, args.min_reps)
    device = _device.current_device_info()
    fa3_ok = True
    try:
        import flash_attn_interface  # noqa: F401
    except Exception:
        fa3_ok = False
    rows, inputs_key, inp = [], None, None
    for case in cases(args):
        if (case.dtype, case.head_dim, case.seqlen) != inputs_key:
            inp, inputs_key = None, None
            cp.get_default_memory_pool().free_all_blocks()
            inp, inputs_key = _Inputs(case), (case.dtype, case.head_dim, case.seqlen)
        bmask, kept = _block_mask(case, args.density) if case.variant == "mask" else (None, 1.0)
        flops = attention_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.head_dim, causal=case.causal,
                                mode=case.mode, density=kept)
        ref = None
        if not args.no_check and case.variant == "dense":
            ref = _sdpa_reference(case, inp)
        for name in providers(case, args):
            if name == "fa3" and not fa3_ok:
                continue
            env = {"flashcupy-bwd0": "0", "flashcupy-bwd1": "1"}.get(name)
            row = dict(case._asdict(), provider=name, density=kept, plan=None, max_diff=None,
                       env={BWD_ENV: env if env is not None else os.environ.get(BWD_ENV)})
            try:
                with _env(BWD_ENV, env):
                    if name.startswith(("flashcupy", "sm90-", "sm90b-")):
                        fn, row["plan"] = _flashcupy_fn(name, case, inp, args, bmask, device)
                    else:
                        fn = _torch_fn(name, case, inp, args.dropout_p if case.variant == "dropout" else 0.0)
                    got = fn()
                    if not args.no_check:
                        if ref is not None and name.startswith(("flashcupy", "sm90-", "sm90b-")):
                            row["max_diff"] = _max_diff(got, ref)
                        elif name == base_of(case) and case.variant != "dense":
                            ref = got  # same keep bits, same mask: ours must match it
                    del got
                    ms = timer.time(fn, "cupy")
            except Exception as e:  # a provider that cannot run this case
                print(f"# {name} {case}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row.update(ms=ms, tflops=flops / ms / 1e9)
            rows.append(row)
            print(f"{case.mode:<8}{case.variant:<8}{name:<26}{case.dtype:<5}{case.head_dim:>4}{case.seqlen:>7}"
                  f"{'  causal' if case.causal else '        '}{ms:>10.3f} ms{row['tflops']:>8.1f} TF/s"
                  + (f"  max|diff| {row['max_diff']:.2e}" if row["max_diff"] is not None else "")
                  + (f"  [{row['plan']}]" if row["plan"] else ""), flush=True)
        del ref
        if args.bwd_ab and case.mode != "fwd":
            plans = {r["plan"] for r in rows if _key(r) == _key(dict(case._asdict(), provider=""))
                     and r["provider"] in ("flashcupy-bwd0", "flashcupy-bwd1")}
            if len(plans) == 1:
                print(f"# note: {BWD_ENV}=0 and =1 plan the same backward here ({plans.pop()})", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    todo = cases(args)
    if args.list:
        n = 0
        for case in todo:
            names = providers(case, args)
            n += len(names)
            print(f"{case.mode:<8}{case.variant:<8}{case.dtype:<5}hd{case.head_dim:<4}s{case.seqlen:<6}"
                  f"{'causal ' if case.causal else '       '}b{case.batch:<3}h{case.nheads:<3} {' '.join(names)}")
        print(f"# {len(todo)} cases, {n} timings (fa3 only where it imports)")
        return 0
    import cupy as cp
    import torch

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"# device: {dev}; torch {torch.__version__}; cupy {cp.__version__}; {BWD_ENV}={os.environ.get(BWD_ENV)}",
          flush=True)
    rows = run(args)
    print(f"\n== {dev}: TFLOP/s (FA formula) and ratios of ours to the peers; base = flashcupy-mma (forward) or "
          f"{BWD_ENV}=0 (--bwd-ab)")
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, torch=torch.__version__, cupy=cp.__version__, argv=sys.argv[1:],
                           args=vars(args), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
