"""float32 with allow_tf32=True: the TF32 tensor-core kernels (cuda/flash_dmma_*.cu with elem float,
mma.sync m16n8k8 .tf32, sm_80+) on a GPU, against the float64 oracle.

The rule is DESIGN.md's with T = float32 with TF32 products (helpers, tf32=True): err_naive from naive
attention whose every matmul rounds both operands to TF32 (cvt.rna) and accumulates in float32, what
torch computes with allow_tf32. allow_tf32 only changes CuPy float32 inputs with head_dim <= 256, no
dropout and no block mask; everything else must give the same bits as allow_tf32=False. The TF32
backward has no atomics: bitwise reproducible with deterministic=False too.
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (assert_backward_rule, assert_dropout_rule, assert_forward_rule, assert_no_out_of_bounds_reads,
                     bhsd_view, max_abs_err, random_inputs, same_bits, to_gpu, to_numpy)

import flashcupy
from flashcupy._arrays import bfloat16
from flashcupy._configs import HEAD_DIM_BUCKETS
from flashcupy.interface import kernel_path

pytestmark = pytest.mark.gpu

F32 = np.dtype(np.float32)
SEQLENS = (1, 17, 113, 1023)
TF32_PATH = "fused fp32 (TF32 tensor cores)"


def _cp():
    import cupy

    return cupy


def _arch() -> int:
    from flashcupy import _gpu_simt

    return _gpu_simt._arch()


def _needs_tf32_cores():
    """Tests that rely on the TF32 kernels themselves (below sm_80 allow_tf32 runs the exact kernels)."""
    if _arch() < 80:
        pytest.skip("TF32 tensor cores need sm_80+")


def fwd_bwd(q, k, v, dout, *, causal, deterministic=False, softmax_scale=None, allow_tf32=True):
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, allow_tf32=allow_tf32)
    grads = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal, deterministic=deterministic,
                                          softmax_scale=softmax_scale, allow_tf32=allow_tf32)
    return res.out, res.lse, grads


def assert_tf32_rule(out, lse, grads, dout, q, k, v, **kw):
    assert_forward_rule(out, lse, q, k, v, **kw, tf32=True)
    assert_backward_rule(grads, dout, q, k, v, **kw, tf32=True)


# ---------------------------------------------------------------------------------------------------
# against the oracle


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIM_BUCKETS)
def test_every_bucket(rng, head_dim, causal):
    q, k, v, dout = random_inputs(rng, 2, 113, 203, 4, 2, head_dim, F32, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=causal)
    assert isinstance(out, _cp().ndarray) and out.dtype == F32 and out.shape == q.shape
    assert lse.dtype == F32 and lse.shape == (2, 4, 113)
    assert all(g.dtype == F32 and g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    assert_tf32_rule(out, lse, grads, dout, q, k, v, causal=causal)


@given(
    batch=st.integers(1, 2),
    seqlen_q=st.sampled_from(SEQLENS) | st.integers(1, 300),
    seqlen_k=st.sampled_from(SEQLENS) | st.integers(1, 300),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]),
    head_dim=st.sampled_from([32, 64, 128, 40, 72]),
    causal=st.booleans(),
    bhsd=st.booleans(),
    deterministic=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
@example(batch=1, seqlen_q=1023, seqlen_k=300, heads=(2, 1), head_dim=128, causal=True, bhsd=False,
         deterministic=False, seed=1)
@example(batch=2, seqlen_q=1, seqlen_k=1023, heads=(4, 2), head_dim=64, causal=True, bhsd=True,
         deterministic=True, seed=2)
@example(batch=1, seqlen_q=17, seqlen_k=113, heads=(6, 2), head_dim=72, causal=False, bhsd=True,
         deterministic=False, seed=3)
@example(batch=2, seqlen_q=1, seqlen_k=1, heads=(3, 3), head_dim=40, causal=False, bhsd=False,
         deterministic=False, seed=4)
def test_matches_oracle(batch, seqlen_q, seqlen_k, heads, head_dim, causal, bhsd, deterministic, seed):
    rng = np.random.default_rng(seed)
    nheads, nheads_k = heads
    q, k, v, dout = random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, F32, grad=True)
    xs = to_gpu(q, k, v, dout)
    if bhsd:
        xs = [bhsd_view(x) for x in xs]
    out, lse, grads = fwd_bwd(*xs, causal=causal, deterministic=deterministic)
    assert_tf32_rule(out, lse, grads, dout, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 59, 100, 136, 200, 250])  # 136, 200: backward on the 192 / 256 kernels
def test_head_dims_between_buckets(rng, head_dim):
    q, k, v, dout = random_inputs(rng, 1, 77, 130, 2, 1, head_dim, F32, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=True)
    assert out.shape == q.shape and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    assert_tf32_rule(out, lse, grads, dout, q, k, v, causal=True)


def test_large_logits(rng):
    q, k, v, dout = random_inputs(rng, 2, 257, 311, 4, 4, 64, F32, amplitude=5.0, grad=True)
    for causal in (False, True):
        out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=causal)
        assert_tf32_rule(out, lse, grads, dout, q, k, v, causal=causal)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_empty_rows_give_zero_neg_inf_and_zero_grads(rng, deterministic):
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key.
    q, k, v, dout = random_inputs(rng, 2, 300, 70, 2, 1, 64, F32, grad=True)
    out, lse, (dq, dk, dv) = fwd_bwd(*to_gpu(q, k, v, dout), causal=True, deterministic=deterministic)
    out, lse, dq, dk, dv = (to_numpy(x) for x in (out, lse, dq, dk, dv))
    for x in (out, lse, dq, dk, dv):
        assert not np.isnan(x).any()
    assert (out[:, :230] == 0).all() and np.isneginf(lse[:, :, :230]).all()
    assert (dq[:, :230] == 0).all()
    assert np.isfinite(lse[:, :, 230:]).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert_tf32_rule(out, lse, (dq, dk, dv), dout, q, k, v, causal=True)


def test_softmax_scale_zero_is_mean_of_visible_values(rng):
    q, k, v, dout = random_inputs(rng, 1, 65, 65, 2, 2, 64, F32, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=True, softmax_scale=0.0)
    assert_tf32_rule(out, lse, grads, dout, q, k, v, causal=True, softmax_scale=0.0)


def test_cuda_graph_capture_and_replay(rng):
    """The TF32 call path never synchronises with the host either."""
    cp = _cp()
    q, k, v, dout = to_gpu(*random_inputs(rng, 2, 200, 300, 4, 2, 64, F32, grad=True))
    fwd_bwd(q, k, v, dout, causal=True)  # compile and allocate outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        out, lse, grads = fwd_bwd(q, k, v, dout, causal=True)
        graph = stream.end_capture()
        for x in (out, lse, *grads):
            x.fill(0)
        graph.launch(stream)
    stream.synchronize()
    host = [x.get() for x in (q, k, v, dout)]
    assert_tf32_rule(out, lse, grads, host[3], *host[:3], causal=True)


# ---------------------------------------------------------------------------------------------------
# memory safety and reproducibility


@pytest.mark.parametrize("head_dim", [64, 40])  # 40: the bucket-64 kernel, columns 40..63 must not be read
def test_no_out_of_bounds_reads(rng, head_dim):
    """q, k, v, dout, out, lse are views into larger NaN-filled buffers: no NaN may leak into any
    result, which must be bitwise equal to the run on compact copies (the TF32 backward has no
    atomics, so deterministic=False too)."""
    _needs_tf32_cores()
    q, k, v, dout = random_inputs(rng, 2, 131, 77, 4, 2, head_dim, F32, grad=True)
    tf32 = dict(allow_tf32=True)
    for causal in (False, True):
        ref, ref_g = assert_no_out_of_bounds_reads(q, k, v, dout, causal=causal, fwd_kw=tf32, bwd_kw=tf32)
        assert_tf32_rule(ref.out, ref.lse, ref_g, dout, q, k, v, causal=causal)


def test_repeat_forward_is_bitwise_equal(rng):
    q, k, v = to_gpu(*random_inputs(rng, 3, 517, 517, 4, 1, 128, F32))
    a = flashcupy.flash_attn_forward(q, k, v, causal=True, allow_tf32=True)
    b = flashcupy.flash_attn_forward(q, k, v, causal=True, allow_tf32=True)
    assert same_bits(a.out, b.out) and same_bits(a.lse, b.lse)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_bitwise_reproducible_without_deterministic(rng, causal):
    """No atomics in the TF32 backward: deterministic=False repeats bit for bit, and deterministic=True
    runs the same kernels (the same bits)."""
    _needs_tf32_cores()
    q, k, v, dout = to_gpu(*random_inputs(rng, 2, 700, 513, 4, 2, 64, F32, grad=True))
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, allow_tf32=True)
    first = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal, allow_tf32=True)
    for deterministic in (False, False, False, True):
        again = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal,
                                              deterministic=deterministic, allow_tf32=True)
        assert all(same_bits(a, b) for a, b in zip(first, again))


# ---------------------------------------------------------------------------------------------------
# where TF32 runs and where it does not


def test_kernel_path_names_the_tf32_kernels_only_where_they_run():
    _needs_tf32_cores()
    exact = kernel_path(F32, 64, on_gpu=True)
    assert exact == "fused fp32/fp64 (CUDA cores)"
    for head_dim in (*HEAD_DIM_BUCKETS, 8, 59, 250):
        assert kernel_path(F32, head_dim, on_gpu=True, allow_tf32=True) == TF32_PATH
        assert kernel_path(F32, head_dim, on_gpu=True, allow_tf32=False) == exact
    mask = flashcupy.blocksparse.BlockMask(np.ones((2, 2), dtype=bool))
    assert kernel_path(F32, 64, on_gpu=True, dropout_p=0.1, allow_tf32=True) == "chunked path on the GPU"
    assert kernel_path(F32, 64, on_gpu=True, block_mask=mask, allow_tf32=True) == "chunked path on the GPU"
    assert kernel_path(F32, 264, on_gpu=True, allow_tf32=True) == "chunked path on the GPU"
    assert kernel_path(F32, 64, on_gpu=False, allow_tf32=True) == "NumPy chunked path"
    others = [np.float16, np.float64] + ([bfloat16()] if bfloat16() is not None else [])
    for dtype in others:
        assert kernel_path(dtype, 64, on_gpu=True, allow_tf32=True) == kernel_path(dtype, 64, on_gpu=True)
        assert kernel_path(dtype, 64, on_gpu=True, allow_tf32=True) != TF32_PATH


def test_tf32_is_really_used(rng):
    """allow_tf32=True must be noticeably less accurate than the exact float32 kernels on the same
    inputs (TF32 keeps 10 of float32's 23 mantissa bits: ~1000x; a silent fallback gives ~1x)."""
    _needs_tf32_cores()
    from flashcupy import reference

    q, k, v, dout = random_inputs(rng, 2, 256, 256, 4, 4, 64, F32, grad=True)
    xs = to_gpu(q, k, v, dout)
    out_tf, lse_tf, grads_tf = fwd_bwd(*xs, causal=False, allow_tf32=True)
    out_ex, lse_ex, grads_ex = fwd_bwd(*xs, causal=False, allow_tf32=False)
    ref_out, _ = reference.attention_forward(q, k, v)
    refs = reference.attention_backward(dout, q, k, v)
    for name, tf, ex, ref in zip(("out", "dq", "dk", "dv"), (out_tf, *grads_tf), (out_ex, *grads_ex), (ref_out, *refs)):
        err_tf, err_ex = max_abs_err(tf, ref), max_abs_err(ex, ref)
        assert err_tf > 10 * err_ex, f"{name}: TF32 error {err_tf:.3e} vs exact {err_ex:.3e}: TF32 not used?"
    assert_tf32_rule(out_tf, lse_tf, grads_tf, dout, q, k, v)
    assert_forward_rule(out_ex, lse_ex, q, k, v)
    assert_backward_rule(grads_ex, dout, q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_falls_back_to_the_exact_path(rng, causal):
    """With dropout allow_tf32 is ignored: the same bits as allow_tf32=False, and the exact rule."""
    from flashcupy import dropout

    cp = _cp()
    b, sq, sk, h, hk, p, state = 2, 133, 211, 4, 2, 0.17, (987654321987, 42)
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, 64, F32, grad=True)
    xs = to_gpu(q, k, v, do)
    runs = []
    for allow_tf32 in (True, False):
        res = flashcupy.flash_attn_forward(*xs[:3], dropout_p=p, causal=causal, seed=state, allow_tf32=allow_tf32)
        grads = flashcupy.flash_attn_backward(xs[3], *xs[:3], res.out, res.lse, dropout_p=p, causal=causal,
                                              rng_state=res.rng_state, deterministic=True, allow_tf32=allow_tf32)
        runs.append((res.out, res.lse, *grads))
    assert all(same_bits(a, b) for a, b in zip(*runs))
    z = dropout.keep_mask(*state, b, h, sq, sk, p)
    assert_dropout_rule(runs[0][0], runs[0][2:], do, q, k, v, z, dropout.effective_dropout_p(p), causal=causal)
    assert isinstance(runs[0][0], cp.ndarray)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_falls_back_to_the_exact_path(rng, causal):
    """With a block mask allow_tf32 is ignored: the same bits as allow_tf32=False, and the exact rule."""
    from flashcupy import blocksparse as bs

    cp = _cp()
    sq, sk = 300, 260
    q, k, v, do = random_inputs(rng, 2, sq, sk, 4, 2, 64, F32, grad=True)
    m = rng.random((4, -(-sq // 64), -(-sk // 128))) < 0.6
    m[:, 1, :] = False  # a query block with no key: empty rows
    mask = bs.BlockMask(cp.asarray(m), 64, 128)
    em = to_numpy(mask.element_mask(sq, sk, xp=cp))
    xs = to_gpu(q, k, v, do)
    runs = []
    for allow_tf32 in (True, False):
        res = flashcupy.flash_attn_forward(*xs[:3], causal=causal, block_mask=mask, allow_tf32=allow_tf32)
        grads = flashcupy.flash_attn_backward(xs[3], *xs[:3], res.out, res.lse, causal=causal, block_mask=mask,
                                              deterministic=True, allow_tf32=allow_tf32)
        runs.append((res.out, res.lse, *grads))
    assert all(same_bits(a, b) for a, b in zip(*runs))
    out, lse, *grads = runs[0]
    assert_forward_rule(out, lse, q, k, v, causal=causal, mask=em)
    assert_backward_rule(grads, do, q, k, v, causal=causal, mask=em)


def _other_dtypes():
    return [np.dtype(np.float16), np.dtype(np.float64)] + ([bfloat16()] if bfloat16() is not None else [])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", _other_dtypes(), ids=str)
def test_other_dtypes_ignore_allow_tf32(rng, dtype, head_dim):
    """float16 / bfloat16 / float64 inputs: allow_tf32=True gives the bits of allow_tf32=False."""
    q, k, v, dout = to_gpu(*random_inputs(rng, 2, 150, 97, 4, 2, head_dim, dtype, grad=True))
    for causal in (False, True):
        a = fwd_bwd(q, k, v, dout, causal=causal, deterministic=True, allow_tf32=True)
        b = fwd_bwd(q, k, v, dout, causal=causal, deterministic=True, allow_tf32=False)
        assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
        assert all(same_bits(x, y) for x, y in zip(a[2], b[2]))


def test_numpy_inputs_and_large_head_dims_ignore_allow_tf32(rng):
    """NumPy float32 (the CPU path), NumPy float64 (sent to the float64 kernel) and CuPy float32 with
    head_dim > 256 (the chunked path on the GPU) give the bits of allow_tf32=False."""
    cases = [random_inputs(rng, 1, 40, 50, 2, 1, 64, np.float32, grad=True),
             random_inputs(rng, 1, 40, 50, 2, 1, 64, np.float64, grad=True),
             to_gpu(*random_inputs(rng, 1, 40, 50, 2, 1, 264, np.float32, grad=True))]
    for q, k, v, dout in cases:
        a = fwd_bwd(q, k, v, dout, causal=True, deterministic=True, allow_tf32=True)
        b = fwd_bwd(q, k, v, dout, causal=True, deterministic=True, allow_tf32=False)
        for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
            assert type(x) is type(y)
            x, y = (np.ascontiguousarray(to_numpy(a)) for a in (x, y))
            assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


# ---------------------------------------------------------------------------------------------------
# every TF32 configuration, by config override (the chooser's for every bucket: the 160 / 224 buckets
# run the 192 / 256 backward kernels)


def _cfg_id(name):
    return name.split("<", 1)[1][:-1]


def _tf32_fwd_configs():
    from flashcupy import _configs

    return list(_configs.all_tf32_fwd_specializations())


def _tf32_bwd_configs():
    from flashcupy import _configs

    return list(_configs.all_tf32_bwd_specializations())


@pytest.mark.parametrize("cfg", _tf32_fwd_configs(), ids=lambda c: _cfg_id(c.kernel_name()))
def test_tf32_forward_every_config(rng, cfg):
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    _needs_tf32_cores()
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, F32)
        xs = to_gpu(q, k, v)
        for causal in (False, True):
            out, lse = _gpu_simt.forward(*xs, check_qkv(*xs), causal=causal, config=cfg)
            assert out.dtype == F32 and lse.dtype == F32
            assert_forward_rule(out, lse, q, k, v, causal=causal, tf32=True)


@pytest.mark.parametrize("cfg", _tf32_bwd_configs(),
                         ids=lambda c: _cfg_id(c.kv_kernel_name()) + "+" + _cfg_id(c.dq_kernel_name()))
def test_tf32_backward_every_config(rng, cfg):
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    _needs_tf32_cores()
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v, dout = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, F32, grad=True)
        xs = to_gpu(q, k, v, dout)
        shape = check_qkv(*xs[:3])
        for causal in (False, True):
            res = flashcupy.flash_attn_forward(*xs[:3], causal=causal, allow_tf32=True)
            grads = _gpu_simt.backward(xs[3], *xs[:3], res.out, res.lse, shape, causal=causal, deterministic=False,
                                       config=cfg)
            assert all(g.dtype == F32 for g in grads)
            assert_backward_rule(grads, dout, q, k, v, causal=causal, tf32=True)
