"""Launch code of the float32 / float64 kernels: on CUDA cores (cuda/flash_simt_fwd.cu,
cuda/flash_simt_bwd.cu) and, on sm_80+, float64 on the FP64 tensor cores and float32 with allow_tf32
on the TF32 tensor cores (cuda/flash_dmma_fwd.cu, cuda/flash_dmma_bwd.cu): argument preparation,
grids, launches. flashcupy._configs.float_fwd_config / float_bwd_config choose the family and the tiles.

Inputs are CuPy arrays already validated by flashcupy._validate (float32 or float64, head_dim <= 256).
Launches go to CuPy's current stream and nothing here synchronises with the host (CUDA-graph
capture works). Exact arithmetic in the input precision (FFMA / DFMA / DMMA) unless allow_tf32 is
given for float32: then the products take TF32 operands (10-bit mantissa, float32 accumulation).
LSE is float32 for float32 inputs and float64 for float64 (flashcupy._arrays.lse_dtype).

Array creation goes through _xp(), launches through _launch() and the device's architecture comes
from _arch(), so the same glue can be driven by another array module and launcher (a CPU emulator
of the kernels).
"""

from __future__ import annotations

import math

import numpy as np

from ._build import debug, get_kernel
from ._gpu import _check_grid, _strides, data_ptr as _data_ptr, kernel_ready
from ._configs import SIMT_PREPROCESS_THREADS, float_bwd_config, float_fwd_config

PREPROCESS_SOURCE = "flash_simt_bwd.cu"  # flash_simt_bwd_preprocess_kernel serves both families


def _xp():
    import cupy

    return cupy


def _arch() -> int:
    """Compute capability of the current device as an int (80, 90, ...)."""
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def _launch(filename: str, name: str, smem_bytes: int, grid, block, args) -> None:
    kernel = get_kernel(filename, name, smem_bytes)
    kernel(grid, block, args, shared_mem=smem_bytes)


def path_name(dtype, head_dim: int, allow_tf32: bool = False) -> str:
    """The forward's kernel family on the current GPU, as flashcupy.interface.kernel_path names it."""
    from ._configs import DmmaFwdConfig

    cfg = float_fwd_config(head_dim, dtype, False, _arch(), allow_tf32)
    if not isinstance(cfg, DmmaFwdConfig):
        return "fused fp32/fp64 (CUDA cores)"
    return "fused fp32 (TF32 tensor cores)" if cfg.elem == "float" else "fused fp64 (FP64 tensor cores)"


def _scalar_type(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _scale_exp(dtype, scale: float) -> float:
    """The factor of the scores inside the kernels' exp: float32 works in base 2 (exp2), float64 in base e."""
    return scale if np.dtype(dtype) == np.float64 else scale * math.log2(math.e)


def forward(q, k, v, shape, *, causal: bool, allow_tf32: bool = False, config=None):
    """Fused float32 / float64 forward. Returns (out like q, lse (batch, nheads, seqlen_q) of q's dtype).
    allow_tf32: float32 on sm_80+ runs on the TF32 tensor cores; config overrides the chooser."""
    xp = _xp()
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    scale = shape.softmax_scale
    if scale == 0.0:
        # All scores are 0: feed zeros with scale 1, so masked scores stay -inf (0 * -inf would be NaN).
        q, scale = xp.zeros(q.shape, dtype=q.dtype), 1.0
    q, k, v = (kernel_ready(x, d8) for x in (q, k, v))
    cfg = config or float_fwd_config(shape.head_dim, q.dtype, causal, _arch(), allow_tf32)
    debug(f"fp32/fp64 fwd {shape} -> {cfg}")
    f = _scalar_type(q.dtype)
    out = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((shape.batch, shape.nheads, shape.seqlen_q), dtype=q.dtype)
    grid = (math.ceil(shape.seqlen_q / cfg.block_m), shape.nheads, shape.batch)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            np.int32(shape.seqlen_q), np.int32(shape.seqlen_k), np.int32(shape.nheads),
            np.int32(shape.group), np.int32(d8), f(scale), f(_scale_exp(q.dtype, scale)), np.int32(causal))
    _launch(cfg.source, cfg.kernel_name(), cfg.smem_bytes, grid, (cfg.nthreads, 1, 1), args)
    if d8 != shape.head_dim:
        out = xp.ascontiguousarray(out[..., : shape.head_dim])
    return out, lse


def backward(dout, q, k, v, out, lse, shape, *, causal: bool, deterministic: bool, allow_tf32: bool = False,
             config=None):
    """Fused float32 / float64 backward. Returns (dq, dk, dv) like q, k, v; dk, dv summed over GQA groups.

    SIMT: deterministic=False accumulates dQ with atomicAdd inside the key/value kernel (summation
    order varies run to run); deterministic=True computes dQ in a second, query-outer kernel instead
    (bitwise reproducible; recomputes S and dP, 7 instead of 5 matrix products). The tensor-core
    kernels (float64 on sm_80+, float32 with allow_tf32 on sm_80+) always take the second way:
    bitwise reproducible either way.
    """
    xp = _xp()
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    scale = shape.softmax_scale  # 0 needs no special case: masked P is selected to 0, not computed
    dtype = q.dtype
    q, k, v, dout, out = (kernel_ready(x, d8) for x in (q, k, v, dout, out))
    lse = xp.ascontiguousarray(lse)
    cfg = config or float_bwd_config(shape.head_dim, dtype, causal, _arch(), allow_tf32)
    debug(f"fp32/fp64 bwd {shape} deterministic={deterministic} -> {cfg}")
    dq_kernel = deterministic or cfg.dq_kernel_always
    f = _scalar_type(dtype)
    b, sq, sk, h = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads

    # D = rowsum(dO o O) and the LSE in the kernels' exp base (+inf on rows with no visible key)
    lse_exp = xp.empty((b, h, sq), dtype=dtype)
    delta = xp.empty((b, h, sq), dtype=dtype)
    _launch(PREPROCESS_SOURCE, cfg.preprocess_kernel_name(), 0, (math.ceil(sq / (SIMT_PREPROCESS_THREADS // 32)), h, b),
            (SIMT_PREPROCESS_THREADS, 1, 1),
            (dout, out, lse, lse_exp, delta, *_strides(dout), *_strides(out), np.int32(sq), np.int32(h),
             np.int32(d8), f(_scale_exp(dtype, 1.0))))

    dq = (xp.empty if dq_kernel else xp.zeros)((b, sq, h, d8), dtype=dtype)
    # one dK, dV slice per query head; summed over each group below (GQA)
    dk = xp.empty((b, sk, h, d8), dtype=dtype)
    dv = xp.empty((b, sk, h, d8), dtype=dtype)
    qkvdo = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    sizes = (np.int32(sq), np.int32(sk), np.int32(h), np.int32(shape.group), np.int32(d8), f(scale),
             f(_scale_exp(dtype, scale)))
    kv_grid = (cfg.kv_grid_x(sk), h, b)
    if cfg.dq_kernel_always:  # DMMA: the KV kernel has no dQ arguments
        kv_args = (q, k, v, dout, lse_exp, delta, dk, dv, *qkvdo, *_strides(dk), *sizes, np.int32(causal))
    else:
        kv_args = (q, k, v, dout, lse_exp, delta, dq, dk, dv, *qkvdo, *_strides(dq), *_strides(dk), *sizes,
                   np.int32(causal), np.int32(not dq_kernel))
    _launch(cfg.source, cfg.kv_kernel_name(), cfg.kv_smem_bytes, kv_grid, (cfg.kv_nthreads, 1, 1), kv_args)
    if dq_kernel:
        _launch(cfg.source, cfg.dq_kernel_name(), cfg.dq_smem_bytes, (cfg.dq_grid_x(sq), h, b),
                (cfg.dq_nthreads, 1, 1),
                (q, k, v, dout, lse_exp, delta, dq, *qkvdo, *_strides(dq), *sizes, np.int32(causal)))

    if shape.group > 1:  # fixed summation order: deterministic
        dk = dk.reshape(b, sk, shape.nheads_k, shape.group, d8).sum(axis=3)
        dv = dv.reshape(b, sk, shape.nheads_k, shape.group, d8).sum(axis=3)
    if d8 != shape.head_dim:
        dq, dk, dv = (xp.ascontiguousarray(x[..., : shape.head_dim]) for x in (dq, dk, dv))
    return dq, dk, dv
