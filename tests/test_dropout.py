"""Dropout: the Philox keep-mask generator (CPU), the chunked path with dropout vs the oracle with
the regenerated mask, and (GPU) the kernels' bits vs the NumPy generator's."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_dropout_rule, random_inputs, to_numpy

import flashcupy
from flashcupy import dropout, reference
from flashcupy._arrays import bfloat16

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = dropout.philox4x32_10(*(np.array([c], dtype=np.uint32) for c in ctr), *key)
        assert tuple(int(x[0]) for x in got) == want


def _binom_two_sided_p(k: int, n: int, p: float) -> float:
    """Exact two-sided binomial test p-value (sum of outcomes no more likely than k)."""
    ks = np.arange(n + 1)
    logpmf = (math.lgamma(n + 1) - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in ks])
              + ks * math.log(p) + (n - ks) * math.log1p(-p))
    return float(np.exp(logpmf[logpmf <= logpmf[k] + 1e-7]).sum())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_passes_exact_binomial_test(p):
    z = dropout.keep_mask(2024, 3, 2, 3, 61, 97, p)
    n, kept = z.size, int(z.sum())
    keep = 1 - dropout.effective_dropout_p(p)
    assert _binom_two_sided_p(kept, n, keep) > 1e-4, (kept, n, keep)


def test_mask_is_a_pure_function_of_its_arguments():
    full = dropout.keep_mask(7, 11, 2, 4, 100, 70, 0.3)
    assert np.array_equal(full, dropout.keep_mask(7, 11, 2, 4, 100, 70, 0.3))
    assert np.array_equal(full[:, :, 33:77], dropout.keep_mask(7, 11, 2, 4, 100, 70, 0.3, rows=(33, 77)))
    assert not np.array_equal(full, dropout.keep_mask(7, 12, 2, 4, 100, 70, 0.3))  # other offset
    assert not np.array_equal(full, dropout.keep_mask(8, 11, 2, 4, 100, 70, 0.3))  # other seed
    # a longer sequence extends the mask: element (b, h, i, j) does not depend on seqlen
    assert np.array_equal(full, dropout.keep_mask(7, 11, 2, 4, 130, 90, 0.3)[:, :, :100, :70])


def test_threshold_rounding():
    assert dropout.keep_threshold(0.0) == 65536 and dropout.keep_threshold(0.5) == 32768
    assert dropout.keep_threshold(1 - 1e-9) == 1
    assert abs(dropout.effective_dropout_p(0.1) - 0.1) <= 2**-17


def test_generator_advances_and_reseeds():
    g = dropout.Generator(5)
    assert g.next_state() == (5, 0) and g.next_state() == (5, 1)
    g.manual_seed(5)
    assert g.next_state() == (5, 0)


@settings(max_examples=25, deadline=None)
@given(seqlen_q=st.integers(1, 40), seqlen_k=st.integers(1, 40), heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
       causal=st.booleans(), p=st.sampled_from([0.1, 0.5, 0.9]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**32 - 1))
def test_cpu_path_with_dropout_matches_oracle(seqlen_q, seqlen_k, heads, causal, p, dtype, seed, offset):
    rng = np.random.default_rng(seed % 2**32)
    q, k, v, do = random_inputs(rng, 2, seqlen_q, seqlen_k, *heads, 8, dtype, grad=True)
    res = flashcupy.flash_attn_forward(q, k, v, dropout_p=p, causal=causal, seed=(seed, offset))
    assert res.rng_state == (seed, offset)
    z = dropout.keep_mask(seed, offset, 2, heads[0], seqlen_q, seqlen_k, p)
    pe = dropout.effective_dropout_p(p)
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal, dropout_mask=z, dropout_p=pe)
    grads = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, dropout_p=p, causal=causal,
                                          rng_state=res.rng_state)
    refs = reference.attention_backward(do, q, k, v, causal=causal, dropout_mask=z, dropout_p=pe)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    scale = max(1.0, float(np.abs(ref_out).max()))
    assert np.abs(res.out - ref_out).max() <= tol * scale
    for g, r in zip(grads, refs):
        assert np.abs(g - r).max() <= tol * max(1.0, float(np.abs(r).max()))


def test_default_generator_gives_fresh_masks():
    rng = np.random.default_rng(0)
    q, k, v = random_inputs(rng, 1, 20, 20, 2, 2, 8, np.float64)
    a = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.5)
    b = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.5)
    assert a.rng_state != b.rng_state and not np.array_equal(a.out, b.out)


def test_backward_needs_rng_state():
    rng = np.random.default_rng(0)
    q, k, v = random_inputs(rng, 1, 5, 5, 1, 1, 8, np.float64)
    res = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.5)
    with pytest.raises(ValueError, match="rng_state"):
        flashcupy.flash_attn_backward(q, q, k, v, res.out, res.lse, dropout_p=0.5)
    with pytest.raises(TypeError, match="seed"):
        flashcupy.flash_attn_forward(q, k, v, dropout_p=0.5, seed="abc")
    with pytest.raises(ValueError, match="seed"):
        flashcupy.flash_attn_forward(q, k, v, dropout_p=0.5, seed=(1, 2**33))


# ------------------------------------------------------------------------------------------- GPU


def _cp():
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gpu_dropout_matches_oracle_with_regenerated_mask(rng, dtype, head_dim, causal):
    """DESIGN.md's rule against the oracle given the regenerated mask; err_naive from naive attention
    in T with the same mask; term magnitudes of the undropped problem times 1 / (1 - p)."""
    cp = _cp()
    b, sq, sk, h, hk, p, state = 2, 133, 211, 4, 2, 0.17, (987654321987, 42)
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, head_dim, dtype, grad=True)
    qg, kg, vg, dog = (cp.asarray(x) for x in (q, k, v, do))
    z = dropout.keep_mask(*state, b, h, sq, sk, p)
    pe = dropout.effective_dropout_p(p)
    res = flashcupy.flash_attn_forward(qg, kg, vg, dropout_p=p, causal=causal, seed=state)
    for deterministic in (False, True):
        grads = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, dropout_p=p, causal=causal,
                                              rng_state=res.rng_state, deterministic=deterministic)
        assert_dropout_rule(res.out, grads, do, q, k, v, z, pe, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_gpu_kernel_bits_equal_numpy_generator(rng, p):
    """out = P o Z / (1 - p) V with V = identity reads the forward kernel's keep bits; dv with
    dout = identity reads the backward kernel's."""
    cp = _cp()
    b, sq, sk, h, d, state = 2, 128, 128, 3, 128, (2**40 + 17, 9)
    q, k, _ = random_inputs(rng, b, sq, sk, h, h, d, np.float16)
    eye = np.broadcast_to(np.eye(sk, d, dtype=np.float16)[None, :, None, :], (b, sk, h, d)).copy()
    qg, kg, vg = (cp.asarray(x) for x in (q, k, eye))
    res = flashcupy.flash_attn_forward(qg, kg, vg, dropout_p=p, seed=state)
    want = dropout.keep_mask(*state, b, h, sq, sk, p)  # (b, h, sq, sk)
    got = to_numpy(res.out).transpose(0, 2, 1, 3) != 0  # out[b, i, h, j] != 0 iff kept
    assert np.array_equal(got, want)
    dout = cp.asarray(np.broadcast_to(np.eye(sq, d, dtype=np.float16)[None, :, None, :], (b, sq, h, d)).copy())
    _, _, dv = flashcupy.flash_attn_backward(dout, qg, kg, vg, res.out, res.lse, dropout_p=p, rng_state=state)
    got_bwd = to_numpy(dv).transpose(0, 2, 3, 1) != 0  # dv[b, j, h, i] = P_ij Z_ij / (1 - p)
    assert np.array_equal(got_bwd, want)


@pytest.mark.gpu
def test_gpu_same_state_bitwise_equal_other_offset_differs(rng):
    cp = _cp()
    q, k, v = (cp.asarray(x) for x in random_inputs(rng, 2, 300, 300, 4, 4, 64, np.float16))
    a = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 1))
    b = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 1))
    c = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 2))
    assert cp.array_equal(a.out.view(cp.uint16), b.out.view(cp.uint16))
    assert not cp.array_equal(a.out.view(cp.uint16), c.out.view(cp.uint16))
