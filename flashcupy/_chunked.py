"""Exact attention computed in chunks of query rows: the CPU path (and the GPU path for dtypes with
no fused kernel yet). One code path for NumPy and CuPy: the array module follows the inputs.

Memory is O(chunk * seqlen_k) per (batch, head), never O(seqlen_q * seqlen_k): each chunk of query
rows sees every key at once, so the softmax is exact and needs no online rescaling. The equations
are those of flashcupy.reference, evaluated in float32 (float64 for float64 inputs), with the score
features of issue 16 (flashcupy._features.Features: sliding window, softcap, ALiBi, sinks) through
the oracle's own score modifier (flashcupy._features.score_mod). With a sliding window a chunk
computes only the keys its rows can see (flashcupy._mask.key_range), so time and memory fall with
the window's width, and a causal chunk stops at its last row's diagonal.

Layout inside: heads are grouped as (batch, nheads_k, group, seqlen, head_dim), so MQA/GQA needs no
repeat of k and v, and dk, dv come out summed over the group by the matmul itself.
"""

from __future__ import annotations

import numpy as np

from . import _features, _mask
from ._arrays import lse_dtype

# Bytes of float temporaries a chunk may hold (about four (B, H, chunk, Sk) arrays live at once).
CHUNK_BYTES = 64 << 20


def compute_dtype(dt):
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


def chunk_rows(shape, itemsize, budget=None) -> int:
    # Read CHUNK_BYTES at call time (not as a default argument) so it can be tuned and monkeypatched.
    budget = CHUNK_BYTES if budget is None else budget
    per_row = 4 * shape.batch * shape.nheads * max(shape.seqlen_k, 1) * itemsize
    return int(max(1, min(shape.seqlen_q, budget // per_row)))


def _grouped(x, nheads_k, xp, dt):
    """(B, S, H, D) -> (B, Hk, G, S, D) in the compute dtype."""
    b, s, h, d = x.shape
    return xp.asarray(x).astype(dt, copy=False).reshape(b, s, nheads_k, h // nheads_k, d).transpose(0, 2, 3, 1, 4)


def _ungroup(x):
    """(B, Hk, G, c, D) -> (B, c, H, D)."""
    b, hk, g, c, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, c, hk * g, d)


def _per_head(x, shape, dt):
    """A (H,) or (B, H) feature array as (B | 1, Hk, G, 1, 1) in the compute dtype (h = hk * G + g)."""
    lead = 1 if x.ndim == 1 else x.shape[0]
    return x.astype(dt, copy=False).reshape(lead, shape.nheads_k, shape.group, 1, 1)


def _keys(shape, i0, i1, causal, features):
    """(j0, j1): the key columns rows [i0, i1) compute: those any of them can see under causal and the
    sliding window (flashcupy._mask.key_range), all of them without either. A causal call so computes
    about half the scores of a non-causal one instead of all of them (issue 18: it was the slower)."""
    if not causal and features.window == (-1, -1):
        return 0, shape.seqlen_k
    return _mask.key_range(i0, i1, shape.seqlen_q, shape.seqlen_k, causal, features.window)


def _visible(xp, shape, i0, i1, causal, visible_fn, window=(-1, -1), keys=None):
    """Boolean visibility of rows [i0, i1) against keys [j0, j1) (default all), broadcastable to
    (B, Hk, G, c, j1 - j0); None if all."""
    j0, j1 = (0, shape.seqlen_k) if keys is None else keys
    vis = None
    if causal or window != (-1, -1):
        vis = _mask.visible(xp, xp.arange(i0, i1), xp.arange(j0, j1), shape.seqlen_q, shape.seqlen_k, causal, window)
    if visible_fn is not None:
        m = visible_fn(i0, i1)  # broadcastable to (B, H, c, Sk)
        m = xp.broadcast_to(m, (m.shape[0], shape.nheads, i1 - i0, shape.seqlen_k))[..., j0:j1]
        m = m.reshape(m.shape[0], shape.nheads_k, shape.group, i1 - i0, j1 - j0)
        vis = m if vis is None else (vis & m)
    return vis


def _scores(xp, qc, kg, shape, i0, i1, causal, visible_fn, features=_features.NONE, slopes=None, keys=None):
    """(S', t): the scores of rows [i0, i1) against keys [j0, j1) (default all), (B, Hk, G, c, j1 - j0),
    modified (softcap, ALiBi: _features.score_mod) and -inf where not visible; t = tanh(S / softcap) or None."""
    j0, j1 = (0, shape.seqlen_k) if keys is None else keys
    # the scale on the (c, D) rows rather than on the (c, Sk) scores: one pass less over the scores
    s = (qc * qc.dtype.type(shape.softmax_scale)) @ kg[:, :, :, j0:j1].swapaxes(-1, -2)  # (B, Hk, G, c, Sk)
    s, t = _features.score_mod(xp, s, features.softcap, slopes, xp.arange(i0, i1), xp.arange(j0, j1),
                               shape.seqlen_q, shape.seqlen_k)
    vis = _visible(xp, shape, i0, i1, causal, visible_fn, features.window, (j0, j1))
    if vis is not None:
        xp.copyto(s, -xp.inf, where=~vis)  # in place (s is a fresh array here)
    return s, t


def forward(q, k, v, shape, *, causal=False, visible_fn=None, keep_fn=None, dropout_p=0.0, xp=np,
            features=_features.NONE):
    """Returns (out like q, lse (B, H, Sq) float32 or float64). keep_fn(i0, i1) gives the dropout keep-mask.
    features: a validated flashcupy._features.Features; with sinks, lse includes them (a row with no
    visible key gets out 0, lse = its head's sink)."""
    dt = compute_dtype(q.dtype)
    qg, kg, vg = (_grouped(x, shape.nheads_k, xp, dt) for x in (q, k, v))
    slopes = None if features.alibi_slopes is None else _per_head(features.alibi_slopes, shape, dt)
    sink = None if features.sinks is None else _per_head(features.sinks, shape, dt)  # (1, Hk, G, 1, 1)
    out = xp.empty((shape.batch, shape.seqlen_q, shape.nheads, shape.head_dim), dtype=dt)
    lse = xp.empty((shape.batch, shape.nheads_k, shape.group, shape.seqlen_q), dtype=dt)
    step = chunk_rows(shape, dt.itemsize)
    for i0 in range(0, shape.seqlen_q, step):
        i1 = min(i0 + step, shape.seqlen_q)
        j0, j1 = _keys(shape, i0, i1, causal, features)
        if j0 >= j1:  # no row of the chunk sees a key: out 0, lse the sink (or -inf)
            out[:, i0:i1] = 0
            lse[..., i0:i1] = -xp.inf if sink is None else sink[..., 0]
            continue
        s, _ = _scores(xp, qg[:, :, :, i0:i1], kg, shape, i0, i1, causal, visible_fn, features, slopes, (j0, j1))
        m = s.max(axis=-1, keepdims=True)
        if sink is not None:  # the sink joins the row: max(-inf, m) and l + exp(-inf) leave a -inf sink bitwise out
            m = xp.maximum(m, sink)
        m = xp.where(m == -xp.inf, 0.0, m)  # rows with no visible key: keep exp() finite
        s -= m
        p = xp.exp(s, out=s)  # in place: P unnormalized
        l = p.sum(axis=-1, keepdims=True)
        if sink is not None:
            l = l + xp.exp(sink - m)
        lse[..., i0:i1] = xp.where(l > 0, xp.log(xp.where(l > 0, l, 1.0)) + m, -xp.inf)[..., 0]
        if keep_fn is not None:
            p *= _keep(xp, keep_fn, shape, i0, i1, (j0, j1)) * (1.0 / (1.0 - dropout_p))
        # out = (P / l) V computed as (P V) / l: the division on (c, D) instead of (c, Sk)
        out[:, i0:i1] = _ungroup((p @ vg[:, :, :, j0:j1]) / xp.where(l > 0, l, 1.0))
    lse = lse.reshape(shape.batch, shape.nheads, shape.seqlen_q)
    return out.astype(q.dtype, copy=False), lse.astype(lse_dtype(q.dtype), copy=False)


def _keep(xp, keep_fn, shape, i0, i1, keys=None):
    z = xp.asarray(keep_fn(i0, i1))  # (B, H, c, Sk)
    z = z.reshape(shape.batch, shape.nheads_k, shape.group, i1 - i0, shape.seqlen_k)
    return z if keys is None or keys == (0, shape.seqlen_k) else z[..., keys[0]:keys[1]]


def backward(dout, q, k, v, out, lse, shape, *, causal=False, visible_fn=None, keep_fn=None,
             dropout_p=0.0, xp=np, features=_features.NONE):
    """Returns (dq, dk, dv) like q, k, v; P is recomputed from lse (nothing Sq x Sk is kept). The sinks'
    gradient is not computed here (flashcupy.interface.sink_grad, one function for every path)."""
    dt = compute_dtype(q.dtype)
    qg, kg, vg, dog, og = (_grouped(x, shape.nheads_k, xp, dt) for x in (q, k, v, dout, out))
    slopes = None if features.alibi_slopes is None else _per_head(features.alibi_slopes, shape, dt)
    lse_g = xp.asarray(lse).astype(dt).reshape(shape.batch, shape.nheads_k, shape.group, shape.seqlen_q, 1)
    lse_g = xp.where(lse_g == -xp.inf, 0.0, lse_g)  # empty rows: every score is -inf, so P = 0 anyway
    delta = (dog * og).sum(axis=-1, keepdims=True)  # D = rowsum(dO o O), (B, Hk, G, Sq, 1)
    dq = xp.empty((shape.batch, shape.seqlen_q, shape.nheads, shape.head_dim), dtype=dt)
    dk = xp.zeros((shape.batch, shape.nheads_k, shape.seqlen_k, shape.head_dim), dtype=dt)
    dv = xp.zeros_like(dk)
    step = chunk_rows(shape, dt.itemsize)
    for i0 in range(0, shape.seqlen_q, step):
        i1 = min(i0 + step, shape.seqlen_q)
        j0, j1 = _keys(shape, i0, i1, causal, features)
        if j0 >= j1:  # no visible key: no gradient
            dq[:, i0:i1] = 0
            continue
        qc, doc = qg[:, :, :, i0:i1], dog[:, :, :, i0:i1]
        s, t = _scores(xp, qc, kg, shape, i0, i1, causal, visible_fn, features, slopes, (j0, j1))
        s -= lse_g[:, :, :, i0:i1]
        p = xp.exp(s, out=s)  # in place (the scores are not needed again)
        vc = vg[:, :, :, j0:j1]
        dp = doc @ vc.swapaxes(-1, -2)
        if keep_fn is not None:
            z = _keep(xp, keep_fn, shape, i0, i1, (j0, j1)) * (1.0 / (1.0 - dropout_p))
            dv[:, :, j0:j1] += ((p * z).swapaxes(-1, -2) @ doc).sum(axis=2)
            dp *= z
        else:
            dv[:, :, j0:j1] += (p.swapaxes(-1, -2) @ doc).sum(axis=2)
        dp -= delta[:, :, :, i0:i1]
        dp *= p  # dS' = P o (dP - D), in place
        ds = _features.softcap_grad(dp, t)
        dq[:, i0:i1] = _ungroup((ds @ kg[:, :, :, j0:j1]) * shape.softmax_scale)
        dk[:, :, j0:j1] += (ds.swapaxes(-1, -2) @ qc).sum(axis=2) * shape.softmax_scale
    dk = dk.transpose(0, 2, 1, 3)
    dv = dv.transpose(0, 2, 1, 3)
    return dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False), dv.astype(v.dtype, copy=False)


# ---------------------------------------------------------------------------------------------------
# Variable-length batches (issue 17): each sequence is one dense problem of batch 1 on slices of the
# packed arrays, through forward / backward above (so a sequence gives the bits it gives alone).


def sequence_shape(shape, len_q: int, len_k: int):
    """The AttnShape of one sequence of a varlen call: batch 1, its own lengths, the call's heads."""
    from ._validate import AttnShape

    return AttnShape(1, int(len_q), int(len_k), shape.nheads, shape.nheads_k, shape.head_dim, shape.softmax_scale)


def sequence_features(features, b: int):
    """The call's Features for sequence b: (batch, nheads) ALiBi slopes become that sequence's row."""
    slopes = features.alibi_slopes
    if slopes is None or slopes.ndim == 1:
        return features
    return _features.Features(window=features.window, softcap=features.softcap, alibi_slopes=slopes[b:b + 1],
                              sinks=features.sinks)


def varlen_forward(q, k, v, bounds, shape, *, causal=False, keep_fn_of=None, dropout_p=0.0, xp=np,
                   features=_features.NONE):
    """q (total_q, H, D), k, v (total_k, Hk, D); bounds: host (q0, q1, k0, k1) per sequence (q rows
    [q0, q1) attend keys [k0, k1)); shape: the call's AttnShape (heads, head_dim, scale). keep_fn_of(b,
    shape_b): sequence b's keep_fn (dropout). Returns out like q (rows of no sequence, or of a sequence
    with no key: 0) and lse (H, total_q) (-inf there, or the sink)."""
    out = xp.zeros(q.shape, dtype=q.dtype)
    lse = xp.full((shape.nheads, q.shape[0]), -np.inf, dtype=lse_dtype(q.dtype))
    for b, (q0, q1, k0, k1) in enumerate(bounds):
        if q1 == q0:
            continue
        sb = sequence_shape(shape, q1 - q0, k1 - k0)
        o, l = forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], sb, causal=causal,
                       keep_fn=None if keep_fn_of is None else keep_fn_of(b, sb), dropout_p=dropout_p, xp=xp,
                       features=sequence_features(features, b))
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l[0]
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, bounds, shape, *, causal=False, keep_fn_of=None, dropout_p=0.0, xp=np,
                    features=_features.NONE):
    """The gradients of varlen_forward: (dq, dk, dv) like q, k, v; keys no sequence attends get 0."""
    dq = xp.zeros(q.shape, dtype=q.dtype)
    dk = xp.zeros(k.shape, dtype=k.dtype)
    dv = xp.zeros(v.shape, dtype=v.dtype)
    for b, (q0, q1, k0, k1) in enumerate(bounds):
        if q1 == q0 or k1 == k0:
            continue
        sb = sequence_shape(shape, q1 - q0, k1 - k0)
        g = backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
                     lse[None, :, q0:q1], sb, causal=causal, keep_fn=None if keep_fn_of is None else keep_fn_of(b, sb),
                     dropout_p=dropout_p, xp=xp, features=sequence_features(features, b))
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv
