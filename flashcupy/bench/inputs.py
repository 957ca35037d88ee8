"""Dtypes and inputs: q, k, v, dout on the bench's device, and each framework's view of them."""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from .common import _cupy
from .shape import block_mask, element_mask


# ---------------------------------------------------------------------------------------------------
# dtypes and inputs


def np_dtype(name: str):
    from .._arrays import bfloat16

    return {"bf16": bfloat16(), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32),
            "fp64": np.dtype(np.float64)}[name]


class Inputs:
    """q, k, v, dout (batch, seqlen, nheads, head_dim) in one dtype on the bench's device (CuPy on the GPU,
    NumPy on the CPU), with each framework's view or copy of them made once and cached."""

    NAMES = ("q", "k", "v", "do")

    def __init__(self, device: str, dtype: str, arrays: tuple, seed: int):
        self.device, self.dtype, self.seed = device, dtype, seed
        self.arrays = tuple(arrays)
        self.batch, self.seqlen, self.nheads, self.head_dim = self.arrays[0].shape
        self._cache = {}

    @classmethod
    def random(cls, device, dtype, batch, seqlen, nheads, head_dim, seed) -> "Inputs":
        shape = (batch, seqlen, nheads, head_dim)
        dt = np_dtype(dtype)
        if device == "gpu":
            try:
                arrays = _random_gpu(shape, dt, seed)
            except Exception:  # a CuPy without the dtype kernels needed: draw on the host
                cp = _cupy()
                arrays = tuple(cp.asarray(x) for x in _random_host(shape, dt, seed))
        else:
            arrays = _random_host(shape, dt, seed)
        return cls(device, dtype, arrays, seed)

    @classmethod
    def from_host(cls, device, dtype, host_arrays, seed) -> "Inputs":
        if device == "gpu":
            cp = _cupy()
            host_arrays = tuple(cp.asarray(x) for x in host_arrays)
        return cls(device, dtype, host_arrays, seed)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def native(self) -> tuple:
        return self.arrays

    def cast(self, dt) -> tuple:
        """Copies in dtype dt (the naive provider's compute dtype)."""
        dt = np.dtype(dt)
        if dt == self.arrays[0].dtype:
            return self.arrays
        return self._cached(("cast", dt.str), lambda: tuple(_cast(x, dt) for x in self.arrays))

    def torch(self) -> tuple:
        return self._cached("torch", lambda: tuple(_to_torch(x) for x in self.arrays))

    def jax(self) -> tuple:
        return self._cached("jax", lambda: tuple(_to_jax(x) for x in self.arrays))

    def block_mask(self, causal: bool, density: float):
        return self._cached(("block", causal, density), lambda: block_mask(
            self.seqlen, self.seqlen, density, causal=causal, seed=self.seed))

    def additive_mask(self, causal: bool, density: float, dt):
        """(seqlen, seqlen) array in dt on the device: 0 where visible, -inf where masked; None if none."""
        def make():
            vis = element_mask(self.block_mask(causal, density), self.seqlen, self.seqlen, causal=causal)
            if vis is None:
                return None
            m = np.where(vis, 0.0, -np.inf).astype(dt)
            return _cupy().asarray(m) if self.device == "gpu" else m
        return self._cached(("additive", causal, density, np.dtype(dt).str), make)


def _random_host(shape, dt, seed) -> tuple:
    rng = np.random.default_rng(seed)
    work = np.float64 if dt == np.float64 else np.float32
    return tuple(rng.standard_normal(shape, dtype=work).astype(dt) for _ in Inputs.NAMES)


def _random_gpu(shape, dt, seed) -> tuple:
    """Standard-normal arrays drawn on the GPU. bf16 is made from float32 bits (the top 16), so no bf16
    arithmetic kernel is needed: the result is a bf16 value, exactly."""
    from .._arrays import bfloat16

    cp = _cupy()
    rs = cp.random.RandomState(seed)
    out = []
    for _ in Inputs.NAMES:
        x = rs.standard_normal(shape, dtype=cp.float64 if dt == np.float64 else cp.float32)
        if dt == bfloat16():
            x = (x.view(cp.uint32) >> 16).astype(cp.uint16).view(dt)
        else:
            x = x.astype(dt, copy=False)
        out.append(x)
    return tuple(out)


def _cast(x, dt):
    """x in dtype dt; bf16 sources go through their bits, so no bf16 kernel is needed on the GPU."""
    from .._arrays import bfloat16

    if x.dtype == bfloat16() and not isinstance(x, np.ndarray):
        cp = _cupy()
        f32 = (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)  # exact: bf16 is float32's top half
        return f32.astype(dt)
    return x.astype(dt)


def _to_torch(x):
    """A torch tensor on x's memory (GPU: DLPack; CPU: from_numpy); bf16 through a uint16 view if needed."""
    import torch

    from .._arrays import bfloat16

    is_bf16 = x.dtype == bfloat16()
    want = torch.bfloat16 if is_bf16 else getattr(torch, np.dtype(x.dtype).name)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16) if is_bf16 else torch.from_numpy(x)
    try:
        t = torch.from_dlpack(x)
        if t.dtype == want:
            return t
    except Exception:
        if not is_bf16:
            raise
    cp = _cupy()
    return torch.from_dlpack(x.view(cp.uint16)).view(torch.bfloat16)


def _to_jax(x):
    """A JAX array of x (DLPack from CuPy where it works, else through the host)."""
    import jax
    import jax.dlpack
    import jax.numpy as jnp

    from .._arrays import bfloat16

    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    is_bf16 = x.dtype == bfloat16()
    want = jnp.bfloat16 if is_bf16 else np.dtype(x.dtype)
    try:
        a = jax.dlpack.from_dlpack(x)
        if a.dtype == want:
            return a
    except Exception:
        pass
    if is_bf16:
        try:
            cp = _cupy()
            return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(x.view(cp.uint16)), jnp.bfloat16)
        except Exception:
            pass
    return jnp.asarray(_cupy().asnumpy(x))


def _free_device_memory(device: str) -> None:
    """Hand cached blocks back (CuPy's pool, torch's cache) so the next provider has the memory."""
    if device != "gpu":
        return
    if "cupy" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["torch"].cuda.empty_cache()
