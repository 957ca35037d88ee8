"""Benchmark flashcupy against every attention implementation present, on the same inputs, in one run.

Speed (TFLOP/s), peak memory and accuracy against the float64 oracle for each provider; a table (rich
when installed) with a progress bar while it runs, a JSON file, PNG plots (matplotlib when installed)
and the README's headline table in Markdown.

    flashcupy bench --quick       # on a GPU: bf16, head dims 64/128, seqlens 1k/4k/16k, fwd and fwd+bwd, causal both
                                  # (without one, or --device cpu: fp32, head dims 32/64, seqlens 128/256, ~10 s)
    flashcupy bench --mode bwd --dtype fp16 --head-dims 128 --seqlens 2048 8192 --causal yes
    flashcupy bench --list        # which providers this environment has
    flashcupy bench --markdown bench/results/nvidia-h200-quick.json   # headline table for the README

Method (DESIGN.md, "Measuring speed"):
- Shape: the FlashAttention benchmark's, hidden = nheads * head_dim = 2048 and batch * seqlen = 16384
  tokens (--hidden, --tokens), so every seqlen moves the same bytes and each input is larger than L2.
- Time: the median of repetitions after a warm-up. CUDA events around each call with L2 flushed between
  calls: triton.testing.do_bench when triton (and torch) import, else the same method here on CuPy
  events with a 256 MiB buffer written before each call. JAX runs on its own streams, so JAX is timed
  by the wall clock over batches of calls closed by block_until_ready.
- bwd is the backward alone, from saved forward state (flashcupy: out and lse; torch: the autograd
  graph, retained; naive: P). JAX cannot call its backward alone: there bwd = (fwd+bwd) - fwd.
- TFLOP/s by the FlashAttention formula (attention_flops): fwd = 4 * batch * nheads * seqlen_q *
  seqlen_k * head_dim, halved for causal when seqlen_q == seqlen_k; bwd = 2.5 x fwd; fwd+bwd = 3.5 x
  fwd; block-sparse multiplies by the fraction of the blocks kept (the row's "kept"; "density" is the
  fraction asked for).
- Memory: the peak bytes allocated during one call beyond its inputs (CuPy's pool for flashcupy and
  naive, torch.cuda.max_memory_allocated for torch, tracemalloc for NumPy on the CPU); n/a for JAX.
- Accuracy: max |output - oracle| (flashcupy.reference, float64) over the mode's outputs (out; dq, dk,
  dv) on a small shape (batch 1, seqlen 256, 2 heads; the case's dtype, head_dim, causal, density).

Providers, each used only where it imports and runs here (a missing one is reported absent, never an
error; a case a provider cannot run is a row with status "unsupported", "skipped" or "error"):
    flashcupy        this library (fused kernels for fp16/bf16; the chunked path otherwise)
    naive            CuPy matmul-softmax-matmul (bf16 runs on fp16 copies: CuPy has no bf16 matmul)
    sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math
                     torch.nn.functional.scaled_dot_product_attention with one backend forced
    jax-cudnn, jax-xla
                     jax.nn.dot_product_attention(implementation=...), jitted, BTNH layout
    flex             torch FlexAttention (compiled), only with --densities (block-sparse)
naive, sdpa-math and jax-xla hold the (seqlen x seqlen) scores: they run up to --max-quadratic-seqlen
and while their estimated memory fits in MEMORY_FRACTION of the device.

Block-sparse (--densities): a block mask over 128 x 128 tiles (block_mask). flashcupy reports "not
available" until flash_attn_forward takes a `block_mask` argument (FlashcupyProvider.make passes it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

try:
    from .cli import CommandError
except ImportError:  # pragma: no cover - cli.py is the command line's; bench.py also runs on its own
    class CommandError(Exception):
        """A bad combination of options (the message says which and why)."""


SCHEMA = "flashcupy-bench/1"
HIDDEN = 2048  # nheads * head_dim of the FlashAttention benchmark
TOKENS = 16384  # batch * seqlen of the FlashAttention benchmark
BLOCK = 128  # block-sparse tile (query rows x key columns), FlexAttention's default
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # backward = 5 GEMMs to the forward's 2
MODE_OUTPUTS = {"fwd": ("out",), "bwd": ("dq", "dk", "dv"), "fwd+bwd": ("out", "dq", "dk", "dv")}
DTYPES = ("bf16", "fp16", "fp32", "fp64")
STATUSES = ("ok", "skipped", "unsupported", "not available", "error")
ACCURACY_SHAPE = {"batch": 1, "seqlen": 256, "nheads": 2}
MEMORY_FRACTION = 0.35  # O(N^2) providers must fit in this share of device memory (JAX's pool cap too)
L2_FLUSH_BYTES = 256 << 20
DEFAULT_OUT = os.path.join("bench", "results")

PROVIDERS = ("flashcupy", "naive", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
             "jax-cudnn", "jax-xla", "flex")
ALIASES = {
    "all": PROVIDERS,
    "flash": ("sdpa-flash",), "cudnn": ("sdpa-cudnn",), "efficient": ("sdpa-efficient",), "math": ("sdpa-math",),
    "sdpa": ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"),
    "torch": ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex"),
    "jax": ("jax-cudnn", "jax-xla"),
}
RATIO_PEERS = {"ratio_flash": "sdpa-flash", "ratio_cudnn": "sdpa-cudnn"}

# Presets: what a run measures unless an option says otherwise.
PRESETS = {
    "default": dict(modes=["fwd", "bwd", "fwd+bwd"], dtypes=["bf16"], head_dims=[64, 128],
                    seqlens=[512, 1024, 2048, 4096, 8192, 16384], causal=[False, True], densities=[1.0],
                    hidden=HIDDEN, tokens=TOKENS, warmup_ms=25.0, rep_ms=100.0, min_reps=10,
                    max_quadratic_seqlen=8192),
    # under 2 minutes on an H100 with every peer present
    "quick": dict(modes=["fwd", "fwd+bwd"], dtypes=["bf16"], head_dims=[64, 128], seqlens=[1024, 4096, 16384],
                  causal=[False, True], densities=[1.0], hidden=HIDDEN, tokens=TOKENS, warmup_ms=10.0,
                  rep_ms=40.0, min_reps=5, max_quadratic_seqlen=4096),
    # --device cpu --quick: a minute or so of NumPy
    "cpu-quick": dict(modes=["fwd", "fwd+bwd"], dtypes=["fp32"], head_dims=[32, 64], seqlens=[128, 256],
                      causal=[False, True], densities=[1.0], hidden=256, tokens=1024, warmup_ms=5.0, rep_ms=20.0,
                      min_reps=3, max_quadratic_seqlen=4096),
    # --device cpu: NumPy-sized shapes
    "cpu": dict(modes=["fwd", "fwd+bwd"], dtypes=["fp32"], head_dims=[32, 64], seqlens=[128, 256, 512],
                causal=[False, True], densities=[1.0], hidden=256, tokens=2048, warmup_ms=20.0, rep_ms=100.0,
                min_reps=5, max_quadratic_seqlen=4096),
}


# ---------------------------------------------------------------------------------------------------
# the FLOP formula, the benchmark shape, block masks


def attention_flops(batch, nheads, seqlen_q, seqlen_k, head_dim, *, causal, mode, density=1.0) -> float:
    """FLOPs of one attention call by the FlashAttention benchmark's formula (DESIGN.md).

    fwd = 4 * batch * nheads * seqlen_q * seqlen_k * head_dim (two GEMMs, QK^T and PV), halved for
    causal when seqlen_q == seqlen_k; bwd = 2.5 x fwd (five GEMMs); fwd+bwd = 3.5 x fwd. density
    (the fraction of the blocks a block-sparse mask keeps) multiplies the count.
    """
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    f = 4.0 * batch * nheads * seqlen_q * seqlen_k * head_dim
    if causal and seqlen_q == seqlen_k:
        f /= 2
    return f * MODE_FACTOR[mode] * float(density)


def fa_shape(seqlen: int, head_dim: int, *, hidden: int = HIDDEN, tokens: int = TOKENS) -> tuple:
    """(batch, nheads) of the FlashAttention benchmark: batch * seqlen = tokens, nheads * head_dim = hidden."""
    return max(1, tokens // seqlen), max(1, hidden // head_dim)


def block_mask(seqlen_q: int, seqlen_k: int, density: float, *, causal: bool = False, block: int = BLOCK,
               seed: int = 0):
    """Block-sparse mask, bool (ceil(seqlen_q / block), ceil(seqlen_k / block)): True = compute the tile.

    Tiles on the (bottom-right aligned) diagonal are always kept, so no query row is left without a
    key; the others are drawn at random (seeded) until the kept fraction of the eligible tiles (all of
    them, or those on or below the diagonal when causal) is the closest to density. Returns None for
    density >= 1 (dense).
    """
    if density >= 1:
        return None
    if not 0 < density:
        raise ValueError(f"density: expected 0 < density <= 1, got {density}")
    nq, nk = -(-seqlen_q // block), -(-seqlen_k // block)
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    diag_col = np.clip(qi + (nk - nq), 0, nk - 1)
    eligible = (kj <= diag_col) if causal else np.ones((nq, nk), dtype=bool)
    mask = np.broadcast_to(kj == diag_col, (nq, nk)).copy()
    want = max(int(mask.sum()), int(round(density * int(eligible.sum()))))
    free = np.flatnonzero((eligible & ~mask).ravel())
    take = np.random.default_rng(seed).permutation(free)[: max(0, want - int(mask.sum()))]
    mask.ravel()[take] = True
    return mask


def kept_fraction(mask, *, causal: bool) -> float:
    """The fraction of the eligible tiles a block mask keeps (1.0 for None)."""
    if mask is None:
        return 1.0
    nq, nk = mask.shape
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    eligible = (kj <= np.clip(qi + (nk - nq), 0, nk - 1)) if causal else np.ones(mask.shape, dtype=bool)
    return float(mask[eligible].sum() / eligible.sum())


def element_mask(mask, seqlen_q: int, seqlen_k: int, *, causal: bool, block: int = BLOCK):
    """The element mask, bool (seqlen_q, seqlen_k), of a block mask (None = dense) and causal; None when
    every element is visible."""
    vis = None
    if mask is not None:
        vis = np.repeat(np.repeat(mask, block, axis=0), block, axis=1)[:seqlen_q, :seqlen_k]
    if causal:
        i, j = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
        c = j <= i + (seqlen_k - seqlen_q)
        vis = c if vis is None else vis & c
    return vis


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration (square attention: seqlen_q = seqlen_k = seqlen)."""

    mode: str
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    density: float
    batch: int
    nheads: int
    kept: float = 1.0  # the fraction of the eligible blocks the block mask keeps (density asked for: density)

    @property
    def key(self) -> tuple:
        return (self.mode, self.dtype, self.head_dim, self.seqlen, self.causal, self.density)

    @property
    def scores(self) -> int:
        """Entries of the (batch, nheads, seqlen, seqlen) score matrix."""
        return self.batch * self.nheads * self.seqlen * self.seqlen

    def label(self) -> str:
        s = f"{self.mode} {self.dtype} hd{self.head_dim} s{self.seqlen} {'causal' if self.causal else 'full'}"
        return s + (f" d{self.density:g}" if self.density < 1 else "")


def case_key(row: dict) -> tuple:
    return (row["mode"], row["dtype"], row["head_dim"], row["seqlen"], row["causal"], row["density"])


# ---------------------------------------------------------------------------------------------------
# results: rows, ratios, the JSON schema


ROW_FIELDS = {
    "provider": str, "mode": str, "dtype": str, "head_dim": int, "seqlen": int, "batch": int, "nheads": int,
    "causal": bool, "density": float, "kept": float, "status": str, "note": str, "flops": float,
    "ms": (float, type(None)), "tflops": (float, type(None)), "peak_mem_mib": (float, type(None)),
    "max_err": (float, type(None)), "setup_s": (float, type(None)), "timer": (str, type(None)),
    "best_peer": (str, type(None)), "ratio_best": (float, type(None)),
    "ratio_flash": (float, type(None)), "ratio_cudnn": (float, type(None)),
}
RESULT_FIELDS = {
    "schema": str, "created": str, "command": str, "config": dict, "env": dict, "method": dict,
    "providers": dict, "rows": list, "wall_s": float, "interrupted": bool,
}
PROVIDER_FIELDS = {"available": bool, "used": bool, "reason": (str, type(None)), "version": (str, type(None))}


def new_row(provider: str, case: Case) -> dict:
    """A row with every field of ROW_FIELDS; status "ok" until measure() says otherwise."""
    return dict(provider=provider, mode=case.mode, dtype=case.dtype, head_dim=case.head_dim, seqlen=case.seqlen,
                batch=case.batch, nheads=case.nheads, causal=bool(case.causal), density=float(case.density),
                kept=float(case.kept), status="ok", note="",
                flops=attention_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.head_dim,
                                      causal=case.causal, mode=case.mode, density=case.kept),
                ms=None, tflops=None, peak_mem_mib=None, max_err=None, setup_s=None, timer=None,
                best_peer=None, ratio_best=None, ratio_flash=None, ratio_cudnn=None)


def add_ratios(rows: list) -> list:
    """Fill best_peer, ratio_best, ratio_flash and ratio_cudnn in place (speed ratios: row / peer, > 1 is
    faster). The best peer of a case is its fastest ok row from a provider other than flashcupy."""
    by_case = {}
    for r in rows:
        if r["status"] == "ok" and r["tflops"]:
            by_case.setdefault(case_key(r), {})[r["provider"]] = r["tflops"]
    for r in rows:
        ok = by_case.get(case_key(r), {})
        peers = {p: t for p, t in ok.items() if p != "flashcupy"}
        best = max(peers, key=peers.get) if peers else None
        r["best_peer"] = best
        mine = r["tflops"] if r["status"] == "ok" else None
        r["ratio_best"] = mine / peers[best] if (mine and best) else None
        for field, peer in RATIO_PEERS.items():
            r[field] = mine / ok[peer] if (mine and peer in ok) else None
    return rows


def _check_fields(obj, fields, where, problems):
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for name, typ in fields.items():
        if name not in obj:
            problems.append(f"{where}: missing {name!r}")
            continue
        v = obj[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        # JSON has one number type: an int is a valid float; bool is not an int here
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok and float in types and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            problems.append(f"{where}.{name}: expected {'/'.join(t.__name__ for t in types)}, "
                            f"got {type(v).__name__} {v!r}")


def validate_result(result) -> dict:
    """Check a bench result (as written to JSON) against the schema; raise ValueError listing every problem.
    Returns the result."""
    problems = []
    _check_fields(result, RESULT_FIELDS, "result", problems)
    if not problems:
        if result["schema"] != SCHEMA:
            problems.append(f"result.schema: expected {SCHEMA!r}, got {result['schema']!r}")
        for name, info in result["providers"].items():
            _check_fields(info, PROVIDER_FIELDS, f"providers[{name!r}]", problems)
        for key in ("device", "versions", "git"):
            if not isinstance(result["env"].get(key), dict):
                problems.append(f"result.env: missing object {key!r}")
        for i, row in enumerate(result["rows"]):
            where = f"rows[{i}]"
            _check_fields(row, ROW_FIELDS, where, problems)
            if not isinstance(row, dict) or any(f not in row for f in ROW_FIELDS):
                continue
            if row["mode"] not in MODES:
                problems.append(f"{where}.mode: expected one of {MODES}, got {row['mode']!r}")
            if row["status"] not in STATUSES:
                problems.append(f"{where}.status: expected one of {STATUSES}, got {row['status']!r}")
            if row["status"] == "ok":
                for f in ("ms", "tflops"):
                    if not isinstance(row[f], (int, float)) or isinstance(row[f], bool) or not row[f] > 0:
                        problems.append(f"{where}.{f}: an ok row needs a positive number, got {row[f]!r}")
    if problems:
        raise ValueError("not a valid flashcupy bench result:\n  " + "\n  ".join(problems))
    return result


def load_result(path) -> dict:
    with open(path) as fh:
        return validate_result(json.load(fh))


def _jsonable(x):
    """NaN/inf -> None (JSON has neither); numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def make_result(*, config: dict, env: dict, method: dict, providers: dict, rows: list, command: str,
                wall_s: float, interrupted: bool = False, created: str | None = None) -> dict:
    """The result object written to JSON (schema SCHEMA; validate_result checks it)."""
    created = created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return _jsonable(dict(schema=SCHEMA, created=created, command=command, config=config, env=env, method=method,
                          providers=providers, rows=add_ratios(rows), wall_s=float(wall_s),
                          interrupted=bool(interrupted)))


# ---------------------------------------------------------------------------------------------------
# rendering: the full table, the headline table, Markdown


def _f(x, fmt, none="-"):
    return none if x is None else format(x, fmt)


def _tf(x) -> str:
    """TFLOP/s: one decimal on a GPU, three significant digits below 10 (the CPU)."""
    return "-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.3g}")


def _shape(r) -> str:
    return f"{r['batch']}x{r['seqlen']}x{r['nheads']}x{r['head_dim']}"


def table_rows(rows: list) -> tuple:
    """(header, [[cell, ...], ...], group ids) of the full table: provider | shape | ms | TFLOP/s | ratio."""
    sparse = any(r["density"] < 1 for r in rows)
    header = ["provider", "mode", "dtype", "BxSxHxD", "causal"] + (["density"] if sparse else []) + [
        "ms", "TFLOP/s", "mem MiB", "max err", "/best", "/flash", "/cudnn", "note"]
    out, groups, gid, last = [], [], -1, None
    for r in rows:
        if case_key(r) != last:
            gid, last = gid + 1, case_key(r)
        ok = r["status"] == "ok"
        cells = [r["provider"], r["mode"], r["dtype"], _shape(r), "yes" if r["causal"] else "no"]
        if sparse:
            cells.append(f"{r['density']:g}")
        cells += [_f(r["ms"], ".3f") if ok else r["status"], _tf(r["tflops"]),
                  _f(r["peak_mem_mib"], ".0f", "n/a" if ok else "-"), _f(r["max_err"], ".1e"),
                  _f(r["ratio_best"], ".2f"), _f(r["ratio_flash"], ".2f"), _f(r["ratio_cudnn"], ".2f"),
                  _short(r["note"], 60)]
        out.append(cells)
        groups.append(gid)
    return header, out, groups


def headline_rows(result: dict) -> tuple:
    """(header, rows) of the headline table: per case, flashcupy's TFLOP/s against SDPA flash, cuDNN and
    the best peer, with the ratios flashcupy / peer."""
    rows = result["rows"]
    ok = {}
    for r in rows:
        if r["status"] == "ok":
            ok.setdefault(case_key(r), {})[r["provider"]] = r
    sparse = any(r["density"] < 1 for r in rows)
    header = ["mode", "dtype", "hd", "causal", "seqlen"] + (["density"] if sparse else []) + [
        "flashcupy", "SDPA flash", "cuDNN", "best peer", "/best", "/flash", "/cuDNN"]
    out, seen = [], set()
    for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES
                                         else 9, r["head_dim"], r["causal"], r["density"], r["seqlen"])):
        key = case_key(r)
        if key in seen:
            continue
        seen.add(key)
        got = ok.get(key, {})
        mine = got.get("flashcupy")
        peers = {p: x for p, x in got.items() if p != "flashcupy"}
        best = max(peers.values(), key=lambda x: x["tflops"]) if peers else None
        cells = [r["mode"], r["dtype"], str(r["head_dim"]), "yes" if r["causal"] else "no", _seqlen(r["seqlen"])]
        if sparse:
            cells.append(f"{r['density']:g}")

        flash, cudnn = got.get("sdpa-flash"), got.get("sdpa-cudnn")
        cells += [_tf(mine["tflops"]) if mine else _flashcupy_status(rows, key),
                  _tf(flash["tflops"]) if flash else "-", _tf(cudnn["tflops"]) if cudnn else "-",
                  f"{best['provider']} {_tf(best['tflops'])}" if best else "-",
                  _ratio(mine, best), _ratio(mine, flash), _ratio(mine, cudnn)]
        out.append(cells)
    return header, out


def _ratio(mine, peer) -> str:
    return f"{mine['tflops'] / peer['tflops']:.2f}" if (mine and peer) else "-"


def _flashcupy_status(rows, key) -> str:
    for r in rows:
        if r["provider"] == "flashcupy" and case_key(r) == key:
            return r["status"]
    return "-"


def _seqlen(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


RIGHT = {"BxSxHxD", "density", "ms", "TFLOP/s", "mem MiB", "max err", "/best", "/flash", "/cudnn", "hd", "seqlen",
         "flashcupy", "SDPA flash", "cuDNN", "/cuDNN"}  # columns aligned right (numbers, or a status word)


def plain_table(header, rows, groups=None) -> str:
    """Fixed-width text table; a blank line between groups."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    numeric = [h in RIGHT for h in header]

    def fmt(cells):
        parts = []
        for i, c in enumerate(cells):
            right = numeric[i] if numeric else False
            parts.append(str(c).rjust(widths[i]) if right else str(c).ljust(widths[i]))
        return "  ".join(parts).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        if groups is not None and i > 0 and groups[i] != groups[i - 1]:
            lines.append("")
        lines.append(fmt(row))
    return "\n".join(lines)


def environment_line(result: dict) -> str:
    """One line naming the device, versions and commit of a result."""
    env = result["env"]
    dev = env.get("device", {})
    vers = env.get("versions", {})
    git = env.get("git", {})
    parts = [dev.get("name") or "unknown device"]
    clocks = dev.get("nvidia_smi") or {}
    if clocks.get("clocks.max.sm"):
        parts.append(f"max SM clock {clocks['clocks.max.sm']} MHz")
    if clocks.get("power.limit"):
        parts.append(f"power limit {clocks['power.limit']} W")
    for name in ("driver", "cuda_runtime", "cupy", "torch", "jax", "triton"):
        if vers.get(name):
            parts.append(f"{name} {vers[name]}")
    if git.get("commit"):
        parts.append(f"flashcupy {git['commit'][:10]}{' (dirty)' if git.get('dirty') else ''}")
    return ", ".join(parts)


def render_markdown(result: dict) -> str:
    """The headline table of a result in Markdown, with its device, date and method (for the README)."""
    header, rows = headline_rows(result)
    cfg = result["config"]
    date = result["created"][:10]
    lines = [f"**{result['env'].get('device', {}).get('name') or 'unknown device'}**, {date}: TFLOP/s "
             f"(FlashAttention formula), ratios = flashcupy / peer (> 1: flashcupy faster).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", f"Shape: hidden {cfg.get('hidden')}, {cfg.get('tokens')} tokens (batch = tokens / seqlen). "
              f"{result['method'].get('summary', '')} `{result['command']}`; {environment_line(result)}."]
    absent = [f"{n} ({_short(p['reason'] or '', 40)})" for n, p in result["providers"].items() if not p["available"]]
    if absent:
        lines.append(f"Absent: {', '.join(absent)}.")
    return "\n".join(lines) + "\n"


def _short(s, n=80) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# options

EXAMPLES = """examples:
  flashcupy bench --quick                       # the short sweep: results in bench/results/
  flashcupy bench --mode bwd --dtype fp16 --head-dims 128 --seqlens 2048 8192 --causal yes
  flashcupy bench --providers flashcupy cudnn flash --densities 1 0.5 0.25
  flashcupy bench --list                        # which providers are present
  flashcupy bench --markdown bench/results/nvidia-h200-quick.json   # headline table for the README
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare `flashcupy bench`'s options (the `flashcupy` command line calls this)."""
    # defaults are in the help texts (they depend on --quick and --device)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    g = p.add_argument_group("what to measure (defaults: the full sweep; --quick for the short one)")
    g.add_argument("--quick", action="store_true",
                   help="bf16, head dims 64 128, seqlens 1k 4k 16k, fwd and fwd+bwd, causal both (< 2 min on an H100)")
    g.add_argument("--mode", dest="modes", nargs="+", action="extend", choices=MODES, metavar="MODE",
                   help=f"one or more of {', '.join(MODES)} (default: all; --quick: fwd fwd+bwd)")
    g.add_argument("--dtype", dest="dtypes", nargs="+", action="extend", choices=DTYPES, metavar="DTYPE",
                   help=f"one or more of {', '.join(DTYPES)} (default bf16)")
    g.add_argument("--head-dims", nargs="+", type=int, metavar="D", help="head dims (default 64 128)")
    g.add_argument("--seqlens", nargs="+", type=int, metavar="N", help="sequence lengths (default 512 ... 16384)")
    g.add_argument("--causal", nargs="+", metavar="yes|no|both", help="causal masking to measure (default both)")
    g.add_argument("--densities", nargs="+", type=float, metavar="F",
                   help="block-sparse densities in (0, 1]; 1 = dense (default 1)")
    g.add_argument("--providers", nargs="+", metavar="NAME",
                   help=f"providers or groups (default all): {', '.join(PROVIDERS)}; groups {', '.join(ALIASES)}")
    g.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: CuPy/torch/JAX on the current CUDA device; cpu: NumPy (and CPU torch/JAX), small "
                        "shapes (its own presets, --quick included); auto (default): gpu where CuPy has a GPU, else cpu")
    g.add_argument("--hidden", type=int, help=f"nheads * head_dim (default {HIDDEN})")
    g.add_argument("--tokens", type=int, help=f"batch * seqlen (default {TOKENS})")
    m = p.add_argument_group("method")
    m.add_argument("--warmup-ms", type=float, help="warm-up per measurement (default 25; --quick 10)")
    m.add_argument("--rep-ms", type=float, help="time spent repeating per measurement (default 100; --quick 40)")
    m.add_argument("--min-reps", type=int, help="fewest repetitions per measurement (default 10; --quick 5)")
    m.add_argument("--max-quadratic-seqlen", type=int,
                   help="longest seqlen for naive, sdpa-math and jax-xla, which hold seqlen^2 scores "
                        "(default 8192; --quick 4096)")
    m.add_argument("--no-accuracy", action="store_true", help="skip the error against the float64 oracle")
    m.add_argument("--seed", type=int, default=0, help="seed of the random inputs and block masks (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"directory for the JSON, tables and plots (default {DEFAULT_OUT})")
    o.add_argument("--name", help="file stem in --out (default: the device name, plus -quick)")
    o.add_argument("--json", metavar="PATH",
                   help="write the JSON here instead of DIR/NAME.json; '-' prints it to stdout")
    o.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    o.add_argument("--plain", action="store_true", help="plain text even where rich is installed")
    o.add_argument("--markdown", metavar="RESULTS_JSON",
                   help="print the headline table of an earlier run as Markdown (for the README) and exit")
    o.add_argument("--list", action="store_true", help="list the providers this environment has and exit")


@dataclasses.dataclass
class Plan:
    """Everything one run measures and how (the JSON's config)."""

    device: str
    preset: str
    modes: list
    dtypes: list
    head_dims: list
    seqlens: list
    causal: list
    densities: list
    providers: list
    hidden: int
    tokens: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_quadratic_seqlen: int
    accuracy: bool
    seed: int
    memory_budget_bytes: float = 0.0

    @property
    def sparse(self) -> bool:
        return any(d < 1 for d in self.densities)


def _parse_causal(values) -> list:
    out = []
    for v in values:
        v = str(v).lower()
        if v == "both":
            out += [False, True]
        elif v in ("yes", "true", "1", "causal"):
            out.append(True)
        elif v in ("no", "false", "0", "full"):
            out.append(False)
        else:
            raise CommandError(f"--causal: expected yes, no or both, got {v!r}")
    return list(dict.fromkeys(out))


def resolve_providers(names) -> list:
    """Provider names from names and groups (ALIASES), in PROVIDERS order; CommandError on unknown names."""
    if not names:
        return list(PROVIDERS)
    chosen = set()
    for n in names:
        for part in str(n).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part in PROVIDERS:
                chosen.add(part)
            elif part in ALIASES:
                chosen.update(ALIASES[part])
            else:
                raise CommandError(f"--providers: unknown {part!r}; expected {', '.join(PROVIDERS)} "
                                   f"or a group: {', '.join(ALIASES)}")
    return [p for p in PROVIDERS if p in chosen]


def make_plan(args) -> Plan:
    """The run's Plan: the preset (default or quick on a GPU, cpu or cpu-quick on the CPU), overridden by
    every option given. --device auto is gpu where CuPy has a usable GPU, else cpu."""
    device = args.device
    if device == "auto":
        from ._arrays import gpu_available

        device = "gpu" if gpu_available() else "cpu"
    if device == "cpu":
        preset = "cpu-quick" if args.quick else "cpu"
    else:
        preset = "quick" if args.quick else "default"
    base = dict(PRESETS[preset])

    def pick(name, value):
        return base[name] if value is None else value

    plan = Plan(
        device=device, preset=preset,
        modes=list(dict.fromkeys(pick("modes", args.modes))),
        dtypes=list(dict.fromkeys(pick("dtypes", args.dtypes))),
        head_dims=list(dict.fromkeys(pick("head_dims", args.head_dims))),
        seqlens=list(dict.fromkeys(pick("seqlens", args.seqlens))),
        causal=base["causal"] if args.causal is None else _parse_causal(args.causal),
        densities=list(dict.fromkeys(float(d) for d in pick("densities", args.densities))),
        providers=resolve_providers(args.providers),
        hidden=pick("hidden", args.hidden), tokens=pick("tokens", args.tokens),
        warmup_ms=pick("warmup_ms", args.warmup_ms), rep_ms=pick("rep_ms", args.rep_ms),
        min_reps=pick("min_reps", args.min_reps),
        max_quadratic_seqlen=pick("max_quadratic_seqlen", args.max_quadratic_seqlen),
        accuracy=not args.no_accuracy, seed=args.seed)
    for name, values in (("--head-dims", plan.head_dims), ("--seqlens", plan.seqlens)):
        if any(v < 1 for v in values):
            raise CommandError(f"{name}: expected positive integers, got {values}")
    if any(not 0 < d <= 1 for d in plan.densities):
        raise CommandError(f"--densities: expected values in (0, 1], got {plan.densities}")
    if plan.hidden < 1 or plan.tokens < 1 or plan.min_reps < 1:
        raise CommandError("--hidden, --tokens and --min-reps must be positive")
    if "bf16" in plan.dtypes:
        from ._arrays import bfloat16

        if bfloat16() is None:
            raise CommandError("--dtype bf16 needs ml_dtypes (pip install ml_dtypes), or pick --dtype fp16")
    return plan


# ---------------------------------------------------------------------------------------------------
# dtypes and inputs


def np_dtype(name: str):
    from ._arrays import bfloat16

    return {"bf16": bfloat16(), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32),
            "fp64": np.dtype(np.float64)}[name]


def _cupy():
    import cupy

    return cupy


class Inputs:
    """q, k, v, dout (batch, seqlen, nheads, head_dim) in one dtype on the bench's device (CuPy on the GPU,
    NumPy on the CPU), with each framework's view or copy of them made once and cached."""

    NAMES = ("q", "k", "v", "do")

    def __init__(self, device: str, dtype: str, arrays: tuple, seed: int):
        self.device, self.dtype, self.seed = device, dtype, seed
        self.arrays = tuple(arrays)
        self.batch, self.seqlen, self.nheads, self.head_dim = self.arrays[0].shape
        self._cache = {}

    @classmethod
    def random(cls, device, dtype, batch, seqlen, nheads, head_dim, seed) -> "Inputs":
        shape = (batch, seqlen, nheads, head_dim)
        dt = np_dtype(dtype)
        if device == "gpu":
            try:
                arrays = _random_gpu(shape, dt, seed)
            except Exception:  # a CuPy without the dtype kernels needed: draw on the host
                cp = _cupy()
                arrays = tuple(cp.asarray(x) for x in _random_host(shape, dt, seed))
        else:
            arrays = _random_host(shape, dt, seed)
        return cls(device, dtype, arrays, seed)

    @classmethod
    def from_host(cls, device, dtype, host_arrays, seed) -> "Inputs":
        if device == "gpu":
            cp = _cupy()
            host_arrays = tuple(cp.asarray(x) for x in host_arrays)
        return cls(device, dtype, host_arrays, seed)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def native(self) -> tuple:
        return self.arrays

    def cast(self, dt) -> tuple:
        """Copies in dtype dt (the naive provider's compute dtype)."""
        dt = np.dtype(dt)
        if dt == self.arrays[0].dtype:
            return self.arrays
        return self._cached(("cast", dt.str), lambda: tuple(_cast(x, dt) for x in self.arrays))

    def torch(self) -> tuple:
        return self._cached("torch", lambda: tuple(_to_torch(x) for x in self.arrays))

    def jax(self) -> tuple:
        return self._cached("jax", lambda: tuple(_to_jax(x) for x in self.arrays))

    def block_mask(self, causal: bool, density: float):
        return self._cached(("block", causal, density), lambda: block_mask(
            self.seqlen, self.seqlen, density, causal=causal, seed=self.seed))

    def additive_mask(self, causal: bool, density: float, dt):
        """(seqlen, seqlen) array in dt on the device: 0 where visible, -inf where masked; None if none."""
        def make():
            vis = element_mask(self.block_mask(causal, density), self.seqlen, self.seqlen, causal=causal)
            if vis is None:
                return None
            m = np.where(vis, 0.0, -np.inf).astype(dt)
            return _cupy().asarray(m) if self.device == "gpu" else m
        return self._cached(("additive", causal, density, np.dtype(dt).str), make)


def _random_host(shape, dt, seed) -> tuple:
    rng = np.random.default_rng(seed)
    work = np.float64 if dt == np.float64 else np.float32
    return tuple(rng.standard_normal(shape, dtype=work).astype(dt) for _ in Inputs.NAMES)


def _random_gpu(shape, dt, seed) -> tuple:
    """Standard-normal arrays drawn on the GPU. bf16 is made from float32 bits (the top 16), so no bf16
    arithmetic kernel is needed: the result is a bf16 value, exactly."""
    from ._arrays import bfloat16

    cp = _cupy()
    rs = cp.random.RandomState(seed)
    out = []
    for _ in Inputs.NAMES:
        x = rs.standard_normal(shape, dtype=cp.float64 if dt == np.float64 else cp.float32)
        if dt == bfloat16():
            x = (x.view(cp.uint32) >> 16).astype(cp.uint16).view(dt)
        else:
            x = x.astype(dt, copy=False)
        out.append(x)
    return tuple(out)


def _cast(x, dt):
    """x in dtype dt; bf16 sources go through their bits, so no bf16 kernel is needed on the GPU."""
    from ._arrays import bfloat16

    if x.dtype == bfloat16() and not isinstance(x, np.ndarray):
        cp = _cupy()
        f32 = (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)  # exact: bf16 is float32's top half
        return f32.astype(dt)
    return x.astype(dt)


def _to_torch(x):
    """A torch tensor on x's memory (GPU: DLPack; CPU: from_numpy); bf16 through a uint16 view if needed."""
    import torch

    from ._arrays import bfloat16

    is_bf16 = x.dtype == bfloat16()
    want = torch.bfloat16 if is_bf16 else getattr(torch, np.dtype(x.dtype).name)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16) if is_bf16 else torch.from_numpy(x)
    try:
        t = torch.from_dlpack(x)
        if t.dtype == want:
            return t
    except Exception:
        if not is_bf16:
            raise
    cp = _cupy()
    return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16)


def _to_jax(x):
    """A JAX array of x (DLPack from CuPy where it works, else through the host)."""
    import jax
    import jax.dlpack
    import jax.numpy as jnp

    from ._arrays import bfloat16

    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    is_bf16 = x.dtype == bfloat16()
    want = jnp.bfloat16 if is_bf16 else np.dtype(x.dtype)
    try:
        a = jax.dlpack.from_dlpack(x)
        if a.dtype == want:
            return a
    except Exception:
        pass
    if is_bf16:
        try:
            cp = _cupy()
            return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(x.view(cp.uint16)), jnp.bfloat16)
        except Exception:
            pass
    return jnp.asarray(_cupy().asnumpy(x))


def _free_device_memory(device: str) -> None:
    """Hand cached blocks back (CuPy's pool, torch's cache) so the next provider has the memory."""
    if device != "gpu":
        return
    if "cupy" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["torch"].cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# timing and memory


class Timer:
    """Median milliseconds of a call, by DESIGN.md's method (see the module docstring)."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float, min_reps: int):
        self.device, self.warmup_ms, self.rep_ms, self.min_reps = device, warmup_ms, rep_ms, min_reps
        self._do_bench = None
        self._flush = None
        if device == "gpu":
            try:
                import torch
                import triton.testing

                if torch.cuda.is_available():
                    self._do_bench = triton.testing.do_bench
            except Exception:
                self._do_bench = None

    def method(self, family: str) -> str:
        if self.device == "cpu":
            return "wall"
        if family == "jax":
            return "wall+block_until_ready"
        return "triton.do_bench" if self._do_bench is not None else "cupy-events"

    def time(self, fn, family: str) -> float:
        if self.device == "cpu" or family == "jax":
            return self._wall(fn, family)
        est = self._estimate(fn)
        if self._do_bench is not None:
            try:
                return float(self._do_bench(fn, warmup=max(self.warmup_ms, 2 * est),
                                            rep=max(self.rep_ms, self.min_reps * est), return_mode="median"))
            except Exception as e:  # a triton that cannot time here: our own loop from now on
                warnings.warn(f"triton.testing.do_bench failed ({_short(e, 80)}); timing with CuPy events",
                              stacklevel=2)
                self._do_bench = None
        return self._events(fn, est)

    def _estimate(self, fn) -> float:
        """ms per call from 3 calls (after one unmeasured call)."""
        cp = _cupy()
        fn()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        return max(cp.cuda.get_elapsed_time(start, end) / 3, 1e-3)

    def _events(self, fn, est: float) -> float:
        cp = _cupy()
        if self._flush is None:
            self._flush = cp.empty(L2_FLUSH_BYTES, dtype=cp.uint8)
        for _ in range(min(1000, max(1, math.ceil(self.warmup_ms / est)))):
            fn()
        n = min(1000, max(self.min_reps, int(self.rep_ms / est)))
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(n)]
        for start, end in events:
            self._flush.fill(0)  # evict L2: every call reads its inputs from HBM
            start.record()
            fn()
            end.record()
        events[-1][1].synchronize()
        return statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in events)

    def _wall(self, fn, family: str) -> float:
        if family == "jax":
            import jax

            sync = jax.block_until_ready
        else:
            def sync(out):
                return out
        sync(fn())
        t0 = time.perf_counter()
        sync(fn())
        est = max(time.perf_counter() - t0, 1e-6)
        inner = max(1, int(0.005 / est))  # batch fast calls so each sample spans >= 5 ms
        per_sample = inner * est
        for _ in range(min(1000, max(1, math.ceil(self.warmup_ms / 1e3 / per_sample)))):
            sync(fn())
        n = min(200, max(self.min_reps, int(self.rep_ms / 1e3 / per_sample)))
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = None
            for _ in range(inner):
                out = fn()
            sync(out)
            samples.append((time.perf_counter() - t0) / inner * 1e3)
        return statistics.median(samples)


def peak_memory_mib(family: str, device: str, fn):
    """Peak MiB allocated during one call of fn beyond what was allocated before it, or None where the
    allocator cannot tell (JAX; torch on the CPU)."""
    if family == "jax" or (device == "cpu" and family != "numpy"):
        return None
    if device == "cpu":
        import tracemalloc

        tracemalloc.start()
        try:
            out = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del out
        return peak / 2**20
    if family == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    cp = _cupy()
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    base = pool.used_bytes()

    class PeakHook(cp.cuda.MemoryHook):
        name = "flashcupy-bench-peak"

        def __init__(self):
            self.peak = base

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, pool.used_bytes())

    hook = PeakHook()
    with hook:
        out = fn()
    cp.cuda.Device().synchronize()
    del out
    return (hook.peak - base) / 2**20


def _sync(family: str, device: str, out) -> None:
    if family == "jax":
        import jax

        jax.block_until_ready(out)
    elif device == "gpu":
        _cupy().cuda.Device().synchronize()


# ---------------------------------------------------------------------------------------------------
# providers


@dataclasses.dataclass
class Runner:
    """What a provider hands the harness for one case.

    fn() is the timed call; it returns {"out" | "dq" | "dk" | "dv": array} for the accuracy check.
    minus, when given, is timed too and subtracted (JAX's bwd = (fwd+bwd) - fwd).
    to_numpy(array) -> float64 NumPy array in BSHD layout.
    """

    fn: object
    to_numpy: object
    minus: object = None
    note: str = ""


class Provider:
    """One attention implementation. Subclasses set name, family (the allocator/timer: cupy, numpy,
    torch or jax) and implement probe (why it is absent, or None) and make (a Runner for a case)."""

    name = ""
    family = "cupy"
    description = ""

    def __init__(self, device: str):
        self.device = device

    def probe(self):
        """None when usable here, else the reason it is absent (never raises)."""
        return None

    def version(self):
        return None

    def wanted(self, plan: Plan):
        """None when this provider belongs in the run, else why not (e.g. block-sparse only)."""
        return None

    def check(self, case: Case, plan: Plan):
        """(status, note) when this case is not run, else None."""
        return None

    def score_bytes(self, case: Case):
        """Bytes per (query, key) score held at once, for providers that materialise the scores; None for
        O(N) providers."""
        return None

    def make(self, case: Case, inputs: Inputs) -> Runner:
        raise NotImplementedError


def _bshd_numpy(x) -> np.ndarray:
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x).astype(np.float64)


class _CupyProvider(Provider):
    """A provider that runs on NumPy (device "cpu") or CuPy: usable wherever CuPy sees a GPU."""

    def __init__(self, device):
        super().__init__(device)
        self.family = "numpy" if device == "cpu" else "cupy"

    def probe(self):
        if self.device == "cpu":
            return None
        from ._arrays import cupy_or_none, gpu_available

        if cupy_or_none() is None:
            return "cupy is not installed"
        return None if gpu_available() else "no CUDA GPU usable through CuPy"


class FlashcupyProvider(_CupyProvider):
    name = "flashcupy"
    description = "flashcupy.flash_attn_forward / flash_attn_backward"

    def version(self):
        from . import __version__

        return __version__

    @staticmethod
    def block_sparse_supported() -> bool:
        import inspect

        from .interface import flash_attn_forward

        return "block_mask" in inspect.signature(flash_attn_forward).parameters

    def check(self, case, plan):
        if case.density < 1 and not self.block_sparse_supported():
            return ("not available", "flashcupy has no block-sparse API yet")
        return None

    def _path_note(self, case) -> str:
        from .interface import kernel_path

        path = kernel_path(np_dtype(case.dtype), case.head_dim, on_gpu=self.device != "cpu")
        return "" if path.startswith("fused") else path

    def make(self, case, inputs):
        from .interface import flash_attn_backward, flash_attn_forward

        q, k, v, do = inputs.native()
        kw = dict(causal=case.causal)
        if case.density < 1:  # one BlockMask per mask: its device lists are built once, then reused
            from .blocksparse import BlockMask

            kw["block_mask"] = inputs._cached(("BlockMask", case.causal, case.density), lambda: BlockMask(
                inputs.block_mask(case.causal, case.density), BLOCK, BLOCK))
        if case.mode == "fwd":
            def fn():
                return {"out": flash_attn_forward(q, k, v, **kw).out}
        elif case.mode == "bwd":
            res = flash_attn_forward(q, k, v, **kw)

            def fn():
                return dict(zip(("dq", "dk", "dv"), flash_attn_backward(do, q, k, v, res.out, res.lse, **kw)))
        else:
            def fn():
                r = flash_attn_forward(q, k, v, **kw)
                dq, dk, dv = flash_attn_backward(do, q, k, v, r.out, r.lse, **kw)
                return dict(out=r.out, dq=dq, dk=dk, dv=dv)
        return Runner(fn=fn, to_numpy=_bshd_numpy, note=self._path_note(case))


class NaiveProvider(_CupyProvider):
    """Standard attention: S = scale * Q K^T, P = softmax(S), O = P V, all (seqlen x seqlen) in memory;
    the backward from P (dV = P^T dO, dP = dO V^T, dS = P o (dP - rowsum(dO o O)), dQ, dK)."""

    name = "naive"
    description = "matmul-softmax-matmul on CuPy (NumPy on the CPU)"

    def version(self):
        if self.device == "cpu":
            return np.__version__
        return _cupy().__version__

    def compute_dtype(self, dtype: str):
        """(dtype the scores are computed in, note)."""
        if self.device == "gpu" and dtype == "bf16":
            return np.dtype(np.float16), "on fp16 copies (CuPy has no bf16 matmul)"
        if self.device == "cpu" and dtype in ("bf16", "fp16"):
            return np.dtype(np.float32), "in fp32 (NumPy has no fast half matmul)"
        return np_dtype(dtype), ""

    def score_bytes(self, case):
        itemsize = self.compute_dtype(case.dtype)[0].itemsize
        return itemsize * (1 if case.mode == "fwd" else 2) + 1  # S (and dP); +1 for the mask and slack

    def make(self, case, inputs):
        dt, note = self.compute_dtype(case.dtype)
        q, k, v, do = inputs.cast(dt)
        xp = np if self.device == "cpu" else _cupy()
        neg = inputs.additive_mask(case.causal, case.density, dt)
        scale = case.head_dim ** -0.5
        qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))  # (B, H, S, D) views

        def forward():
            s = xp.matmul(qh, kh.transpose(0, 1, 3, 2))  # (B, H, Sq, Sk), dt
            s *= scale
            if neg is not None:
                s += neg
            s -= s.max(axis=-1, keepdims=True)
            xp.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True, dtype=xp.float32)  # P, in place
            return s, xp.matmul(s, vh)  # P (B, H, Sq, Sk), O (B, H, Sq, D)

        def backward(p, o):
            dv = xp.matmul(p.transpose(0, 1, 3, 2), doh)  # (B, H, Sk, D)
            ds = xp.matmul(doh, vh.transpose(0, 1, 3, 2))  # dP (B, H, Sq, Sk)
            ds -= (doh.astype(xp.float32) * o.astype(xp.float32)).sum(axis=-1, keepdims=True)  # dP - D
            ds *= p  # dS
            dq = xp.matmul(ds, kh)
            dq *= scale
            dk = xp.matmul(ds.transpose(0, 1, 3, 2), qh)
            dk *= scale
            return dq, dk, dv

        def bshd(x):
            return x.transpose(0, 2, 1, 3)

        if case.mode == "fwd":
            def fn():
                return {"out": bshd(forward()[1])}
        elif case.mode == "bwd":
            p0, o0 = forward()

            def fn():
                return dict(zip(("dq", "dk", "dv"), map(bshd, backward(p0, o0))))
        else:
            def fn():
                p, o = forward()
                dq, dk, dv = backward(p, o)
                return dict(out=bshd(o), dq=bshd(dq), dk=bshd(dk), dv=bshd(dv))
        return Runner(fn=fn, to_numpy=_bshd_numpy, note=note)


class SdpaProvider(Provider):
    """torch scaled_dot_product_attention with one backend forced (BHSD views of the same inputs)."""

    family = "torch"
    BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}

    def __init__(self, device, name):
        super().__init__(device)
        self.name = name
        self.backend = self.BACKENDS[name]
        self.description = f"torch SDPA, backend {self.backend}"

    def probe(self):
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except Exception as e:
            return f"torch not importable ({_short(e, 60)})"
        if not hasattr(SDPBackend, self.backend):
            return f"this torch has no SDPBackend.{self.backend}"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch has no CUDA device"
        return None

    def version(self):
        import torch

        return torch.__version__

    def check(self, case, plan):
        if case.density < 1:
            return ("unsupported", "no block-sparse attention in SDPA")
        return None

    def score_bytes(self, case):
        if self.backend != "MATH":
            return None
        return 12 if case.mode == "fwd" else 24  # fp32 scores, softmax and their gradients

    def make(self, case, inputs):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.backend)
        q, k, v, do = (t.transpose(1, 2) for t in inputs.torch())  # (B, H, S, D) views, no copy
        causal = case.causal

        def attn(a, b, c):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal)

        return _torch_runner(case, attn, q, k, v, do)


def _torch_runner(case, attn, q, k, v, do) -> Runner:
    """A Runner for a torch attention function attn(q, k, v) on BHSD tensors; the backward alone is
    autograd.grad on a retained graph."""
    import torch

    def leaves():
        return tuple(x.detach().requires_grad_() for x in (q, k, v))

    if case.mode == "fwd":
        def fn():
            with torch.no_grad():
                return {"out": attn(q, k, v)}
    elif case.mode == "bwd":
        a, b, c = leaves()
        o = attn(a, b, c)

        def fn():
            return dict(zip(("dq", "dk", "dv"), torch.autograd.grad(o, (a, b, c), do, retain_graph=True)))
    else:
        def fn():
            a, b, c = leaves()
            o = attn(a, b, c)
            dq, dk, dv = torch.autograd.grad(o, (a, b, c), do)
            return dict(out=o, dq=dq, dk=dk, dv=dv)

    def to_numpy(t):
        return t.detach().transpose(1, 2).to(torch.float64).cpu().numpy()

    return Runner(fn=fn, to_numpy=to_numpy)


class JaxProvider(Provider):
    """jax.nn.dot_product_attention(implementation=...), jitted, on BTNH (= BSHD) arrays."""

    family = "jax"

    def __init__(self, device, name):
        super().__init__(device)
        self.name = name
        self.implementation = name.split("-", 1)[1]
        self.description = f"jax.nn.dot_product_attention(implementation={self.implementation!r})"

    def probe(self):
        if self.device == "cpu" and self.implementation == "cudnn":
            return "cuDNN needs a GPU"
        _jax_environment()
        try:
            import jax
            import jax.numpy as jnp  # noqa: F401
        except Exception as e:
            return f"jax not importable ({_short(e, 60)})"
        try:
            backend = jax.default_backend()
        except Exception as e:
            return f"jax has no backend ({_short(e, 60)})"
        if self.device == "gpu" and backend not in ("gpu", "cuda"):
            return f"jax has no GPU backend (default backend: {backend}; install jax[cuda13])"
        if not hasattr(jax.nn, "dot_product_attention"):
            return "this jax has no jax.nn.dot_product_attention"
        return None

    def version(self):
        import jax

        return jax.__version__

    def check(self, case, plan):
        if case.density < 1:
            return ("unsupported", "no block-sparse attention in jax.nn")
        if case.dtype == "fp64":
            import jax

            if not jax.config.jax_enable_x64:
                return ("unsupported", "float64 needs jax_enable_x64")
        return None

    def score_bytes(self, case):
        if self.implementation != "xla":
            return None
        return 12 if case.mode == "fwd" else 24  # fp32 logits, probabilities and their gradients

    def make(self, case, inputs):
        import jax
        import jax.numpy as jnp

        q, k, v, do = inputs.jax()
        attn = functools.partial(jax.nn.dot_product_attention, is_causal=case.causal,
                                 implementation=self.implementation)
        fwd = jax.jit(lambda q, k, v: {"out": attn(q, k, v)})

        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(attn, q, k, v)
            dq, dk, dv = vjp(do)
            return dict(out=o, dq=dq, dk=dk, dv=dv)

        fb = jax.jit(fwd_bwd)
        wide = jnp.float64 if case.dtype == "fp64" else jnp.float32

        def to_numpy(x):
            return np.asarray(x.astype(wide)).astype(np.float64)

        if case.mode == "fwd":
            return Runner(fn=lambda: fwd(q, k, v), to_numpy=to_numpy)
        if case.mode == "fwd+bwd":
            return Runner(fn=lambda: fb(q, k, v, do), to_numpy=to_numpy)
        return Runner(fn=lambda: fb(q, k, v, do), minus=lambda: fwd(q, k, v), to_numpy=to_numpy,
                      note="bwd = (fwd+bwd) - fwd")


def _jax_environment() -> None:
    """Before jax is imported: no up-front grab of 75% of the GPU (CuPy and torch share it), and a cap
    on JAX's pool. A user's own settings win."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(MEMORY_FRACTION))


class FlexProvider(Provider):
    """torch FlexAttention (torch.compile'd) with a BlockMask from the same block mask; block-sparse runs
    only (dense included there, as the baseline of the speedup)."""

    name = "flex"
    family = "torch"
    description = "torch.nn.attention.flex_attention (compiled) with a BlockMask"
    _compiled = None

    def probe(self):
        try:
            import torch
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except Exception as e:
            return f"torch FlexAttention not importable ({_short(e, 60)})"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch has no CUDA device"
        return None

    def version(self):
        import torch

        return torch.__version__

    def wanted(self, plan):
        return None if plan.sparse else "block-sparse only: give --densities below 1"

    def make(self, case, inputs):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if FlexProvider._compiled is None:
            FlexProvider._compiled = torch.compile(flex_attention, dynamic=False)
        flex = FlexProvider._compiled
        q, k, v, do = (t.transpose(1, 2) for t in inputs.torch())
        dev = q.device
        bm = inputs.block_mask(case.causal, case.density)
        blocks = None if bm is None else torch.as_tensor(bm, device=dev)
        causal = case.causal
        mask = None
        if blocks is not None or causal:
            def mask_mod(b, h, q_idx, kv_idx):
                keep = (q_idx >= kv_idx) if causal else (q_idx >= 0)
                if blocks is not None:
                    keep = keep & blocks[q_idx // BLOCK, kv_idx // BLOCK]
                return keep
            mask = create_block_mask(mask_mod, None, None, case.seqlen, case.seqlen, device=dev, BLOCK_SIZE=BLOCK)

        def attn(a, b, c):
            return flex(a, b, c, block_mask=mask)

        return _torch_runner(case, attn, q, k, v, do)


def build_providers(names, device) -> list:
    classes = {"flashcupy": FlashcupyProvider, "naive": NaiveProvider, "flex": FlexProvider}
    out = []
    for n in names:
        if n in SdpaProvider.BACKENDS:
            out.append(SdpaProvider(device, n))
        elif n.startswith("jax-"):
            out.append(JaxProvider(device, n))
        else:
            out.append(classes[n](device))
    return out


def probe_providers(providers, plan) -> dict:
    """{name: {available, used, reason, version, description}}; never raises."""
    info = {}
    for p in providers:
        try:
            reason = p.probe()
        except Exception as e:  # a provider that breaks while probing is absent, not fatal
            reason = f"{type(e).__name__}: {_short(e, 80)}"
        version = None
        if reason is None:
            with contextlib.suppress(Exception):
                version = p.version()
        wanted = p.wanted(plan) if reason is None else None
        info[p.name] = dict(available=reason is None, used=reason is None and wanted is None,
                            reason=reason or wanted, version=None if version is None else str(version),
                            description=p.description)
    return info


# ---------------------------------------------------------------------------------------------------
# measuring one case


def _error_status(e: BaseException) -> str:
    msg = str(e)
    low = msg.lower()
    if any(x in low for x in ("no available kernel", "no viable backend", "not supported", "unsupported")):
        return "unsupported"
    return "error"


def _quadratic_skip(prov: Provider, case: Case, plan: Plan):
    per_score = prov.score_bytes(case)
    if per_score is None:
        return None
    if case.seqlen > plan.max_quadratic_seqlen:
        return ("skipped", f"O(N^2) memory: seqlen > {plan.max_quadratic_seqlen} (--max-quadratic-seqlen)")
    need = per_score * case.scores
    if plan.memory_budget_bytes and need > plan.memory_budget_bytes:
        return ("skipped", f"O(N^2) memory: ~{need / 2**30:.0f} GiB > {plan.memory_budget_bytes / 2**30:.0f} GiB "
                           f"({MEMORY_FRACTION:.0%} of the device)")
    return None


@contextlib.contextmanager
def _quiet():
    """Peers warn when a backend cannot run a case; the row's note says so instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def measure(prov: Provider, case: Case, inputs: Inputs, plan: Plan, timer: Timer, acc: "Accuracy") -> dict:
    """One row: time, TFLOP/s, memory and accuracy of prov on case (status != ok when it cannot run)."""
    row = new_row(prov.name, case)
    try:
        why = prov.check(case, plan) or _quadratic_skip(prov, case, plan)
    except Exception as e:
        why = ("error", _short(f"{type(e).__name__}: {e}", 160))
    if why:
        row["status"], row["note"] = why
        return row
    runner = None
    try:
        with _quiet():
            t0 = time.perf_counter()
            runner = prov.make(case, inputs)
            _sync(prov.family, plan.device, runner.fn())  # compiles, autotunes, allocates
            if runner.minus is not None:
                _sync(prov.family, plan.device, runner.minus())
            row["setup_s"] = time.perf_counter() - t0
            ms = timer.time(runner.fn, prov.family)
            if runner.minus is not None:
                ms -= timer.time(runner.minus, prov.family)
            row["timer"] = timer.method(prov.family)
            row["note"] = runner.note
            if not ms > 0:
                raise RuntimeError(f"time not measurable ({ms:.4f} ms)")
            row["ms"], row["tflops"] = ms, row["flops"] / ms / 1e9
            try:
                row["peak_mem_mib"] = peak_memory_mib(prov.family, plan.device, runner.fn)
            except Exception as e:  # the time stands without its memory
                row["note"] = "; ".join(x for x in (row["note"], _short(f"memory: {type(e).__name__}: {e}", 100)) if x)
    except Exception as e:
        row.update(status=_error_status(e), note=_short(f"{type(e).__name__}: {e}", 160), ms=None, tflops=None,
                   peak_mem_mib=None)
    finally:
        runner = None
        _free_device_memory(plan.device)
    if row["status"] == "ok" and plan.accuracy:
        try:
            with _quiet():
                row["max_err"] = acc.error(prov, case)
        except Exception as e:
            row["note"] = "; ".join(x for x in (row["note"], _short(f"accuracy: {type(e).__name__}: {e}", 100)) if x)
        finally:
            _free_device_memory(plan.device)
    return row


class Accuracy:
    """max |output - oracle| per (provider, mode, dtype, head_dim, causal, density), on ACCURACY_SHAPE."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._errors, self._inputs, self._oracle = {}, {}, {}

    def _small(self, dtype, head_dim):
        key = (dtype, head_dim)
        if key not in self._inputs:
            s = ACCURACY_SHAPE
            host = _random_host((s["batch"], s["seqlen"], s["nheads"], head_dim), np_dtype(dtype),
                                self.plan.seed + 1)
            self._inputs[key] = (host, Inputs.from_host(self.plan.device, dtype, host, self.plan.seed))
        return self._inputs[key]

    def _reference(self, case, host, inputs):
        from . import reference

        key = (case.dtype, case.head_dim, case.causal, case.density)
        if key not in self._oracle:
            q, k, v, do = host
            s = inputs.seqlen
            vis = element_mask(inputs.block_mask(case.causal, case.density), s, s, causal=False)
            kw = dict(causal=case.causal, mask=vis)
            out, _ = reference.attention_forward(q, k, v, **kw)
            dq, dk, dv = reference.attention_backward(do, q, k, v, **kw)
            self._oracle[key] = dict(out=out, dq=dq, dk=dk, dv=dv)
        return self._oracle[key]

    def error(self, prov: Provider, case: Case):
        key = (prov.name,) + case.key[:3] + case.key[4:]
        if key not in self._errors:
            host, inputs = self._small(case.dtype, case.head_dim)
            small = dataclasses.replace(case, seqlen=inputs.seqlen, batch=inputs.batch, nheads=inputs.nheads)
            runner = prov.make(small, inputs)
            got = runner.fn()
            ref = self._reference(case, host, inputs)
            err = 0.0
            for name in MODE_OUTPUTS[case.mode]:
                x = runner.to_numpy(got[name])
                if not np.isfinite(x).all():
                    err = math.inf
                    break
                err = max(err, float(np.abs(x - ref[name]).max()))
            self._errors[key] = err if math.isfinite(err) else None
            if not math.isfinite(err):
                raise FloatingPointError("non-finite output on the accuracy shape")
        return self._errors[key]


# ---------------------------------------------------------------------------------------------------
# the environment: device, clocks, versions, commit


def _run_cmd(cmd, cwd=None, timeout=10.0):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "power.draw", "temperature.gpu", "memory.total", "persistence_mode")


def _nvidia_smi(pci_bus_id=None, name=None) -> dict:
    """nvidia-smi's clocks, power limit, driver... of the GPU at pci_bus_id (else the one named name, or
    the only one); {} where nvidia-smi is missing or says nothing."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    out = _run_cmd(cmd + ["-i", pci_bus_id]) if pci_bus_id else None
    if not out:
        out = _run_cmd(cmd)
        if not out:
            return {}
        lines = out.splitlines()
        named = [line for line in lines if name and line.split(",")[0].strip() == name]
        if len(lines) == 1 or len(set(named)) == 1:  # the only GPU, or only one model in the box
            out = lines[0] if len(lines) == 1 else named[0]
        else:
            return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return {k: v for k, v in zip(SMI_FIELDS, values) if v and "N/A" not in v}


def _dist_version(*names):
    from importlib import metadata

    for n in names:
        with contextlib.suppress(Exception):
            return metadata.version(n)
    return None


def collect_env(device: str) -> dict:
    """Device (name, memory, clocks), versions and the git commit; every field best effort."""
    from . import __version__

    versions = {"python": platform.python_version(), "numpy": np.__version__, "flashcupy": __version__}
    for mod, dists in (("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")), ("torch", ("torch",)),
                       ("triton", ("triton",)), ("jax", ("jax",)), ("jaxlib", ("jaxlib",)),
                       ("ml_dtypes", ("ml_dtypes",)), ("rich", ("rich",)), ("matplotlib", ("matplotlib",))):
        m = sys.modules.get(mod)
        versions[mod] = getattr(m, "__version__", None) if m is not None else _dist_version(*dists)
    dev = {"kind": device, "name": None}
    if device == "gpu":
        with contextlib.suppress(Exception):
            cp = _cupy()
            d = cp.cuda.Device()
            props = cp.cuda.runtime.getDeviceProperties(d.id)
            name = props.get("name", b"")
            dev.update(name=name.decode() if isinstance(name, bytes) else str(name), index=d.id,
                       compute_capability=str(d.compute_capability), pci_bus_id=d.pci_bus_id,
                       memory_total_mib=int(props.get("totalGlobalMem", 0)) // 2**20,
                       multiprocessors=props.get("multiProcessorCount"))
            for key, out in (("clockRate", "sm_clock_max_mhz"), ("memoryClockRate", "mem_clock_max_mhz")):
                if props.get(key):
                    dev[out] = props[key] // 1000
            versions["cuda_runtime"] = str(cp.cuda.runtime.runtimeGetVersion())
            versions["driver"] = str(cp.cuda.runtime.driverGetVersion())
        smi = _nvidia_smi(dev.get("pci_bus_id"), dev.get("name"))
        if smi:
            dev["nvidia_smi"] = smi
            versions["driver"] = smi.get("driver_version", versions.get("driver"))
            dev["name"] = dev["name"] or smi.get("name")
        if "torch" in sys.modules:
            with contextlib.suppress(Exception):
                torch = sys.modules["torch"]
                versions["torch_cuda"] = torch.version.cuda
                versions["cudnn"] = str(torch.backends.cudnn.version())
    else:
        dev["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    root = Path(__file__).resolve().parent.parent
    commit = _run_cmd(["git", "rev-parse", "HEAD"], cwd=root)
    status = _run_cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if commit else None
    git = {"commit": commit, "dirty": None if status is None else bool(status)}
    host = {"platform": platform.platform(), "python": sys.version.split()[0]}
    return {"device": dev, "versions": versions, "git": git, "host": host}


def _device_memory_bytes(device: str) -> float:
    if device == "gpu":
        with contextlib.suppress(Exception):
            return float(_cupy().cuda.runtime.memGetInfo()[1])
        return 0.0
    with contextlib.suppress(Exception):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return 0.0


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "device"


# ---------------------------------------------------------------------------------------------------
# progress and output


class PlainProgress:
    """One line per measurement on stderr."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, label: str):
        pass

    def advance(self, row: dict):
        self.done += 1
        if row["status"] == "ok":
            what = f"{row['ms']:9.3f} ms {_tf(row['tflops']):>7} TFLOP/s"
        else:
            what = f"{row['status']}: {_short(row['note'], 70)}"
        case = (f"{row['mode']} {row['dtype']} hd{row['head_dim']} s{row['seqlen']} "
                f"{'causal' if row['causal'] else 'full'}" + (f" d{row['density']:g}" if row["density"] < 1 else ""))
        w = len(str(self.total))
        print(f"[{self.done:>{w}}/{self.total}] {row['provider']:<14} {case:<36} {what}", file=self.stream, flush=True)


class RichProgress:
    """A rich progress bar (on a terminal)."""

    def __init__(self, total: int, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.task = None
        self.total = total

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, label: str):
        self.progress.update(self.task, description=label)

    def advance(self, row: dict):
        self.progress.advance(self.task)


def _rich_console(stderr=False):
    """A rich Console on stdout (or stderr), or None where rich is absent."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=stderr)


def print_table(title: str, header, rows, groups=None, *, use_rich: bool, stream=None) -> None:
    """A rich table on a terminal; plain fixed-width text in logs and pipes (compact, no padding)."""
    stream = stream or sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    console = _rich_console(stderr=stream is sys.stderr) if (use_rich and tty) else None
    text = plain_table(header, rows, groups)
    if console is None or console.width < max(map(len, text.splitlines())) + 2 * len(header):
        print(f"\n{title}", file=stream)  # no rich, not a terminal, or one too narrow for rich's table
        print(text, file=stream, flush=True)
        return
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for h in header:
        t.add_column(h, justify="right" if h in RIGHT else "left", no_wrap=h != "note",
                     style="bold" if h in ("provider", "flashcupy") else None)
    for i, r in enumerate(rows):
        if groups is not None and i > 0 and groups[i] != groups[i - 1]:
            t.add_section()
        t.add_row(*[str(c) for c in r])
    console.print(t)


def write_outputs(result: dict, plan_out: str, stem: str, json_path, *, plots: bool) -> list:
    """JSON, the full table (.txt), the headline table (.md) and the plots; returns the paths written."""
    out = Path(plan_out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if json_path != "-":
        jp = Path(json_path) if json_path else out / f"{stem}.json"
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(result, indent=1) + "\n")
        written.append(str(jp))
    header, rows, groups = table_rows(result["rows"])
    txt = out / f"{stem}.txt"
    txt.write_text(f"{environment_line(result)}\n{result['command']}\n\n{plain_table(header, rows, groups)}\n\n"
                   + plain_table(*headline_rows(result)) + "\n")
    written.append(str(txt))
    md = out / f"{stem}.md"
    md.write_text(render_markdown(result))
    written.append(str(md))
    if plots:
        try:
            from . import _plots
        except ImportError:
            _plots = None
        if _plots is not None:
            try:
                written += [str(p) for p in _plots.plot_result(result, out, stem)]
            except ImportError:
                print("plots: matplotlib is not installed (pip install matplotlib); no PNG written", file=sys.stderr)
            except Exception as e:  # a plot must never lose the measurements
                print(f"plots: failed ({type(e).__name__}: {_short(e, 120)}); the JSON has the data", file=sys.stderr)
    return written


# ---------------------------------------------------------------------------------------------------
# the run


def run_bench(plan: Plan, *, command: str = "flashcupy bench", use_rich: bool = True) -> dict:
    """Measure every (case, provider) of plan; return the result object (schema SCHEMA)."""
    t_start = time.perf_counter()
    if plan.device == "gpu":
        from ._arrays import gpu_available

        if not gpu_available():
            raise CommandError("no CUDA GPU usable through CuPy (pip install 'flashcupy[cuda13]'); "
                               "--device cpu measures the NumPy path")
    if "fp64" in plan.dtypes and any(p.startswith("jax-") for p in plan.providers):
        _jax_environment()
        with contextlib.suppress(Exception):
            import jax

            jax.config.update("jax_enable_x64", True)
    plan.memory_budget_bytes = MEMORY_FRACTION * _device_memory_bytes(plan.device)
    providers = build_providers(plan.providers, plan.device)
    info = probe_providers(providers, plan)
    active = [p for p in providers if info[p.name]["used"]]
    timer = Timer(plan.device, plan.warmup_ms, plan.rep_ms, plan.min_reps)
    acc = Accuracy(plan)
    n_cases = (len(plan.dtypes) * len(plan.head_dims) * len(plan.seqlens) * len(plan.causal)
               * len(plan.densities) * len(plan.modes))
    total = n_cases * len(active)
    console = _rich_console(stderr=True) if use_rich else None
    tty = sys.stderr.isatty()
    progress = RichProgress(total, console) if (console is not None and tty) else PlainProgress(total)
    print(f"flashcupy bench: {n_cases} cases x {len(active)} providers ({', '.join(p.name for p in active)}) "
          f"on {plan.device}", file=sys.stderr, flush=True)
    rows, interrupted = [], False
    try:
        with progress:
            for dtype in plan.dtypes:
                for head_dim in plan.head_dims:
                    for seqlen in plan.seqlens:
                        batch, nheads = fa_shape(seqlen, head_dim, hidden=plan.hidden, tokens=plan.tokens)
                        try:
                            inputs, failed = Inputs.random(plan.device, dtype, batch, seqlen, nheads, head_dim,
                                                           plan.seed), None
                        except Exception as e:  # e.g. out of memory: every row of this shape says so
                            inputs, failed = None, _short(f"inputs: {type(e).__name__}: {e}", 160)
                        for causal in plan.causal:
                            for density in plan.densities:
                                bm = block_mask(seqlen, seqlen, density, causal=causal, seed=plan.seed)
                                kept = kept_fraction(bm, causal=causal)
                                for mode in plan.modes:
                                    case = Case(mode, dtype, head_dim, seqlen, causal, density, batch, nheads, kept)
                                    for prov in active:
                                        progress.start(f"{prov.name} {case.label()}")
                                        if failed:
                                            row = new_row(prov.name, case)
                                            row.update(status="error", note=failed)
                                        else:
                                            row = measure(prov, case, inputs, plan, timer, acc)
                                        rows.append(row)
                                        progress.advance(row)
                        inputs = None
                        gc.collect()
                        _free_device_memory(plan.device)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing the rows measured so far", file=sys.stderr)
    method = {
        "summary": (f"Median of >= {plan.min_reps} repetitions after {plan.warmup_ms:g} ms of warm-up; "
                    + ("CUDA events with L2 flushed (" + timer.method("cupy") + "), JAX by wall clock."
                       if plan.device == "gpu" else "wall clock on the CPU.")),
        "timers": {p.name: timer.method(p.family) for p in active},
        "flops": "fwd 4*B*H*Sq*Sk*D (halved for causal, Sq == Sk); bwd 2.5x; fwd+bwd 3.5x; x kept fraction of blocks",
        "memory": "peak bytes allocated during one call beyond the inputs (CuPy pool / torch allocator / "
                  "tracemalloc); n/a for JAX",
        "accuracy": f"max |output - float64 oracle| on batch {ACCURACY_SHAPE['batch']}, seqlen "
                    f"{ACCURACY_SHAPE['seqlen']}, nheads {ACCURACY_SHAPE['nheads']}",
        "bwd": "backward alone from saved forward state; JAX: (fwd+bwd) - fwd",
        "l2_flush_bytes": L2_FLUSH_BYTES,
        "block": BLOCK,
    }
    config = dataclasses.asdict(plan)
    return make_result(config=config, env=collect_env(plan.device), method=method, providers=info, rows=rows,
                       command=command, wall_s=time.perf_counter() - t_start, interrupted=interrupted)


def _print_providers(info: dict, stream) -> None:
    for name, p in info.items():
        state = "ok" if p["used"] else ("not run" if p["available"] else "absent")
        extra = p["version"] if p["used"] else p["reason"]
        print(f"  {name:<15} {state:<8} {extra or ''}", file=stream)


def run(args) -> int:
    """`flashcupy bench`: measure, write JSON/tables/plots under --out, print the table last."""
    use_rich = not args.plain
    if args.markdown:
        try:
            result = load_result(args.markdown)
        except (OSError, ValueError) as e:
            raise CommandError(f"--markdown {args.markdown}: {e}") from e
        sys.stdout.write(render_markdown(result))
        return 0
    plan = make_plan(args)
    if args.list:
        _print_providers(probe_providers(build_providers(plan.providers, plan.device), plan), sys.stdout)
        return 0
    argv = getattr(args, "_argv", None)
    if argv is None and sys.argv[1:2] == ["bench"]:  # through the `flashcupy` command line
        argv = sys.argv[2:]
    command = "flashcupy bench" + ("" if argv is None else " " + " ".join(shlex.quote(a) for a in argv))
    result = run_bench(plan, command=command, use_rich=use_rich)
    try:
        validate_result(result)
        invalid = None
    except ValueError as e:  # a bug here must not lose the measurements: write them, then say so
        invalid = str(e)
    stem = args.name or (_slug(result["env"]["device"].get("name") or plan.device)
                         if plan.device == "gpu" else "cpu") + ("-quick" if plan.preset in ("quick", "cpu-quick") else "")
    written = write_outputs(result, args.out, stem, args.json, plots=not args.no_plots)
    table_stream = sys.stderr if args.json == "-" else sys.stdout
    print("\nproviders:", file=table_stream)
    _print_providers(result["providers"], table_stream)
    header, rows, groups = table_rows(result["rows"])
    print_table(f"flashcupy bench: {environment_line(result)}", header, rows, groups, use_rich=use_rich,
                stream=table_stream)
    print(f"\nwrote: {', '.join(written)}  ({result['wall_s']:.0f} s)", file=table_stream)
    print_table("headline: TFLOP/s, ratio = flashcupy / peer", *headline_rows(result), use_rich=use_rich,
                stream=table_stream)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    sys.stdout.flush()
    if invalid:
        print(f"flashcupy bench: the result does not match its schema (a bug): {invalid}", file=sys.stderr)
    return 1 if (result["interrupted"] or invalid) else 0


def main(argv=None) -> int:
    """`python -m flashcupy.bench [options]`: the same as `flashcupy bench [options]`."""
    p = argparse.ArgumentParser(prog="flashcupy bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args._argv = argv
    try:
        return int(run(args) or 0)
    except CommandError as e:
        print(f"flashcupy bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
