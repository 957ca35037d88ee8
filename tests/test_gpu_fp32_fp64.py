"""The fused float32 / float64 kernels (cuda/flash_simt_*.cu; float64 on sm_80+: cuda/flash_dmma_*.cu)
on a GPU, against the float64 oracle.

float32 follows DESIGN.md's rule (2x / 3x naive float32 error plus a few ulps); float64 must be within
1e-12 relative error on the output, the LSE and every gradient (helpers implement both rules).
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (assert_backward_rule, assert_forward_rule, assert_no_out_of_bounds_reads, bhsd_view, random_inputs,
                     same_bits, sweep_candidates, to_gpu, to_numpy)

import flashcupy
from flashcupy._configs import HEAD_DIM_BUCKETS

pytestmark = pytest.mark.gpu

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
SEQLENS = (1, 17, 113, 1023)


def _cp():
    import cupy

    return cupy




def fwd_bwd(q, k, v, dout, *, causal, deterministic=False, softmax_scale=None):
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
    grads = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal,
                                          deterministic=deterministic, softmax_scale=softmax_scale)
    return res.out, res.lse, grads


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIM_BUCKETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_specialization(rng, dtype, head_dim, causal, deterministic):
    q, k, v, dout = random_inputs(rng, 2, 113, 203, 4, 2, head_dim, dtype, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=causal, deterministic=deterministic)
    assert isinstance(out, _cp().ndarray) and out.dtype == dtype and lse.dtype == dtype
    assert all(g.dtype == dtype and g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    assert_forward_rule(out, lse, q, k, v, causal=causal)
    assert_backward_rule(grads, dout, q, k, v, causal=causal)


@given(
    batch=st.integers(1, 2),
    seqlen_q=st.sampled_from(SEQLENS) | st.integers(1, 300),
    seqlen_k=st.sampled_from(SEQLENS) | st.integers(1, 300),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]),
    head_dim=st.sampled_from([32, 64, 128, 40]),
    causal=st.booleans(),
    bhsd=st.booleans(),
    deterministic=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
@example(batch=1, seqlen_q=1023, seqlen_k=300, heads=(2, 1), head_dim=128, causal=True, bhsd=False,
         deterministic=False, dtype=DTYPES[0], seed=1)
@example(batch=2, seqlen_q=1, seqlen_k=1023, heads=(4, 2), head_dim=64, causal=True, bhsd=True,
         deterministic=True, dtype=DTYPES[1], seed=2)
@example(batch=1, seqlen_q=17, seqlen_k=113, heads=(6, 2), head_dim=40, causal=False, bhsd=True,
         deterministic=False, dtype=DTYPES[1], seed=3)
def test_matches_oracle(batch, seqlen_q, seqlen_k, heads, head_dim, causal, bhsd, deterministic, dtype, seed):
    rng = np.random.default_rng(seed)
    nheads, nheads_k = heads
    q, k, v, dout = random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, grad=True)
    xs = to_gpu(q, k, v, dout)
    if bhsd:
        xs = [bhsd_view(x) for x in xs]
    out, lse, grads = fwd_bwd(*xs, causal=causal, deterministic=deterministic)
    assert_forward_rule(out, lse, q, k, v, causal=causal)
    assert_backward_rule(grads, dout, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 59, 100, 136, 250])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims_between_buckets(rng, dtype, head_dim):
    q, k, v, dout = random_inputs(rng, 1, 77, 130, 2, 1, head_dim, dtype, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=True)
    assert out.shape == q.shape
    assert_forward_rule(out, lse, q, k, v, causal=True)
    assert_backward_rule(grads, dout, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits(rng, dtype):
    q, k, v, dout = random_inputs(rng, 2, 257, 311, 4, 4, 64, dtype, amplitude=5.0, grad=True)
    for causal in (False, True):
        out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=causal)
        assert_forward_rule(out, lse, q, k, v, causal=causal)
        assert_backward_rule(grads, dout, q, k, v, causal=causal)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_give_zero_neg_inf_and_zero_grads(rng, dtype, deterministic):
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key.
    q, k, v, dout = random_inputs(rng, 2, 300, 70, 2, 1, 64, dtype, grad=True)
    out, lse, (dq, dk, dv) = fwd_bwd(*to_gpu(q, k, v, dout), causal=True, deterministic=deterministic)
    out, lse, dq = to_numpy(out), to_numpy(lse), to_numpy(dq)
    for x in (out, lse, dq, to_numpy(dk), to_numpy(dv)):
        assert not np.isnan(x).any()
    assert (out[:, :230] == 0).all() and np.isneginf(lse[:, :, :230]).all()
    assert (dq[:, :230] == 0).all()
    assert np.isfinite(lse[:, :, 230:]).all()
    assert_forward_rule(out, lse, q, k, v, causal=True)
    assert_backward_rule((dq, dk, dv), dout, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_scale_zero_is_mean_of_visible_values(rng, dtype):
    q, k, v, dout = random_inputs(rng, 1, 65, 65, 2, 2, 64, dtype, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=True, softmax_scale=0.0)
    assert_forward_rule(out, lse, q, k, v, causal=True, softmax_scale=0.0)
    assert_backward_rule(grads, dout, q, k, v, causal=True, softmax_scale=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_out_of_bounds_reads(rng, dtype):
    """q, k, v, dout, out, lse are views into larger NaN-filled buffers: no NaN may leak into any
    result, which must be bitwise equal to the run on compact copies (deterministic backward)."""
    q, k, v, dout = random_inputs(rng, 2, 131, 77, 4, 2, 64, dtype, grad=True)
    for causal in (False, True):
        assert_no_out_of_bounds_reads(q, k, v, dout, causal=causal, bwd_kw=dict(deterministic=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeat_is_bitwise_equal(rng, dtype):
    q, k, v = to_gpu(*random_inputs(rng, 3, 517, 517, 4, 1, 128, dtype))
    a = flashcupy.flash_attn_forward(q, k, v, causal=True)
    b = flashcupy.flash_attn_forward(q, k, v, causal=True)
    assert same_bits(a.out, b.out) and same_bits(a.lse, b.lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_backward_is_bitwise_reproducible(rng, dtype, causal):
    q, k, v, dout = to_gpu(*random_inputs(rng, 2, 700, 513, 4, 2, 64, dtype, grad=True))
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal)
    first = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal, deterministic=True)
    for _ in range(4):
        again = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=causal, deterministic=True)
        assert all(same_bits(a, b) for a, b in zip(first, again))


def test_numpy_float64_runs_on_the_gpu_when_opted_in_and_returns_numpy(rng, monkeypatch):
    """NumPy float64 stays on the CPU path by default; with interface.NUMPY_FLOAT64_ON_GPU = True it runs
    the GPU's float64 kernels and comes back as NumPy."""
    from flashcupy import _gpu_simt, interface

    calls = []
    for name in ("forward", "backward"):
        fn = getattr(_gpu_simt, name)
        monkeypatch.setattr(_gpu_simt, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    q, k, v, dout = random_inputs(rng, 2, 90, 150, 4, 2, 64, np.float64, grad=True)
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", False)
    flashcupy.flash_attn_forward(q, k, v, causal=True)
    assert calls == []
    monkeypatch.setattr(interface, "NUMPY_FLOAT64_ON_GPU", True)
    res = flashcupy.flash_attn_forward(q, k, v, causal=True)
    grads = flashcupy.flash_attn_backward(dout, q, k, v, res.out, res.lse, causal=True)
    assert calls == ["forward", "backward"]
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float64 for x in (res.out, res.lse, *grads))
    assert_forward_rule(res.out, res.lse, q, k, v, causal=True)
    assert_backward_rule(grads, dout, q, k, v, causal=True)


def test_cuda_graph_capture_and_replay(rng):
    """The call path never synchronises with the host, so it can be captured and replayed."""
    cp = _cp()
    q, k, v, dout = to_gpu(*random_inputs(rng, 2, 200, 300, 4, 2, 64, np.float32, grad=True))
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
    assert_forward_rule(out, lse, *host[:3], causal=True)
    assert_backward_rule(grads, host[3], *host[:3], causal=True)


# ---------------------------------------------------------------------------------------------------
# float64 on the FP64 tensor cores (cuda/flash_dmma_*.cu): every configuration the chooser can return
# on sm_80 (m8n8k4) and sm_90 (m16n8k16), plus the m16n8k8 variants, run by config override.

def _dmma_variants(configs, katom_fields):
    import dataclasses

    out = []
    for cfg in configs:
        out.append(cfg)
        for field in katom_fields:
            if getattr(cfg, field) == 16:
                alt = dataclasses.replace(cfg, **{field: 8})
                if alt not in out:
                    out.append(alt)
    return out


def _dmma_fwd_configs():
    from flashcupy import _configs

    return _dmma_variants(_configs.all_dmma_fwd_specializations(), ["katom"])


def _dmma_bwd_configs():
    from flashcupy import _configs

    return _dmma_variants(_configs.all_dmma_bwd_specializations(), ["kv_katom", "dq_katom"])


def _skip_unless_arch(katoms):
    from flashcupy import _gpu_simt

    arch = _gpu_simt._arch()
    if arch < 80:
        pytest.skip("DMMA needs sm_80+")
    if max(katoms) > 4 and arch < 90:
        pytest.skip("m16n8k8 / m16n8k16 .f64 need sm_90")


@pytest.mark.parametrize("cfg", _dmma_fwd_configs(), ids=lambda c: c.kernel_name().split("<", 1)[1][:-1])
def test_dmma_forward_every_config(rng, cfg):
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    _skip_unless_arch([cfg.katom])
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, np.float64)
        xs = to_gpu(q, k, v)
        for causal in (False, True):
            out, lse = _gpu_simt.forward(*xs, check_qkv(*xs), causal=causal, config=cfg)
            assert_forward_rule(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("cfg", _dmma_bwd_configs(),
                         ids=lambda c: c.kv_kernel_name().split("<", 1)[1][:-1] + "+dq" + str(c.dq_katom))
def test_dmma_backward_every_config(rng, cfg):
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    _skip_unless_arch([cfg.kv_katom, cfg.dq_katom])
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v, dout = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, np.float64, grad=True)
        xs = to_gpu(q, k, v, dout)
        shape = check_qkv(*xs[:3])
        for causal in (False, True):
            res = flashcupy.flash_attn_forward(*xs[:3], causal=causal)
            grads = _gpu_simt.backward(xs[3], *xs[:3], res.out, res.lse, shape, causal=causal, deterministic=False,
                                       config=cfg)
            assert_backward_rule(grads, dout, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim,bwd_kernel", [(64, "flash_dmma_bwd_kv_kernel"), (200, "flash_simt_bwd_kv_kernel")])
def test_float64_runs_on_the_tensor_cores_from_sm80(rng, monkeypatch, head_dim, bwd_kernel):
    """A public float64 call on this GPU launches the FP64 tensor-core kernels (the backward above head_dim
    160 the DFMA kernels), as recorded at flashcupy._gpu_simt's launch; the results pass the rule. (Which
    config the choosers return for each arch is checked without a GPU: tests/test_compile_simt.py.)"""
    from flashcupy import _device, _gpu_simt

    if _device.current_device_info().cc < 80:
        pytest.skip("below sm_80 float64 runs the chunked path")
    launched = []
    launch = _gpu_simt._launch

    def recording_launch(filename, name, *args):
        launched.append(name)
        return launch(filename, name, *args)

    monkeypatch.setattr(_gpu_simt, "_launch", recording_launch)
    q, k, v, dout = random_inputs(rng, 2, 113, 203, 4, 2, head_dim, np.float64, grad=True)
    out, lse, grads = fwd_bwd(*to_gpu(q, k, v, dout), causal=True)
    kernels = [name.split("<", 1)[0] for name in launched]
    assert kernels[0] == "flash_dmma_fwd_kernel" and bwd_kernel in kernels[1:], kernels
    assert_forward_rule(out, lse, q, k, v, causal=True)
    assert_backward_rule(grads, dout, q, k, v, causal=True)


def _fits_smem(nbytes):
    import cupy

    dev = cupy.cuda.Device()
    return nbytes <= dev.attributes["MaxSharedMemoryPerBlockOptin"]


@pytest.mark.parametrize("cfg", sweep_candidates()[0], ids=lambda c: c.kernel_name().split("<", 2)[2][:-2])
def test_float32_forward_sweep_candidates(rng, cfg):
    """Every float32 config bench_simt.py --sweep times, against the oracle before its time counts."""
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    if not _fits_smem(cfg.smem_bytes):
        pytest.skip(f"{cfg.smem_bytes} B of shared memory")
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, np.float32)
        xs = to_gpu(q, k, v)
        for causal in (False, True):
            out, lse = _gpu_simt.forward(*xs, check_qkv(*xs), causal=causal, config=cfg)
            assert_forward_rule(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("cfg", sweep_candidates()[1],
                         ids=lambda c: c.kv_kernel_name().split("<", 2)[2][:-2] + "+" + c.dq_kernel_name().split("<", 2)[2][:-2])
def test_dmma_backward_sweep_candidates(rng, cfg):
    """Every float64 DMMA backward config bench_simt.py --sweep times (single-buffered Q/dO included)."""
    from flashcupy import _gpu_simt
    from flashcupy._validate import check_qkv

    _skip_unless_arch([cfg.kv_katom, cfg.dq_katom])
    if not _fits_smem(max(cfg.kv_smem_bytes, cfg.dq_smem_bytes)):
        pytest.skip(f"{max(cfg.kv_smem_bytes, cfg.dq_smem_bytes)} B of shared memory")
    for head_dim, (sq, sk) in ((cfg.head_dim, (113, 203)), (cfg.head_dim - 8, (203, 77))):
        q, k, v, dout = random_inputs(rng, 2, sq, sk, 4, 2, head_dim, np.float64, grad=True)
        xs = to_gpu(q, k, v, dout)
        shape = check_qkv(*xs[:3])
        for causal in (False, True):
            res = flashcupy.flash_attn_forward(*xs[:3], causal=causal)
            grads = _gpu_simt.backward(xs[3], *xs[:3], res.out, res.lse, shape, causal=causal, deterministic=False,
                                       config=cfg)
            assert_backward_rule(grads, dout, q, k, v, causal=causal)
