"""The tape's attention ops with issue 16's features (flashcupy.tape.flash_attention / naive_attention:
window_size, softcap, alibi_slopes, learnable sinks): gradients against central finite differences
(the naive op, float64), both ops against the oracle (float64), the flash op against the naive op
by DESIGN.md's rule in float16 / bfloat16, and the sinks' gradient through the tape (a Tensor used
twice accumulates). Fresh random inputs; CPU only."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import backward_rule_inputs, check_rule, magnitude_of, max_abs_err, random_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcupy import reference
from flashcupy import tape as T
from flashcupy._arrays import bfloat16
from flashcupy.tape import Tensor, no_grad

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("cpu_path_only")]

FD_STEP = 1e-6


@st.composite
def problems(draw):
    hk = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 2)), sq=draw(st.integers(1, 5)), sk=draw(st.integers(1, 5)), hk=hk,
                h=hk * draw(st.integers(1, 2)), d=draw(st.sampled_from([1, 2, 3])), causal=draw(st.booleans()),
                window=draw(st.sampled_from([(-1, -1), (1, 0), (0, 2), (2, -1)])),
                softcap=draw(st.sampled_from([0.0, 0.7, 3.0])), alibi=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


def make(pb):
    rng = np.random.default_rng(pb["seed"])
    q, k, v, dout = random_inputs(rng, pb["batch"], pb["sq"], pb["sk"], pb["h"], pb["hk"], pb["d"], np.float64,
                                  amplitude=1.5, grad=True)
    sinks = rng.standard_normal(pb["h"]).astype(np.float32).astype(np.float64)  # float32 values (the flash op's)
    kw = dict(causal=pb["causal"], window_size=pb["window"], softcap=pb["softcap"])
    if pb["alibi"]:
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, pb["h"]).astype(np.float32)
    return q, k, v, dout, sinks, kw


def _numeric_grad(f, arrays, i):
    a = arrays[i]
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        orig = a[idx]
        a[idx] = orig + FD_STEP
        plus = f()
        a[idx] = orig - FD_STEP
        minus = f()
        a[idx] = orig
        g[idx] = (plus - minus) / (2 * FD_STEP)
    return g


@settings(max_examples=25)
@given(pb=problems())
def test_naive_op_with_learnable_sinks_matches_finite_differences(pb):
    q, k, v, dout, sinks, kw = make(pb)
    arrays = [q, k, v, sinks]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    T.naive_attention(*tensors[:3], sinks=tensors[3], **kw).backward(dout)

    def f():
        with no_grad():
            return float((T.naive_attention(*(Tensor(a) for a in arrays[:3]), sinks=arrays[3], **kw).data
                          * dout).sum())

    for i, t in enumerate(tensors):
        np.testing.assert_allclose(t.grad, _numeric_grad(f, arrays, i), rtol=1e-5, atol=1e-7, err_msg=f"input {i}")


@pytest.mark.parametrize("op", [T.flash_attention, T.naive_attention], ids=["flash", "naive"])
@given(pb=problems())
def test_attention_ops_with_features_match_the_oracle(op, pb):
    """out, dq, dk, dv to 1e-12 (float64) and dsinks to its float32 storage (the flash op's dsinks is
    float32, like flashcupy's; the naive op's is float64)."""
    q, k, v, dout, sinks, kw = make(pb)
    tq, tk, tv, ts = (Tensor(x, requires_grad=True) for x in (q, k, v, sinks))
    out = op(tq, tk, tv, sinks=ts, **kw)
    out.backward(dout)
    ref_out, _ = reference.attention_forward(q, k, v, sinks=sinks, **kw)
    *refs, ref_ds = reference.attention_backward(dout, q, k, v, sinks=sinks, **kw)
    scale = max(1.0, magnitude_of(ref_out, *refs))
    assert max_abs_err(out.data, ref_out) <= 1e-12 * scale
    for got, ref in zip((tq.grad, tk.grad, tv.grad), refs):
        assert max_abs_err(got, ref) <= 1e-12 * scale
    assert ts.grad.dtype == np.float64 and ts.grad.shape == sinks.shape
    tol = 1e-12 * max(1.0, magnitude_of(ref_ds)) + (np.finfo(np.float32).eps * np.abs(ref_ds)
                                                     if op is T.flash_attention else 0.0)
    assert (np.abs(ts.grad - ref_ds) <= tol).all(), (ts.grad, ref_ds)


def test_sinks_used_twice_accumulate(rng):
    """One sinks Tensor shared by two attention calls (a diamond): its grad is the sum of both calls'."""
    q, k, v, dout = random_inputs(rng, 2, 6, 9, 4, 2, 8, np.float64, grad=True)
    sinks = rng.standard_normal(4).astype(np.float32)
    for op in (T.flash_attention, T.naive_attention):
        shared = Tensor(sinks.copy(), requires_grad=True)
        a = op(Tensor(q), Tensor(k), Tensor(v), sinks=shared, causal=True)
        b = op(Tensor(q), Tensor(k), Tensor(v), sinks=shared, window_size=(2, 1), softcap=2.0)
        (a + b).backward(dout)
        parts = []
        for kw in (dict(causal=True), dict(window_size=(2, 1), softcap=2.0)):
            s = Tensor(sinks.copy(), requires_grad=True)
            op(Tensor(q), Tensor(k), Tensor(v), sinks=s, **kw).backward(dout)
            parts.append(s.grad)
        assert shared.grad.dtype == np.float32
        np.testing.assert_allclose(shared.grad, parts[0] + parts[1], rtol=1e-6, atol=1e-7)


def test_learnable_sinks_train(rng):
    """Gradient descent on the sinks alone lowers a loss: the gradient points the right way."""
    q, k, v = random_inputs(rng, 1, 8, 8, 2, 2, 4, np.float64)
    target = rng.standard_normal((1, 8, 2, 4)) * 0.1
    sinks = Tensor(np.zeros(2, np.float32) + rng.standard_normal(2).astype(np.float32), requires_grad=True)

    def loss():
        out = T.flash_attention(Tensor(q), Tensor(k), Tensor(v), sinks=sinks, causal=True)
        return T.mean((out - Tensor(target)) * (out - Tensor(target)))

    first = loss()
    first.backward()
    for _ in range(20):
        sinks.zero_grad()
        value = loss()
        value.backward()
        sinks.data -= 2.0 * sinks.grad
    assert loss().item() < first.item()


def test_sinks_of_another_dtype_and_fixed_alibi(rng):
    """A float64 sinks Tensor runs as float32 in flashcupy and gets a float64 gradient; a fixed ALiBi
    Tensor is accepted, one that requires a gradient is refused (no gradient for slopes)."""
    q, k, v, dout = random_inputs(rng, 1, 5, 7, 2, 1, 8, np.float32, grad=True)
    sinks = Tensor(rng.standard_normal(2), requires_grad=True)
    slopes = Tensor(rng.uniform(0.1, 1.0, 2).astype(np.float32))
    out = T.flash_attention(Tensor(q), Tensor(k), Tensor(v), sinks=sinks, alibi_slopes=slopes)
    out.backward(dout)
    assert sinks.grad.dtype == np.float64 and np.isfinite(sinks.grad).all()
    with pytest.raises(ValueError, match="alibi_slopes"):
        T.flash_attention(Tensor(q), Tensor(k), Tensor(v), alibi_slopes=Tensor(slopes.data, requires_grad=True))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_flash_op_against_naive_op_in_half_precision(dtype_name, rng):
    """The flash op's gradients (dq, dk, dv, dsinks) against the naive op's in T by the rule, every
    feature on, float32 tensors with attention in T."""
    dtype = np.dtype(np.float16) if dtype_name == "float16" else bfloat16()
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    q, k, v, dout = (x.astype(dtype).astype(np.float32) for x in random_inputs(
        rng, 2, 33, 40, 4, 2, 16, np.float32, grad=True))
    sinks = rng.standard_normal(4).astype(np.float32)
    kw = dict(causal=True, window_size=(12, 3), softcap=4.0, alibi_slopes=rng.uniform(0.05, 0.5, 4).astype(np.float32))
    grads = {}
    for op in (T.flash_attention, T.naive_attention):
        ts = [Tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
        out = op(*ts[:3], sinks=ts[3], dtype=dtype, **kw)
        out.backward(dout)
        grads[op] = [t.grad for t in ts]
    rule = backward_rule_inputs(*(x.astype(dtype) for x in (dout, q, k, v)), sinks=sinks, **kw)
    for i, name in enumerate(("dq", "dk", "dv", "dsinks")):
        check_rule(name, grads[T.flash_attention][i], **dict(rule[name], naive=grads[T.naive_attention][i]))
