"""Variable-length batches, KV-cache decoding and the exact merge of partial attention (issue 17).

    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_attn_varlen_forward(...) -> VarlenForward(out, lse, rng_state) (+ .options, VarlenOptions)
    flash_attn_varlen_backward(dout, q, k, v, forward=fwd) -> (dq, dk, dv) (+ dsinks)
    flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, ...)
    merge_attention(out_parts, lse_parts) -> (out, lse)

flash-attn's API and layouts (flash_attn_varlen_func, flash_attn_with_kvcache, flash-attn 2.6):
packed sequences q (total_q, nheads, head_dim), k, v (total_k, nheads_k, head_dim) with int32
cu_seqlens (batch + 1,) offsets; LSE (nheads, total_q). Each sequence is its own dense attention
problem (flashcupy.reference's varlen oracle states it): causal and the window are bottom-right within
the sequence, empty sequences are legal.

Where it runs today: the chunked exact path, per sequence (flashcupy._chunked.varlen_forward /
varlen_backward), on NumPy (CPU) and on CuPy (GPU) alike; KV-cache decoding on CuPy through the split-KV
decode kernels (cuda/flash_decode.cu); with FLASHCUPY_VARLEN_FUSED=1 (opt-in until it has run on a GPU)
the varlen forward of CuPy float16 / bfloat16 through the fused kernel (flashcupy._gpu.forward_varlen).
All are held to the same rule. The chunked path loops over the sequences on the host, so on CuPy it reads
cu_seqlens / seqused_k (and cache_seqlens / block_table) to the host, in one transfer per call: a
host synchronisation, so these calls cannot be captured into a CUDA graph yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _chunked, dropout
from ._arrays import array_module, dtype_name, lse_dtype, supported_dtypes
from ._validate import (
    _check_rank4,
    _is_int,
    check_bool,
    check_cu_seqlens,
    check_features,
    check_int32_array,
    check_max_seqlen,
    check_qkv,
    check_rank3,
    host_ints,
)
from .interface import (FROM_FORWARD, _backward_rng_state, _check_same_arrays, _forward_record, _ForwardRecord,
                        _given_arrays, _put_back, sink_grad)

__all__ = ["VarlenOptions", "VarlenForward", "flash_attn_varlen_func", "flash_attn_varlen_forward",
           "flash_attn_varlen_backward", "flash_attn_with_kvcache", "merge_attention"]


# ---------------------------------------------------------------------------------------------------
# varlen: the options record and the forward's result


@dataclass(frozen=True)
class VarlenOptions:
    """The options of one flash_attn_varlen_forward call that its backward repeats and checks
    (VarlenForward.options). Arrays (cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks) are
    the forward's own and are compared by data pointer, shape and strides, never by value (`==` on
    two records ignores them)."""

    causal: bool
    softmax_scale: float  # as resolved (head_dim ** -0.5 for None)
    dropout_p: float  # as given
    max_seqlen_q: int
    max_seqlen_k: int
    window_size: tuple = (-1, -1)  # as validated (with causal, right is -1)
    softcap: float = 0.0
    cu_seqlens_q: object = field(default=None, compare=False)
    cu_seqlens_k: object = field(default=None, compare=False)
    seqused_k: object = field(default=None, compare=False)
    alibi_slopes: object = field(default=None, compare=False)
    sinks: object = field(default=None, compare=False)


class _VarlenForwardTuple(NamedTuple):
    out: object  # (total_q, nheads, head_dim), dtype of q
    lse: object  # (nheads, total_q), float32 (float64 for float64 inputs); -inf on rows with no key
    rng_state: object  # dropout (seed, offset), or None


class VarlenForward(_ForwardRecord, _VarlenForwardTuple):
    """What flash_attn_varlen_forward returns: the 3-tuple (out, lse, rng_state) and .options
    (VarlenOptions), as flashcupy.AttnForward. Immutable."""


_ARRAY_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "alibi_slopes", "sinks")


class _Varlen(NamedTuple):
    """One validated varlen problem."""

    xp: object
    q: object
    k: object
    v: object
    cu_seqlens_q: object
    cu_seqlens_k: object
    seqused_k: object
    alibi_slopes: object
    sinks: object
    shape: object  # AttnShape: batch = number of sequences, seqlen_q / seqlen_k = max_seqlen_q / max_seqlen_k
    bounds: list  # host (q0, q1, k0, k1) per sequence
    features: object


def _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale,
                    dropout_p, causal, window_size, softcap, alibi_slopes, sinks, extra=None) -> _Varlen:
    """Validate a varlen call: kinds, ranks, dtypes, shapes (no device read), then the index values on
    the host copy (one transfer on CuPy). extra: more named arrays of the same kind (the backward's)."""
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if x is None:
            raise TypeError(f"{name}: expected an int32 array (batch + 1,), got None")
    named = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **(extra or {}))
    if seqused_k is not None:
        named["seqused_k"] = seqused_k
    named.update(_given_arrays(alibi_slopes, sinks))
    xp, arrays = array_module(**named)
    got = dict(zip(named, arrays))
    q, k, v = got["q"], got["k"], got["v"]
    for name in ("q", "k", "v"):
        check_rank3(name, got[name])
    shape1 = check_qkv(q[None], k[None], v[None], softmax_scale, dropout_p)
    cu_q, cu_k = got["cu_seqlens_q"], got["cu_seqlens_k"]
    check_int32_array("cu_seqlens_q", cu_q, xp, q, (None,), "(batch + 1,)")
    batch = int(cu_q.shape[0]) - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q: expected batch + 1 >= 1 entries, got none")
    check_int32_array("cu_seqlens_k", cu_k, xp, q, (batch + 1,), f"(batch + 1,) = ({batch + 1},) as cu_seqlens_q")
    used = got.get("seqused_k")
    if used is not None:
        check_int32_array("seqused_k", used, xp, q, (batch,), f"(batch,) = ({batch},)")
    causal = check_bool("causal", causal)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(value):
            raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}")
    shape = type(shape1)(batch, int(max_seqlen_q), int(max_seqlen_k), shape1.nheads, shape1.nheads_k,
                         shape1.head_dim, shape1.softmax_scale)
    slopes, sk = _put_back([got[n] for n in ("alibi_slopes", "sinks") if n in got], alibi_slopes, sinks)
    features = check_features(xp, q, shape, causal=causal, window_size=window_size, softcap=softcap,
                              alibi_slopes=slopes, sinks=sk)
    hq, hk, hu = host_ints(xp, cu_q, cu_k, used)  # the one read of device memory
    len_q = check_cu_seqlens("cu_seqlens_q", hq, int(q.shape[0]), "q")
    len_k = check_cu_seqlens("cu_seqlens_k", hk, int(k.shape[0]), "k")
    if hu is not None:
        bad = np.flatnonzero((hu < 0) | (hu > len_k))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"seqused_k: expected 0 <= seqused_k[b] <= cu_seqlens_k[b + 1] - cu_seqlens_k[b], got "
                             f"seqused_k[{b}] = {int(hu[b])} for a sequence of {int(len_k[b])} keys")
        len_k = hu
    check_max_seqlen("max_seqlen_q", max_seqlen_q, len_q, "cu_seqlens_q")
    check_max_seqlen("max_seqlen_k", max_seqlen_k, len_k, "seqused_k" if hu is not None else "cu_seqlens_k")
    bounds = [(int(hq[b]), int(hq[b + 1]), int(hk[b]), int(hk[b] + len_k[b])) for b in range(batch)]
    return _Varlen(xp, q, k, v, cu_q, cu_k, used, slopes, sk, shape, bounds, features), got


def _keep_fn_of(xp, shape, dropout_p, rng_state):
    """Sequence b's keep_fn for the chunked path: the corner [b, :, :len_q, :len_k] of the dense keep-mask
    flashcupy.dropout.keep_mask(seed, offset, batch, nheads, max_seqlen_q, max_seqlen_k) (the bits depend
    on (b, h, i, j) only, i and j local to the sequence): keep_mask's batches=(b, b + 1). None without
    dropout."""
    if not dropout_p:
        return None
    seed, offset = rng_state

    def keep_fn_of(b, sb):
        def keep_fn(i0, i1):
            return dropout.keep_mask(seed, offset, b + 1, shape.nheads, sb.seqlen_q, sb.seqlen_k, dropout_p,
                                     rows=(i0, i1), batches=(b, b + 1), xp=xp)
        return keep_fn

    return keep_fn_of


def flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
                              softmax_scale=None, causal=False, seed=None, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, sinks=None, seqused_k=None) -> VarlenForward:
    """Attention over a batch of packed sequences of different lengths, returning what the backward needs.

    Args:
        q: (total_q, nheads, head_dim), float16, bfloat16, float32 or float64: the query rows of every
            sequence, one after the other.
        k, v: (total_k, nheads_k, head_dim), dtype of q; nheads % nheads_k == 0 (MQA/GQA).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), the same array kind as q (CuPy on q's device
            with CuPy): sequence b is query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and keys
            [cu_seqlens_k[b], cu_seqlens_k[b + 1]). Each starts at 0, never decreases and ends at
            total_q (total_k). Empty sequences (equal neighbours) are legal.
        max_seqlen_q, max_seqlen_k: ints >= the longest query (key) sequence (flash-attn's; a larger
            value is legal). They also fix the dropout keep-mask's dense frame (below).
        seqused_k: int32 (batch,) or None: sequence b attends only its first seqused_k[b] keys
            (0 <= seqused_k[b] <= its length in cu_seqlens_k); the rest get zero gradients.
            max_seqlen_k must then cover seqused_k.
        dropout_p, softmax_scale, seed, window_size, softcap, alibi_slopes, sinks: as
            flashcupy.flash_attn_forward; alibi_slopes (nheads,) or (batch, nheads) (row b for
            sequence b). causal and window_size are aligned bottom-right within each sequence (query i
            of a sequence of lq rows and lk keys sees key j <= i + lk - lq). The dropout keep bit of
            (sequence b, head h, local row i, local key j) is that of element (b, h, i, j) of the dense
            keep-mask flashcupy.dropout.keep_mask(seed, offset, batch, nheads, max_seqlen_q,
            max_seqlen_k, dropout_p).

    Returns:
        VarlenForward(out, lse, rng_state): out like q; lse (nheads, total_q) natural-log logsumexp,
        float32 (float64 for float64 inputs); a row whose sequence has no key gets out 0 and lse -inf
        (its sink with sinks); rng_state the dropout (seed, offset), None without. .options
        (VarlenOptions) is what flash_attn_varlen_backward(..., forward=fwd) repeats and checks.

    Raises:
        TypeError: non-arrays, unsupported or mismatched dtypes (cu_seqlens / seqused_k not int32),
            host and device arrays mixed, non-bool causal, non-int max_seqlen.
        ValueError: q, k, v not rank 3, shapes that do not fit, cu_seqlens of another length than
            batch + 1 (cu_seqlens_k: as cu_seqlens_q), not starting at 0, decreasing, not ending at
            total_q / total_k; seqused_k outside [0, length]; max_seqlen below a length; the dense
            API's scalar and feature errors. Each names the argument and the offending entry.

    Host reads: cu_seqlens_q, cu_seqlens_k and seqused_k are copied to the host in one transfer (a
    synchronisation on CuPy) and every value check above runs there; the chunked path needs the host
    offsets to slice the sequences anyway. Runs the chunked exact path per sequence on NumPy and on
    CuPy; with FLASHCUPY_VARLEN_FUSED=1, CuPy float16 / bfloat16 without dropout run the fused varlen
    forward instead (one launch for the batch: the mma.sync kernel with FEAT_VARLEN; checked on the
    CPU emulator, not yet on a GPU, hence opt-in). Each sequence gives the bits flash_attn_forward gives
    on that sequence alone on the CPU (without dropout).

    Source: flash-attn's flash_attn_varlen_func (cu_seqlens, LSE (nheads, total_q), seqused_k);
    FlashAttention-2 (arXiv 2307.08691), per sequence.
    """
    p, _ = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale,
                           dropout_p, causal, window_size, softcap, alibi_slopes, sinks)
    dropout_p = float(dropout_p)
    rng_state = None
    if dropout_p > 0:
        rng_state = dropout.default_generator.next_state() if seed is None else dropout.check_rng_state("seed", seed)
    options = VarlenOptions(bool(causal), p.shape.softmax_scale, dropout_p, p.shape.seqlen_q, p.shape.seqlen_k,
                            p.features.window, p.features.softcap, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k,
                            p.alibi_slopes, p.sinks)
    p_eff = dropout.effective_dropout_p(dropout_p) if dropout_p > 0 else 0.0
    if _fused_varlen_takes(p, dropout_p):
        from . import _gpu

        out, lse = _gpu.forward_varlen(p.q, p.k, p.v, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, p.shape,
                                       causal=options.causal, features=p.features)
        return VarlenForward(out, lse, rng_state, options)
    out, lse = _chunked.varlen_forward(p.q, p.k, p.v, p.bounds, p.shape, causal=options.causal,
                                       keep_fn_of=_keep_fn_of(p.xp, p.shape, dropout_p, rng_state), dropout_p=p_eff,
                                       xp=p.xp, features=p.features)
    return VarlenForward(out, lse, rng_state, options)


def _fused_varlen_takes(p, dropout_p: float) -> bool:
    """Whether the fused varlen forward (flashcupy._gpu.forward_varlen: the mma.sync kernel with
    FEAT_VARLEN) runs this call: CuPy float16 / bfloat16, no dropout, a head dim the kernels take, and,
    until it has run on a GPU, FLASHCUPY_VARLEN_FUSED=1 (2026-12-04: checked on the CPU emulator only,
    bench/simt_emu/run_mma16_cases.py --varlen). Otherwise the chunked path."""
    if os.environ.get("FLASHCUPY_VARLEN_FUSED", "0") != "1" or p.xp is np or dropout_p > 0:
        return False
    if dtype_name(p.q.dtype) not in ("float16", "bfloat16") or not 1 <= p.shape.head_dim <= 256:
        return False
    from ._configs import fwd_config
    from ._gpu import _device_arch

    return fwd_config(p.shape.head_dim, p.q.dtype, False, _device_arch(), None) is not None


def flash_attn_varlen_backward(dout, q, k, v, out=None, lse=None, cu_seqlens_q=FROM_FORWARD,
                               cu_seqlens_k=FROM_FORWARD, max_seqlen_q=FROM_FORWARD, max_seqlen_k=FROM_FORWARD, *,
                               dropout_p=FROM_FORWARD, softmax_scale=FROM_FORWARD, causal=FROM_FORWARD,
                               rng_state=FROM_FORWARD, deterministic=False, window_size=FROM_FORWARD,
                               softcap=FROM_FORWARD, alibi_slopes=FROM_FORWARD, sinks=FROM_FORWARD,
                               seqused_k=FROM_FORWARD, forward=None):
    """Gradients of flash_attn_varlen_forward with respect to q, k, v (and the sinks).

        fwd = flash_attn_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, causal=True)
        dq, dk, dv = flash_attn_varlen_backward(dout, q, k, v, forward=fwd)        # options from fwd, checked
        dq, dk, dv = flash_attn_varlen_backward(dout, q, k, v, fwd.out, fwd.lse, cu_q, cu_k, mq, mk, causal=True)

    Args: dout (total_q, nheads, head_dim) like q; out, lse the forward's (with forward=, its own
    arrays by pointer); every option as the forward's, and with forward= each one given explicitly
    must equal the forward's (scalars by value, softmax_scale as resolved, window_size as validated;
    cu_seqlens_q / cu_seqlens_k / seqused_k / alibi_slopes / sinks by data pointer, shape and strides,
    never by value). Without forward=, cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k are
    required and the rest default to flash-attn's (dropout 0, causal False, no window, ...).
    deterministic: validated; the chunked path is always bitwise reproducible.

    Returns (dq, dk, dv) like q, k, v (dk, dv summed over each GQA group; keys no sequence attends, and
    rows with no visible key, get 0); with sinks (dq, dk, dv, dsinks), dsinks float32 (nheads,) summed
    over every sequence (flashcupy.interface.sink_grad).

    Raises: as flash_attn_varlen_forward, plus TypeError for a forward that is not
    flash_attn_varlen_forward's record or a missing cu_seqlens / max_seqlen / out / lse, ValueError
    naming the first option or array that differs from the forward's, or dout / out / lse of the
    wrong shape (TypeError: dtype). Host reads as the forward (one transfer). Chunked path per
    sequence on NumPy and CuPy.

    Source: FlashAttention backward (arXiv 2205.14135 Algorithm 4; arXiv 2307.08691 Algorithm 2), per sequence.
    """
    opts, out, lse = _forward_record(forward, VarlenForward, "flash_attn_varlen_forward", out, lse)
    given = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                 max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                 seqused_k=seqused_k)
    defaults = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, sinks=None, seqused_k=None)
    kw = {}
    for name, value in given.items():
        if value is not FROM_FORWARD:
            kw[name] = value
        elif opts is not None:
            kw[name] = getattr(opts, name)
        elif name in defaults:
            kw[name] = defaults[name]
        else:
            raise TypeError(f"{name}: expected the forward's {name} (or forward=, the VarlenForward of "
                            f"flash_attn_varlen_forward), got nothing")
    if rng_state is FROM_FORWARD:
        rng_state = None if forward is None else forward.rng_state
    p, got = _varlen_problem(q, k, v, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
                             kw["seqused_k"], kw["softmax_scale"], kw["dropout_p"], kw["causal"], kw["window_size"],
                             kw["softcap"], kw["alibi_slopes"], kw["sinks"], extra=dict(dout=dout, out=out, lse=lse))
    dout, out, lse = got["dout"], got["out"], got["lse"]
    xp, shape = p.xp, p.shape
    check_bool("deterministic", deterministic)
    for name, x in (("dout", dout), ("out", out)):
        check_rank3(name, x)
        if tuple(x.shape) != tuple(p.q.shape):
            raise ValueError(f"{name}: expected shape {tuple(p.q.shape)} (as q), got {tuple(x.shape)}")
        if x.dtype != p.q.dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(p.q.dtype)} (as q), got {dtype_name(x.dtype)}")
    want_lse = (shape.nheads, int(p.q.shape[0]))
    if tuple(lse.shape) != want_lse:
        raise ValueError(f"lse: expected shape {want_lse} (nheads, total_q), got {tuple(lse.shape)}")
    if lse.dtype != lse_dtype(p.q.dtype):
        raise TypeError(f"lse: expected dtype {dtype_name(lse_dtype(p.q.dtype))}, got {dtype_name(lse.dtype)}")
    dropout_p = float(kw["dropout_p"])
    if opts is not None:
        _check_matches(forward, p, bool(kw["causal"]), dropout_p, out, lse)
    rng_state = _backward_rng_state(dropout_p, rng_state, forward)
    p_eff = dropout.effective_dropout_p(dropout_p) if dropout_p > 0 else 0.0
    grads = _chunked.varlen_backward(dout, p.q, p.k, p.v, out, lse, p.bounds, shape, causal=bool(kw["causal"]),
                                     keep_fn_of=_keep_fn_of(xp, shape, dropout_p, rng_state), dropout_p=p_eff, xp=xp,
                                     features=p.features)
    if p.features.sinks is None:
        return grads
    return (*grads, sink_grad(xp, dout[None], out[None], lse[None], p.features.sinks))


def _check_matches(forward, p, causal, dropout_p, out, lse):
    """ValueError naming the first option or array of the backward that is not the forward's."""
    opts = forward.options
    scalars = dict(causal=causal, softmax_scale=p.shape.softmax_scale, dropout_p=dropout_p, max_seqlen_q=p.shape.seqlen_q,
                   max_seqlen_k=p.shape.seqlen_k, window_size=p.features.window, softcap=p.features.softcap)
    for name, value in scalars.items():
        if value != getattr(opts, name):
            extra = " (as resolved)" if name == "softmax_scale" else " (as validated)" if name == "window_size" else ""
            raise ValueError(f"{name}: expected the forward's {name}={getattr(opts, name)!r}{extra}, got {value!r}")
    arrays = dict(cu_seqlens_q=p.cu_seqlens_q, cu_seqlens_k=p.cu_seqlens_k, seqused_k=p.seqused_k,
                  alibi_slopes=p.alibi_slopes, sinks=p.sinks)
    _check_same_arrays(forward, out, lse, **{name: (got, getattr(opts, name)) for name, got in arrays.items()})


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_lse=False, seed=None, sinks=None, seqused_k=None):
    """flash-attn's flash_attn_varlen_func: out (total_q, nheads, head_dim) like q, or (out, lse) with
    return_lse (lse (nheads, total_q) float32, float64 for float64). Arguments, errors, host reads and
    where it runs as flash_attn_varlen_forward; deterministic is validated (it concerns a backward).
    For gradients use flash_attn_varlen_forward / flash_attn_varlen_backward."""
    check_bool("deterministic", deterministic)
    return_lse = check_bool("return_lse", return_lse)
    res = flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, seed=seed,
                                    window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                    sinks=sinks, seqused_k=seqused_k)
    return (res.out, res.lse) if return_lse else res.out


# ---------------------------------------------------------------------------------------------------
# merge_attention: the exact combination of partial results over disjoint key sets


def merge_attention(out_parts, lse_parts):
    """Combine attention results over disjoint sets of keys into the result over their union, exactly.

    For parts i = 1..n of one query set, computed over disjoint key sets K_i (split-KV / flash-decoding,
    ring attention, chunked prefill):

        lse = log(sum_i exp(lse_i))                 (logaddexp; a part with lse_i = -inf, no key, adds 0)
        out = sum_i exp(lse_i - lse) * out_i        (0 where every part is empty: lse = -inf)

    which is softmax attention over the union of the K_i (FlashAttention's rescaling, arXiv 2205.14135
    Sec. 3.1, across parts instead of tiles). A sink is one more part: out 0, lse = the sink logit
    (give the parts without their sinks, or the sink is counted once per part).

    Args:
        out_parts: a non-empty sequence of arrays of one shape (..., seqlen, nheads, head_dim) and one
            dtype (float16, bfloat16, float32, float64): the dense layout (batch, seqlen_q, nheads,
            head_dim) or the varlen one (total_q, nheads, head_dim).
        lse_parts: as many arrays of shape (..., nheads, seqlen) (dense (batch, nheads, seqlen_q),
            varlen (nheads, total_q)) and one dtype, float32 or float64: natural-log logsumexp of the
            scaled scores, as flash_attn_forward returns it.
        All NumPy, or all CuPy on one device (GPU __dlpack__ arrays are converted zero-copy).

    Returns (out, lse): out in the parts' dtype, lse in lse_parts' dtype. The arithmetic is float32
    (float64 when the outputs or the LSEs are float64), on the arrays' device, with no host
    synchronisation. NaN in a part spreads to the rows it touches; lse_i = +inf is not supported.

    Raises TypeError (not a sequence, non-arrays, dtypes, mixed kinds) and ValueError (empty, counts or
    shapes that disagree, ranks below 3), naming the argument and the part.
    """
    for name, parts in (("out_parts", out_parts), ("lse_parts", lse_parts)):
        if isinstance(parts, (str, bytes)) or not hasattr(parts, "__len__") or hasattr(parts, "shape"):
            raise TypeError(f"{name}: expected a list or tuple of arrays, got {type(parts).__name__}")
    if len(out_parts) == 0:
        raise ValueError("out_parts: expected at least one part, got none")
    if len(lse_parts) != len(out_parts):
        raise ValueError(f"lse_parts: expected {len(out_parts)} arrays (one per out part), got {len(lse_parts)}")
    n = len(out_parts)
    named = {f"out_parts[{i}]": x for i, x in enumerate(out_parts)}
    named.update({f"lse_parts[{i}]": x for i, x in enumerate(lse_parts)})
    xp, arrays = array_module(**named)
    outs, lses = arrays[:n], arrays[n:]
    o0, l0 = outs[0], lses[0]
    if len(o0.shape) < 3:
        raise ValueError(f"out_parts[0]: expected rank >= 3 (..., seqlen, nheads, head_dim), got shape {tuple(o0.shape)}")
    if o0.dtype not in supported_dtypes():
        raise TypeError(f"out_parts[0]: expected dtype in {[dtype_name(d) for d in supported_dtypes()]}, got "
                        f"{dtype_name(o0.dtype)}")
    if l0.dtype not in (np.float32, np.float64):
        raise TypeError(f"lse_parts[0]: expected dtype float32 or float64, got {dtype_name(l0.dtype)}")
    want_lse = (*o0.shape[:-3], o0.shape[-2], o0.shape[-3])
    for i in range(n):
        if tuple(outs[i].shape) != tuple(o0.shape):
            raise ValueError(f"out_parts[{i}]: expected shape {tuple(o0.shape)} (as out_parts[0]), got "
                             f"{tuple(outs[i].shape)}")
        if outs[i].dtype != o0.dtype:
            raise TypeError(f"out_parts[{i}]: expected dtype {dtype_name(o0.dtype)} (as out_parts[0]), got "
                            f"{dtype_name(outs[i].dtype)}")
        if tuple(lses[i].shape) != want_lse:
            raise ValueError(f"lse_parts[{i}]: expected shape {want_lse} (..., nheads, seqlen) for out parts of "
                             f"shape {tuple(o0.shape)}, got {tuple(lses[i].shape)}")
        if lses[i].dtype != l0.dtype:
            raise TypeError(f"lse_parts[{i}]: expected dtype {dtype_name(l0.dtype)} (as lse_parts[0]), got "
                            f"{dtype_name(lses[i].dtype)}")
    dt = np.dtype(np.float64) if np.float64 in (o0.dtype, l0.dtype) else np.dtype(np.float32)
    ls = [x.astype(dt, copy=False) for x in lses]
    m = ls[0]
    for x in ls[1:]:
        m = xp.maximum(m, x)
    m = xp.where(m == -xp.inf, 0.0, m).astype(dt, copy=False)  # every part empty: keep exp() finite
    es = [xp.exp(x - m) for x in ls]
    total = es[0]
    for e in es[1:]:
        total = total + e
    has = total > 0
    safe = xp.where(has, total, 1.0).astype(dt, copy=False)
    lse = xp.where(has, xp.log(safe) + m, -xp.inf)
    out = None
    for e, o in zip(es, outs):
        w = (e / safe).swapaxes(-1, -2)[..., None]  # exp(lse_i - lse), (..., seqlen, nheads, 1)
        term = w * o.astype(dt, copy=False)
        out = term if out is None else out + term
    return out.astype(o0.dtype, copy=False), lse.astype(l0.dtype, copy=False)


# ---------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: decoding against a contiguous or paged cache, appending in place


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


PAGE_SIZE_MIN = 16  # the fused paged kernels' smallest page (issue 17); a power of two


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """Attention of new queries over a KV cache, appending new keys and values to it in place
    (flash-attn's flash_attn_with_kvcache; forward only).

    Args:
        q: (batch, seqlen_q, nheads, head_dim), float16, bfloat16, float32 or float64 (seqlen_q >= 1
            for decoding; any, including 0).
        k_cache, v_cache: contiguous (batch_cache, seqlen_cache, nheads_k, head_dim) with batch_cache
            >= batch (row b of q uses cache row b), or paged (num_blocks, page_size, nheads_k,
            head_dim) with block_table; dtype of q, nheads % nheads_k == 0. page_size a power of two
            >= 16 (the fused kernels' constraint, enforced today so that code keeps working).
            Written in place when k, v are given (NumPy: must be writeable; CuPy: on q's device).
        k, v: None, or (batch, seqlen_new, nheads_k, head_dim) in q's dtype (both or neither): written
            to cache positions [cache_seqlens[b], cache_seqlens[b] + seqlen_new) of row b before the
            attention (paged: position t of row b is slot t % page_size of page block_table[b, t //
            page_size]). Needs cache_seqlens.
        cache_seqlens: None (every row's whole cache: seqlen_cache, or max_blocks * page_size), an int
            >= 0 (every row), or int32 (batch,) of q's array kind: the cache length of each row before
            the append. Row b attends keys [0, cache_seqlens[b] + seqlen_new), which must fit the cache.
        block_table: None, or int32 (batch, max_blocks) of q's kind: row b's pages in order; every
            page a row reads or writes must lie in [0, num_blocks). Pages shared by rows are read
            fine; appending into a shared page writes it for every row that reads it.
        softmax_scale, window_size, softcap, alibi_slopes: as flashcupy.flash_attn_forward (alibi
            (nheads,) or (batch, nheads)). causal and the window are aligned to the end of each row's
            visible cache: query i of seqlen_q sees key j <= i + L_b - seqlen_q, L_b the visible length.
        num_splits: an int >= 0, flash-attn's split-KV count (0: chosen automatically; at most 256);
            the decode kernels honour it (deterministic for a fixed value), the chunked path computes
            each row exactly in one pass and ignores it.
        return_softmax_lse: also return lse (batch, nheads, seqlen_q), float32 (float64 for float64).

    Returns out (batch, seqlen_q, nheads, head_dim) like q, or (out, lse). A row with no visible key
    (L_b = 0, or causal with seqlen_q > L_b for the first rows) gets out 0 and lse -inf.

    Raises TypeError (kinds, dtypes, non-ints / non-bools) and ValueError (shapes, a page size that is
    not a power of two >= 16, a negative cache_seqlens, an append or a visible length past the cache's
    capacity, a block_table entry outside [0, num_blocks), a read-only NumPy cache), naming the
    argument (and the row).

    Host reads: cache_seqlens and block_table (when they are arrays) are copied to the host in one
    transfer (a synchronisation on CuPy), where their values are checked.

    Kernels: on CuPy with head_dim 32, 64, 128 or 256 and 16-byte aligned rows (q and the caches
    read in place), the split-KV decode kernels (cuda/flash_decode.cu): one CTA per (split, KV head,
    batch row) takes all group * seqlen_q query rows of that KV head, the keys are split over
    num_splits CTAs (0: about four CTAs per SM, flashcupy._gpu_decode.auto_splits) and a combine
    kernel merges the parts; products and sums in float32 (float64 for float64), deterministic for
    a fixed num_splits. Otherwise (NumPy, other head dims or strides, FLASHCUPY_DECODE=0) the chunked
    exact path per batch row, which ignores num_splits.

    Source: flash-attn's flash_attn_with_kvcache (cache_seqlens, block_table, in-place append);
    FlashAttention-2 (arXiv 2307.08691); flash-decoding's split-KV merge is merge_attention.
    """
    paged = block_table is not None
    if (k is None) != (v is None):
        raise ValueError(f"{'v' if k is not None else 'k'}: expected an array with "
                         f"{'k' if k is not None else 'v'} (new keys and values come together), got None")
    named = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    if k is not None:
        named.update(k=k, v=v)
    seqlens_is_array = cache_seqlens is not None and not _is_int(cache_seqlens)
    if seqlens_is_array:
        named["cache_seqlens"] = cache_seqlens
    if paged:
        named["block_table"] = block_table
    if alibi_slopes is not None:
        named["alibi_slopes"] = alibi_slopes
    xp, arrays = array_module(**named)
    got = dict(zip(named, arrays))
    q, k_cache, v_cache = got["q"], got["k_cache"], got["v_cache"]
    for name in ("q", "k_cache", "v_cache"):
        _check_rank4(name, got[name])
    if q.dtype not in supported_dtypes():
        raise TypeError(f"q: expected dtype in {[dtype_name(d) for d in supported_dtypes()]}, got {dtype_name(q.dtype)}")
    batch, seqlen_q, nheads, head_dim = (int(s) for s in q.shape)
    for name in ("k_cache", "v_cache") + (("k", "v") if k is not None else ()):
        x = got[name]
        if name in ("k", "v"):
            _check_rank4(name, x)
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({dtype_name(q.dtype)}), got {dtype_name(x.dtype)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    nblocks_or_batch, seqlen_cache, nheads_k, d_cache = (int(s) for s in k_cache.shape)
    if d_cache != head_dim:
        raise ValueError(f"k_cache: expected head_dim {head_dim} (as q), got {d_cache}")
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(f"k_cache: expected nheads_k dividing nheads={nheads} (MQA/GQA), got nheads_k={nheads_k}")
    if paged:
        bt = got["block_table"]
        check_int32_array("block_table", bt, xp, q, (batch, None), f"(batch, max_blocks) with batch = {batch}")
        page_size = seqlen_cache
        if not (_is_pow2(page_size) and page_size >= PAGE_SIZE_MIN):
            raise ValueError(f"k_cache: expected a page size (dimension 1 of a paged cache) that is a power of two "
                             f">= {PAGE_SIZE_MIN}, got {page_size}")
        capacity = int(bt.shape[1]) * page_size
    else:
        bt = None
        if nblocks_or_batch < batch:
            raise ValueError(f"k_cache: expected batch_cache >= batch = {batch} (row b of q uses cache row b), got "
                             f"{nblocks_or_batch}")
        capacity = seqlen_cache
    seqlen_new = 0
    if k is not None:
        kn, vn = got["k"], got["v"]
        want = (batch, int(kn.shape[1]), nheads_k, head_dim)
        for name, x in (("k", kn), ("v", vn)):
            if tuple(x.shape) != want:
                raise ValueError(f"{name}: expected shape (batch, seqlen_new, nheads_k, head_dim) = {want}, got "
                                 f"{tuple(x.shape)}")
        seqlen_new = want[1]
        if cache_seqlens is None:
            raise ValueError("cache_seqlens: expected an int or an int32 (batch,) array when k and v are given "
                             "(where to append them, as flash-attn), got None")
        if xp is np:
            for name in ("k_cache", "v_cache"):
                if not got[name].flags.writeable:
                    raise ValueError(f"{name}: expected a writeable array (k and v are appended in place), got a "
                                     f"read-only one")
    if seqlens_is_array:
        check_int32_array("cache_seqlens", got["cache_seqlens"], xp, q, (batch,), f"(batch,) = ({batch},)")
    elif cache_seqlens is not None and int(cache_seqlens) < 0:
        raise ValueError(f"cache_seqlens: expected an int >= 0, got {int(cache_seqlens)}")
    if isinstance(num_splits, bool) or not _is_int(num_splits):
        raise TypeError(f"num_splits: expected an int >= 0 (0: automatic), got {type(num_splits).__name__}")
    if int(num_splits) < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0: automatic), got {int(num_splits)}")
    causal = check_bool("causal", causal)
    return_softmax_lse = check_bool("return_softmax_lse", return_softmax_lse)
    view = xp.broadcast_to(k_cache[:1, :0], (batch, 0, nheads_k, head_dim)) if nblocks_or_batch else None
    if view is None:
        view = xp.zeros((batch, 0, nheads_k, head_dim), q.dtype)
    shape0 = check_qkv(q, view, view, softmax_scale, 0.0)
    slopes_in = got.get("alibi_slopes")
    features = check_features(xp, q, shape0, causal=causal, window_size=window_size, softcap=softcap,
                              alibi_slopes=slopes_in)
    hs, hbt = host_ints(xp, got.get("cache_seqlens"), bt)  # the one read of device memory
    if hs is None:
        hs = np.full(batch, capacity if cache_seqlens is None else int(cache_seqlens), np.int64)
    bad = np.flatnonzero(hs < 0)
    if bad.size:
        raise ValueError(f"cache_seqlens: expected entries >= 0, got cache_seqlens[{int(bad[0])}] = {int(hs[bad[0]])}")
    visible = hs + seqlen_new
    bad = np.flatnonzero(visible > capacity)
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"cache_seqlens: expected cache_seqlens[b] + seqlen_new <= the cache's capacity {capacity} "
                         f"({'max_blocks * page_size' if paged else 'seqlen_cache'}), got row {b}: {int(hs[b])} + "
                         f"{seqlen_new} = {int(visible[b])}")
    if paged:
        for b in range(batch):
            used = hbt[b, :-(-int(visible[b]) // page_size)]
            bad = np.flatnonzero((used < 0) | (used >= nblocks_or_batch))
            if bad.size:
                raise ValueError(f"block_table: expected the pages row {b} uses in [0, num_blocks = "
                                 f"{nblocks_or_batch}), got block_table[{b}, {int(bad[0])}] = {int(used[bad[0]])}")
    if k is not None and seqlen_new:
        _append(xp, k_cache, v_cache, got["k"], got["v"], hs, hbt, page_size if paged else None)
    if seqlen_q and _decode_kernels_take(xp, q, k_cache, v_cache):
        from . import _gpu_decode

        if seqlens_is_array:  # the visible lengths, on the device without a transfer
            vis = (got["cache_seqlens"] + seqlen_new).astype(np.int32)
        else:
            vis = xp.full(batch, int(visible[0]) if batch else 0, dtype=np.int32)
        out, lse = _gpu_decode.forward(q, k_cache, v_cache, vis, int(visible.max(initial=0)), shape0, causal=causal,
                                       features=features, num_splits=int(num_splits),
                                       block_table=xp.ascontiguousarray(bt) if paged else None,
                                       page_size=page_size if paged else 0)
        return (out, lse) if return_softmax_lse else out
    out = xp.zeros(q.shape, dtype=q.dtype)
    lse = xp.full((batch, nheads, seqlen_q), -np.inf, dtype=lse_dtype(q.dtype))
    for b in range(batch):
        n = int(visible[b])
        if n == 0 or seqlen_q == 0:
            continue
        kb, vb = (_visible_cache(xp, c, b, n, hbt, page_size if paged else None) for c in (k_cache, v_cache))
        sb = _chunked.sequence_shape(shape0, seqlen_q, n)
        ob, lb = _chunked.forward(q[b:b + 1], kb, vb, sb, causal=causal, xp=xp,
                                  features=_chunked.sequence_features(features, b))
        out[b], lse[b] = ob[0], lb[0]
    return (out, lse) if return_softmax_lse else out


def _decode_kernels_take(xp, q, k_cache, v_cache) -> bool:
    """CuPy inputs the split-KV decode kernels read in place (flashcupy._gpu_decode.supported), unless
    FLASHCUPY_DECODE=0 (the chunked path per row, for comparison)."""
    if xp is np or os.environ.get("FLASHCUPY_DECODE", "1") in ("0", ""):
        return False
    from . import _gpu_decode

    return _gpu_decode.supported(q, k_cache, v_cache)


def _visible_cache(xp, cache, b, n, block_table, page_size):
    """(1, n, nheads_k, head_dim): row b's first n cached positions (a view, or a gather of its pages)."""
    if page_size is None:
        return cache[b:b + 1, :n]
    pages = block_table[b, :-(-n // page_size)]
    gathered = cache[xp.asarray(pages)]  # (npages, page_size, nheads_k, head_dim)
    return gathered.reshape(1, -1, *cache.shape[2:])[:, :n]


def _append(xp, k_cache, v_cache, k, v, seqlens, block_table, page_size):
    """Write k[b], v[b] at positions [seqlens[b], seqlens[b] + seqlen_new) of row b, in place."""
    n = int(k.shape[1])
    for b in range(int(k.shape[0])):
        s = int(seqlens[b])
        if page_size is None:
            k_cache[b, s:s + n] = k[b]
            v_cache[b, s:s + n] = v[b]
        else:
            pos = np.arange(s, s + n)
            pages = xp.asarray(block_table[b, pos // page_size])
            slots = xp.asarray(pos % page_size)
            k_cache[pages, slots] = k[b]
            v_cache[pages, slots] = v[b]
