"""Measuring one case: one row of time, TFLOP/s, memory and accuracy (measure, Accuracy)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings

import numpy as np

from .common import ACCURACY_SHAPE, MEMORY_FRACTION, MODE_OUTPUTS, _short
from .inputs import Inputs, _free_device_memory, _random_host, np_dtype
from .providers import Provider
from .schema import new_row
from .shape import Case, Plan, element_mask
from .timing import Timer, _sync, peak_memory_mib


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
        from .. import reference

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
