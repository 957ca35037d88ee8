"""The Hopper (sm_90a, wgmma + TMA) forward on a GPU of compute capability 9.0, against the float64
oracle under DESIGN.md's rule; and the launcher's choice of it. Skipped on other GPUs."""

import numpy as np
import pytest
from helpers import assert_dropout_rule, assert_forward_rule, random_inputs, to_gpu

import flashcupy
from flashcupy._arrays import bfloat16

pytestmark = pytest.mark.gpu

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])


def _sm90():
    import cupy

    return int(cupy.cuda.Device().compute_capability) == 90


@pytest.fixture(autouse=True)
def _only_sm90():
    if not _sm90():
        pytest.skip("needs a GPU of compute capability 9.0 (H100/H200)")


def _forward_sm90(q, k, v, config=None, **kw):
    """flashcupy._gpu_sm90.forward through flashcupy._gpu.forward's preparation, forced."""
    from flashcupy import _gpu, _gpu_sm90
    from flashcupy._validate import check_qkv

    shape = check_qkv(q, k, v, kw.pop("softmax_scale", None))
    causal = kw.pop("causal", False)
    return _gpu.forward(q, k, v, shape, causal=causal, config=config or _gpu_sm90.config_for(shape.head_dim, causal))


def _sweep():
    from flashcupy import _gpu_sm90

    return _gpu_sm90.SWEEP


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", _sweep(), ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_specialization(rng, dtype, config, causal):
    q, k, v = random_inputs(rng, 2, 300, 421, 4, 2, config.head_dim, dtype)
    out, lse = _forward_sm90(*to_gpu(q, k, v), config=config, causal=causal)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert_forward_rule(out, lse, q, k, v, causal=causal)


# The hypothesis suite of tests/test_gpu_forward.py (shapes, GQA, BHSD views, NaN padding, empty rows)
# runs on this path on an H100/H200 through the public API (dispatch picks it; the test below checks).


def test_public_forward_takes_the_sm90_path(rng, monkeypatch):
    """flash_attn_forward on an H100/H200 runs the wgmma kernel for fp16/bf16 without dropout or a
    block mask, and the same answer comes back with FLASHCUPY_SM90=0 (the mma.sync family) within the rule."""
    from flashcupy import _gpu_sm90

    from flashcupy._device import current_device_info

    if _gpu_sm90.plan_config(128, current_device_info(), causal=True) is None:  # e.g. FLASHCUPY_SMEM_LIMIT_KB=99
        pytest.skip("this device (or its shared-memory cap) does not run the sm_90a kernel at head_dim 128")
    calls = []
    real = _gpu_sm90.forward
    monkeypatch.setattr(_gpu_sm90, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = random_inputs(rng, 1, 257, 257, 2, 2, 128, HALF_DTYPES[-1])
    out, lse, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=True)
    assert calls, "the sm_90a forward was not used"
    assert_forward_rule(out, lse, q, k, v, causal=True)
    calls.clear()
    monkeypatch.setenv("FLASHCUPY_SM90", "0")
    out2, lse2, _ = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=True)
    assert not calls
    assert_forward_rule(out2, lse2, q, k, v, causal=True)


def test_zero_softmax_scale_and_empty_rows(rng):
    """softmax_scale 0 (uniform weights) and causal rows with no visible key (seqlen_q > seqlen_k:
    out 0, lse -inf), as the other families."""
    q, k, v = random_inputs(rng, 1, 200, 70, 2, 2, 64, HALF_DTYPES[0])
    out, lse = _forward_sm90(*to_gpu(q, k, v), causal=True)
    assert_forward_rule(out, lse, q, k, v, causal=True)
    assert np.isneginf(lse.get()[:, :, :130]).all() and not np.asarray(out.get()[:, :130]).any()
    out, lse = _forward_sm90(*to_gpu(q, k, v), softmax_scale=0.0)
    assert_forward_rule(out, lse, q, k, v, softmax_scale=0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_graph_capture_and_streams(rng, causal):
    """The launch stays on CuPy's current stream with no host synchronisation: captured into a CUDA
    graph on a non-default stream (tensor maps are kernel parameters, captured by value), its outputs
    zeroed, the replay gives the eager call's bits; a bitwise repeat on another stream too."""
    import cupy as cp

    q, k, v = to_gpu(*random_inputs(rng, 2, 333, 517, 4, 2, 128, HALF_DTYPES[-1]))
    want = flashcupy.flash_attn_forward(q, k, v, causal=causal)  # compiles outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            got = flashcupy.flash_attn_forward(q, k, v, causal=causal)
        finally:
            graph = stream.end_capture()
        got.out.fill(0)
        got.lse.fill(0)
        graph.launch(stream)
    stream.synchronize()
    assert cp.array_equal(got.out.view(cp.uint16), want.out.view(cp.uint16))
    assert cp.array_equal(got.lse, want.lse)
    with cp.cuda.Stream(non_blocking=True) as other:
        again = flashcupy.flash_attn_forward(q, k, v, causal=causal)
    other.synchronize()
    assert cp.array_equal(again.out.view(cp.uint16), want.out.view(cp.uint16))


def _chosen_configs():
    from flashcupy import _gpu_sm90

    return sorted({cfg for *_, drop, cfg in _gpu_sm90.all_specializations(dropout=True) if drop}, key=str)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", _chosen_configs(), ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_dropout_keep_bits_are_flashcupy_dropouts(rng, dtype, config, causal):
    """Fused dropout on this path (forced; not yet dispatched): DESIGN.md's rule against the oracle given
    the keep-mask regenerated by flashcupy.dropout.keep_mask (the keep bits are the mma.sync forward's)."""
    from flashcupy import _gpu, dropout
    from flashcupy._validate import check_qkv

    b, sq, sk, h, hk, p, state = 2, 133, 211, 4, 2, 0.17, (987654321987, 42)
    q, k, v = random_inputs(rng, b, sq, sk, h, hk, config.head_dim, dtype)
    qg, kg, vg = to_gpu(q, k, v)
    out, _ = _gpu.forward(qg, kg, vg, check_qkv(qg, kg, vg, None, p), causal=causal, dropout=(p, state), config=config)
    z = dropout.keep_mask(*state, b, h, sq, sk, p)
    assert_dropout_rule(out, None, q, q, k, v, z, dropout.effective_dropout_p(p), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_on_the_sm90_path(rng, causal):
    """A block mask of whole 128 x 128 tiles on this path (forced; not yet dispatched): the rule against
    the oracle with the element mask the blocks imply; blocks that are not whole tiles raise ValueError."""
    from flashcupy import _gpu, _gpu_sm90
    from flashcupy import blocksparse as bs
    from flashcupy._validate import check_qkv

    sq, sk = 517, 389
    q, k, v = random_inputs(rng, 2, sq, sk, 4, 2, 128, HALF_DTYPES[-1])
    blocks = np.random.default_rng(3).random((-(-sq // 128), -(-sk // 256))) < 0.6
    blocks[:, 0] = True
    mask = bs.BlockMask(blocks, 128, 256)
    qg, kg, vg = to_gpu(q, k, v)
    cfg = _gpu_sm90.config_for(128, causal)
    out, lse = _gpu.forward(qg, kg, vg, check_qkv(qg, kg, vg), causal=causal, block_mask=mask, config=cfg)
    element = np.repeat(np.repeat(blocks, 128, axis=0), 256, axis=1)[:sq, :sk]
    assert_forward_rule(out, lse, q, k, v, causal=causal, mask=element)
    with pytest.raises(ValueError, match="whole"):
        _gpu.forward(qg, kg, vg, check_qkv(qg, kg, vg), causal=causal, block_mask=bs.BlockMask(blocks, 64, 256),
                     config=cfg)
