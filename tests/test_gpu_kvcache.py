"""flash_attn_with_kvcache on the GPU (issue 17): the split-KV decode kernels (cuda/flash_decode.cu)
against the oracle over each row's visible cache prefix, by DESIGN.md's rule; every dtype, head dims
32..256, GQA packings of 1..32 rows per KV head, seqlen_q 1..5 (causal chunks), contiguous and paged
caches, num_splits 0 / 1 / odd / more splits than keys, empty and full rows, window / softcap / ALiBi;
the in-place append; a fixed num_splits bitwise reproducible; paged bitwise equal to contiguous; and
the chunked path (FLASHCUPY_DECODE=0, unaligned rows, other head dims) agreeing within the rule.
Fresh random inputs every run; marked gpu (skips without a usable GPU); warnings are errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_forward_rule, float_dtypes, same_bits, to_paged

from flashcupy import flash_attn_with_kvcache
from flashcupy._arrays import dtype_name

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error")]
DTYPES = float_dtypes()
PAGE = 16


def _cp():
    import cupy

    return cupy


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def check_rows(out, lse, q, k, v, lens, causal, **feats):
    """The rule for every batch row over its first lens[b] keys (out, lse: NumPy)."""
    for b in range(q.shape[0]):
        n = int(lens[b])
        fk = dict(feats)
        if fk.get("alibi_slopes") is not None and np.ndim(fk["alibi_slopes"]) == 2:
            fk["alibi_slopes"] = fk["alibi_slopes"][b:b + 1]
        assert_forward_rule(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal, **fk)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("heads, seqlen_q", [((8, 8), 1), ((32, 8), 1), ((16, 2), 2), ((8, 1), 5)],
                         ids=["mha", "gqa4", "rows16", "rows40"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_decode_matches_oracle(dtype, head_dim, heads, seqlen_q, causal, rng):
    cp = _cp()
    h, hk = heads
    batch, cap = 3, 300
    k, v = normal(rng, (batch, cap, hk, head_dim), dtype), normal(rng, (batch, cap, hk, head_dim), dtype)
    q = normal(rng, (batch, seqlen_q, h, head_dim), dtype)
    lens = np.array([cap, 0, int(rng.integers(1, cap))], np.int32)
    for splits in (0, 1, 7):
        out, lse = flash_attn_with_kvcache(cp.asarray(q), cp.asarray(k), cp.asarray(v), cache_seqlens=cp.asarray(lens),
                                           causal=causal, num_splits=splits, return_softmax_lse=True)
        out, lse = out.get(), lse.get()
        assert not np.any(out[1]) and np.all(lse[1] == -np.inf)  # the empty row
        check_rows(out, lse, q, k, v, lens, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paged_append_and_features(dtype, causal, rng):
    """Paged cache with new keys appended in place (checked element by element, spare pages untouched),
    window + softcap + ALiBi per (batch, head); paged bitwise equal to the contiguous call."""
    cp = _cp()
    batch, cap, h, hk, d, sq = 4, 8 * PAGE, 8, 2, 128, 3
    kc, vc = normal(rng, (batch, cap, hk, d), dtype), normal(rng, (batch, cap, hk, d), dtype)
    kp, table = to_paged(rng, kc, PAGE)
    vp = kp.copy()
    for r in range(batch):  # v pages at the same table positions
        for j in range(cap // PAGE):
            vp[table[r, j]] = vc[r, j * PAGE:(j + 1) * PAGE]
    lens = np.array([0, 17, PAGE, cap - sq], np.int32)
    q = normal(rng, (batch, sq, h, d), dtype)
    kn, vn = normal(rng, (batch, sq, hk, d), dtype), normal(rng, (batch, sq, hk, d), dtype)
    slopes = rng.uniform(0.02, 0.5, (batch, h)).astype(np.float32)
    feats = dict(window_size=(40, 0 if causal else 7), softcap=5.0)
    g = {n: cp.asarray(x) for n, x in dict(q=q, kc=kc, vc=vc, kp=kp, vp=vp, kn=kn, vn=vn, table=table, lens=lens,
                                             slopes=slopes).items()}
    kw = dict(cache_seqlens=g["lens"], causal=causal, return_softmax_lse=True, alibi_slopes=g["slopes"], num_splits=3,
              **feats)
    a = flash_attn_with_kvcache(g["q"], g["kc"], g["vc"], g["kn"], g["vn"], **kw)
    spare_before = g["kp"][np.setdiff1d(np.arange(kp.shape[0]), table.ravel())].copy()
    b = flash_attn_with_kvcache(g["q"], g["kp"], g["vp"], g["kn"], g["vn"], block_table=g["table"], **kw)
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    k_model, v_model = kc.copy(), vc.copy()
    for r in range(batch):
        k_model[r, lens[r]:lens[r] + sq], v_model[r, lens[r]:lens[r] + sq] = kn[r], vn[r]
    assert same_bits(g["kc"].get(), k_model) and same_bits(g["vc"].get(), v_model)
    for r in range(batch):
        for j in range(cap // PAGE):
            assert same_bits(g["kp"][int(table[r, j])].get(), k_model[r, j * PAGE:(j + 1) * PAGE])
    spare = np.setdiff1d(np.arange(kp.shape[0]), table.ravel())
    assert same_bits(g["kp"][spare], spare_before)
    check_rows(a[0].get(), a[1].get(), q, k_model, v_model, lens + sq, causal, alibi_slopes=slopes, **feats)


def test_fixed_splits_are_reproducible_and_all_split_counts_agree(rng):
    cp = _cp()
    dtype = float_dtypes()[1]
    batch, cap, h, hk, d = 2, 4000, 32, 8, 128
    k, v = normal(rng, (batch, cap, hk, d), dtype), normal(rng, (batch, cap, hk, d), dtype)
    q = normal(rng, (batch, 1, h, d), dtype)
    gq, gk, gv = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    lens = np.array([cap, 1234], np.int32)
    for splits in (1, 2, 5, 64, 256):
        a = flash_attn_with_kvcache(gq, gk, gv, cache_seqlens=cp.asarray(lens), num_splits=splits, return_softmax_lse=True)
        b = flash_attn_with_kvcache(gq, gk, gv, cache_seqlens=cp.asarray(lens), num_splits=splits, return_softmax_lse=True)
        assert same_bits(a[0], b[0]) and same_bits(a[1], b[1]), splits
        check_rows(a[0].get(), a[1].get(), q, k, v, lens, False)


def test_chunked_path_agrees_and_unsupported_layouts_fall_back(rng, monkeypatch):
    """FLASHCUPY_DECODE=0 (the chunked path), a head dim the kernels do not take (80) and a cache view
    whose rows are not 16-byte aligned all give results within the rule."""
    cp = _cp()
    dtype = np.float16
    batch, cap, h, hk = 2, 200, 8, 2
    lens = np.array([cap, 77], np.int32)
    for d, offset in ((64, 0), (80, 0), (64, 1)):
        kbig = normal(rng, (batch, cap, hk, d + offset), dtype)
        vbig = normal(rng, (batch, cap, hk, d + offset), dtype)
        k, v = kbig[..., offset:], vbig[..., offset:]
        q = normal(rng, (batch, 2, h, d), dtype)
        gk, gv = cp.asarray(kbig)[..., offset:], cp.asarray(vbig)[..., offset:]
        for env in ("1", "0"):
            monkeypatch.setenv("FLASHCUPY_DECODE", env)
            out, lse = flash_attn_with_kvcache(cp.asarray(q), gk, gv, cache_seqlens=cp.asarray(lens), causal=True,
                                               return_softmax_lse=True)
            check_rows(out.get(), lse.get(), q, np.ascontiguousarray(k), np.ascontiguousarray(v), lens, True)
