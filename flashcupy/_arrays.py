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


def array_module(**named):
    """numpy or cupy, from the named inputs (name=array, ...).

    NumPy arrays stay NumPy. CuPy arrays, and anything with __dlpack__ / __cuda_array_interface__
    (torch, JAX), become CuPy arrays zero-copy through cupy.from_dlpack. Returns (xp, list of arrays).
    Raises TypeError naming the argument for a non-array, or for a mix of host and device arrays.
    """
    kinds = {}
    for name, a in named.items():
        if isinstance(a, np.ndarray):
            kinds[name] = "numpy"
        elif hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__"):
            kinds[name] = "cupy"
        else:
            raise TypeError(f"{name}: expected a NumPy, CuPy or __dlpack__ array, got {type(a).__name__}")
    if all(k == "numpy" for k in kinds.values()):
        return np, list(named.values())
    if all(k == "cupy" for k in kinds.values()):
        cp = cupy_or_none()
        if cp is None:
            raise TypeError("got GPU arrays, but cupy is not installed: pip install 'flashcupy[cuda13]'")
        return cp, [a if isinstance(a, cp.ndarray) else cp.from_dlpack(a) for a in named.values()]
    host = [n for n, k in kinds.items() if k == "numpy"]
    dev = [n for n, k in kinds.items() if k == "cupy"]
    raise TypeError(f"expected every array on one side, got NumPy arrays {host} and GPU arrays {dev}")
