"""Issue 17 on the GPU: flash_attn_varlen_* / flash_attn_with_kvcache / merge_attention on CuPy inputs,
against the float64 oracle by DESIGN.md's rule, per sequence (per cache row). Today they run the chunked
path on the GPU (flashcupy.varlen); the same tests cover the fused varlen / paged / split-KV kernels when
they come. Marked gpu: they skip without a usable GPU. (The test logic was run on the CPU with NumPy in
place of CuPy.)
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_backward_rule, assert_dropout_rule, assert_forward_rule, float_dtypes, same_bits, to_numpy

import flashcupy
from flashcupy import dropout
from flashcupy._arrays import dtype_name

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error")]

DTYPES = float_dtypes()
DTYPE_IDS = [dtype_name(d) for d in DTYPES]
LENS_Q = [5, 0, 1, 70, 3]
LENS_K = [5, 4, 0, 70, 9]


def _cp():
    import cupy

    return cupy


def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed(rng, dtype, h=4, hk=2, d=64):
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q, do = (rng.standard_normal((tq, h, d)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((tk, hk, d)).astype(dtype) for _ in range(2))
    return q, k, v, do, cu(LENS_Q), cu(LENS_K)


def spans(cq, ck):
    return [(int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])) for b in range(len(cq) - 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_forward_backward_by_the_rule(rng, dtype, causal):
    cp = _cp()
    q, k, v, do, cq, ck = packed(rng, dtype)
    fwd = flashcupy.flash_attn_varlen_forward(*(cp.asarray(x) for x in (q, k, v, cq, ck)), 70, 70, causal=causal)
    assert isinstance(fwd.out, cp.ndarray) and isinstance(fwd.lse, cp.ndarray)
    grads = flashcupy.flash_attn_varlen_backward(cp.asarray(do), *(cp.asarray(x) for x in (q, k, v)), forward=fwd)
    out, lse = to_numpy(fwd.out), to_numpy(fwd.lse)
    dq, dk, dv = (to_numpy(g) for g in grads)
    for q0, q1, k0, k1 in spans(cq, ck):
        if q1 == q0:
            continue
        if k1 == k0:
            assert not np.any(out[q0:q1]) and np.all(lse[:, q0:q1] == -np.inf) and not np.any(dq[q0:q1])
            continue
        qb, kb, vb, dob = q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], do[q0:q1][None]
        assert_forward_rule(out[q0:q1][None], lse[:, q0:q1][None], qb, kb, vb, causal=causal)
        assert_backward_rule([dq[q0:q1][None], dk[k0:k1][None], dv[k0:k1][None]], dob, qb, kb, vb, causal=causal)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if dtype_name(d) in ("float16", "bfloat16")],
                         ids=[n for n in DTYPE_IDS if n in ("float16", "bfloat16")])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fused_varlen_forward_by_the_rule(monkeypatch, rng, dtype, causal, head_dim):
    """The fused varlen forward (FLASHCUPY_VARLEN_FUSED=1: flashcupy._gpu.forward_varlen, the mma.sync
    kernel with FEAT_VARLEN) per sequence by the rule, empty sequences included, with the score features
    too, and its backward (the chunked path's) from its out and lse."""
    cp = _cp()
    monkeypatch.setenv("FLASHCUPY_VARLEN_FUSED", "1")
    from flashcupy import _gpu

    calls = []
    real = _gpu.forward_varlen
    monkeypatch.setattr(_gpu, "forward_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, do, cq, ck = packed(rng, dtype, d=head_dim)
    feats = [{}, dict(window_size=(20, 3), softcap=5.0, alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05], np.float32),
                      sinks=np.array([0.5, -1.0, 0.0, 2.0], np.float32))]
    for feat in feats:
        on_gpu = {n: cp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in feat.items()}
        fwd = flashcupy.flash_attn_varlen_forward(*(cp.asarray(x) for x in (q, k, v, cq, ck)), 70, 70, causal=causal,
                                                  **on_gpu)
        grads = flashcupy.flash_attn_varlen_backward(cp.asarray(do), *(cp.asarray(x) for x in (q, k, v)), forward=fwd)
        out, lse = to_numpy(fwd.out), to_numpy(fwd.lse)
        dq, dk, dv = (to_numpy(g) for g in grads[:3])
        for q0, q1, k0, k1 in spans(cq, ck):
            if q1 == q0:
                continue
            if k1 == k0:
                sink = -np.inf if "sinks" not in feat else feat["sinks"][:, None]
                assert not np.any(out[q0:q1]) and np.array_equal(lse[:, q0:q1], np.broadcast_to(sink, lse[:, q0:q1].shape))
                continue
            qb, kb, vb, dob = q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], do[q0:q1][None]
            assert_forward_rule(out[q0:q1][None], lse[:, q0:q1][None], qb, kb, vb, causal=causal, **feat)
            if "sinks" not in feat:
                assert_backward_rule([dq[q0:q1][None], dk[k0:k1][None], dv[k0:k1][None]], dob, qb, kb, vb,
                                     causal=causal, **feat)
    assert len(calls) == len(feats)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_dropout_window_by_the_rule(rng, dtype):
    cp = _cp()
    q, k, v, do, cq, ck = packed(rng, dtype)
    fwd = flashcupy.flash_attn_varlen_forward(*(cp.asarray(x) for x in (q, k, v, cq, ck)), 70, 70, dropout_p=0.2,
                                              causal=True, window_size=(9, 0), seed=(5, 1))
    grads = [to_numpy(g) for g in flashcupy.flash_attn_varlen_backward(cp.asarray(do), *(cp.asarray(x) for x in (q, k, v)),
                                                                       forward=fwd)]
    keep = dropout.keep_mask(5, 1, len(LENS_Q), q.shape[1], 70, 70, 0.2)
    out = to_numpy(fwd.out)
    for b, (q0, q1, k0, k1) in enumerate(spans(cq, ck)):
        if q1 > q0 and k1 > k0:
            assert_dropout_rule(out[q0:q1][None], [grads[0][q0:q1][None], grads[1][k0:k1][None], grads[2][k0:k1][None]],
                                do[q0:q1][None], q[q0:q1][None], k[k0:k1][None], v[k0:k1][None],
                                keep[b:b + 1, :, :q1 - q0, :k1 - k0], dropout.effective_dropout_p(0.2), causal=True,
                                window_size=(9, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decode_step(rng, dtype, paged):
    """One decode step (seqlen_q 1, GQA 8 over 2 heads) with an append: the cache on the GPU is the
    test's model element by element, and out meets the rule over each row's visible prefix."""
    cp = _cp()
    batch, cap, h, hk, d, page = 3, 256, 8, 2, 64, 64
    model_k, model_v = (rng.standard_normal((batch, cap, hk, d)).astype(dtype) for _ in range(2))
    lens = np.array([0, 100, cap - 1], np.int32)
    q = rng.standard_normal((batch, 1, h, d)).astype(dtype)
    kn, vn = (rng.standard_normal((batch, 1, hk, d)).astype(dtype) for _ in range(2))
    if paged:
        table = rng.permutation(batch * cap // page).reshape(batch, cap // page).astype(np.int32)
        pool_k = np.empty((batch * cap // page, page, hk, d), dtype)
        pool_v = np.empty_like(pool_k)
        for r in range(batch):
            for j, p in enumerate(table[r]):
                pool_k[p], pool_v[p] = model_k[r, j * page:(j + 1) * page], model_v[r, j * page:(j + 1) * page]
        kc, vc, bt = cp.asarray(pool_k), cp.asarray(pool_v), cp.asarray(table)
    else:
        kc, vc, bt = cp.asarray(model_k), cp.asarray(model_v), None
    out, lse = flashcupy.flash_attn_with_kvcache(cp.asarray(q), kc, vc, cp.asarray(kn), cp.asarray(vn),
                                                 cache_seqlens=cp.asarray(lens), block_table=bt, causal=True,
                                                 return_softmax_lse=True)
    assert isinstance(out, cp.ndarray)
    for r in range(batch):
        model_k[r, lens[r]], model_v[r, lens[r]] = kn[r, 0], vn[r, 0]
    got_k, got_v = to_numpy(kc), to_numpy(vc)
    if paged:
        got_k = np.stack([np.concatenate([got_k[p] for p in row]) for row in table])
        got_v = np.stack([np.concatenate([got_v[p] for p in row]) for row in table])
    assert same_bits(got_k, model_k) and same_bits(got_v, model_v)
    out, lse = to_numpy(out), to_numpy(lse)
    for r in range(batch):
        n = int(lens[r]) + 1
        assert_forward_rule(out[r:r + 1], lse[r:r + 1], q[r:r + 1], model_k[r:r + 1, :n], model_v[r:r + 1, :n],
                            causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_on_the_gpu(rng, dtype):
    cp = _cp()
    q, k, v = (rng.standard_normal((2, 9, 4, 64)).astype(dtype) for _ in range(3))
    parts = [flashcupy.flash_attn_forward(*(cp.asarray(x) for x in (q, k[:, s], v[:, s])))
             for s in (slice(0, 4), slice(4, 4), slice(4, 9))]
    out, lse = flashcupy.merge_attention([p.out for p in parts], [p.lse for p in parts])
    assert isinstance(out, cp.ndarray)
    assert_forward_rule(out, lse, q, k, v)


def test_host_offsets_with_device_queries_are_refused(rng):
    cp = _cp()
    q, k, v, _, cq, ck = packed(rng, np.float32)
    with pytest.raises(TypeError, match="expected every array on one side"):
        flashcupy.flash_attn_varlen_func(*(cp.asarray(x) for x in (q, k, v)), cq, ck, 70, 70)
