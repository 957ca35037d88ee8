"""Rendering (the full table, the headline table, Markdown), progress and the files a run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import DTYPES, MODES, _short
from .shape import case_key


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
            from .. import _plots
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
