"""flashcupy: exact FlashAttention as raw CUDA kernels compiled by CuPy, with no framework dependency.

Public API:
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, deterministic=False,
                    return_lse=False)
    flash_attn_forward(q, k, v, *, dropout_p=0.0, softmax_scale=None, causal=False) -> AttnForward
    flash_attn_backward(dout, q, k, v, out, lse, *, dropout_p=0.0, softmax_scale=None, causal=False,
                        rng_state=None, deterministic=False) -> (dq, dk, dv)
    flashcupy.reference: the NumPy float64 oracle (the specification).
Layout BSHD; see README.md for the conventions.
"""

from . import blocksparse, dropout, reference
from .blocksparse import BlockMask
from .interface import AttnForward, flash_attn_backward, flash_attn_forward, flash_attn_func

__version__ = "0.1.0"

__all__ = [
    "AttnForward",
    "BlockMask",
    "blocksparse",
    "dropout",
    "flash_attn_backward",
    "flash_attn_forward",
    "flash_attn_func",
    "reference",
]
