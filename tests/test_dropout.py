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


def _philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints, written from Salmon et al. (SC 2011) independently of
    flashcupy.dropout.philox4x32_10 (the vectorised one under test)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _keep_scalar(seed, offset, nheads, b, h, i, j, p):
    """One element's keep bit from flashcupy.dropout's docstring formula, element by element."""
    rp = (i >> 4) * 8 + (i & 7)
    cq = (j >> 4) * 4 + ((j >> 1) & 3)
    out = _philox_scalar((cq, rp, b * nheads + h, offset & 0xFFFFFFFF), (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    word = 2 * ((i >> 3) & 1) + ((j >> 3) & 1)
    u = (out[word] >> (16 * (j & 1))) & 0xFFFF
    return u < dropout.keep_threshold(p)


def test_scalar_philox_reproduces_the_known_answers():
    assert _philox_scalar((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    assert _philox_scalar((0,) * 4, (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.83])
def test_keep_mask_follows_the_documented_formula_across_tiles(rng, p):
    """keep_mask against the element formula of flashcupy.dropout's docstring on every element of a ragged
    problem spanning many 16 x 16 Philox blocks and 128 x 128 kernel tiles, several (batch, head), a 64-bit
    seed and a nonzero offset: the layout the kernels' bits are compared with."""
    b, h, sq, sk = 2, 3, 141, 270
    seed, offset = int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(1, 2**32))
    got = dropout.keep_mask(seed, offset, b, h, sq, sk, p)
    assert got.shape == (b, h, sq, sk) and got.dtype == np.bool_
    want = np.array([[[[_keep_scalar(seed, offset, h, bi, hi, i, j, p) for j in range(sk)] for i in range(sq)]
                      for hi in range(h)] for bi in range(b)])
    np.testing.assert_array_equal(got, want)
    # every (batch, head) and every 16-row block has its own bits (no counter collision)
    flat = got.reshape(b * h, sq, sk)
    assert all(not np.array_equal(flat[0], flat[x]) for x in range(1, b * h))
    assert not np.array_equal(got[..., :16, :], got[..., 16:32, :])


def _kept_bits(xp, fwd, bwd, b, sq, sk, h, d, seed_state, p, rng):
    """The keep bits a forward and a backward used, read back through the outputs (no GQA: h heads for q,
    k, v). V = one-hot columns for keys [j0, j0 + d) makes out[b, i, h, c] = P[i, j0 + c] Z / (1 - p), and
    dout = one-hot columns for query rows [i0, i0 + d) makes dv[b, j, h, c] = P[i0 + c, j] Z / (1 - p); P > 0
    everywhere (amplitude 0.5 flattens the softmax), so each is nonzero iff kept. Windows cover every key
    and every query row. Returns (forward bits, backward bits), bool (b, h, sq, sk)."""
    q, k, _ = random_inputs(rng, b, sq, sk, h, h, d, np.float16, amplitude=0.5)
    q, k = xp.asarray(q), xp.asarray(k)

    def one_hot(n, start):  # (b, n, h, d): row start + c has a 1 in column c
        w = np.zeros((b, n, h, d), dtype=np.float16)
        c = np.arange(min(d, n - start))
        w[:, start + c, :, c] = 1
        return xp.asarray(w)

    got_f = np.zeros((b, h, sq, sk), dtype=bool)
    first = None
    for j0 in range(0, sk, d):
        res = fwd(q, k, one_hot(sk, j0), dropout_p=p, seed=seed_state)
        first = first or res
        w = min(d, sk - j0)
        got_f[..., j0:j0 + w] = to_numpy(res.out)[..., :w].transpose(0, 2, 1, 3) != 0
    got_b = np.zeros((b, h, sq, sk), dtype=bool)
    v = one_hot(sk, 0)
    for i0 in range(0, sq, d):
        _, _, dv = bwd(one_hot(sq, i0), q, k, v, first.out, first.lse, dropout_p=p, rng_state=seed_state)
        w = min(d, sq - i0)
        got_b[:, :, i0:i0 + w] = to_numpy(dv)[..., :w].transpose(0, 2, 3, 1) != 0  # (b, h, c, j)
    return got_f, got_b


KEPT_BITS_SHAPE = dict(b=2, sq=200, sk=333, h=3, d=128)  # ragged: 2 query tiles of 128, 3 key windows of 128


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_path_keep_bits_equal_the_generator(rng, p):
    """The CPU path reads the same bits as keep_mask, through the one-hot read-out the GPU test uses (so the
    read-out itself is checked here, where CI runs it)."""
    state = (int(rng.integers(2**40, 2**63)), int(rng.integers(2**32)))
    s = KEPT_BITS_SHAPE
    got_f, got_b = _kept_bits(np, flashcupy.flash_attn_forward, flashcupy.flash_attn_backward, **s,
                              seed_state=state, p=p, rng=rng)
    want = dropout.keep_mask(*state, s["b"], s["h"], s["sq"], s["sk"], p)
    np.testing.assert_array_equal(got_f, want)
    np.testing.assert_array_equal(got_b, want)
    assert 0 < want.mean() < 1


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
    """The fused fp16 forward's and backward's keep bits equal keep_mask on a ragged problem (2 x 3 heads,
    200 query rows, 333 keys: several query tiles and key blocks, partial ones at both ends), read back as
    test_cpu_path_keep_bits_equal_the_generator reads the CPU path's."""
    cp = _cp()
    state = (int(rng.integers(2**40, 2**63)), int(rng.integers(2**32)))
    s = KEPT_BITS_SHAPE
    from flashcupy.interface import kernel_path

    path = kernel_path(np.float16, s["d"], on_gpu=True, dropout_p=p)
    if path != "fused fp16/bf16 (tensor cores)":
        pytest.skip(f"this GPU runs {path}: no dropout kernel")
    got_f, got_b = _kept_bits(cp, flashcupy.flash_attn_forward, flashcupy.flash_attn_backward, **s,
                              seed_state=state, p=p, rng=rng)
    want = dropout.keep_mask(*state, s["b"], s["h"], s["sq"], s["sk"], p)
    np.testing.assert_array_equal(got_f, want)
    np.testing.assert_array_equal(got_b, want)


@pytest.mark.gpu
def test_gpu_same_state_bitwise_equal_other_offset_differs(rng):
    cp = _cp()
    q, k, v = (cp.asarray(x) for x in random_inputs(rng, 2, 300, 300, 4, 4, 64, np.float16))
    a = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 1))
    b = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 1))
    c = flashcupy.flash_attn_forward(q, k, v, dropout_p=0.1, seed=(3, 2))
    assert cp.array_equal(a.out.view(cp.uint16), b.out.view(cp.uint16))
    assert not cp.array_equal(a.out.view(cp.uint16), c.out.view(cp.uint16))


def test_keep_mask_batches_is_the_slice_of_the_whole_mask():
    """keep_mask(..., batches=(b0, b1)) is the [b0:b1] slice of the whole batch's mask, with rows too."""
    from flashcupy import dropout

    rng = np.random.default_rng()
    seed, offset = int(rng.integers(2**63)), int(rng.integers(2**31))
    whole = dropout.keep_mask(seed, offset, 5, 3, 37, 41, 0.3)
    for b0, b1 in ((0, 5), (2, 3), (1, 4), (4, 5)):
        part = dropout.keep_mask(seed, offset, 5, 3, 37, 41, 0.3, batches=(b0, b1), rows=(7, 30))
        np.testing.assert_array_equal(part, whole[b0:b1, :, 7:30])
