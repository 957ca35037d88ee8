"""PNG figures of a `flashcupy bench` result (needs matplotlib; raises ImportError without it).

Like the FlashAttention paper's figures:
- Fig. 3: TFLOP/s against sequence length, one line per provider, one panel per (mode, head_dim,
  causal), one figure per dtype (NAME-speed-DTYPE.png); the same grid for peak memory
  (NAME-memory-DTYPE.png, log scale).
- Fig. 2 right: block-sparse speedup (time dense / time at density) against density, per provider, at
  the longest seqlen measured both ways (NAME-block-sparse.png); only when the result has sparse rows.

Only the object-oriented API (matplotlib.figure.Figure): no pyplot, no GUI backend, safe on servers.
"""

from __future__ import annotations

from pathlib import Path

ORDER = ("flashcupy", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "jax-cudnn", "jax-xla",
         "flex", "naive")
MARKERS = "os^Dv<>phX*"


def _style(provider: str) -> dict:
    i = ORDER.index(provider) if provider in ORDER else len(ORDER) + hash(provider) % 5
    color = f"C{i % 10}"
    style = dict(color=color, marker=MARKERS[i % len(MARKERS)], markersize=4, linewidth=1.2)
    if provider == "flashcupy":
        style.update(linewidth=2.6, markersize=6, zorder=5)
    return style


def _providers(rows) -> list:
    names = {r["provider"] for r in rows}
    return [p for p in ORDER if p in names] + sorted(names - set(ORDER))


def _seqlen_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _title(result) -> str:
    dev = result["env"].get("device", {}).get("name") or "unknown device"
    return f"{dev}, {result['created'][:10]}"


def _panel_keys(rows) -> tuple:
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    cols = sorted({(r["head_dim"], r["causal"]) for r in rows})
    return modes, cols


def grid_figure(result, rows, metric: str, ylabel: str, *, title: str, log_y: bool = False):
    """A Figure: rows of panels per mode, columns per (head_dim, causal); x = seqlen (log 2)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    modes, cols = _panel_keys(rows)
    fig = Figure(figsize=(3.6 * len(cols) + 0.4, 2.9 * len(modes) + 1.0), layout="constrained")
    axes = fig.subplots(len(modes), len(cols), squeeze=False)
    handles = {}
    for i, mode in enumerate(modes):
        for j, (hd, causal) in enumerate(cols):
            ax = axes[i][j]
            panel = [r for r in rows if r["mode"] == mode and r["head_dim"] == hd and r["causal"] == causal
                     and r.get(metric) is not None]
            seqlens = sorted({r["seqlen"] for r in panel})
            for prov in _providers(panel):
                pts = sorted((r["seqlen"], r[metric]) for r in panel if r["provider"] == prov)
                if pts:
                    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=prov, **_style(prov))
                    handles.setdefault(prov, line)
            ax.set_title(f"{mode}, hd {hd}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_xscale("log", base=2)
            if seqlens:
                ax.set_xticks(seqlens, [_seqlen_label(s) for s in seqlens], fontsize=8)
                ax.minorticks_off()
            if log_y:
                ax.set_yscale("log")
                vals = [r[metric] for r in panel if r[metric] and r[metric] > 0]
                narrow = bool(vals) and max(vals) / min(vals) < 20  # within ~a decade: label minor ticks too
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if narrow else NullFormatter())
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length", fontsize=9)
    names = _providers([{"provider": p} for p in handles])
    fig.legend([handles[p] for p in names], names, loc="outside lower center", ncol=min(len(names), 5), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def block_sparse_figure(result, rows):
    """Speedup of each provider at each density over its own dense time, at the longest seqlen that has
    both; the dashed line is 1 / density (time proportional to the blocks computed). None without data."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    series = {}  # (mode, dtype, hd, causal) -> provider -> [(density, speedup)]
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["head_dim"], r["causal"], r["provider"]), []).append(r)
    for (mode, dtype, hd, causal, prov), rs in groups.items():
        dense = {r["seqlen"]: r["ms"] for r in rs if r["density"] >= 1}
        sparse = [r for r in rs if r["density"] < 1 and r["seqlen"] in dense]
        if not sparse:
            continue
        seqlen = max(r["seqlen"] for r in sparse)
        # x: the fraction of blocks actually kept (a small seqlen cannot go below its diagonal)
        pts = sorted([(1.0, 1.0)] + [(r.get("kept", r["density"]), dense[seqlen] / r["ms"])
                                     for r in sparse if r["seqlen"] == seqlen])
        series.setdefault((mode, dtype, hd, causal), {})[prov] = (seqlen, pts)
    if not series:
        return None
    keys = sorted(series)
    fig = Figure(figsize=(3.8 * len(keys) + 0.4, 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        mode, dtype, hd, causal = key
        densities = sorted({d for _, pts in series[key].values() for d, _ in pts})
        ax.plot(densities, [1 / d for d in densities], "--", color="0.6", linewidth=1, label="1 / density")
        for prov in _providers([{"provider": p} for p in series[key]]):
            seqlen, pts = series[key][prov]
            ax.plot([d for d, _ in pts], [s for _, s in pts], label=f"{prov} (s{_seqlen_label(seqlen)})",
                    **_style(prov))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(densities, [f"{d:.2g}" for d in densities], fontsize=8)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{mode} {dtype}, hd {hd}, {'causal' if causal else 'non-causal'}", fontsize=9)
        ax.set_xlabel("density (fraction of blocks kept)", fontsize=9)
        ax.set_ylabel("speedup over dense", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Block-sparse speedup: {_title(result)}", fontsize=10)
    return fig


def plot_result(result: dict, out_dir, stem: str) -> list:
    """Write the figures of result into out_dir; returns their paths."""
    import matplotlib  # noqa: F401  (ImportError here tells the caller matplotlib is absent)

    out_dir = Path(out_dir)
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    paths = []
    for dtype in sorted({r["dtype"] for r in ok}):
        dense = [r for r in ok if r["dtype"] == dtype and r["density"] >= 1]
        if not dense:
            continue
        fig = grid_figure(result, dense, "tflops", "TFLOP/s",
                          title=f"Attention speed, {dtype}: {_title(result)} (hidden {result['config'].get('hidden')}, "
                                f"{result['config'].get('tokens')} tokens)")
        paths.append(out_dir / f"{stem}-speed-{dtype}.png")
        fig.savefig(paths[-1], dpi=120)
        if any(r["peak_mem_mib"] is not None for r in dense):
            fig = grid_figure(result, dense, "peak_mem_mib", "peak memory beyond inputs (MiB)",
                              title=f"Attention memory, {dtype}: {_title(result)}", log_y=True)
            paths.append(out_dir / f"{stem}-memory-{dtype}.png")
            fig.savefig(paths[-1], dpi=120)
    if any(r["density"] < 1 for r in ok):
        fig = block_sparse_figure(result, ok)
        if fig is not None:
            paths.append(out_dir / f"{stem}-block-sparse.png")
            fig.savefig(paths[-1], dpi=120)
    return paths
