"""The Hopper forward's tensor-map cache (flashcupy._gpu_sm90._tma_desc): one cuTensorMapEncodeTiled per
(data pointer, dtype, shape, strides, box), on the CPU with the driver's encode replaced by a counter."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

driver = pytest.importorskip("cuda.bindings.driver")

from flashcupy import _gpu_sm90  # noqa: E402


def _array(ptr, shape, strides, dtype=np.float16):
    """The attributes _tma_desc reads of a CuPy array (no GPU needed)."""
    return SimpleNamespace(data=SimpleNamespace(ptr=ptr), dtype=np.dtype(dtype), shape=shape, strides=strides)


@pytest.fixture
def encode_calls(monkeypatch):
    """The arguments of every (fake) cuTensorMapEncodeTiled call; the 128 bytes returned name the call."""
    calls = []
    buffers = []

    def fake_encode(dtype, rank, ptr, dims, strides, box, elem_strides, *rest):
        calls.append((int(ptr), [int(d) for d in dims], [int(s) for s in strides], [int(b) for b in box]))
        buf = ctypes.create_string_buffer(bytes([len(calls)]) * 128, 128)
        buffers.append(buf)
        return driver.CUresult.CUDA_SUCCESS, SimpleNamespace(getPtr=lambda: ctypes.addressof(buf))

    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled", fake_encode)
    _gpu_sm90._encode_tma.cache_clear()
    yield calls
    _gpu_sm90._encode_tma.cache_clear()


def test_same_array_is_encoded_once(encode_calls):
    b, s, h, d = 2, 300, 4, 128
    strides = (s * h * d * 2, h * d * 2, d * 2, 2)
    x = _array(0x7F0000000000, (b, s, h, d), strides)
    first = _gpu_sm90._tma_desc(x, 128)
    assert len(first) == 128 and len(encode_calls) == 1
    assert encode_calls[0] == (0x7F0000000000, [d, h, s, b], [strides[2], strides[1], strides[0]], [64, 1, 128, 1])
    # a second call, and a new array object with the same pointer, shape and strides: no new encode
    assert _gpu_sm90._tma_desc(x, 128) == first
    assert _gpu_sm90._tma_desc(_array(0x7F0000000000, (b, s, h, d), strides), 128) == first
    assert len(encode_calls) == 1


def test_any_change_of_the_key_encodes_again(encode_calls):
    b, s, h, d = 2, 256, 8, 64
    strides = (s * h * d * 2, h * d * 2, d * 2, 2)
    base = _gpu_sm90._tma_desc(_array(0x7F0000000000, (b, s, h, d), strides), 128)
    bhsd = (s * h * d * 2, d * 2, s * d * 2, 2)  # a BHSD view: other strides, same pointer and shape
    variants = [
        _array(0x7F0000000000, (b, s, h, d), bhsd),
        _array(0x7F0000010000, (b, s, h, d), strides),  # another pointer
        _array(0x7F0000000000, (b, s - 1, h, d), strides),  # another shape
        _array(0x7F0000000000, (b, s, h, d), strides, dtype=np.dtype("V2")),  # another dtype name
    ]
    descs = [_gpu_sm90._tma_desc(x, 128) for x in variants] + [
        _gpu_sm90._tma_desc(_array(0x7F0000000000, (b, s, h, d), strides), 176)]  # another box
    assert len(encode_calls) == 1 + len(descs)
    assert len({base, *descs}) == 1 + len(descs)
    assert encode_calls[1][2] == [bhsd[2], bhsd[1], bhsd[0]]
    assert encode_calls[-1][3] == [64, 1, 176, 1]


def test_failed_encode_is_not_cached(monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        return driver.CUresult.CUDA_ERROR_INVALID_VALUE, None

    monkeypatch.setattr(driver, "cuTensorMapEncodeTiled", failing)
    _gpu_sm90._encode_tma.cache_clear()
    x = _array(0x7F0000000000, (1, 64, 1, 64), (64 * 64 * 2, 64 * 2, 64 * 2, 2))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="cuTensorMapEncodeTiled failed"):
            _gpu_sm90._tma_desc(x, 128)
    assert len(calls) == 2
    _gpu_sm90._encode_tma.cache_clear()


def test_cache_is_bounded():
    assert _gpu_sm90._encode_tma.cache_info().maxsize == 256
