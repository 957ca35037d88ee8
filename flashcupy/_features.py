"""The score and mask features of one attention call (issue 16): sliding window, softcap, ALiBi and
learnable attention sinks, as one immutable record that travels from the public API to every path
(the kernels' AttnParams, the chunked path, the oracle), so all of them read the same values.

    Features(window=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None)

Semantics (flash-attn's; offset = seqlen_k - seqlen_q, the diagonal aligned bottom-right):
- window_size (left, right): query i sees key j iff i + offset - left <= j <= i + offset + right;
  -1 leaves that side unbounded; causal=True is right = 0 (flashcupy._mask states the rule).
- softcap >= 0 (0: off): the scaled score s = softmax_scale * q.k becomes softcap * tanh(s / softcap)
  before the softmax; its derivative 1 - tanh^2 multiplies dS.
- alibi_slopes float32 (nheads,) or (batch, nheads): adds -slope * |i + offset - j| to the scaled
  (and capped) score.
- sinks float32 (nheads,): one logit per head that joins every row's softmax denominator without a
  value vector; lse includes it.

FEAT_* are the compile-time feature bits of a kernel specialization (cuda/flash_mask.cuh mirrors
them); Features.bits is the set a call needs.
"""

from __future__ import annotations

from dataclasses import dataclass

FEAT_LOCAL = 1    # sliding window: Mask reads p.mask.window_left / window_right
FEAT_SOFTCAP = 2  # ScoreMod: softcap * tanh(s / softcap)
FEAT_ALIBI = 4    # ScoreMod: - slope * |i + offset - j|
FEAT_SINK = 8     # epilogue: the sink joins the softmax denominator and the lse
FEAT_VARLEN = 16  # packed sequences (cu_seqlens): flash_mask.cuh's seq_of (the mma.sync forward only)
FEAT_ALL = FEAT_LOCAL | FEAT_SOFTCAP | FEAT_ALIBI | FEAT_SINK


@dataclass(frozen=True, eq=False)
class Features:
    """Validated features of one call (flashcupy._validate builds it; arrays live on the inputs' device
    as contiguous float32). eq=False: compared by flashcupy.interface's contract check, field by field
    (arrays by data pointer, never by value: that would synchronise with the GPU)."""

    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: object = None  # float32 (nheads,) or (batch, nheads), or None
    sinks: object = None         # float32 (nheads,), or None

    @property
    def bits(self) -> int:
        """The FEAT_* bits a kernel needs for this call (0: the plain kernels)."""
        return ((FEAT_LOCAL if tuple(self.window) != (-1, -1) else 0) | (FEAT_SOFTCAP if self.softcap > 0 else 0)
                | (FEAT_ALIBI if self.alibi_slopes is not None else 0) | (FEAT_SINK if self.sinks is not None else 0))


NONE = Features()


# ---------------------------------------------------------------------------------------------------
# The score modifier, once, on xp arrays (NumPy or CuPy): the oracle (flashcupy.reference), the
# chunked path (flashcupy._chunked) and the tape's naive attention all call these, so there is one
# formula. cuda/flash_mask.cuh's ScoreMod states the same for the kernels.


def alibi_bias(xp, slopes, rows, keys, seqlen_q: int, seqlen_k: int):
    """The ALiBi term -slope * |i + seqlen_k - seqlen_q - j| (flash-attn's convention, bottom-right
    aligned like the causal mask; Press et al. 2022, arXiv 2108.12409), in slopes' dtype.

    slopes: the per-head slopes already shaped to broadcast against the scores with two trailing
    axes of size 1 (e.g. (B | 1, H, 1, 1)); rows, keys: 1-D integer arrays of query and key indices.
    Returns an array broadcastable to (..., len(rows), len(keys)). The distance is an exact integer
    (converted to slopes' dtype: exact below 2^24 in float32), so the term is one rounding of a product.
    """
    dist = xp.abs(xp.asarray(rows)[:, None] + (seqlen_k - seqlen_q) - xp.asarray(keys)[None, :])
    return -(slopes * dist.astype(slopes.dtype))


def score_mod(xp, s, softcap: float, slopes, rows, keys, seqlen_q: int, seqlen_k: int):
    """The scores that enter the softmax, from the scaled scores s = softmax_scale * q.k (..., rows, keys):

        S' = softcap * tanh(s / softcap)          (softcap > 0; flash-attn's tanh soft-capping, Gemma 2)
        S' = S' - slope * |i + offset - j|        (ALiBi, slopes not None; offset = seqlen_k - seqlen_q)

    in that order (flash-attn: softcap, then the ALiBi bias, then the mask), in s's dtype. The mask is
    applied by the caller afterwards (masked entries become -inf). Returns (S', t) with t = tanh(s /
    softcap) (None without softcap): the backward multiplies dS' by dS'/ds = 1 - t^2 (the ALiBi term
    does not depend on s). With softcap 0 and no slopes, s itself is returned (no operation on it).
    """
    t = None
    if softcap > 0:
        t = xp.tanh(s / softcap)
        s = softcap * t
    if slopes is not None:
        s = s + alibi_bias(xp, slopes, rows, keys, seqlen_q, seqlen_k)
    return s, t


def softcap_grad(ds, t):
    """dS = dS' o (1 - t^2), t = tanh(s / softcap) from score_mod (d/ds softcap * tanh(s / softcap));
    ds itself when t is None (no softcap)."""
    return ds if t is None else ds * (1.0 - t * t)
