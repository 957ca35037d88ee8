"""Launch code of the float32 / float64 kernels: on CUDA cores (cuda/flash_simt_fwd.cu,
cuda/flash_simt_bwd.cu) and, on sm_80+, float64 on the FP64 tensor cores and float32 with allow_tf32
on the TF32 tensor cores (cuda/flash_dmma_fwd.cu, cuda/flash_dmma_bwd.cu): argument preparation,
grids, launches. flashcupy._configs.float_fwd_config / float_bwd_config choose the family and the tiles.

Inputs are CuPy arrays already validated by flashcupy._validate (float32 or float64, head_dim <= 256).
Launches go to CuPy's current stream and nothing here synchronises with the host (CUDA-graph
capture works). Exact arithmetic in the input precision (FFMA / DFMA / DMMA) unless allow_tf32 is
given for float32: then the products take TF32 operands (10-bit mantissa, float32 accumulation).
LSE is float32 for float32 inputs and float64 for float64 (flashcupy._arrays.lse_dtype).

Every kernel takes one AttnParams record (cuda/flash_params.cuh, built by flashcupy._params.attn_params):
pointers, strides, sizes, the scales (the kernels take ScaleOf<T>: base-e for float64, base-2 for
float32), the mask. Array creation goes through _xp(), launches through _launch() and the device's
architecture comes from _arch(), so the same glue can be driven by another array module and launcher
(a CPU emulator of the kernels, bench/simt_emu).
"""

from __future__ import annotations

import math

from ._build import debug, get_kernel
from ._configs import SIMT_PREPROCESS_THREADS, float_bwd_config, float_fwd_config
from ._gpu import _check_grid, kernel_ready, zero_scale_inputs
from ._params import attn_params

PREPROCESS_SOURCE = "flash_simt_bwd.cu"  # flash_simt_bwd_preprocess_kernel serves both families


def _xp():
    import cupy

    return cupy


def _arch() -> int:
    """Compute capability of the current device as an int (80, 90, ...)."""
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def _launch(filename: str, name: str, smem_bytes: int, grid, block, params) -> None:
    """Launch kernel `name` of cuda/<filename> with its one argument, the AttnParams record params."""
    kernel = get_kernel(filename, name, smem_bytes)
    kernel(grid, block, (params,), shared_mem=smem_bytes)


def path_name(dtype, head_dim: int, allow_tf32: bool = False) -> str:
    """The forward's kernel family on the current GPU, as flashcupy.interface.kernel_path names it."""
    from ._configs import DmmaFwdConfig

    cfg = float_fwd_config(head_dim, dtype, False, _arch(), allow_tf32)
    if not isinstance(cfg, DmmaFwdConfig):
        return "fused fp32/fp64 (CUDA cores)"
    return "fused fp32 (TF32 tensor cores)" if cfg.elem == "float" else "fused fp64 (FP64 tensor cores)"


def forward(q, k, v, shape, *, causal: bool, allow_tf32: bool = False, config=None, features=None):
    """Fused float32 / float64 forward. Returns (out like q, lse (batch, nheads, seqlen_q) of q's dtype).
    allow_tf32: float32 on sm_80+ runs on the TF32 tensor cores; config overrides the chooser;
    features: a flashcupy._features.Features or None (its FEAT_* bits pick the specialization)."""
    xp = _xp()
    feat = 0 if features is None else features.bits
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    q, scale = zero_scale_inputs(xp, q, shape.softmax_scale)
    q, k, v = (kernel_ready(x, d8) for x in (q, k, v))
    cfg = config or float_fwd_config(shape.head_dim, q.dtype, causal, _arch(), allow_tf32)
    debug(f"fp32/fp64 fwd {shape} -> {cfg}")
    out = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((shape.batch, shape.nheads, shape.seqlen_q), dtype=q.dtype)
    grid = (math.ceil(shape.seqlen_q / cfg.block_m), shape.nheads, shape.batch)
    p = attn_params(shape, head_dim=d8, scale=scale, grad_scale=shape.softmax_scale, causal=causal,
                    features=features, q=q, k=k, v=v, out=out, lse=lse)
    _launch(cfg.source, cfg.kernel_name(feat), cfg.smem_bytes, grid, (cfg.nthreads, 1, 1), p)
    if d8 != shape.head_dim:
        out = xp.ascontiguousarray(out[..., : shape.head_dim])
    return out, lse


def backward(dout, q, k, v, out, lse, shape, *, causal: bool, deterministic: bool, allow_tf32: bool = False,
             config=None, features=None):
    """Fused float32 / float64 backward. Returns (dq, dk, dv) like q, k, v; dk, dv summed over GQA groups.

    SIMT: deterministic=False accumulates dQ with atomicAdd inside the key/value kernel (summation
    order varies run to run); deterministic=True computes dQ in a second, query-outer kernel instead
    (bitwise reproducible; recomputes S and dP, 7 instead of 5 matrix products). The tensor-core
    kernels (float64 on sm_80+, float32 with allow_tf32 on sm_80+) always take the second way:
    bitwise reproducible either way. features: as forward (a sink only through lse: backward_feat).
    """
    from ._gpu import backward_feat
    from ._features import FEAT_ALIBI, FEAT_SOFTCAP

    xp = _xp()
    _check_grid(shape)
    feat = backward_feat(features)
    d8 = -(-shape.head_dim // 8) * 8
    scale = shape.softmax_scale  # 0 needs no special case: masked P is selected to 0, not computed
    if feat & (FEAT_SOFTCAP | FEAT_ALIBI):  # except for the score modifier, which divides by it: as forward
        q, scale = zero_scale_inputs(xp, q, scale)
    dtype = q.dtype
    q, k, v, dout, out = (kernel_ready(x, d8) for x in (q, k, v, dout, out))
    lse = xp.ascontiguousarray(lse)
    cfg = config or float_bwd_config(shape.head_dim, dtype, causal, _arch(), allow_tf32)
    debug(f"fp32/fp64 bwd {shape} deterministic={deterministic} -> {cfg}")
    dq_kernel = deterministic or cfg.dq_kernel_always
    b, sq, sk, h = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads

    lse_exp = xp.empty((b, h, sq), dtype=dtype)  # the LSE in the kernels' exp base (+inf: no visible key)
    delta = xp.empty((b, h, sq), dtype=dtype)    # D = rowsum(dO o O)
    # dQ: zeroed for the KV kernel's atomics; written whole by a dQ kernel
    dq = (xp.empty if dq_kernel else xp.zeros)((b, sq, h, d8), dtype=dtype)
    # one dK, dV slice per query head; summed over each group below (GQA)
    dk = xp.empty((b, sk, h, d8), dtype=dtype)
    dv = xp.empty((b, sk, h, d8), dtype=dtype)
    # dq_atomic: the SIMT KV kernel adds dQ by atomics (the DMMA KV kernel never does)
    p = attn_params(shape, head_dim=d8, scale=scale, grad_scale=shape.softmax_scale, causal=causal,
                    dq_atomic=not dq_kernel, features=features, q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk,
                    dv=dv, lse=lse, delta=delta, lse_exp=lse_exp)

    _launch(PREPROCESS_SOURCE, cfg.preprocess_kernel_name(), 0, (math.ceil(sq / (SIMT_PREPROCESS_THREADS // 32)), h, b),
            (SIMT_PREPROCESS_THREADS, 1, 1), p)
    _launch(cfg.source, cfg.kv_kernel_name(feat), cfg.kv_smem_bytes, (cfg.kv_grid_x(sk), h, b), (cfg.kv_nthreads, 1, 1), p)
    if dq_kernel:
        _launch(cfg.source, cfg.dq_kernel_name(feat), cfg.dq_smem_bytes, (cfg.dq_grid_x(sq), h, b),
                (cfg.dq_nthreads, 1, 1), p)

    if shape.group > 1:  # fixed summation order: deterministic
        dk = dk.reshape(b, sk, shape.nheads_k, shape.group, d8).sum(axis=3)
        dv = dv.reshape(b, sk, shape.nheads_k, shape.group, d8).sum(axis=3)
    if d8 != shape.head_dim:
        dq, dk, dv = (xp.ascontiguousarray(x[..., : shape.head_dim]) for x in (dq, dk, dv))
    return dq, dk, dv
