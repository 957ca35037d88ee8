"""The float64 oracle: attention forward and backward in closed form, on NumPy.

This module is the specification of flashcupy. Every kernel, the chunked path and the tape are
tested against it. It materialises the full (batch, nheads, seqlen_q, seqlen_k) score matrix, so it
is for tests and small shapes only.

Shapes (BSHD, as flash-attn):
    q            (batch, seqlen_q, nheads, head_dim)
    k, v         (batch, seqlen_k, nheads_k, head_dim)      nheads % nheads_k == 0 (MQA / GQA)
    out, dout    (batch, seqlen_q, nheads, head_dim)
    lse          (batch, nheads, seqlen_q)                  natural-log logsumexp of the scores S'
                                                            (and of the sink, when there is one)
    mask         boolean, broadcastable to (batch, nheads, seqlen_q, seqlen_k); True = visible
    dropout_mask boolean keep-mask, broadcastable to (batch, nheads, seqlen_q, seqlen_k)
    alibi_slopes (nheads,) or (batch, nheads)               any float dtype here (read as float64)
    sinks        (nheads,)                                  any float dtype here (read as float64)

Equations (FlashAttention, Dao et al. 2022, arXiv 2205.14135, Sec. 2.2 and App. B.2), with the score
features of flash-attn (softcap, ALiBi, sliding window) and learnable sinks (issue 16):
    S  = softmax_scale * Q K^T
    S' = c tanh(S / c)                           softcap c > 0 (else S' = S; Gemma 2, flash-attn)
    S' = S' - slope_h |i + Sk - Sq - j|          ALiBi (arXiv 2108.12409, flash-attn's sign and
                                                 bottom-right alignment), after the softcap
    S' = -inf where masked                       causal, window, element mask: after both
    LSE = log(sum_j exp(S'_j) + exp(sink_h))     sink_h: the head's sink logit (-inf, i.e. no term,
                                                 without sinks)
    P = exp(S' - LSE)                            (rows sum to 1 - P_sink, P_sink = exp(sink_h - LSE))
    O = (P o Z / (1 - p)) V                      (Z = dropout keep-mask; Z = 1 without dropout)
    dV = (P o Z / (1 - p))^T dO
    dP = (dO V^T) o Z / (1 - p)
    D  = rowsum(dO o O) = rowsum(P o dP)
    dS' = P o (dP - D)
    dS = dS' o (1 - tanh^2(S / c))               (dS = dS' without softcap; ALiBi adds a constant)
    dQ = softmax_scale * dS K,   dK = softmax_scale * dS^T Q
    dsink_h = -sum over (b, i) of P_sink[b, h, i] * D[b, h, i]

Derivation of dsink: the sink is a logit whose value vector is 0, so LSE_i depends on it through
exp(sink_h) and O_i does not directly. d LSE_i / d sink_h = exp(sink_h - LSE_i) = P_sink_i, so
d P_ij / d sink_h = -P_ij P_sink_i, hence d O_i / d sink_h = -P_sink_i O_i (dropout's Z / (1 - p)
multiplies P_ij and is constant: the identity holds with dropout), and
d L / d sink_h = sum over (b, i) of dO_i . d O_i / d sink_h = -sum P_sink_i (dO_i . O_i) = -sum P_sink_i D_i.
(The same as the softmax backward of the row extended by a sink column with dP_sink = 0:
dS'_sink = P_sink (0 - D).) The sink changes dS' only through P: dS' = P o (dP - D) still holds, with
D = rowsum(P o dP) over the keys.

Visibility (flashcupy._mask, flash-attn's, offset = seqlen_k - seqlen_q, bottom-right aligned): query i
sees key j iff j < seqlen_k, and j <= i + offset (causal), and i + offset - left <= j <= i + offset +
right (window_size (left, right), -1 leaving a side unbounded), and the element mask says so.
A query row with no visible key gives O = 0, LSE = -inf and zero gradients (never NaN); with a sink it
gives O = 0 and LSE = sink_h (P_sink = 1, D = 0: no contribution to dsink).

Variable-length batches (flash-attn's varlen layout, issue 17) are per-sequence dense attention, by
definition: sequence b holds query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q (total_q, nheads,
head_dim) and keys [cu_seqlens_k[b], cu_seqlens_k[b] + n_b) of k, v (total_k, nheads_k, head_dim),
n_b = seqused_k[b] if given else the length in cu_seqlens_k; it is the dense problem of batch 1 on
those slices (causal and window bottom-right within the sequence, ALiBi's row b). LSE is (nheads,
total_q). A sequence with no query row contributes nothing; one with no key gives O = 0, LSE = -inf
(or the sink) and zero gradients; keys no sequence attends get zero gradients.
"""

from __future__ import annotations

import numpy as np

from . import _features, _mask

__all__ = [
    "causal_mask",
    "attention_mask",
    "attention_scores",
    "attention_probs",
    "attention_forward",
    "attention_backward",
    "varlen_attention_forward",
    "varlen_attention_backward",
]


def causal_mask(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """Bottom-right causal mask, bool (seqlen_q, seqlen_k): True where key j <= i + seqlen_k - seqlen_q."""
    return _mask.visible(np, np.arange(seqlen_q), np.arange(seqlen_k), seqlen_q, seqlen_k, causal=True)


def attention_mask(batch, nheads, seqlen_q, seqlen_k, *, causal=False, mask=None, window_size=(-1, -1)) -> np.ndarray:
    """The visibility mask, bool (batch, nheads, seqlen_q, seqlen_k): causal AND the sliding window
    (window_size (left, right): i + offset - left <= j <= i + offset + right, -1 unbounded, offset =
    seqlen_k - seqlen_q) AND the element mask."""
    visible = np.ones((batch, nheads, seqlen_q, seqlen_k), dtype=bool)
    band = _mask.visible(np, np.arange(seqlen_q), np.arange(seqlen_k), seqlen_q, seqlen_k, causal,
                         tuple(window_size))
    if band is not None:
        visible &= band
    if mask is not None:
        visible &= np.asarray(mask, dtype=bool)
    return visible


def _heads_first(q, k, v):
    """float64 (B, H, S, D) copies; k and v repeated to nheads along the head axis (GQA)."""
    group = q.shape[2] // k.shape[2]
    qh = np.asarray(q, dtype=np.float64).transpose(0, 2, 1, 3)
    kh = np.repeat(np.asarray(k, dtype=np.float64).transpose(0, 2, 1, 3), group, axis=1)
    vh = np.repeat(np.asarray(v, dtype=np.float64).transpose(0, 2, 1, 3), group, axis=1)
    return qh, kh, vh


def _slopes(alibi_slopes, batch, nheads):
    """ALiBi slopes as float64 (B | 1, H, 1, 1), or None."""
    if alibi_slopes is None:
        return None
    s = np.asarray(alibi_slopes, dtype=np.float64)
    return s.reshape((1 if s.ndim == 1 else batch), nheads, 1, 1)


def attention_scores(q, k, *, softmax_scale=None, causal=False, mask=None, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None):
    """The scores that enter the softmax, float64: (S', visible, t).

    S' (batch, nheads, seqlen_q, seqlen_k): softcap, then ALiBi, applied to S = softmax_scale * Q K^T
    (module docstring), -inf where not visible; visible the boolean mask (attention_mask); t =
    tanh(S / softcap) (same shape) for the softcap derivative 1 - t^2, or None without softcap.
    softcap (float >= 0, 0 off) and alibi_slopes ((nheads,) or (batch, nheads)) as flash-attn.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    qh, kh, _ = _heads_first(q, k, k)
    visible = attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal, mask=mask, window_size=window_size)
    s, t = _features.score_mod(np, scale * (qh @ kh.transpose(0, 1, 3, 2)), float(softcap),
                               _slopes(alibi_slopes, batch, nheads), np.arange(seqlen_q), np.arange(seqlen_k),
                               seqlen_q, seqlen_k)
    return np.where(visible, s, -np.inf), visible, t


def _softmax_with_sink(s, sinks):
    """softmax_rows of s, with the sink logits (H,) joining each row as one more column without a
    value. Returns (p (B, H, Sq, Sk), lse (B, H, Sq), p_sink (B, H, Sq) or None)."""
    if sinks is None:
        p, lse, _, _ = softmax_rows(s)
        return p, lse, None
    sink = np.broadcast_to(np.asarray(sinks, dtype=np.float64).reshape(1, -1, 1, 1), (*s.shape[:3], 1))
    p, lse, _, _ = softmax_rows(np.concatenate([s, sink], axis=-1))
    return p[..., :-1], lse, p[..., -1]


def attention_probs(q, k, *, softmax_scale=None, causal=False, mask=None, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, sinks=None):
    """Softmax probabilities P and LSE, float64.

    Returns P (batch, nheads, seqlen_q, seqlen_k) and LSE (batch, nheads, seqlen_q). Without sinks the
    rows of P sum to 1 where any key is visible and are 0 otherwise, and LSE is -inf on rows with no
    visible key. With sinks (nheads,) the rows sum to 1 - P_sink, P_sink = exp(sinks[h] - LSE), and LSE
    includes the sink (LSE = sinks[h] on a row with no visible key). Options as attention_scores.
    """
    s, _, _ = attention_scores(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask, window_size=window_size,
                               softcap=softcap, alibi_slopes=alibi_slopes)
    p, lse, _ = _softmax_with_sink(s, sinks)
    return p, lse


def softmax_rows(s):
    """The softmax over the last axis of scores s (-inf where masked), in s's dtype (the oracle's
    float64; flashcupy.testing's naive attention in float32). Returns (p, lse, e, denom): p = e / denom
    (0 on rows with no visible key), lse = log(denom) + row max (-inf there), e = exp(s - row max), and
    denom = the row sums of e (1 on empty rows, so that dividing by it is safe)."""
    row_max = s.max(axis=-1, initial=-np.inf, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # empty rows: avoid inf - inf
    e = np.exp(s - row_max)
    denom = e.sum(axis=-1, keepdims=True)
    has_key = denom > 0
    denom = np.where(has_key, denom, 1.0)
    p = np.where(has_key, e / denom, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(has_key, np.log(denom) + row_max, -np.inf)[..., 0]
    return p, lse, e, denom


def attention_forward(q, k, v, *, softmax_scale=None, causal=False, mask=None, dropout_mask=None, dropout_p=0.0,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Oracle forward. Returns (out (B, Sq, H, D) float64, lse (B, H, Sq) float64).

    dropout_mask, if given, is the keep-mask Z; kept probabilities are scaled by 1 / (1 - dropout_p).
    window_size, softcap, alibi_slopes, sinks: the module docstring's equations (flash-attn's names).
    """
    _, _, vh = _heads_first(q, k, v)
    p, lse = attention_probs(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    if dropout_mask is not None:
        p = p * np.asarray(dropout_mask, dtype=bool) / (1.0 - dropout_p)
    out = (p @ vh).transpose(0, 2, 1, 3)
    return out, lse


def attention_backward(dout, q, k, v, *, softmax_scale=None, causal=False, mask=None, dropout_mask=None,
                       dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Oracle backward. Returns (dq, dk, dv), float64, shaped like q, k, v; with sinks (dq, dk, dv,
    dsinks), dsinks float64 (nheads,) = -sum over (b, i) of P_sink * D (module docstring).

    dk and dv are summed over the query heads that share a key/value head (MQA / GQA).
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    qh, kh, vh = _heads_first(q, k, v)
    do = np.asarray(dout, dtype=np.float64).transpose(0, 2, 1, 3)
    s, _, t = attention_scores(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask, window_size=window_size,
                               softcap=softcap, alibi_slopes=alibi_slopes)
    p, _, p_sink = _softmax_with_sink(s, sinks)
    keep = 1.0 if dropout_mask is None else np.asarray(dropout_mask, dtype=bool) / (1.0 - dropout_p)
    p_dropped = p * keep
    dv = p_dropped.transpose(0, 1, 3, 2) @ do
    dp = (do @ vh.transpose(0, 1, 3, 2)) * keep
    delta = (p * dp).sum(axis=-1, keepdims=True)  # D = rowsum(P o dP) = rowsum(dO o O)
    ds = _features.softcap_grad(p * (dp - delta), t)
    dq = scale * ds @ kh
    dk = scale * ds.transpose(0, 1, 3, 2) @ qh

    def to_bshd_kv(x):  # (B, H, Sk, D) -> sum over each group -> (B, Sk, Hk, D)
        x = x.reshape(batch, nheads_k, nheads // nheads_k, *x.shape[2:]).sum(axis=2)
        return x.transpose(0, 2, 1, 3)

    grads = (dq.transpose(0, 2, 1, 3), to_bshd_kv(dk), to_bshd_kv(dv))
    if sinks is None:
        return grads
    dsinks = -(p_sink * delta[..., 0]).sum(axis=(0, 2))  # (H,)
    return (*grads, dsinks)


def _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k=None):
    """[(q0, q1, k0, k1)] per sequence from host cu_seqlens (and seqused_k)."""
    cq, ck = (np.asarray(c, dtype=np.int64) for c in (cu_seqlens_q, cu_seqlens_k))
    used = np.diff(ck) if seqused_k is None else np.asarray(seqused_k, dtype=np.int64)
    return [(int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b] + used[b])) for b in range(len(cq) - 1)]


def _sequence_kw(kw, b, q0, q1, k0, k1, dropout_mask):
    """The dense keywords of sequence b: ALiBi's row b, the padded dropout mask's corner."""
    kw = dict(kw)
    slopes = kw.get("alibi_slopes")
    if slopes is not None and np.ndim(slopes) == 2:
        kw["alibi_slopes"] = np.asarray(slopes)[b:b + 1]
    if dropout_mask is not None:
        kw["dropout_mask"] = np.asarray(dropout_mask, dtype=bool)[b:b + 1, :, :q1 - q0, :k1 - k0]
    return kw


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None, dropout_mask=None, **kw):
    """Oracle varlen forward: each sequence through attention_forward (module docstring). q (total_q,
    nheads, head_dim), k, v (total_k, nheads_k, head_dim); cu_seqlens int (batch + 1,); seqused_k int
    (batch,) or None. dropout_mask: the keep-mask, broadcastable to (batch, nheads, max_seqlen_q,
    max_seqlen_k) (sequence b reads its corner [b, :, :len_q, :len_k]). kw: attention_forward's
    (softmax_scale, causal, window_size, softcap, alibi_slopes (nheads,) or (batch, nheads), sinks,
    dropout_p). Returns (out (total_q, nheads, head_dim) float64, lse (nheads, total_q) float64)."""
    nheads = q.shape[1]
    out = np.zeros(q.shape, dtype=np.float64)
    lse = np.full((nheads, q.shape[0]), -np.inf)
    if kw.get("sinks") is not None:
        lse[...] = np.asarray(kw["sinks"], dtype=np.float64)[:, None]
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k, seqused_k)):
        if q1 > q0 and k1 > k0:
            o, l = attention_forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                     **_sequence_kw(kw, b, q0, q1, k0, k1, dropout_mask))
            out[q0:q1], lse[:, q0:q1] = o[0], l[0]
    return out, lse


def varlen_attention_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None, dropout_mask=None,
                              **kw):
    """Oracle varlen backward: (dq, dk, dv) float64 like q, k, v (and dsinks (nheads,), summed over the
    sequences, with sinks), each sequence through attention_backward; arguments as
    varlen_attention_forward."""
    dq, dk, dv = (np.zeros(x.shape) for x in (q, k, v))
    dsinks = None if kw.get("sinks") is None else np.zeros(q.shape[1])
    for b, (q0, q1, k0, k1) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k, seqused_k)):
        if q1 > q0 and k1 > k0:
            g = attention_backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                   **_sequence_kw(kw, b, q0, q1, k0, k1, dropout_mask))
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
            if dsinks is not None:
                dsinks += g[3]
    return (dq, dk, dv) if dsinks is None else (dq, dk, dv, dsinks)
