"""`flashcupy bench`'s command line: options, presets, the plan, the run (the help text is flashcupy.bench's
docstring)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shlex
import sys
import time

from ..cli import CommandError  # a bad combination of options: `flashcupy` prints it and exits 2
from .common import (ACCURACY_SHAPE, ALIASES, BLOCK, DEFAULT_OUT, DTYPES, HIDDEN, L2_FLUSH_BYTES, MEMORY_FRACTION,
                     MODES, PROVIDERS, TOKENS, _short)
from .env import _device_memory_bytes, _slug, collect_env
from .inputs import Inputs, _free_device_memory
from .measure import Accuracy, measure
from .providers import _jax_environment, build_providers, probe_providers
from .report import (PlainProgress, RichProgress, _rich_console, environment_line, headline_rows, print_table,
                     render_markdown, table_rows, write_outputs)
from .schema import load_result, make_result, new_row, validate_result
from .shape import Case, Plan, block_mask, fa_shape, kept_fraction
from .timing import Timer

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
        from .._arrays import gpu_available

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
        from .._arrays import bfloat16

        if bfloat16() is None:
            raise CommandError("--dtype bf16 needs ml_dtypes (pip install ml_dtypes), or pick --dtype fp16")
    return plan


# ---------------------------------------------------------------------------------------------------
# the run


def run_bench(plan: Plan, *, command: str = "flashcupy bench", use_rich: bool = True) -> dict:
    """Measure every (case, provider) of plan; return the result object (schema SCHEMA)."""
    t_start = time.perf_counter()
    if plan.device == "gpu":
        from .._arrays import gpu_available

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
    from . import __doc__ as package_doc

    p = argparse.ArgumentParser(prog="flashcupy bench", description=package_doc.split("\n\n")[0])
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args._argv = argv
    try:
        return int(run(args) or 0)
    except CommandError as e:
        print(f"flashcupy bench: error: {e}", file=sys.stderr)
        return 2
