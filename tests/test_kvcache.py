"""flash_attn_with_kvcache (issue 17) on the CPU: decode steps against the oracle over the visible
cache prefix (by DESIGN.md's rule), the in-place append checked element by element against a model of
the cache kept by the test, paged equal to contiguous (bitwise), empty cache rows, GQA, causal chunks
(seqlen_q > 1), window / softcap / ALiBi, and validation errors naming the argument.
Fresh random inputs every run (never zeros); warnings are errors.
"""

from __future__ import annotations


import numpy as np
import pytest
from helpers import assert_forward_rule, float_dtypes, from_paged, msg, same_bits, to_paged
from hypothesis import given
from hypothesis import strategies as st

from flashcupy import flash_attn_with_kvcache
from flashcupy._arrays import dtype_name, lse_dtype

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("cpu_path_only")]

DTYPES = float_dtypes()
PAGE = 16


def normal(rng, shape, dtype, a=1.0):
    return (a * rng.standard_normal(shape)).astype(dtype)


@given(dtype=st.sampled_from(DTYPES), heads=st.sampled_from([(2, 1), (4, 2), (8, 2), (3, 3)]),
       seqlen_q=st.sampled_from([1, 1, 2, 5]), steps=st.integers(1, 3), causal=st.booleans(),
       paged=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decode_steps_append_in_place_and_meet_the_rule(dtype, heads, seqlen_q, steps, causal, paged, seed):
    rng = np.random.default_rng(seed)
    h, hk = heads
    batch, cap, d = 3, 4 * PAGE, 16
    k_model, v_model = normal(rng, (batch, cap, hk, d), dtype), normal(rng, (batch, cap, hk, d), dtype)
    lens = rng.integers(0, cap - steps * seqlen_q, batch).astype(np.int32)
    lens[rng.integers(0, batch)] = 0  # an empty cache row
    if paged:
        k_cache, table = to_paged(rng, k_model)
        v_cache = _paged_like(v_model, table, normal(rng, k_cache.shape, dtype))  # same pages, spare noise
    else:
        k_cache, v_cache, table = k_model.copy(), v_model.copy(), None
    for _ in range(steps):
        q = normal(rng, (batch, seqlen_q, h, d), dtype)
        kn, vn = normal(rng, (batch, seqlen_q, hk, d), dtype), normal(rng, (batch, seqlen_q, hk, d), dtype)
        before = (k_cache.copy(), v_cache.copy())
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, kn, vn, cache_seqlens=lens, block_table=table,
                                           causal=causal, return_softmax_lse=True)
        assert out.dtype == dtype and out.shape == q.shape and lse.dtype == lse_dtype(dtype)
        assert lse.shape == (batch, h, seqlen_q)
        for b in range(batch):  # the test's own model of the append
            k_model[b, lens[b]:lens[b] + seqlen_q] = kn[b]
            v_model[b, lens[b]:lens[b] + seqlen_q] = vn[b]
        _assert_cache_is(k_cache, v_cache, k_model, v_model, table, before)
        lens = lens + seqlen_q
        for b in range(batch):
            n = int(lens[b])
            assert_forward_rule(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k_model[b:b + 1, :n], v_model[b:b + 1, :n],
                                causal=causal)


def _paged_like(model, table, pool):
    """pool with model's rows written into the pages table names (the other pages untouched)."""
    pool = pool.copy()
    for r in range(table.shape[0]):
        for j, p in enumerate(table[r]):
            pool[p] = model[r, j * PAGE:(j + 1) * PAGE]
    return pool


def _assert_cache_is(k_cache, v_cache, k_model, v_model, table, before):
    """Every element of the cache is the model's (written or untouched), bitwise; spare pages unchanged."""
    if table is None:
        assert same_bits(k_cache, k_model) and same_bits(v_cache, v_model)
        return
    assert same_bits(from_paged(k_cache, table), k_model) and same_bits(from_paged(v_cache, table), v_model)
    spare = np.setdiff1d(np.arange(k_cache.shape[0]), table.ravel())
    assert same_bits(k_cache[spare], before[0][spare]) and same_bits(v_cache[spare], before[1][spare])


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_name(d) for d in DTYPES])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_equals_contiguous(dtype, causal):
    rng = np.random.default_rng()
    batch, cap, h, hk, d = 4, 8 * PAGE, 4, 2, 16
    kc, vc = normal(rng, (batch, cap, hk, d), dtype), normal(rng, (batch, cap, hk, d), dtype)
    kp, table = to_paged(rng, kc)
    vp = _paged_like(vc, table, normal(rng, kp.shape, dtype))
    lens = np.array([0, 17, PAGE, cap - 3], np.int32)
    q = normal(rng, (batch, 3, h, d), dtype)
    kn, vn = normal(rng, (batch, 3, hk, d), dtype), normal(rng, (batch, 3, hk, d), dtype)
    kw = dict(cache_seqlens=lens, causal=causal, return_softmax_lse=True, window_size=(20, 0), softcap=5.0,
              alibi_slopes=rng.uniform(0.02, 1.0, (batch, h)).astype(np.float32))
    a = flash_attn_with_kvcache(q, kc, vc, kn, vn, **kw)
    b = flash_attn_with_kvcache(q, kp, vp, kn, vn, block_table=table, **kw)
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    assert same_bits(from_paged(kp, table), kc) and same_bits(from_paged(vp, table), vc)
    for r in range(batch):
        n = int(lens[r]) + 3
        assert_forward_rule(a[0][r:r + 1], a[1][r:r + 1], q[r:r + 1], kc[r:r + 1, :n], vc[r:r + 1, :n], causal=causal,
                            window_size=(20, 0), softcap=5.0, alibi_slopes=kw["alibi_slopes"][r:r + 1])


def test_empty_rows_full_cache_and_int_seqlens():
    rng = np.random.default_rng()
    kc, vc = normal(rng, (3, 32, 2, 8), np.float32), normal(rng, (3, 32, 2, 8), np.float32)
    q = normal(rng, (2, 1, 4, 8), np.float32)  # batch_cache 3 >= batch 2
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([0, 5], np.int32), return_softmax_lse=True)
    assert not np.any(out[0]) and np.all(lse[0] == -np.inf) and np.all(np.isfinite(lse[1]))
    full = flash_attn_with_kvcache(q, kc, vc)  # cache_seqlens None: the whole cache
    assert_forward_rule(full[:1], None, q[:1], kc[:1], vc[:1])
    as_int = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=32)
    assert same_bits(full, as_int)
    causal_q = normal(rng, (2, 4, 4, 8), np.float32)  # seqlen_q > visible 2: the first rows see no key
    out, lse = flash_attn_with_kvcache(causal_q, kc, vc, cache_seqlens=2, causal=True, return_softmax_lse=True)
    assert not np.any(out[:, :2]) and np.all(lse[:, :, :2] == -np.inf) and np.all(np.isfinite(lse[:, :, 2:]))


def test_num_splits_does_not_change_the_chunked_result():
    rng = np.random.default_rng()
    kc, vc = normal(rng, (2, 64, 1, 8), np.float32), normal(rng, (2, 64, 1, 8), np.float32)
    q = normal(rng, (2, 1, 4, 8), np.float32)
    ref = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([40, 63], np.int32))
    for s in (1, 2, 7, 64):
        assert same_bits(ref, flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.array([40, 63], np.int32),
                                                      num_splits=s))


def _args(rng=None, **change):
    rng = rng or np.random.default_rng()
    kc, vc = normal(rng, (2, 32, 2, 8), np.float32), normal(rng, (2, 32, 2, 8), np.float32)
    kw = dict(q=normal(rng, (2, 1, 4, 8), np.float32), k_cache=kc, v_cache=vc,
              k=normal(rng, (2, 1, 2, 8), np.float32), v=normal(rng, (2, 1, 2, 8), np.float32),
              cache_seqlens=np.array([3, 31], np.int32))
    kw.update(change)
    return kw


def _ro(x):
    x = x.copy()
    x.flags.writeable = False
    return x


@pytest.mark.parametrize("change, error, text", [
    (dict(v=None), ValueError, ("v: expected an array with k",)),
    (dict(cache_seqlens=None), ValueError, ("cache_seqlens: expected an int or an int32 (batch,) array",)),
    (dict(cache_seqlens=np.array([3, 32], np.int32)), ValueError,
     ("cache_seqlens: expected cache_seqlens[b] + seqlen_new <= the cache's capacity 32", "row 1: 32 + 1 = 33")),
    (dict(cache_seqlens=np.array([3, -1], np.int32)), ValueError, ("cache_seqlens: expected entries >= 0", "[1] = -1")),
    (dict(cache_seqlens=np.array([3, 1], np.int64)), TypeError, ("cache_seqlens: expected dtype int32",)),
    (dict(cache_seqlens=np.array([3], np.int32)), ValueError, ("cache_seqlens: expected shape (2,)",)),
    (dict(cache_seqlens=-2), ValueError, ("cache_seqlens: expected an int >= 0", "-2")),
    (dict(k_cache=np.ones((2, 32, 2, 8), np.float16)), TypeError, ("k_cache: expected the dtype of q (float32)",)),
    (dict(v_cache=np.ones((2, 31, 2, 8), np.float32)), ValueError, ("v_cache: expected the shape of k_cache",)),
    (dict(k=np.ones((2, 1, 1, 8), np.float32)), ValueError, ("k: expected shape (batch, seqlen_new, nheads_k",)),
    (dict(k_cache=np.ones((1, 32, 2, 8), np.float32), v_cache=np.ones((1, 32, 2, 8), np.float32)), ValueError,
     ("k_cache: expected batch_cache >= batch = 2",)),
    (dict(k_cache=np.ones((2, 32, 3, 8), np.float32), v_cache=np.ones((2, 32, 3, 8), np.float32)), ValueError,
     ("k_cache: expected nheads_k dividing nheads=4",)),
    (dict(num_splits=-1), ValueError, ("num_splits: expected an int >= 0",)),
    (dict(num_splits=1.5), TypeError, ("num_splits: expected an int >= 0",)),
    (dict(causal="yes"), TypeError, ("causal: expected a bool",)),
    (dict(return_softmax_lse=1), TypeError, ("return_softmax_lse: expected a bool",)),
    (dict(q=np.ones((2, 4, 8), np.float32)), ValueError, ("q: expected rank 4",)),
])
def test_validation_names_the_argument(change, error, text):
    with pytest.raises(error, match=msg(*text)):
        flash_attn_with_kvcache(**_args(**change))


def test_read_only_cache_is_refused_before_anything_is_written():
    kw = _args()
    kw["k_cache"], kw["v_cache"] = _ro(kw["k_cache"]), kw["v_cache"]
    v_before = kw["v_cache"].copy()
    with pytest.raises(ValueError, match=msg("k_cache: expected a writeable array")):
        flash_attn_with_kvcache(**kw)
    assert same_bits(kw["v_cache"], v_before)


@pytest.mark.parametrize("pool_shape, table, text", [
    ((8, 24, 2, 8), np.array([[0, 1], [2, 3]], np.int32), ("k_cache: expected a page size", "power of two >= 16", "24")),
    ((8, 8, 2, 8), np.array([[0, 1], [2, 3]], np.int32), ("k_cache: expected a page size", "got 8")),
    ((8, 16, 2, 8), np.array([[0, 1], [2, 8]], np.int32), ("block_table: expected the pages row 1 uses in [0, num_blocks = 8)",
                                                           "block_table[1, 1] = 8")),
    ((8, 16, 2, 8), np.array([[0, 1], [-1, 3]], np.int32), ("block_table[1, 0] = -1",)),
    ((8, 16, 2, 8), np.array([[0, 1, 2]], np.int32), ("block_table: expected shape (2, n)",)),
    ((8, 16, 2, 8), np.array([[0, 1], [2, 3]], np.int64), ("block_table: expected dtype int32",)),
])
def test_paged_validation(pool_shape, table, text):
    rng = np.random.default_rng()
    pool = normal(rng, pool_shape, np.float32)
    kw = _args(k_cache=pool, v_cache=pool.copy(), block_table=table, cache_seqlens=np.array([3, 20], np.int32))
    with pytest.raises((ValueError, TypeError), match=msg(*text)):
        flash_attn_with_kvcache(**kw)


def test_unused_block_table_entries_are_not_read():
    """Entries past a row's visible pages may hold anything (as in flash-attn's padded tables)."""
    rng = np.random.default_rng()
    pool = normal(rng, (4, 16, 2, 8), np.float32)
    table = np.array([[0, 99], [1, -5]], np.int32)
    kw = _args(k_cache=pool, v_cache=pool.copy(), block_table=table, cache_seqlens=np.array([3, 10], np.int32))
    flash_attn_with_kvcache(**kw)
