"""The fused fp16/bf16 backward kernels on a GPU, against the float64 oracle's gradients (3x rule)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import assert_backward_rule, nan_padded, random_inputs, to_numpy

import flashcupy
from flashcupy._arrays import bfloat16
from flashcupy._configs import HEAD_DIM_BUCKETS

pytestmark = pytest.mark.gpu

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])
SEQLENS = (1, 17, 113, 1023, 2049)


def _cp():
    import cupy

    return cupy


def grads(q, k, v, dout, *, causal, deterministic=False, softmax_scale=None):
    """flashcupy's (dq, dk, dv) for CuPy (or NumPy, moved to the GPU) inputs."""
    cp = _cp()
    q, k, v, dout = (x if isinstance(x, cp.ndarray) else cp.asarray(x) for x in (q, k, v, dout))
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal,
                                         deterministic=deterministic, softmax_scale=softmax_scale)


def bits(x):
    return x.view(_cp().uint16)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_specialization(rng, dtype, head_dim, causal, deterministic):
    q, k, v, do = random_inputs(rng, 2, 113, 203, 4, 2, head_dim, dtype, grad=True)
    g = grads(q, k, v, do, causal=causal, deterministic=deterministic)
    for x, ref in zip(g, (q, k, v)):
        assert x.shape == ref.shape and x.dtype == ref.dtype
    assert_backward_rule(g, do, q, k, v, causal=causal)


@given(
    batch=st.integers(1, 2),
    seqlen_q=st.sampled_from(SEQLENS) | st.integers(1, 300),
    seqlen_k=st.sampled_from(SEQLENS) | st.integers(1, 300),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    head_dim=st.sampled_from([32, 64, 128, 40]),
    causal=st.booleans(),
    bhsd=st.booleans(),
    dtype=st.sampled_from(HALF_DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=30, deadline=None)
@example(batch=1, seqlen_q=2049, seqlen_k=1023, heads=(2, 1), head_dim=128, causal=True, bhsd=True,
         dtype=HALF_DTYPES[-1], seed=1)
@example(batch=2, seqlen_q=1, seqlen_k=2049, heads=(4, 2), head_dim=64, causal=False, bhsd=False,
         dtype=HALF_DTYPES[0], seed=2)
def test_backward_matches_oracle(batch, seqlen_q, seqlen_k, heads, head_dim, causal, bhsd, dtype, seed):
    cp = _cp()
    rng = np.random.default_rng(seed)
    q, k, v, do = random_inputs(rng, batch, seqlen_q, seqlen_k, *heads, head_dim, dtype, grad=True)
    xs = [cp.asarray(x) for x in (q, k, v, do)]
    if bhsd:  # BSHD views of BHSD-contiguous data, dout included
        xs = [cp.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in xs]
    g = grads(*xs, causal=causal)
    assert_backward_rule(g, do, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_large_logits(rng, dtype):
    q, k, v, do = random_inputs(rng, 2, 131, 257, 4, 4, 64, dtype, amplitude=5.0, grad=True)
    for causal in (False, True):
        assert_backward_rule(grads(q, k, v, do, causal=causal), do, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 40, 100, 250])
def test_head_dims_between_buckets(rng, head_dim):
    q, k, v, do = random_inputs(rng, 1, 77, 130, 2, 1, head_dim, np.float16, grad=True)
    assert_backward_rule(grads(q, k, v, do, causal=True), do, q, k, v, causal=True)


def test_empty_rows_give_zero_gradients(rng):
    q, k, v, do = random_inputs(rng, 2, 300, 70, 2, 1, 64, np.float16, grad=True)
    dq, dk, dv = (to_numpy(x).astype(np.float32) for x in grads(q, k, v, do, causal=True))
    assert not any(np.isnan(x).any() for x in (dq, dk, dv))
    assert (dq[:, :230] == 0).all()
    assert_backward_rule(grads(q, k, v, do, causal=True), do, q, k, v, causal=True)


def test_softmax_scale_zero(rng):
    q, k, v, do = random_inputs(rng, 1, 65, 80, 2, 1, 64, np.float16, grad=True)
    g = grads(q, k, v, do, causal=True, softmax_scale=0.0)
    assert_backward_rule(g, do, q, k, v, causal=True, softmax_scale=0.0)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_no_out_of_bounds_reads(rng, dtype):
    """dout, q, k, v, out are views into NaN-filled buffers: no NaN in the gradients, which are
    bitwise equal to the run on compact copies (dq up to atomic-order rounding; deterministic: exact)."""
    cp = _cp()
    q, k, v, do = random_inputs(rng, 2, 131, 77, 4, 2, 64, dtype, grad=True)

    for causal in (False, True):
        qg, kg, vg, dog = (cp.asarray(x) for x in (q, k, v, do))
        res = flashcupy.flash_attn_forward(qg, kg, vg, causal=causal)
        ref = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=causal, deterministic=True)
        qp, kp, vp, dop = (nan_padded(x) for x in (q, k, v, do))
        outp = nan_padded(to_numpy(res.out))
        got = flashcupy.flash_attn_backward(dop, qp, kp, vp, outp, res.lse, causal=causal, deterministic=True)
        for a, b in zip(got, ref):
            assert not np.isnan(to_numpy(a).astype(np.float32)).any()
            assert cp.array_equal(bits(a), bits(b))


def test_deterministic_mode_is_bitwise_reproducible(rng):
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in random_inputs(rng, 4, 511, 511, 8, 2, 64, np.float16, grad=True))
    res = flashcupy.flash_attn_forward(q, k, v, causal=True)
    first = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=True, deterministic=True)
    for _ in range(20):
        again = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=True, deterministic=True)
        for a, b in zip(again, first):
            assert cp.array_equal(bits(a), bits(b))


def test_race_condition(rng):
    """flash-attn's race test: batch 60, 100 repetitions. dk and dv bitwise equal every time; dq within
    the rounding of float32 atomics in a different order."""
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in random_inputs(rng, 60, 128, 128, 4, 4, 64, np.float16, grad=True))
    res0 = flashcupy.flash_attn_forward(q, k, v, causal=False)
    dq0, dk0, dv0 = flashcupy.flash_attn_backward(do, q, k, v, res0.out, res0.lse)
    dq0_f = dq0.astype(cp.float32)
    tol = float(cp.abs(dq0_f).max()) * 2.0**-9  # a couple of fp16 ulps at dq's magnitude
    for _ in range(100):
        res = flashcupy.flash_attn_forward(q, k, v, causal=False)
        assert cp.array_equal(bits(res.out), bits(res0.out)) and cp.array_equal(res.lse, res0.lse)
        dq, dk, dv = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse)
        assert cp.array_equal(bits(dk), bits(dk0)) and cp.array_equal(bits(dv), bits(dv0))
        assert float(cp.abs(dq.astype(cp.float32) - dq0_f).max()) <= tol


def test_cuda_graph_capture_and_replay(rng):
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in random_inputs(rng, 2, 200, 300, 4, 2, 64, np.float16, grad=True))
    grads(q, k, v, do, causal=True)  # compile outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        g = grads(q, k, v, do, causal=True)
        graph = stream.end_capture()
        for x in g:
            x.fill(0)
        graph.launch(stream)
    stream.synchronize()
    assert_backward_rule(g, do.get(), q.get(), k.get(), v.get(), causal=True)
