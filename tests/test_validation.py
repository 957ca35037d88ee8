"""Every input-validation error: raised with the right type, naming the argument, what was expected
and what was got (DESIGN.md: "Bad input raises ValueError / TypeError that names the argument").
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import same_bits

from flashcupy import flash_attn_backward, flash_attn_forward, flash_attn_func
from flashcupy._arrays import bfloat16

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 8


def qkv(dtype=np.float32, *, sq=SQ, sk=SK, h=H, hk=HK, d=D, b=B):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def grad_inputs(dtype=np.float32):
    q, k, v = qkv(dtype)
    out, lse, _ = flash_attn_forward(q, k, v)
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(dtype)
    return dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)


def msg(*parts):
    """A regex matching the parts in order, each escaped."""
    return ".*".join(re.escape(p) for p in parts)


def _backward(q, k, v, **kw):
    """flash_attn_backward with dout, out, lse that fit a valid (B, SQ, H, D) q; q, k, v and the
    scalars are validated before dout, out and lse, so their errors come first."""
    dt = q.dtype if isinstance(q, np.ndarray) and q.dtype.kind == "f" else np.dtype(np.float32)
    lse_dt = np.float64 if dt == np.float64 else np.float32
    dout = np.ones((B, SQ, H, D), dt)
    return flash_attn_backward(dout, q, k, v, dout, np.zeros((B, H, SQ), lse_dt), **kw)


ENTRY_POINTS = {"func": flash_attn_func, "forward": flash_attn_forward, "backward": _backward}


entry_points = pytest.mark.parametrize("call", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


# ---------------------------------------------------------------------------------------------------
# q, k, v


@entry_points
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(B, SQ, H), (B, SQ, H, D, 1), ()])
def test_rank(call, name, shape):
    arrays = dict(zip("qkv", qkv()))
    arrays[name] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=msg(f"{name}: expected rank 4", f"got shape {shape}")):
        call(**arrays)


@entry_points
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8])
def test_unsupported_dtype(call, dtype):
    q, k, v = qkv()
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    with pytest.raises(TypeError, match=msg("q: expected dtype in", "float16", "float32", "float64",
                                            f"got {np.dtype(dtype).name}")):
        call(q, k, v)


def test_unsupported_dtype_lists_bfloat16():
    if bfloat16() is None:
        pytest.skip("ml_dtypes not installed")
    q, k, v = (x.astype(np.int8) for x in qkv())
    with pytest.raises(TypeError, match=msg("q: expected dtype in", "bfloat16", "got int8")):
        flash_attn_forward(q, k, v)


@entry_points
@pytest.mark.parametrize("name", ["k", "v"])
def test_dtype_mismatch(call, name):
    arrays = dict(zip("qkv", qkv(np.float32)))
    arrays[name] = arrays[name].astype(np.float64)
    with pytest.raises(TypeError, match=msg(f"{name}: expected the dtype of q (float32)", "got float64")):
        call(**arrays)


def test_dtype_mismatch_half():
    if bfloat16() is None:
        pytest.skip("ml_dtypes not installed")
    q, k, v = qkv(np.float16)
    with pytest.raises(TypeError, match=msg("k: expected the dtype of q (float16)", "got bfloat16")):
        flash_attn_forward(q, k.astype(bfloat16()), v)


@entry_points
def test_batch_mismatch(call):
    q, _, _ = qkv()
    _, k, v = qkv(b=B + 1)
    with pytest.raises(ValueError, match=msg(f"k: expected batch {B} (as q)", f"got {B + 1}")):
        call(q, k, v)


@entry_points
def test_head_dim_mismatch(call):
    q, _, _ = qkv()
    _, k, v = qkv(d=D + 2)
    with pytest.raises(ValueError, match=msg(f"k: expected head_dim {D} (as q)", f"got {D + 2}")):
        call(q, k, v)


@entry_points
@pytest.mark.parametrize("v_shape", [(B, SK + 1, HK, D), (B, SK, HK + 1, D), (B, SK, HK, D + 1), (B + 1, SK, HK, D)])
def test_k_v_shape_mismatch(call, v_shape):
    q, k, _ = qkv()
    v = np.ones(v_shape, np.float32)
    with pytest.raises(ValueError, match=msg(f"v: expected the shape of k {k.shape}", f"got {v_shape}")):
        call(q, k, v)


@entry_points
@pytest.mark.parametrize("nheads, nheads_k", [(4, 3), (3, 2), (2, 4), (4, 0)])
def test_nheads_not_a_multiple_of_nheads_k(call, nheads, nheads_k):
    q, k, v = qkv(h=nheads, hk=nheads_k)
    with pytest.raises(ValueError, match=msg(f"k: expected nheads_k dividing nheads={nheads}",
                                             f"got nheads_k={nheads_k}")):
        call(q, k, v)


@entry_points
def test_zero_head_dim(call):
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match=msg("q: expected head_dim >= 1", "got 0")):
        call(q, k, v)


@entry_points
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [[[[[1.0]]]], 1.0, None, "q"], ids=["list", "float", "None", "str"])
def test_not_an_array(call, name, bad):
    arrays = dict(zip("qkv", qkv()))
    arrays[name] = bad
    with pytest.raises(TypeError, match=msg(f"{name}: expected a NumPy, CuPy or __dlpack__ array",
                                            f"got {type(bad).__name__}")):
        call(**arrays)


class FakeDeviceArray:
    """Looks like a GPU array to flashcupy (has __dlpack__) without being one."""

    shape = (B, SK, HK, D)
    dtype = np.dtype(np.float32)

    def __dlpack__(self, *args, **kwargs):  # pragma: no cover - never called: the mix is rejected first
        raise AssertionError("a host/device mix must be rejected before any conversion")

    def __dlpack_device__(self):  # pragma: no cover
        return (2, 0)


@entry_points
def test_host_device_mix(call):
    q, _, v = qkv()
    with pytest.raises(TypeError, match=msg("expected every array on one side", "NumPy arrays", "'q'",
                                            "GPU arrays", "'k'")):
        call(q, FakeDeviceArray(), v)


class HostDLPack:
    """A host tensor with __dlpack__ (torch / JAX on the CPU, as flashcupy sees one), wrapping a NumPy array."""

    def __init__(self, a, refuse=False):
        self._a, self._refuse = a, refuse
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack__(self, *args, **kwargs):
        if self._refuse:  # as torch for a tensor that requires grad
            raise BufferError("cannot export this tensor")
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


@pytest.mark.parametrize("wrap", ["q", "k", "qkv"])
def test_host_dlpack_arrays_run_on_the_cpu_and_return_numpy(wrap):
    """Host __dlpack__ inputs (any of them; mixed with NumPy too) are taken through np.from_dlpack: same
    bits as the NumPy call, NumPy out, for every entry point."""
    q, k, v = qkv()
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    args = {n: (HostDLPack(x) if n in wrap else x) for n, x in zip("qkv", (q, k, v))}
    want = flash_attn_forward(q, k, v, causal=True)
    got = flash_attn_forward(**args, causal=True)
    assert isinstance(got.out, np.ndarray) and same_bits(got.out, want.out) and same_bits(got.lse, want.lse)
    assert same_bits(flash_attn_func(**args, causal=True), want.out)
    want_g = flash_attn_backward(dout, q, k, v, want.out, want.lse, causal=True)
    got_g = flash_attn_backward(HostDLPack(dout), *args.values(), HostDLPack(got.out), HostDLPack(got.lse), causal=True)
    assert all(isinstance(g, np.ndarray) and same_bits(g, w) for g, w in zip(got_g, want_g))


@entry_points
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_host_dlpack_numpy_cannot_import(call, name):
    arrays = dict(zip("qkv", qkv()))
    arrays[name] = HostDLPack(arrays[name], refuse=True)
    with pytest.raises(TypeError, match=msg(f"{name}: expected a host __dlpack__ array NumPy can import",
                                            "got HostDLPack", "BufferError: cannot export")):
        call(**arrays)


@entry_points
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_masked_array_refused(call, name):
    """numpy.ma.MaskedArray inputs would run with their mask ignored: refused, naming the argument."""
    arrays = dict(zip("qkv", qkv()))
    arrays[name] = np.ma.MaskedArray(arrays[name], mask=arrays[name] > 1)
    with pytest.raises(TypeError, match=msg(f"{name}: expected a plain NumPy array, got a numpy.ma.MaskedArray",
                                            "ignore")):
        call(**arrays)


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
def test_backward_masked_array_refused(name):
    args = grad_inputs()
    args[name] = np.ma.MaskedArray(args[name])  # even with nothing masked: not a plain array
    with pytest.raises(TypeError, match=msg(f"{name}: expected a plain NumPy array, got a numpy.ma.MaskedArray")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("call, names", [(flash_attn_func, "q, k, v"), (flash_attn_forward, "q, k, v"),
                                         (flash_attn_backward, "dout, q, k, v, out, lse")], ids=list(ENTRY_POINTS))
def test_gpu_arrays_without_cupy_name_the_arguments(call, names, monkeypatch):
    from flashcupy import _arrays

    monkeypatch.setattr(_arrays, "cupy_or_none", lambda: None)
    with pytest.raises(TypeError, match=msg(f"{names}: got GPU arrays", "cupy is not installed")):
        call(**{n: FakeDeviceArray() for n in names.split(", ")})


@pytest.mark.gpu
def test_host_device_mix_with_cupy():
    cp = pytest.importorskip("cupy")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=msg("expected every array on one side", "NumPy arrays", "'q'",
                                            "GPU arrays", "'k'")):
        flash_attn_forward(q, cp.asarray(k), v)


# ---------------------------------------------------------------------------------------------------
# scalars


@entry_points
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), -0.5, -1, np.float32(-2.0)])
def test_softmax_scale_value(call, scale):
    with pytest.raises(ValueError, match=msg("softmax_scale: expected a finite number >= 0", f"got {scale!r}")):
        call(*qkv(), softmax_scale=scale)


@entry_points
@pytest.mark.parametrize("scale", ["0.5", True, [0.5], np.ones(1), 1j])
def test_softmax_scale_type(call, scale):
    with pytest.raises(TypeError, match=msg("softmax_scale: expected a float", f"got {type(scale).__name__}")):
        call(*qkv(), softmax_scale=scale)


def test_softmax_scale_accepts_ints_and_numpy_scalars():
    q, k, v = qkv()
    for scale in (0, 1, np.float32(0.5), np.int64(2)):
        flash_attn_forward(q, k, v, softmax_scale=scale)


@entry_points
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_dropout_p_value(call, p):
    with pytest.raises(ValueError, match=msg("dropout_p: expected a float in [0, 1)", f"got {p!r}")):
        call(*qkv(), dropout_p=p)


@entry_points
@pytest.mark.parametrize("p", ["0.1", None, True, [0.1]])
def test_dropout_p_type(call, p):
    with pytest.raises(TypeError, match=msg("dropout_p: expected a float in [0, 1)", f"got {type(p).__name__}")):
        call(*qkv(), dropout_p=p)


@entry_points
@pytest.mark.parametrize("causal", [1, 0, "yes", None, 1.0])
def test_causal_not_bool(call, causal):
    with pytest.raises(TypeError, match=msg("causal: expected a bool", f"got {type(causal).__name__}")):
        call(*qkv(), causal=causal)


def test_causal_accepts_numpy_bool():
    q, k, v = qkv()
    a = flash_attn_forward(q, k, v, causal=np.bool_(True))
    b = flash_attn_forward(q, k, v, causal=True)
    np.testing.assert_array_equal(a.out, b.out)


@pytest.mark.parametrize("call", [ENTRY_POINTS["func"], ENTRY_POINTS["backward"]], ids=["func", "backward"])
@pytest.mark.parametrize("value", [1, "no", None])
def test_deterministic_not_bool(call, value):
    with pytest.raises(TypeError, match=msg("deterministic: expected a bool", f"got {type(value).__name__}")):
        call(*qkv(), deterministic=value)


@pytest.mark.parametrize("value", [1, 0, "no", None, 1.0, "yes"])
def test_return_lse_not_bool(value):
    with pytest.raises(TypeError, match=msg("return_lse: expected a bool", f"got {type(value).__name__}")):
        flash_attn_func(*qkv(), return_lse=value)


def test_return_lse_accepts_numpy_bool():
    q, k, v = qkv()
    out, lse = flash_attn_func(q, k, v, return_lse=np.bool_(True))
    assert lse.shape == (B, H, SQ)
    assert isinstance(flash_attn_func(q, k, v, return_lse=np.bool_(False)), np.ndarray)


def test_seed_is_ignored_without_dropout():
    """Documented: seed only matters with dropout_p > 0; with dropout_p = 0 it is not even validated."""
    q, k, v = qkv()
    want = flash_attn_forward(q, k, v)
    for seed in (7, (1, 2), "not a seed"):
        got = flash_attn_forward(q, k, v, seed=seed)
        assert got.rng_state is None and same_bits(got.out, want.out)


@entry_points
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0, np.float32(1)])
def test_allow_tf32_not_bool(call, dtype, value):
    # validated for every dtype, though only float32 on the GPU uses it
    with pytest.raises(TypeError, match=msg("allow_tf32: expected a bool", f"got {type(value).__name__}")):
        call(*qkv(dtype), allow_tf32=value)


def test_allow_tf32_is_ignored_on_the_cpu():
    """NumPy float32 runs the exact CPU path: allow_tf32 (a bool or a NumPy bool) changes no bit."""
    q, k, v = qkv()
    want = flash_attn_forward(q, k, v, causal=True)
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    want_grads = flash_attn_backward(dout, q, k, v, want.out, want.lse, causal=True)

    for flag in (True, np.bool_(True), False):
        got = flash_attn_forward(q, k, v, causal=True, allow_tf32=flag)
        assert same_bits(got.out, want.out) and same_bits(got.lse, want.lse)
        grads = flash_attn_backward(dout, q, k, v, got.out, got.lse, causal=True, allow_tf32=flag)
        assert all(same_bits(g, w) for g, w in zip(grads, want_grads))
        assert same_bits(flash_attn_func(q, k, v, causal=True, allow_tf32=flag), want.out)


@pytest.mark.parametrize("call", [ENTRY_POINTS["func"], ENTRY_POINTS["forward"]], ids=["func", "forward"])
@pytest.mark.parametrize("seed", ["1", 1.5, (1, 2, 3), (1, "2"), True, [1.0, 0]])
def test_dropout_seed_type(call, seed):
    with pytest.raises(TypeError, match=msg("seed: expected an int seed or a (seed, offset) pair of ints",
                                            f"got {seed!r}")):
        call(*qkv(), dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("call", [ENTRY_POINTS["func"], ENTRY_POINTS["forward"]], ids=["func", "forward"])
@pytest.mark.parametrize("seed", [-1, 2**64, (0, -1), (0, 2**32)])
def test_dropout_seed_range(call, seed):
    got = (seed, 0) if isinstance(seed, int) else seed  # an int seed reads as (seed, offset 0)
    with pytest.raises(ValueError, match=msg("seed: expected 0 <= seed < 2**64 and 0 <= offset < 2**32",
                                             f"got {got!r}")):
        call(*qkv(), dropout_p=0.1, seed=seed)


def test_backward_dropout_needs_rng_state():
    args = grad_inputs()
    with pytest.raises(ValueError, match=msg("rng_state: expected the forward's rng_state", "got None")):
        flash_attn_backward(**args, dropout_p=0.1)
    with pytest.raises(TypeError, match=msg("rng_state: expected an int seed or a (seed, offset) pair",
                                            "got 'x'")):
        flash_attn_backward(**args, dropout_p=0.1, rng_state="x")


# ---------------------------------------------------------------------------------------------------
# backward: dout, out, lse must match the forward


@pytest.mark.parametrize("name", ["dout", "out"])
def test_backward_wrong_shape(name):
    args = grad_inputs()
    good = args[name].shape
    args[name] = np.ones((B, SQ + 1, H, D), np.float32)
    with pytest.raises(ValueError, match=msg(f"{name}: expected shape {good} (as q)", f"got {(B, SQ + 1, H, D)}")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("name", ["dout", "out"])
def test_backward_wrong_rank(name):
    args = grad_inputs()
    args[name] = np.ones((B, SQ, H * D), np.float32)
    with pytest.raises(ValueError, match=msg(f"{name}: expected rank 4", f"got shape {(B, SQ, H * D)}")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("name", ["dout", "out"])
def test_backward_wrong_dtype(name):
    args = grad_inputs()
    args[name] = args[name].astype(np.float64)
    with pytest.raises(TypeError, match=msg(f"{name}: expected dtype float32 (as q)", "got float64")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("shape", [(B, SQ, H), (B, SQ, H, 1), (B, H, SQ + 1), (B, SQ, H)[::-1]])
def test_backward_lse_wrong_shape(shape):
    args = grad_inputs()
    args["lse"] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=msg(f"lse: expected shape {(B, H, SQ)} (batch, nheads, seqlen_q)",
                                             f"got {shape}")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("q_dtype, lse_dtype, want", [
    (np.float32, np.float64, "float32"),
    (np.float32, np.float16, "float32"),
    (np.float16, np.float16, "float32"),  # half inputs still take a float32 LSE
    (np.float64, np.float32, "float64"),  # float64 inputs take a float64 LSE
])
def test_backward_lse_wrong_dtype(q_dtype, lse_dtype, want):
    args = grad_inputs(q_dtype)
    args["lse"] = args["lse"].astype(lse_dtype)
    with pytest.raises(TypeError, match=msg(f"lse: expected dtype {want}", f"got {np.dtype(lse_dtype).name}")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
def test_backward_not_an_array(name):
    args = grad_inputs()
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=msg(f"{name}: expected a NumPy, CuPy or __dlpack__ array", "got list")):
        flash_attn_backward(**args)


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
def test_backward_host_device_mix(name):
    args = grad_inputs()
    args[name] = FakeDeviceArray()
    with pytest.raises(TypeError, match=msg("expected every array on one side", f"GPU arrays ['{name}']")):
        flash_attn_backward(**args)


def test_valid_inputs_pass():
    """The reference inputs of this module are themselves valid, on every entry point."""
    for call in ENTRY_POINTS.values():
        call(*qkv())
        call(*qkv(np.float64), softmax_scale=0.0, causal=True, dropout_p=0.0)
        call(*qkv(), allow_tf32=True)


def test_kernel_path_validates_allow_tf32_everywhere():
    """kernel_path checks allow_tf32 whichever branch it takes (CPU, half precision, dropout)."""
    from flashcupy.interface import kernel_path

    for kw in (dict(dtype=np.float16, on_gpu=False), dict(dtype=np.float32, on_gpu=False),
               dict(dtype=np.float32, on_gpu=True, dropout_p=0.1)):
        with pytest.raises(TypeError, match="allow_tf32"):
            kernel_path(head_dim=64, allow_tf32="yes", **kw)
    assert kernel_path(np.float32, 64, on_gpu=False, allow_tf32=True) == "NumPy chunked path"


# ---------------------------------------------------------------------------------------------------
# not validated: non-finite and huge values (what flash_attn_forward's docstring says they give)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_inputs_give_nan_rows_with_lse_minus_inf(dtype):
    q, k, v = qkv(dtype, b=1, h=1, hk=1, sk=SQ)
    q[0, 1, 0, 0] = np.nan  # query row 1
    res = flash_attn_forward(q, k, v)
    assert np.isnan(res.out[0, 1]).all() and res.lse[0, 0, 1] == -np.inf
    assert np.isfinite(np.delete(res.out, 1, axis=1)).all() and np.isfinite(np.delete(res.lse, 1, axis=2)).all()
    q, k, v = qkv(dtype, b=1, h=1, hk=1, sk=SQ)
    k[0, 2, 0, 0] = np.nan  # key 2: causal rows >= 2 see it
    res = flash_attn_forward(q, k, v, causal=True)
    assert np.isfinite(res.out[0, :2]).all() and np.isnan(res.out[0, 2:]).all()
    assert (res.lse[0, 0, 2:] == -np.inf).all() and np.isfinite(res.lse[0, 0, :2]).all()
    q, k, v = qkv(dtype, b=1, h=1, hk=1, sk=SQ)
    v[0, 2, 0, 0] = np.nan  # a value: column 0 of out is NaN in every row, even those that cannot see key 2
    res = flash_attn_forward(q, k, v, causal=True)  # (their weight of key 2 is 0, and 0 * NaN is NaN)
    assert np.isnan(res.out[0, :, 0, 0]).all() and np.isfinite(res.out[..., 1:]).all() and np.isfinite(res.lse).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype, finite, overflows", [(np.float32, 1e15, 1e30), (np.float16, 200.0, None),
                                                      (np.float64, 1e30, 1e160)])
def test_overflowing_scores_give_all_nan(dtype, finite, overflows):
    """Scores are q k^T in the compute dtype (float32 for float16 and float32): past its maximum they are
    inf and the rows are NaN with lse -inf; below it out and lse are finite."""
    q, k, v = qkv(np.float64)
    for amp, ok in ((finite, True), (overflows, False)):
        if amp is None:
            continue
        res = flash_attn_forward(*(x.astype(dtype) for x in (q * amp, k * amp, v)))
        if ok:
            assert np.isfinite(res.out).all() and np.isfinite(res.lse).all()
        else:
            assert np.isnan(res.out).all() and (res.lse == -np.inf).all()
