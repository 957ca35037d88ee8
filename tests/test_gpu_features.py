"""Issue 16's features on the GPU, through the public API on CuPy inputs, against the float64 oracle by
DESIGN.md's rule: sliding window, softcap, ALiBi and learnable sinks, alone and together with GQA,
causal, dropout and block masks, every dtype. Today these calls run the chunked path on the GPU
(flashcupy._dispatch plans no fused kernel for a FEAT_* bit yet); the same tests cover the fused
kernels once the dispatcher routes them there. Marked gpu: they skip without a usable GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (FUZZ_REGRESSIONS, FUZZ_REGRESSIONS_FTZ_DOT, assert_backward_rule, assert_dropout_rule, assert_forward_rule, float_dtypes,
                     random_inputs)

import flashcupy
from flashcupy import blocksparse, dropout
from flashcupy._arrays import dtype_name

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error")]

DTYPES = float_dtypes()
DTYPE_IDS = [dtype_name(d) for d in DTYPES]
FEATURES = ["window", "softcap", "alibi", "sinks", "all"]


def _cp():
    import cupy

    return cupy


def features(rng, name, batch, nheads, seqlen_k):
    """Feature keywords as NumPy (for the oracle); window sides within the sequence, fresh values."""
    kw = {}
    if name in ("window", "all"):
        kw["window_size"] = (int(rng.integers(0, seqlen_k // 2)), int(rng.integers(0, seqlen_k // 2)))
    if name in ("softcap", "all"):
        kw["softcap"] = float(rng.uniform(1.0, 10.0))
    if name in ("alibi", "all"):
        kw["alibi_slopes"] = rng.uniform(0.02, 0.5, (batch, nheads) if name == "all" else (nheads,)).astype(np.float32)
    if name in ("sinks", "all"):
        kw["sinks"] = (2.0 * rng.standard_normal(nheads)).astype(np.float32)
    return kw


def on_gpu(kw):
    cp = _cp()
    return {n: cp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_features_match_oracle(dtype, feature, head_dim, causal, rng):
    cp = _cp()
    for sq, sk in ((97, 160), (160, 97)):  # odd lengths, seqlen_q != seqlen_k both ways
        q, k, v, do = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, dtype, grad=True)
        kw = features(rng, feature, 2, 4, sk)
        fwd = flashcupy.flash_attn_forward(*(cp.asarray(x) for x in (q, k, v)), causal=causal, **on_gpu(kw))
        assert isinstance(fwd.out, cp.ndarray) and fwd.out.dtype == dtype
        grads = flashcupy.flash_attn_backward(cp.asarray(do), *(cp.asarray(x) for x in (q, k, v)), forward=fwd)
        assert all(isinstance(g, cp.ndarray) for g in grads)
        if "sinks" in kw:
            assert len(grads) == 4 and grads[3].dtype == np.float32 and grads[3].shape == (4,)
        assert_forward_rule(fwd.out, fwd.lse, q, k, v, causal=causal, **kw)
        assert_backward_rule(grads, do, q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_all_features_with_dropout_and_block_mask(dtype, rng):
    cp = _cp()
    b, sq, sk, h, hk, d, p = 2, 200, 300, 4, 2, 64, 0.15
    state = (int(rng.integers(2**40)), int(rng.integers(100)))
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    kw = features(rng, "all", b, h, sk)
    mask = blocksparse.BlockMask(rng.random((h, -(-sq // 64), -(-sk // 64))) < 0.7, 64, 64)
    fwd = flashcupy.flash_attn_forward(*(cp.asarray(x) for x in (q, k, v)), causal=True, dropout_p=p, seed=state,
                                       block_mask=mask, **on_gpu(kw))
    grads = flashcupy.flash_attn_backward(cp.asarray(do), *(cp.asarray(x) for x in (q, k, v)), forward=fwd)
    z = dropout.keep_mask(*state, b, h, sq, sk, p)
    assert_dropout_rule(fwd.out, grads, do, q, k, v, z, dropout.effective_dropout_p(p), causal=True,
                        mask=mask.element_mask(sq, sk), **kw)


def test_gpu_sinks_of_minus_inf_are_no_sinks(rng):
    """-inf sinks give the result of no sinks by the rule, and dsinks 0."""
    cp = _cp()
    q, k, v, do = random_inputs(rng, 2, 129, 257, 4, 4, 64, np.float16, grad=True)
    qg, kg, vg, dog = (cp.asarray(x) for x in (q, k, v, do))
    fwd = flashcupy.flash_attn_forward(qg, kg, vg, causal=True, sinks=cp.full(4, -cp.inf, dtype=cp.float32))
    *grads, dsinks = flashcupy.flash_attn_backward(dog, qg, kg, vg, forward=fwd)
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, causal=True)
    assert_backward_rule(grads, do, q, k, v, causal=True)
    assert bool((dsinks == 0).all())


def test_gpu_feature_arrays_must_be_on_the_gpu(rng):
    cp = _cp()
    q, k, v = (cp.asarray(x) for x in random_inputs(rng, 1, 8, 8, 2, 2, 64, np.float16))
    with pytest.raises(TypeError, match="sinks"):
        flashcupy.flash_attn_forward(q, k, v, sinks=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="alibi_slopes"):
        flashcupy.flash_attn_forward(q, k, v, alibi_slopes=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="float32"):
        flashcupy.flash_attn_forward(q, k, v, sinks=cp.zeros(2, cp.float64))


def test_gpu_tape_learnable_sinks(rng):
    """flashcupy.tape.flash_attention on CuPy tensors with a sinks Tensor: its gradient (and dq, dk, dv)
    by the rule against the oracle."""
    cp = _cp()
    from flashcupy import tape as T

    dtype = np.dtype(np.float16)
    q, k, v, do = random_inputs(rng, 2, 100, 140, 4, 2, 64, dtype, grad=True)
    sinks = (2.0 * rng.standard_normal(4)).astype(np.float32)
    kw = dict(causal=True, window_size=(40, 0), softcap=5.0)
    ts = [T.Tensor(cp.asarray(x), requires_grad=True) for x in (q, k, v, sinks)]
    out = T.flash_attention(*ts[:3], sinks=ts[3], **kw)
    out.backward(cp.asarray(do))
    assert isinstance(ts[3].grad, cp.ndarray) and ts[3].grad.dtype == np.float32
    assert_forward_rule(out.data, None, q, k, v, sinks=sinks, **kw)
    assert_backward_rule([t.grad for t in ts], do, q, k, v, sinks=sinks, **kw)


@pytest.mark.parametrize("text, allow_tf32", FUZZ_REGRESSIONS, ids=[f"case{i}" for i in range(len(FUZZ_REGRESSIONS))])
def test_gpu_fuzz_regressions(text, allow_tf32):
    """The GPU fuzz campaign's failures (tests/helpers.py FUZZ_REGRESSIONS), replayed as flashcupy fuzz
    --case does: forward and backward on the GPU, by the rule."""
    from flashcupy import fuzz

    assert fuzz.check_case(fuzz.parse_case(text), ("fwd", "bwd"), gpu=True, allow_tf32=allow_tf32) <= 1.0


@pytest.mark.parametrize("text, allow_tf32, env", FUZZ_REGRESSIONS_FTZ_DOT,
                         ids=[f"case{i}" for i in range(len(FUZZ_REGRESSIONS_FTZ_DOT))])
def test_gpu_fuzz_regressions_key_tail_ftz_dot(monkeypatch, text, allow_tf32, env):
    """The 2026-12-04 campaign's failures, in the environment of the process that found them
    (FLASHCUPY_SM90=0: the mma.sync family): the mma.sync backward's unmasked key tail (dq NaN, cases
    0 and 1) and the rule's flush-to-zero, dot-product and TF32-operand floors (the rest)."""
    from flashcupy import fuzz

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert fuzz.check_case(fuzz.parse_case(text), ("fwd", "bwd"), gpu=True, allow_tf32=allow_tf32) <= 1.0
