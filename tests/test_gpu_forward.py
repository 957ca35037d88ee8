"""The fused fp16/bf16 forward kernel on a GPU, against the float64 oracle (DESIGN.md's rule)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import assert_forward_rule, bhsd_view, nan_padded, random_inputs, to_gpu, to_numpy

import flashcupy
from flashcupy._arrays import bfloat16
from flashcupy._configs import HEAD_DIM_BUCKETS

pytestmark = pytest.mark.gpu

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])
SEQLENS = (1, 17, 113, 1023, 2049)


def _cp():
    import cupy

    return cupy




@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_specialization(rng, dtype, head_dim, causal):
    q, k, v = random_inputs(rng, 2, 113, 203, 4, 2, head_dim, dtype)
    out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=causal)
    assert isinstance(out, _cp().ndarray) and out.dtype == dtype and lse.dtype == np.float32
    assert_forward_rule(out, lse, q, k, v, causal=causal)


@given(
    batch=st.integers(1, 2),
    seqlen_q=st.sampled_from(SEQLENS) | st.integers(1, 300),
    seqlen_k=st.sampled_from(SEQLENS) | st.integers(1, 300),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    head_dim=st.sampled_from([32, 64, 128, 40]),
    causal=st.booleans(),
    bhsd=st.booleans(),
    dtype=st.sampled_from(HALF_DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
@example(batch=1, seqlen_q=2049, seqlen_k=1023, heads=(2, 1), head_dim=128, causal=True, bhsd=False,
         dtype=HALF_DTYPES[-1], seed=1)
@example(batch=2, seqlen_q=1, seqlen_k=2049, heads=(4, 2), head_dim=64, causal=True, bhsd=True,
         dtype=HALF_DTYPES[0], seed=2)
def test_forward_matches_oracle(batch, seqlen_q, seqlen_k, heads, head_dim, causal, bhsd, dtype, seed):
    rng = np.random.default_rng(seed)
    nheads, nheads_k = heads
    q, k, v = random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype)
    qg, kg, vg = to_gpu(q, k, v)
    if bhsd:
        qg, kg, vg = (bhsd_view(x) for x in (qg, kg, vg))
    out, lse, _ = flashcupy.flash_attn_forward(qg, kg, vg, causal=causal)
    assert_forward_rule(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_large_logits(rng, dtype):
    q, k, v = random_inputs(rng, 2, 257, 311, 4, 4, 64, dtype, amplitude=5.0)
    for causal in (False, True):
        out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=causal)
        assert_forward_rule(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 40, 59, 100, 136, 250])
def test_head_dims_between_buckets(rng, head_dim):
    q, k, v = random_inputs(rng, 1, 77, 130, 2, 1, head_dim, np.float16)
    out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=True)
    assert out.shape == q.shape
    assert_forward_rule(out, lse, q, k, v, causal=True)


def test_empty_rows_give_zero_and_neg_inf(rng):
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key.
    q, k, v = random_inputs(rng, 2, 300, 70, 2, 1, 64, np.float16)
    out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=True)
    out, lse = to_numpy(out), to_numpy(lse)
    assert not np.isnan(out.astype(np.float32)).any()
    assert (out[:, :230] == 0).all() and np.isneginf(lse[:, :, :230]).all()
    assert np.isfinite(lse[:, :, 230:]).all()
    assert_forward_rule(out, lse, q, k, v, causal=True)


def test_softmax_scale_zero_is_mean_of_visible_values(rng):
    q, k, v = random_inputs(rng, 1, 65, 65, 2, 2, 64, np.float16)
    out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=True, softmax_scale=0.0)
    assert_forward_rule(out, lse, q, k, v, causal=True, softmax_scale=0.0)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_no_out_of_bounds_reads(rng, dtype):
    """q, k, v are views into larger NaN-filled buffers: no NaN may leak into the output, which must
    be bitwise equal to the run on compact copies."""
    cp = _cp()
    b, sq, sk, h, hk, d = 2, 131, 77, 4, 2, 64
    q, k, v = random_inputs(rng, b, sq, sk, h, hk, d, dtype)

    for causal in (False, True):
        ref_out, ref_lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=causal)
        out, lse, _ = flashcupy.flash_attn_forward(*(nan_padded(x) for x in (q, k, v)), causal=causal)
        out_np = to_numpy(out).astype(np.float32)
        assert not np.isnan(out_np).any()
        assert cp.array_equal(out.view(cp.uint16), ref_out.view(cp.uint16))
        assert cp.array_equal(lse, ref_lse)


def test_repeat_is_bitwise_equal(rng):
    cp = _cp()
    q, k, v = to_gpu(*random_inputs(rng, 3, 517, 517, 4, 1, 128, np.float16))
    a = flashcupy.flash_attn_forward(q, k, v, causal=True)
    b = flashcupy.flash_attn_forward(q, k, v, causal=True)
    assert cp.array_equal(a.out.view(cp.uint16), b.out.view(cp.uint16))
    assert cp.array_equal(a.lse, b.lse)


def test_cuda_graph_capture_and_replay(rng):
    """The call path never synchronises with the host, so it can be captured and replayed."""
    cp = _cp()
    q, k, v = to_gpu(*random_inputs(rng, 2, 200, 300, 4, 2, 64, np.float16))
    flashcupy.flash_attn_forward(q, k, v, causal=True)  # compile and allocate outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        res = flashcupy.flash_attn_forward(q, k, v, causal=True)
        graph = stream.end_capture()
        res.out.fill(0)
        res.lse.fill(0)
        graph.launch(stream)
    stream.synchronize()
    assert_forward_rule(res.out, res.lse, q.get(), k.get(), v.get(), causal=True)


def test_dlpack_inputs_zero_copy(rng, monkeypatch):
    """torch CUDA tensors reach the kernel launch as CuPy views of torch's own memory: the launcher sees
    torch's data pointers, kernel_ready takes them as they are (no copy), and the result passes the rule."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from flashcupy import _gpu

    q, k, v = random_inputs(rng, 1, 100, 120, 2, 2, 64, np.float16)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    seen = []
    launch = _gpu.forward

    def recording_forward(q_, k_, v_, shape, **kw):
        seen.append([(int(x.data.ptr), x.shape, x is _gpu.kernel_ready(x, shape.head_dim)) for x in (q_, k_, v_)])
        return launch(q_, k_, v_, shape, **kw)

    monkeypatch.setattr(_gpu, "forward", recording_forward)
    out = flashcupy.flash_attn_func(tq, tk, tv, causal=True)
    torch.cuda.synchronize()
    assert len(seen) == 1, "the fp16 call did not reach flashcupy._gpu.forward"
    for (ptr, shape, in_place), t in zip(seen[0], (tq, tk, tv)):
        assert ptr == t.data_ptr() and shape == tuple(t.shape) and in_place
    assert isinstance(out, _cp().ndarray)
    assert_forward_rule(out, None, q, k, v, causal=True)
    # cupy.from_dlpack (flashcupy._arrays.array_module's conversion) shares torch's memory: torch's write shows
    view = _cp().from_dlpack(tq)
    tq.zero_()
    torch.cuda.synchronize()
    assert int(view.data.ptr) == tq.data_ptr() and not bool(_cp().any(view))
