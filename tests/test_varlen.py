"""Issue 17's varlen API on the CPU: flash_attn_varlen_func / _forward / _backward.

- The varlen oracle against a padded dense oracle whose mask is built by a loop (an independent
  statement of "per-sequence, bottom-right within each sequence").
- The CPU path against each sequence alone through flash_attn_func / flash_attn_backward (bitwise:
  the same computation) and against the oracle by DESIGN.md's rule, forward and backward, with
  hypothesis-drawn length lists (zeros, 1, odd, one long), GQA, causal, window, the score features,
  seqused_k and dropout (the keep-mask's corner of the dense frame).
- Sequences with no rows or no keys: out 0, lse -inf (or the sink), zero gradients, never NaN.
- The forward/backward contract (VarlenForward.options) and validation errors naming the argument.
Fresh random inputs every run (never zeros); warnings are errors.
"""

from __future__ import annotations


import numpy as np
import pytest
from helpers import assert_backward_rule, assert_dropout_rule, assert_forward_rule, float_dtypes, msg, same_bits
from hypothesis import example, given
from hypothesis import strategies as st

import flashcupy
from flashcupy import dropout, reference
from flashcupy._arrays import dtype_name, lse_dtype
from flashcupy.interface import flash_attn_backward, flash_attn_forward, flash_attn_func
from flashcupy.varlen import (
    VarlenForward,
    flash_attn_varlen_backward,
    flash_attn_varlen_forward,
    flash_attn_varlen_func,
)

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("cpu_path_only")]

DTYPES = float_dtypes()
HEADS = [(1, 1), (2, 1), (4, 2), (3, 3)]  # (nheads, nheads_k): MHA, MQA, GQA
LENGTHS = st.sampled_from([0, 0, 1, 1, 2, 3, 5, 7, 8, 16, 17])  # zeros, 1, odd, even
LONG = 97  # "one long" sequence: several chunks' worth beside the short ones


def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed(rng, lens_q, lens_k, nheads, nheads_k, head_dim, dtype, amplitude=1.0):
    """Fresh standard-normal packed q, k, v, dout (never zeros) and their int32 cu_seqlens."""
    tq, tk = int(sum(lens_q)), int(sum(lens_k))

    def draw(*shape, a=1.0):
        return (a * rng.standard_normal(shape)).astype(dtype)

    return (draw(tq, nheads, head_dim, a=amplitude), draw(tk, nheads_k, head_dim, a=amplitude),
            draw(tk, nheads_k, head_dim), draw(tq, nheads, head_dim), cu(lens_q), cu(lens_k))


def spans(cu_q, cu_k, used=None):
    lk = np.diff(cu_k) if used is None else used
    return [(int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b] + lk[b])) for b in range(len(cu_q) - 1)]


@st.composite
def length_lists(draw, same=None):
    """(lens_q, lens_k): 1..5 sequences; lengths with zeros, 1 and odd ones, sometimes one long; the key
    lengths equal the query lengths (self-attention) or are drawn apart."""
    n = draw(st.integers(1, 5))
    lens_q = draw(st.lists(LENGTHS, min_size=n, max_size=n))
    same = draw(st.booleans()) if same is None else same
    lens_k = list(lens_q) if same else draw(st.lists(LENGTHS, min_size=n, max_size=n))
    if draw(st.booleans()):
        b = draw(st.integers(0, n - 1))
        lens_q[b] = LONG
        lens_k[b] = LONG if same or draw(st.booleans()) else draw(LENGTHS)
    return lens_q, lens_k


@st.composite
def cases(draw):
    lens_q, lens_k = draw(length_lists())
    h, hk = draw(st.sampled_from(HEADS))
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (3, 0), (0, 2), (5, 5)]))
    return dict(lens_q=lens_q, lens_k=lens_k, h=h, hk=hk, d=draw(st.sampled_from([8, 16])),
                dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()), window=window,
                seed=draw(st.integers(0, 2**32 - 1)))


# ---------------------------------------------------------------------------------------------------
# the oracle against a padded dense problem with a loop-built mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (2, 1)])
def test_varlen_oracle_is_the_padded_dense_oracle_with_a_loop_mask(causal, window):
    rng = np.random.default_rng()
    lens_q, lens_k = [3, 0, 6, 1, 4], [5, 2, 3, 0, 4]
    h, hk, d = 4, 2, 8
    q, k, v, do, cq, ck = packed(rng, lens_q, lens_k, h, hk, d, np.float64)
    mq, mk, nb = max(lens_q), max(lens_k), len(lens_q)
    pq, pdo = np.zeros((nb, mq, h, d)), np.zeros((nb, mq, h, d))
    pk, pv = np.zeros((nb, mk, hk, d)), np.zeros((nb, mk, hk, d))
    mask = np.zeros((nb, 1, mq, mk), bool)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck)):
        lq, lk = q1 - q0, k1 - k0
        pq[b, :lq], pdo[b, :lq], pk[b, :lk], pv[b, :lk] = q[q0:q1], do[q0:q1], k[k0:k1], v[k0:k1]
        for i in range(lq):
            for j in range(lk):
                d_ = j - (i + lk - lq)  # key minus the row's diagonal, bottom-right within the sequence
                ok = (not causal or d_ <= 0) and (window[0] < 0 or d_ >= -window[0]) and (window[1] < 0 or d_ <= window[1])
                mask[b, 0, i, j] = ok
    kw = dict(causal=causal, window_size=window)
    out, lse = reference.varlen_attention_forward(q, k, v, cq, ck, **kw)
    dq, dk, dv = reference.varlen_attention_backward(do, q, k, v, cq, ck, **kw)
    p_out, p_lse = reference.attention_forward(pq, pk, pv, mask=mask)
    p_dq, p_dk, p_dv = reference.attention_backward(pdo, pq, pk, pv, mask=mask)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck)):
        lq, lk = q1 - q0, k1 - k0
        np.testing.assert_allclose(out[q0:q1], p_out[b, :lq], rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(np.isinf(lse[:, q0:q1]), np.isinf(p_lse[b, :, :lq]))  # rows with no key
        np.testing.assert_allclose(lse[:, q0:q1], p_lse[b, :, :lq], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dq[q0:q1], p_dq[b, :lq], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dk[k0:k1], p_dk[b, :lk], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dv[k0:k1], p_dv[b, :lk], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# the CPU path: bitwise per sequence, and the rule


def _check_empty(out, lse, grads, q0, q1, k0, k1, sinks=None):
    """A sequence without keys: out 0, lse -inf (or its sink), dq 0 on its rows."""
    assert not np.any(out[q0:q1])
    want = -np.inf if sinks is None else sinks.astype(lse.dtype)[:, None]
    assert np.all(lse[:, q0:q1] == want)
    assert not np.any(grads[0][q0:q1])


@given(c=cases())
@example(c=dict(lens_q=[0, 1, LONG, 3], lens_k=[2, 0, LONG, 7], h=4, hk=2, d=8, dtype=np.dtype(np.float16),
                causal=True, window=(-1, -1), seed=1))
@example(c=dict(lens_q=[5, 0], lens_k=[3, 4], h=2, hk=1, d=16, dtype=np.dtype(np.float32), causal=True,
                window=(3, 0), seed=2))
def test_varlen_is_each_sequence_alone_and_meets_the_rule(c):
    rng = np.random.default_rng(c["seed"])
    dtype, kw = c["dtype"], dict(causal=c["causal"], window_size=c["window"])
    q, k, v, do, cq, ck = packed(rng, c["lens_q"], c["lens_k"], c["h"], c["hk"], c["d"], dtype)
    mq, mk = max(c["lens_q"]), max(c["lens_k"])
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, mq, mk, **kw)
    assert fwd.out.dtype == dtype and fwd.out.shape == q.shape
    assert fwd.lse.dtype == lse_dtype(dtype) and fwd.lse.shape == (c["h"], q.shape[0])
    grads = flash_attn_varlen_backward(do, q, k, v, forward=fwd)
    assert [g.dtype for g in grads] == [dtype] * 3 and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    out, lse = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, return_lse=True, **kw)
    assert same_bits(out, fwd.out) and same_bits(lse, fwd.lse)
    for q0, q1, k0, k1 in spans(cq, ck):
        if q1 == q0:
            continue
        if k1 == k0:
            _check_empty(fwd.out, fwd.lse, grads, q0, q1, k0, k1)
            continue
        qb, kb, vb, dob = q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], do[q0:q1][None]
        o1, l1 = flash_attn_func(qb, kb, vb, return_lse=True, **kw)
        assert same_bits(fwd.out[q0:q1], o1[0]) and same_bits(fwd.lse[:, q0:q1], l1[0])
        g1 = flash_attn_backward(dob, qb, kb, vb, o1, l1, **kw)
        assert same_bits(grads[0][q0:q1], g1[0][0])
        assert same_bits(grads[1][k0:k1], g1[1][0]) and same_bits(grads[2][k0:k1], g1[2][0])
        assert_forward_rule(fwd.out[q0:q1][None], fwd.lse[:, q0:q1][None], qb, kb, vb, **kw)
        assert_backward_rule([grads[0][q0:q1][None], grads[1][k0:k1][None], grads[2][k0:k1][None]],
                             dob, qb, kb, vb, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_name(d) for d in DTYPES])
def test_varlen_against_the_varlen_oracle_with_seqused_k(dtype):
    """seqused_k: a sequence attends its first seqused_k[b] keys; the unused keys get zero gradients."""
    rng = np.random.default_rng()
    lens_q, lens_k, used = [4, 1, 0, 9, 3], [6, 3, 2, 9, 5], np.array([2, 0, 1, 9, 5], np.int32)
    q, k, v, do, cq, ck = packed(rng, lens_q, lens_k, 4, 2, 16, dtype)
    kw = dict(causal=True, seqused_k=used)
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 9, 9, **kw)
    grads = flash_attn_varlen_backward(do, q, k, v, forward=fwd)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck, used)):
        if q1 == q0:
            continue
        if k1 == k0:
            _check_empty(fwd.out, fwd.lse, grads, q0, q1, k0, k1)
        else:
            qb, kb, vb, dob = q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], do[q0:q1][None]
            assert_forward_rule(fwd.out[q0:q1][None], fwd.lse[:, q0:q1][None], qb, kb, vb, causal=True)
            assert_backward_rule([grads[0][q0:q1][None], grads[1][k0:k1][None], grads[2][k0:k1][None]],
                                 dob, qb, kb, vb, causal=True)
        unused = slice(k1, int(ck[b + 1]))
        assert not np.any(grads[1][unused]) and not np.any(grads[2][unused])
    if dtype == np.float64:  # the whole call against the varlen oracle, DESIGN.md's float64 bound
        ro, rl = reference.varlen_attention_forward(q, k, v, cq, ck, **kw)
        np.testing.assert_allclose(fwd.out, ro, rtol=1e-12, atol=1e-13)
        np.testing.assert_array_equal(np.isinf(fwd.lse), np.isinf(rl))
        for g, r in zip(grads, reference.varlen_attention_backward(do, q, k, v, cq, ck, **kw)):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_name(d) for d in DTYPES])
def test_varlen_with_score_features_and_sinks(dtype):
    """softcap, per-sequence ALiBi rows (batch, nheads), a window and sinks: each sequence by the rule;
    dsinks, summed over the sequences, against the sum of each sequence's own."""
    rng = np.random.default_rng()
    lens_q, lens_k = [5, 0, 8, 2], [7, 3, 8, 0]
    h, hk, nb = 4, 1, len(lens_q)
    q, k, v, do, cq, ck = packed(rng, lens_q, lens_k, h, hk, 8, dtype, amplitude=1.5)
    slopes = rng.uniform(0.02, 1.0, (nb, h)).astype(np.float32)
    sinks = (2.0 * rng.standard_normal(h)).astype(np.float32)
    kw = dict(causal=True, window_size=(4, 0), softcap=float(rng.uniform(1.0, 6.0)), sinks=sinks)
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 8, 8, alibi_slopes=slopes, **kw)
    dq, dk, dv, dsinks = flash_attn_varlen_backward(do, q, k, v, forward=fwd)
    want_dsinks = np.zeros(h, np.float64)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck)):
        if q1 == q0:
            continue
        if k1 == k0:
            _check_empty(fwd.out, fwd.lse, (dq,), q0, q1, k0, k1, sinks)
            continue
        qb, kb, vb, dob = q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], do[q0:q1][None]
        sb = dict(kw, alibi_slopes=slopes[b:b + 1])
        assert_forward_rule(fwd.out[q0:q1][None], fwd.lse[:, q0:q1][None], qb, kb, vb, **sb)
        one = flash_attn_backward(dob, qb, kb, vb, fwd.out[q0:q1][None], fwd.lse[:, q0:q1][None], **sb)
        assert_backward_rule(one, dob, qb, kb, vb, **sb)
        assert same_bits(dq[q0:q1], one[0][0]) and same_bits(dk[k0:k1], one[1][0]) and same_bits(dv[k0:k1], one[2][0])
        want_dsinks += one[3]
    assert dsinks.dtype == np.float32 and dsinks.shape == (h,)
    np.testing.assert_allclose(dsinks, want_dsinks, rtol=1e-5, atol=1e-6)  # float32 sums in another order


@given(lens=length_lists(same=True), causal=st.booleans(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(DTYPES))
def test_varlen_dropout_is_the_dense_frames_corner(lens, causal, seed, dtype):
    """Dropout: sequence b's keep bits are the corner [b, :, :len_q, :len_k] of the dense keep-mask of
    (batch, nheads, max_seqlen_q, max_seqlen_k); out and grads meet the rule given that mask."""
    lens_q, lens_k = lens
    rng = np.random.default_rng(seed)
    h, hk, p = 2, 1, 0.25
    q, k, v, do, cq, ck = packed(rng, lens_q, lens_k, h, hk, 8, dtype)
    mq, mk = max(lens_q), max(lens_k)
    rng_state = (int(rng.integers(0, 2**63)), int(rng.integers(0, 2**32)))
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, mq, mk, dropout_p=p, causal=causal, seed=rng_state)
    assert fwd.rng_state == rng_state
    grads = flash_attn_varlen_backward(do, q, k, v, forward=fwd)
    keep = dropout.keep_mask(*rng_state, len(lens_q), h, mq, mk, p)
    p_eff = dropout.effective_dropout_p(p)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck)):
        if q1 == q0 or k1 == k0:
            continue
        kb = keep[b:b + 1, :, :q1 - q0, :k1 - k0]
        assert_dropout_rule(fwd.out[q0:q1][None], [grads[0][q0:q1][None], grads[1][k0:k1][None], grads[2][k0:k1][None]],
                            do[q0:q1][None], q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], kb, p_eff, causal=causal)
    if dtype == np.float64:
        ro, _ = reference.varlen_attention_forward(q, k, v, cq, ck, causal=causal, dropout_mask=keep, dropout_p=p_eff)
        np.testing.assert_allclose(fwd.out, ro, rtol=1e-12, atol=1e-13)


def test_varlen_dropout_changes_the_output_and_is_reproducible():
    """The mask is used (a dropout run differs from the plain one) and is a function of the seed."""
    rng = np.random.default_rng()
    q, k, v, do, cq, ck = packed(rng, [6, 9], [6, 9], 2, 2, 8, np.float32)
    plain = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9)
    a = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, dropout_p=0.3, seed=7)
    b = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, dropout_p=0.3, seed=7)
    c = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, dropout_p=0.3, seed=8)
    assert same_bits(a, b) and not np.array_equal(a, plain) and not np.array_equal(a, c)


def test_all_sequences_empty_and_no_sequences():
    rng = np.random.default_rng()
    q, k, v, do, cq, ck = packed(rng, [0, 3, 0], [4, 0, 0], 2, 1, 8, np.float32)
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 3, 4, causal=True)
    assert not np.any(fwd.out) and np.all(fwd.lse == -np.inf)
    dq, dk, dv = flash_attn_varlen_backward(do, q, k, v, forward=fwd)
    assert not (np.any(dq) or np.any(dk) or np.any(dv))
    z = np.zeros((0, 2, 8), np.float32)
    out, lse = flash_attn_varlen_func(z, z[:, :1], z[:, :1], np.zeros(1, np.int32), np.zeros(1, np.int32), 0, 0,
                                      return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


# ---------------------------------------------------------------------------------------------------
# the forward/backward contract


def _problem(dtype=np.float32):
    rng = np.random.default_rng()
    return packed(rng, [3, 5], [4, 6], 4, 2, 8, dtype)


def test_backward_record_gives_the_bits_of_the_explicit_call():
    q, k, v, do, cq, ck = _problem()
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 5, 6, causal=True, dropout_p=0.2, seed=3)
    assert isinstance(fwd, VarlenForward) and len(fwd) == 3 and fwd.options.causal is True
    want = flash_attn_varlen_backward(do, q, k, v, fwd.out, fwd.lse, cq, ck, 5, 6, causal=True, dropout_p=0.2,
                                      rng_state=fwd.rng_state)
    for got in (flash_attn_varlen_backward(do, q, k, v, forward=fwd),
                flash_attn_varlen_backward(do, q, k, v, forward=fwd, causal=True, cu_seqlens_q=cq, max_seqlen_k=6)):
        assert all(same_bits(g, w) for g, w in zip(got, want))
    with pytest.raises(AttributeError):
        fwd.options = None


@pytest.mark.parametrize("bwd_kw, error", [
    (dict(causal=False), "causal: expected the forward's causal=True"),
    (dict(max_seqlen_q=9), "max_seqlen_q: expected the forward's max_seqlen_q=5"),
    (dict(softmax_scale=0.5), "softmax_scale: expected the forward's softmax_scale"),
    (dict(window_size=(2, 2)), "window_size: expected the forward's window_size=(-1, -1)"),
])
def test_option_mismatch_names_the_option(bwd_kw, error):
    q, k, v, do, cq, ck = _problem()
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 5, 6, causal=True)
    with pytest.raises(ValueError, match=msg(error)):
        flash_attn_varlen_backward(do, q, k, v, forward=fwd, **bwd_kw)


def test_equal_cu_seqlens_in_another_array_is_a_mismatch():
    """Arrays are compared by pointer (values would need a host read)."""
    q, k, v, do, cq, ck = _problem()
    fwd = flash_attn_varlen_forward(q, k, v, cq, ck, 5, 6)
    with pytest.raises(ValueError, match=msg("cu_seqlens_k: expected the forward's cu_seqlens_k", "same array")):
        flash_attn_varlen_backward(do, q, k, v, forward=fwd, cu_seqlens_k=ck.copy())
    with pytest.raises(ValueError, match=msg("out: expected the forward's out")):
        flash_attn_varlen_backward(do, q, k, v, fwd.out.copy(), forward=fwd)


def test_backward_needs_offsets_without_forward():
    q, k, v, do, cq, ck = _problem()
    out, lse = flash_attn_varlen_func(q, k, v, cq, ck, 5, 6, return_lse=True)
    with pytest.raises(TypeError, match=msg("max_seqlen_q: expected the forward's max_seqlen_q")):
        flash_attn_varlen_backward(do, q, k, v, out, lse, cq, ck)
    with pytest.raises(TypeError, match=msg("forward: expected the VarlenForward")):
        flash_attn_varlen_backward(do, q, k, v, forward=flash_attn_forward(q[None], k[None], v[None]))
    with pytest.raises(ValueError, match=msg("lse: expected shape (4, 8) (nheads, total_q)")):
        flash_attn_varlen_backward(do, q, k, v, out, lse[:, :-1], cq, ck, 5, 6)


# ---------------------------------------------------------------------------------------------------
# validation


def _call(**change):
    q, k, v, do, cq, ck = _problem()
    kw = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=5, max_seqlen_k=6)
    kw.update(change)
    return flash_attn_varlen_func(**kw)


@pytest.mark.parametrize("change, error, text", [
    (dict(cu_seqlens_q=np.array([0, 3, 8], np.int64)), TypeError, ("cu_seqlens_q: expected dtype int32", "int64")),
    (dict(cu_seqlens_k=[0, 4, 10]), TypeError, ("cu_seqlens_k", "list")),
    (dict(cu_seqlens_q=np.array([[0, 3, 8]], np.int32)), ValueError, ("cu_seqlens_q: expected shape (n,)",)),
    (dict(cu_seqlens_k=np.array([0, 10], np.int32)), ValueError, ("cu_seqlens_k: expected shape (3,)", "(2,)")),
    (dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)), ValueError, ("cu_seqlens_q: expected entry 0 to be 0", "1")),
    (dict(cu_seqlens_k=np.array([0, 7, 6], np.int32)), ValueError,
     ("cu_seqlens_k: expected non-decreasing", "entry 2 = 6 < entry 1 = 7")),
    (dict(cu_seqlens_q=np.array([0, 3, 7], np.int32)), ValueError,
     ("cu_seqlens_q: expected the last entry to equal q.shape[0] = 8", "got 7")),
    (dict(max_seqlen_q=4), ValueError, ("max_seqlen_q: expected an int >= every length", "longest is 5", "got 4")),
    (dict(max_seqlen_k=5.0), TypeError, ("max_seqlen_k: expected an int", "float")),
    (dict(seqused_k=np.array([5, 1], np.int32)), ValueError, ("seqused_k: expected 0 <= seqused_k[b]", "seqused_k[0] = 5")),
    (dict(seqused_k=np.array([1, 1, 1], np.int32)), ValueError, ("seqused_k: expected shape (2,)",)),
    (dict(q=np.ones((1, 8, 4, 8), np.float32)), ValueError, ("q: expected rank 3 (total, nheads, head_dim)",)),
    (dict(causal=1), TypeError, ("causal: expected a bool",)),
    (dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, ("alibi_slopes: expected shape (4,) or (2, 4)",)),
])
def test_validation_names_the_argument(change, error, text):
    with pytest.raises(error, match=msg(*text)):
        _call(**change)


def test_seqused_k_lowers_what_max_seqlen_k_must_cover():
    _call(seqused_k=np.array([2, 3], np.int32), max_seqlen_k=3)
    with pytest.raises(ValueError, match=msg("max_seqlen_k", "seqused_k", "longest is 3", "got 2")):
        _call(seqused_k=np.array([2, 3], np.int32), max_seqlen_k=2)


def test_exported():
    for name in ("flash_attn_varlen_func", "flash_attn_varlen_forward", "flash_attn_varlen_backward",
                 "VarlenForward", "VarlenOptions"):
        assert hasattr(flashcupy, name) and name in flashcupy.__all__


def test_the_fused_varlen_forward_is_opt_in_and_gpu_only(monkeypatch, rng):
    """flashcupy._gpu.forward_varlen (the mma.sync kernel with FEAT_VARLEN, emulator-checked, not yet run
    on a GPU) runs only for CuPy float16 / bfloat16 without dropout and with FLASHCUPY_VARLEN_FUSED=1:
    on NumPy the env changes nothing (the chunked path, bitwise), and the chooser says no without it."""
    from flashcupy import _gpu, varlen

    monkeypatch.setattr(_gpu, "forward_varlen", lambda *a, **k: pytest.fail("fused varlen forward on NumPy"))
    q = rng.standard_normal((12, 2, 32)).astype(np.float16)
    k, v = (rng.standard_normal((9, 1, 32)).astype(np.float16) for _ in range(2))
    cq, ck = np.array([0, 5, 12], np.int32), np.array([0, 4, 9], np.int32)
    monkeypatch.delenv("FLASHCUPY_VARLEN_FUSED", raising=False)
    base = flashcupy.flash_attn_varlen_forward(q, k, v, cq, ck, 7, 5, causal=True)
    monkeypatch.setenv("FLASHCUPY_VARLEN_FUSED", "1")
    again = flashcupy.flash_attn_varlen_forward(q, k, v, cq, ck, 7, 5, causal=True)
    assert same_bits(base.out, again.out) and same_bits(base.lse, again.lse)
    p, _ = varlen._varlen_problem(q, k, v, cq, ck, 7, 5, None, None, 0.0, True, (-1, -1), 0.0, None, None)
    assert not varlen._fused_varlen_takes(p, 0.0)
    monkeypatch.delenv("FLASHCUPY_VARLEN_FUSED")
    assert not varlen._fused_varlen_takes(p._replace(xp=object()), 0.0)  # not NumPy, but not asked for
