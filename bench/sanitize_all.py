"""One small ragged call of every kernel specialization flashcupy can launch, forward and backward, for
compute-sanitizer (issue 19 item 3). bench/sanitize_all.sh runs it under memcheck, racecheck, synccheck
and initcheck and fails on any error or hazard.

    python bench/sanitize_all.py --list [--cc 90] [--smem-kb 99]   # the plan; needs no GPU
    python bench/sanitize_all.py [--families mma16 wgmma ...] [--shard I/N]
    python bench/sanitize_all.py --summarize TOOL LOG [LOG ...]    # sanitize_all.sh's verdict on its logs

The plan: for each family (FAMILIES), head-dim bucket, causal and feature, the configuration that
flashcupy._dispatch returns for it on this device (flashcupy._device.current_device_info(), so
FLASHCUPY_SMEM_LIMIT_KB=99 plans the 99 KB class's configurations; --list without a GPU plans for
--cc / --smem-kb), launched through the family's own launcher with that config:

- mma16    fp16/bf16 mma.sync (flashcupy._gpu, planned with FLASHCUPY_SM90=0): plain, dropout,
           deterministic (where it launches other kernels: the dQ kernel instead of atomics) and a block
           mask of each class that selects other tiles (64x64, 64x128, 128x64; 128x128: the plain tiles);
- wgmma    the Hopper forward and backward (flashcupy._gpu_sm90, flashcupy._gpu_sm90_bwd), compute
           capability 9.0 only (elsewhere one "skip" line): plain, and the kernels' dropout (forward),
           128x128 block mask and deterministic (backward) modes, which --list marks "kernel only" while
           the dispatcher does not route them yet (they run last);
- simt     exact float32 on CUDA cores (flashcupy._gpu_simt): plain, deterministic (the dQ kernel);
- dmma     float64 (FP64 tensor cores; the backward above head_dim 160 on CUDA cores): plain;
- tf32     float32 with allow_tf32 (TF32 tensor cores): plain;
- chunked  the chunked GPU path through the public API with FLASHCUPY_FORCE_CC=75: float32 plain,
           dropout, block mask; float16 and float64 plain.
Every fused family also runs issue 16's features (SCORE_FEATURES): "window" (a sliding window alone) and
"scores" (window, softcap, ALiBi and sinks together), each in its FEAT specialization.

A call is planned only if it launches a specialization (config, causal, dropout, dQ mode, block mask
or not) that no earlier call of its family launched. One head dim per bucket (HEAD_DIM: the full
bucket at 32 / 64 / 128 / 192, 8 columns short of it at 96 / 160 / 224 / 256, so both the full-width
and the partial-column loads and stores run); fp16 and bf16 alternate over (bucket, causal). Every
call has batch 2, seqlen_q 200, seqlen_k 333 (partial query and key tiles everywhere), 4 query heads
over 2 KV heads (GQA); block masks are random with one empty query block (rows of out 0, lse -inf).
Inputs are fresh normal draws of --seed (default 0). After each call the device is synchronised and
out, dq, dk, dv are checked finite and lse free of NaN and +inf on the host (no extra kernel), then
`ok <name>` is printed; `plan: N calls` comes first and `done: N calls ok` last. CuPy's memory pool is
off (--pool keeps it): every array is its own cudaMalloc, so memcheck sees an overrun past any array's
end and initcheck a read of memory no kernel wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flashcupy without PYTHONPATH

FAMILIES = ("mma16", "wgmma", "simt", "dmma", "tf32", "chunked")
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")

BATCH, SEQLEN_Q, SEQLEN_K, NHEADS, NHEADS_K = 2, 200, 333, 4, 2
DROPOUT_P, RNG_STATE = 0.17, (0x5EED_0F_F1A5, 7)
# issue 16's score features: "window" (FEAT_LOCAL alone) and "scores" (window, softcap, ALiBi (batch, nheads)
# slopes, sinks) in every fused family; a window of 70 keys back and 20 ahead of the bottom-right diagonal
SCORE_FEATURES = ("window", "scores")
SCORE_BUCKETS = (64, 128, 256)  # the mma.sync family's buckets that run them (the float families: 64, 128
# causal, "scores" only; the Hopper tiles: all), so racecheck of the whole plan stays a few minutes
WINDOW, SOFTCAP = (70, 20), 15.0
# bucket -> head dim of its calls: full width at 32 / 64 / 128 / 192, 8 short at the others
HEAD_DIM = {32: 32, 64: 64, 96: 88, 128: 128, 160: 152, 192: 192, 224: 216, 256: 248}
MASK_CLASSES = ((64, 64), (64, 128), (128, 64), (128, 128))  # the choosers' SPARSE_CLASSES, and 128x128
HOPPER_HEAD_DIM = {64: 64, 128: 120}  # Hopper tile -> head dim (120: TMA zero-fills the tile's last 8 columns)
HOPPER_MASK = (128, 128)  # whole tiles of both Hopper kernels (takes_block_mask)


@dataclass(frozen=True)
class Call:
    """One planned call: a forward (fwd config) and, unless bwd is None, its backward."""

    family: str
    dtype: str  # "fp16", "bf16", "fp32", "fp64"
    head_dim: int
    causal: bool
    feature: str  # "plain", "dropout", "deterministic", "mask64x64", ...
    fwd: object = None  # the forward's config (None for the chunked family)
    bwd: object = None  # the backward's config; None: forward only (chunked: the public backward runs)
    backward: bool = True
    dispatched: bool = True  # False: a kernel mode flashcupy._dispatch does not route yet
    notes: tuple = field(default=(), compare=False)

    @property
    def dropout(self) -> bool:
        return self.feature == "dropout"

    @property
    def deterministic(self) -> bool:
        return self.feature == "deterministic"

    @property
    def feat(self) -> int:
        """The call's issue 16 FEAT_* bits: "window" the sliding window alone, "scores" every feature
        (window, softcap, ALiBi, sinks); 0 otherwise."""
        from flashcupy._features import FEAT_ALL, FEAT_LOCAL

        return {"window": FEAT_LOCAL, "scores": FEAT_ALL}.get(self.feature, 0)

    @property
    def blocks(self):
        """(block_q, block_k) of the call's block mask, or None."""
        m = re.fullmatch(r"mask(\d+)x(\d+)", self.feature)
        return None if m is None else (int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        c = "causal" if self.causal else "noncausal"
        what = "fwd+bwd" if self.backward else "fwd"
        extra = "" if self.dispatched else " (kernel only: not dispatched yet)"
        return f"{self.family} {self.dtype} hd{self.head_dim} {c} {self.feature} {what}{extra}"


def _np_dtype(name: str):
    from flashcupy._arrays import bfloat16

    return {"fp16": np.dtype(np.float16), "bf16": bfloat16(), "fp32": np.dtype(np.float32),
            "fp64": np.dtype(np.float64)}[name]


@contextlib.contextmanager
def _env(**values):
    """Set (value str) or unset (None) environment variables for the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Plan:
    """Calls of one family, keeping a call only if it launches a specialization not seen before."""

    def __init__(self):
        self.calls, self.seen = [], set()

    def add(self, call: Call, keys) -> None:
        keys = set(keys)
        if keys - self.seen:
            self.seen |= keys
            self.calls.append(call)


def _half(i: int) -> str:
    return ("fp16", "bf16")[i % 2]


def _plan_mma16(device):
    from flashcupy import _dispatch

    plan = _Plan()
    features = (("plain", "dropout", "deterministic") + tuple(f"mask{bq}x{bk}" for bq, bk in MASK_CLASSES)
                + SCORE_FEATURES)
    with _env(FLASHCUPY_SM90="0"):  # the mma.sync family as on every GPU but sm_90
        for i, bucket in enumerate(HEAD_DIM):
            hd = HEAD_DIM[bucket]
            for causal in (False, True):
                dtype = _half(i + causal)
                for feature in features:
                    if feature in SCORE_FEATURES and bucket not in SCORE_BUCKETS:
                        continue
                    call = Call("mma16", dtype, hd, causal, feature)
                    kw = dict(dropout=call.dropout, sparse_blocks=call.blocks, features=call.feat)
                    f = _dispatch.forward_plan(_np_dtype(dtype), hd, causal, device, **kw)
                    b = _dispatch.backward_plan(_np_dtype(dtype), hd, causal, device, deterministic=call.deterministic,
                                                **kw)
                    if f is None or f.family != _dispatch.MMA16:
                        continue  # nothing fused fits this device: the chunked family covers it
                    masked = call.blocks is not None
                    keys = [("fwd", f.config, causal, call.dropout, masked, call.feat)]
                    backward = b is not None and b.family == _dispatch.MMA16
                    if backward:  # else the chunked path runs this backward
                        keys.append(("bwd", b.config, causal, call.dropout, masked,
                                     b.config.atomic_dq(call.deterministic, call.dropout), call.feat))
                    plan.add(Call("mma16", dtype, hd, causal, feature, f.config, b.config if backward else None,
                                  backward), keys)
    return plan.calls


def _plan_wgmma(device):
    from flashcupy import _dispatch, _gpu_sm90, _gpu_sm90_bwd

    if device.cc != 90:
        return []
    plan = _Plan()
    with _env(FLASHCUPY_SM90="1", FLASHCUPY_SM90_BWD="1"):
        for i, tile in enumerate(HOPPER_HEAD_DIM):
            hd = HOPPER_HEAD_DIM[tile]
            for causal in (False, True):
                dtype = _half(i + causal)
                fcfg, bcfg = _gpu_sm90.config_for(hd, causal), _gpu_sm90_bwd.config_for(hd, causal)
                if not device.fits(fcfg.smem_bytes):
                    continue
                bwd_fits = device.fits(bcfg.smem_bytes)  # no Hopper backward under a 99 KB cap
                mask = "mask{}x{}".format(*HOPPER_MASK)
                for feature, backward in (("plain", True), ("dropout", False), (mask, True), ("deterministic", True),
                                          *((f, True) for f in SCORE_FEATURES)):
                    backward = backward and bwd_fits
                    call = Call("wgmma", dtype, hd, causal, feature)
                    kw = dict(dropout=call.dropout, sparse_blocks=call.blocks, features=call.feat)
                    f = _dispatch.forward_plan(_np_dtype(dtype), hd, causal, device, **kw)
                    b = _dispatch.backward_plan(_np_dtype(dtype), hd, causal, device, deterministic=call.deterministic,
                                                **kw)
                    routed = f == (_dispatch.WGMMA, fcfg) and (not backward or b == (_dispatch.WGMMA, bcfg))
                    masked = call.blocks is not None
                    keys = [("fwd", fcfg, causal, call.dropout, masked, call.feat)]
                    if backward:
                        keys.append(("bwd", bcfg, causal, masked, call.deterministic, call.feat))
                    plan.add(Call("wgmma", dtype, hd, causal, feature, fcfg, bcfg if backward else None, backward,
                                  routed), keys)
    return plan.calls


def _plan_float(family, device):
    """simt (float32), dmma (float64) or tf32 (float32, allow_tf32): the float families' calls."""
    from flashcupy import _dispatch

    dtype = "fp64" if family == "dmma" else "fp32"
    tf32 = family == "tf32"
    features = (("plain", "deterministic") if family == "simt" else ("plain",)) + SCORE_FEATURES
    plan = _Plan()  # simt's deterministic: the dQ kernel; the others always take it
    for bucket in HEAD_DIM:
        hd = HEAD_DIM[bucket]
        for causal in (False, True):
            for feature in features:
                if feature in SCORE_FEATURES and (feature != "scores" or bucket not in (64, 128) or not causal):
                    continue
                det = feature == "deterministic"
                feat = Call(family, dtype, hd, causal, feature).feat
                f = _dispatch.forward_plan(_np_dtype(dtype), hd, causal, device, allow_tf32=tf32, features=feat)
                b = _dispatch.backward_plan(_np_dtype(dtype), hd, causal, device, allow_tf32=tf32, deterministic=det,
                                            features=feat)
                # float64 is one family whichever kernels run it; float32 falls back from TF32 to SIMT
                if f is None or (family != "dmma" and f.family != family):
                    continue
                backward = b is not None and (family == "dmma" or b.family == family)
                keys = [("fwd", f.config, causal, feat)]
                if backward:
                    keys.append(("bwd", b.config, causal, det or b.config.dq_kernel_always, feat))
                notes = (f"bwd {b.family}",) if backward and b.family != f.family else ()
                plan.add(Call(family, dtype, hd, causal, feature, f.config, b.config if backward else None, backward,
                              notes=notes), keys)
    return plan.calls


def _plan_chunked(device):
    del device  # FLASHCUPY_FORCE_CC=75: the chunked path on any GPU
    calls = [Call("chunked", "fp32", 64, causal, feature)
             for causal in (False, True) for feature in ("plain", "dropout", "mask64x64")]
    return calls + [Call("chunked", "fp16", 64, True, "plain"), Call("chunked", "fp64", 64, False, "plain")]


def plan(device, families=FAMILIES):
    """Every Call of the families for device (a flashcupy._device.DeviceInfo): the dispatched ones in family
    order, then the kernel-only ones (modes not yet run on a GPU: a hang there comes after every other call)."""
    out = []
    for family in families:
        if family == "mma16":
            out += _plan_mma16(device)
        elif family == "wgmma":
            out += _plan_wgmma(device)
        elif family == "chunked":
            out += _plan_chunked(device)
        else:
            out += _plan_float(family, device)
    return [c for c in out if c.dispatched] + [c for c in out if not c.dispatched]


def skipped(device, families=FAMILIES):
    """Lines for families that plan nothing on device (the Hopper family off sm_90)."""
    if "wgmma" in families and device.cc != 90:
        return [f"skip wgmma: the Hopper kernels need compute capability 9.0, this device is sm_{device.cc}"]
    return []


def _describe(cfg) -> str:
    return "-" if cfg is None else repr(cfg)


# ---------------------------------------------------------------------------------------------------
# running a call


class _Inputs:
    """Host float32 inputs per head dim, drawn once from one generator; each call uploads them and casts
    them to its dtype on the device (as bench/sanitize_sm90.py: CuPy's astype, one elementwise kernel)."""

    def __init__(self, seed: int):
        self.rng, self.host = np.random.default_rng(seed), {}

    def get(self, dtype: str, head_dim: int):
        """Device (q, k, v, dout) of dtype: (batch, seqlen, heads, head_dim), GQA heads for k and v."""
        import cupy as cp

        if head_dim not in self.host:
            self.host[head_dim] = tuple(self.rng.standard_normal((BATCH, s, h, head_dim)).astype(np.float32)
                                        for s, h in ((SEQLEN_Q, NHEADS), (SEQLEN_K, NHEADS_K), (SEQLEN_K, NHEADS_K),
                                                     (SEQLEN_Q, NHEADS)))
        return tuple(cp.asarray(x).astype(_np_dtype(dtype)) for x in self.host[head_dim])

    def features(self, feat: int):
        """A flashcupy._features.Features with the FEAT_* bits of feat on (device arrays), or None."""
        if not feat:
            return None
        import cupy as cp

        from flashcupy._features import FEAT_ALIBI, FEAT_LOCAL, FEAT_SINK, FEAT_SOFTCAP, Features

        return Features(window=WINDOW if feat & FEAT_LOCAL else (-1, -1), softcap=SOFTCAP if feat & FEAT_SOFTCAP else 0.0,
                        alibi_slopes=cp.asarray(self.rng.uniform(0.01, 0.5, (BATCH, NHEADS)).astype(np.float32))
                        if feat & FEAT_ALIBI else None,
                        sinks=cp.asarray(self.rng.standard_normal(NHEADS).astype(np.float32)) if feat & FEAT_SINK else None)

    def block_mask(self, blocks):
        from flashcupy.blocksparse import BlockMask

        bq, bk = blocks
        m = self.rng.random((1, NHEADS, -(-SEQLEN_Q // bq), -(-SEQLEN_K // bk))) < 0.6
        m[0, 0, -1] = False  # a query block with no visible key: out 0, lse -inf, zero gradients
        m[0, 1, 0, 0] = True
        return BlockMask(m, bq, bk)


def _check_finite(call: Call, named) -> None:
    """On the host: out and gradients finite, lse neither NaN nor +inf (-inf marks empty rows)."""
    for name, x in named:
        a = np.asarray(x.get()).astype(np.float64)
        bad = np.isnan(a) | (a == np.inf) if name == "lse" else ~np.isfinite(a)
        if bad.any():
            raise AssertionError(f"{call.name}: {int(bad.sum())} non-finite values in {name}")


def run_call(call: Call, inputs: _Inputs) -> None:
    import cupy as cp

    from flashcupy import _gpu, _gpu_simt, interface
    from flashcupy._validate import check_qkv

    q, k, v, do = inputs.get(call.dtype, call.head_dim)
    mask = None if call.blocks is None else inputs.block_mask(call.blocks)
    feats = inputs.features(call.feat)
    shape = check_qkv(q, k, v)
    dropout = (DROPOUT_P, RNG_STATE) if call.dropout else None
    grads = ()
    if call.family == "chunked":
        with _env(FLASHCUPY_FORCE_CC="75"):
            assert interface.kernel_path(q.dtype, call.head_dim, on_gpu=True) == "chunked path on the GPU"
            fwd = interface.flash_attn_forward(q, k, v, causal=call.causal, dropout_p=DROPOUT_P if dropout else 0.0,
                                               seed=RNG_STATE if dropout else None, block_mask=mask)
            grads = interface.flash_attn_backward(do, q, k, v, forward=fwd)
        out, lse = fwd.out, fwd.lse
    elif call.family in ("mma16", "wgmma"):
        out, lse = _gpu.forward(q, k, v, shape, causal=call.causal, dropout=dropout, block_mask=mask, config=call.fwd,
                                features=feats)
        if call.backward:
            grads = _gpu.backward(do, q, k, v, out, lse, shape, causal=call.causal, deterministic=call.deterministic,
                                  dropout=dropout, block_mask=mask, config=call.bwd, features=feats)
    else:
        tf32 = call.family == "tf32"
        out, lse = _gpu_simt.forward(q, k, v, shape, causal=call.causal, allow_tf32=tf32, config=call.fwd,
                                     features=feats)
        if call.backward:
            grads = _gpu_simt.backward(do, q, k, v, out, lse, shape, causal=call.causal,
                                       deterministic=call.deterministic, allow_tf32=tf32, config=call.bwd,
                                       features=feats)
    cp.cuda.Device().synchronize()
    _check_finite(call, [("out", out), ("lse", lse), *zip(("dq", "dk", "dv"), grads)])


# ---------------------------------------------------------------------------------------------------
# sanitize_all.sh's verdict on a log


# "ERROR SUMMARY: N errors" (not its follow-up "ERROR SUMMARY: M errors were not printed", past --print-limit)
_ERRORS = re.compile(r"^=+ ERROR SUMMARY: (\d+) errors?\s*$", re.M)
_RACES = re.compile(r"^=+ RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", re.M)
_PLAN = re.compile(r"^plan: (\d+) calls", re.M)
_DONE = re.compile(r"^done: (\d+) calls ok", re.M)
_OK = re.compile(r"^ok ", re.M)
_STATUS = re.compile(r"^sanitize_all\.sh: exit status (\d+)", re.M)  # appended to each log by sanitize_all.sh


def parse_log(tool: str, text: str) -> dict:
    """The counts of one sanitizer log of this script: summary (None where the tool's summary line is
    missing, else (errors,) of its last ERROR SUMMARY, racecheck (hazards, errors, warnings)), ok
    (calls printed ok), planned (the plan line's count, or None), done (the done line is there), status
    (the exit status sanitize_all.sh appended, or None)."""
    if tool == "racecheck":
        m = _RACES.findall(text)
        summary = None if not m else tuple(int(x) for x in m[-1])
    else:
        m = _ERRORS.findall(text)
        summary = None if not m else (int(m[-1]),)
    planned, status = _PLAN.findall(text), _STATUS.findall(text)
    return dict(summary=summary, ok=len(_OK.findall(text)), planned=int(planned[-1]) if planned else None,
                done=bool(_DONE.search(text)), status=int(status[-1]) if status else None)


def verdict(tool: str, logs) -> tuple:
    """(passed, line) of a tool over the parse_log dicts of its logs (one per shard): passed iff every
    log has the tool's summary with 0 errors (racecheck: 0 hazards, 0 errors, 0 warnings), its plan and
    done lines, as many ok lines as planned calls, and exit status 0 where one was recorded."""
    problems = []
    for i, log in enumerate(logs):
        where = f"log {i + 1}: " if len(logs) > 1 else ""
        if log["summary"] is None:
            problems.append(where + ("no RACECHECK SUMMARY" if tool == "racecheck" else "no ERROR SUMMARY"))
        elif any(log["summary"]):
            problems.append(where + ("hazards reported" if tool == "racecheck" else "errors reported"))
        if log["planned"] is None:
            problems.append(where + "no plan line (the script did not start)")
        elif log["ok"] != log["planned"]:
            problems.append(where + f"{log['ok']} of {log['planned']} calls ok")
        if not log["done"]:
            problems.append(where + "no done line (the script did not finish)")
        if log["status"]:
            problems.append(where + f"exit status {log['status']}")
    counted = [log["summary"] for log in logs if log["summary"] is not None]
    total = [sum(c) for c in zip(*counted)] or [0] * (3 if tool == "racecheck" else 1)
    counts = ("{} hazards ({} errors, {} warnings)" if tool == "racecheck" else "{} errors").format(*total)
    if not counted:
        counts = "no RACECHECK SUMMARY" if tool == "racecheck" else "no ERROR SUMMARY"
    elif len(counted) < len(logs):
        counts += f" ({len(logs) - len(counted)} of {len(logs)} logs without a summary)"
    planned = sum(log["planned"] or 0 for log in logs)
    calls = f"{sum(log['ok'] for log in logs)}/{planned} calls ok"
    shards = f" over {len(logs)} logs" if len(logs) > 1 else ""
    passed = bool(logs) and not problems
    state = "PASS" if passed else "FAIL: " + ("; ".join(problems) or "no log")
    return passed, f"{tool}: {counts}, {calls}{shards}: {state}"


def summarize(tool: str, text: str) -> tuple:
    """verdict of one log's text."""
    return verdict(tool, [parse_log(tool, text)])


def summarize_logs(tool: str, paths) -> int:
    """Print the tool's line over its logs (the shards of one run); 0 if it passes, else 1."""
    logs = []
    for path in paths:
        try:
            logs.append(parse_log(tool, Path(path).read_text(errors="replace")))
        except OSError:
            logs.append(parse_log(tool, ""))
    passed, line = verdict(tool, logs)
    print(line, flush=True)
    return 0 if passed else 1


# ---------------------------------------------------------------------------------------------------


def _device(args):
    from flashcupy._arrays import gpu_available
    from flashcupy._device import KB, DeviceInfo, current_device_info

    if args.cc is not None and not args.list:
        raise SystemExit("sanitize_all: --cc plans for another device: only with --list")
    if args.cc is not None or not gpu_available():
        if not args.list:
            raise SystemExit("sanitize_all: no usable CUDA GPU (CuPy); --list prints the plan without one")
        dev = DeviceInfo.for_cc(args.cc or 90)
    else:
        dev = current_device_info()
    return dev.capped(args.smem_kb * KB) if args.smem_kb else dev


def _shard(text: str):
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the plan (no GPU needed) and exit")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), metavar="FAMILY",
                    help=f"the families to run, of {' '.join(FAMILIES)} (default: all)")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                    help="run calls I, I+N, I+2N, ... of the plan (parallel compile warm-up)")
    ap.add_argument("--seed", type=int, default=0, help="input generator seed (default 0)")
    ap.add_argument("--pool", action="store_true", help="keep CuPy's memory pool (default: off, see above)")
    ap.add_argument("--cc", type=int, help="--list: plan for this compute capability (default: the GPU's, else 90)")
    ap.add_argument("--smem-kb", type=int, help="plan under this opt-in shared-memory cap (as FLASHCUPY_SMEM_LIMIT_KB)")
    ap.add_argument("--summarize", nargs="+", metavar=("TOOL", "LOG"),
                    help=f"check sanitizer logs of this script: TOOL in {' '.join(TOOLS)}, then the logs")
    args = ap.parse_args(argv)

    if args.summarize:
        tool, *logs = args.summarize
        if tool not in TOOLS or not logs:
            ap.error(f"--summarize: expected a tool of {', '.join(TOOLS)} and at least one log")
        return summarize_logs(tool, logs)

    device = _device(args)
    calls = plan(device, args.families)
    i, n = args.shard
    calls = calls[i::n]
    for line in skipped(device, args.families):
        print(line, flush=True)
    if args.list:
        print(f"plan for {device.name or f'sm_{device.cc}'} (sm_{device.cc}, {device.smem_optin} B opt-in shared "
              f"memory): {len(calls)} calls")
        for family in args.families:
            mine = [c for c in calls if c.family == family]
            print(f"\n{family}: {len(mine)} calls")
            for c in mine:
                notes = "".join(f" [{x}]" for x in c.notes)
                print(f"  {c.name}{notes}\n      fwd {_describe(c.fwd)}\n      bwd {_describe(c.bwd)}")
        return 0

    import cupy as cp

    if not args.pool:
        cp.cuda.set_allocator(None)  # every array its own cudaMalloc: overruns and uninitialised reads are visible
    print(f"plan: {len(calls)} calls on {device.name} (sm_{device.cc}, {device.smem_optin} B)", flush=True)
    inputs = _Inputs(args.seed)
    for call in calls:
        run_call(call, inputs)
        print(f"ok {call.name}", flush=True)
    print(f"done: {len(calls)} calls ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
