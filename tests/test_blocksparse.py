"""Block-sparse attention: the BlockMask type and its builders, the CPU path and (GPU) the kernels,
against the oracle with the mask expanded to elements (DESIGN.md's rule)."""

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (assert_backward_rule, assert_dropout_rule, assert_forward_rule, random_inputs, same_bits,
                     to_numpy)

import flashcupy
from flashcupy import blocksparse as bs
from flashcupy._arrays import bfloat16

HALF_DTYPES = [np.dtype(np.float16)] + ([bfloat16()] if bfloat16() is not None else [])


def _random_block_mask(rng, lead, nbq, nbk, kind):
    """Random masks including the corner cases: all-zero rows and columns, one block, all blocks."""
    if kind == "all":
        return np.ones(lead + (nbq, nbk), dtype=bool)
    if kind == "single":
        m = np.zeros(lead + (nbq, nbk), dtype=bool)
        m[..., rng.integers(nbq), rng.integers(nbk)] = True
        return m
    m = rng.random(lead + (nbq, nbk)) < rng.uniform(0.2, 0.8)
    if kind == "holes":  # a whole query-block row and a whole key-block column inactive
        m[..., rng.integers(nbq), :] = False
        m[..., :, rng.integers(nbk)] = False
    return m


# ------------------------------------------------------------------------------------------ CPU


def test_lists_are_ascending_active_blocks():
    rng = np.random.default_rng(0)
    mask = bs.BlockMask(rng.random((2, 3, 5, 7)) < 0.4, 64, 128)
    kv_count, kv_index, q_count, q_index = mask.lists(np)
    m = mask.mask
    for b in range(2):
        for h in range(3):
            for r in range(5):
                want = np.flatnonzero(m[b, h, r])
                assert kv_count[b, h, r] == len(want) and (kv_index[b, h, r, : len(want)] == want).all()
            for c in range(7):
                want = np.flatnonzero(m[b, h, :, c])
                assert q_count[b, h, c] == len(want) and (q_index[b, h, c, : len(want)] == want).all()
    assert mask.lists(np) is mask.lists(np)  # built once, reused


def _brute_force_lists(m):
    """(kv_count, kv_index, q_count, q_index) of a (b, h, nbq, nbk) bool mask, one block at a time."""
    b, h, nbq, nbk = m.shape
    kv_count, q_count = np.zeros((b, h, nbq), np.int32), np.zeros((b, h, nbk), np.int32)
    kv_index, q_index = np.full((b, h, nbq, nbk), nbk, np.int32), np.full((b, h, nbk, nbq), nbq, np.int32)
    for i in range(b):
        for j in range(h):
            for r in range(nbq):
                for c in range(nbk):
                    if m[i, j, r, c]:
                        kv_index[i, j, r, kv_count[i, j, r]] = c
                        kv_count[i, j, r] += 1
            for c in range(nbk):
                for r in range(nbq):
                    if m[i, j, r, c]:
                        q_index[i, j, c, q_count[i, j, c]] = r
                        q_count[i, j, c] += 1
    return kv_count, kv_index, q_count, q_index


@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(), (3,), (1, 2), (2, 1), (2, 3)]), nbq=st.integers(1, 9), nbk=st.integers(1, 9),
       kind=st.sampled_from(["random", "holes", "single", "all"]), seed=st.integers(0, 2**32 - 1))
def test_lists_equal_a_brute_force_computation(lead, nbq, nbk, kind, seed):
    """Every list, its padding (nblocks) included, and the layout _gpu.py reads: int32, C-contiguous,
    (b | 1, h | 1, nblocks, nblocks) indices and (b | 1, h | 1, nblocks) counts."""
    m = _random_block_mask(np.random.default_rng(seed), lead, nbq, nbk, kind)
    mask = bs.BlockMask(m, 64, 64)
    m4 = m.reshape((1,) * (2 - len(lead)) + m.shape)
    for got, want in zip(mask.lists(np), _brute_force_lists(m4)):
        assert got.dtype == np.int32 and got.flags.c_contiguous and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_mutating_the_callers_array_changes_nothing():
    """The mask is copied at construction: writing to the array it came from afterwards changes neither
    the mask, nor its lists, nor a result."""
    rng = np.random.default_rng(0)
    m = _random_block_mask(rng, (2,), 3, 2, "holes")
    original = m.copy()
    mask = bs.BlockMask(m, 64, 64)
    q, k, v, do = random_inputs(rng, 1, 150, 100, 2, 1, 8, np.float64, grad=True)
    before = flashcupy.flash_attn_forward(q, k, v, block_mask=mask)
    m[...] = ~m  # the caller reuses its array
    assert np.array_equal(mask.mask[0], original)
    for got, want in zip(mask.lists(np), _brute_force_lists(original[None])):
        np.testing.assert_array_equal(got, want)
    after = flashcupy.flash_attn_forward(q, k, v, block_mask=mask)
    fresh = flashcupy.flash_attn_forward(q, k, v, block_mask=bs.BlockMask(original, 64, 64))
    assert same_bits(after.out, before.out) and same_bits(after.out, fresh.out) and same_bits(after.lse, fresh.lse)
    grads = flashcupy.flash_attn_backward(do, q, k, v, forward=after)
    want = flashcupy.flash_attn_backward(do, q, k, v, forward=fresh)
    assert all(same_bits(a, b) for a, b in zip(grads, want))


def test_block_mask_is_read_only():
    mask = bs.BlockMask(np.eye(3, dtype=bool), 64, 128)
    with pytest.raises(ValueError, match="read-only"):
        mask.mask[0, 0, 0, 1] = True
    for a in mask.lists(np):
        with pytest.raises(ValueError, match="read-only"):
            a[(0,) * a.ndim] = 1
    for name, value in (("mask", np.ones((3, 3), bool)), ("block_q", 128), ("_lists", None)):
        with pytest.raises(AttributeError, match=f"BlockMask is immutable: cannot set '{name}'"):
            setattr(mask, name, value)
    with pytest.raises(AttributeError, match="BlockMask is immutable"):
        del mask.block_k
    assert mask.block_q == 64 and mask.block_k == 128 and np.array_equal(mask.mask[0, 0], np.eye(3, dtype=bool))


def test_block_mask_is_a_value():
    """Equal masks and block sizes compare and hash equal; pickling and copying rebuild an equal mask."""
    import copy

    m = np.random.default_rng(1).random((2, 4, 3)) < 0.5
    a, b = bs.BlockMask(m, 64, 128), bs.BlockMask(m.copy(), 64, 128)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != bs.BlockMask(m, 128, 128) and a != bs.BlockMask(~m, 64, 128) and a != "mask"
    for c in (pickle.loads(pickle.dumps(a)), copy.copy(a), copy.deepcopy(a)):
        assert c == a and c is not a and not c.mask.flags.writeable


def test_block_mask_inputs():
    """Host __dlpack__ arrays are read through NumPy; masked arrays and lists are refused."""

    class HostDLPack:  # a torch / JAX CPU tensor, as flashcupy sees one
        def __init__(self, a):
            self._a, self.shape, self.dtype = a, a.shape, a.dtype

        def __dlpack__(self, *args, **kwargs):
            return self._a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return (1, 0)  # kDLCPU

    m = np.random.default_rng(2).random((3, 2)) < 0.5
    assert bs.BlockMask(HostDLPack(m), 64, 64) == bs.BlockMask(m, 64, 64)
    with pytest.raises(TypeError, match="mask: expected a boolean array, got a numpy.ma.MaskedArray"):
        bs.BlockMask(np.ma.MaskedArray(m, mask=~m), 64, 64)
    with pytest.raises(TypeError, match="mask: expected a boolean array, got list"):
        bs.BlockMask(m.tolist(), 64, 64)


class _FakeStream:
    def __init__(self, capturing):
        self.capturing, self.synchronized = capturing, 0

    def is_capturing(self):
        return self.capturing

    def synchronize(self):
        self.synchronized += 1


def _fake_cupy(stream, device=3):
    """Just enough of the cupy module for BlockMask's device cache: 'device' copies are NumPy copies."""
    cuda = SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: device), get_current_stream=lambda: stream)
    return SimpleNamespace(cuda=cuda, asarray=lambda a: np.array(a, copy=True))


def test_device_lists_are_copied_once_outside_capture_and_refused_inside():
    """The device cache's logic, with a stand-in for cupy: under capture a device without a copy raises the
    error that tells the user what to do; outside capture the copy is made once, waited for, and reused
    (also under capture)."""
    mask = bs.BlockMask(np.random.default_rng(3).random((2, 3, 4)) < 0.5, 64, 64)
    capturing = _FakeStream(capturing=True)
    with pytest.raises(RuntimeError, match=r"block_mask: .*no copy on device 3 yet.*capturing a CUDA graph.*"
                                           r"mask.prepare\(\)"):
        mask.lists(_fake_cupy(capturing))
    eager = _FakeStream(capturing=False)
    lists = mask.lists(_fake_cupy(eager))
    assert eager.synchronized == 1  # the copy is complete before any stream reads it
    for got, want in zip(lists, mask.lists(np)):
        np.testing.assert_array_equal(got, want)
    assert all(a is b for a, b in zip(mask.lists(_fake_cupy(capturing)), lists))  # cached per device
    assert eager.synchronized == 1
    assert mask.element_mask(150, 256, xp=np).shape == (1, 2, 150, 256)
    with pytest.raises(RuntimeError, match="no copy on device 4 yet"):  # another device: its own copy
        mask.lists(_fake_cupy(capturing, device=4))


def test_validation_errors():
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        bs.BlockMask(np.ones((2, 2)))
    with pytest.raises(ValueError, match="mask: expected shape"):
        bs.BlockMask(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="block_q: expected a power of two >= 64, got 96"):
        bs.BlockMask(np.ones((2, 2), dtype=bool), 96, 64)
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 64, got 32"):
        bs.BlockMask(np.ones((2, 2), dtype=bool), 64, 32)
    rng = np.random.default_rng(0)
    q, k, v = random_inputs(rng, 2, 130, 100, 2, 1, 8, np.float64)
    with pytest.raises(ValueError, match=r"block_mask: expected \(nblocks_q, nblocks_k\) = \(3, 2\)"):
        flashcupy.flash_attn_func(q, k, v, block_mask=bs.BlockMask(np.ones((2, 2), dtype=bool), 64, 64))
    with pytest.raises(ValueError, match="block_mask: expected leading dims broadcastable"):
        flashcupy.flash_attn_func(q, k, v, block_mask=bs.BlockMask(np.ones((3, 3, 2), dtype=bool), 64, 64))
    with pytest.raises(TypeError, match="block_mask: expected a flashcupy.blocksparse.BlockMask"):
        flashcupy.flash_attn_func(q, k, v, block_mask=np.ones((3, 2), dtype=bool))


@settings(max_examples=50, deadline=None)
@given(nb=st.integers(1, 40), window=st.integers(0, 5))
def test_builders_shapes_and_densities(nb, window):
    s = nb * 128
    loc = bs.local(s, s, window, window)
    assert loc.mask.shape == (1, 1, nb, nb)
    rows = loc.mask[0, 0].sum(axis=1)
    assert rows.max() <= 2 * window + 1 and rows.min() >= min(nb, window + 1)
    cl = bs.causal_local(s, s, window).mask[0, 0]
    assert np.array_equal(cl, np.tril(cl)) and cl.diagonal().all()  # causal, diagonal always present
    bf = bs.butterfly(s, s).mask[0, 0]
    assert np.array_equal(bf, bf.T) and bf.diagonal().all()
    assert bf.sum(axis=1).max() <= 1 + max(1, int(np.ceil(np.log2(nb))))
    bb = bs.bigbird(s, s, num_global=1, window=1, num_random=2, seed=3).mask[0, 0]
    assert bb[0].all() and bb[:, 0].all() and np.array_equal(bb, bs.bigbird(s, s, seed=3).mask[0, 0])
    assert (bb.sum(axis=1) >= min(nb, 2)).all()


def test_butterfly_density_falls_like_log_n_over_n():
    dens = [bs.butterfly(n * 128, n * 128).density() for n in (8, 16, 32, 64, 128)]
    for n, d in zip((8, 16, 32, 64, 128), dens):
        assert d == pytest.approx((1 + np.log2(n)) / n)


def test_bigbird_per_head_differs_and_is_seeded():
    a = bs.bigbird(2048, 2048, nheads=4, seed=1).mask
    assert a.shape == (1, 4, 16, 16) and not np.array_equal(a[0, 0], a[0, 1])
    assert np.array_equal(a, bs.bigbird(2048, 2048, nheads=4, seed=1).mask)


@settings(max_examples=30, deadline=None)
@given(sq=st.integers(1, 300), sk=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_from_element_mask_marks_blocks_with_any_visible_element(sq, sk, seed):
    rng = np.random.default_rng(seed)
    em = rng.random((sq, sk)) < 0.002
    m = bs.from_element_mask(em, 64, 64)
    expanded = m.element_mask(sq, sk)[0, 0]
    assert (expanded >= em).all()  # covers every visible element
    for r in range(m.nblocks_q):
        for c in range(m.nblocks_k):
            assert m.mask[0, 0, r, c] == em[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].any()


@settings(max_examples=60, deadline=None)
@given(sq=st.integers(1, 260), sk=st.integers(1, 260), heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
       per_head=st.booleans(), causal=st.booleans(), blocks=st.sampled_from([(64, 64), (64, 128), (128, 64)]),
       kind=st.sampled_from(["random", "holes", "single", "all"]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1))
@example(sq=200, sk=70, heads=(4, 2), per_head=True, causal=True, blocks=(64, 64), kind="holes",
         dtype=np.float64, seed=5)
def test_cpu_path_matches_oracle(sq, sk, heads, per_head, causal, blocks, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v, do = random_inputs(rng, 2, sq, sk, *heads, 8, dtype, grad=True)
    nbq, nbk = -(-sq // blocks[0]), -(-sk // blocks[1])
    mask = bs.BlockMask(_random_block_mask(rng, (heads[0],) if per_head else (), nbq, nbk, kind), *blocks)
    em = mask.element_mask(sq, sk)
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, block_mask=mask)
    assert_forward_rule(res.out, res.lse, q, k, v, causal=causal, mask=em)
    grads = flashcupy.flash_attn_backward(do, q, k, v, res.out, res.lse, causal=causal, block_mask=mask)
    assert_backward_rule(grads, do, q, k, v, causal=causal, mask=em)


# ------------------------------------------------------------------------------------------ GPU


def _cp():
    import cupy

    return cupy


@pytest.mark.gpu
@given(sq=st.sampled_from([1, 64, 113, 300, 1023]) | st.integers(1, 600),
       sk=st.sampled_from([1, 64, 127, 300, 1025]) | st.integers(1, 600),
       heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]), per_head=st.booleans(), causal=st.booleans(),
       blocks=st.sampled_from([(64, 64), (128, 128), (64, 128), (128, 64)]),
       kind=st.sampled_from(["random", "holes", "single", "all"]), head_dim=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(HALF_DTYPES), deterministic=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
@example(sq=300, sk=1025, heads=(4, 2), per_head=True, causal=True, blocks=(64, 64), kind="holes", head_dim=128,
         dtype=HALF_DTYPES[-1], deterministic=False, seed=1)
@example(sq=1023, sk=300, heads=(3, 1), per_head=False, causal=False, blocks=(128, 64), kind="single",
         head_dim=64, dtype=HALF_DTYPES[0], deterministic=True, seed=2)
def test_gpu_matches_oracle(sq, sk, heads, per_head, causal, blocks, kind, head_dim, dtype, deterministic, seed):
    cp = _cp()
    rng = np.random.default_rng(seed)
    q, k, v, do = random_inputs(rng, 2, sq, sk, *heads, head_dim, dtype, grad=True)
    nbq, nbk = -(-sq // blocks[0]), -(-sk // blocks[1])
    mask = bs.BlockMask(cp.asarray(_random_block_mask(rng, (heads[0],) if per_head else (), nbq, nbk, kind)), *blocks)
    em = to_numpy(mask.element_mask(sq, sk, xp=cp))
    qg, kg, vg, dog = (cp.asarray(x) for x in (q, k, v, do))
    res = flashcupy.flash_attn_forward(qg, kg, vg, causal=causal, block_mask=mask)
    assert_forward_rule(res.out, res.lse, q, k, v, causal=causal, mask=em)
    grads = flashcupy.flash_attn_backward(dog, qg, kg, vg, res.out, res.lse, causal=causal, block_mask=mask,
                                          deterministic=deterministic)
    assert_backward_rule(grads, do, q, k, v, causal=causal, mask=em)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_all_ones_mask_is_bitwise_dense(rng, monkeypatch, head_dim, causal):
    """Within one kernel family: the dense forward on an H100/H200 would otherwise run the Hopper
    family, which takes no block mask (FLASHCUPY_SM90=0 keeps both calls on mma.sync)."""
    monkeypatch.setenv("FLASHCUPY_SM90", "0")
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in random_inputs(rng, 2, 517, 389, 4, 2, head_dim, np.float16, grad=True))
    ones = bs.BlockMask(np.ones((-(-517 // 128), -(-389 // 128)), dtype=bool), 128, 128)
    dense = flashcupy.flash_attn_forward(q, k, v, causal=causal)
    sparse = flashcupy.flash_attn_forward(q, k, v, causal=causal, block_mask=ones)
    assert cp.array_equal(dense.out.view(cp.uint16), sparse.out.view(cp.uint16))
    assert cp.array_equal(dense.lse, sparse.lse)
    gd = flashcupy.flash_attn_backward(do, q, k, v, dense.out, dense.lse, causal=causal, deterministic=True)
    gs = flashcupy.flash_attn_backward(do, q, k, v, dense.out, dense.lse, causal=causal, deterministic=True,
                                       block_mask=ones)
    for a, b in zip(gd, gs):
        assert cp.array_equal(a.view(cp.uint16), b.view(cp.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gpu_block_mask_with_dropout_and_causal(rng, dtype):
    """Block mask (per head) + dropout + causal + GQA on the kernels vs the oracle given the element mask
    and the regenerated keep-mask."""
    cp = _cp()
    q, k, v, do = random_inputs(rng, 2, 300, 300, 4, 2, 64, dtype, grad=True)
    mask = bs.bigbird(300, 300, nheads=4, block_q=64, block_k=64, seed=7)
    state, p = (11, 3), 0.2
    kw = dict(causal=True, dropout_p=p, block_mask=mask)
    res = flashcupy.flash_attn_forward(*(cp.asarray(x) for x in (q, k, v)), seed=state, **kw)
    grads = flashcupy.flash_attn_backward(*(cp.asarray(x) for x in (do, q, k, v)), res.out, res.lse,
                                          rng_state=res.rng_state, **kw)
    keep = flashcupy.dropout.keep_mask(*state, 2, 4, 300, 300, p)
    assert_dropout_rule(res.out, grads, do, q, k, v, keep, flashcupy.dropout.effective_dropout_p(p), causal=True,
                        mask=mask.element_mask(300, 300))


# GPU: the BlockMask is a value on the device too (issue 13, item 6). Before, its device lists were made
# on first use and cached: first used inside CUDA-graph capture they were allocated but only filled at
# replay, and a later eager call read garbage (max error 0.91 on an H200); a mutated caller array left
# the kernels on stale lists; first use on one stream raced a second stream.

_SEQ, _HEADS, _HEAD_DIM, _BLOCKS = 256, 2, 64, (64, 128)


def _mask_and_inputs(rng):
    """A (nheads, 4, 2) block mask with an empty query-block row, and fp16 CuPy q, k, v, dout (1, 256, 2, 64)."""
    cp = _cp()
    m = _random_block_mask(rng, (_HEADS,), _SEQ // _BLOCKS[0], _SEQ // _BLOCKS[1], "random")
    m[0, 1, :] = False  # head 0, query block 1 sees nothing: out 0, lse -inf there
    m[1, :, 0] = True
    xs = [cp.asarray(x) for x in random_inputs(rng, 1, _SEQ, _SEQ, _HEADS, _HEADS, _HEAD_DIM, np.float16, grad=True)]
    cp.cuda.Device().synchronize()
    return m, xs


def _fwd_bwd(xs, mask, causal):
    """(out, lse, dq, dk, dv) on the current stream; the backward deterministic, so bits are comparable."""
    q, k, v, do = xs
    res = flashcupy.flash_attn_forward(q, k, v, causal=causal, block_mask=mask)
    grads = flashcupy.flash_attn_backward(do, q, k, v, forward=res, deterministic=True)
    return (res.out, res.lse, *grads)


def _assert_same_bits(got, want):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert same_bits(a, b), name


def _captured_then_replayed(xs, mask, causal, stream):
    """_fwd_bwd captured into a CUDA graph on stream, its outputs zeroed, then the graph replayed."""
    with stream:
        stream.begin_capture()
        try:
            got = _fwd_bwd(xs, mask, causal)
        finally:
            graph = stream.end_capture()
        for x in got:
            x.fill(0)
        graph.launch(stream)
    stream.synchronize()
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_first_use_inside_graph_capture(rng, causal):
    """A mask built outside capture and first used inside it: the graph's replay and a later eager call
    give the bits of a fresh mask's eager call."""
    cp = _cp()
    m, xs = _mask_and_inputs(rng)
    want = _fwd_bwd(xs, bs.BlockMask(m, *_BLOCKS), causal)  # also compiles every kernel outside the capture
    mask = bs.BlockMask(m, *_BLOCKS)
    _assert_same_bits(_captured_then_replayed(xs, mask, causal, cp.cuda.Stream(non_blocking=True)), want)
    _assert_same_bits(_fwd_bwd(xs, mask, causal), want)  # the bug: this eager call was off by up to 0.91
    cp.cuda.Device().synchronize()


@pytest.mark.gpu
def test_gpu_mask_without_device_copy_raises_under_capture_then_prepare_works(rng):
    """A mask with no copy on the device (here: built while a capture was running, which skips the eager
    copy) raises RuntimeError naming block_mask and prepare() under capture, and queues nothing; after
    prepare() the same capture works and replays to a fresh mask's bits."""
    cp = _cp()
    m, xs = _mask_and_inputs(rng)
    want = _fwd_bwd(xs, bs.BlockMask(m, *_BLOCKS), True)
    scratch = cp.zeros(1, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            scratch += 1  # the graph is not empty
            mask = bs.BlockMask(m, *_BLOCKS)  # construction under capture: no device copy
            with pytest.raises(RuntimeError, match=r"block_mask: .*no copy on device \d+ yet.*capturing.*prepare"):
                flashcupy.flash_attn_forward(*xs[:3], causal=True, block_mask=mask)
        finally:
            stream.end_capture()
    stream.synchronize()
    assert mask.prepare() is mask
    _assert_same_bits(_captured_then_replayed(xs, mask, True, stream), want)
    _assert_same_bits(_fwd_bwd(xs, mask, True), want)


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["cupy", "numpy"])
def test_gpu_mutating_the_callers_array_changes_no_result(rng, source):
    """Writing to the array a mask was built from, before or after its first use, changes no bit of the
    fused forward or backward."""
    cp = _cp()
    m, xs = _mask_and_inputs(rng)
    want = _fwd_bwd(xs, bs.BlockMask(m, *_BLOCKS), True)
    arr = cp.asarray(m) if source == "cupy" else m.copy()
    early = bs.BlockMask(arr, *_BLOCKS)
    arr[...] = ~arr  # before the first use
    late = bs.BlockMask(~arr, *_BLOCKS)
    _assert_same_bits(_fwd_bwd(xs, early, True), want)
    _assert_same_bits(_fwd_bwd(xs, late, True), want)
    arr[...] = True  # after the first use
    _assert_same_bits(_fwd_bwd(xs, early, True), want)
    _assert_same_bits(_fwd_bwd(xs, late, True), want)
    other = _fwd_bwd(xs, bs.BlockMask(arr, *_BLOCKS), True)  # the mutated array is a different mask
    assert not same_bits(other[0], want[0])


@pytest.mark.gpu
@pytest.mark.parametrize("prepared", ["at construction", "on first use"])
def test_gpu_first_use_on_one_stream_then_another(rng, prepared):
    """First use on a non-default stream, then at once (no synchronisation between) on another: both give
    a fresh mask's bits. 'on first use': the mask was built with no device copy (under a capture), so the
    first call makes it, on stream A."""
    cp = _cp()
    m, xs = _mask_and_inputs(rng)
    want = _fwd_bwd(xs, bs.BlockMask(m, *_BLOCKS), True)
    cp.cuda.Device().synchronize()
    stream_a, stream_b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    if prepared == "at construction":
        with stream_a:
            mask = bs.BlockMask(cp.asarray(m), *_BLOCKS)
    else:
        capture = cp.cuda.Stream(non_blocking=True)
        scratch = cp.zeros(1, dtype=cp.float32)
        with capture:
            capture.begin_capture()
            try:
                scratch += 1
                mask = bs.BlockMask(m, *_BLOCKS)
            finally:
                capture.end_capture()
        capture.synchronize()
    with stream_a:
        got_a = _fwd_bwd(xs, mask, True)
    with stream_b:
        got_b = _fwd_bwd(xs, mask, True)
    stream_a.synchronize()
    stream_b.synchronize()
    _assert_same_bits(got_a, want)
    _assert_same_bits(got_b, want)
