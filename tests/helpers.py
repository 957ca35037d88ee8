"""Shared test helpers. The correctness rule, naive attention in a given dtype and the random inputs
are the public module flashcupy.testing (re-exported here, the tests' one copy of them); what stays here
is GPU-side: uploads, NaN-padded views, out-of-bounds checks, BHSD views, the tuning sweep's candidates.

    from helpers import assert_forward_rule, assert_backward_rule, random_inputs
"""

from __future__ import annotations

import numpy as np

from flashcupy.testing import *  # noqa: F401,F403  (the rule, naive attention, inputs)
from flashcupy.testing import (ORDERS, TF32_EPS, assert_backward_rule, assert_forward_rule,  # noqa: F401
                               backward_rule_inputs, check_rule, dtype_name, eps, forward_rule_inputs,
                               magnitude_of, max_abs_err, naive_backward, random_inputs, rule_bound, to_numpy)

# ---------------------------------------------------------------------------------------------------
# cases found by the GPU fuzz campaign (flashcupy fuzz), kept as explicit regressions: (Case repr,
# allow_tf32). 2026-12-03, H200: softmax_scale 0 with ALiBi, where P is a function of the positions
# alone and its roundings recur across rows; the rule's bias criterion took the rows as independent and
# rejected correct results (the kernels matched a CPU emulation of their rounding to three digits, and
# naive attention in DESIGN.md's order failed too). testing.Magnitudes.se_factor is the fix.
FUZZ_REGRESSIONS = [
    ("Case(batch=2, seqlen_q=132, seqlen_k=152, nheads=1, nheads_k=1, head_dim=128, dtype='bfloat16', causal=True, "
     "softmax_scale=0.0, seed=100003301409278, window_size=(65, 148), alibi_slopes=(0.10773637145757675,))", False),
    ("Case(batch=2, seqlen_q=176, seqlen_k=104, nheads=1, nheads_k=1, head_dim=64, dtype='float32', causal=True, "
     "softmax_scale=0.0, seed=101103336509263, window_size=(-1, 82), softcap=0.5, alibi_slopes=(0.09503614902496338,), "
     "sinks=(2.55378794670105,))", True),
    ("Case(batch=1, seqlen_q=129, seqlen_k=129, nheads=2, nheads_k=2, head_dim=64, dtype='bfloat16', causal=False, "
     "softmax_scale=0.0, seed=100403314109281, alibi_slopes=((0.9087188839912415, 0.2297653704881668),), "
     "sinks=(-0.5001769065856934, -0.8973727822303772))", False),
    ("Case(batch=2, seqlen_q=226, seqlen_k=226, nheads=3, nheads_k=1, head_dim=16, dtype='bfloat16', causal=False, "
     "softmax_scale=0.0, seed=100503316709089, window_size=(-1, 12), alibi_slopes=(0.3011201024055481, "
     "0.23101526498794556, 0.0434911884367466))", False),
    ("Case(batch=2, seqlen_q=196, seqlen_k=196, nheads=6, nheads_k=2, head_dim=64, dtype='float16', causal=False, "
     "softmax_scale=0.0, seed=100903330809204, softcap=5.0, alibi_slopes=(0.2219935953617096, 0.04131319001317024, "
     "0.41278189420700073, 0.29193463921546936, 0.01702372543513775, 0.38116535544395447), "
     "sinks=(-2.212479829788208, 0.40726763010025024, -3.1808948516845703, -1.4668772220611572, "
     "-0.6948885321617126, 0.22094754874706268))", False),
]

# The H200 campaign of 2026-12-04 (142,009 cases, 10 failures; bench/NOTES.md): (case, allow_tf32, the
# environment of the fuzz process that found it, what it was). Two were kernel bugs (the key tail of
# the mma.sync backward), eight the rule's (flush to zero, a sequential dot product, TF32 operands).
FUZZ_REGRESSIONS_FTZ_DOT = [
    # 0: mma.sync fp16 backward: the unmasked key tail's P = 2^(0 - lse) (ALiBi over one key) -> dq NaN
    ("Case(batch=2, seqlen_q=162, seqlen_k=1, nheads=4, nheads_k=2, head_dim=128, dtype='float16', "
     "causal=False, softmax_scale=None, seed=100103305309281, alibi_slopes=(0.6143873333930969, "
     "0.9428126811981201, 0.04970517382025719, 0.31992849707603455), distribution='large')",
     False, {"FLASHCUPY_SM90": "0"}),
    # 1: mma.sync fp16 hd256 backward: the same, softcap over five keys
    ("Case(batch=2, seqlen_q=192, seqlen_k=5, nheads=2, nheads_k=1, head_dim=256, dtype='float16', "
     "causal=False, softmax_scale=None, seed=101003334309286, softcap=30.0, distribution='large', "
     "layout='padded')",
     False, {}),
    # 2: TF32 dq, one query row: dS rounded to TF32 (rule_bound's operand_terms)
    ("Case(batch=2, seqlen_q=1, seqlen_k=33, nheads=1, nheads_k=1, head_dim=16, dtype='float32', "
     "causal=True, softmax_scale=0.019624294713139534, seed=101103339409328, window_size=(13, -1), "
     "alibi_slopes=((0.9110510349273682,), (0.8242087364196777,)), sinks=(2.0778496265411377,), "
     "distribution='outliers')",
     True, {}),
    # 3: TF32 out, one query row: P rounded to TF32 (operand_terms)
    ("Case(batch=1, seqlen_q=1, seqlen_k=54, nheads=1, nheads_k=1, head_dim=8, dtype='float32', "
     "causal=False, softmax_scale=0.33912286162376404, seed=101103339409407, window_size=(35, -1), "
     "softcap=1.0, sinks=(3.698568344116211,), distribution='outliers', layout='bhsd')",
     True, {}),
    # 4: mma.sync bf16: dsinks ~1e-41 flushed to 0 by CuPy's -ftz=true (Magnitudes.ftz)
    ("Case(batch=1, seqlen_q=1, seqlen_k=176, nheads=1, nheads_k=1, head_dim=128, dtype='bfloat16', "
     "causal=False, softmax_scale=0.14931848645210266, seed=101303346709262, window_size=(-1, 26), "
     "sinks=(0.6948968172073364,), distribution='large')",
     False, {"FLASHCUPY_SM90": "0"}),
    # 5: SIMT fp32 hd192 LSE: one FMA chain per score, 20 ulps (Magnitudes.sigma's DOT_Z)
    ("Case(batch=2, seqlen_q=253, seqlen_k=253, nheads=6, nheads_k=2, head_dim=192, dtype='float32', "
     "causal=True, softmax_scale=None, seed=100203307309182, window_size=(-1, 97), "
     "distribution='outliers')",
     False, {}),
    # 6: TF32: dsinks ~3e-39 flushed to 0 (ftz)
    ("Case(batch=1, seqlen_q=1, seqlen_k=229, nheads=1, nheads_k=1, head_dim=8, dtype='float32', "
     "causal=False, softmax_scale=0.6386207938194275, seed=100303312509245, window_size=(138, -1), "
     "sinks=(-2.795039415359497,), distribution='large')",
     True, {}),
    # 7: SIMT fp32 hd128 LSE, large scores (DOT_Z)
    ("Case(batch=1, seqlen_q=1, seqlen_k=224, nheads=6, nheads_k=2, head_dim=128, dtype='float32', "
     "causal=False, softmax_scale=None, seed=100403318009265, sinks=(-2.4026496410369873, "
     "-0.6273366808891296, -0.482126384973526, 2.318331718444824, -1.0989274978637695, "
     "1.228996753692627), distribution='large', layout='padded')",
     False, {}),
    # 8: SIMT fp32 hd256 LSE, large scores (DOT_Z)
    ("Case(batch=1, seqlen_q=1, seqlen_k=200, nheads=3, nheads_k=1, head_dim=256, dtype='float32', "
     "causal=False, softmax_scale=None, seed=100603320509101, window_size=(175, 36), "
     "distribution='large')",
     False, {}),
    # 9: Hopper bf16: dsinks ~4e-38 flushed to 0 (ftz)
    ("Case(batch=1, seqlen_q=1, seqlen_k=177, nheads=2, nheads_k=1, head_dim=128, dtype='bfloat16', "
     "causal=True, softmax_scale=0.1633581966161728, seed=100803327409142, window_size=(116, -1), "
     "sinks=(0.20170265436172485, -1.2786396741867065), distribution='large', layout='padded')",
     False, {}),
]

# ---------------------------------------------------------------------------------------------------
# paged KV caches (flash_attn_with_kvcache's tests, CPU and GPU)


def to_paged(rng, cache, page=16, spare=3):
    """The contiguous cache (batch, seqlen_cache, hk, d) as pages in a shuffled pool with `spare` pages of
    fresh noise, and its block_table (batch, seqlen_cache // page) int32."""
    b, s, hk, d = cache.shape
    nb = s // page
    pool = rng.standard_normal((b * nb + spare, page, hk, d)).astype(cache.dtype)
    table = rng.permutation(b * nb + spare)[:b * nb].reshape(b, nb).astype(np.int32)
    for r in range(b):
        for j in range(nb):
            pool[table[r, j]] = cache[r, j * page:(j + 1) * page]
    return pool, table


def from_paged(pool, table):
    """The contiguous cache the pages of block_table hold, row by row."""
    return np.stack([np.concatenate([pool[p] for p in row]) for row in table])


# ---------------------------------------------------------------------------------------------------
# GPU-side inputs


def to_gpu(*xs):
    """CuPy copies of NumPy arrays."""
    import cupy

    return [cupy.asarray(x) for x in xs]


def same_bits(a, b) -> bool:
    """a and b (both NumPy or both CuPy) have the same dtype, shape and bytes."""
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    a, b = xp.ascontiguousarray(a), xp.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(xp.array_equal(a.view(xp.uint8), b.view(xp.uint8)))


def nan_padded(x):
    """A CuPy view of the 4-D NumPy array x inside a larger NaN-filled buffer (offset in every dimension,
    extra rows and 56 extra columns after it): a kernel reading outside the view reads NaN."""
    import cupy

    big = np.full((x.shape[0] + 1, x.shape[1] + 37, x.shape[2] + 1, x.shape[3] + 64), np.nan, dtype=x.dtype)
    view = (slice(0, x.shape[0]), slice(5, 5 + x.shape[1]), slice(0, x.shape[2]), slice(8, 8 + x.shape[3]))
    big[view] = x
    return cupy.asarray(big)[view]


def assert_no_out_of_bounds_reads(q, k, v, dout, *, causal, fwd_kw=None, bwd_kw=None):
    """Forward and backward on NaN-padded views of q, k, v, dout, out (and an lse view inside a NaN
    buffer) give no NaN and the same bits as on compact copies. The backward must be reproducible
    under bwd_kw. Returns the compact run's (AttnForward, (dq, dk, dv))."""
    import cupy

    import flashcupy

    fwd_kw, bwd_kw = fwd_kw or {}, bwd_kw or {}
    ref = flashcupy.flash_attn_forward(*to_gpu(q, k, v), causal=causal, **fwd_kw)
    res = flashcupy.flash_attn_forward(*(nan_padded(x) for x in (q, k, v)), causal=causal, **fwd_kw)
    assert not cupy.isnan(res.out).any()
    assert same_bits(res.out, ref.out) and same_bits(res.lse, ref.lse)
    ref_g = flashcupy.flash_attn_backward(*to_gpu(dout, q, k, v), ref.out, ref.lse, causal=causal, **bwd_kw)
    b, h, sq = ref.lse.shape
    big_lse = cupy.full((b, h + 1, sq + 9), cupy.nan, dtype=ref.lse.dtype)
    big_lse[:, :h, 3 : 3 + sq] = ref.lse
    got_g = flashcupy.flash_attn_backward(*(nan_padded(x) for x in (dout, q, k, v)), nan_padded(to_numpy(ref.out)),
                                          big_lse[:, :h, 3 : 3 + sq], causal=causal, **bwd_kw)
    for got, want in zip(got_g, ref_g):
        assert not cupy.isnan(got).any()
        assert same_bits(got, want)
    return ref, ref_g


def bhsd_view(x):
    """A BSHD-shaped view of a BHSD-contiguous copy (strides permuted, last dim contiguous)."""
    import cupy

    return cupy.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------------
# configs that bench/bench_simt.py --sweep times: compiled in CI (no spill) and run on the GPU first


def sweep_candidates():
    """(SimtFwdConfig list, DmmaBwdConfig list) of flashcupy._configs' SIMT_FWD_SWEEP / DMMA_BWD_SWEEP (the
    tables bench/bench_simt.py --sweep times), every head dim listed there."""
    from flashcupy._configs import DMMA_BWD_SWEEP, SIMT_FWD_SWEEP, DmmaBwdConfig, SimtFwdConfig

    fwd = [SimtFwdConfig("float", hd, *c) for hd, cs in SIMT_FWD_SWEEP.items() for c in cs]
    bwd = [DmmaBwdConfig(hd, *c) for hd, cs in DMMA_BWD_SWEEP.items() for c in cs]
    return fwd, bwd


def msg(*parts):
    """A regex matching the parts in order, each escaped (pytest.raises(match=...))."""
    import re

    return ".*".join(re.escape(p) for p in parts)
