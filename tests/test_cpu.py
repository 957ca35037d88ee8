"""The CPU path (flash_attn_forward / flash_attn_backward / flash_attn_func on NumPy arrays) against the
float64 oracle by DESIGN.md's correctness rule, its chunking and memory, and properties of attention.

float32 and float64 compute in their own precision; float16 and bfloat16 NumPy inputs compute in
float32 and come back in their own dtype. LSE is float32 (float64 for float64 inputs).
NumPy float64 inputs run on the GPU's float64 kernel only when opted in (interface.NUMPY_FLOAT64_ON_GPU
or FLASHCUPY_NUMPY_FLOAT64_ON_GPU=1); this module switches that off, so it tests the CPU path even then.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from helpers import (
    assert_backward_rule,
    assert_forward_rule,
    float_dtypes,
    magnitude_of,
    max_abs_err,
    random_inputs,
)
from hypothesis import example, given
from hypothesis import strategies as st

from flashcupy import _chunked, flash_attn_backward, flash_attn_forward, flash_attn_func, interface, reference
from flashcupy._arrays import dtype_name, lse_dtype

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True, scope="module")
def cpu_path_only():
    """NumPy float64 stays on the CPU (module scope: hypothesis tests take no function fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interface, "NUMPY_FLOAT64_ON_GPU", False)
        yield

DTYPES = float_dtypes()
DTYPE_IDS = [dtype_name(d) for d in DTYPES]


@dataclass(frozen=True)
class Problem:
    """One attention problem for the CPU path; arrays are drawn from `seed`."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads_k: int
    group: int
    head_dim: int
    causal: bool
    softmax_scale: float | None = None
    amplitude: float = 1.0  # scale of q and k: larger means peakier softmax rows
    layout: str = "bshd"  # "bshd" contiguous, "bhsd" a transposed view, "strided" last-dim stride 2
    chunk_bytes: int | None = None  # None: the library's default; small values force many chunks
    seed: int = 0

    @property
    def nheads(self):
        return self.nheads_k * self.group

    def kwargs(self):
        return dict(softmax_scale=self.softmax_scale, causal=self.causal)

    def inputs(self, dtype):
        """(q, k, v, dout) in dtype and in the problem's memory layout."""
        rng = np.random.default_rng(self.seed)
        arrays = random_inputs(rng, self.batch, self.seqlen_q, self.seqlen_k, self.nheads, self.nheads_k,
                               self.head_dim, dtype, amplitude=self.amplitude, grad=True)
        return tuple(relayout(x, self.layout) for x in arrays)

    def chunking(self):
        if self.chunk_bytes is None:
            return mock.patch.object(_chunked, "CHUNK_BYTES", _chunked.CHUNK_BYTES)
        return mock.patch.object(_chunked, "CHUNK_BYTES", self.chunk_bytes)


def relayout(x, layout):
    """The same values as x (BSHD) in another memory layout, as a view."""
    if layout == "bhsd":  # (B, H, S, D) storage, passed as a transposed view
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "strided":  # every other element of a wider array
        wide = np.zeros((*x.shape[:3], 2 * x.shape[3]), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def problems(draw, causal=None):
    seqlen = st.one_of(st.integers(1, 9), st.integers(10, 70))
    return Problem(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(seqlen),
        seqlen_k=draw(seqlen),
        nheads_k=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(st.sampled_from([1, 3, 8, 16, 32, 64])),
        causal=draw(st.booleans()) if causal is None else causal,
        softmax_scale=draw(st.sampled_from([None, None, 0.1, 1.0])),
        amplitude=draw(st.sampled_from([1.0, 1.0, 3.0])),
        layout=draw(st.sampled_from(["bshd", "bshd", "bhsd", "strided"])),
        chunk_bytes=draw(st.sampled_from([None, None, 1, 3000])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def check_types(dtype, out, lse=None):
    assert type(out) is np.ndarray and out.dtype == dtype
    if lse is not None:
        assert type(lse) is np.ndarray and lse.dtype == lse_dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# CPU path vs oracle (DESIGN.md's rule), hypothesis-drawn shapes


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(pb=problems())
@example(pb=Problem(1, 1, 1, 1, 1, 1, False))
@example(pb=Problem(2, 9, 4, 2, 2, 8, True, chunk_bytes=1))  # causal, Sq > Sk: empty rows, 1-row chunks
@example(pb=Problem(1, 5, 33, 1, 4, 16, True, amplitude=3.0, layout="bhsd", chunk_bytes=3000))
# regressions of the rule's floor: float32 outputs off by the rounding of scores of size ~60 (exp())
@example(pb=Problem(1, 1, 16, 2, 2, 64, False, 1.0, 1.0, "strided", None, 0))
@example(pb=Problem(1, 10, 21, 1, 1, 64, False, 1.0, 1.0, "strided", 1, 0))
def test_forward_matches_oracle(dtype, pb):
    q, k, v, _ = pb.inputs(dtype)
    with pb.chunking():
        out, lse, rng_state = flash_attn_forward(q, k, v, **pb.kwargs())
    check_types(dtype, out, lse)
    assert out.shape == q.shape and lse.shape == (pb.batch, pb.nheads, pb.seqlen_q)
    assert rng_state is None
    assert_forward_rule(out, lse, q, k, v, **pb.kwargs())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(pb=problems())
@example(pb=Problem(1, 1, 1, 1, 1, 1, False))
@example(pb=Problem(2, 9, 4, 2, 2, 8, True, chunk_bytes=1))
@example(pb=Problem(1, 5, 33, 1, 4, 16, True, amplitude=3.0, layout="strided", chunk_bytes=3000))
# regressions of the rule's floor: exactly-zero dq, dk (one visible key per row) with rounding noise;
# float32 dv off by the float32 LSE's rounding; float16 / bfloat16 dq, dk that cancel to ~1e-3 while
# D = rowsum(dO o O) reads an O rounded to T
@example(pb=Problem(1, 1, 1, 1, 1, 8, False, 1.0, 3.0, "strided", None, 0))
@example(pb=Problem(1, 1, 1, 1, 1, 8, False, None, 1.0, "bshd", None, 2))
@example(pb=Problem(2, 8, 22, 1, 2, 1, False, None, 3.0, "bshd", None, 39916800))
@example(pb=Problem(2, 13, 2, 1, 1, 64, True, 1.0, 1.0, "bshd", None, 190212))
@example(pb=Problem(1, 1, 2, 1, 2, 1, False, None, 3.0, "bshd", None, 9))
@example(pb=Problem(1, 1, 9, 1, 1, 32, False, 1.0, 1.0, "bshd", None, 1))
@example(pb=Problem(1, 2, 2, 1, 1, 3, True, None, 1.0, "bshd", None, 691041982))
def test_backward_matches_oracle(dtype, pb):
    q, k, v, dout = pb.inputs(dtype)
    with pb.chunking():
        fwd = flash_attn_forward(q, k, v, **pb.kwargs())
        dq, dk, dv = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, **pb.kwargs())
    for g, x in ((dq, q), (dk, k), (dv, v)):
        check_types(dtype, g)
        assert g.shape == x.shape
    assert_backward_rule((dq, dk, dv), dout, q, k, v, **pb.kwargs())


# ---------------------------------------------------------------------------------------------------
# deterministic examples: every dtype x head_dim x causal, with GQA and seqlen_q != seqlen_k


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic_forward_backward(dtype, head_dim, causal, rng):
    seed = int(rng.integers(2**32))
    for sq, sk in ((65, 96), (96, 65)):
        pb = Problem(2, sq, sk, 2, 2, head_dim, causal, seed=seed)
        q, k, v, dout = pb.inputs(dtype)
        copies = [x.copy() for x in (q, k, v, dout)]
        fwd = flash_attn_forward(q, k, v, causal=causal)
        grads = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, causal=causal)
        for x, c in zip((q, k, v, dout), copies):  # inputs are never written
            np.testing.assert_array_equal(x, c)
        assert_forward_rule(fwd.out, fwd.lse, q, k, v, causal=causal)
        assert_backward_rule(grads, dout, q, k, v, causal=causal)


def test_flash_attn_func_matches_forward(rng):
    q, k, v = random_inputs(rng, 2, 17, 23, 4, 1, 16, np.float32)
    fwd = flash_attn_forward(q, k, v, causal=True, softmax_scale=0.2)
    out = flash_attn_func(q, k, v, causal=True, softmax_scale=0.2)
    out2, lse = flash_attn_func(q, k, v, 0.0, 0.2, True, return_lse=True)
    check_types(np.dtype(np.float32), out, lse)
    np.testing.assert_array_equal(out, fwd.out)
    np.testing.assert_array_equal(out2, fwd.out)
    np.testing.assert_array_equal(lse, fwd.lse)


# ---------------------------------------------------------------------------------------------------
# chunking and memory


def count_chunks(monkeypatch):
    """Count _chunked._scores calls (one per chunk of query rows per forward or backward)."""
    calls = []
    scores = _chunked._scores

    def counting(*args, **kwargs):
        calls.append(1)
        return scores(*args, **kwargs)

    monkeypatch.setattr(_chunked, "_scores", counting)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_chunking_really_chunks(monkeypatch, rng, causal):
    """A tiny CHUNK_BYTES splits the query rows into many chunks; results equal the one-chunk result
    to rounding (float64) and still satisfy the rule against the oracle."""
    b, sq, sk, h, hk, d = 2, 50, 37, 4, 2, 8
    q, k, v, dout = random_inputs(rng, b, sq, sk, h, hk, d, np.float64, grad=True)

    calls = count_chunks(monkeypatch)
    fwd = flash_attn_forward(q, k, v, causal=causal)
    grads = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, causal=causal)
    assert len(calls) == 2  # default budget: all rows in one chunk, forward and backward

    budget = 4 * b * h * sk * 8 * 3 + 5  # 3 rows per chunk: 16 full chunks and a partial one
    monkeypatch.setattr(_chunked, "CHUNK_BYTES", budget)
    calls.clear()
    fwd_c = flash_attn_forward(q, k, v, causal=causal)
    grads_c = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, causal=causal)
    # causal: the chunks whose rows see no key (rows < sq - sk, bottom-right) compute nothing
    chunks = [(i0, min(i0 + 3, sq)) for i0 in range(0, sq, 3)]
    computed = [c for c in chunks if not causal or c[1] - 1 >= sq - sk]
    assert len(calls) == 2 * len(computed) and (not causal or len(computed) < len(chunks))

    for got, want in zip((fwd_c.out, fwd_c.lse, *grads_c), (fwd.out, fwd.lse, *grads)):
        assert max_abs_err(got, want) <= 1e-14 * magnitude_of(want)
    assert_forward_rule(fwd_c.out, fwd_c.lse, q, k, v, causal=causal)
    assert_backward_rule(grads_c, dout, q, k, v, causal=causal)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("chunk_bytes", [None, 1 << 20], ids=["default_budget", "1MiB_budget"])
def test_no_seqlen_q_by_seqlen_k_array(monkeypatch, rng, chunk_bytes):
    """Peak host memory of forward + backward stays well below one (Sq, Sk) float32 array."""
    if chunk_bytes is None:
        sq = sk = 8192  # one score matrix: 256 MiB; the default budget is 64 MiB
    else:
        monkeypatch.setattr(_chunked, "CHUNK_BYTES", chunk_bytes)
        sq = sk = 2048  # 16 MiB score matrix against a 1 MiB budget
    q, k, v, dout = random_inputs(rng, 1, sq, sk, 1, 1, 16, np.float32, grad=True)
    score_matrix = sq * sk * 4
    fwd = []
    fwd_peak = peak_bytes(lambda: fwd.append(flash_attn_forward(q, k, v, causal=True)))
    out, lse, _ = fwd[0]
    bwd_peak = peak_bytes(lambda: flash_attn_backward(dout, q, k, v, out, lse, causal=True))
    limit = score_matrix / 2 if chunk_bytes is None else score_matrix / 8
    assert fwd_peak < limit, f"forward peak {fwd_peak / 2**20:.1f} MiB"
    assert bwd_peak < limit, f"backward peak {bwd_peak / 2**20:.1f} MiB"
    # a spot check of the result: the last query row sees every key (bottom-right causal)
    last = slice(sq - 1, sq)
    assert_forward_rule(out[:, last], lse[..., last], q[:, last], k, v)


# ---------------------------------------------------------------------------------------------------
# properties


@given(pb=problems(causal=False))
@example(pb=Problem(2, 3, 7, 2, 2, 3, False))
def test_permuting_keys_and_values_together_leaves_output_unchanged(pb):
    q, k, v, dout = pb.inputs(np.float64)
    perm = np.random.default_rng(pb.seed + 1).permutation(pb.seqlen_k)
    fwd = flash_attn_forward(q, k, v, **pb.kwargs())
    fwd_p = flash_attn_forward(q, k[:, perm], v[:, perm], **pb.kwargs())
    assert max_abs_err(fwd_p.out, fwd.out) <= 1e-12 * magnitude_of(fwd.out)
    assert max_abs_err(fwd_p.lse, fwd.lse) <= 1e-12 * max(1.0, magnitude_of(fwd.lse))
    # and the key gradients permute with the keys
    dq, dk, dv = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, **pb.kwargs())
    dq_p, dk_p, dv_p = flash_attn_backward(dout, q, k[:, perm], v[:, perm], fwd_p.out, fwd_p.lse,
                                           **pb.kwargs())
    mag = magnitude_of(dq, dk, dv)
    for got, want in ((dq_p, dq), (dk_p, dk[:, perm]), (dv_p, dv[:, perm])):
        assert max_abs_err(got, want) <= 1e-12 * mag


def visible_counts(seqlen_q, seqlen_k, causal):
    """Keys visible to each query row: (seqlen_q,)."""
    if not causal:
        return np.full(seqlen_q, seqlen_k)
    return np.clip(np.arange(seqlen_q) + seqlen_k - seqlen_q + 1, 0, seqlen_k)


@given(pb=problems())
@example(pb=Problem(1, 6, 2, 1, 2, 3, True))  # rows 0..3 see no key
def test_zero_softmax_scale_gives_mean_of_visible_values(pb):
    q, k, v, _ = pb.inputs(np.float64)
    out, lse, _ = flash_attn_forward(q, k, v, softmax_scale=0.0, causal=pb.causal)
    ref_out, ref_lse = reference.attention_forward(q, k, v, softmax_scale=0.0, causal=pb.causal)
    n = visible_counts(pb.seqlen_q, pb.seqlen_k, pb.causal)  # (Sq,)
    v_rep = np.repeat(v, pb.group, axis=2)  # (B, Sk, H, D)
    prefix = np.concatenate([np.zeros_like(v_rep[:, :1]), np.cumsum(v_rep, axis=1)], axis=1)
    # causal row i sees keys 0 .. n_i - 1 (bottom-right); non-causal rows see all keys
    want = prefix[:, n] / np.maximum(n, 1)[None, :, None, None]
    with np.errstate(divide="ignore"):
        want_lse = np.broadcast_to(np.where(n > 0, np.log(np.maximum(n, 1)), -np.inf), lse.shape)
    for got in (out, ref_out):
        assert max_abs_err(got, want) <= 1e-12 * max(1.0, magnitude_of(want))
    for got in (lse, ref_lse):
        assert max_abs_err(got, want_lse) <= 1e-12 * max(1.0, magnitude_of(want_lse))


@given(pb=problems(), density=st.sampled_from([0.0, 0.2, 0.7, 1.0]))
@example(pb=Problem(1, 7, 3, 1, 2, 4, True), density=0.5)
def test_oracle_probability_rows_sum_to_one_where_visible(pb, density):
    q, k, _, _ = pb.inputs(np.float64)
    rng = np.random.default_rng(pb.seed + 2)
    mask = rng.random((pb.batch, pb.nheads, pb.seqlen_q, pb.seqlen_k)) < density
    p, lse = reference.attention_probs(q, k, causal=pb.causal, mask=mask,
                                       softmax_scale=pb.softmax_scale)
    visible = reference.attention_mask(pb.batch, pb.nheads, pb.seqlen_q, pb.seqlen_k, causal=pb.causal,
                                       mask=mask)
    has_key = visible.any(axis=-1)
    assert (p[~visible] == 0).all()
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=-1)[has_key], 1.0, rtol=1e-14)
    assert (p.sum(axis=-1)[~has_key] == 0).all()
    assert np.isneginf(lse[~has_key]).all() and np.isfinite(lse[has_key]).all()


# ---------------------------------------------------------------------------------------------------
# empty sizes


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "sizes",  # (batch, seqlen_q, seqlen_k)
    [(2, 5, 0), (2, 0, 5), (0, 5, 5), (0, 0, 0)],
    ids=["seqlen_k=0", "seqlen_q=0", "batch=0", "all=0"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_sizes(dtype, sizes, causal, rng):
    b, sq, sk = sizes
    q, k, v, dout = random_inputs(rng, b, sq, sk, 4, 2, 8, dtype, grad=True)
    out, lse, _ = flash_attn_forward(q, k, v, causal=causal)
    check_types(dtype, out, lse)
    assert out.shape == q.shape and lse.shape == (b, 4, sq)
    assert (out == 0).all() and np.isneginf(lse).all()
    assert (flash_attn_func(q, k, v, causal=causal) == 0).all()
    grads = flash_attn_backward(dout, q, k, v, out, lse, causal=causal)
    for g, x in zip(grads, (q, k, v)):
        check_types(dtype, g)
        assert g.shape == x.shape and (g == 0).all()
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    assert (ref_out == 0).all() and np.isneginf(ref_lse).all()


def test_packed_layouts_and_return_attn_probs(rng):
    """flash_attn_qkvpacked_func / flash_attn_kvpacked_func are flash_attn_func on views of flash-attn's
    packed layouts (the same bits), return_attn_probs is return_lse's alias, and wrong packings raise
    naming the argument."""
    from flashcupy import flash_attn_kvpacked_func, flash_attn_qkvpacked_func

    qkv = rng.standard_normal((2, 19, 3, 4, 16)).astype(np.float32)
    q, k, v = (qkv[:, :, i] for i in range(3))
    want, lse = flash_attn_func(q, k, v, causal=True, softmax_scale=0.3, return_lse=True)
    np.testing.assert_array_equal(flash_attn_qkvpacked_func(qkv, 0.0, 0.3, True), want)
    got, got_lse = flash_attn_qkvpacked_func(qkv, softmax_scale=0.3, causal=True, return_attn_probs=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_lse, lse)
    assert_forward_rule(got, got_lse, q, k, v, causal=True, softmax_scale=0.3)
    kv = rng.standard_normal((2, 23, 2, 2, 16)).astype(np.float32)
    np.testing.assert_array_equal(flash_attn_kvpacked_func(q, kv, causal=True),
                                  flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True))
    with pytest.raises(ValueError, match=r"qkv: expected shape \(batch, seqlen, 3, nheads, head_dim\)"):
        flash_attn_qkvpacked_func(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"kv: expected shape \(batch, seqlen, 2, nheads_k, head_dim\)"):
        flash_attn_kvpacked_func(q, kv[..., 0])
    with pytest.raises(TypeError, match="qkv"):
        flash_attn_qkvpacked_func([1, 2, 3])
    with pytest.raises(TypeError, match="return_attn_probs"):
        flash_attn_func(q, k, v, return_attn_probs=1)
