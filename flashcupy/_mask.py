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
