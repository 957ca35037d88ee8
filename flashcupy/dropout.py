"""Dropout keep-masks as a pure function of (seed, offset, batch b, head h, query i, key j).

The kernels and this module compute the same bits, so the oracle regenerates the exact mask a kernel
used (flash-attn's mask depends on its tiling; ours does not). The generator is Philox4x32-10
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), keyed by the 64-bit seed.

Element (b, h, i, j) of the (batch, nheads, seqlen_q, seqlen_k) attention matrix:
    counter = (cq, rp, b * nheads + h, offset)      key = (seed mod 2^32, seed >> 32)
    rp = (i >> 4) * 8 + (i & 7)                     # rows i and i + 8 of each 16-row block share a call
    cq = (j >> 4) * 4 + ((j >> 1) & 3)              # columns {2t, 2t+1, 2t+8, 2t+9} of a 16-column block
    word = 2 * ((i >> 3) & 1) + ((j >> 3) & 1)       # which of Philox's four 32-bit outputs
    u = (output[word] >> (16 * (j & 1))) & 0xFFFF   # a 16-bit uniform
    keep  <=>  u < keep_threshold(dropout_p) = round(65536 * (1 - dropout_p)), clamped to [1, 65536]
One call gives the 8 decisions that one GPU thread needs for its accumulator fragment, and no two
elements share a 16-bit uniform. Kept probabilities are scaled by 1 / (1 - p_eff), where
p_eff = 1 - keep_threshold / 65536 is dropout_p rounded to a multiple of 2^-16: the expectation of the
dropped-out attention is then exactly the attention.
"""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["keep_threshold", "effective_dropout_p", "philox4x32_10", "keep_mask", "Generator",
           "default_generator", "manual_seed"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def keep_threshold(dropout_p: float) -> int:
    """A 16-bit uniform u keeps its element iff u < this (an integer in [1, 65536])."""
    return int(min(65536, max(1, round(65536 * (1.0 - float(dropout_p))))))


def effective_dropout_p(dropout_p: float) -> float:
    """dropout_p rounded to the multiple of 2^-16 the kernels use."""
    return 1.0 - keep_threshold(dropout_p) / 65536.0


def philox4x32_10(c0, c1, c2, c3, k0, k1, xp=np):
    """Philox4x32 with 10 rounds, elementwise over uint32 arrays (NumPy or CuPy). Returns 4 arrays."""
    u32, u64 = xp.uint32, xp.uint64
    c = [xp.asarray(x).astype(u32) for x in (c0, c1, c2, c3)]
    k0 = int(k0) & _MASK32
    k1 = int(k1) & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0 = c[0].astype(u64) * u64(_M0)
        p1 = c[2].astype(u64) * u64(_M1)
        hi0, lo0 = (p0 >> u64(32)).astype(u32), p0.astype(u32)
        hi1, lo1 = (p1 >> u64(32)).astype(u32), p1.astype(u32)
        c = [hi1 ^ c[1] ^ u32(k0), lo1, hi0 ^ c[3] ^ u32(k1), lo0]
    return c


def keep_mask(seed: int, offset: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
              dropout_p: float, *, rows=None, batches=None, xp=np):
    """The exact keep-mask the kernels use: bool (len(batches), nheads, len(rows), seqlen_k).

    rows: (i0, i1) for query rows [i0, i1) (default: all rows); batches: (b0, b1) for batch entries
    [b0, b1) (default: all batch entries; a varlen sequence b takes (b, b + 1)). xp: numpy or cupy.
    """
    i0, i1 = (0, seqlen_q) if rows is None else rows
    b0, b1 = (0, batch) if batches is None else batches
    i = xp.arange(i0, i1, dtype=xp.int64)[:, None]
    j = xp.arange(seqlen_k, dtype=xp.int64)[None, :]
    bh = xp.arange(b0 * nheads, b1 * nheads, dtype=xp.int64).reshape(b1 - b0, nheads, 1, 1)
    rp = (i >> 4) * 8 + (i & 7)
    cq = (j >> 4) * 4 + ((j >> 1) & 3)
    shape = (b1 - b0, nheads, i1 - i0, seqlen_k)
    ctr = [xp.broadcast_to(x, shape) for x in (cq, rp, bh, xp.asarray(int(offset) & _MASK32))]
    out = philox4x32_10(*ctr, int(seed) & _MASK32, (int(seed) >> 32) & _MASK32, xp=xp)
    word = xp.broadcast_to(2 * ((i >> 3) & 1) + ((j >> 3) & 1), shape)
    r = xp.where(word == 0, out[0], xp.where(word == 1, out[1], xp.where(word == 2, out[2], out[3])))
    u = (r >> xp.broadcast_to(xp.uint32(16) * (j & 1).astype(xp.uint32), shape)) & xp.uint32(0xFFFF)
    return u < xp.uint32(keep_threshold(dropout_p)) if keep_threshold(dropout_p) < 65536 else xp.ones(shape, bool)


class Generator:
    """The library's dropout RNG: a fixed 64-bit seed and an offset that advances by one per draw."""

    def __init__(self, seed: int | None = None):
        self._lock = threading.Lock()
        self.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)

    def manual_seed(self, seed: int) -> None:
        with self._lock:
            self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
            self.offset = 0

    def next_state(self) -> tuple[int, int]:
        """(seed, offset) for one call; advances the offset (mod 2^32)."""
        with self._lock:
            state = (self.seed, self.offset)
            self.offset = (self.offset + 1) & _MASK32
            return state


default_generator = Generator()


def manual_seed(seed: int) -> None:
    """Seed the library's dropout generator (its offset restarts at 0)."""
    default_generator.manual_seed(seed)


def check_rng_state(name: str, state) -> tuple[int, int]:
    """(seed, offset) from an int seed (offset 0) or a (seed, offset) pair; TypeError/ValueError otherwise."""
    if isinstance(state, (int, np.integer)) and not isinstance(state, bool):
        state = (int(state), 0)
    if (not isinstance(state, (tuple, list)) or len(state) != 2
            or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in state)):
        raise TypeError(f"{name}: expected an int seed or a (seed, offset) pair of ints, got {state!r}")
    seed, offset = (int(x) for x in state)
    if not (0 <= seed < 2**64 and 0 <= offset < 2**32):
        raise ValueError(f"{name}: expected 0 <= seed < 2**64 and 0 <= offset < 2**32, got {state!r}")
    return seed, offset
