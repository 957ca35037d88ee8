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

# The package, bottom layer first (a module imports only those above it):
#   common     constants (SCHEMA, MODES, PROVIDERS, ...) and small helpers
#   shape      the FLOP formula, the benchmark shape, block masks, Case, Plan
#   schema     rows, ratios, the JSON schema (make_result, validate_result, load_result)
#   report     the full and headline tables, Markdown, progress, the files written
#   inputs     dtypes and inputs (Inputs)
#   timing     timing and memory (Timer, peak_memory_mib)
#   providers  the attention implementations measured (Provider and its subclasses)
#   measure    measuring one case (measure, Accuracy)
#   env        the environment: device, clocks, versions, commit
#   cli        options, presets, make_plan, run_bench, run, main (`flashcupy bench`)
# Every name below was flashcupy/bench.py's; `from flashcupy import bench; bench.X` keeps working.

from .common import (ACCURACY_SHAPE, ALIASES, BLOCK, DEFAULT_OUT, DTYPES, HIDDEN, L2_FLUSH_BYTES, MEMORY_FRACTION,
                     MODE_FACTOR, MODE_OUTPUTS, MODES, PROVIDERS, RATIO_PEERS, SCHEMA, STATUSES, TOKENS)
from .shape import Case, Plan, attention_flops, block_mask, case_key, element_mask, fa_shape, kept_fraction
from .schema import (PROVIDER_FIELDS, RESULT_FIELDS, ROW_FIELDS, add_ratios, load_result, make_result, new_row,
                     validate_result)
from .report import (PlainProgress, RIGHT, RichProgress, environment_line, headline_rows, plain_table, print_table,
                     render_markdown, table_rows, write_outputs)
from .inputs import Inputs, np_dtype
from .timing import Timer, peak_memory_mib
from .providers import (FlashcupyProvider, FlexProvider, JaxProvider, NaiveProvider, Provider, Runner, SdpaProvider,
                        build_providers, probe_providers)
from .measure import Accuracy, measure
from .env import SMI_FIELDS, collect_env
from .cli import EXAMPLES, PRESETS, CommandError, add_arguments, main, make_plan, resolve_providers, run, run_bench
from .cli import _parse_causal

_parse_causal = _parse_causal  # tests call bench._parse_causal; not in __all__ (this marks the import used)

__all__ = [
    "ACCURACY_SHAPE", "ALIASES", "Accuracy", "BLOCK", "Case", "CommandError", "DEFAULT_OUT", "DTYPES", "EXAMPLES",
    "FlashcupyProvider", "FlexProvider", "HIDDEN", "Inputs", "JaxProvider", "L2_FLUSH_BYTES", "MEMORY_FRACTION",
    "MODES", "MODE_FACTOR", "MODE_OUTPUTS", "NaiveProvider", "PRESETS", "PROVIDERS", "PROVIDER_FIELDS",
    "PlainProgress", "Plan", "Provider", "RATIO_PEERS", "RESULT_FIELDS", "RIGHT", "ROW_FIELDS", "RichProgress",
    "Runner", "SCHEMA", "SMI_FIELDS", "STATUSES", "SdpaProvider", "TOKENS", "Timer", "add_arguments", "add_ratios",
    "attention_flops", "block_mask", "build_providers", "case_key", "collect_env", "element_mask",
    "environment_line", "fa_shape", "headline_rows", "kept_fraction", "load_result", "main", "make_plan",
    "make_result", "measure", "new_row", "np_dtype", "peak_memory_mib", "plain_table", "print_table",
    "probe_providers", "render_markdown", "resolve_providers", "run", "run_bench", "table_rows", "validate_result",
    "write_outputs",
]
