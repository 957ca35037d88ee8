"""Array kinds (NumPy, CuPy, anything with __dlpack__) and dtypes, without importing CuPy eagerly."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def bfloat16():
    """numpy.dtype of ml_dtypes.bfloat16 (CuPy 14 holds bf16 arrays with it), or None if absent."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


@functools.lru_cache(maxsize=None)
def supported_dtypes() -> tuple:
    dts = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
    if bfloat16() is not None:
        dts.insert(1, bfloat16())
    return tuple(dts)


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return "bfloat16" if dt == bfloat16() else dt.name


def is_half(dt) -> bool:
    """fp16 or bf16: the dtypes of the tensor-core kernels."""
    dt = np.dtype(dt)
    return dt == np.float16 or (bfloat16() is not None and dt == bfloat16())


def lse_dtype(dt):
    """LSE is float32, except for float64 inputs, whose backward needs a float64 LSE to be exact."""
    return np.dtype(np.float64) if np.dtype(dt) == np.float64 else np.dtype(np.float32)


@functools.lru_cache(maxsize=None)
def cupy_or_none():
    """The cupy module if it imports, else None. Importing cupy needs no GPU."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    cp = cupy_or_none()
    if cp is None:
        return False
    try:
        return bool(cp.cuda.is_available())
    except Exception:  # a broken driver install reads as no GPU
        return False


# DLPack device types (dlpack.h DLDeviceType): kDLCPU is host memory, which NumPy imports zero-copy.
KDLCPU = 1


def _host_dlpack(a) -> bool:
    """a has __dlpack__ and says (through __dlpack_device__) that its memory is on the host (kDLCPU)."""
    if not hasattr(a, "__dlpack__") or not hasattr(a, "__dlpack_device__"):
        return False
    try:
        device_type = a.__dlpack_device__()[0]
    except Exception:  # an exporter that cannot say where it lives: leave it to cupy.from_dlpack
        return False
    return int(device_type) == KDLCPU


def _from_host_dlpack(name, a):
    try:
        return np.from_dlpack(a)
    except Exception as e:  # e.g. a dtype NumPy has no DLPack code for, or a tensor that refuses export
        raise TypeError(f"{name}: expected a host __dlpack__ array NumPy can import (np.from_dlpack), "
                        f"got {type(a).__name__} that fails with {type(e).__name__}: {e}") from e


def array_module(**named):
    """numpy or cupy, from the named inputs (name=array, ...).

    NumPy arrays stay NumPy. Host arrays with __dlpack__ (torch / JAX CPU tensors: __dlpack_device__
    says kDLCPU) become NumPy arrays zero-copy through np.from_dlpack, so they run on the CPU path and
    come back as NumPy. CuPy arrays, and anything else with __dlpack__ / __cuda_array_interface__
    (torch, JAX on the GPU), become CuPy arrays zero-copy through cupy.from_dlpack. Returns (xp, list
    of arrays). Raises TypeError naming the argument for a non-array, a numpy.ma.MaskedArray (its mask
    would be silently ignored), a host __dlpack__ array NumPy cannot import, GPU arrays without cupy,
    or a mix of host and device arrays.
    """
    kinds, arrays = {}, {}
    for name, a in named.items():
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name}: expected a plain NumPy array, got a numpy.ma.MaskedArray, whose mask "
                            f"flashcupy would ignore; pass np.ma.filled({name}, value) or a block_mask instead")
        if isinstance(a, np.ndarray):
            kinds[name], arrays[name] = "numpy", a
        elif _host_dlpack(a):  # before __cuda_array_interface__: torch CPU tensors raise on that attribute
            kinds[name], arrays[name] = "numpy", _from_host_dlpack(name, a)
        elif hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__"):
            kinds[name], arrays[name] = "cupy", a
        else:
            raise TypeError(f"{name}: expected a NumPy, CuPy or __dlpack__ array, got {type(a).__name__}")
    if all(k == "numpy" for k in kinds.values()):
        return np, list(arrays.values())
    if all(k == "cupy" for k in kinds.values()):
        cp = cupy_or_none()
        if cp is None:
            raise TypeError(f"{', '.join(kinds)}: got GPU arrays (__cuda_array_interface__ or a non-host "
                            f"__dlpack__ device), but cupy is not installed: pip install 'flashcupy[cuda13]'")
        return cp, [a if isinstance(a, cp.ndarray) else cp.from_dlpack(a) for a in arrays.values()]
    host = [n for n, k in kinds.items() if k == "numpy"]
    dev = [n for n, k in kinds.items() if k == "cupy"]
    raise TypeError(f"expected every array on one side, got NumPy arrays {host} and GPU arrays {dev}")
