"""The Hopper (sm_90a, wgmma + TMA) backward on a GPU of compute capability 9.0, against the float64
oracle's gradients under DESIGN.md's rule; and the dispatcher's choice of it. Skipped on other GPUs.

tests/test_gpu_backward.py (every head-dim bucket, hypothesis shapes, GQA, BHSD views, NaN padding,
empty rows) runs on this path on an H100/H200 through the public API wherever dispatch picks it."""

import numpy as np
import pytest
from helpers import assert_backward_rule, random_inputs, to_gpu

import flashcupy
from flashcupy._arrays import bfloat16

pytestmark = pytest.mark.gpu

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])


@pytest.fixture(autouse=True)
def _only_sm90():
    import cupy

    if int(cupy.cuda.Device().compute_capability) != 90:
        pytest.skip("needs a GPU of compute capability 9.0 (H100/H200)")


def _backward_sm90(q, k, v, do, *, causal=False, config=None, softmax_scale=None, block_mask=None,
                   deterministic=False):
    """flashcupy._gpu_sm90_bwd.backward through flashcupy._gpu.backward's preparation, forced (the
    forward through the public API)."""
    from flashcupy import _gpu, _gpu_sm90_bwd
    from flashcupy._validate import check_qkv

    q, k, v, do = to_gpu(q, k, v, do)
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, block_mask=block_mask)
    shape = check_qkv(q, k, v, softmax_scale)
    cfg = config or _gpu_sm90_bwd.config_for(shape.head_dim, causal)
    return _gpu.backward(do, q, k, v, res.out, res.lse, shape, causal=causal, deterministic=deterministic,
                         config=cfg, block_mask=block_mask)


def _sweep():
    from flashcupy import _gpu_sm90_bwd

    return _gpu_sm90_bwd.SWEEP


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", _sweep(), ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_every_specialization(rng, dtype, config, causal):
    """Ragged tails on both sides (partial query tiles, a partial 128-key block), GQA, seqlen_q != seqlen_k."""
    q, k, v, do = random_inputs(rng, 2, 300, 421, 4, 2, config.head_dim, dtype, grad=True)
    g = _backward_sm90(q, k, v, do, causal=causal, config=config)
    for x, ref in zip(g, (q, k, v)):
        assert x.shape == ref.shape and x.dtype == ref.dtype
    assert_backward_rule(g, do, q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config", _sweep()[:2], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_deterministic_specializations(rng, dtype, config, causal):
    """deterministic=True (the dQ writer's turnstiles) on config_for's tiles: ragged tails, GQA,
    seqlen_q < seqlen_k (causal: key blocks that no query sees, which take no turn) and >."""
    for sq, sk in ((300, 421), (421, 300)):
        q, k, v, do = random_inputs(rng, 2, sq, sk, 4, 2, config.head_dim, dtype, grad=True)
        g = _backward_sm90(q, k, v, do, causal=causal, config=config, deterministic=True)
        assert_backward_rule(g, do, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_deterministic_is_bitwise_repeatable(rng, head_dim):
    """250 repeats of a deterministic backward (causal and not, GQA, 1000 x 1100, batch 2, 8 query heads:
    many CTAs adding to each dQ tile at once) give bitwise the same dq, dk, dv."""
    import cupy as cp

    from flashcupy import _gpu, _gpu_sm90_bwd
    from flashcupy._validate import check_qkv

    q, k, v, do = to_gpu(*random_inputs(rng, 2, 1000, 1100, 8, 2, head_dim, HALF_DTYPES[-1], grad=True))
    shape = check_qkv(q, k, v)
    cfg = _gpu_sm90_bwd.config_for(head_dim)
    for causal in (False, True):
        res = flashcupy.flash_attn_forward(q, k, v, causal=causal)

        def run():
            return _gpu.backward(do, q, k, v, res.out, res.lse, shape, causal=causal, deterministic=True, config=cfg)
        first = run()
        for rep in range(250):
            again = run()
            for name, a, b in zip(("dq", "dk", "dv"), first, again):
                assert bool(cp.array_equal(a.view(cp.uint16), b.view(cp.uint16))), (name, causal, rep)


@pytest.mark.parametrize("head_dim", [8, 40, 96, 120])
def test_head_dims_below_the_tile(rng, head_dim):
    """Head dims padded up to the 64 / 128 tile (TMA zero-fills the columns past the caller's)."""
    q, k, v, do = random_inputs(rng, 1, 190, 257, 3, 1, head_dim, HALF_DTYPES[-1], grad=True)
    assert_backward_rule(_backward_sm90(q, k, v, do, causal=True), do, q, k, v, causal=True)


def test_zero_softmax_scale_and_empty_rows(rng):
    """Causal rows with no visible key (seqlen_q > seqlen_k) get zero dq, keys no query sees zero dk / dv;
    softmax_scale 0 (uniform weights)."""
    q, k, v, do = random_inputs(rng, 1, 300, 70, 2, 2, 64, HALF_DTYPES[0], grad=True)
    g = _backward_sm90(q, k, v, do, causal=True)
    assert_backward_rule(g, do, q, k, v, causal=True)
    assert not np.asarray(g[0].get()[:, :230]).any()
    q, k, v, do = random_inputs(rng, 1, 70, 300, 2, 2, 128, HALF_DTYPES[-1], grad=True)
    g = _backward_sm90(q, k, v, do, causal=False, softmax_scale=0.0)
    assert_backward_rule(g, do, q, k, v, softmax_scale=0.0)


def test_large_scores_past_the_key_tail(rng):
    """Rows whose scores are all far below zero (lse << 0) with a ragged key tail: the zero-filled K rows
    past seqlen_k would give P = 2^(0 - lse) = inf if they were not masked."""
    q, k, v, do = random_inputs(rng, 1, 130, 200, 2, 2, 64, HALF_DTYPES[-1], grad=True)
    q = (np.abs(q.astype(np.float32)) * 6).astype(q.dtype)
    k = (-np.abs(k.astype(np.float32)) * 6).astype(k.dtype)  # q . k / 8 about -190: lse about -190
    g = _backward_sm90(q, k, v, do)
    assert all(bool(np.isfinite(x.get().astype(np.float32)).all()) for x in g)
    assert_backward_rule(g, do, q, k, v)


def test_public_backward_takes_the_sm90_path(rng, monkeypatch):
    """flash_attn_backward on an H100/H200 runs the wgmma backward for fp16/bf16 without dropout, block
    mask or deterministic; deterministic=True (not yet dispatched: plan_config) and FLASHCUPY_SM90_BWD=0
    run the mma.sync family."""
    from flashcupy import _gpu_sm90_bwd
    from flashcupy._device import current_device_info

    if _gpu_sm90_bwd.plan_config(128, current_device_info(), causal=True) is None:  # e.g. FLASHCUPY_SMEM_LIMIT_KB=99
        pytest.skip("this device (or its shared-memory cap) does not run the sm_90a kernel at head_dim 128")
    calls = []
    real = _gpu_sm90_bwd.backward
    monkeypatch.setattr(_gpu_sm90_bwd, "backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, do = random_inputs(rng, 1, 257, 257, 2, 2, 128, HALF_DTYPES[-1], grad=True)
    qg, kg, vg, dog = to_gpu(q, k, v, do)
    res = flashcupy.flash_attn_forward(qg, kg, vg, causal=True)
    g = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=True)
    assert calls, "the sm_90a backward was not used"
    assert_backward_rule(g, do, q, k, v, causal=True)
    calls.clear()
    g = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=True, deterministic=True)
    assert not calls
    assert_backward_rule(g, do, q, k, v, causal=True)
    monkeypatch.setenv("FLASHCUPY_SM90_BWD", "0")
    g = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=True)
    assert not calls
    assert_backward_rule(g, do, q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_on_the_sm90_path(rng, causal):
    """A block mask of whole tiles on this path (forced; not yet dispatched): the rule against the oracle
    with the element mask the blocks imply; blocks that are not whole tiles raise ValueError."""
    from flashcupy import blocksparse as bs

    sq, sk = 517, 389
    q, k, v, do = random_inputs(rng, 2, sq, sk, 4, 2, 128, HALF_DTYPES[-1], grad=True)
    blocks = np.random.default_rng(3).random((-(-sq // 128), -(-sk // 256))) < 0.6
    blocks[:, 0] = True
    mask = bs.BlockMask(blocks, 128, 256)
    g = _backward_sm90(q, k, v, do, causal=causal, block_mask=mask)
    element = np.repeat(np.repeat(blocks, 128, axis=0), 256, axis=1)[:sq, :sk]
    assert_backward_rule(g, do, q, k, v, causal=causal, mask=element)
    with pytest.raises(ValueError, match="whole"):
        narrow = np.random.default_rng(4).random((-(-sq // 128), -(-sk // 64))) < 0.6
        _backward_sm90(q, k, v, do, causal=causal, block_mask=bs.BlockMask(narrow, 128, 64))


@pytest.mark.parametrize("after_deterministic", [False, True], ids=["fresh", "after_deterministic"])
@pytest.mark.parametrize("causal", [False, True])
def test_graph_capture_and_repeat(rng, causal, after_deterministic):
    """Captured into a CUDA graph on a non-default stream, the replay gives finite gradients within the
    rule (the dQ additions are unordered, so bits may differ from the eager call); the eager call is
    checked too. after_deterministic: a forced deterministic Hopper backward runs first in the same
    process (the one H200 run that routed deterministic calls there failed this test, both causal
    settings, dq about 1e4 off, while it had passed in the run before: bench/NOTES.md)."""
    import cupy as cp

    if after_deterministic:
        q0, k0, v0, do0 = random_inputs(rng, 1, 257, 257, 2, 2, 128, HALF_DTYPES[-1], grad=True)
        assert_backward_rule(_backward_sm90(q0, k0, v0, do0, causal=True, deterministic=True), do0, q0, k0, v0,
                             causal=True)
    q, k, v, do = random_inputs(rng, 2, 333, 517, 4, 2, 128, HALF_DTYPES[-1], grad=True)
    qg, kg, vg, dog = to_gpu(q, k, v, do)
    res = flashcupy.flash_attn_forward(qg, kg, vg, causal=causal)
    eager = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=causal)  # compiles outside
    assert_backward_rule(eager, do, q, k, v, causal=causal)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            got = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=causal)
        finally:
            graph = stream.end_capture()
        for x in got:
            x.fill(0)
        graph.launch(stream)
    stream.synchronize()
    assert_backward_rule(got, do, q, k, v, causal=causal)
