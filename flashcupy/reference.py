"""The float64 oracle: attention forward and backward in closed form, on NumPy.

This module is the specification of flashcupy. Every kernel, the chunked path and the tape are
tested against it. It materialises the full (batch, nheads, seqlen_q, seqlen_k) score matrix, so it
is for tests and small shapes only.

Shapes (BSHD, as flash-attn):
    q            (batch, seqlen_q, nheads, head_dim)
    k, v         (batch, seqlen_k, nheads_k, head_dim)      nheads % nheads_k == 0 (MQA / GQA)
    out, dout    (batch, seqlen_q, nheads, head_dim)
    lse          (batch, nheads, seqlen_q)                  natural-log logsumexp of the scaled scores
    mask         boolean, broadcastable to (batch, nheads, seqlen_q, seqlen_k); True = visible
    dropout_mask boolean keep-mask, broadcastable to (batch, nheads, seqlen_q, seqlen_k)

Equations (FlashAttention, Dao et al. 2022, arXiv 2205.14135, Sec. 2.2 and App. B.2):
    S = softmax_scale * Q K^T                    (masked entries = -inf)
    P = softmax(S) = exp(S - LSE),  LSE = log sum_j exp(S_j)
    O = (P o Z / (1 - p)) V                      (Z = dropout keep-mask; Z = 1 without dropout)
    dV = (P o Z / (1 - p))^T dO
    dP = (dO V^T) o Z / (1 - p)
    D  = rowsum(dO o O) = rowsum(P o dP)
    dS = P o (dP - D)
    dQ = softmax_scale * dS K,   dK = softmax_scale * dS^T Q
A query row with no visible key gives O = 0, LSE = -inf and zero gradients (never NaN).
Causal masking is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.
"""

from __future__ import annotations

import numpy as np

from . import _mask

__all__ = [
    "causal_mask",
    "attention_mask",
    "attention_probs",
    "attention_forward",
    "attention_backward",
]


def causal_mask(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """Bottom-right causal mask, bool (seqlen_q, seqlen_k): True where key j <= i + seqlen_k - seqlen_q."""
    return _mask.visible(np, np.arange(seqlen_q), np.arange(seqlen_k), seqlen_q, seqlen_k, causal=True)


def attention_mask(batch, nheads, seqlen_q, seqlen_k, *, causal=False, mask=None) -> np.ndarray:
    """The visibility mask, bool (batch, nheads, seqlen_q, seqlen_k): causal AND the element mask."""
    visible = np.ones((batch, nheads, seqlen_q, seqlen_k), dtype=bool)
    if causal:
        visible &= causal_mask(seqlen_q, seqlen_k)
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


def attention_probs(q, k, *, softmax_scale=None, causal=False, mask=None):
    """Softmax probabilities P and LSE, float64.

    Returns P (batch, nheads, seqlen_q, seqlen_k) with rows summing to 1 where any key is visible
    and 0 otherwise, and LSE (batch, nheads, seqlen_q) with -inf on rows with no visible key.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    qh, kh, _ = _heads_first(q, k, k)
    visible = attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal, mask=mask)
    p, lse, _, _ = softmax_rows(np.where(visible, scale * (qh @ kh.transpose(0, 1, 3, 2)), -np.inf))
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


def attention_forward(q, k, v, *, softmax_scale=None, causal=False, mask=None,
                      dropout_mask=None, dropout_p=0.0):
    """Oracle forward. Returns (out (B, Sq, H, D) float64, lse (B, H, Sq) float64).

    dropout_mask, if given, is the keep-mask Z; kept probabilities are scaled by 1 / (1 - dropout_p).
    """
    _, _, vh = _heads_first(q, k, v)
    p, lse = attention_probs(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask)
    if dropout_mask is not None:
        p = p * np.asarray(dropout_mask, dtype=bool) / (1.0 - dropout_p)
    out = (p @ vh).transpose(0, 2, 1, 3)
    return out, lse


def attention_backward(dout, q, k, v, *, softmax_scale=None, causal=False, mask=None,
                       dropout_mask=None, dropout_p=0.0):
    """Oracle backward. Returns (dq, dk, dv), float64, shaped like q, k, v.

    dk and dv are summed over the query heads that share a key/value head (MQA / GQA).
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    qh, kh, vh = _heads_first(q, k, v)
    do = np.asarray(dout, dtype=np.float64).transpose(0, 2, 1, 3)
    p, _ = attention_probs(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask)
    keep = 1.0 if dropout_mask is None else np.asarray(dropout_mask, dtype=bool) / (1.0 - dropout_p)
    p_dropped = p * keep
    dv = p_dropped.transpose(0, 1, 3, 2) @ do
    dp = (do @ vh.transpose(0, 1, 3, 2)) * keep
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = scale * ds @ kh
    dk = scale * ds.transpose(0, 1, 3, 2) @ qh

    def to_bshd_kv(x):  # (B, H, Sk, D) -> sum over each group -> (B, Sk, Hk, D)
        x = x.reshape(batch, nheads_k, nheads // nheads_k, *x.shape[2:]).sum(axis=2)
        return x.transpose(0, 2, 1, 3)

    return dq.transpose(0, 2, 1, 3), to_bshd_kv(dk), to_bshd_kv(dv)
