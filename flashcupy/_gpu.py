"""Launch code of the fused fp16/bf16 kernels (cuda/): argument preparation, grid, launch.

Inputs are CuPy arrays already validated by flashcupy._validate. Launches go to CuPy's current
stream and nothing here synchronises with the host (CUDA-graph capture works).
"""

from __future__ import annotations

import math

import numpy as np

from ._build import debug, get_kernel
from ._configs import bwd_config, elem_name, fwd_config
from ._params import attn_params, convert_params, data_ptr

MAX_GRID_YZ = 65535


def _cp():
    import cupy

    return cupy


def _device_arch():
    """The current device as the choosers see it (flashcupy._device.DeviceInfo)."""
    from ._device import current_device_info

    return current_device_info()


def rows_aligned(x) -> bool:
    """Whether the kernels can read x's rows in place: last dimension contiguous, 16-byte aligned base
    and strides (every row a whole number of 16-byte chunks from an aligned start)."""
    return (x.strides[-1] == x.dtype.itemsize and data_ptr(x) % 16 == 0
            and all(s % 16 == 0 for s in x.strides[:-1]))


def zero_scale_inputs(xp, q, scale: float):
    """(q, scale) as every kernel family takes them: softmax_scale 0 makes every score 0, which the
    kernels get as zero q with scale 1, so masked scores stay -inf (0 * -inf would be NaN) and the score
    modifier (softcap, ALiBi), which divides by the scale, stays finite. Other scales: q, scale as given."""
    if scale == 0.0:
        return xp.zeros(q.shape, dtype=q.dtype), 1.0
    return q, scale


def kernel_ready(x, head_dim_padded: int):
    """x itself when the kernels can read it in place (rows_aligned, head_dim_padded columns);
    otherwise a contiguous copy, zero-padded to head_dim_padded columns. The copy is the documented
    cost of odd head dims and odd strides. The array module is x's own (CuPy; NumPy under the
    emulator)."""
    if rows_aligned(x) and x.shape[3] == head_dim_padded:
        return x
    xp = np if isinstance(x, np.ndarray) else _cp()
    out = xp.zeros(x.shape[:3] + (head_dim_padded,), dtype=x.dtype)
    out[..., : x.shape[3]] = x
    return out


def _check_grid(shape):
    if shape.nheads > MAX_GRID_YZ or shape.batch > MAX_GRID_YZ:
        raise ValueError(f"q: expected batch and nheads <= {MAX_GRID_YZ} for the GPU kernels, "
                         f"got batch={shape.batch}, nheads={shape.nheads}")


def _sparse_blocks(block_mask):
    return None if block_mask is None else (block_mask.block_q, block_mask.block_k)


def forward(q, k, v, shape, *, causal: bool, dropout=None, block_mask=None, config=None, features=None):
    """Fused forward. Returns (out like q, lse (batch, nheads, seqlen_q) float32).

    dropout: None, or (dropout_p, (seed, offset)) for the fused dropout of flashcupy.dropout;
    features: a flashcupy._features.Features or None (its FEAT_* bits pick the specialization)."""
    cp = _cp()
    feat = 0 if features is None else features.bits
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    q, scale = zero_scale_inputs(cp, q, shape.softmax_scale)
    q, k, v = (kernel_ready(x, d8) for x in (q, k, v))
    from . import _gpu_sm90

    if config is None:  # direct callers (flashcupy.interface passes its plan's config): the same choice
        config = _gpu_sm90.plan_config(shape.head_dim, _device_arch(), causal=causal, dropout=dropout is not None,
                                       sparse_blocks=_sparse_blocks(block_mask), features=feat)
    if isinstance(config, _gpu_sm90.Sm90FwdConfig):
        out, lse = _gpu_sm90.forward(q, k, v, shape, causal=causal, scale=scale, config=config, dropout=dropout,
                                     block_mask=block_mask, features=features)
    else:
        out, lse = _forward_mma(q, k, v, shape, causal, scale, d8, dropout, block_mask, config, features)
    if d8 != shape.head_dim:
        out = cp.ascontiguousarray(out[..., : shape.head_dim])
    return out, lse


def _forward_mma(q, k, v, shape, causal, scale, d8, dropout, block_mask, config, features=None, varlen=None):
    """The mma.sync forward on kernel-ready q, k, v (flashcupy._gpu.forward prepares them).
    varlen: None, or (cu_seqlens_q, cu_seqlens_k, seqused_k, batch, max_seqlen_q) for the FEAT_VARLEN
    kernel over one packed batch row (shape: that row's, forward_varlen): one CTA row per sequence."""
    cp = _cp()
    cfg = config or fwd_config(shape.head_dim, q.dtype, causal, _device_arch(), _sparse_blocks(block_mask))
    if cfg is None:  # flashcupy.interface plans first and never gets here; direct callers may
        raise RuntimeError(f"no fused fp16/bf16 forward fits {_device_arch()} for head_dim={shape.head_dim}")
    feat = 0 if features is None else features.bits
    seqs = {}
    grid = (math.ceil(shape.seqlen_q / cfg.block_m), shape.nheads, shape.batch)
    if varlen is not None:
        from ._features import FEAT_VARLEN

        cu_q, cu_k, used, batch, max_seqlen_q = varlen
        feat |= FEAT_VARLEN
        seqs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used)
        grid = (math.ceil(max_seqlen_q / cfg.block_m), shape.nheads, batch)
    name = cfg.kernel_name(elem_name(q.dtype), causal, dropout is not None, feat)
    debug(f"fwd {shape} -> {cfg}")
    kernel = get_kernel("flash_fwd.cu", name, cfg.smem_bytes)
    out = cp.empty(q.shape, dtype=q.dtype)
    lse = cp.empty((shape.batch, shape.nheads, shape.seqlen_q), dtype=cp.float32)
    p = attn_params(shape, head_dim=d8, scale=scale, causal=causal, dropout=dropout, block_mask=block_mask,
                    features=features, q=q, k=k, v=v, out=out, lse=lse, **seqs)
    if grid[0] and grid[2]:  # varlen with no query row launches nothing (out, lse are then empty)
        kernel(grid, (cfg.nthreads, 1, 1), (p,), shared_mem=cfg.smem_bytes)
    return out, lse


def forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, shape, *, causal: bool, features=None,
                   config=None):
    """The fused varlen forward (cuda/flash_fwd.cu with FEAT_VARLEN: flash_mask.cuh's seq_of), fp16 / bf16.

    q (total_q, nheads, head_dim), k, v (total_k, nheads_k, head_dim) on the device; cu_seqlens_q,
    cu_seqlens_k int32 (batch + 1,) and seqused_k int32 (batch,) or None, validated by the caller
    (flashcupy.varlen); shape: its AttnShape (batch, max_seqlen_q, max_seqlen_k, heads, softmax_scale).
    Returns (out like q, lse (nheads, total_q) float32). The mma.sync family on every GPU (no Hopper
    varlen kernel yet); no dropout or block mask (the caller keeps those on the chunked path)."""
    from ._validate import AttnShape

    cp = _cp()
    _check_grid(shape)
    packed = AttnShape(1, int(q.shape[0]), int(k.shape[0]), shape.nheads, shape.nheads_k, shape.head_dim,
                       shape.softmax_scale)
    d8 = -(-shape.head_dim // 8) * 8
    q4, scale = zero_scale_inputs(cp, q[None], shape.softmax_scale)
    q4, k4, v4 = (kernel_ready(x, d8) for x in (q4, k[None], v[None]))
    out, lse = _forward_mma(q4, k4, v4, packed, causal, scale, d8, None, None, config, features,
                            varlen=(cu_seqlens_q, cu_seqlens_k, seqused_k, shape.batch, shape.seqlen_q))
    out = out[0] if d8 == shape.head_dim else cp.ascontiguousarray(out[0, ..., : shape.head_dim])
    return out, lse[0]


def _launch_convert(src, dst, rows: int, group: int, scale: float):
    """dst (rows, nheads / group, d) Elem = scale * sum over each group of src (rows, nheads, d) float32."""
    elem = elem_name(dst.dtype)
    kernel = get_kernel("flash_bwd.cu", f"flash_bwd_convert_kernel<{elem}>", 0)
    n = dst.size // 2
    blocks = max(1, min(-(-n // 256), 4096))
    kernel((blocks,), (256,), (convert_params(src, dst, rows, group, scale),))


def backward(dout, q, k, v, out, lse, shape, *, causal: bool, deterministic: bool, dropout=None, block_mask=None,
             config=None, features=None):
    """Fused backward. Returns (dq, dk, dv) like q, k, v (dk, dv summed over each GQA group).
    features: as forward; a sink changes nothing here (lse carries it; dsinks come from
    flashcupy.interface), so the kernels take the other bits (backward_feat)."""
    cp = _cp()
    feat = backward_feat(features)
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    grad_scale = shape.softmax_scale
    q, score_scale = zero_scale_inputs(cp, q, shape.softmax_scale)  # as forward (lse was computed so)
    q, k, v, dout, out = (kernel_ready(x, d8) for x in (q, k, v, dout, out))
    lse = cp.ascontiguousarray(lse)
    from . import _gpu_sm90_bwd

    if config is None:  # direct callers (flashcupy.interface passes its plan's config): the same choice
        config = _gpu_sm90_bwd.plan_config(shape.head_dim, _device_arch(), causal=causal, dropout=dropout is not None,
                                           sparse_blocks=_sparse_blocks(block_mask), deterministic=deterministic,
                                           features=feat)
    if isinstance(config, _gpu_sm90_bwd.Sm90BwdConfig):
        dq, dk_rows, dv_rows = _gpu_sm90_bwd.backward(dout, q, k, v, out, lse, shape, causal=causal,
                                                      score_scale=score_scale, config=config, block_mask=block_mask,
                                                      deterministic=deterministic, features=features)
        return _finish_backward(dq, dk_rows, dv_rows, shape, d8)
    cfg = config or bwd_config(shape.head_dim, q.dtype, causal, _device_arch(), _sparse_blocks(block_mask))
    if cfg is None:
        raise RuntimeError(f"no fused fp16/bf16 backward fits {_device_arch()} for head_dim={shape.head_dim}")
    elem = elem_name(q.dtype)
    debug(f"bwd {shape} deterministic={deterministic} -> {cfg}")
    b, sq, sk, h, g = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads, shape.group

    delta = cp.empty((b, h, sq), dtype=cp.float32)
    write_dq = cfg.atomic_dq(deterministic, dropout is not None)
    dq_accum = cp.zeros((b, sq, h, d8), dtype=cp.float32) if write_dq else None
    kv_dtype = q.dtype if g == 1 else cp.float32  # GQA: per-query-head rows, summed below
    dk_rows = cp.empty((b, sk, h, d8), dtype=kv_dtype)
    dv_rows = cp.empty((b, sk, h, d8), dtype=kv_dtype)
    dq = cp.empty((b, sq, h, d8), dtype=q.dtype)
    drop = dropout is not None
    p = attn_params(shape, head_dim=d8, scale=score_scale, grad_scale=grad_scale, causal=causal, dropout=dropout,
                    block_mask=block_mask, dkv_fp32=g != 1, dq_atomic=write_dq, features=features, q=q, k=k, v=v,
                    out=out, dout=dout,
                    dq=dq, dk=dk_rows, dv=dv_rows, lse=lse, delta=delta, dq_accum=dq_accum)

    pre = get_kernel("flash_bwd.cu", f"flash_bwd_preprocess_kernel<{elem}>", 0)
    pre((math.ceil(sq / 4), h, b), (128, 1, 1), (p,))
    kernel = get_kernel("flash_bwd.cu", cfg.kernel_name(elem, causal, write_dq, drop, feat), cfg.smem_bytes)
    kernel((math.ceil(sk / cfg.block_n) * cfg.d_split, h, b), (cfg.nthreads, 1, 1), (p,), shared_mem=cfg.smem_bytes)
    if write_dq:
        _launch_convert(dq_accum, dq, b * sq, 1, grad_scale)
    else:
        dq_kernel = get_kernel("flash_bwd.cu", cfg.dq_kernel_name(elem, causal, drop, feat), cfg.dq_smem_bytes)
        dq_kernel((math.ceil(sq / cfg.dq_block_m), h, b), (cfg.dq_nthreads, 1, 1), (p,),
                  shared_mem=cfg.dq_smem_bytes)
    return _finish_backward(dq, dk_rows, dv_rows, shape, d8)


def backward_feat(features) -> int:
    """The FEAT_* bits of a backward kernel for features (a Features or None): FEAT_SINK dropped (the
    backward kernels read a sink only through lse)."""
    from ._features import FEAT_SINK

    return 0 if features is None else features.bits & ~FEAT_SINK


def _finish_backward(dq, dk_rows, dv_rows, shape, d8: int):
    """dk, dv from the per-query-head rows (GQA: float32, summed over each group), and the padding
    columns stripped: the last step of every fp16/bf16 backward."""
    cp = _cp()
    g = shape.group
    if g == 1:
        dk, dv = dk_rows, dv_rows
    else:
        b, sk = shape.batch, shape.seqlen_k
        dk = cp.empty((b, sk, shape.nheads_k, d8), dtype=dq.dtype)
        dv = cp.empty_like(dk)
        _launch_convert(dk_rows, dk, b * sk, g, 1.0)
        _launch_convert(dv_rows, dv, b * sk, g, 1.0)
    if d8 != shape.head_dim:
        dq, dk, dv = (cp.ascontiguousarray(x[..., : shape.head_dim]) for x in (dq, dk, dv))
    return dq, dk, dv
