"""Results: rows, ratios, the JSON schema (make_result, validate_result, load_result)."""

from __future__ import annotations

import datetime
import json
import math

import numpy as np

from .common import MODES, RATIO_PEERS, SCHEMA, STATUSES
from .shape import Case, attention_flops, case_key


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
