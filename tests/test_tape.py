"""The autodiff tape (flashcupy.tape): every op's vector-Jacobian product against central finite
differences in float64 on NumPy, graph bookkeeping (diamond, reuse, no_grad, seeds), the attention ops
against the oracle's gradients, and on the GPU the flash op's gradients against the naive op's by
DESIGN.md's rule.

Each VJP check draws a random cotangent c, runs out.backward(c) and compares every input's grad with
(f(x + h e_i) - f(x - h e_i)) / 2h of f(x) = sum(op(x) * c).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from flashcupy import reference
from flashcupy import tape as T
from flashcupy.tape import Tensor, no_grad

FD_STEP = 1e-6
RTOL, ATOL = 1e-5, 1e-7

dims = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def fd_check(build, *arrays, seed=0, rtol=RTOL, atol=ATOL):
    """Compare the tape's gradients of sum(build(*tensors) * c) with central differences, in float64."""
    rng = np.random.default_rng(seed)
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = build(*tensors)
    cot = np.asarray(rng.standard_normal(out.shape))
    out.backward(cot)

    def f():
        with no_grad():
            return float((build(*(Tensor(a) for a in arrays)).data * cot).sum())

    for n, (a, t) in enumerate(zip(arrays, tensors)):
        numeric = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            orig = a[i]
            a[i] = orig + FD_STEP
            f_plus = f()
            a[i] = orig - FD_STEP
            f_minus = f()
            a[i] = orig
            numeric[i] = (f_plus - f_minus) / (2 * FD_STEP)
        assert t.grad is not None, f"input {n} got no gradient"
        assert t.grad.shape == a.shape and t.grad.dtype == np.float64
        np.testing.assert_allclose(t.grad, numeric, rtol=rtol, atol=atol, err_msg=f"input {n}")
    return tensors


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# -- elementwise with broadcasting --------------------------------------------------------------------


@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3), seed=seeds)
def test_add_sub_mul_broadcast(shapes, seed):
    a, b = randn(seed, *shapes.input_shapes[0]), randn(seed + 1, *shapes.input_shapes[1])
    fd_check(lambda x, y: x + y, a, b, seed=seed)
    fd_check(lambda x, y: x - y, a, b, seed=seed)
    fd_check(lambda x, y: x * y, a, b, seed=seed)


@given(shape=st.lists(dims, min_size=1, max_size=3), c=st.floats(-3, 3), seed=seeds)
def test_scalar_ops(shape, c, seed):
    a = randn(seed, *shape)
    fd_check(lambda x: (2.5 - x * c + 1.0) / 3.0, a, seed=seed)
    fd_check(lambda x: -x, a, seed=seed)


def test_ndarray_on_the_left_defers_to_tensor():
    a, b = np.ones((2, 3)), Tensor(np.full((2, 3), 2.0), requires_grad=True)
    out = a * b + a
    assert isinstance(out, Tensor)
    out.sum().backward()
    np.testing.assert_array_equal(b.grad, a)


# -- linear algebra -----------------------------------------------------------------------------------


@given(batch=mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3), m=dims, k=dims, n=dims, seed=seeds)
def test_matmul(batch, m, k, n, seed):
    a = randn(seed, *batch.input_shapes[0], m, k)
    b = randn(seed + 1, *batch.input_shapes[1], k, n)
    fd_check(T.matmul, a, b, seed=seed)


@given(lead=st.lists(dims, min_size=1, max_size=3), n_in=dims, n_out=dims, bias=st.booleans(), seed=seeds)
def test_linear(lead, n_in, n_out, bias, seed):
    x, w, b = randn(seed, *lead, n_in), randn(seed + 1, n_in, n_out), randn(seed + 2, n_out)
    if bias:
        fd_check(T.linear, x, w, b, seed=seed)
    else:
        fd_check(lambda x, w: T.linear(x, w), x, w, seed=seed)
    out = T.linear(Tensor(x), Tensor(w), Tensor(b) if bias else None)
    np.testing.assert_allclose(out.data, x @ w + (b if bias else 0.0), rtol=1e-12)


# -- shapes -------------------------------------------------------------------------------------------


@given(b=dims, s=dims, h=dims, d=dims, seed=seeds)
def test_split_heads_reshape_transpose(b, s, h, d, seed):
    x = randn(seed, b, s, 3 * h * d)

    def heads(x):  # (B, S, 3HD) -> q, k, v (B, S, H, D) -> (B, H, S, D) mixed back together
        q, k, v = T.split(x.reshape(b, s, 3, h, d), 3, axis=2)
        q, k, v = (t.reshape(b, s, h, d) for t in (q, k, v))
        return q.transpose(0, 2, 1, 3) * k.transpose(0, 2, 1, 3) + v.transpose((0, 2, 1, 3))

    fd_check(heads, x, seed=seed)
    fd_check(lambda x: x.transpose(), x, seed=seed)


@given(shape=st.lists(st.integers(2, 4), min_size=2, max_size=3), seed=seeds)
def test_basic_indexing(shape, seed):
    x = randn(seed, *shape)
    fd_check(lambda x: x[1:, ..., :-1] * x[:-1, ..., 1:] + x[0, ..., :-1], x, seed=seed)
    fd_check(lambda x: x[None, -1], x, seed=seed)


def test_fancy_indexing_is_refused():
    with pytest.raises(TypeError, match="embedding"):
        Tensor(np.zeros(3), requires_grad=True)[np.array([0, 0])]


@given(vocab=st.integers(1, 5), dim=dims, idx_shape=st.lists(dims, min_size=1, max_size=2), seed=seeds)
def test_embedding_repeated_indices(vocab, dim, idx_shape, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, vocab, size=idx_shape)
    w = randn(seed, vocab, dim)
    fd_check(lambda w: T.embedding(w, idx), w, seed=seed)


def test_embedding_accumulates_every_repeat():
    w = Tensor(np.zeros((3, 2)), requires_grad=True)
    T.embedding(w, np.array([[2, 2], [2, 0]])).sum().backward()
    np.testing.assert_array_equal(w.grad, [[1, 1], [0, 0], [3, 3]])


# -- normalisation, nonlinearity, reductions, loss ----------------------------------------------------


@given(lead=st.lists(dims, min_size=0, max_size=2), c=st.integers(2, 6), seed=seeds)
def test_layer_norm(lead, c, seed):
    x, w, b = randn(seed, *lead, c), randn(seed + 1, c), randn(seed + 2, c)
    fd_check(T.layer_norm, x, w, b, seed=seed)
    y = T.layer_norm(Tensor(x), Tensor(np.ones(c)), Tensor(np.zeros(c))).data
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), x.var(-1) / (x.var(-1) + 1e-5), rtol=1e-10)


@given(shape=st.lists(dims, min_size=1, max_size=3), seed=seeds)
def test_gelu(shape, seed):
    x = 2.0 * randn(seed, *shape)
    fd_check(T.gelu, x, seed=seed)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    # Two float64 evaluations of 0.5 x (1 + t) differ by rounding of t (a few eps), which 1 + t turns
    # into an absolute error of a few eps * |x| where it cancels (x << 0): bound the error by that,
    # not relative to the (tiny) result.
    err = np.abs(T.gelu(Tensor(x)).data - expected)
    assert (err <= 4 * np.finfo(np.float64).eps * np.abs(x)).all(), float((err / np.abs(x)).max())


@given(shape=st.lists(dims, min_size=1, max_size=3), keepdims=st.booleans(), data=st.data(), seed=seeds)
def test_sum_mean(shape, keepdims, data, seed):
    x = randn(seed, *shape)
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    fd_check(lambda x: x.sum(axis=axis, keepdims=keepdims), x, seed=seed)
    fd_check(lambda x: T.mean(x, axis=axis, keepdims=keepdims), x, seed=seed)
    if len(shape) >= 2:
        fd_check(lambda x: T.mean(x, axis=(0, -1)), x, seed=seed)


@given(lead=st.lists(dims, min_size=1, max_size=2), vocab=st.integers(1, 6), seed=seeds)
def test_cross_entropy(lead, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = 3.0 * randn(seed, *lead, vocab)
    targets = rng.integers(0, vocab, size=lead)
    fd_check(lambda z: T.cross_entropy(z, targets), logits, seed=seed)
    z = logits.reshape(-1, vocab)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    expected = (lse - z[np.arange(len(z)), targets.reshape(-1)]).mean()
    np.testing.assert_allclose(T.cross_entropy(Tensor(logits), targets).data, expected, rtol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    loss = T.cross_entropy(Tensor(np.array([[1e4, 0.0], [0.0, -1e4]]), requires_grad=True), np.array([0, 0]))
    assert np.isfinite(loss.item()) and abs(loss.item() - 0.0) < 1e-12


# -- attention ----------------------------------------------------------------------------------------

attention_ops = pytest.mark.parametrize("op", [T.flash_attention, T.naive_attention], ids=["flash", "naive"])


@st.composite
def attention_shapes(draw):
    nheads_k = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 2)), seqlen_q=draw(st.integers(1, 4)), seqlen_k=draw(st.integers(1, 4)),
                nheads=nheads_k * draw(st.integers(1, 2)), nheads_k=nheads_k, head_dim=draw(st.sampled_from([1, 2, 3])))


def attention_inputs(seed, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seqlen_q, nheads, head_dim))
    k = rng.standard_normal((batch, seqlen_k, nheads_k, head_dim))
    v = rng.standard_normal((batch, seqlen_k, nheads_k, head_dim))
    dout = rng.standard_normal((batch, seqlen_q, nheads, head_dim))
    return q, k, v, dout


@attention_ops
@settings(max_examples=40)
@given(shape=attention_shapes(), causal=st.booleans(), seed=seeds)
def test_attention_finite_differences(op, shape, causal, seed):
    q, k, v, _ = attention_inputs(seed, **shape)
    fd_check(lambda q, k, v: op(q, k, v, causal=causal, softmax_scale=0.7), q, k, v, seed=seed)


@attention_ops
@given(shape=attention_shapes(), causal=st.booleans(), seed=seeds)
def test_attention_matches_oracle(op, shape, causal, seed):
    """Forward and gradients against flashcupy.reference in float64 (relative 1e-12, DESIGN.md)."""
    q, k, v, dout = attention_inputs(seed, **shape)
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    out = op(tq, tk, tv, causal=causal)
    out.backward(dout)
    ref_out, _ = reference.attention_forward(q, k, v, causal=causal)
    refs = reference.attention_backward(dout, q, k, v, causal=causal)
    scale = max(1.0, *(np.abs(r).max() for r in (ref_out, *refs)))
    np.testing.assert_allclose(out.data, ref_out, rtol=0, atol=1e-12 * scale)
    for name, got, ref in zip(("dq", "dk", "dv"), (tq.grad, tk.grad, tv.grad), refs):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * scale, err_msg=name)


@attention_ops
def test_attention_row_without_keys_is_zero(op):
    """Causal with seqlen_q > seqlen_k: the first rows see no key -> output 0, gradients 0, no NaN."""
    q, k, v, dout = attention_inputs(3, 1, 4, 2, 2, 1, 3)
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    out = op(tq, tk, tv, causal=True)
    out.backward(dout)
    np.testing.assert_array_equal(out.data[:, :2], 0.0)
    np.testing.assert_array_equal(tq.grad[:, :2], 0.0)
    assert all(np.isfinite(t.grad).all() for t in (tq, tk, tv))


def test_attention_mixed_precision_on_cpu():
    """dtype=float32 on float64 inputs: the op runs in float32, grads come back as float64."""
    q, k, v, dout = attention_inputs(5, 2, 5, 5, 4, 2, 8)
    for op in (T.flash_attention, T.naive_attention):
        tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
        out = op(tq, tk, tv, causal=True, dtype=np.float32)
        out.backward(dout)
        assert out.dtype == np.float64 and all(t.grad.dtype == np.float64 for t in (tq, tk, tv))
        ref = reference.attention_backward(dout, q, k, v, causal=True)
        for got, r in zip((tq.grad, tk.grad, tv.grad), ref):
            np.testing.assert_allclose(got, r, atol=1e-5)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_attention_ops_in_half_precision_on_cpu(dtype_name, rng):
    """The GPU test's rule on the CPU path: float32 tensors, attention in T, flash op vs naive op in T."""
    import helpers

    from flashcupy._arrays import bfloat16

    dtype = np.dtype(np.float16) if dtype_name == "float16" else bfloat16()
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    q, k, v, dout = (x.astype(dtype).astype(np.float32) for x in helpers.random_inputs(
        rng, 2, 33, 40, 4, 2, 16, np.float32, grad=True))
    grads = {}
    for op in (T.flash_attention, T.naive_attention):
        ts = [Tensor(x, requires_grad=True) for x in (q, k, v)]
        out = op(*ts, causal=True, dtype=dtype)
        out.backward(dout)
        grads[op] = [t.grad for t in ts]
        assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads[op])
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    rule = helpers.backward_rule_inputs(*(x.astype(dtype) for x in (dout, q, k, v)), causal=True)  # per tensor
    for i, name in enumerate(("dq", "dk", "dv")):
        err_naive = helpers.max_abs_err(grads[T.naive_attention][i], refs[i])
        assert 0 < err_naive < 0.05 * helpers.magnitude_of(refs[i])  # the naive op really rounds to T, and only that much
        helpers.check_rule(name, grads[T.flash_attention][i], **dict(rule[name], naive=grads[T.naive_attention][i]))


@attention_ops
@settings(max_examples=20)
@given(shape=attention_shapes(), causal=st.booleans(), dropout_p=st.sampled_from([0.2, 0.5]), seed=seeds)
def test_attention_dropout_matches_oracle(op, shape, causal, dropout_p, seed):
    """With a fixed seed both ops use flashcupy.dropout.keep_mask: oracle values and finite differences."""
    from flashcupy import dropout

    q, k, v, dout = attention_inputs(seed, **shape)
    rng_state = (seed, 3)
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    out = op(tq, tk, tv, causal=causal, dropout_p=dropout_p, seed=rng_state)
    out.backward(dout)
    b, sq, h, _ = q.shape
    mask = dropout.keep_mask(*rng_state, b, h, sq, k.shape[1], dropout_p)
    p_eff = dropout.effective_dropout_p(dropout_p)
    ref_out, _ = reference.attention_forward(q, k, v, causal=causal, dropout_mask=mask, dropout_p=p_eff)
    refs = reference.attention_backward(dout, q, k, v, causal=causal, dropout_mask=mask, dropout_p=p_eff)
    scale = max(1.0, *(np.abs(r).max() for r in (ref_out, *refs)))
    np.testing.assert_allclose(out.data, ref_out, rtol=0, atol=1e-12 * scale)
    for name, got, ref in zip(("dq", "dk", "dv"), (tq.grad, tk.grad, tv.grad), refs):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * scale, err_msg=name)
    fd_check(lambda q, k, v: op(q, k, v, causal=causal, dropout_p=dropout_p, seed=rng_state), q, k, v, seed=seed)


@attention_ops
@pytest.mark.parametrize("causal", [False, True])
def test_attention_block_mask_matches_oracle(op, causal, rng):
    """A random (heads, 2, 2) block mask of 64 x 64 blocks; rows with no active block give zeros."""
    from flashcupy import blocksparse

    q, k, v, dout = attention_inputs(int(rng.integers(2**31)), 2, 128, 128, 4, 2, 4)
    blocks = rng.random((1, 4, 2, 2)) < 0.6
    blocks[0, 0, 1] = False  # a query block with no visible key
    mask = blocksparse.BlockMask(blocks, 64, 64)
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    out = op(tq, tk, tv, causal=causal, block_mask=mask)
    out.backward(dout)
    elements = mask.element_mask(128, 128)
    ref_out, _ = reference.attention_forward(q, k, v, causal=causal, mask=elements)
    refs = reference.attention_backward(dout, q, k, v, causal=causal, mask=elements)
    scale = max(1.0, *(np.abs(r).max() for r in (ref_out, *refs)))
    np.testing.assert_allclose(out.data, ref_out, rtol=0, atol=1e-12 * scale)
    for name, got, ref in zip(("dq", "dk", "dv"), (tq.grad, tk.grad, tv.grad), refs):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * scale, err_msg=name)
    np.testing.assert_array_equal(out.data[:, 64:, 0], 0.0)


def test_naive_attention_rejects_bad_dropout():
    q, k, v, _ = attention_inputs(0, 1, 2, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        T.naive_attention(q, k, v, dropout_p=1.0)


# -- graph bookkeeping --------------------------------------------------------------------------------


def test_diamond_graph():
    """x feeds two branches that meet again: x.grad must sum both paths, each counted once."""
    x0 = randn(1, 3, 4)
    w0 = randn(2, 4, 4)
    x, w = Tensor(x0, requires_grad=True), Tensor(w0, requires_grad=True)
    u = T.gelu(x)  # branch 1
    v = T.linear(x, w)  # branch 2
    loss = (u * v).sum()
    loss.backward()
    fd_check(lambda x, w: (T.gelu(x) * T.linear(x, w)).sum(), x0, w0)
    # A deeper diamond: y = f(x) feeds both h1 and h2, which meet in the loss.
    x = Tensor(x0, requires_grad=True)
    y = x * 2.0
    loss = (T.gelu(y) + y * y).sum()
    loss.backward()
    y0 = 2.0 * x0
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (y0 + 0.044715 * y0**3))
    dgelu = 0.5 * (1 + t) + 0.5 * y0 * (1 - t * t) * c * (1 + 3 * 0.044715 * y0**2)
    np.testing.assert_allclose(x.grad, 2.0 * (dgelu + 2 * y0), rtol=1e-12)


def test_tensor_used_twice():
    x0 = randn(4, 5)
    x = Tensor(x0, requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x0 + 1, rtol=1e-14)
    x = Tensor(x0, requires_grad=True)
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2.0)


def test_shared_incoming_gradient_is_not_aliased():
    """add hands one gradient array to both parents; adding more into one must not change the other."""
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    loss = (a + b).sum() + (a * 3.0).sum()
    loss.backward()
    np.testing.assert_array_equal(a.grad, 4.0)
    np.testing.assert_array_equal(b.grad, 1.0)


def test_leaf_grads_accumulate_across_backward_calls():
    x = Tensor(np.ones(2), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, 5.0)
    x.zero_grad()
    assert x.grad is None


def test_backward_releases_interior_unless_retained():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x * 2.0
    loss = (y * y).sum()
    loss.backward(retain_graph=True)
    assert y.grad is None and not y.is_leaf  # interior grad spent, graph kept
    np.testing.assert_array_equal(x.grad, 8.0)
    loss.backward()  # the retained graph runs again: x.grad doubles
    np.testing.assert_array_equal(x.grad, 16.0)
    assert y.grad is None and y.is_leaf  # now released


def test_no_grad():
    w = Tensor(np.ones((2, 2)), requires_grad=True)
    with no_grad():
        assert not T.is_grad_enabled()
        out = T.linear(Tensor(np.ones((3, 2))), w).sum()
    assert T.is_grad_enabled()
    assert not out.requires_grad and out.is_leaf
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        out.backward()
    assert w.grad is None


def test_non_scalar_backward_needs_a_seed():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(ValueError, match="seed gradient"):
        y.backward()
    with pytest.raises(ValueError, match="seed gradient of shape"):
        y.backward(np.ones(3))
    y.backward(np.full((2, 3), 0.5))
    np.testing.assert_array_equal(x.grad, 1.0)


def test_one_element_tensor_may_omit_the_seed():
    x = Tensor(np.array([3.0]), requires_grad=True)
    (x * x).backward()
    np.testing.assert_array_equal(x.grad, [6.0])


def test_deep_graph_needs_no_recursion():
    x = Tensor(np.ones(1), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0])


# -- GPU ----------------------------------------------------------------------------------------------


def _cupy():
    cp = pytest.importorskip("cupy")
    from flashcupy._arrays import gpu_available

    if not gpu_available():
        pytest.skip("no usable CUDA GPU")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 128, 128, 4, 4, 64), (1, 200, 333, 6, 2, 128), (2, 256, 256, 4, 1, 32)],
                         ids=["mha", "gqa-ragged", "mqa"])
def test_gpu_flash_op_grads_within_rule_of_naive_op(dtype_name, causal, shape, rng):
    """float32 master tensors, attention in T: DESIGN.md's rule (err(flash op) <= 2 err(naive op in T) + floor,
    and the rms / bias criterion), per gradient, vs float64."""
    cp = _cupy()
    import helpers

    from flashcupy._arrays import bfloat16

    dtype = np.dtype(np.float16) if dtype_name == "float16" else bfloat16()
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim = shape
    q, k, v, dout = helpers.random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim,
                                          np.float32, grad=True)
    q, k, v, dout = (x.astype(dtype).astype(np.float32) for x in (q, k, v, dout))  # exactly representable in T
    grads = {}
    for op in (T.flash_attention, T.naive_attention):
        ts = [Tensor(cp.asarray(x), requires_grad=True) for x in (q, k, v)]
        out = op(*ts, causal=causal, dtype=dtype)
        assert out.dtype == np.float32
        out.backward(cp.asarray(dout))
        assert all(t.grad.dtype == np.float32 for t in ts)
        grads[op.__name__] = [cp.asnumpy(t.grad) for t in ts]
    rule = helpers.backward_rule_inputs(*(x.astype(dtype) for x in (dout, q, k, v)), causal=causal)  # per tensor
    for i, name in enumerate(("dq", "dk", "dv")):
        helpers.check_rule(name, grads["flash_attention"][i], **dict(rule[name], naive=grads["naive_attention"][i]))


@pytest.mark.gpu
def test_gpu_same_code_path_as_numpy(rng):
    """A small GPT-like expression in float64 on CuPy gives NumPy's gradients (one code path)."""
    cp = _cupy()
    x0, w0, b0 = rng.standard_normal((2, 8, 12)), rng.standard_normal((12, 36)), rng.standard_normal(36)
    idx = rng.integers(0, 5, size=(2, 8))
    emb0 = rng.standard_normal((5, 12))

    def loss_and_grads(xp):
        x, w, b, emb = (Tensor(xp.asarray(a), requires_grad=True) for a in (x0, w0, b0, emb0))
        h = x + T.embedding(emb, xp.asarray(idx))
        q, kk, vv = T.split(T.linear(T.layer_norm(h, Tensor(xp.ones(12)), Tensor(xp.zeros(12))), w, b)
                            .reshape(2, 8, 3, 3, 4), 3, axis=2)
        y = T.flash_attention(q.reshape(2, 8, 3, 4), kk.reshape(2, 8, 3, 4), vv.reshape(2, 8, 3, 4), causal=True)
        loss = T.cross_entropy(T.gelu(y.reshape(2, 8, 12)), xp.asarray(idx))
        loss.backward()
        return [float(loss.item())] + [cp.asnumpy(t.grad) if xp is cp else t.grad for t in (x, w, b, emb)]

    for got, want in zip(loss_and_grads(cp), loss_and_grads(np)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_flash_op_allow_tf32_is_ignored_on_the_cpu(rng):
    """allow_tf32 reaches flashcupy; NumPy float32 runs the exact CPU path either way (same bits)."""
    import helpers

    q, k, v, dout = helpers.random_inputs(rng, 1, 33, 47, 2, 1, 32, np.float32, grad=True)
    grads = []
    for allow in (False, True):
        ts = [Tensor(x.copy(), requires_grad=True) for x in (q, k, v)]
        out = T.flash_attention(*ts, causal=True, allow_tf32=allow)
        out.backward(dout)
        grads.append([out.data] + [t.grad for t in ts])
    assert all(np.array_equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
def test_gpu_flash_op_passes_allow_tf32(rng):
    """On CuPy float32, flash_attention(allow_tf32=True) is flash_attn_forward / _backward with allow_tf32=True
    (bitwise: the TF32 backward has no atomics), and differs from the exact path."""
    cp = _cupy()
    import helpers

    import flashcupy

    q, k, v, dout = (cp.asarray(x) for x in helpers.random_inputs(rng, 2, 100, 130, 4, 2, 64, np.float32, grad=True))
    ts = [Tensor(x, requires_grad=True) for x in (q, k, v)]
    out = T.flash_attention(*ts, causal=True, allow_tf32=True)
    out.backward(dout)
    res = flashcupy.flash_attn_forward(q, k, v, causal=True, allow_tf32=True)
    want = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=True, allow_tf32=True)
    assert bool(cp.array_equal(out.data, res.out))
    assert all(bool(cp.array_equal(t.grad, g)) for t, g in zip(ts, want))
    exact = flashcupy.flash_attn_func(q, k, v, causal=True)
    assert not bool(cp.array_equal(out.data, exact))


# ---- the tape as a user meets it (issue 21)


def test_module_docstring_example_runs():
    """The example in flashcupy.tape's docstring runs as written and does what its comments say."""
    import textwrap

    from flashcupy import tape

    code = textwrap.dedent(tape.__doc__.split("Example:\n", 1)[1])
    scope = {}
    exec(compile(code, "tape-docstring", "exec"), scope)
    w = scope["w"]
    assert w.grad is None  # zero_grad() at the end
    loss = scope["cross_entropy"](scope["linear"](Tensor(scope["x"]), w), scope["targets"])
    loss.backward()
    assert w.grad is not None and w.grad.shape == (3, 2) and np.isfinite(w.grad).all()


def test_second_backward_through_a_released_graph_raises(rng):
    w = Tensor(rng.standard_normal((3, 2)), requires_grad=True)
    x = Tensor(rng.standard_normal((4, 3)))
    loss = T.cross_entropy(T.linear(x, w), np.array([0, 1, 1, 0]))
    loss.backward()
    first = w.grad.copy()
    with pytest.raises(RuntimeError, match="already released"):
        loss.backward()
    np.testing.assert_array_equal(w.grad, first)  # nothing was added
    h = T.linear(x, w)  # a new loss over a shared, already released part also raises
    loss2 = T.cross_entropy(h, np.array([1, 1, 0, 0]))
    loss3 = loss2 * 2.0
    loss3.backward()
    with pytest.raises(RuntimeError, match="already released"):
        (loss2 * 3.0).backward()
    w.zero_grad()
    loss4 = T.cross_entropy(T.linear(x, w), np.array([0, 1, 1, 0]))
    loss4.backward(retain_graph=True)
    loss4.backward()  # retained once: a second pass adds the same gradient again
    np.testing.assert_allclose(w.grad, 2 * first, rtol=1e-12)


def test_star_import_leaves_the_builtin_sum():
    scope = {}
    exec("from flashcupy.tape import *", scope)
    assert "sum" not in scope and "Tensor" in scope and "mean" in scope


@pytest.mark.parametrize("targets, exc, text", [
    (np.array([0, -1, 1]), ValueError, r"in \[0, 4\), got -1"),
    (np.array([0, 4, 1]), ValueError, r"in \[0, 4\), got 4"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "integer array"),
    ([0, 1, 2], TypeError, "integer array"),
])
def test_cross_entropy_rejects_bad_targets(rng, targets, exc, text):
    logits = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    with pytest.raises(exc, match=text):
        T.cross_entropy(logits, targets)


@pytest.mark.gpu
def test_cross_entropy_out_of_range_cupy_target_gives_nan(rng):
    """On the GPU targets are not read on the host: an out-of-range one makes the loss NaN (not another
    class's value); in range, the loss equals NumPy's."""
    import cupy

    logits = rng.standard_normal((3, 4))
    good = T.cross_entropy(Tensor(cupy.asarray(logits)), cupy.asarray([0, 3, 1]))
    np.testing.assert_allclose(float(good.item()), float(T.cross_entropy(Tensor(logits), np.array([0, 3, 1])).item()),
                               rtol=1e-12)
    bad = T.cross_entropy(Tensor(cupy.asarray(logits)), cupy.asarray([0, -1, 1]))
    assert np.isnan(bad.item())
