"""Input validation, one place for every backend.

Every error names the argument, what was expected and what was got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._arrays import dtype_name, supported_dtypes


@dataclass(frozen=True)
class AttnShape:
    """The sizes of one attention problem, read off validated q and k."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    softmax_scale: float

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.nheads // self.nheads_k


def _check_rank4(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array (NumPy, CuPy or __dlpack__), got {type(x).__name__}")
    if len(x.shape) != 4:
        raise ValueError(f"{name}: expected rank 4 (batch, seqlen, nheads, head_dim), "
                         f"got shape {tuple(x.shape)}")


def check_qkv(q, k, v, softmax_scale=None, dropout_p=0.0) -> AttnShape:
    """Validate q, k, v and the scalar arguments; return the problem's sizes.

    Raises TypeError for wrong kinds or dtypes, ValueError for wrong shapes or values.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank4(name, x)
    if q.dtype not in supported_dtypes():
        raise TypeError(f"q: expected dtype in {[dtype_name(d) for d in supported_dtypes()]}, "
                        f"got {dtype_name(q.dtype)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({dtype_name(q.dtype)}), got {dtype_name(x.dtype)}")
    batch, seqlen_q, nheads, head_dim = (int(s) for s in q.shape)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if int(k.shape[0]) != batch:
        raise ValueError(f"k: expected batch {batch} (as q), got {int(k.shape[0])}")
    if int(k.shape[3]) != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} (as q), got {int(k.shape[3])}")
    if head_dim < 1:
        raise ValueError(f"q: expected head_dim >= 1, got {head_dim}")
    nheads_k = int(k.shape[2])
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(f"k: expected nheads_k dividing nheads={nheads} (MQA/GQA), got nheads_k={nheads_k}")
    if softmax_scale is None:
        scale = head_dim**-0.5
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"softmax_scale: expected a float, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"softmax_scale: expected a finite number >= 0, got {softmax_scale!r}")
    check_dropout_p(dropout_p)
    return AttnShape(batch, seqlen_q, int(k.shape[1]), nheads, nheads_k, head_dim, scale)


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating, np.integer)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return p


def check_like(name, x, shape, dtype, ref_name):
    """x must have the given shape and dtype (of the tensor named ref_name)."""
    _check_rank4(name, x) if len(shape) == 4 else None
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (as {ref_name}), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype_name(dtype)} (as {ref_name}), got {dtype_name(x.dtype)}")


def check_lse(lse, shape: AttnShape, dtype):
    expected = (shape.batch, shape.nheads, shape.seqlen_q)
    if not hasattr(lse, "shape") or tuple(lse.shape) != expected:
        got = tuple(lse.shape) if hasattr(lse, "shape") else type(lse).__name__
        raise ValueError(f"lse: expected shape {expected} (batch, nheads, seqlen_q), got {got}")
    if lse.dtype != dtype:
        raise TypeError(f"lse: expected dtype {dtype_name(dtype)}, got {dtype_name(lse.dtype)}")


def check_bool(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)
