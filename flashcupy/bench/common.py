"""The bench's constants and the small helpers every layer of flashcupy.bench uses.

The bottom layer of the package: it imports no other module of it.
"""

from __future__ import annotations

import os


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


def _short(s, n=80) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _cupy():
    import cupy

    return cupy
