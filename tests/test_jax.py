"""flashcupy.jax.flash_attention: values and gradients under jax.jit against the NumPy float64 oracle by
DESIGN.md's rule (every dtype, causal, GQA, Sq != Sk, the score features), jax.vmap, return_lse (no
gradient through it), trace-time errors with flashcupy's messages, and a jitted training loop against
the same model with jax.nn.dot_product_attention. JAX's CPU backend runs flashcupy's CPU path; the tests
marked gpu repeat the main ones on JAX's GPU (flashcupy's kernels on XLA's stream). Skipped where jax
(>= 0.7, jax.experimental.buffer_callback) is not installed (CI)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # as conftest: leave GPU memory to CuPy's pool
pytest.importorskip("jax.experimental.buffer_callback")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flashcupy._arrays import bfloat16  # noqa: E402
from flashcupy.testing import assert_backward_rule, assert_forward_rule, random_inputs  # noqa: E402

fj = pytest.importorskip("flashcupy.jax")

GPU = pytest.mark.gpu
DTYPES = [np.float32, np.float16, bfloat16()]


def _device(kind):
    devs = [d for d in jax.devices() if d.platform == kind] if kind == "cpu" else \
        [d for d in jax.devices() if d.platform == "gpu"]
    if not devs:
        pytest.skip(f"JAX has no {kind} device here")
    return devs[0]


def _put(device, *xs):
    return tuple(jax.device_put(x, device) for x in xs)


def _np(x):
    return np.asarray(jax.device_get(x))


def _check_fwd_bwd(device, rng, dtype, *, causal, shape=(2, 47, 4, 2, 32), sk=61, **features):
    b, sq, h, hk, d = shape
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    jf = {n: jax.device_put(x, device) if isinstance(x, np.ndarray) else x for n, x in features.items()}
    qj, kj, vj, doj = _put(device, q, k, v, do)

    @jax.jit
    def fwd_vjp(q, k, v, do, sinks):
        kw = dict(jf, sinks=sinks) if sinks is not None else jf
        (out, lse), pullback = jax.vjp(lambda q, k, v, s: fj.flash_attention(
            q, k, v, causal=causal, return_lse=True, **(dict(kw, sinks=s) if s is not None else kw)), q, k, v, sinks)
        return out, lse, pullback((do, jnp.zeros_like(lse)))

    out, lse, grads = fwd_vjp(qj, kj, vj, doj, jf.get("sinks"))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_forward_rule(_np(out), _np(lse), q, k, v, causal=causal, **features)
    g = [_np(x) for x in grads[:3]] + ([_np(grads[3])] if "sinks" in features else [])
    assert_backward_rule(tuple(g), do, q, k, v, causal=causal, **features)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_values_and_gradients_under_jit(rng, dtype, causal):
    _check_fwd_bwd(_device("cpu"), rng, dtype, causal=causal)


def test_float64_under_x64(rng):
    x64 = getattr(jax, "enable_x64", None)  # a config State (a context manager when called) in newer JAX
    if x64 is None:
        from jax.experimental import enable_x64 as x64
    with x64(True):
        _check_fwd_bwd(_device("cpu"), rng, np.float64, causal=True, shape=(1, 33, 2, 1, 16), sk=20)


@pytest.mark.parametrize("features", [
    dict(window_size=(9, 3)), dict(softcap=5.0), dict(alibi_slopes=np.float32([0.3, 0.1, 0.7, 0.05])),
    dict(sinks=np.float32([0.5, -1.0, 2.0, 0.0])),
    dict(window_size=(20, -1), softcap=30.0, alibi_slopes=np.float32([0.2, 0.4, 0.6, 0.8]),
         sinks=np.float32([1.0, 0.0, -2.0, 0.5]))], ids=["window", "softcap", "alibi", "sinks", "all"])
def test_score_features_and_the_sinks_gradient(rng, features):
    _check_fwd_bwd(_device("cpu"), rng, np.float32, causal=True, **features)


def test_vmap_is_the_stacked_calls(rng):
    dev = _device("cpu")
    qs = [random_inputs(rng, 1, 19, 23, 2, 1, 16, np.float32) for _ in range(3)]
    q, k, v = (jnp.stack([jax.device_put(x[i], dev) for x in qs]) for i in range(3))
    got = jax.jit(jax.vmap(lambda q, k, v: fj.flash_attention(q, k, v, causal=True)))(q, k, v)
    for i in range(3):
        want = fj.flash_attention(q[i], k[i], v[i], causal=True)
        np.testing.assert_array_equal(_np(got[i]), _np(want))
        assert_forward_rule(_np(got[i]), None, *qs[i], causal=True)


def test_lse_carries_no_gradient(rng):
    q, k, v = _put(_device("cpu"), *random_inputs(rng, 1, 17, 17, 2, 2, 16, np.float32))
    g = jax.grad(lambda q: fj.flash_attention(q, k, v, return_lse=True)[1].sum())(q)
    assert not np.any(_np(g))


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(dropout_p=0.1), ValueError, "dropout_p"),
    (dict(block_mask=object()), ValueError, "block_mask"),
    (dict(causal=1), TypeError, "causal"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(alibi_slopes=np.float16([0.1, 0.2])), TypeError, "alibi_slopes"),
    (dict(sinks=np.float32([0.1, 0.2, 0.3])), ValueError, "sinks"),
])
def test_bad_arguments_raise_at_trace_time(rng, kwargs, exc, text):
    q, k, v = _put(_device("cpu"), *random_inputs(rng, 1, 8, 8, 2, 1, 16, np.float32))
    kwargs = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    with pytest.raises(exc, match=text):
        jax.jit(lambda q, k, v: fj.flash_attention(q, k, v, **kwargs))(q, k, v)


def test_bad_shapes_raise_with_flashcupy_messages(rng):
    q, k, v = _put(_device("cpu"), *random_inputs(rng, 1, 8, 8, 3, 2, 16, np.float32))
    with pytest.raises(ValueError, match="nheads_k"):
        fj.flash_attention(q, k, v)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        fj.flash_attention(q, k.astype(jnp.float16), v)


def _train(attention, device, steps, seed=0):
    """A jitted training loop of a one-block attention model (the flashcupy training loop's shape in
    miniature): embeddings -> causal self-attention (4 heads, GQA 2) -> projection -> next-token cross
    entropy, SGD; returns the losses."""
    vocab, width, heads, kv_heads, seqlen, batch = 32, 32, 4, 2, 24, 4
    hd = width // heads
    rng = np.random.default_rng(seed)
    init = lambda *s: jax.device_put((0.2 * rng.standard_normal(s)).astype(np.float32), device)  # noqa: E731
    params = dict(emb=init(vocab, width), wq=init(width, width), wk=init(width, kv_heads * hd),
                  wv=init(width, kv_heads * hd), wo=init(width, width), out=init(width, vocab))
    tokens = jax.device_put(rng.integers(0, vocab, (batch, seqlen + 1)).astype(np.int32), device)

    def loss_fn(p, tok):
        x = p["emb"][tok[:, :-1]]
        q = (x @ p["wq"]).reshape(batch, seqlen, heads, hd)
        k = (x @ p["wk"]).reshape(batch, seqlen, kv_heads, hd)
        v = (x @ p["wv"]).reshape(batch, seqlen, kv_heads, hd)
        a = attention(q, k, v).reshape(batch, seqlen, width)
        logits = (x + a @ p["wo"]) @ p["out"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1).mean()

    @jax.jit
    def step(p, tok):
        loss, g = jax.value_and_grad(loss_fn)(p, tok)
        return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), loss

    losses = []
    for _ in range(steps):
        params, loss = step(params, tokens)
        losses.append(float(loss))
    return np.array(losses)


def _reference_attention(q, k, v):
    groups = q.shape[2] // k.shape[2]
    return jax.nn.dot_product_attention(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2),
                                        is_causal=True)


def test_jitted_training_matches_dot_product_attention():
    """50 SGD steps of the same model, float32: the losses fall and follow jax.nn.dot_product_attention's
    to float32 rounding (both compute in float32; the differences are summation order: 1.5e-7 relative
    at most when written, the bound is 2e-6)."""
    dev = _device("cpu")
    ours = _train(lambda q, k, v: fj.flash_attention(q, k, v, causal=True), dev, 50)
    ref = _train(_reference_attention, dev, 50)
    assert ours[-1] < 0.8 * ours[0]
    np.testing.assert_allclose(ours, ref, rtol=2e-6)


# ---- on JAX's GPU: flashcupy's kernels on XLA's stream


@GPU
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, bfloat16(), np.float32], ids=lambda d: np.dtype(d).name)
def test_gpu_values_and_gradients_under_jit(rng, dtype, causal):
    _check_fwd_bwd(_device("gpu"), rng, dtype, causal=causal, shape=(2, 300, 4, 2, 128), sk=421)


@GPU
def test_gpu_score_features(rng):
    _check_fwd_bwd(_device("gpu"), rng, bfloat16(), causal=True, shape=(2, 200, 4, 2, 64), sk=257,
                   window_size=(100, -1), softcap=30.0, alibi_slopes=np.float32([0.2, 0.4, 0.6, 0.8]),
                   sinks=np.float32([1.0, 0.0, -2.0, 0.5]))


@GPU
def test_gpu_jitted_training_matches_dot_product_attention():
    """As on the CPU, with XLA's float32 matmuls at full precision (its GPU default is TF32, which the
    exact float32 kernel flashcupy runs here is not)."""
    dev = _device("gpu")
    with jax.default_matmul_precision("highest"):
        ours = _train(lambda q, k, v: fj.flash_attention(q, k, v, causal=True), dev, 50)
        ref = _train(_reference_attention, dev, 50)
    assert ours[-1] < 0.8 * ours[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
