"""Public attention functions: flash_attn_func, flash_attn_forward, flash_attn_backward.

Where a call runs:
- NumPy inputs run on the CPU (the chunked exact path) and return NumPy. float32 and float64
  compute in their own precision; float16 and bfloat16 compute in float32 and return their own
  dtype. Exception: NumPy float64 with head_dim <= 256 runs the fused float64 kernel when a GPU is
  usable (copied there and back; NUMPY_FLOAT64_ON_GPU = False keeps it on the CPU).
- CuPy inputs, and any GPU array with __dlpack__ / __cuda_array_interface__ (torch, JAX; converted
  zero-copy by cupy.from_dlpack), run on the current CuPy device and stream and return CuPy arrays.
  float16 / bfloat16 with head_dim <= 256 run the fused FlashAttention-2 kernels (cuda/; dropout and
  block masks fused too). float32 runs fused kernels on CUDA cores (exact FFMA, no TF32), or with
  allow_tf32=True on sm_80+ on the TF32 tensor cores (mma.sync m16n8k8 .tf32); float64 runs on the
  FP64 tensor cores on sm_80+ (mma.sync .f64; CUDA cores before sm_80 and for the backward above
  head_dim 160): flashcupy._gpu_simt. float32 / float64 with dropout or a block mask, and
  head_dim > 256, run the chunked path on the GPU (exact, O(N) memory, not fused; allow_tf32 unused).
No call synchronises with the host, so GPU calls can be captured into a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _chunked, dropout
from ._arrays import array_module, cupy_or_none, gpu_available, is_half, lse_dtype
from ._validate import AttnShape, check_bool, check_like, check_lse, check_qkv


class AttnForward(NamedTuple):
    """What flash_attn_forward returns: everything flash_attn_backward needs besides q, k, v."""

    out: object  # (batch, seqlen_q, nheads, head_dim), dtype of q
    lse: object  # (batch, nheads, seqlen_q), float32 (float64 for float64 inputs); -inf on empty rows
    rng_state: object  # dropout (seed, offset), or None without dropout


MAX_KERNEL_HEAD_DIM = 256


def _use_kernels(xp, dtype, shape: AttnShape) -> bool:
    return xp is not np and is_half(dtype) and shape.head_dim <= MAX_KERNEL_HEAD_DIM


# NumPy float64 inputs run the fused float64 kernel when a GPU is usable; False keeps them on the CPU.
NUMPY_FLOAT64_ON_GPU = True


def _use_simt(xp, dtype, shape: AttnShape) -> bool:
    return xp is not np and np.dtype(dtype) in (np.float32, np.float64) and shape.head_dim <= MAX_KERNEL_HEAD_DIM


def _numpy_float64_to_gpu(xp, dtype, shape: AttnShape) -> bool:
    return (xp is np and NUMPY_FLOAT64_ON_GPU and np.dtype(dtype) == np.float64
            and shape.head_dim <= MAX_KERNEL_HEAD_DIM and gpu_available())


def kernel_path(dtype, head_dim: int, *, on_gpu: bool, dropout_p: float = 0.0, block_mask=None,
                allow_tf32: bool = False) -> str:
    """Which implementation a call runs: "fused fp16/bf16 (tensor cores)", "fused fp32/fp64 (CUDA cores)",
    "fused fp64 (FP64 tensor cores)", "fused fp32 (TF32 tensor cores)", "NumPy chunked path" or
    "chunked path on the GPU". NumPy float64 inputs count as on_gpu=False here; with a usable GPU they
    run the float64 kernel (NUMPY_FLOAT64_ON_GPU)."""
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    xp = (cupy_or_none() or np) if on_gpu else np
    shape = AttnShape(1, 1, 1, 1, 1, int(head_dim), 1.0)
    if on_gpu and _use_kernels(xp, dtype, shape):
        return "fused fp16/bf16 (tensor cores)"
    if on_gpu and _use_simt(xp, dtype, shape) and not dropout_p and block_mask is None:
        from . import _gpu_simt

        return _gpu_simt.path_name(dtype, head_dim, allow_tf32)
    return "chunked path on the GPU" if on_gpu else "NumPy chunked path"


def _chunked_dropout(xp, shape, dropout_p, rng_state):
    """keep_fn and the (rounded) dropout_p of flashcupy.dropout for the chunked path; (None, 0) without."""
    if not dropout_p:
        return None, 0.0
    seed, offset = rng_state

    def keep_fn(i0, i1):
        return dropout.keep_mask(seed, offset, shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k,
                                 dropout_p, rows=(i0, i1), xp=xp)

    return keep_fn, dropout.effective_dropout_p(dropout_p)


def _check_block_mask(block_mask, shape):
    if block_mask is None:
        return None
    from .blocksparse import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected a flashcupy.blocksparse.BlockMask or None, got {type(block_mask).__name__}")
    block_mask.check(shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k)
    return block_mask


def _visible_fn(xp, shape, block_mask):
    """The chunked path's element visibility of rows [i0, i1) under a block mask (None: all visible)."""
    if block_mask is None:
        return None
    return lambda i0, i1: block_mask.element_mask(shape.seqlen_q, shape.seqlen_k, rows=(i0, i1), xp=xp)


def flash_attn_forward(q, k, v, *, dropout_p=0.0, softmax_scale=None, causal=False, seed=None,
                       block_mask=None, allow_tf32=False) -> AttnForward:
    """Attention forward returning the output and the logsumexp the backward needs.

    Args:
        q: (batch, seqlen_q, nheads, head_dim); float16, bfloat16, float32 or float64.
        k, v: (batch, seqlen_k, nheads_k, head_dim), dtype of q; nheads % nheads_k == 0 (MQA/GQA).
            Any strides; a last dimension with stride != 1 is copied once on the GPU path.
        dropout_p: probability of dropping an attention weight, in [0, 1), rounded to a multiple
            of 2^-16; kept weights are scaled by 1 / (1 - p). The keep-mask is a pure function of
            (seed, offset, b, h, i, j): flashcupy.dropout.keep_mask regenerates it exactly.
        softmax_scale: scale of q k^T before the softmax (>= 0); default head_dim ** -0.5.
        causal: mask keys after each query, aligned bottom-right when seqlen_q != seqlen_k (as
            flash-attn >= 2.1): query i sees key j iff j <= i + seqlen_k - seqlen_q. Rows that see
            no key (i < seqlen_q - seqlen_k) give out 0 and lse -inf.
        seed: dropout only: an int seed (offset 0) or a (seed, offset) pair; default: the library
            generator's next state (flashcupy.dropout.manual_seed makes runs reproducible).
        block_mask: a flashcupy.blocksparse.BlockMask: only its active (query block, key block)
            tiles are computed (FlashAttention Sec. 3.3); combines with causal and dropout. Rows whose
            blocks are all inactive give out 0 and lse -inf.
        allow_tf32: float32 on the GPU only (other dtypes and the CPU ignore it): True lets the
            products q k^T and P v run on the TF32 tensor cores (sm_80+, head_dim <= 256, no
            dropout, no block mask; elsewhere the exact path runs). Their operands are rounded to
            TF32 (10-bit mantissa, round to nearest, ties away), so out carries relative errors of
            ~1e-3 (float16's order) instead of float32's ~1e-7; accumulation and softmax stay in
            float32. Several times faster than the exact float32 kernel. Default False: exact FFMA.

    Returns:
        AttnForward(out, lse, rng_state): out like q; lse (batch, nheads, seqlen_q) natural-log
        logsumexp of the scaled scores (of the softmax before dropout), float32 (float64 for float64
        inputs); rng_state the dropout (seed, offset) to give the backward, None without dropout.

    Raises:
        TypeError: non-array inputs, unsupported or mismatched dtypes, host and device arrays mixed.
        ValueError: wrong ranks or shapes, nheads not a multiple of nheads_k, bad scalars.

    Source: FlashAttention-2 forward (arXiv 2307.08691, Algorithm 1); see flashcupy.reference.
    """
    xp, (q, k, v) = array_module(q=q, k=k, v=v)
    shape = check_qkv(q, k, v, softmax_scale, dropout_p)
    causal = check_bool("causal", causal)
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    block_mask = _check_block_mask(block_mask, shape)
    dropout_p = float(dropout_p)
    rng_state = None
    if dropout_p > 0:
        rng_state = dropout.default_generator.next_state() if seed is None else dropout.check_rng_state("seed", seed)
    if shape.batch * shape.nheads * shape.seqlen_q == 0 or shape.seqlen_k == 0:
        out = xp.zeros(q.shape, dtype=q.dtype)
        lse = xp.full((shape.batch, shape.nheads, shape.seqlen_q), -np.inf, dtype=lse_dtype(q.dtype))
        return AttnForward(out, lse, rng_state)
    if _numpy_float64_to_gpu(xp, q.dtype, shape):  # NumPy float64 -> float64 kernel -> NumPy
        cp = cupy_or_none()
        res = flash_attn_forward(*(cp.asarray(x) for x in (q, k, v)), dropout_p=dropout_p,
                                 softmax_scale=softmax_scale, causal=causal, seed=rng_state, block_mask=block_mask,
                                 allow_tf32=allow_tf32)
        return AttnForward(res.out.get(), res.lse.get(), res.rng_state)
    if _use_kernels(xp, q.dtype, shape):
        from . import _gpu

        out, lse = _gpu.forward(q, k, v, shape, causal=causal, block_mask=block_mask,
                                dropout=(dropout_p, rng_state) if dropout_p > 0 else None)
    elif _use_simt(xp, q.dtype, shape) and dropout_p == 0 and block_mask is None:
        from . import _gpu_simt

        out, lse = _gpu_simt.forward(q, k, v, shape, causal=causal, allow_tf32=allow_tf32)
    else:
        keep_fn, p_eff = _chunked_dropout(xp, shape, dropout_p, rng_state)
        out, lse = _chunked.forward(q, k, v, shape, causal=causal, visible_fn=_visible_fn(xp, shape, block_mask),
                                    keep_fn=keep_fn, dropout_p=p_eff, xp=xp)
    return AttnForward(out, lse, rng_state)


def flash_attn_backward(dout, q, k, v, out, lse, *, dropout_p=0.0, softmax_scale=None, causal=False,
                        rng_state=None, deterministic=False, block_mask=None, allow_tf32=False):
    """Gradients of attention with respect to q, k and v, recomputing P from lse.

    Args:
        dout: gradient of the loss with respect to out, shape and dtype of q; any strides.
        q, k, v, out, lse: the forward's inputs and outputs (see flash_attn_forward).
        dropout_p, softmax_scale, causal, block_mask: as given to the forward.
        rng_state: the forward's rng_state (dropout only).
        deterministic: bitwise-reproducible gradients on the GPU (the CPU path always is).
        allow_tf32: as flash_attn_forward: float32 gradients from the TF32 tensor cores (all five
            products take TF32 operands; relative errors ~1e-3). Always bitwise reproducible there.

    Returns:
        (dq, dk, dv) shaped and typed like q, k, v; dk and dv are summed over the query heads of a
        group (MQA/GQA). Rows with no visible key contribute nothing.

    Raises: as flash_attn_forward, plus ValueError/TypeError for a dout, out or lse that does not
    match the forward.

    Source: FlashAttention backward (arXiv 2205.14135, Algorithm 4; arXiv 2307.08691, Algorithm 2).
    """
    xp, (dout, q, k, v, out, lse) = array_module(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    shape = check_qkv(q, k, v, softmax_scale, dropout_p)
    check_like("dout", dout, q.shape, q.dtype, "q")
    check_like("out", out, q.shape, q.dtype, "q")
    check_lse(lse, shape, lse_dtype(q.dtype))
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    block_mask = _check_block_mask(block_mask, shape)
    dropout_p = float(dropout_p)
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("rng_state: expected the forward's rng_state (seed, offset) when dropout_p > 0, got None")
        rng_state = dropout.check_rng_state("rng_state", rng_state)
    if shape.batch * shape.nheads * shape.seqlen_q == 0 or shape.seqlen_k == 0:
        return xp.zeros(q.shape, q.dtype), xp.zeros(k.shape, k.dtype), xp.zeros(v.shape, v.dtype)
    if _numpy_float64_to_gpu(xp, q.dtype, shape):  # NumPy float64 -> float64 kernels -> NumPy
        cp = cupy_or_none()
        grads = flash_attn_backward(*(cp.asarray(x) for x in (dout, q, k, v, out, lse)), dropout_p=dropout_p,
                                    softmax_scale=softmax_scale, causal=causal, rng_state=rng_state,
                                    deterministic=deterministic, block_mask=block_mask, allow_tf32=allow_tf32)
        return tuple(g.get() for g in grads)
    if _use_kernels(xp, q.dtype, shape):
        from . import _gpu

        return _gpu.backward(dout, q, k, v, out, lse, shape, causal=causal, deterministic=deterministic,
                             dropout=(dropout_p, rng_state) if dropout_p > 0 else None, block_mask=block_mask)
    if _use_simt(xp, q.dtype, shape) and dropout_p == 0 and block_mask is None:
        from . import _gpu_simt

        return _gpu_simt.backward(dout, q, k, v, out, lse, shape, causal=causal, deterministic=deterministic,
                                  allow_tf32=allow_tf32)
    keep_fn, p_eff = _chunked_dropout(xp, shape, dropout_p, rng_state)
    return _chunked.backward(dout, q, k, v, out, lse, shape, causal=causal, visible_fn=_visible_fn(xp, shape, block_mask),
                             keep_fn=keep_fn, dropout_p=p_eff, xp=xp)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, deterministic=False,
                    return_lse=False, seed=None, block_mask=None, allow_tf32=False):
    """Exact attention softmax(q k^T * softmax_scale) v, computed without storing the attention matrix.

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim). Arguments
    and errors as flash_attn_forward. Returns out (like q), or (out, lse) when return_lse is True.
    For gradients use flash_attn_forward / flash_attn_backward, or the tape (flashcupy.tape).
    NumPy in -> NumPy out (CPU); CuPy / __dlpack__ in -> CuPy out (GPU), on the current stream.
    """
    check_bool("deterministic", deterministic)
    res = flash_attn_forward(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, seed=seed,
                             block_mask=block_mask, allow_tf32=allow_tf32)
    return (res.out, res.lse) if return_lse else res.out
