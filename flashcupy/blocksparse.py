"""Block-sparse attention masks (FlashAttention, arXiv 2205.14135, Sec. 3.3).

A BlockMask marks which (query block, key block) tiles of the attention matrix are computed: query
block r covers rows [r * block_q, (r + 1) * block_q), key block c covers keys [c * block_k, ...).
Inside an active block every element is visible (combine with causal=True for the diagonal);
outside, nothing is. A query row whose blocks are all inactive gives out 0, lse -inf, zero grads.

Supported block sizes: powers of two >= 64 in each direction (64, 128, 256, ...). The fused kernels'
tiles (64 or 128 query rows, 32-128 keys) divide them, so a kernel tile never straddles two mask
blocks; time falls with the fraction of active blocks (density).

The mask is built once and reused by every call (every layer of a model): the per-row lists of
active key blocks (forward, dQ) and per-column lists of active query blocks (backward) are computed
on the device on first use, with no host synchronisation, and cached on the object.
"""

from __future__ import annotations

import math

import numpy as np

from ._arrays import cupy_or_none

__all__ = ["BlockMask", "local", "causal_local", "butterfly", "bigbird", "from_element_mask"]


def _is_pow2_at_least_64(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 64 and (x & (x - 1)) == 0


class BlockMask:
    """A boolean block mask and its block size.

    Args:
        mask: bool array (nblocks_q, nblocks_k), (nheads | 1, nblocks_q, nblocks_k) or
            (batch | 1, nheads | 1, nblocks_q, nblocks_k); NumPy or CuPy. Leading 1s broadcast.
        block_q, block_k: rows and keys per block; powers of two >= 64 (default 128).

    Raises:
        TypeError: mask not a boolean array.
        ValueError: rank not 2..4, or block sizes not powers of two >= 64.
    """

    def __init__(self, mask, block_q: int = 128, block_k: int = 128):
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise TypeError(f"mask: expected a boolean array, got {type(mask).__name__}")
        if mask.dtype != np.bool_:
            raise TypeError(f"mask: expected dtype bool, got {mask.dtype}")
        if not 2 <= mask.ndim <= 4:
            raise ValueError(f"mask: expected shape (nblocks_q, nblocks_k) with up to two leading "
                             f"(batch, nheads) dims, got {tuple(mask.shape)}")
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if not _is_pow2_at_least_64(b):
                raise ValueError(f"{name}: expected a power of two >= 64, got {b!r}")
        self.mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        self.block_q, self.block_k = int(block_q), int(block_k)
        self._lists = {}

    @property
    def nblocks_q(self) -> int:
        return int(self.mask.shape[2])

    @property
    def nblocks_k(self) -> int:
        return int(self.mask.shape[3])

    def density(self) -> float:
        """Fraction of active blocks (over the broadcast batch/head dims present)."""
        m = self.mask
        return float(m.sum()) / m.size if m.size else 0.0

    def __repr__(self):
        return (f"BlockMask(shape={tuple(self.mask.shape)}, block_q={self.block_q}, block_k={self.block_k}, "
                f"density={self.density():.3f})")

    def check(self, batch: int, nheads: int, seqlen_q: int, seqlen_k: int) -> None:
        """ValueError unless the mask fits a problem of these sizes."""
        want = (math.ceil(seqlen_q / self.block_q), math.ceil(seqlen_k / self.block_k))
        if (self.nblocks_q, self.nblocks_k) != want:
            raise ValueError(f"block_mask: expected (nblocks_q, nblocks_k) = {want} for seqlen_q={seqlen_q}, "
                             f"seqlen_k={seqlen_k} with blocks {self.block_q}x{self.block_k}, "
                             f"got {(self.nblocks_q, self.nblocks_k)}")
        b, h = self.mask.shape[:2]
        if b not in (1, batch) or h not in (1, nheads):
            raise ValueError(f"block_mask: expected leading dims broadcastable to (batch={batch}, nheads={nheads}), "
                             f"got ({b}, {h})")

    def element_mask(self, seqlen_q: int, seqlen_k: int, rows=None, xp=np):
        """bool (batch | 1, nheads | 1, rows, seqlen_k): the mask expanded to elements; rows = (i0, i1)."""
        i0, i1 = (0, seqlen_q) if rows is None else rows
        m = xp.asarray(self.mask)
        ri = xp.arange(i0, i1) // self.block_q
        ci = xp.arange(seqlen_k) // self.block_k
        return m[:, :, ri][:, :, :, ci]

    def lists(self, xp):
        """(kv_count, kv_index, q_count, q_index) int32 on xp's device (cached).

        kv_index[b, h, r, :kv_count[b, h, r]]: active key blocks of query block r, ascending;
        q_index[b, h, c, :q_count[b, h, c]]: active query blocks of key block c, ascending.
        """
        key = (xp.__name__, xp.cuda.Device().id if xp is not np else None)
        if key not in self._lists:
            m = xp.asarray(self.mask)

            def active_lists(m):  # along the last axis: active positions first, ascending
                n = m.shape[-1]
                pos = xp.where(m, xp.arange(n, dtype=xp.int32), xp.int32(n))
                return m.sum(axis=-1, dtype=xp.int32), xp.ascontiguousarray(xp.sort(pos, axis=-1).astype(xp.int32))

            kv_count, kv_index = active_lists(m)
            q_count, q_index = active_lists(m.transpose(0, 1, 3, 2))
            self._lists[key] = (xp.ascontiguousarray(kv_count), kv_index, xp.ascontiguousarray(q_count), q_index)
        return self._lists[key]


# ------------------------------------------------------------------------------------------------
# builders: each returns a BlockMask of shape (nblocks_q, nblocks_k) (bigbird: per head if asked)


def _nblocks(seqlen, block):
    return max(1, math.ceil(seqlen / block))


def _diagonal_offset(nbq, nbk) -> int:
    """Block-diagonal of bottom-right alignment: query block r sits on key block r + offset."""
    return nbk - nbq


def local(seqlen_q, seqlen_k, window_left, window_right, block_q=128, block_k=128) -> BlockMask:
    """Sliding window in blocks: query block r sees key blocks [d - window_left, d + window_right],
    d = r + nblocks_k - nblocks_q (the bottom-right diagonal). window_* >= 0, in blocks."""
    nbq, nbk = _nblocks(seqlen_q, block_q), _nblocks(seqlen_k, block_k)
    d = np.arange(nbq)[:, None] + _diagonal_offset(nbq, nbk)
    c = np.arange(nbk)[None, :]
    return BlockMask((c >= d - window_left) & (c <= d + window_right), block_q, block_k)


def causal_local(seqlen_q, seqlen_k, window, block_q=128, block_k=128) -> BlockMask:
    """Causal sliding window: the diagonal block and the `window` blocks before it. Use with causal=True."""
    return local(seqlen_q, seqlen_k, window, 0, block_q, block_k)


def butterfly(seqlen_q, seqlen_k, block_q=128, block_k=128) -> BlockMask:
    """Flat block butterfly (Dao et al., Pixelated Butterfly, arXiv 2112.00029; the pattern of the
    FlashAttention paper's block-sparse runs): block (r, c) is active iff r XOR c is 0 or a power of
    two. Density about (1 + log2 n) / n for n blocks."""
    nbq, nbk = _nblocks(seqlen_q, block_q), _nblocks(seqlen_k, block_k)
    x = np.arange(nbq)[:, None] ^ np.arange(nbk)[None, :]
    return BlockMask((x & (x - 1)) == 0, block_q, block_k)


def bigbird(seqlen_q, seqlen_k, *, num_global=1, window=1, num_random=2, seed=0, nheads=None,
            block_q=128, block_k=128) -> BlockMask:
    """BigBird-style (Zaheer et al., arXiv 2007.14062): the first num_global query and key blocks are
    global (see / seen by all), a window of +-window blocks around the diagonal, and num_random random
    key blocks per query block, drawn with numpy's default_rng(seed) (per head if nheads is given)."""
    nbq, nbk = _nblocks(seqlen_q, block_q), _nblocks(seqlen_k, block_k)
    base = local(seqlen_q, seqlen_k, window, window, block_q, block_k).mask[0, 0].copy()
    base[:num_global, :] = True
    base[:, :num_global] = True
    rng = np.random.default_rng(seed)
    heads = 1 if nheads is None else nheads
    out = np.repeat(base[None], heads, axis=0)
    for h in range(heads):
        for r in range(nbq):
            out[h, r, rng.choice(nbk, size=min(num_random, nbk), replace=False)] = True
    return BlockMask(out if nheads is not None else out[0], block_q, block_k)


def from_element_mask(mask, block_q=128, block_k=128) -> BlockMask:
    """A block is active if any element of it is True. mask: bool (..., seqlen_q, seqlen_k)."""
    xp = np if isinstance(mask, np.ndarray) else (cupy_or_none() or np)
    mask = xp.asarray(mask, dtype=bool)
    sq, sk = mask.shape[-2:]
    nbq, nbk = _nblocks(sq, block_q), _nblocks(sk, block_k)
    padded = xp.zeros(mask.shape[:-2] + (nbq * block_q, nbk * block_k), dtype=bool)
    padded[..., :sq, :sk] = mask
    blocks = padded.reshape(mask.shape[:-2] + (nbq, block_q, nbk, block_k)).any(axis=(-3, -1))
    return BlockMask(blocks, block_q, block_k)
