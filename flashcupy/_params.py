"""The AttnParams record (cuda/flash_params.cuh) as a NumPy structured dtype, and its builder.

Every compute kernel of every family takes one `const __grid_constant__ AttnParams p` argument, by
value (flash-attn's Flash_fwd_params / Flash_bwd_params). `ATTN_PARAMS` mirrors the C struct with
NumPy's C layout rules (align=True); tests/test_params.py compiles static_asserts of sizeof and of
every field offset, generated from this dtype, against the header with NVRTC, so the two cannot drift.

`attn_params(...)` fills one record from keyword arguments (arrays, sizes, scales, mask, dropout) and
returns it as an opaque np.void of the struct's bytes, which CuPy passes to a kernel by value. Fields
not given are zero, which every kernel reads as "off" (null pointer, no window: see `window`).
"""

from __future__ import annotations

import math

import numpy as np

_PTR = "<u8"

TENSOR4 = np.dtype([("data", _PTR), ("batch_stride", "<i8"), ("row_stride", "<i8"), ("head_stride", "<i8")],
                   align=True)
DROPOUT_PARAMS = np.dtype([("seed_lo", "<u4"), ("seed_hi", "<u4"), ("offset", "<u4"), ("keep_threshold", "<u4"),
                           ("scale", "<f4")], align=True)
SPARSE_LIST = np.dtype([("counts", _PTR), ("index", _PTR), ("batch_stride", "<i8"), ("head_stride", "<i8"),
                        ("nblocks", "<i4"), ("block", "<i4"), ("rows_per_entry", "<i4")], align=True)
MASK_PARAMS = np.dtype([("causal", "<i4"), ("window_left", "<i4"), ("window_right", "<i4"),
                        ("kv_list", SPARSE_LIST), ("q_list", SPARSE_LIST)], align=True)

TENSORS = ("q", "k", "v", "out", "dout", "dq", "dk", "dv")
ATTN_PARAMS = np.dtype(
    [(t, TENSOR4) for t in TENSORS]
    + [("lse", _PTR), ("delta", _PTR), ("lse_exp", _PTR), ("dq_accum", _PTR)]
    + [(n, "<i4") for n in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_k", "group", "head_dim")]
    + [("scale", "<f8"), ("scale_log2", "<f8"), ("grad_scale", "<f8"),
       ("scale_f", "<f4"), ("scale_log2_f", "<f4"), ("grad_scale_f", "<f4")]
    + [("mask", MASK_PARAMS), ("dropout", DROPOUT_PARAMS), ("dkv_fp32", "<i4"), ("dq_atomic", "<i4")]
    + [("cu_seqlens_q", _PTR), ("cu_seqlens_k", _PTR), ("seqused_k", _PTR), ("block_table", _PTR),
       ("block_table_stride", "<i8"), ("page_size", "<i4"), ("softcap", "<f8"), ("alibi_slopes", _PTR),
       ("alibi_batch_stride", "<i8"), ("sinks", _PTR), ("o_accum", _PTR), ("lse_accum", _PTR),
       ("num_splits", "<i4")],
    align=True)

# cuda/flash_bwd.cu's ConvertParams (the dQ / GQA-sum conversion kernel).
CONVERT_PARAMS = np.dtype([("in", _PTR), ("out", _PTR), ("rows", "<i8"), ("nheads_out", "<i4"), ("group", "<i4"),
                           ("head_dim", "<i4"), ("scale", "<f4")], align=True)


def data_ptr(x) -> int:
    """Device address of a CuPy array (host address of a NumPy one: the SIMT kernels' CPU emulator);
    0 for None."""
    if x is None:
        return 0
    ptr = getattr(x.data, "ptr", None)
    return int(ptr) if ptr is not None else int(x.ctypes.data)


def as_arg(rec: np.ndarray) -> np.void:
    """A 0-d record as the opaque bytes CuPy passes to a kernel by value."""
    return rec.reshape(1).view(np.dtype((np.void, rec.dtype.itemsize)))[0]


def tensor4(x) -> tuple:
    """Tensor4 of a (batch, seqlen, nheads, head_dim) array: pointer and (batch, row, head) strides in
    elements."""
    if x is None:
        return (0, 0, 0, 0)
    it = x.dtype.itemsize
    return (data_ptr(x), *(s // it for s in x.strides[:3]))


def dropout_record(dropout) -> tuple:
    """DropoutParams of dropout = (dropout_p, (seed, offset)) or None (flashcupy.dropout's Philox bits)."""
    if dropout is None:
        return (0, 0, 0, 0, 0.0)
    from .dropout import keep_threshold

    p, (seed, offset) = dropout
    thr = keep_threshold(p)
    return (seed & 0xFFFFFFFF, seed >> 32, offset, thr, 65536.0 / thr)


def sparse_record(block_mask, direction: str) -> tuple:
    """SparseList of a BlockMask: its per-row key-block lists (direction "kv": forward and dQ kernels)
    or per-column query-block lists ("q": backward KV kernels), on the current device; zeros = dense."""
    if block_mask is None:
        return (0, 0, 0, 0, 0, 0, 0)
    import cupy

    kv_count, kv_index, q_count, q_index = block_mask.lists(cupy)
    counts, index = (kv_count, kv_index) if direction == "kv" else (q_count, q_index)
    bm, hm, rows, nblocks = index.shape
    block, own = ((block_mask.block_k, block_mask.block_q) if direction == "kv"
                  else (block_mask.block_q, block_mask.block_k))
    return (data_ptr(counts), data_ptr(index), 0 if bm == 1 else hm * rows, 0 if hm == 1 else rows,
            nblocks, block, own)


def attn_params(shape, *, head_dim: int, scale: float, grad_scale: float | None = None, causal: bool = False,
                window=(-1, -1), dropout=None, block_mask=None, dkv_fp32: bool = False, dq_atomic: bool = False,
                features=None, num_splits: int = 0, page_size: int = 0, **arrays) -> np.void:
    """One AttnParams record, by value.

    shape: flashcupy._validate.AttnShape.
    head_dim: the kernels' head dim (padded to a multiple of 8). scale: of q k^T in the softmax (the
    caller's softmax_scale, or 1 where the launcher zeroed q for a scale of 0); grad_scale: the
    caller's softmax_scale, carried by dq and dk (default: scale). window: (window_left, window_right)
    in keys, -1 = unbounded. features: a flashcupy._features.Features or None: its window (which
    replaces window=), softcap, alibi_slopes (float32 (nheads,) or (batch, nheads), on the device) and
    sinks (float32 (nheads,)); the kernels read each only in a specialization with its FEAT_* bit.
    dropout: None or (dropout_p, (seed, offset)). block_mask: a flashcupy.BlockMask or None. arrays: any of q, k, v, out, dout, dq, dk, dv
    (BSHD arrays), lse, delta, lse_exp, dq_accum, o_accum, lse_accum, seqused_k, cu_seqlens_q, cu_seqlens_k
    (contiguous; the last three int32) and
    block_table (int32 (batch, max_blocks), its row stride recorded); unnamed ones are null.
    num_splits, page_size: the split-KV decode kernel's (cuda/flash_decode.cu; 0 elsewhere).
    """
    rec = np.zeros((), dtype=ATTN_PARAMS)
    for name, x in arrays.items():
        if name in TENSORS:
            rec[name] = tensor4(x)
        elif name in ("lse", "delta", "lse_exp", "dq_accum", "o_accum", "lse_accum", "seqused_k", "cu_seqlens_q",
                      "cu_seqlens_k"):
            rec[name] = data_ptr(x)
        elif name == "block_table":
            rec[name], rec["block_table_stride"] = data_ptr(x), x.strides[0] // x.dtype.itemsize
        else:
            raise TypeError(f"attn_params: unknown array {name!r}")
    rec["batch"], rec["seqlen_q"], rec["seqlen_k"] = shape.batch, shape.seqlen_q, shape.seqlen_k
    rec["nheads"], rec["nheads_k"], rec["group"], rec["head_dim"] = shape.nheads, shape.nheads_k, shape.group, head_dim
    grad_scale = scale if grad_scale is None else grad_scale
    scale_log2 = scale * math.log2(math.e)
    rec["scale"], rec["scale_log2"], rec["grad_scale"] = scale, scale_log2, grad_scale
    rec["scale_f"], rec["scale_log2_f"], rec["grad_scale_f"] = scale, scale_log2, grad_scale
    if features is not None:
        window = features.window
        rec["softcap"] = float(features.softcap)
        if features.alibi_slopes is not None:
            slopes = features.alibi_slopes
            rec["alibi_slopes"] = data_ptr(slopes)
            rec["alibi_batch_stride"] = shape.nheads if slopes.ndim == 2 else 0
        rec["sinks"] = data_ptr(features.sinks)
    rec["mask"] = (int(causal), int(window[0]), int(window[1]), sparse_record(block_mask, "kv"),
                   sparse_record(block_mask, "q"))
    rec["dropout"] = dropout_record(dropout)
    rec["dkv_fp32"], rec["dq_atomic"] = int(dkv_fp32), int(dq_atomic)
    rec["num_splits"], rec["page_size"] = int(num_splits), int(page_size)
    return as_arg(rec)


def convert_params(src, dst, rows: int, group: int, scale: float) -> np.void:
    """ConvertParams: dst (rows, nheads / group, d) = scale * group sums of src (rows, nheads, d) float32."""
    rec = np.zeros((), dtype=CONVERT_PARAMS)
    rec[()] = (data_ptr(src), data_ptr(dst), rows, dst.shape[2], group, dst.shape[3], scale)
    return as_arg(rec)


def field_offsets(dtype: np.dtype = ATTN_PARAMS, prefix: str = "") -> dict:
    """{"mask.kv_list.nblocks": byte offset, ...} of every (nested) field: what tests/test_params.py
    checks against the C header."""
    out = {}
    for name in dtype.names:
        sub, off = dtype.fields[name][:2]
        out[prefix + name] = off
        if sub.names:
            out.update({k: off + v for k, v in field_offsets(sub, prefix + name + ".").items()})
    return out
