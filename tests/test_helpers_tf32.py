"""The TF32 variant of the correctness rule's naive attention (tests/helpers.py), on the CPU.

tf32_round is PTX cvt.rna.tf32.f32: float32 -> 10 explicit mantissa bits, round to nearest, ties away
from zero. Naive attention with tf32=True rounds both operands of every matmul with it; the checks
below make sure the rounding is neither a no-op (which would make the TF32 rule as strict as the
float32 one, and the GPU tests of allow_tf32 meaningless) nor coarser than TF32 (which would loosen
the rule). A NumPy FlashAttention with TF32 products (tiles, online softmax, the scale after the
product, D = rowsum(dO o O): rounding points a TF32 kernel may choose) must pass the TF32 rule on tiny
problems, where a maximum over a few errors decides, and fail it with bfloat16-sized operand rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import helpers
from helpers import (ORDERS, TF32_EPS, assert_backward_rule, assert_forward_rule, max_abs_err, naive_backward,
                     naive_forward, random_inputs, tf32_round)

from flashcupy import reference

LOW_BITS = np.uint32(0x1FFF)  # the 13 mantissa bits TF32 drops


def f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def test_tf32_eps_is_two_to_the_minus_ten():
    assert TF32_EPS == 2.0**-10


def test_representable_values_are_unchanged(rng):
    # random sign, exponent and top 10 mantissa bits; the 13 low bits clear
    bits = rng.integers(0, 2**32, size=10_000, dtype=np.uint64).astype(np.uint32) & ~LOW_BITS
    x = f32(bits)
    x = x[np.isfinite(x)]
    r = tf32_round(x)
    assert r.dtype == np.float32 and r.shape == x.shape
    assert np.array_equal(r.view(np.uint32), x.view(np.uint32))
    for v in (0.0, -0.0, 1.0, -2.5, 1.0 + 2.0**-10, 3.0 * 2.0**-100, np.finfo(np.float32).tiny):
        a = np.float32(v)
        assert tf32_round(a).view(np.uint32) == a.view(np.uint32)


def test_result_is_tf32_and_within_half_an_ulp(rng):
    x = (rng.standard_normal(100_000) * np.exp2(rng.integers(-60, 60, 100_000))).astype(np.float32)
    r = tf32_round(x)
    assert r.dtype == np.float32
    assert not (r.view(np.uint32) & LOW_BITS).any(), "13 low mantissa bits must be 0"
    x64, r64 = x.astype(np.float64), r.astype(np.float64)
    rel = np.abs(r64 - x64) / np.abs(x64)
    assert rel.max() <= 2.0**-11  # unit roundoff of TF32 (half its eps) for normal numbers
    assert rel.max() > 2.0**-12  # and it really drops bits (100k draws come close to the half ulp)
    assert np.array_equal(np.sign(r), np.sign(x))
    assert np.array_equal(tf32_round(r), r)  # idempotent


@given(bits=st.integers(0, 2**32 - 1))
def test_nearest_of_the_two_tf32_neighbours(bits):
    """Against a first-principles version: the TF32 values just below and above |x| (truncate, add one
    ulp), pick the nearer, the larger magnitude on a tie."""
    x = f32(bits)
    if not np.isfinite(x):
        return
    mag_bits = np.uint32(bits & 0x7FFFFFFF)
    lo = f32(mag_bits & ~LOW_BITS).astype(np.float64)
    hi = f32((mag_bits & ~LOW_BITS) + np.uint32(0x2000)).astype(np.float64)  # may be inf: still the neighbour
    ax = abs(float(x))
    want = hi if (hi - ax) <= (ax - lo) else lo
    want = -want if bits >> 31 else want
    got = float(tf32_round(x))
    assert got == want or (np.isinf(want) and np.isinf(got) and np.sign(got) == np.sign(want))


def test_ties_round_away_from_zero():
    # 1 + 2^-11 lies halfway between the TF32 values 1 and 1 + 2^-10: round-to-nearest-even would give 1
    tie = np.float32(1.0 + 2.0**-11)
    assert tf32_round(tie) == np.float32(1.0 + 2.0**-10)
    assert tf32_round(-tie) == np.float32(-(1.0 + 2.0**-10))
    # halfway between 1 + 2^-10 and 1 + 2^-9 (even: also away from zero) and at another binade
    assert tf32_round(np.float32(1.0 + 3 * 2.0**-11)) == np.float32(1.0 + 2.0**-9)
    assert tf32_round(np.float32(-(2.0**20) * (1.0 + 2.0**-11))) == np.float32(-(2.0**20) * (1.0 + 2.0**-10))
    # just below a tie rounds down, just above rounds up
    below = f32(np.float32(1.0 + 2.0**-11).view(np.uint32) - np.uint32(1))
    above = f32(np.float32(1.0 + 2.0**-11).view(np.uint32) + np.uint32(1))
    assert tf32_round(below) == np.float32(1.0) and tf32_round(above) == np.float32(1.0 + 2.0**-10)
    # a carry into the exponent: the largest value below 2 with 23 set mantissa bits rounds to 2
    assert tf32_round(np.nextafter(np.float32(2.0), np.float32(0.0))) == np.float32(2.0)


def test_inf_and_nan_are_kept():
    x = np.array([np.inf, -np.inf, np.nan, f32(0xFFFFFFFF), f32(0x7FC01234)], dtype=np.float32)
    r = tf32_round(x)
    assert np.isposinf(r[0]) and np.isneginf(r[1]) and np.isnan(r[2:]).all()
    assert np.array_equal(r[2:].view(np.uint32), x[2:].view(np.uint32))


def test_only_float32():
    with pytest.raises(TypeError, match="tf32_round: expected float32, got float64"):
        tf32_round(np.ones(3))
    with pytest.raises(ValueError, match="tf32: naive attention with TF32 products needs float32, got float16"):
        naive_forward(*(np.ones((1, 2, 1, 8), np.float16) for _ in range(3)), tf32=True)


# ---------------------------------------------------------------------------------------------------
# naive attention with TF32 products


def _problem(rng, causal=False):
    return random_inputs(rng, 2, 96, 130, 4, 2, 64, np.float32, grad=True)


@pytest.mark.parametrize("causal", [False, True])
def test_naive_tf32_differs_from_float32_by_about_tf32_roundoff(rng, causal):
    q, k, v, do = _problem(rng)
    out32, lse32 = naive_forward(q, k, v, causal=causal)
    out_tf, lse_tf = naive_forward(q, k, v, causal=causal, tf32=True)
    assert out_tf.dtype == np.float32 and lse_tf.dtype == np.float32 and out_tf.shape == q.shape
    rel = max_abs_err(out_tf, out32) / np.abs(out32).max()
    assert 1e-4 < rel < 1e-2, rel  # float32 vs float32 would be ~1e-7; TF32 unit roundoff 4.9e-4
    assert 1e-5 < max_abs_err(lse_tf, lse32) < 1e-1
    g32 = naive_backward(do, q, k, v, causal=causal)
    g_tf = naive_backward(do, q, k, v, causal=causal, tf32=True)
    for a, b in zip(g_tf, g32):
        assert a.dtype == np.float32
        rel = max_abs_err(a, b) / np.abs(b).max()
        assert 1e-4 < rel < 3e-2, rel


def test_naive_tf32_error_against_the_oracle(rng):
    """TF32 products are ~1000x less accurate than float32 ones, and no worse than TF32 roundoff allows."""
    q, k, v, do = _problem(rng)
    ref_out, _ = reference.attention_forward(q, k, v, causal=True)
    refs = reference.attention_backward(do, q, k, v, causal=True)
    err32 = max_abs_err(naive_forward(q, k, v, causal=True)[0], ref_out)
    err_tf = max_abs_err(naive_forward(q, k, v, causal=True, tf32=True)[0], ref_out)
    assert err_tf > 100 * err32
    assert err_tf < 2.0**-11 * 5 * np.abs(ref_out).max()  # measured <= 0.33 of this over 40 seeds
    for a, b, r in zip(naive_backward(do, q, k, v, causal=True, tf32=True),
                       naive_backward(do, q, k, v, causal=True), refs):
        assert max_abs_err(a, r) > 100 * max_abs_err(b, r)


def test_naive_tf32_matches_a_direct_computation(rng):
    """naive_forward(tf32=True) against an independent one-head computation: S = tf32(q * scale) tf32(k)^T,
    P = softmax(S) in float32, out = tf32(P) tf32(V)."""
    q, k, v = random_inputs(rng, 1, 7, 9, 1, 1, 16, np.float32)
    out, lse = naive_forward(q, k, v, tf32=True)
    qs = (q[0, :, 0] * np.float32(16**-0.5)).astype(np.float32)
    s = tf32_round(qs).astype(np.float64) @ tf32_round(k[0, :, 0]).astype(np.float64).T  # exact products
    s = s.astype(np.float32)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    want = (tf32_round(p).astype(np.float64) @ tf32_round(v[0, :, 0]).astype(np.float64)).astype(np.float32)
    # float32 accumulation vs float64 summation: a few float32 ulps apart
    np.testing.assert_allclose(out[0, :, 0], want, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(want).max())
    np.testing.assert_allclose(lse[0, 0], np.log(np.exp(s.astype(np.float64)).sum(-1)), rtol=1e-6)


def test_tf32_rule_accepts_tf32_and_exact_results_and_the_float32_rule_rejects_tf32(rng):
    """The TF32 rule holds for naive TF32 attention itself and for the exact float32 CPU path; the
    plain float32 rule rejects TF32 results, so an exact-path test catches a TF32 leak."""
    import flashcupy

    q, k, v, do = _problem(rng)
    out_tf, lse_tf = naive_forward(q, k, v, causal=True, tf32=True)
    grads_tf = naive_backward(do, q, k, v, causal=True, tf32=True)
    assert_forward_rule(out_tf, lse_tf, q, k, v, causal=True, tf32=True)
    assert_backward_rule(grads_tf, do, q, k, v, causal=True, tf32=True)
    res = flashcupy.flash_attn_forward(q, k, v, causal=True)  # NumPy: the exact chunked path
    assert_forward_rule(res.out, res.lse, q, k, v, causal=True, tf32=True)
    assert_backward_rule(flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=True), do, q, k, v,
                         causal=True, tf32=True)
    with pytest.raises(AssertionError, match=r"out \(float32\): err_kernel"):
        assert_forward_rule(out_tf, None, q, k, v, causal=True)
    with pytest.raises(AssertionError, match=r"dq \(float32\): err_kernel"):
        assert_backward_rule(grads_tf, do, q, k, v, causal=True)


def test_tf32_flag_is_ignored_by_the_rule_for_other_dtypes(rng):
    q, k, v = random_inputs(rng, 1, 20, 30, 2, 1, 32, np.float16)
    out, lse = naive_forward(q, k, v)
    assert_forward_rule(out, lse, q, k, v, tf32=True)  # float16: its own rule, no ValueError


def test_stored_term_uses_tf32_eps_only_with_tf32():
    args = dict(grad=True, term_magnitude=1.0, stored_magnitude=1.0)
    exact = helpers.rule_bound(np.float32, 0.0, 1.0, **args)
    tf32 = helpers.rule_bound(np.float32, 0.0, 1.0, **args, tf32=True)
    assert tf32 - exact == pytest.approx(TF32_EPS - np.finfo(np.float32).eps)


def test_the_two_orders_differ_by_tf32_roundoff_and_agree_without_tf32(rng):
    q, k, v, do = random_inputs(rng, 1, 50, 70, 2, 1, 40, np.float32, grad=True)  # scale 40^-0.5: not a power of 2
    ref_out, _ = reference.attention_forward(q, k, v, causal=True)
    (o_t, l_t), (o_d, l_d) = (naive_forward(q, k, v, causal=True, tf32=True, order=o) for o in ORDERS)
    assert 1e-5 < max_abs_err(o_t, o_d) / np.abs(ref_out).max() < 1e-2
    assert max_abs_err(l_t, l_d) > 1e-6
    g_t, g_d = (naive_backward(do, q, k, v, causal=True, tf32=True, order=o) for o in ORDERS)
    assert all(max_abs_err(a, b) > 0 for a, b in zip(g_t, g_d))
    # float32 products: the orders agree to float32 rounding
    (o_t, l_t), (o_d, l_d) = (naive_forward(q, k, v, causal=True, order=o) for o in ORDERS)
    assert max_abs_err(o_t, o_d) < 1e-5 * np.abs(ref_out).max() and max_abs_err(l_t, l_d) < 1e-5
    with pytest.raises(ValueError, match="order: expected one of"):
        naive_forward(q, k, v, order="flash")


def test_check_rule_takes_the_largest_error_of_a_list():
    oracle = np.zeros(4)
    small, large = np.full(4, 1e-3), np.full(4, 1e-2)
    got = np.full(4, 1.5e-2)
    with pytest.raises(AssertionError):
        helpers.check_rule("out", got, oracle, small, np.float32, term_magnitude=0.0)
    helpers.check_rule("out", got, oracle, [small, large], np.float32, term_magnitude=0.0)


# ---------------------------------------------------------------------------------------------------
# a FlashAttention with TF32 products in NumPy, against the TF32 rule


def _round_mantissa(x, bits):
    """float32 -> `bits` explicit mantissa bits, nearest, ties away from zero (10: TF32, 7: bfloat16)."""
    drop = 23 - bits
    u = np.asarray(x, np.float32).view(np.uint32)
    r = ((u + np.uint32(1 << (drop - 1))) & np.uint32((0xFFFFFFFF >> drop) << drop)).view(np.float32)
    return np.where(np.isfinite(x), r, x)


def flash_tf32(q, k, v, dout, *, causal, softmax_scale=None, block_n=64, bits=10):
    """Forward and backward as a TF32 FlashAttention kernel may round: S = tf32(Q) tf32(K)^T, scaled
    afterwards in the exp's base 2; online softmax over tiles of block_n keys with P rounded to TF32
    unnormalised (against the running max) before P V; O /= l at the end; the backward recomputes P
    from the LSE, D = rowsum(dO o O) from the stored O and dO unrounded. Returns (out, lse, grads)."""
    f = np.float32

    def mm(a, b):
        return np.matmul(_round_mantissa(a.astype(f), bits), _round_mantissa(b.astype(f), bits))

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, group = k.shape[1], nheads // k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    scale_log2 = f(scale * np.log2(np.e))
    qh = q.transpose(0, 2, 1, 3)
    kh, vh = (np.repeat(x.transpose(0, 2, 1, 3), group, axis=1) for x in (k, v))
    doh = dout.transpose(0, 2, 1, 3)
    visible = reference.attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal)
    s = mm(qh, kh.swapaxes(-1, -2))  # (B, H, Sq, Sk), unscaled
    s2 = np.where(visible, s * scale_log2, -np.inf).astype(f)  # base-2 exponents
    m = np.full((batch, nheads, seqlen_q, 1), -np.inf, f)
    l = np.zeros_like(m)
    o = np.zeros(qh.shape, f)
    for j in range(0, seqlen_k, block_n):
        t = s2[..., j : j + block_n]
        m_new = np.maximum(m, t.max(axis=-1, keepdims=True))
        m_use = np.where(np.isfinite(m_new), m_new, f(0))
        alpha = np.where(np.isfinite(m), np.exp2(m - m_use), f(0)).astype(f)
        p = np.exp2(t - m_use).astype(f)
        l = (l * alpha + p.sum(axis=-1, keepdims=True, dtype=f)).astype(f)
        o = (o * alpha + mm(p, vh[..., j : j + block_n, :])).astype(f)
        m = m_new
    has_key = l > 0
    o = np.where(has_key, o / np.where(has_key, l, f(1)), f(0)).astype(f)
    lse2 = np.where(has_key, m + np.log2(np.where(has_key, l, f(1))), -np.inf).astype(f)
    lse = (lse2 / f(np.log2(np.e))).astype(f)[..., 0]
    # backward
    d = (doh * o).sum(axis=-1, keepdims=True, dtype=f)
    p = np.where(visible, np.exp2(s2 - np.where(np.isfinite(lse2), lse2, np.inf)), f(0)).astype(f)
    dv = mm(p.swapaxes(-1, -2), doh)
    ds = (p * (mm(doh, vh.swapaxes(-1, -2)) - d)).astype(f)
    dq = (mm(ds, kh) * f(scale)).astype(f)
    dk = (mm(ds.swapaxes(-1, -2), qh) * f(scale)).astype(f)

    def ungroup(x):
        return x.reshape(batch, nheads // group, group, seqlen_k, head_dim).sum(axis=2, dtype=f).transpose(0, 2, 1, 3)

    return o.transpose(0, 2, 1, 3), lse, (dq.transpose(0, 2, 1, 3), ungroup(dk), ungroup(dv))


def test_round_mantissa_10_is_tf32_round(rng):
    x = (rng.standard_normal(10_000) * np.exp2(rng.integers(-20, 20, 10_000))).astype(np.float32)
    assert np.array_equal(_round_mantissa(x, 10).view(np.uint32), tf32_round(x).view(np.uint32))


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal): one query row, a few keys, head dims
# whose softmax_scale is not a power of 2 (the scale's rounding point matters), empty causal rows
TINY = [(1, 1, 3, 1, 1, 40, False), (1, 1, 1, 1, 1, 32, False), (2, 1, 5, 4, 2, 72, False),
        (1, 5, 2, 1, 1, 128, False), (1, 1, 17, 3, 3, 40, True), (2, 5, 5, 2, 1, 32, True),
        (1, 7, 3, 2, 2, 72, True), (1, 1, 70, 1, 1, 128, False)]


@pytest.mark.parametrize("case", TINY, ids=[",".join(map(str, c)) for c in TINY])
def test_tf32_rule_accepts_a_tf32_flash_kernel_on_tiny_problems(rng, case):
    """A maximum over one or a few values: a kernel whose TF32 roundings fall elsewhere than the
    naive attention's must still pass (with the torch order alone 220 of 1600 such draws failed)."""
    b, sq, sk, h, hk, d, causal = case
    for _ in range(25):
        q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, np.float32, grad=True)
        out, lse, grads = flash_tf32(q, k, v, do, causal=causal)
        assert_forward_rule(out, lse, q, k, v, causal=causal, tf32=True)
        assert_backward_rule(grads, do, q, k, v, causal=causal, tf32=True)


@pytest.mark.parametrize("case", [(2, 113, 203, 4, 2, 40, True), (1, 300, 70, 2, 1, 64, True),
                                  (1, 1, 300, 2, 2, 128, False), (1, 130, 150, 1, 1, 200, True)])
def test_tf32_rule_accepts_a_tf32_flash_kernel_and_rejects_bfloat16_operands(rng, case):
    b, sq, sk, h, hk, d, causal = case
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, np.float32, grad=True)
    out, lse, grads = flash_tf32(q, k, v, do, causal=causal)
    assert_forward_rule(out, lse, q, k, v, causal=causal, tf32=True)
    assert_backward_rule(grads, do, q, k, v, causal=causal, tf32=True)
    with pytest.raises(AssertionError, match=r"out \(float32\)"):  # the exact rule rejects TF32
        assert_forward_rule(out, None, q, k, v, causal=causal)
    out, lse, grads = flash_tf32(q, k, v, do, causal=causal, bits=7)  # 3 bits fewer: 8x the rounding error
    with pytest.raises(AssertionError, match=r"out \(float32, TF32 products\)"):
        assert_forward_rule(out, lse, q, k, v, causal=causal, tf32=True)
    with pytest.raises(AssertionError, match=r"(dq|dk|dv) \(float32, TF32 products\)"):
        assert_backward_rule(grads, do, q, k, v, causal=causal, tf32=True)


def test_tf32_flash_kernel_with_softmax_scale_zero_and_empty_rows(rng):
    q, k, v, do = random_inputs(rng, 1, 65, 65, 2, 2, 64, np.float32, grad=True)
    out, lse, grads = flash_tf32(q, k, v, do, causal=True, softmax_scale=0.0)
    assert_forward_rule(out, lse, q, k, v, causal=True, softmax_scale=0.0, tf32=True)
    assert_backward_rule(grads, do, q, k, v, causal=True, softmax_scale=0.0, tf32=True)
    q, k, v, do = random_inputs(rng, 2, 300, 70, 2, 1, 64, np.float32, grad=True)
    out, lse, grads = flash_tf32(q, k, v, do, causal=True)
    assert (out[:, :230] == 0).all() and np.isneginf(lse[:, :, :230]).all() and (grads[0][:, :230] == 0).all()
    assert_forward_rule(out, lse, q, k, v, causal=True, tf32=True)
    assert_backward_rule(grads, do, q, k, v, causal=True, tf32=True)
