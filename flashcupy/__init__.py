"""flashcupy: exact FlashAttention as raw CUDA kernels compiled by CuPy, with no framework dependency.

Public API:
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, deterministic=False,
                    return_lse=False, seed=None, block_mask=None, allow_tf32=False) -> out | (out, lse)
    flash_attn_forward(q, k, v, *, dropout_p=0.0, softmax_scale=None, causal=False, seed=None,
                       block_mask=None, allow_tf32=False) -> AttnForward(out, lse, rng_state) (+ .options)
    flash_attn_backward(dout, q, k, v, out=None, lse=None, *, dropout_p, softmax_scale, causal, rng_state,
                        deterministic=False, block_mask, allow_tf32, forward=None) -> (dq, dk, dv)
        forward=fwd (the AttnForward) repeats the forward's options and checks every one given
        explicitly; without it the options default to 0.0, None, False, None, None, False as in flash-attn.
    flash_attn_qkvpacked_func(qkv, ...) / flash_attn_kvpacked_func(q, kv, ...): flash_attn_func on
        flash-attn's packed layouts (batch, seqlen, 3 | 2, heads, head_dim), as views.
    AttnOptions: the forward's options the backward repeats (AttnForward.options).
    BlockMask (flashcupy.blocksparse): an immutable block-sparse mask.
    flash_attn_varlen_func / flash_attn_varlen_forward / flash_attn_varlen_backward (flashcupy.varlen):
        packed sequences (total, nheads, head_dim) with int32 cu_seqlens, flash-attn's varlen API.
    flash_attn_with_kvcache: decoding over a contiguous or paged KV cache, appending in place.
    merge_attention(out_parts, lse_parts): the exact merge of partial results over disjoint key sets.
    flashcupy.reference: the NumPy float64 oracle (the specification).
Layout BSHD; see README.md for the conventions.
"""

from . import blocksparse, dropout, reference
from .blocksparse import BlockMask
from .interface import (AttnForward, AttnOptions, flash_attn_backward, flash_attn_forward, flash_attn_func,
                        flash_attn_kvpacked_func, flash_attn_qkvpacked_func)
from .varlen import (
    VarlenForward,
    VarlenOptions,
    flash_attn_varlen_backward,
    flash_attn_varlen_forward,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    merge_attention,
)

__version__ = "0.1.0"

__all__ = [
    "AttnForward",
    "AttnOptions",
    "BlockMask",
    "blocksparse",
    "dropout",
    "flash_attn_backward",
    "flash_attn_forward",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_backward",
    "flash_attn_varlen_forward",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "merge_attention",
    "reference",
    "VarlenForward",
    "VarlenOptions",
]
