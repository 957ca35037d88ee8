"""merge_attention (issue 17): the exact merge of partial (out, lse) over disjoint key sets.

Splitting the keys of a dense problem into 1..8 random parts (some empty), attending each part with
flash_attn_forward and merging must give the dense result by DESIGN.md's rule; a sink is one more part;
the varlen layout merges the same way; dropping a part is rejected (the test can fail).
Fresh random inputs every run; warnings are errors.
"""

from __future__ import annotations


import numpy as np
import pytest
from helpers import assert_forward_rule, float_dtypes, msg, random_inputs, same_bits
from hypothesis import given
from hypothesis import strategies as st

from flashcupy import flash_attn_forward, merge_attention
from flashcupy._arrays import lse_dtype

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("cpu_path_only")]

DTYPES = float_dtypes()


def split_keys(rng, seqlen_k, nparts):
    """A random partition of range(seqlen_k) into nparts index arrays (not contiguous; some may be empty)."""
    owner = rng.integers(0, nparts, seqlen_k)
    if nparts > 1 and rng.random() < 0.5:  # make sure an empty part occurs often
        drop = rng.integers(0, nparts)
        owner[owner == drop] = (drop + 1) % nparts
    return [np.flatnonzero(owner == i) for i in range(nparts)]


def parts_of(q, k, v, index_sets, **kw):
    outs, lses = [], []
    for idx in index_sets:
        fwd = flash_attn_forward(q, k[:, idx], v[:, idx], **kw)
        outs.append(fwd.out)
        lses.append(fwd.lse)
    return outs, lses


@given(nparts=st.integers(1, 8), seqlen_q=st.integers(1, 9), seqlen_k=st.integers(1, 40),
       heads=st.sampled_from([(2, 1), (4, 2), (3, 3)]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_merging_key_parts_is_the_dense_result(nparts, seqlen_q, seqlen_k, heads, dtype, seed):
    rng = np.random.default_rng(seed)
    h, hk = heads
    q, k, v = random_inputs(rng, 2, seqlen_q, seqlen_k, h, hk, 16, dtype, amplitude=1.5)
    outs, lses = parts_of(q, k, v, split_keys(rng, seqlen_k, nparts))
    out, lse = merge_attention(outs, lses)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == lse_dtype(dtype) and lse.shape == lses[0].shape
    assert_forward_rule(out, lse, q, k, v)


def test_empty_parts_and_all_empty():
    """A part over no key (lse -inf, out 0) changes nothing, bitwise; merging only empty parts gives out 0,
    lse -inf, never NaN."""
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 1, 5, 12, 2, 2, 8, np.float32)
    outs, lses = parts_of(q, k, v, [np.arange(6), np.arange(6, 12)])
    e_out, e_lse = np.zeros_like(outs[0]), np.full_like(lses[0], -np.inf)
    a = merge_attention(outs, lses)
    b = merge_attention([e_out, outs[0], e_out, outs[1]], [e_lse, lses[0], e_lse, lses[1]])
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    out, lse = merge_attention([e_out, e_out], [e_lse, e_lse])
    assert not np.any(out) and np.all(lse == -np.inf)
    one = merge_attention([outs[0]], [lses[0]])
    np.testing.assert_allclose(one[0], outs[0], rtol=2e-7, atol=1e-7)  # weight exp(0) = 1 up to float32 rounding
    assert same_bits(one[1], lses[0])


def test_a_sink_is_one_more_part():
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 2, 6, 20, 4, 2, 8, np.float64)
    sinks = (2.0 * rng.standard_normal(4)).astype(np.float32)
    outs, lses = parts_of(q, k, v, split_keys(rng, 20, 3))
    sink_lse = np.broadcast_to(sinks.astype(np.float64)[None, :, None], lses[0].shape)
    out, lse = merge_attention([*outs, np.zeros_like(outs[0])], [*lses, sink_lse])
    assert_forward_rule(out, lse, q, k, v, sinks=sinks)


def test_varlen_layout():
    """(total_q, nheads, head_dim) with lse (nheads, total_q): the layout of flash_attn_varlen_func."""
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 1, 7, 30, 4, 1, 8, np.float32)
    outs, lses = parts_of(q, k, v, split_keys(rng, 30, 4))
    out, lse = merge_attention([o[0] for o in outs], [x[0] for x in lses])
    assert out.shape == (7, 4, 8) and lse.shape == (4, 7)
    assert_forward_rule(out[None], lse[None], q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropping_a_part_is_rejected(dtype):
    """The rule rejects a merge that misses one part's keys (so the merge test can fail)."""
    rng = np.random.default_rng()
    q, k, v = random_inputs(rng, 2, 6, 32, 2, 2, 16, dtype)
    outs, lses = parts_of(q, k, v, [np.arange(0, 16), np.arange(16, 28), np.arange(28, 32)])
    out, lse = merge_attention(outs[:2], lses[:2])
    with pytest.raises(AssertionError):
        assert_forward_rule(out, lse, q, k, v)


@pytest.mark.parametrize("call, error, text", [
    (lambda o, l: merge_attention([], []), ValueError, ("out_parts: expected at least one part",)),
    (lambda o, l: merge_attention(o, l[:1]), ValueError, ("lse_parts: expected 2 arrays",)),
    (lambda o, l: merge_attention(o[0], l), TypeError, ("out_parts: expected a list or tuple",)),
    (lambda o, l: merge_attention([o[0], o[1][:, :2]], l), ValueError, ("out_parts[1]: expected shape (1, 3, 2, 4)",)),
    (lambda o, l: merge_attention([o[0], o[1].astype(np.float64)], l), TypeError, ("out_parts[1]: expected dtype float32",)),
    (lambda o, l: merge_attention(o, [l[0], l[1][..., :2]]), ValueError, ("lse_parts[1]: expected shape (1, 2, 3)",)),
    (lambda o, l: merge_attention(o, [l[0].astype(np.float16), l[1]]), TypeError, ("lse_parts[0]: expected dtype float32 or float64",)),
    (lambda o, l: merge_attention([o[0][0, 0]], [l[0][0, 0]]), ValueError, ("out_parts[0]: expected rank >= 3",)),
    (lambda o, l: merge_attention([o[0], "x"], l), TypeError, ("out_parts[1]: expected a NumPy, CuPy",)),
])
def test_validation_names_the_part(call, error, text):
    rng = np.random.default_rng()
    o = [rng.standard_normal((1, 3, 2, 4)).astype(np.float32) for _ in range(2)]
    l = [rng.standard_normal((1, 2, 3)).astype(np.float32) for _ in range(2)]
    with pytest.raises(error, match=msg(*text)):
        call(o, l)
