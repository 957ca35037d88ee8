"""Launch code of the fused fp16/bf16 kernels (cuda/): argument preparation, grid, launch.

Inputs are CuPy arrays already validated by flashcupy._validate. Launches go to CuPy's current
stream and nothing here synchronises with the host (CUDA-graph capture works).
"""

from __future__ import annotations

import math

import numpy as np

from ._build import debug, get_kernel
from ._configs import elem_name, fwd_config

MAX_GRID_YZ = 65535


def _cp():
    import cupy

    return cupy


def _device_arch() -> int:
    return int(_cp().cuda.Device().compute_capability)


def kernel_ready(x, head_dim_padded: int):
    """x itself when the kernels can read it in place (last dim contiguous, 16-byte aligned base
    and strides, head_dim a multiple of 8); otherwise a contiguous copy, zero-padded to
    head_dim_padded columns. The copy is the documented cost of odd head dims and odd strides."""
    cp = _cp()
    itemsize = x.dtype.itemsize
    aligned = (
        x.strides[3] == itemsize
        and x.data.ptr % 16 == 0
        and all(s % 16 == 0 for s in x.strides[:3])
        and x.shape[3] == head_dim_padded
    )
    if aligned:
        return x
    out = cp.zeros(x.shape[:3] + (head_dim_padded,), dtype=x.dtype)
    out[..., : x.shape[3]] = x
    return out


def _strides(x):
    """(batch, row, head) strides in elements, as int64."""
    it = x.dtype.itemsize
    return [np.int64(s // it) for s in x.strides[:3]]


def _check_grid(shape):
    if shape.nheads > MAX_GRID_YZ or shape.batch > MAX_GRID_YZ:
        raise ValueError(f"q: expected batch and nheads <= {MAX_GRID_YZ} for the GPU kernels, "
                         f"got batch={shape.batch}, nheads={shape.nheads}")


def forward(q, k, v, shape, *, causal: bool, config=None):
    """Fused forward. Returns (out like q, lse (batch, nheads, seqlen_q) float32)."""
    cp = _cp()
    _check_grid(shape)
    d8 = -(-shape.head_dim // 8) * 8
    scale = shape.softmax_scale
    if scale == 0.0:
        # All scores are 0: feed zeros with scale 1, so masked scores stay -inf (0 * -inf would be NaN).
        q, scale = cp.zeros(q.shape, dtype=q.dtype), 1.0
    q, k, v = (kernel_ready(x, d8) for x in (q, k, v))
    cfg = config or fwd_config(shape.head_dim, q.dtype, causal, _device_arch())
    name = cfg.kernel_name(elem_name(q.dtype), causal)
    debug(f"fwd {shape} -> {cfg}")
    kernel = get_kernel("flash_fwd.cu", name, cfg.smem_bytes)
    out = cp.empty(q.shape, dtype=q.dtype)
    lse = cp.empty((shape.batch, shape.nheads, shape.seqlen_q), dtype=cp.float32)
    grid = (math.ceil(shape.seqlen_q / cfg.block_m), shape.nheads, shape.batch)
    args = (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            np.int32(shape.seqlen_q), np.int32(shape.seqlen_k), np.int32(shape.nheads),
            np.int32(shape.group), np.int32(d8), np.float32(scale), np.float32(scale * math.log2(math.e)))
    kernel(grid, (cfg.nthreads, 1, 1), args, shared_mem=cfg.smem_bytes)
    if d8 != shape.head_dim:
        out = cp.ascontiguousarray(out[..., : shape.head_dim])
    return out, lse
