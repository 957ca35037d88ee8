"""Issue 16's score features on the CPU: sliding window, softcap, ALiBi and learnable sinks.

- The oracle (flashcupy.reference) against first principles: its gradients (dsinks, softcap's dS,
  ALiBi, window) against central finite differences in float64; the window mask against a loop;
  the sink's closed form (rows sum to 1 - P_sink, a row that sees only its sink).
- The CPU path (flash_attn_forward / flash_attn_backward on NumPy) against the oracle by DESIGN.md's
  rule, for every dtype, each feature alone and all together with GQA, causal, dropout and block
  masks, odd seqlens and seqlen_q != seqlen_k, small chunks.
- Bitwise identities: window (-1, -1) is no window, sinks of -inf are no sinks.
- The rule rejects wrong features (mutants), validation names the argument, the forward/backward
  contract compares the features, the chunked path skips keys outside the window.
Fresh random inputs every run (never zeros); warnings are errors.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from helpers import (
    assert_backward_rule,
    assert_dropout_rule,
    assert_forward_rule,
    float_dtypes,
    magnitude_of,
    max_abs_err,
    random_inputs,
    same_bits,
)
from hypothesis import example, given
from hypothesis import strategies as st

import flashcupy
from flashcupy import _chunked, _features, blocksparse, dropout, interface, reference, testing
from flashcupy._arrays import bfloat16, dtype_name
from flashcupy.interface import flash_attn_backward, flash_attn_forward, flash_attn_func

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("cpu_path_only")]

DTYPES = float_dtypes()
DTYPE_IDS = [dtype_name(d) for d in DTYPES]
FD_STEP = 1e-5
FD_RTOL = 1e-6
STRICT = dict(divide="raise", invalid="raise", over="raise")


def draw_features(rng, batch, nheads, seqlen_k, *, window=True, softcap=True, alibi=True, sinks=True):
    """Random feature keywords (fresh values, never zeros): window sides in -1..seqlen_k, softcap in
    [0.5, 8), ALiBi slopes (nheads,) or (batch, nheads) in [0.02, 1), sinks ~ N(0, 4)."""
    kw = {}
    if window:
        kw["window_size"] = tuple(int(rng.integers(-1, seqlen_k + 1)) for _ in range(2))
    if softcap:
        kw["softcap"] = float(rng.uniform(0.5, 8.0))
    if alibi:
        shape = (nheads,) if rng.random() < 0.5 else (batch, nheads)
        kw["alibi_slopes"] = rng.uniform(0.02, 1.0, shape).astype(np.float32)
    if sinks:
        kw["sinks"] = (2.0 * rng.standard_normal(nheads)).astype(np.float32)
    return kw


# ---------------------------------------------------------------------------------------------------
# the oracle against first principles (float64)


def _loss(w, **kw):
    def f(q, k, v, sinks=None):
        extra = {} if sinks is None else {"sinks": sinks}
        out, _ = reference.attention_forward(q, k, v, **kw, **extra)
        return float((w * out).sum())
    return f


@st.composite
def oracle_cases(draw):
    return dict(batch=draw(st.integers(1, 2)), sq=draw(st.integers(1, 6)), sk=draw(st.integers(1, 6)),
                hk=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2])), d=draw(st.sampled_from([1, 3, 4])),
                causal=draw(st.booleans()), window=draw(st.booleans()), softcap=draw(st.booleans()),
                alibi=draw(st.booleans()), dropout=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@given(c=oracle_cases())
@example(c=dict(batch=1, sq=5, sk=3, hk=1, group=2, d=3, causal=True, window=True, softcap=True, alibi=True,
                dropout=True, seed=0))
def test_oracle_gradients_match_finite_differences(c):
    """dq, dk, dv and dsinks of the oracle against central differences of L = sum(W o out), along
    random directions, with sinks and any of window, softcap (its dS factor 1 - tanh^2), ALiBi,
    causal, GQA and a dropout keep-mask."""
    rng = np.random.default_rng(c["seed"])
    b, sq, sk, hk, d = c["batch"], c["sq"], c["sk"], c["hk"], c["d"]
    h = hk * c["group"]
    q, k, v, w = random_inputs(rng, b, sq, sk, h, hk, d, np.float64, amplitude=1.5, grad=True)
    kw = draw_features(rng, b, h, sk, window=c["window"], softcap=c["softcap"], alibi=c["alibi"], sinks=False)
    kw["causal"] = c["causal"]
    if c["dropout"]:
        kw.update(dropout_mask=rng.random((b, h, sq, sk)) > 0.3, dropout_p=0.3)
    sinks = (2.0 * rng.standard_normal(h))
    with np.errstate(**STRICT):
        dq, dk, dv, dsinks = reference.attention_backward(w, q, k, v, sinks=sinks, **kw)
        f = _loss(w, **kw)
        for i, (x, g) in enumerate(((q, dq), (k, dk), (v, dv), (sinks, dsinks))):
            u = rng.standard_normal(x.shape)
            args = [q, k, v, sinks]
            args[i] = x + FD_STEP * u
            plus = f(*args)
            args[i] = x - FD_STEP * u
            minus = f(*args)
            fd = (plus - minus) / (2 * FD_STEP)
            analytic = float((g * u).sum())
            scale = max(1.0, float(np.abs(g).sum() * np.abs(u).max()))
            assert abs(fd - analytic) <= FD_RTOL * scale, (i, fd, analytic)


@pytest.mark.parametrize("seed", range(3))
def test_oracle_dsinks_finite_differences_per_head(seed):
    """Each dsinks[h] against a central difference of sinks[h] alone (float64), with every feature."""
    rng = np.random.default_rng(seed + 1000 * int(np.random.SeedSequence().entropy % 1000))
    b, sq, sk, h, hk, d = 2, 7, 9, 4, 2, 5
    q, k, v, w = random_inputs(rng, b, sq, sk, h, hk, d, np.float64, grad=True)
    kw = draw_features(rng, b, h, sk, sinks=False)
    sinks = rng.standard_normal(h)
    *_, dsinks = reference.attention_backward(w, q, k, v, causal=True, sinks=sinks, **kw)
    f = _loss(w, causal=True, **kw)
    for head in range(h):
        e = np.zeros(h)
        e[head] = FD_STEP
        fd = (f(q, k, v, sinks + e) - f(q, k, v, sinks - e)) / (2 * FD_STEP)
        assert abs(fd - dsinks[head]) <= FD_RTOL * max(1.0, abs(dsinks[head]))


def test_oracle_dsinks_is_minus_psink_times_d():
    """dsinks = -sum P_sink D with P_sink = exp(sink - lse) and D = rowsum(dO o O), as derived."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    q, k, v, do = random_inputs(rng, 2, 6, 8, 3, 1, 4, np.float64, grad=True)
    sinks = rng.standard_normal(3)
    out, lse = reference.attention_forward(q, k, v, sinks=sinks, softcap=2.0)
    *_, dsinks = reference.attention_backward(do, q, k, v, sinks=sinks, softcap=2.0)
    dd = (do * out).sum(axis=-1).transpose(0, 2, 1)  # (B, H, Sq)
    want = -(np.exp(sinks[None, :, None] - lse) * dd).sum(axis=(0, 2))
    np.testing.assert_allclose(dsinks, want, rtol=1e-13, atol=1e-15)


def test_oracle_window_mask_matches_a_loop():
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    for _ in range(50):
        sq, sk = (int(x) for x in rng.integers(1, 12, 2))
        left, right = (int(x) for x in rng.integers(-1, 8, 2))
        causal = bool(rng.random() < 0.5)
        got = reference.attention_mask(1, 1, sq, sk, causal=causal, window_size=(left, right))[0, 0]
        want = np.zeros((sq, sk), dtype=bool)
        for i in range(sq):
            for j in range(sk):
                c = i + sk - sq
                want[i, j] = ((left < 0 or j >= c - left) and (right < 0 or j <= c + right)
                              and (not causal or j <= c))
        assert np.array_equal(got, want), (sq, sk, left, right, causal)


def test_oracle_sink_closed_form():
    """Rows of P sum to 1 - P_sink; a row that sees only its sink gives out 0 and lse = sink; a large
    softcap is no softcap; zero slopes are no ALiBi (to rounding)."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    b, sq, sk, h = 2, 9, 4, 3
    q, k, v = random_inputs(rng, b, sq, sk, h, h, 8, np.float64)
    sinks = rng.standard_normal(h)
    with np.errstate(**STRICT):
        p, lse = reference.attention_probs(q, k, causal=True, sinks=sinks)
        out, lse2 = reference.attention_forward(q, k, v, causal=True, sinks=sinks)
    p_sink = np.exp(sinks[None, :, None] - lse)
    np.testing.assert_allclose(p.sum(axis=-1) + p_sink, 1.0, rtol=1e-14)
    empty = np.arange(sq) < sq - sk  # causal, Sq > Sk: rows that see no key
    assert (out[:, empty] == 0).all()
    np.testing.assert_array_equal(lse[:, :, empty], np.broadcast_to(sinks[None, :, None], lse[:, :, empty].shape))
    assert np.array_equal(lse, lse2)
    base, _ = reference.attention_forward(q, k, v)
    capped, _ = reference.attention_forward(q, k, v, softcap=1e8)
    assert max_abs_err(capped, base) <= 1e-12
    zero, _ = reference.attention_forward(q, k, v, alibi_slopes=np.zeros(h))
    assert max_abs_err(zero, base) <= 1e-15


def test_oracle_alibi_is_a_bias_of_the_distance():
    """ALiBi as a closed form: S' = S - slope |i + Sk - Sq - j|, bottom-right aligned, after the softcap."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    b, sq, sk, h, d = 2, 5, 7, 2, 4
    q, k, _ = random_inputs(rng, b, sq, sk, h, h, d, np.float64)
    slopes = rng.uniform(0.1, 1.0, (b, h))
    s, _, _ = reference.attention_scores(q, k, softcap=3.0, alibi_slopes=slopes)
    raw = np.einsum("bihd,bjhd->bhij", q, k) * d**-0.5
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    want = 3.0 * np.tanh(raw / 3.0) - slopes[:, :, None, None] * np.abs(i + sk - sq - j)
    np.testing.assert_allclose(s, want, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# the CPU path against the oracle by the rule


@st.composite
def problems(draw):
    seqlen = st.one_of(st.integers(1, 9), st.integers(10, 70))
    hk = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 2)), sq=draw(seqlen), sk=draw(seqlen), hk=hk,
                h=hk * draw(st.sampled_from([1, 2, 3])), d=draw(st.sampled_from([1, 8, 16, 64])),
                causal=draw(st.booleans()), window=draw(st.booleans()), softcap=draw(st.booleans()),
                alibi=draw(st.booleans()), sinks=draw(st.booleans()),
                softmax_scale=draw(st.sampled_from([None, None, 0.3])),
                chunk_bytes=draw(st.sampled_from([None, None, 1, 3000])), seed=draw(st.integers(0, 2**32 - 1)))


def _run(pb, dtype):
    rng = np.random.default_rng(pb["seed"])
    q, k, v, do = random_inputs(rng, pb["batch"], pb["sq"], pb["sk"], pb["h"], pb["hk"], pb["d"], dtype, grad=True)
    kw = draw_features(rng, pb["batch"], pb["h"], pb["sk"], window=pb["window"], softcap=pb["softcap"],
                       alibi=pb["alibi"], sinks=pb["sinks"])
    kw.update(causal=pb["causal"], softmax_scale=pb["softmax_scale"])
    chunk = _chunked.CHUNK_BYTES if pb["chunk_bytes"] is None else pb["chunk_bytes"]
    with mock.patch.object(_chunked, "CHUNK_BYTES", chunk):
        fwd = flash_attn_forward(q, k, v, **kw)
        grads = flash_attn_backward(do, q, k, v, forward=fwd)
    return q, k, v, do, kw, fwd, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(pb=problems())
@example(pb=dict(batch=2, sq=9, sk=4, hk=2, h=4, d=8, causal=True, window=True, softcap=True, alibi=True,
                 sinks=True, softmax_scale=None, chunk_bytes=1, seed=1))
@example(pb=dict(batch=1, sq=33, sk=65, hk=1, h=3, d=64, causal=False, window=True, softcap=False, alibi=False,
                 sinks=False, softmax_scale=None, chunk_bytes=3000, seed=2))
def test_cpu_path_matches_oracle(dtype, pb):
    q, k, v, do, kw, fwd, grads = _run(pb, dtype)
    assert fwd.out.dtype == dtype and fwd.out.shape == q.shape
    assert len(grads) == (4 if "sinks" in kw else 3)
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, **kw)
    assert_backward_rule(grads, do, q, k, v, **kw)


@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "sinks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_each_feature_alone(dtype, feature, rng):
    """One deterministic problem per (dtype, feature): GQA, seqlen_q != seqlen_k both ways, causal both."""
    for (sq, sk), causal in (((37, 64), False), ((64, 37), True), ((50, 50), True)):
        q, k, v, do = random_inputs(rng, 2, sq, sk, 4, 2, 32, dtype, grad=True)
        kw = draw_features(rng, 2, 4, sk, **{f: f == feature for f in ("window", "softcap", "alibi", "sinks")})
        if feature == "window":
            kw["window_size"] = (int(rng.integers(0, sk // 2)), int(rng.integers(0, sk // 2)))
        fwd = flash_attn_forward(q, k, v, causal=causal, **kw)
        grads = flash_attn_backward(do, q, k, v, forward=fwd)
        assert_forward_rule(fwd.out, fwd.lse, q, k, v, causal=causal, **kw)
        assert_backward_rule(grads, do, q, k, v, causal=causal, **kw)


def _block_mask(rng, nheads, sq, sk, bq=64, bk=64):
    nbq, nbk = -(-sq // bq), -(-sk // bk)
    m = rng.random((nheads, nbq, nbk)) < 0.7
    return blocksparse.BlockMask(m, bq, bk)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_features_with_dropout_and_block_mask(dtype, rng):
    """window + softcap + ALiBi + sinks + GQA + causal + dropout + a block mask, against the oracle
    given the regenerated keep-mask and the block mask's element mask."""
    b, sq, sk, h, hk, d, p = 2, 135, 161, 6, 2, 16, 0.2
    state = (int(rng.integers(2**40)), int(rng.integers(100)))
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    kw = draw_features(rng, b, h, sk)
    kw["window_size"] = (int(rng.integers(5, 90)), int(rng.integers(0, 90)))
    mask = _block_mask(rng, h, sq, sk)
    fwd = flash_attn_forward(q, k, v, causal=True, dropout_p=p, seed=state, block_mask=mask, **kw)
    grads = flash_attn_backward(do, q, k, v, forward=fwd)
    z = dropout.keep_mask(*state, b, h, sq, sk, p)
    assert_dropout_rule(fwd.out, grads, do, q, k, v, z, dropout.effective_dropout_p(p), causal=True,
                        mask=mask.element_mask(sq, sk), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_features_with_block_mask_no_dropout(dtype, rng):
    b, sq, sk, h, hk, d = 1, 150, 100, 3, 1, 8
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    kw = draw_features(rng, b, h, sk)
    mask = _block_mask(rng, h, sq, sk)
    fwd = flash_attn_forward(q, k, v, block_mask=mask, **kw)
    grads = flash_attn_backward(do, q, k, v, forward=fwd)
    em = mask.element_mask(sq, sk)
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, mask=em, **kw)
    assert_backward_rule(grads, do, q, k, v, mask=em, **kw)


def test_flash_attn_func_takes_the_features(rng):
    q, k, v = random_inputs(rng, 2, 17, 23, 4, 2, 16, np.float32)
    kw = draw_features(rng, 2, 4, 23)
    fwd = flash_attn_forward(q, k, v, causal=True, **kw)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, **kw)
    assert same_bits(out, fwd.out) and same_bits(lse, fwd.lse)
    assert fwd.options.window_size == (kw["window_size"][0], -1)  # causal bounds the right side
    assert fwd.options.softcap == kw["softcap"] and fwd.options.sinks is kw["sinks"]


# ---------------------------------------------------------------------------------------------------
# bitwise identities, empty rows


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_unbounded_window_and_minus_inf_sinks_are_bitwise_no_feature(dtype, causal, rng):
    """window (-1, -1) gives the bits of no window; sinks of -inf the bits of no sinks (out, lse, dq,
    dk, dv; dsinks is 0), also with dropout, a block mask and softcap / ALiBi on both sides."""
    b, sq, sk, h, hk, d = 2, 141, 79, 4, 2, 16
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    common = dict(causal=causal, dropout_p=0.15, seed=(int(rng.integers(2**31)), 0),
                  block_mask=_block_mask(rng, h, sq, sk))
    for base in ({}, draw_features(rng, b, h, sk, window=False, sinks=False)):
        ref = flash_attn_forward(q, k, v, **common, **base)
        ref_g = flash_attn_backward(do, q, k, v, forward=ref)
        win = flash_attn_forward(q, k, v, **common, **base, window_size=(-1, -1))
        win_g = flash_attn_backward(do, q, k, v, forward=win)
        sink = flash_attn_forward(q, k, v, **common, **base, sinks=np.full(h, -np.inf, np.float32))
        *sink_g, dsinks = flash_attn_backward(do, q, k, v, forward=sink)
        for got, got_g in ((win, win_g), (sink, sink_g)):
            assert same_bits(got.out, ref.out) and same_bits(got.lse, ref.lse)
            for a, c in zip(got_g, ref_g):
                assert same_bits(a, c)
        assert dsinks.dtype == np.float32 and (dsinks == 0).all()


def test_window_wider_than_the_problem_matches_no_window(rng):
    """A window wider than both sequences sees every key: the same result as none (to rounding; a
    different code path, so not bitwise)."""
    q, k, v, do = random_inputs(rng, 1, 20, 30, 2, 2, 8, np.float64, grad=True)
    a = flash_attn_forward(q, k, v, window_size=(100, 100))
    b = flash_attn_forward(q, k, v)
    assert max_abs_err(a.out, b.out) <= 1e-14 * magnitude_of(b.out)
    ga, gb = flash_attn_backward(do, q, k, v, forward=a), flash_attn_backward(do, q, k, v, forward=b)
    for x, y in zip(ga, gb):
        assert max_abs_err(x, y) <= 1e-13 * magnitude_of(y)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_rows(dtype, rng):
    """A window that leaves rows empty: out 0, lse -inf, zero gradients; with sinks those rows give out
    0 and lse = sink; no NaN, no floating-point warning (warnings are errors here)."""
    b, sq, sk, h = 2, 12, 5, 2
    q, k, v, do = random_inputs(rng, b, sq, sk, h, h, 8, dtype, grad=True)
    kw = dict(causal=True, window_size=(1, 0))  # offset -7: rows 0..6 see no key
    empty = np.arange(sq) < sq - sk
    fwd = flash_attn_forward(q, k, v, **kw)
    dq, dk, dv = flash_attn_backward(do, q, k, v, forward=fwd)
    assert (fwd.out[:, empty] == 0).all() and np.isneginf(fwd.lse[:, :, empty]).all()
    assert (dq[:, empty] == 0).all() and np.isfinite(dq).all()
    sinks = rng.standard_normal(h).astype(np.float32)
    fwd = flash_attn_forward(q, k, v, sinks=sinks, **kw)
    dq, dk, dv, dsinks = flash_attn_backward(do, q, k, v, forward=fwd)
    assert (fwd.out[:, empty] == 0).all()
    np.testing.assert_array_equal(fwd.lse[:, :, empty], np.broadcast_to(sinks.astype(fwd.lse.dtype)[None, :, None],
                                                                        fwd.lse[:, :, empty].shape))
    assert (dq[:, empty] == 0).all() and np.isfinite(dsinks).all()
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, sinks=sinks, **kw)
    assert_backward_rule((dq, dk, dv, dsinks), do, q, k, v, sinks=sinks, **kw)


def test_no_keys_at_all_with_sinks(rng):
    """seqlen_k = 0: every row sees only its sink: out 0, lse = sink, zero gradients, dsinks 0."""
    q, k, v, do = random_inputs(rng, 2, 5, 0, 3, 1, 8, np.float32, grad=True)
    sinks = rng.standard_normal(3).astype(np.float32)
    fwd = flash_attn_forward(q, k, v, sinks=sinks)
    assert (fwd.out == 0).all() and (fwd.lse == sinks[None, :, None]).all()
    dq, dk, dv, dsinks = flash_attn_backward(do, q, k, v, forward=fwd)
    assert (dq == 0).all() and dk.shape == k.shape and dsinks.dtype == np.float32 and (dsinks == 0).all()


# ---------------------------------------------------------------------------------------------------
# the chunked path skips keys outside the window


def test_chunks_compute_only_the_keys_of_the_window(monkeypatch, rng):
    """With a sliding window each chunk's score matrix spans at most chunk + left + right columns, and
    the result still follows the rule."""
    b, sq, sk, h, d, left, right = 1, 200, 200, 2, 8, 7, 3
    q, k, v, do = random_inputs(rng, b, sq, sk, h, h, d, np.float32, grad=True)
    widths = []
    scores = _chunked._scores

    def recording(*args, **kwargs):
        s, t = scores(*args, **kwargs)
        widths.append(s.shape[-1])
        return s, t

    monkeypatch.setattr(_chunked, "_scores", recording)
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", 4 * b * h * sk * 4 * 10)  # 10 rows a chunk
    fwd = flash_attn_forward(q, k, v, window_size=(left, right))
    grads = flash_attn_backward(do, q, k, v, forward=fwd)
    assert len(widths) == 2 * math.ceil(sq / 10)
    assert max(widths) <= 10 - 1 + left + right + 1 < sk
    assert_forward_rule(fwd.out, fwd.lse, q, k, v, window_size=(left, right))
    assert_backward_rule(grads, do, q, k, v, window_size=(left, right))


# ---------------------------------------------------------------------------------------------------
# the rule rejects wrong features (each mutant must fail)


def _bf16_or_f16():
    return bfloat16() if bfloat16() is not None else np.dtype(np.float16)


def test_rule_rejects_wrong_features(rng):
    dtype = _bf16_or_f16()
    b, sq, sk, h, d = 2, 48, 48, 4, 32
    q, k, v, do = random_inputs(rng, b, sq, sk, h, h, d, dtype, grad=True)
    sinks = rng.standard_normal(h).astype(np.float32) + 1.0
    slopes = rng.uniform(0.2, 0.8, h).astype(np.float32)
    cases = [  # (what the mutant computes, what it is checked as)
        (dict(window_size=(9, 2)), dict(window_size=(8, 2))),  # window off by one
        (dict(softcap=1.0), dict(softcap=1.02)),  # softcap 2% off
        (dict(alibi_slopes=slopes), dict(alibi_slopes=-slopes)),  # ALiBi sign flipped
        (dict(alibi_slopes=slopes * np.float32(1.05)), dict(alibi_slopes=slopes)),
        (dict(), dict(sinks=sinks)),  # sink left out (of out and lse)
    ]
    for got_kw, want_kw in cases:
        fwd = flash_attn_forward(q, k, v, **got_kw)
        with pytest.raises(AssertionError):
            assert_forward_rule(fwd.out, fwd.lse, q, k, v, **want_kw)
    # the backward: softcap's factor 1 - tanh^2 left out of dS; dsinks 1% off
    fwd = flash_attn_forward(q, k, v, softcap=1.0)
    grads = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse)  # no softcap: no dS factor
    with pytest.raises(AssertionError):
        assert_backward_rule(grads, do, q, k, v, softcap=1.0)


@pytest.mark.parametrize("dtype, factor", [(np.float16, 1.01), ("bfloat16", 1.1)])
def test_rule_rejects_a_wrong_dsinks(dtype, factor, rng):
    """dsinks x 1.01 in float16 is rejected. In bfloat16 dsinks, a signed sum over B * Sq rows of
    P_sink * rowsum(dO o O), carries intrinsic errors of ~1% of its size on random dout (measured: the
    chunked path's own error, with float32 scores and only out stored in bfloat16, reaches 1% of
    max|dsinks|; naive attention in bfloat16 up to 2%), so no rule can reject 1% there without
    rejecting correct kernels; it rejects 10% (measured over 20 seeds: ratio >= 1.57 for 10%, >= 1.39
    for float16's 1%)."""
    if dtype == "bfloat16":
        if bfloat16() is None:
            pytest.skip("needs ml_dtypes")
        dtype = bfloat16()
    b, sq, sk, h, d = 2, 48, 48, 8, 32
    q, k, v, do = random_inputs(rng, b, sq, sk, h, h, d, dtype, grad=True)
    sinks = rng.standard_normal(h).astype(np.float32) + 1.0
    fwd = flash_attn_forward(q, k, v, sinks=sinks)
    dq, dk, dv, dsinks = flash_attn_backward(do, q, k, v, forward=fwd)
    assert_backward_rule((dq, dk, dv, dsinks), do, q, k, v, sinks=sinks)  # the right one passes
    with pytest.raises(AssertionError, match="dsinks"):
        assert_backward_rule((dq, dk, dv, dsinks * np.float32(factor)), do, q, k, v, sinks=sinks)


def test_check_attention_with_features_passes_flashcupy_and_catches_a_dropped_sink():
    def impl(q, k, v, **kw):
        return flashcupy.flash_attn_func(q, k, v, **kw)

    report = testing.check_attention(impl, cases=20, seed=int(np.random.SeedSequence().entropy % 1000),
                                     features=True)
    assert any(c.sinks is not None for _, c in report.cases) and any(c.softcap for _, c in report.cases)

    def no_sink(q, k, v, sinks=None, **kw):
        return flashcupy.flash_attn_func(q, k, v, **kw)

    with pytest.raises(AssertionError, match="sinks="):
        testing.check_attention(no_sink, cases=30, seed=7, features=True, dtypes=("float32",))


def test_case_repr_reproduces_features():
    from flashcupy.fuzz import parse_case

    for case in testing.random_cases(20, seed=11, features=True):
        again = parse_case(repr(case))
        assert again == case
        kw, kw2 = case.feature_kwargs(), again.feature_kwargs()
        assert kw.keys() == kw2.keys()
        for name in kw:
            assert np.array_equal(np.asarray(kw[name]), np.asarray(kw2[name]))
    plain = testing.random_cases(1, seed=11)[0]
    assert "window_size" not in repr(plain) and plain.feature_kwargs() == {}


@given(case=testing.attention_problems(features=True, max_seqlen=24, head_dims=(8, 16)))
def test_attention_problems_with_features_pass_the_cpu_path(case):
    q, k, v = case.inputs()
    kw = case.feature_kwargs()
    out, lse = flashcupy.flash_attn_func(q, k, v, causal=case.causal, return_lse=True, **kw)
    testing.assert_attention_close(out, q, k, v, lse=lse, causal=case.causal, **kw)


# ---------------------------------------------------------------------------------------------------
# validation and the forward / backward contract


class _FakeGpuArray:
    """Anything with __cuda_array_interface__ counts as a GPU array (no GPU needed to be refused)."""

    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}
    shape = (2,)
    dtype = np.dtype(np.float32)


@pytest.mark.parametrize("kw, error, match", [
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=(3,)), TypeError, "window_size"),
    (dict(window_size=(1.0, 2)), TypeError, "window_size"),
    (dict(window_size=(True, 2)), TypeError, "window_size"),
    (dict(window_size="ab"), TypeError, "window_size"),
    (dict(window_size=5), TypeError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=np.ones((2, 3), np.float32)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=np.ones((2, 2, 2), np.float32)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=np.ones(2, np.float64)), TypeError, "alibi_slopes.*float32"),
    (dict(alibi_slopes=np.ones(2, np.float16)), TypeError, "alibi_slopes.*float32"),
    (dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes"),
    (dict(sinks=np.ones(3, np.float32)), ValueError, "sinks"),
    (dict(sinks=np.ones((1, 2), np.float32)), ValueError, "sinks"),
    (dict(sinks=np.ones(2, np.float64)), TypeError, "sinks.*float32"),
    (dict(sinks=np.ones(2, np.int32)), TypeError, "sinks.*float32"),
    (dict(sinks=1.0), TypeError, "sinks"),
    (dict(sinks=_FakeGpuArray()), TypeError, "sinks"),
    (dict(alibi_slopes=_FakeGpuArray()), TypeError, "alibi_slopes"),
])
def test_validation_names_the_argument(kw, error, match, rng):
    q, k, v = random_inputs(rng, 3, 4, 5, 2, 1, 8, np.float32)
    with pytest.raises(error, match=match):
        flash_attn_forward(q, k, v, **kw)
    fwd = flash_attn_forward(q, k, v)
    with pytest.raises(error, match=match):
        flash_attn_backward(q, q, k, v, fwd.out, fwd.lse, **kw)


def test_batch_by_heads_slopes_and_non_contiguous_arrays(rng):
    """(batch, nheads) slopes are per batch; non-contiguous slopes / sinks are copied and give the
    bits of contiguous ones."""
    b, h = 3, 4
    q, k, v, do = random_inputs(rng, b, 9, 11, h, 2, 8, np.float32, grad=True)
    wide = rng.uniform(0.1, 1.0, (b, 2 * h)).astype(np.float32)
    slopes, sinks_wide = wide[:, ::2], rng.standard_normal(2 * h).astype(np.float32)
    sinks = sinks_wide[::2]
    assert not slopes.flags.c_contiguous and not sinks.flags.c_contiguous
    a = flash_attn_forward(q, k, v, alibi_slopes=slopes, sinks=sinks)
    c = flash_attn_forward(q, k, v, alibi_slopes=slopes.copy(), sinks=sinks.copy())
    assert same_bits(a.out, c.out) and same_bits(a.lse, c.lse)
    ga, gc = flash_attn_backward(do, q, k, v, forward=a), flash_attn_backward(do, q, k, v, forward=c)
    for x, y in zip(ga, gc):
        assert same_bits(x, y)
    assert_forward_rule(a.out, a.lse, q, k, v, alibi_slopes=slopes, sinks=sinks)
    per_batch = [flash_attn_forward(q[i:i + 1], k[i:i + 1], v[i:i + 1], alibi_slopes=slopes[i].copy(),
                                    sinks=sinks).out for i in range(b)]
    assert max_abs_err(np.concatenate(per_batch), a.out) <= 1e-6 * magnitude_of(a.out)


def _fwd(rng, **kw):
    q, k, v, do = random_inputs(rng, 2, 6, 7, 2, 2, 8, np.float32, grad=True)
    return q, k, v, do, flash_attn_forward(q, k, v, **kw)


def test_backward_repeats_the_forward_features(rng):
    sinks = rng.standard_normal(2).astype(np.float32)
    slopes = rng.uniform(0.1, 1, 2).astype(np.float32)
    kw = dict(window_size=(3, 1), softcap=2.5, alibi_slopes=slopes, sinks=sinks)
    q, k, v, do, fwd = _fwd(rng, **kw)
    implicit = flash_attn_backward(do, q, k, v, forward=fwd)
    explicit = flash_attn_backward(do, q, k, v, forward=fwd, **kw)
    by_hand = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, **kw)
    assert len(implicit) == 4
    for a, b, c in zip(implicit, explicit, by_hand):
        assert same_bits(a, b) and same_bits(a, c)
    assert_backward_rule(implicit, do, q, k, v, **kw)


@pytest.mark.parametrize("name, other", [
    ("window_size", (2, 1)),
    ("window_size", (-1, -1)),
    ("softcap", 2.0),
    ("softcap", 0.0),
    ("alibi_slopes", "copy"),
    ("alibi_slopes", None),
    ("sinks", "copy"),
    ("sinks", None),
])
def test_backward_refuses_features_that_differ_from_the_forward(name, other, rng):
    kw = dict(window_size=(3, 1), softcap=2.5, alibi_slopes=rng.uniform(0.1, 1, 2).astype(np.float32),
              sinks=rng.standard_normal(2).astype(np.float32))
    q, k, v, do, fwd = _fwd(rng, **kw)
    value = kw[name].copy() if isinstance(other, str) else other  # a copy: equal values, another array
    with pytest.raises(ValueError, match=f"^{name}: expected the forward's"):
        flash_attn_backward(do, q, k, v, forward=fwd, **{name: value})


def test_backward_refuses_features_the_forward_did_not_have(rng):
    q, k, v, do, fwd = _fwd(rng)
    for name, value in (("window_size", (1, 1)), ("softcap", 1.0), ("alibi_slopes", np.ones(2, np.float32)),
                        ("sinks", np.zeros(2, np.float32))):
        with pytest.raises(ValueError, match=f"^{name}: expected the forward's"):
            flash_attn_backward(do, q, k, v, forward=fwd, **{name: value})


def test_causal_window_right_side_is_the_causal_bound(rng):
    """With causal, a window's right side changes nothing (causal is right = 0): the options store
    -1, and a backward given another right side passes the contract check."""
    q, k, v, do, fwd = _fwd(rng, causal=True, window_size=(2, 5))
    assert fwd.options.window_size == (2, -1)
    other = flash_attn_forward(q, k, v, causal=True, window_size=(2, 0))
    assert same_bits(fwd.out, other.out) and same_bits(fwd.lse, other.lse)
    a = flash_attn_backward(do, q, k, v, forward=fwd, window_size=(2, 0))
    b = flash_attn_backward(do, q, k, v, forward=fwd)
    for x, y in zip(a, b):
        assert same_bits(x, y)


def test_sink_grad_is_one_function_of_out_and_lse(rng):
    """interface.sink_grad, the dsinks of every path, equals the oracle's (float64: to float32's
    rounding) and is what flash_attn_backward returns."""
    q, k, v, do = random_inputs(rng, 2, 10, 13, 4, 2, 8, np.float64, grad=True)
    sinks = rng.standard_normal(4).astype(np.float32)
    fwd = flash_attn_forward(q, k, v, sinks=sinks, softcap=3.0, causal=True)
    *_, dsinks = flash_attn_backward(do, q, k, v, forward=fwd)
    again = interface.sink_grad(np, do, fwd.out, fwd.lse, sinks)
    assert same_bits(dsinks, again)
    *_, want = reference.attention_backward(do, q, k, v, sinks=sinks, softcap=3.0, causal=True)
    np.testing.assert_allclose(dsinks, want, rtol=2 * np.finfo(np.float32).eps, atol=1e-30)


def test_features_reach_the_planner(monkeypatch, rng):
    """kernel_path(features=) and every GPU call's plan get the call's FEAT_* bits (the dispatcher
    decides per family; today any bit gives the chunked path)."""
    from flashcupy import _dispatch

    seen = []
    for name in ("forward_plan", "backward_plan"):
        real = getattr(_dispatch, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["features"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(_dispatch, name, spy)
    for bits in (_features.FEAT_LOCAL, _features.FEAT_SINK, _features.FEAT_ALL):
        for backward in (False, True):
            interface.kernel_path(np.float16, 64, on_gpu=True, device=90, features=bits, backward=backward)
    assert seen == [_features.FEAT_LOCAL] * 2 + [_features.FEAT_SINK] * 2 + [_features.FEAT_ALL] * 2
    with pytest.raises(ValueError, match="features"):
        interface.kernel_path(np.float16, 64, on_gpu=True, device=80, features=16)
    f = _features.Features(window=(3, -1), softcap=1.0, sinks=np.zeros(2, np.float32))
    assert f.bits == _features.FEAT_LOCAL | _features.FEAT_SOFTCAP | _features.FEAT_SINK
