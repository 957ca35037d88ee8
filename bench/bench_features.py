"""Issue 16's speed targets: the cost of each score feature against the plain kernel, in one run.

    PYTHONPATH=. python3 bench/bench_features.py                     # H200 (or any GPU), bf16 hd128 16k
    PYTHONPATH=. python3 bench/bench_features.py --list              # the plan, no GPU needed

For each mode (fwd, fwd+bwd) it times flashcupy's public API (flash_attn_forward / flash_attn_backward)
on the FA benchmark shape (batch * seqlen = 16k tokens, hidden nheads * head_dim = 2048) with:
    causal                      the reference: dense causal
    window(L,0)                 window_size=(L, 0), causal=True, L = --window (4096)
    softcap, alibi, sinks       causal plus softcap=30 / alibi_slopes (nheads,) / sinks (nheads,)
and, where torch's FlexAttention runs (torch.compile of flex_attention), the same with a mask_mod /
score_mod (sinks: none; Flex has no sink), as the peer. Targets (issue 16): window time <= 1.15 x
causal time x (visible elements with the window / with causal); softcap and ALiBi <= 1.1 x causal;
sinks <= 1.05 x. Prints ms, the ratio to causal and the target per row; --json keeps every row.
Timing: flashcupy.bench.Timer (triton's do_bench where it imports: L2 flushed, median).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import NamedTuple

TOKENS, HIDDEN = 16384, 2048
FEATURES = ("causal", "window", "softcap", "alibi", "sinks")
TARGET = {"softcap": 1.10, "alibi": 1.10, "sinks": 1.05}


class Case(NamedTuple):
    mode: str  # fwd, fwd+bwd
    feature: str
    dtype: str
    head_dim: int
    seqlen: int
    batch: int
    nheads: int


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    ap.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    ap.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), default=["bf16"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[128])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[16384])
    ap.add_argument("--window", type=int, default=4096, help="window_size left side (right 0)")
    ap.add_argument("--softcap", type=float, default=30.0)
    ap.add_argument("--no-flex", action="store_true", help="skip torch FlexAttention")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def cases(args) -> list:
    return [Case(mode, f, dt, hd, s, max(1, TOKENS // s), max(1, HIDDEN // hd))
            for mode in args.modes for dt in args.dtypes for hd in args.head_dims for s in args.seqlens
            for f in args.features]


def visible_fraction(seqlen: int, window: int) -> float:
    """Visible elements with window_size=(window, 0) + causal over those with causal alone."""
    n, w = seqlen, min(window, seqlen - 1)
    causal = n * (n + 1) / 2
    return (causal - (n - w - 1) * (n - w) / 2) / causal


def _inputs(case):
    import cupy as cp

    from flashcupy._arrays import bfloat16

    rng = cp.random.default_rng(0)
    dt = bfloat16() if case.dtype == "bf16" else cp.float16
    shape = (case.batch, case.seqlen, case.nheads, case.head_dim)
    q, k, v, do = (rng.standard_normal(shape, dtype=cp.float32).astype(dt) for _ in range(4))
    return q, k, v, do


def _kwargs(case, args, xp):
    kw = dict(causal=True)
    if case.feature == "window":
        kw["window_size"] = (args.window, 0)
    elif case.feature == "softcap":
        kw["softcap"] = args.softcap
    elif case.feature == "alibi":
        kw["alibi_slopes"] = xp.asarray([2.0 ** (-8.0 * (h + 1) / case.nheads) for h in range(case.nheads)],
                                        dtype=xp.float32)
    elif case.feature == "sinks":
        kw["sinks"] = xp.zeros(case.nheads, dtype=xp.float32) + 0.5
    return kw


def _flashcupy_fn(case, args, inp):
    import cupy as cp

    import flashcupy

    q, k, v, do = inp
    kw = _kwargs(case, args, cp)
    if case.mode == "fwd":
        return lambda: flashcupy.flash_attn_forward(q, k, v, **kw).out

    def fn():
        fwd = flashcupy.flash_attn_forward(q, k, v, **kw)
        return flashcupy.flash_attn_backward(do, q, k, v, forward=fwd)[0]
    return fn


def _flex_fn(case, args, inp):
    """torch FlexAttention doing the same (compiled); None where the feature has no Flex form (sinks)."""
    if case.feature == "sinks":
        return None
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, do = (torch.from_dlpack(x).transpose(1, 2).requires_grad_(case.mode != "fwd") for x in inp)
    do = do.detach()
    n, w, cap = case.seqlen, args.window, args.softcap
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.nheads) for h in range(case.nheads)], device="cuda")

    def causal(b, h, i, j):
        return j <= i

    def window(b, h, i, j):
        return (j <= i) & (i - j <= w)

    mask = create_block_mask(window if case.feature == "window" else causal, None, None, n, n, device="cuda")
    score_mod = None
    if case.feature == "softcap":
        def score_mod(s, b, h, i, j):
            return cap * torch.tanh(s / cap)
    elif case.feature == "alibi":
        def score_mod(s, b, h, i, j):
            return s - slopes[h] * (i - j).abs()
    attn = torch.compile(flex_attention)
    if case.mode == "fwd":
        return lambda: attn(q, k, v, score_mod=score_mod, block_mask=mask)

    def fn():
        out = attn(q, k, v, score_mod=score_mod, block_mask=mask)
        out.backward(do)
        return out
    return fn


def run(args) -> list:
    from flashcupy.bench import Timer

    timer = Timer("gpu", args.warmup_ms, args.rep_ms, args.min_reps)
    rows, key, inp = [], None, None
    for case in cases(args):
        if (case.dtype, case.head_dim, case.seqlen) != key:
            inp, key = _inputs(case), (case.dtype, case.head_dim, case.seqlen)
        for provider, make in (("flashcupy", _flashcupy_fn), ("flex", None if args.no_flex else _flex_fn)):
            if make is None:
                continue
            try:
                fn = make(case, args, inp)
                if fn is None:
                    continue
                fn()
                ms = timer.time(fn, "torch" if provider == "flex" else "cupy")
            except Exception as e:  # a provider that cannot run this case
                print(f"# {provider} {case}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(case._asdict(), provider=provider, ms=ms))
            print(f"{case.mode:<8}{case.feature:<8}{provider:<10}{case.dtype:<5}{case.head_dim:>4}{case.seqlen:>7}"
                  f"{ms:>10.3f} ms", flush=True)
    return rows


def summary(rows: list, args) -> str:
    """ours / causal per feature, with issue 16's target, and flashcupy / Flex where both ran."""
    by = {(r["mode"], r["feature"], r["dtype"], r["head_dim"], r["seqlen"], r["provider"]): r["ms"] for r in rows}
    lines = ["mode     feature  dtype hd   seqlen  ms      x causal  target  flex / ours"]
    for (mode, feat, dt, hd, s, prov), ms in sorted(by.items()):
        if prov != "flashcupy":
            continue
        base = by.get((mode, "causal", dt, hd, s, "flashcupy"))
        target = 1.15 * visible_fraction(s, args.window) if feat == "window" else TARGET.get(feat, 1.0)
        flex = by.get((mode, feat, dt, hd, s, "flex"))
        lines.append(f"{mode:<9}{feat:<9}{dt:<6}{hd:<5}{s:<8}{ms:<8.3f}{(ms / base if base else math.nan):<10.3f}"
                     f"{target:<8.3f}{(flex / ms if flex else math.nan):.2f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for c in cases(args):
            print(c)
        return 0
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(summary(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
