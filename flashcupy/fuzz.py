"""flashcupy fuzz: a time-boxed campaign of random attention problems through flashcupy's public API
(the forward and the backward, causal and not, GQA, ragged lengths, every dtype, the score features:
sliding window, softcap, ALiBi, sinks, and the call options: fused dropout and block masks) on this
machine's GPU, or on the CPU path without one, each checked against the float64 oracle by
flashcupy.testing's rule (dropout cases by its dropout form, with the case's regenerated keep-mask).
Half the cases draw their input distribution (normal, large logits, FA3's outlier mix, exact ties) and,
independently, half their memory layout (BSHD, BHSD views, NaN-padded views): testing.Case.distribution
/ .layout; a quarter dropout and a quarter a block mask: Case.dropout_p / .block_mask.

    flashcupy fuzz --minutes 5                 # until 5 minutes or --max-examples cases
    flashcupy fuzz --features none             # plain attention only (no score feature, dropout or block mask)
    flashcupy fuzz --case "Case(batch=1, ...)" --directions fwd    # replay one case (what a failure prints)

Prints progress (cases/s, failures; a tqdm bar where tqdm is installed), writes a JSON report with
--json, and for every failure a command that reproduces it. Exit status 1 on any failure, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time

import numpy as np


DIRECTIONS = ("fwd", "bwd")
# testing.Case fields: window_size, softcap, alibi_slopes, sinks (the score features, each drawn with probability
# 1/2), dropout_p and block_mask (the call options, each in a quarter of the cases)
FEATURES = ("window", "softcap", "alibi", "sinks", "dropout", "blockmask")
_CASE_FIELD = {"window": "window_size", "softcap": "softcap", "alibi": "alibi_slopes", "sinks": "sinks",
               "dropout": "dropout_p", "blockmask": "block_mask"}
DTYPES = ("float16", "bfloat16", "float32", "float64")
HEAD_DIMS = (8, 16, 32, 40, 64, 128)  # testing.random_cases' default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=1.0, help="stop after this much wall time")
    p.add_argument("--max-examples", type=int, default=1000, help="stop after this many cases")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                   help="dtypes to draw (bfloat16 only where ml_dtypes imports)")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS),
                   help="fwd: the forward (out, lse); bwd: the gradients as well")
    p.add_argument("--features", nargs="+", choices=FEATURES + ("none",), default=list(FEATURES),
                   help="features a case may draw: the score features, each on with probability 1/2, fused "
                        "dropout and a block mask, each in a quarter of the cases (none: plain attention)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: CuPy arrays (the fused kernels); cpu: NumPy arrays (the CPU path); auto: gpu if usable")
    p.add_argument("--max-seqlen", type=int, default=256, help="largest seqlen_q / seqlen_k drawn")
    p.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS), metavar="HEAD_DIM",
                   help="head dims to draw (every one up to 256 runs fused on the GPU; 192 and 256 take the "
                        "fp16/bf16 mma.sync family on an H100 / H200)")
    p.add_argument("--allow-tf32", action="store_true",
                   help="float32 cases run with allow_tf32=True (the TF32 tensor-core kernels) and are checked "
                        "against the TF32 naive error (flashcupy.testing's tf32 rule)")
    p.add_argument("--seed", type=int, default=0, help="the campaign's cases are a function of it")
    p.add_argument("--case", default=None, help="replay one flashcupy.testing.Case(...) (as a failure prints it)")
    p.add_argument("--json", default=None, help="write the report here")


def _on_gpu(device: str) -> bool:
    from ._arrays import gpu_available

    if device == "cpu":
        return False
    if device == "gpu" and not gpu_available():
        from .cli import CommandError

        raise CommandError("--device gpu: no CUDA GPU is usable through CuPy")
    return gpu_available()


def _forward(q, k, v, causal, **kw):  # the calls under test (a seam for tests)
    import flashcupy

    return flashcupy.flash_attn_forward(q, k, v, causal=causal, **kw)


def _backward(dout, q, k, v, res, causal, **kw):
    import flashcupy

    return flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal, **kw)


def check_case(case, directions, gpu: bool, allow_tf32: bool = False) -> float:
    """Run one Case in the directions ("fwd", "bwd"), with its score features; returns its worst error /
    bound ratio. Raises AssertionError (the rule's message) where it fails. allow_tf32: a float32 case
    runs with allow_tf32=True and is checked by the rule's tf32 form (other dtypes are unaffected)."""
    from . import testing

    q, k, v, dout = case.inputs(grad=True)
    feats = case.feature_kwargs()  # NumPy float32 arrays for slopes / sinks: the oracle's
    call_feats = feats
    xp = np
    if gpu:
        import cupy as xp

        call_feats = {n: xp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in feats.items()}
    args = tuple(testing.layout_view(x, case.layout, xp) for x in (q, k, v, dout))  # the case's memory layout
    tf32 = allow_tf32 and case.dtype == "float32"
    if tf32:
        call_feats = dict(call_feats, allow_tf32=True)
    mask = case.element_mask()  # the oracle's view of the block mask (None without one)
    if case.block_mask is not None:
        from .blocksparse import BlockMask

        call_feats = dict(call_feats, block_mask=BlockMask(case.block_mask_bool(), *case.block_mask[:2]))
    if case.dropout_p:
        if tf32:
            raise ValueError("a dropout case with allow_tf32: the dropout rule has no TF32 form")
        call_feats = dict(call_feats, dropout_p=case.dropout_p, seed=case.dropout_seed)
    scale = case.softmax_scale
    res = _forward(*args[:3], case.causal, softmax_scale=scale, **call_feats)
    call_feats.pop("seed", None)
    if case.dropout_p:
        from . import dropout

        keep = dropout.keep_mask(*case.dropout_seed, case.batch, case.nheads, case.seqlen_q, case.seqlen_k,
                                 case.dropout_p)
        grads = None
        if "bwd" in directions:
            grads = _backward(args[3], *args[:3], res, case.causal, softmax_scale=scale, rng_state=res.rng_state,
                              **call_feats)
        ratios = testing.assert_dropout_rule(res.out, grads, dout, q, k, v, keep, dropout.effective_dropout_p(
            case.dropout_p), causal=case.causal, mask=mask, softmax_scale=scale, **feats)
        return testing.worst_ratio(ratios)
    worst = testing.worst_ratio(testing.assert_forward_rule(res.out, res.lse, q, k, v, causal=case.causal, tf32=tf32,
                                                            softmax_scale=scale, mask=mask, **feats))
    if "bwd" in directions:
        grads = _backward(args[3], *args[:3], res, case.causal, softmax_scale=scale, **call_feats)
        worst = max(worst, testing.worst_ratio(testing.assert_backward_rule(grads, dout, q, k, v, causal=case.causal,
                                                                            tf32=tf32, softmax_scale=scale, mask=mask,
                                                                            **feats)))
    return worst


def _restrict(case, features):
    """The case with the score features not in `features` turned off."""
    from . import testing

    defaults = {**testing.FEATURE_DEFAULTS, **testing.OPTION_DEFAULTS}
    off = {_CASE_FIELD[f]: defaults[_CASE_FIELD[f]] for f in FEATURES if f not in features}
    return case._replace(**off) if off else case


def parse_case(text: str):
    """A flashcupy.testing.Case from its repr, `Case(batch=1, ...)` (what a failure prints), read with ast
    (keyword constants only: nothing is evaluated). Raises CommandError naming --case otherwise."""
    import ast

    from . import testing
    from .cli import CommandError

    try:
        node = ast.parse(text.strip(), mode="eval").body
        name = getattr(node, "func", None)
        name = getattr(name, "id", None) or getattr(name, "attr", None)
        if not isinstance(node, ast.Call) or name != "Case" or node.args:
            raise ValueError("not a Case(...) call with keyword arguments")
        return testing.Case(**{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
    except (SyntaxError, ValueError, TypeError) as e:
        raise CommandError(f"--case: expected flashcupy.testing.Case(field=value, ...), got {text!r} ({e})") from None


def _cases(args):
    from . import testing

    if args.case:
        yield parse_case(args.case)
        return
    feats = [f for f in args.features if f != "none"]
    block = 0
    while True:  # blocks of random_cases, each a function of (seed, block)
        rng = np.random.default_rng([args.seed, block, 7])
        for case in testing.random_cases(256, seed=args.seed * 1000003 + block, dtypes=tuple(args.dtypes),
                                         max_seqlen=args.max_seqlen, head_dims=tuple(args.head_dims),
                                         features=bool(feats), inputs=True, options=bool(feats)):
            case = _restrict(case, feats)
            if args.allow_tf32 and case.dtype == "float32":  # the dropout rule has no TF32 form
                case = case._replace(dropout_p=0.0)
            yield _with_scale(case, rng)
        block += 1


def _with_scale(case, rng):
    """The case with a drawn softmax_scale in half of the cases (random_cases always leaves the default):
    0 (every score 0: the kernels' special case) in one case in sixteen, else uniform in
    [0, 2 / sqrt(head_dim)), rounded to float32."""
    u = rng.random()
    if u < 0.5:
        return case
    scale = 0.0 if u < 0.5625 else float(np.float32(rng.uniform(0.0, 2.0) / np.sqrt(case.head_dim)))
    return case._replace(softmax_scale=scale)


class _Progress:
    def __init__(self, total):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = None if tqdm is None else tqdm(total=total, unit="case", dynamic_ncols=True)
        self.last = time.monotonic()

    def update(self, n, failures, rate):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failures=failures, refresh=False)
        elif time.monotonic() - self.last > 5:
            print(f"{n} cases, {failures} failures, {rate:.1f} cases/s", flush=True)
            self.last = time.monotonic()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _environment() -> str:
    """The FLASHCUPY_* variables of this process as a shell prefix ("FLASHCUPY_SM90=0 "): they pick the
    kernel family (flashcupy._dispatch), so a reproducer without them may run another kernel."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("FLASHCUPY_"))
    return "".join(f"{k}={shlex.quote(v)} " for k, v in env)


def run(args) -> int:
    bad = [d for d in args.head_dims if not 1 <= d <= 256]
    if bad:
        from .cli import CommandError

        raise CommandError(f"--head-dims: expected head dims in 1..256, got {bad}")
    gpu = _on_gpu(args.device)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    failures, worst, n = [], (0.0, None), 0
    progress = _Progress(1 if args.case else args.max_examples)
    try:
        for case in _cases(args):
            if n >= args.max_examples or (n and time.monotonic() > deadline):
                break
            n += 1
            try:
                ratio = check_case(case, args.directions, gpu, args.allow_tf32)
                if ratio > worst[0]:
                    worst = (ratio, case)
            except AssertionError as e:
                failures.append({"case": repr(case), "error": str(e).splitlines()[0][:500],
                                 "reproduce": f"{_environment()}flashcupy fuzz --device {'gpu' if gpu else 'cpu'} "
                                              f"--directions {' '.join(args.directions)}"
                                              f"{' --allow-tf32' if args.allow_tf32 else ''} --case \"{case!r}\""})
            progress.update(n, len(failures), n / max(time.monotonic() - t0, 1e-9))
    finally:
        progress.close()
    seconds = time.monotonic() - t0
    report = {"device": "gpu" if gpu else "cpu", "directions": args.directions, "features": args.features,
              "dtypes": args.dtypes, "head_dims": args.head_dims, "allow_tf32": args.allow_tf32, "seed": args.seed,
              "cases": n, "seconds": round(seconds, 3), "cases_per_s": round(n / max(seconds, 1e-9), 2),
              "worst_ratio": worst[0], "worst_case": None if worst[1] is None else repr(worst[1]),
              "failures": failures}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"flashcupy fuzz: {n} cases in {seconds:.1f} s on the {report['device']} ({report['cases_per_s']} cases/s), "
          f"{len(failures)} failures; worst error / bound {worst[0]:.3f}")
    for f in failures[:10]:
        print(f"FAIL {f['case']}\n  {f['error']}\n  reproduce: {f['reproduce']}")
    return 1 if failures else 0



