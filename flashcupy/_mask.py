"""The visibility rule, once, for the chunked path and the NumPy oracle (cuda/flash_mask.cuh states
the same rule for the kernels; tests/test_mask.py checks the two agree tile by tile).

Key j is visible to query i (rows and keys of one (batch, head), offset = seqlen_k - seqlen_q, so the
diagonal is aligned bottom-right as in flash-attn >= 2.1) iff

    j < seqlen_k
    causal:             j <= i + offset
    window (l, r):      i + offset - l <= j <= i + offset + r      (-1: that side unbounded)

and, with a block mask, block (i // block_q, j // block_k) is active (flashcupy.blocksparse).
"""

from __future__ import annotations


def band(seqlen_q: int, seqlen_k: int, causal: bool, window=(-1, -1)):
    """(lo, hi): key - row must lie in [lo, hi]; None for an unbounded side (flash_mask.cuh's Mask)."""
    offset = seqlen_k - seqlen_q
    left, right = window
    hi = offset if causal else (offset + right if right >= 0 else None)  # causal implies j <= i + offset
    lo = offset - left if left >= 0 else None
    return lo, hi


def visible(xp, rows, keys, seqlen_q: int, seqlen_k: int, causal: bool, window=(-1, -1)):
    """Boolean visibility of rows (array of query indices) against keys (array of key indices),
    broadcast as rows[:, None] x keys[None, :]; None where every pair is visible."""
    lo, hi = band(seqlen_q, seqlen_k, causal, window)
    if lo is None and hi is None:
        return None
    i, j = xp.asarray(rows)[:, None], xp.asarray(keys)[None, :]  # compared without a (rows, keys) int array
    vis = None
    if hi is not None:
        vis = j <= i + hi
    if lo is not None:
        vis = (j >= i + lo) if vis is None else (vis & (j >= i + lo))
    return vis


def key_range(i0: int, i1: int, seqlen_q: int, seqlen_k: int, causal: bool, window=(-1, -1)):
    """(j0, j1): the keys [j0, j1) that rows [i0, i1) can see at all under causal and the window
    (every visible key lies inside; j0 >= j1 when none does). The chunked path computes only those
    columns, so a sliding window costs time in proportion to its width."""
    lo, hi = band(seqlen_q, seqlen_k, causal, window)
    j0 = 0 if lo is None else max(0, i0 + lo)
    j1 = seqlen_k if hi is None else min(seqlen_k, i1 - 1 + hi + 1)
    return j0, max(j0, j1)
