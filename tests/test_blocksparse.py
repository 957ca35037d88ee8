"""Block-sparse attention: the BlockMask type and its builders, the CPU path and (GPU) the kernels,
against the oracle with the mask expanded to elements (DESIGN.md's rule)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import assert_backward_rule, assert_dropout_rule, assert_forward_rule, random_inputs, to_numpy

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
def test_gpu_all_ones_mask_is_bitwise_dense(rng, head_dim, causal):
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
