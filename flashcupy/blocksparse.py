"""Block-sparse attention masks (FlashAttention, arXiv 2205.14135, Sec. 3.3).

A BlockMask marks which (query block, key block) tiles of the attention matrix are computed: query
block r covers rows [r * block_q, (r + 1) * block_q), key block c covers keys [c * block_k, ...).
Inside an active block every element is visible (combine with causal=True for the diagonal);
outside, nothing is. A query row whose blocks are all inactive gives out 0, lse -inf, zero grads.

Supported block sizes: powers of two >= 64 in each direction (64, 128, 256, ...). The fused kernels'
tiles (64 or 128 query rows, 32-128 keys) divide them, so a kernel tile never straddles two mask
blocks; time falls with the fraction of active blocks (density).

A BlockMask is a value: it copies the caller's mask at construction (later writes to that array
change nothing) and holds it read-only. The per-row lists of active key blocks (forward, dQ) and
per-column lists of active query blocks (backward) are computed once, on the host, at construction.
Their device copies are made per GPU outside the attention call: at construction on the current
device when a GPU is usable, with BlockMask.prepare(device) for another one; the copy is waited
for, so any stream may use them at once. A call that needs them on a device that has none while
the current stream is capturing a CUDA graph raises RuntimeError (a copy cannot be captured), never
a wrong answer. Keep the mask alive as long as any work that uses it, a captured graph included:
the graph holds the device lists' addresses.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ._arrays import cupy_or_none, gpu_available

__all__ = ["BlockMask", "local", "causal_local", "butterfly", "bigbird", "from_element_mask"]


def _is_pow2_at_least_64(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 64 and (x & (x - 1)) == 0


def _host_copy(mask) -> np.ndarray:
    """A new NumPy array with the values of mask (NumPy, CuPy, or anything with __dlpack__)."""
    if isinstance(mask, np.ma.MaskedArray):
        raise TypeError("mask: expected a boolean array, got a numpy.ma.MaskedArray (its mask would be ignored)")
    if isinstance(mask, np.ndarray):
        return np.array(mask, copy=True)
    cp = cupy_or_none()
    if cp is not None and isinstance(mask, cp.ndarray):
        return mask.get()  # waits for the current stream: the values the caller wrote on it
    if hasattr(mask, "__dlpack__"):
        dev = mask.__dlpack_device__()[0] if hasattr(mask, "__dlpack_device__") else None
        if dev == 1 or cp is None:  # kDLCPU
            return np.array(np.from_dlpack(mask), copy=True)
        return cp.from_dlpack(mask).get()
    return np.array(mask, copy=True)


def _active_lists(m: np.ndarray):
    """Along the last axis of bool m (..., n): (count (...,) int32, index (..., n) int32); index holds the
    active positions first, ascending, then n as padding."""
    n = m.shape[-1]
    pos = np.where(m, np.arange(n, dtype=np.int32), np.int32(n))
    count = np.ascontiguousarray(m.sum(axis=-1, dtype=np.int32))
    index = np.ascontiguousarray(np.sort(pos, axis=-1).astype(np.int32))
    return count, index


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class BlockMask:
    """A boolean block mask and its block size; an immutable value.

    Args:
        mask: bool array (nblocks_q, nblocks_k), (nheads | 1, nblocks_q, nblocks_k) or
            (batch | 1, nheads | 1, nblocks_q, nblocks_k); NumPy, CuPy or any __dlpack__ array. Leading
            1s broadcast. It is copied (a CuPy mask waits for the current stream): writing to it
            afterwards changes nothing.
        block_q, block_k: rows and keys per block; powers of two >= 64 (default 128).

    Attributes: mask (batch | 1, nheads | 1, nblocks_q, nblocks_k), a read-only NumPy copy; block_q,
    block_k. Two BlockMasks are equal (and hash equal) when their masks and block sizes are.

    When a GPU is usable, construction also copies the block lists to the current CuPy device and
    waits for that copy (this is not the attention call path; CuPy masks already synchronise to be
    read). Use prepare(device) before using the mask on another device inside CUDA-graph capture.

    Raises:
        TypeError: mask not a boolean array (a numpy.ma.MaskedArray is refused too).
        ValueError: rank not 2..4, or block sizes not powers of two >= 64.
    """

    def __init__(self, mask, block_q: int = 128, block_k: int = 128):
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise TypeError(f"mask: expected a boolean array, got {type(mask).__name__}")
        host = _host_copy(mask)
        if host.dtype != np.bool_:
            raise TypeError(f"mask: expected dtype bool, got {host.dtype}")
        if not 2 <= host.ndim <= 4:
            raise ValueError(f"mask: expected shape (nblocks_q, nblocks_k) with up to two leading "
                             f"(batch, nheads) dims, got {tuple(host.shape)}")
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if not _is_pow2_at_least_64(b):
                raise ValueError(f"{name}: expected a power of two >= 64, got {b!r}")
        host = _read_only(np.ascontiguousarray(host.reshape((1,) * (4 - host.ndim) + tuple(host.shape))))
        kv_count, kv_index = _active_lists(host)
        q_count, q_index = _active_lists(host.transpose(0, 1, 3, 2))
        fields = dict(
            mask=host, block_q=int(block_q), block_k=int(block_k),
            _lists=tuple(_read_only(a) for a in (kv_count, kv_index, q_count, q_index)),
            _device={},  # CuPy device id -> (mask, kv_count, kv_index, q_count, q_index) on that device
            _lock=threading.Lock(),
            _hash=hash((host.shape, int(block_q), int(block_k), host.tobytes())),
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if gpu_available():
            self._upload_eagerly()

    def __setattr__(self, name, value):
        raise AttributeError(f"BlockMask is immutable: cannot set {name!r}; build a new BlockMask")

    def __delattr__(self, name):
        raise AttributeError(f"BlockMask is immutable: cannot delete {name!r}")

    def __reduce__(self):  # pickle / copy: rebuild from the mask (device copies are made again)
        return BlockMask, (self.mask, self.block_q, self.block_k)

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, BlockMask):
            return NotImplemented
        return (self.block_q == other.block_q and self.block_k == other.block_k
                and self.mask.shape == other.mask.shape and bool(np.array_equal(self.mask, other.mask)))

    def __hash__(self):
        return self._hash

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
        """bool (batch | 1, nheads | 1, rows, seqlen_k): the mask expanded to elements; rows = (i0, i1).
        With xp = cupy it is computed on the current device from the mask's device copy."""
        i0, i1 = (0, seqlen_q) if rows is None else rows
        m = self.mask if xp is np else self._on_device(xp)[0]
        ri = xp.arange(i0, i1) // self.block_q
        ci = xp.arange(seqlen_k) // self.block_k
        return m[:, :, ri][:, :, :, ci]

    def lists(self, xp):
        """(kv_count, kv_index, q_count, q_index) int32: NumPy (read-only) for xp = numpy, else CuPy
        arrays on the current device (made once per device; do not write to them).

        kv_count (b | 1, h | 1, nblocks_q), kv_index (b | 1, h | 1, nblocks_q, nblocks_k):
        kv_index[b, h, r, :kv_count[b, h, r]] are the active key blocks of query block r, ascending;
        q_count (b | 1, h | 1, nblocks_k), q_index (b | 1, h | 1, nblocks_k, nblocks_q):
        q_index[b, h, c, :q_count[b, h, c]] are the active query blocks of key block c, ascending.
        The rest of each index row is padding (nblocks_k, resp. nblocks_q). All C-contiguous.

        Raises RuntimeError when the current device has no copy yet and the current stream is capturing
        a CUDA graph (call prepare() on that device before the capture).
        """
        return self._lists if xp is np else self._on_device(xp)[1:]

    def prepare(self, device=None) -> "BlockMask":
        """Copy the mask and its block lists to a CuPy device (default: the current one), if not there yet,
        and wait for the copy. Call it before using the mask inside CUDA-graph capture on a device other
        than the one current at construction. Returns self. Raises RuntimeError while the current stream
        of that device is capturing, or without cupy."""
        cp = cupy_or_none()
        if cp is None:
            raise RuntimeError("BlockMask.prepare: cupy is not installed: pip install 'flashcupy[cuda13]'")
        if device is None:
            self._on_device(cp)
        else:
            with cp.cuda.Device(device):
                self._on_device(cp)
        return self

    def _upload_eagerly(self):
        """At construction: copy to the current device unless its current stream is capturing (then the
        first use on that device, outside capture, or prepare() makes the copy)."""
        cp = cupy_or_none()
        if not _capturing(cp):
            self._on_device(cp)

    def _on_device(self, cp):
        """(mask, kv_count, kv_index, q_count, q_index) on the current CuPy device, copied there on first
        use (outside CUDA-graph capture only) and waited for: the copies are complete before this
        returns, so kernels on any stream of that device can read them."""
        dev = cp.cuda.runtime.getDevice()
        arrays = self._device.get(dev)
        if arrays is not None:
            return arrays
        if _capturing(cp):
            raise RuntimeError(
                f"block_mask: this BlockMask has no copy on device {dev} yet and the current stream is "
                f"capturing a CUDA graph (a host-to-device copy cannot be captured); build the mask with "
                f"device {dev} current, or call mask.prepare() on it, before the capture")
        with self._lock:
            arrays = self._device.get(dev)
            if arrays is None:
                stream = cp.cuda.get_current_stream()
                arrays = tuple(cp.asarray(a) for a in (self.mask,) + self._lists)
                stream.synchronize()  # the copies are done before any stream reads them
                self._device[dev] = arrays
        return arrays


def _capturing(cp) -> bool:
    """Whether the current CuPy stream is capturing a CUDA graph (an error asking counts as yes)."""
    try:
        return bool(cp.cuda.get_current_stream().is_capturing())
    except Exception:  # e.g. the legacy stream while another stream captures in global mode
        return True


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
