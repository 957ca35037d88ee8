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


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_window(window_size) -> tuple:
    """window_size: a pair (left, right) of ints >= -1 (-1: that side unbounded). Returns a tuple of ints."""
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints >= -1, got {window_size!r}")
    if not all(_is_int(w) for w in window_size):
        raise TypeError(f"window_size: expected a pair (left, right) of ints >= -1, got "
                        f"({', '.join(type(w).__name__ for w in window_size)}) {tuple(window_size)!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size: expected ints >= -1 (-1: unbounded), got ({left}, {right})")
    return left, right


def check_softcap(softcap) -> float:
    """softcap: a finite float >= 0 (0: off)."""
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.floating, np.integer)):
        raise TypeError(f"softcap: expected a float >= 0 (0: off), got {type(softcap).__name__}")
    value = float(softcap)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0: off), got {softcap!r}")
    return value


def _check_feature_array(name, x, xp, like, shapes, what):
    """x: None, or an array of xp's kind (already through _arrays.array_module with q), float32, of one of
    shapes, on like's device; returned C-contiguous (a copy if it was not)."""
    if x is None:
        return None
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {' or '.join(str(s) for s in shapes)} ({what}), got {tuple(x.shape)}")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32 (as flash-attn; convert with .astype(float32): it is not "
                        f"converted silently), got {dtype_name(x.dtype)}")
    if xp is not np:
        if x.device.id != like.device.id:
            raise ValueError(f"{name}: expected an array on q's device (cuda:{like.device.id}), got one on "
                             f"cuda:{x.device.id}")
    return xp.ascontiguousarray(x)


def check_features(xp, q, shape: AttnShape, *, causal: bool, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   sinks=None):
    """The flashcupy._features.Features record of one call, validated.

    window_size: (left, right) ints >= -1; with causal the right side is the causal bound, so it is
    stored as -1 (causal with any right >= 0 is the same mask: j <= i + offset). softcap: finite >= 0.
    alibi_slopes: float32 (nheads,) or (batch, nheads); sinks: float32 (nheads,); both of q's array kind
    (NumPy with NumPy, CuPy on q's device with CuPy: xp and q come from _arrays.array_module, which
    already refused a mix), copied to C-contiguous if they are not. Values are not inspected (no host
    synchronisation): a NaN slope or sink gives NaN rows; a sink of -inf is no sink.
    Raises TypeError (kinds, dtypes) and ValueError (shapes, values, devices) naming the argument.
    """
    from ._features import Features

    left, right = check_window(window_size)
    if causal:
        right = -1
    cap = check_softcap(softcap)
    slopes = _check_feature_array("alibi_slopes", alibi_slopes, xp, q, ((shape.nheads,), (shape.batch, shape.nheads)),
                                  "(nheads,) or (batch, nheads)")
    sk = _check_feature_array("sinks", sinks, xp, q, ((shape.nheads,),), "(nheads,): one logit per query head")
    return Features(window=(left, right), softcap=cap, alibi_slopes=slopes, sinks=sk)


# ---------------------------------------------------------------------------------------------------
# varlen and KV-cache index arrays (issue 17). Shapes, dtypes and kinds are checked without reading
# device memory; the value checks take the host copy that host_ints makes in one transfer.


def check_rank3(name, x):
    """x: an array of rank 3 (total, nheads, head_dim), flash-attn's varlen layout."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array (NumPy, CuPy or __dlpack__), got {type(x).__name__}")
    if len(x.shape) != 3:
        raise ValueError(f"{name}: expected rank 3 (total, nheads, head_dim), got shape {tuple(x.shape)}")


def check_int32_array(name, x, xp, like, shape, what):
    """x: an int32 array of xp's kind on like's device, of the given shape (None entries: any size).
    Reads no values. Raises TypeError (not an array, dtype) and ValueError (shape, device)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an int32 array {what}, got {type(x).__name__}")
    if x.dtype != np.int32:
        raise TypeError(f"{name}: expected dtype int32 {what} (as flash-attn), got {dtype_name(x.dtype)}")
    if len(x.shape) != len(shape) or any(want is not None and int(got) != want for got, want in zip(x.shape, shape)):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want} {what}, got {tuple(x.shape)}")
    if xp is not np and x.device.id != like.device.id:
        raise ValueError(f"{name}: expected an array on q's device (cuda:{like.device.id}), got one on "
                         f"cuda:{x.device.id}")


def host_ints(xp, *arrays):
    """NumPy int64 copies of int arrays (None stays None). On CuPy, one device-to-host transfer for all
    of them (a host synchronisation on the current stream); on NumPy, no copy of the data is needed."""
    given = [a for a in arrays if a is not None]
    if xp is np:
        flat = [np.asarray(a).astype(np.int64).ravel() for a in given]
    else:
        whole = xp.concatenate([a.ravel() for a in given]).get().astype(np.int64) if given else np.zeros(0, np.int64)
        sizes = np.cumsum([0] + [int(a.size) for a in given])
        flat = [whole[sizes[i]:sizes[i + 1]] for i in range(len(given))]
    it = iter(flat)
    return [None if a is None else next(it).reshape(a.shape) for a in arrays]


def check_cu_seqlens(name, cu, total, total_name) -> np.ndarray:
    """cu: the host copy (int64, (batch + 1,)) of an int32 cu_seqlens: starts at 0, never decreases, ends
    at total (the first dimension of total_name). Returns the lengths (batch,). ValueError otherwise,
    naming the first offending entry."""
    if cu.shape[0] < 1:
        raise ValueError(f"{name}: expected batch + 1 >= 1 entries, got none")
    if cu[0] != 0:
        raise ValueError(f"{name}: expected entry 0 to be 0, got {int(cu[0])}")
    lengths = np.diff(cu)
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: expected non-decreasing offsets, got entry {i + 1} = {int(cu[i + 1])} < entry "
                         f"{i} = {int(cu[i])}")
    if cu[-1] != total:
        raise ValueError(f"{name}: expected the last entry to equal {total_name}.shape[0] = {total}, got "
                         f"{int(cu[-1])}")
    return lengths


def check_max_seqlen(name, value, lengths, what) -> int:
    """value: an int >= 0 and >= every length (the host lengths of what). Returns it as an int."""
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}")
    value = int(value)
    longest = int(lengths.max()) if lengths.size else 0
    if value < 0 or value < longest:
        raise ValueError(f"{name}: expected an int >= every length of {what} (the longest is {longest}), "
                         f"got {value}")
    return value
