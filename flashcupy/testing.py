"""flashcupy.testing: check any attention implementation against a float64 oracle by a rule that
rejects 1% errors (public; needs NumPy, and hypothesis for `attention_problems`).

    from flashcupy.testing import check_attention
    report = check_attention(my_attention)        # my_attention(q, k, v, *, causal, softmax_scale) -> out
    print(report.worst)                           # the largest error / bound ratio, with a reproducer

- check_attention(impl, ...): random problems (shapes with seqlen 1 and ragged lengths, GQA, causal,
  float16 / bfloat16 / float32 / float64), each checked by assert_attention_close; AssertionError on
  the first failure, naming the case and a line that reproduces it.
- assert_attention_close(out, q, k, v, ...): one output (and optionally its LSE) by the rule below.
- attention_problems(): a hypothesis strategy of the same problems, for your own property tests.
- assert_forward_rule / assert_backward_rule, naive_forward / naive_backward, random_inputs: the
  pieces flashcupy's own tests use (tests/helpers.py re-exports them).

The correctness rule (DESIGN.md, "Correctness rule"): the oracle is NumPy float64
(flashcupy.reference). For an input dtype T,

    err_kernel = max|kernel - oracle|      err_naive = max|naive attention computed in T - oracle|
    outputs:   err_kernel <= 2 * err_naive + floor
    gradients: err_kernel <= 2 * err_naive + floor    (GRAD_FACTOR; once 3, tightened with the rule)
    floor = FLOOR_ULPS ulps of T at the output's magnitude (FLOOR_ULPS * eps(T) * max|oracle|)
            + one ulp of the accumulation dtype at the magnitude of the summed terms, amplified by
              the scores' rounding error through exp(), a head_dim-term dot product's (DOT_Z of its
              standard deviations; matters for float32 inputs only)
            + TF32: the last product's operand (P, dS) rounded to TF32 (criterion 1)
            + a flush to zero of float32 values under FTZ_TINY (CuPy's -ftz=true; decides only
              results that are themselves subnormal)
            + gradients: one ulp of T at what the out read back in T moves dq, dk by through
              D = rowsum(dO o O) (matters where dq, dk cancel: rows with one or few visible keys)
    float64:   err_kernel <= 1e-12 * magnitude (of the output, or of its terms where it cancels)
See rule_bound for why each floor term is inherent to any kernel following DESIGN.md's equations.

"Naive attention computed in T" follows flash-attn's own tests (attention_ref with upcast=False):
every matmul reads T operands, accumulates in float32 (float64 for float64) and rounds its result
to T; the softmax reads T scores, computes in float32 and rounds P to T; q is scaled in T before
q k^T. Its backward is autograd through those same ops.

TF32 (flash_attn_*(..., allow_tf32=True) on float32 inputs): T is float32 with TF32 products, what
torch computes with allow_tf32. naive_forward / naive_backward(..., tf32=True) round both operands of
every matmul to TF32 (tf32_round: 10 explicit mantissa bits, round to nearest with ties away from
zero, as PTX cvt.rna.tf32.f32), multiply exactly and accumulate in float32; everything else (the
softmax, dS, the scaling, every stored tensor) stays float32. With float32 products the choice of
where q is scaled and P normalised is lost in the floor; with TF32 products it decides which values
get rounded, so two equally naive evaluations carry independent TF32 errors, and a maximum over a
few values (one LSE per row; a problem with one query row) of one can be more than twice the
other's. assert_forward_rule / assert_backward_rule(..., tf32=True) therefore take err_naive as the
larger of the two naive orders: flash-attn's attention_ref (order="torch": q scaled before q k^T,
P normalised before P V) and DESIGN.md's equations (order="design": S = softmax_scale * Q K^T,
O = exp(S - m) V / l, dK = softmax_scale * dS^T Q). The floor stays in float32 ulps except the
gradients' stored-output term, which uses TF32's eps (see rule_bound).

Every function accepts NumPy arrays or anything with .get() (CuPy), so GPU tests can use them too.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flashcupy import _features, reference
from flashcupy._arrays import bfloat16, dtype_name, lse_dtype

FLOAT64_RTOL = 1e-12
TF32_MANTISSA_BITS = 10  # explicit mantissa bits of TF32 (float32 has 23)
TF32_EPS = 2.0**-TF32_MANTISSA_BITS  # its machine epsilon; unit roundoff TF32_EPS / 2 = 2^-11
OUT_FACTOR = 2  # criterion 1: err_kernel <= 2 err_naive + floor, outputs
GRAD_FACTOR = 2  # and gradients
ULP_OFFSET = 0.3  # criterion 1's floor: one ulp of T at |oracle| + 0.3 (flash-attn's)
RMS_FACTOR = 1.5  # criterion 2: rms(err_kernel) <= 1.5 rms(err_naive) + floor (why: statistics_bounds)
BIAS_FACTOR = 2  # criterion 2: |bias(err_kernel)| <= 2 |bias(err_naive)| + NOISE_Z standard errors + floor
NOISE_Z = 4  # standard errors of random rounding a statistic of criterion 2 may sit away from 0
DOT_Z = 5  # standard deviations of its d roundings a score's d-term dot product in A may sit off (Magnitudes.sigma)
FTZ_TINY = float(np.finfo(np.float32).tiny)  # float32's smallest normal: what a flush to zero may drop (rule_bound)


# ---------------------------------------------------------------------------------------------------
# arrays and dtypes


def to_numpy(x):
    """NumPy view/copy of a NumPy or CuPy array (anything with .get())."""
    if x is None:
        return None
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x)


def eps(dtype) -> float:
    """Machine epsilon of dtype (float16, bfloat16, float32, float64)."""
    dtype = np.dtype(dtype)
    if bfloat16() is not None and dtype == bfloat16():
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def accum_dtype(dtype):
    """Accumulation dtype of naive attention in dtype: float64 for float64, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def float_dtypes():
    """The input dtypes the library supports on this machine (bfloat16 only with ml_dtypes)."""
    dts = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
    if bfloat16() is not None:
        dts.insert(1, bfloat16())
    return dts


def random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype=np.float32, *,
                  amplitude=1.0, grad=False):
    """Fresh standard-normal q, k, v (and dout when grad) in dtype, BSHD. Never zeros.

    amplitude scales q and k (larger means peakier softmax rows).
    """
    def draw(*shape, a=1.0):
        return (a * rng.standard_normal(shape)).astype(dtype)

    q = draw(batch, seqlen_q, nheads, head_dim, a=amplitude)
    k = draw(batch, seqlen_k, nheads_k, head_dim, a=amplitude)
    v = draw(batch, seqlen_k, nheads_k, head_dim)
    if not grad:
        return q, k, v
    return q, k, v, draw(batch, seqlen_q, nheads, head_dim)


# ---------------------------------------------------------------------------------------------------
# naive attention computed in dtype T


def tf32_round(x):
    """float32 -> the nearest TF32 value, as a float32 array (what PTX cvt.rna.tf32.f32 feeds an
    mma.sync .tf32): keep the sign, the 8 exponent bits and the top 10 of the 23 mantissa bits; round
    the 13 dropped bits to nearest, ties away from zero (add half of the kept ulp, 0x1000, to the
    magnitude's bits, then clear the 13 low bits; a carry moves into the exponent, so the largest
    finite floats round to inf). Relative error <= 2^-11 for normal numbers; values already
    representable are returned unchanged; inf and NaN are kept as they are.
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"tf32_round: expected float32, got {x.dtype}")
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(x), rounded, x)


def _round(x, dtype):
    """Round x to dtype T and return it in T's accumulation dtype (the value a T tensor holds)."""
    return np.asarray(x).astype(dtype).astype(accum_dtype(dtype))


def _mm(a, b, dtype, tf32=False):
    """a @ b with T operands, accumulation in float32 (float64 for float64), result rounded to T.
    tf32 (float32 only): both operands rounded to TF32 first (tf32_round), products accumulated in float32."""
    acc = accum_dtype(dtype)
    a, b = a.astype(acc), b.astype(acc)
    if tf32:
        a, b = tf32_round(a), tf32_round(b)
    return _round(np.matmul(a, b), dtype)


def _naive_setup(q, k, v, dtype, softmax_scale, tf32=False):
    q, k, v = (to_numpy(x) for x in (q, k, v))
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    if tf32 and dtype != np.float32:
        raise ValueError(f"tf32: naive attention with TF32 products needs float32, got {dtype_name(dtype)}")
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    group = q.shape[2] // k.shape[2]
    # (B, H, S, D) tensors in T (held in the accumulation dtype); k, v repeated over the group (GQA).
    qh = _round(q.transpose(0, 2, 1, 3), dtype)
    kh = _round(np.repeat(k.transpose(0, 2, 1, 3), group, axis=1), dtype)
    vh = _round(np.repeat(v.transpose(0, 2, 1, 3), group, axis=1), dtype)
    return qh, kh, vh, dtype, scale, group


ORDERS = ("torch", "design")
FEATURE_DEFAULTS = dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None)
# Case's input fields (issue 19): how q, k, v are drawn and how they lie in memory; the defaults are the
# cases of earlier versions (N(0, 1), contiguous BSHD), which a repr leaves out.
INPUT_DEFAULTS = dict(distribution="normal", layout="bshd")
# Case's call options (issue 19): fused dropout (its keep-mask from the case's seed: Case.dropout_seed) and
# a block mask (block_q, block_k, density; its bits from the seed: Case.block_mask_bool). Off by default.
OPTION_DEFAULTS = dict(dropout_p=0.0, block_mask=None)
BLOCK_SIZES = (64, 128)  # block_q / block_k random_cases(options=True) draws
DROPOUT_PS = (0.1, 0.25)
DISTRIBUTIONS = ("normal", "large", "outliers", "ties")
LAYOUTS = ("bshd", "bhsd", "padded")
OUTLIER_FRACTION = 1e-3  # FA3's outlier mix (arXiv 2407.08608 Sec. 4.3): N(0, 1) + N(0, 100) on 0.1% of entries
LARGE_AMPLITUDE = 4.0    # "large": q, k ~ N(0, 16): scores ~16x the normal ones' spread, near one-hot rows
TIE_VECTORS = 4          # "ties": every key one of 4 vectors per (batch, head): exactly equal scores


def _features_kw(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None) -> dict:
    """The score features of one problem as NumPy (flashcupy.reference's keywords): window_size a
    tuple, softcap a float, alibi_slopes and sinks NumPy arrays or None."""
    return dict(window_size=tuple(int(w) for w in window_size), softcap=float(softcap),
                alibi_slopes=None if alibi_slopes is None else to_numpy(alibi_slopes),
                sinks=None if sinks is None else to_numpy(sinks))


class _NaiveScores(NamedTuple):
    qs: object  # the q the scores were formed from (scaled in T for "torch")
    p: object  # P in T, (B, H, Sq, Sk)
    lse: object  # (B, H, Sq), float32 / float64
    e: object  # exp(S' - rowmax) in T, keys only
    denom: object  # its row sums, with the sink's term (1 on rows with nothing visible)
    t: object  # tanh(S / softcap) in T, or None
    p_sink: object  # (B, H, Sq) in the accumulation dtype, or None


def _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32=False, order="torch", feat=None) -> _NaiveScores:
    """The softmax of naive attention in T with the score features (feat: _features_kw), as flash-attn's
    attention_ref (upcast=False): softcap as scores / softcap, tanh, * softcap, each rounded to T; the
    ALiBi bias (float32) added in the accumulation dtype (torch promotes the T scores to the bias's
    float32), then the mask (causal, window, element mask); the sink logits (float32) join each row's
    softmax in the accumulation dtype as a column without a value."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    feat = _features_kw() if feat is None else feat
    batch, nheads, seqlen_q, _ = qh.shape
    seqlen_k = kh.shape[2]
    if order == "torch":
        qs = _round(qh * scale, dtype)  # flash-attn's reference scales q in T first
        s = _mm(qs, kh.swapaxes(-1, -2), dtype, tf32)  # (B, H, Sq, Sk) in T
    else:  # DESIGN.md's S = softmax_scale * Q K^T: the scale after the product
        qs = qh
        s = _round(_mm(qh, kh.swapaxes(-1, -2), dtype, tf32) * scale, dtype)
    acc = accum_dtype(dtype)
    t = None
    if feat["softcap"] > 0:
        c = feat["softcap"]
        t = _round(np.tanh(_round(s / c, dtype)), dtype)
        s = _round(t * c, dtype)
    if feat["alibi_slopes"] is not None:
        slopes = reference._slopes(feat["alibi_slopes"], batch, nheads).astype(acc)
        s = s + _features.alibi_bias(np, slopes, np.arange(seqlen_q), np.arange(seqlen_k), seqlen_q, seqlen_k)
    visible = reference.attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal,
                                       mask=None if mask is None else to_numpy(mask), window_size=feat["window_size"])
    s = np.where(visible, s, -np.inf)
    p_sink = None
    if feat["sinks"] is not None:
        sink = np.broadcast_to(feat["sinks"].astype(acc).reshape(1, -1, 1, 1), (*s.shape[:3], 1))
        p, lse, e, denom = reference.softmax_rows(np.concatenate([s, sink], axis=-1))
        p, e, p_sink = p[..., :-1], e[..., :-1], p[..., -1]
    else:
        p, lse, e, denom = reference.softmax_rows(s)
    return _NaiveScores(qs, _round(p, dtype), lse.astype(lse_dtype(dtype)), _round(e, dtype), denom, t, p_sink)


def _naive_ds(p, dp, dtype, sm: _NaiveScores, softcap):
    """dS in T from P and dP in T: the softmax backward (accumulation dtype, rounded to T, as torch),
    then softcap's chain as autograd in T (* softcap, * (1 - t^2), / softcap, each rounded to T).
    Returns (dS, D) with D = rowsum(P o dP) (accumulation dtype)."""
    acc = accum_dtype(dtype)
    delta = (p * dp).sum(axis=-1, keepdims=True, dtype=acc)
    ds = _round(p * (dp - delta), dtype)
    if sm.t is not None:
        ds = _round(_round(_round(ds * softcap, dtype) * (1.0 - sm.t * sm.t), dtype) / softcap, dtype)
    return ds, delta


def _naive_dsinks(sm: _NaiveScores, delta):
    """The sinks' gradient of naive attention: its sink column's dS' = P_sink (0 - D), summed over
    (batch, query) in the accumulation dtype; (nheads,), or None without sinks."""
    if sm.p_sink is None:
        return None
    return -(sm.p_sink * delta[..., 0]).sum(axis=(0, 2))


def naive_forward(q, k, v, dtype=None, *, softmax_scale=None, causal=False, mask=None, tf32=False, order="torch",
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Attention computed naively in dtype T (default: q's dtype). Returns (out (B, Sq, H, D) in T
    held as float32/float64, lse (B, H, Sq) as float32/float64).
    tf32 (float32 only): q k^T and P V with TF32 operands (tf32_round), float32 accumulation.
    order: "torch" (flash-attn's attention_ref: q scaled in T, out = P V with P normalised in T) or
    "design" (DESIGN.md's equations: S = softmax_scale * (Q K^T), out = exp(S - m) V / l).
    window_size, softcap, alibi_slopes, sinks: flashcupy.reference's features, in T as flash-attn's
    attention_ref evaluates them (see _naive_softmax)."""
    qh, kh, vh, dtype, scale, _ = _naive_setup(q, k, v, dtype, softmax_scale, tf32)
    feat = _features_kw(window_size, softcap, alibi_slopes, sinks)
    sm = _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32, order, feat)
    if order == "torch":
        out = _mm(sm.p, vh, dtype, tf32)
    else:  # rows with no visible key have e = 0: out 0
        out = _round(_mm(sm.e, vh, dtype, tf32) / sm.denom, dtype)
    return out.transpose(0, 2, 1, 3), sm.lse


def naive_backward(dout, q, k, v, dtype=None, *, softmax_scale=None, causal=False, mask=None, tf32=False,
                   order="torch", window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Autograd of naive_forward, each op in dtype T. Returns (dq, dk, dv) shaped like q, k, v, and
    (dq, dk, dv, dsinks) with sinks (dsinks (nheads,) in the accumulation dtype).
    tf32 (float32 only): every matmul (the forward's two and dV, dP, dQ, dK) with TF32 operands.
    order "design": dK = softmax_scale * (dS^T Q), the scale after the product as for dQ."""
    qh, kh, vh, dtype, scale, group = _naive_setup(q, k, v, dtype, softmax_scale, tf32)
    feat = _features_kw(window_size, softcap, alibi_slopes, sinks)
    do = _round(to_numpy(dout).transpose(0, 2, 1, 3), dtype)
    sm = _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32, order, feat)
    qs, p = sm.qs, sm.p
    acc = accum_dtype(dtype)
    dv = _mm(p.swapaxes(-1, -2), do, dtype, tf32)
    dp = _mm(do, vh.swapaxes(-1, -2), dtype, tf32)
    ds, delta = _naive_ds(p, dp, dtype, sm, feat["softcap"])
    dqs = _mm(ds, kh, dtype, tf32)
    dq = _round(dqs * scale, dtype)
    dk = _mm(ds.swapaxes(-1, -2), qs, dtype, tf32)
    if order == "design":  # qs is the unscaled q
        dk = _round(dk * scale, dtype)
    batch, nheads, seqlen_k, head_dim = dk.shape

    def ungroup(x):  # the backward of repeat: sum over the query heads of a group, rounded to T
        x = x.reshape(batch, nheads // group, group, seqlen_k, head_dim).sum(axis=2, dtype=acc)
        return _round(x, dtype).transpose(0, 2, 1, 3)

    grads = (dq.transpose(0, 2, 1, 3), ungroup(dk), ungroup(dv))
    return grads if sm.p_sink is None else (*grads, _naive_dsinks(sm, delta))


# ---------------------------------------------------------------------------------------------------
# the correctness rule


def max_abs_err(got, oracle) -> float:
    """max|got - oracle| in float64; -inf entries must coincide (and are then skipped); NaN is inf."""
    got = to_numpy(got).astype(np.float64)
    oracle = to_numpy(oracle).astype(np.float64)
    assert got.shape == oracle.shape, f"shape {got.shape} != oracle's {oracle.shape}"
    if got.size == 0:
        return 0.0
    if np.isnan(got).any():
        return float("inf")
    neg_inf = np.isneginf(oracle)
    if not np.array_equal(np.isneginf(got), neg_inf):
        return float("inf")
    return float(np.abs(np.where(neg_inf, 0.0, got - np.where(neg_inf, 0.0, oracle))).max())


def magnitude_of(*arrays) -> float:
    """max |x| over the finite entries of the arrays (the 'output's magnitude')."""
    m = 0.0
    for a in arrays:
        a = to_numpy(a).astype(np.float64)
        a = a[np.isfinite(a)]
        if a.size:
            m = max(m, float(np.abs(a).max()))
    return m


def ulp(x, dtype):
    """One ulp of dtype T at |x| (elementwise, float64): the spacing 2^floor(log2 |x|) * eps(T) of the
    T values around |x|. For |x| >= T's smallest normal number (the rule takes it at |x| + 0.3)."""
    _, exponent = np.frexp(np.abs(np.asarray(x, dtype=np.float64)))  # |x| = m 2^exponent, 0.5 <= m < 1
    return np.ldexp(eps(dtype), exponent - 1)


def rule_bound(dtype, err_naive, magnitude, *, grad=False, term_magnitude=None, score_magnitude=0.0,
               stored_magnitude=0.0, tf32=False, ulp_dtype=None, ftz=0.0, operand_terms=None):
    """Criterion 1 of DESIGN.md's rule (module docstring): the largest |kernel - oracle| allowed at an
    element whose oracle value has magnitude `magnitude` (a scalar or an array: elementwise), for input
    dtype T:

        FACTOR * err_naive + ulp_T(magnitude + ULP_OFFSET) + eps(A) * (1 + sigma) * terms + eps(T) * stored
        + ftz (+ tf32: NOISE_Z * u(TF32) * operand_terms)

    FACTOR = 2 for outputs and gradients (OUT_FACTOR, GRAD_FACTOR), err_naive = max|naive in T - oracle|
    over the tensor, A the accumulation dtype (float32; float64 for float64).
    ulp_T(|oracle| + 0.3): flash-attn's floor (2 * the rounding error of oracle + 0.3 in T, i.e. up to
    one ulp), taken at each element's own magnitude: what storing a result in T may cost, with 0.3 (the
    scale of attention outputs and gradients of unit-normal inputs) keeping the floor of elements that
    cancel to ~0 at the ulp of a typical value rather than at the ulp of 0.
    eps(A) * (1 + sigma) * terms: one ulp of A at the magnitude of the summed terms (`terms`, e.g.
    max(P |V|) for out), amplified by exp(): a score carries an absolute rounding error of up to
    eps(A) * sigma in any evaluation in A (sigma: Magnitudes.sigma, the score's d-term dot product
    summed in A, or an LSE stored in A, DESIGN.md: float32), which exp() turns into a relative error
    of P. For float16 / bfloat16 inputs it is negligible (eps(float32) = eps(float16) / 8192); for
    float32 inputs, whose naive attention runs in the kernel's own precision, it is what float32
    arithmetic can promise: NumPy's float32 matmul (blocked, several partial sums) is more accurate
    than the one FMA chain per score of a CUDA-core kernel, so err_naive alone does not cover the
    latter (the H200 fuzz campaign of 2026-12-04: an fp32 hd192 LSE 20 ulps off, 28x NumPy's error,
    from the sequential dot product alone; bench/NOTES.md).
    ftz: an absolute floor for a flush to zero (Magnitudes.ftz): CuPy compiles every kernel, its
    own and ours, with -ftz=true, so float32 values under FTZ_TINY become 0. Only results that are
    themselves that small notice it (the sinks' gradient of a sink far below its rows' LSE, ~1e-41).
    operand_terms (tf32 only; elementwise or a scalar): the last product's A operand (P before P V, dS
    before dS K) rounded to TF32 costs each element up to u(TF32) times the root sum of squares of its
    terms (Magnitudes.*_terms) in a random walk, NOISE_Z such deviations; naive attention rounds other
    values of P (normalised, not), so on one query row err_naive can be far below it (fuzz, 2026-12-04:
    1.1x the bound without it, seqlen_q 1). float32's own ulp floor is 8192x smaller than TF32's,
    unlike float16's, where ulp_T covers the same rounding.
    eps(T) * stored: one ulp of T at the magnitude `stored` of what the rounding of a tensor stored
    in T and read back can move: the backward reads out in T (half an ulp off the exact output) and
    forms D = rowsum(dO o O) from it, so dq and dk carry eps(T) * scale * rowsum(|dO| o |O|) (P |K|)
    even where the exact gradient cancels to 0 (see Magnitudes.dq_stored).
    float64 inputs: err_kernel <= 1e-12 * max(magnitude, terms), magnitude = max|oracle|.
    tf32 (float32 inputs, TF32 products; err_naive from naive attention with tf32=True): the same
    bound, except that the stored term takes TF32_EPS instead of eps(float32). The backward's
    dP = dO V^T reads dO and V rounded to TF32, while D = rowsum(dO o O) reads dO as stored and an O
    whose every product had TF32 operands, so dP - D, and with it dq and dk, keeps TF32-sized noise
    even where the exact gradient cancels to 0 (a row with one visible key), where the naive
    attention, whose D is rowsum(P o dP) of its own dP, gives exactly 0.
    ulp_dtype: the dtype a result is stored in when it is not T (the sinks' gradient: float32): the
    ulp floor is taken in it (default T); for float64 inputs its rounding, half an ulp, is added.
    """
    dtype = np.dtype(dtype)
    terms = magnitude if term_magnitude is None else term_magnitude
    if dtype == np.float64:
        stored = 0.0 if ulp_dtype is None else ulp(magnitude, ulp_dtype) / 2
        return FLOAT64_RTOL * np.maximum(magnitude, terms) + stored + ftz
    factor = GRAD_FACTOR if grad else OUT_FACTOR
    stored_eps = TF32_EPS if tf32 else eps(dtype)
    floor_dtype = dtype if ulp_dtype is None else ulp_dtype
    operand = NOISE_Z * TF32_EPS / 2 * np.asarray(operand_terms) if tf32 and operand_terms is not None else 0.0
    return (factor * err_naive + ulp(np.asarray(magnitude, dtype=np.float64) + ULP_OFFSET, floor_dtype)
            + accum_floor(dtype, terms, score_magnitude) + stored_eps * stored_magnitude + ftz + operand)


def accum_floor(dtype, term_magnitude, score_magnitude=0.0):
    """eps(A) * (1 + sigma) * terms (see rule_bound): what arithmetic in the accumulation dtype A can
    promise; the one floor of the rule that may be systematic (a bias), so criterion 2 takes it whole."""
    return eps(accum_dtype(dtype)) * (1.0 + score_magnitude) * term_magnitude


class RuleRatios(NamedTuple):
    """err / bound of each criterion of the rule for one tensor (<= 1 passes): max (criterion 1, the
    worst element), rms and bias (criterion 2; bias: the worse of the mean and the oracle-direction
    bias). worst: the largest of the three."""

    max: float
    rms: float
    bias: float

    @property
    def worst(self) -> float:
        return max(self.max, self.rms, self.bias)


def _ratio(err, bound):
    err, bound = float(err), float(bound)
    if err <= bound:
        return err / bound if bound > 0 else 0.0
    return err / bound if bound > 0 else float("inf")


class _Rows:
    """The rows of a tensor for criterion 2's statistics: the last axis of a 4-D (B, S, H, D) tensor (one
    query's or key's head_dim values, whose rounding errors share that row's P, dS and D), each element
    on its own otherwise (the LSE). Rows whose oracle values are identical (softmax_scale 0 without a
    mask, one visible key: the same computation on the same inputs) carry the same rounding errors, so
    the statistics count them as one row (their errors summed)."""

    def __init__(self, oracle, finite):
        d = oracle.shape[-1] if oracle.ndim == 4 else 1
        rows = np.where(finite, oracle, np.inf).reshape(-1, d)
        self.d = d
        if len(np.unique(rows @ np.sin(np.arange(1.0, d + 1.0)))) == len(rows):  # cheap: no two rows alike
            self.inverse, self.n_rows, self.n = None, len(rows), max(int(finite.sum()), 1)
            return
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        self.inverse, self.n_rows = inverse.reshape(-1), len(first)
        self.n = max(int(finite.reshape(-1, d)[first].sum()), 1)  # finite elements of the distinct rows

    def merged(self, x):
        """x (shaped like the oracle) summed over identical rows: (distinct rows, d)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.d)
        if self.inverse is None:
            return x
        acc = np.zeros((self.n_rows, self.d))
        np.add.at(acc, self.inverse, x)
        return acc

    def bias(self, e, u):
        """(b, se): the bias of the error e along the direction u, b = sum(e u) / sum(u^2) (the mean error
        for u = 1; for u = oracle, b is the relative error of a kernel computing (1 + b) * oracle), and its
        standard error if the rows' errors were independent and zero-mean,
        se = sqrt(sum over rows of (sum_row e u)^2) / sum(u^2)."""
        w = float((u * u).sum())
        r = self.merged(e * u).sum(axis=1)
        return float(r.sum()) / w, float(np.sqrt((r * r).sum())) / w

    def independent_se(self, h, u):
        """sqrt(sum (h u)^2) / sum(u^2): the standard error of bias() for errors of size h independent
        across a row's elements (still identical across identical rows)."""
        return float(np.sqrt((self.merged(h * u) ** 2).sum())) / float((u * u).sum())


def rule_ratios(name, got, oracle, naive, dtype, *, grad=False, magnitude=None, term_magnitude=None,
                score_magnitude=0.0, stored_magnitude=0.0, tf32=False, terms=None, stored=None,
                stored_dtype=None, ulp_dtype=None, se_factor=1.0, ftz=0.0) -> RuleRatios:
    """err / bound of DESIGN.md's rule for one tensor, by criterion (module docstring; rule_bound,
    statistics_bounds). naive: the naive result in T, a list of them (evaluation orders: err_naive and
    the naive statistics are then the largest over the list), or None for float64.

    magnitude: None (default) takes criterion 1's floor at each element's own |oracle| (float64: at
    max|oracle|); a number takes it there for every element. term_magnitude, score_magnitude,
    stored_magnitude: the scalar floors of rule_bound. terms, stored: elementwise magnitudes shaped like
    the oracle for criterion 2 (Magnitudes: what the kernel rounds to T in the last product, and the
    stored-output mismatch); None: 0, and the scalar stored_magnitude for stored. stored_dtype: the
    dtype the result is stored in (the LSE: float32), default T. ulp_dtype: rule_bound's (the sinks'
    gradient: float32). se_factor: statistics_bounds' (rows whose rounding errors are correlated).
    ftz: the flush-to-zero floor (rule_bound, Magnitudes.ftz), in every criterion (a flush is
    systematic: toward 0). With tf32, terms is also criterion 1's operand_terms (rule_bound).
    """
    dtype = np.dtype(dtype)
    got = to_numpy(got).astype(np.float64)
    oracle = to_numpy(oracle).astype(np.float64)
    err = max_abs_err(got, oracle)
    if dtype == np.float64:
        mag = magnitude_of(oracle) if magnitude is None else magnitude
        return RuleRatios(_ratio(err, rule_bound(dtype, 0.0, mag, term_magnitude=term_magnitude, ulp_dtype=ulp_dtype,
                                                 ftz=ftz)), 0.0, 0.0)
    naives = [to_numpy(x).astype(np.float64) for x in (naive if isinstance(naive, list) else [naive])]
    if not np.isfinite(err):
        return RuleRatios(float("inf"), float("inf"), float("inf"))
    finite = np.isfinite(oracle)  # -inf (LSE of a row with no visible key) coincides, as err checked
    o = np.where(finite, oracle, 0.0)
    e = np.where(finite, got - o, 0.0)
    ens = [np.where(finite, x - o, 0.0) for x in naives]
    err_naive = max(max_abs_err(x, oracle) for x in naives)
    kw = dict(grad=grad, term_magnitude=magnitude_of(oracle) if term_magnitude is None else term_magnitude,
              score_magnitude=score_magnitude, stored_magnitude=stored_magnitude, tf32=tf32, ftz=ftz)
    operand = np.where(finite, np.asarray(terms, dtype=np.float64), 0.0) if tf32 and terms is not None else None
    bound = rule_bound(dtype, err_naive, np.abs(o) if magnitude is None else magnitude, ulp_dtype=ulp_dtype,
                       operand_terms=operand, **kw)
    ratio_max = float((np.abs(e) / bound).max()) if e.size else 0.0
    rms_bound, bias_bounds = statistics_bounds(o, ens, dtype, finite=finite, terms=terms, stored=stored,
                                               stored_dtype=stored_dtype, se_factor=se_factor, **kw)
    ratio_rms = _ratio(np.sqrt(np.mean(e * e)) if e.size else 0.0, rms_bound)
    rows = _Rows(o, finite)
    ratio_bias = 0.0
    for u, bias_bound in zip((np.where(finite, 1.0, 0.0), o), bias_bounds):
        if bias_bound is not None:
            ratio_bias = max(ratio_bias, _ratio(abs(rows.bias(e, u)[0]), bias_bound))
    return RuleRatios(ratio_max, ratio_rms, ratio_bias)


def statistics_bounds(oracle, naive_errors, dtype, *, finite=None, grad=False, term_magnitude=0.0,
                      score_magnitude=0.0, stored_magnitude=0.0, tf32=False, terms=None, stored=None,
                      stored_dtype=None, se_factor=1.0, ftz=0.0):
    """Criterion 2 of DESIGN.md's rule (module docstring) for one tensor of N finite elements:
    (rms bound, (bias bound along 1, bias bound along oracle)); a bias bound is None where its
    direction is 0 (an all-zero oracle).

        rms(err)             <= RMS_FACTOR * rms(err_naive) + eps(T) * rms(stored) + accum + ftz
                                + NOISE_Z * rms(h) / sqrt(N)
        |bias_u(err)|        <= BIAS_FACTOR * |bias_u(err_naive)| + NOISE_Z * sqrt(se_u(err_naive)^2 + se_u(h)^2)
                                + (accum + ftz) * sum|u| / sum(u^2)

    for the directions u = 1 (the mean error) and u = oracle (a relative error common to the tensor,
    out * 1.01). bias_u(e) = sum(e u) / sum(u^2); se_u(e) = sqrt(sum over rows of (sum_row e u)^2) / sum(u^2)
    is its standard error if the rows' errors were independent and zero-mean (a row: one query's or
    key's head_dim values, which share that row's P, dS and D; each LSE value alone); se_u(h) takes
    every element's error at its bound h with the sign of u (correlated within a row, independent
    across rows).

    h = u(S) |oracle| + u(T) terms + eps(T) stored, elementwise: a kernel that follows DESIGN.md's
    equations rounds its result to the dtype S it is stored in (half an ulp, unit roundoff u = eps / 2)
    and the A operand of its last product to T (P before P V, dS before dS K and dS^T Q: `terms` is that
    product's sum of absolute values, Magnitudes.*_terms), and reads back the stored output (`stored`,
    Magnitudes.*_stored_elem); everything else it does in float32 (accum). tf32: u(T) is TF32's unit
    roundoff and eps(T) TF32_EPS. Rounding errors are random: they enter the statistics divided by
    sqrt(N) (or through se_u), so h sets the floor of small problems (a few rows, where naive attention's
    own statistics are a handful of random draws) and fades on large ones, where err_naive's decide;
    accum, the one floor that may be systematic, enters whole.

    se_factor multiplies both standard errors of the bias bound (1: rows' rounding errors independent).
    Where the scores do not depend on q and k (softmax_scale 0), P is a function of the positions alone
    (the ALiBi term, the mask, the sinks), so the same P value, with the same rounding error, recurs in
    many rows, and the errors of the rows are correlated: with e_i = sum_j delta_ij v_j the variance of
    sum_i e_i is at most K times the independent rows' (Cauchy-Schwarz over the K distinct roundings a
    row's sum can share), K the most visible keys of a row or queries of a key. Magnitudes.se_factor is
    sqrt(K) there (measured on the fuzz cases this was found by: naive attention in DESIGN.md's order
    itself reaches 1.8x the independent rows' bias bound, tests/test_rule_mutants.py).
    """
    dtype = np.dtype(dtype)
    o = np.asarray(oracle, dtype=np.float64)
    finite = np.ones(o.shape, dtype=bool) if finite is None else finite
    o = np.where(finite, o, 0.0)
    n = max(int(finite.sum()), 1)
    rows = _Rows(o, finite)
    stored_eps = TF32_EPS if tf32 else eps(dtype)
    u_op = TF32_EPS / 2 if tf32 else eps(dtype) / 2
    u_store = eps(dtype if stored_dtype is None else stored_dtype) / 2
    accum = accum_floor(dtype, term_magnitude, score_magnitude) + ftz  # both systematic: enter whole
    if stored is None:
        stored_rms, stored_arr = stored_magnitude, 0.0
    else:
        stored_arr = np.where(finite, np.asarray(stored, dtype=np.float64), 0.0)
        stored_rms = float(np.sqrt(np.sum(stored_arr**2) / n))
    terms_arr = 0.0 if terms is None else np.where(finite, np.asarray(terms, dtype=np.float64), 0.0)
    h = np.where(finite, u_store * np.abs(o) + u_op * terms_arr, 0.0)  # independent per element
    h_row = np.where(finite, stored_eps * stored_arr, 0.0)  # one D per row: common to a row's elements

    def rms(x):
        return float(np.sqrt(np.sum(x * x) / n))

    rms_bound = (RMS_FACTOR * max(rms(x) for x in naive_errors) + stored_eps * stored_rms + accum
                 + NOISE_Z * float(np.hypot(rms(h), rms(h_row))) / np.sqrt(rows.n))
    bias_bounds = []
    for u in (np.where(finite, 1.0, 0.0), o):
        w = float((u * u).sum())
        if w == 0.0:
            bias_bounds.append(None)
            continue
        naive_bias = max(abs(rows.bias(x, u)[0]) for x in naive_errors)
        naive_se = max(rows.bias(x, u)[1] for x in naive_errors)
        h_se = float(np.hypot(rows.independent_se(h, np.abs(u)), rows.bias(h_row, np.abs(u))[1]))
        bias_bounds.append(BIAS_FACTOR * naive_bias + NOISE_Z * se_factor * float(np.hypot(naive_se, h_se))
                           + accum * float(np.abs(u).sum()) / w)
    return rms_bound, tuple(bias_bounds)


def check_rule(name, got, oracle, naive, dtype, *, grad=False, magnitude=None, term_magnitude=None,
               score_magnitude=0.0, stored_magnitude=0.0, tf32=False, terms=None, stored=None,
               stored_dtype=None, ulp_dtype=None, se_factor=1.0, ftz=0.0) -> RuleRatios:
    """Assert DESIGN.md's rule (module docstring) for one tensor: both criteria, by rule_ratios (see
    there for the arguments). Returns the RuleRatios (each <= 1)."""
    r = rule_ratios(name, got, oracle, naive, dtype, grad=grad, magnitude=magnitude, term_magnitude=term_magnitude,
                    score_magnitude=score_magnitude, stored_magnitude=stored_magnitude, tf32=tf32, terms=terms,
                    stored=stored, stored_dtype=stored_dtype, ulp_dtype=ulp_dtype, se_factor=se_factor, ftz=ftz)
    what = dtype_name(np.dtype(dtype)) + (", TF32 products" if tf32 else "")
    assert r.worst <= 1.0, (f"{name} ({what}): err_kernel / bound = {r.max:.3g} (max, criterion 1), "
                            f"{r.rms:.3g} (rms), {r.bias:.3g} (bias, criterion 2); "
                            f"{'gradient' if grad else 'output'} rule, err_kernel {max_abs_err(got, oracle):.3e}")
    return r


class Magnitudes:
    """Term magnitudes of one attention problem, in float64 from the oracle's P (see rule_bound and
    statistics_bounds). Scalars (criterion 1's floors):

    sigma: the largest absolute rounding error, in units of eps(A), that a visible score or an LSE stored
           in A can carry (rule_bound's accumulation floor): a score is a head_dim-term dot product
           summed in A, d roundings each at most u(A) times a partial sum, which |S| = scale (|q| |k|^T)
           bounds: at most d u |S| (Higham's gamma_d), random in sign, so a standard deviation of at
           most sqrt(d / 3) u |S|; sigma takes DOT_Z of them, DOT_Z sqrt(d / 3) / 2 |S| in units of
           eps = 2 u (at least |S|), or |LSE|, |sinks| if larger (one rounding each).
    ftz:   the flush-to-zero floor (rule_bound): FTZ_TINY for each value a result sums and for the
           result itself, times the largest factor a flushed value multiplies:
           FTZ_TINY * (1 + N (2 + M)), N = the most terms any result here sums (seqlen_k for out and
           dq, batch * seqlen_q * group for dk, dv and the sinks' gradient, head_dim for a score), M the
           largest |q|, |k|, |v|, |dout| or rowsum(|dO| o |O|). ~1e-33: it decides only results that are
           themselves subnormal.
    out:   max(P |V|).
    dq, dk, dv (when dout is given): the gradients' sums over absolute values,
           dS-terms = P o (|dO| |V|^T + rowsum(|dO| o (P |V|))),
           dq: scale * dS-terms |K|, dk: scale * dS-terms^T |Q|, dv: P^T |dO| (summed over a group).
    They also cover the exactly-zero gradients of rows with one visible key, whose float evaluation
    (D = rowsum(dO o O), as the flash backward computes it) still leaves noise of the terms' size.
    dq_stored, dk_stored: what an O off by |O| (a relative error of 1) moves dq and dk by through
    D = rowsum(dO o O): scale * rowsum(|dO| o |O|) (P |K|), and its transpose with |Q|.

    Elementwise (BSHD like the tensor; criterion 2's h):
    se_factor: 1, or with softmax_scale 0 (scores of the positions alone) sqrt(K), K the most visible
           keys of a query row or queries of a key: statistics_bounds' factor for out and dv.
    out_terms: P |V|, the terms of O = P V, whose A operand P a kernel rounds to T.
    dq_terms, dk_terms, dv_terms: scale * |dS| |K|, scale * |dS|^T |Q|, P^T |dO| (group sums), with the
           exact dS = P o (dP - D): the products whose A operand (dS, P) a kernel rounds to T.
    dq_stored_elem, dk_stored_elem, dv_stored_elem: what D = rowsum(dO o O) read from an O off by
           |O| moves each element by: dq through dS = P (dP - D): scale * rowsum(|dO| o |O|) |P K|;
           dk: scale * sqrt(P^2^T (rowsum(|dO| o |O|)^2 |Q|^2)) (one such error per query row, random
           across rows, added in quadrature); dv: 0.
    keep, p_eff (dropout): the elementwise arrays are those of the dropped problem (P o Z / (1 - p_eff)
    in O and dV, dP o Z / (1 - p_eff) in dS); the scalars stay the undropped problem's.

    Score features (window_size, softcap, alibi_slopes, sinks; flashcupy.reference): P is the oracle's
    with them; sigma adds |the ALiBi term| to the scores and takes |sinks| too; softcap's factor
    1 - tanh^2 multiplies P wherever P stands for dS (the dS-terms and the stored-output terms).
    dsinks (with sinks; (nheads,)): sum over (b, i) of P_sink rowsum(|dO| o |O|) (float32's accumulation
    floor); dsinks_terms 0 (no T operand); dsinks_stored and dsinks_stored_elem, per head (an array: the
    bound is elementwise), sqrt(sum over (b, i) of P_sink^2 rowsum((dO o O)^2)): the kernel forms D from
    out read back in T, whose rounding is independent across the rows dsinks sums and across each
    row's head_dim products, so it adds in quadrature (measured: errors <= 0.7 u of it, where u = eps(T)
    / 2; the floor eps(T) * it is ~3x that, and a 1% error is typically >= 6 u of it).
    """

    def __init__(self, q, k, v, dout=None, *, softmax_scale=None, causal=False, mask=None, keep=None, p_eff=0.0,
                 window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
        q, k, v = (to_numpy(x).astype(np.float64) for x in (q, k, v))
        feat = _features_kw(window_size, softcap, alibi_slopes, sinks)
        batch, seqlen_q, nheads, head_dim = q.shape
        seqlen_k, nheads_k = k.shape[1], k.shape[2]
        group = nheads // nheads_k
        scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        scores, visible, t = reference.attention_scores(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask,
                                                        window_size=feat["window_size"], softcap=feat["softcap"],
                                                        alibi_slopes=feat["alibi_slopes"])
        p, lse, p_sink = reference._softmax_with_sink(scores, feat["sinks"])
        pd = p if t is None else p * (1.0 - t * t)  # P o dS/dS' (softcap), where P stands for dS
        qa = np.abs(q).transpose(0, 2, 1, 3)
        ka, va = (np.repeat(np.abs(x).transpose(0, 2, 1, 3), group, axis=1) for x in (k, v))
        s_abs = scale * (qa @ ka.swapaxes(-1, -2))
        if feat["alibi_slopes"] is not None:
            slopes = np.abs(reference._slopes(feat["alibi_slopes"], batch, nheads))
            s_abs = s_abs - _features.alibi_bias(np, slopes, np.arange(seqlen_q), np.arange(seqlen_k), seqlen_q,
                                                 seqlen_k)
        s_abs = np.where(visible, s_abs, 0.0)
        # scores independent of q and k: P's roundings recur across rows (statistics_bounds' se_factor)
        vis = np.broadcast_to(visible, (batch, nheads, seqlen_q, seqlen_k))
        shared = max(int(vis.sum(axis=-1).max(initial=1)), int(vis.sum(axis=-2).max(initial=1)), 1)
        self.se_factor = float(np.sqrt(shared)) if scale == 0.0 else 1.0
        dot = max(1.0, DOT_Z * np.sqrt(head_dim / 3.0) / 2.0)
        self.sigma = max(dot * magnitude_of(s_abs), magnitude_of(lse),
                         0.0 if feat["sinks"] is None else magnitude_of(feat["sinks"]))
        n_sum = max(seqlen_k, batch * seqlen_q * group, head_dim)
        big = magnitude_of(q, k, v)
        pv = p @ va  # (B, H, Sq, D)
        self.out = magnitude_of(pv)
        z = 1.0 if keep is None else to_numpy(keep).astype(np.float64) / (1.0 - p_eff)
        pz = p * z  # P o Z / (1 - p): what multiplies V and dO
        bshd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731

        def group_sum(x):
            return x.reshape(batch, nheads_k, group, seqlen_k, head_dim).sum(axis=2)

        self.out_terms = bshd(np.sqrt(pz**2 @ va**2))
        self.ftz = FTZ_TINY * (1.0 + n_sum * (2.0 + big))
        if dout is None:
            return
        do = to_numpy(dout).astype(np.float64).transpose(0, 2, 1, 3)
        doa = np.abs(do)
        terms = pd * (doa @ va.swapaxes(-1, -2) + (doa * pv).sum(axis=-1, keepdims=True))
        self.dq = scale * magnitude_of(terms @ ka)
        self.dk = scale * magnitude_of(group_sum(terms.swapaxes(-1, -2) @ qa))
        self.dv = magnitude_of(group_sum(p.swapaxes(-1, -2) @ doa))
        kh = np.repeat(k.transpose(0, 2, 1, 3), group, axis=1)
        vh = np.repeat(v.transpose(0, 2, 1, 3), group, axis=1)
        d_abs = (doa * np.abs(p @ vh)).sum(axis=-1, keepdims=True)
        self.ftz = FTZ_TINY * (1.0 + n_sum * (2.0 + max(big, magnitude_of(doa, d_abs))))
        self.dq_stored = scale * magnitude_of(d_abs * (pd @ ka))
        self.dk_stored = scale * magnitude_of(group_sum(pd.swapaxes(-1, -2) @ (d_abs * qa)))
        self.dv_stored = 0.0
        # elementwise, of the (dropped) problem: exact dS, its terms and the stored-output mismatch, each a
        # sum of independent rounding errors: added in quadrature
        o_z = pz @ vh
        dp = (do @ vh.swapaxes(-1, -2)) * z
        ds = pd * (dp - (do * o_z).sum(axis=-1, keepdims=True))
        self.dq_terms = scale * bshd(np.sqrt(ds**2 @ ka**2))
        self.dk_terms = scale * bshd(np.sqrt(group_sum((ds**2).swapaxes(-1, -2) @ qa**2)))
        self.dv_terms = bshd(np.sqrt(group_sum((pz**2).swapaxes(-1, -2) @ doa**2)))
        d_q = np.sqrt(((do * o_z) ** 2).sum(axis=-1, keepdims=True))  # (B, H, Sq, 1)
        self.dq_stored_elem = scale * bshd(d_q * np.abs(pd @ kh))
        self.dk_stored_elem = scale * bshd(np.sqrt(group_sum((pd * pd).swapaxes(-1, -2) @ (d_q**2 * qa**2))))
        self.dv_stored_elem = np.zeros_like(self.dv_terms)
        if p_sink is not None:
            self.dsinks = magnitude_of((p_sink * d_abs[..., 0]).sum(axis=(0, 2)))
            self.dsinks_terms = np.zeros(nheads)
            # per head: the rounding of each row's D (from out read back in T) is independent across the
            # B * Sq rows it sums, and within a row across the head_dim products: in quadrature
            self.dsinks_stored_elem = np.sqrt(((p_sink * d_q[..., 0]) ** 2).sum(axis=(0, 2)))
            self.dsinks_stored = self.dsinks_stored_elem


def forward_rule_inputs(q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, sinks=None):
    """{"out": kwargs, "lse": kwargs}: what check_rule needs besides (name, got) for a forward on
    q, k, v (oracle, naive, dtype and the floors); the work of assert_forward_rule that does not depend
    on the kernel's result, so several results can be checked against one problem. window_size,
    softcap, alibi_slopes, sinks: the score features (flashcupy.reference), in the oracle, the naive
    attention and the magnitudes."""
    q, k, v = (to_numpy(x) for x in (q, k, v))
    dtype = q.dtype
    tf32 = bool(tf32) and dtype == np.float32
    kw = dict(softmax_scale=softmax_scale, causal=causal, mask=mask,
              **_features_kw(window_size, softcap, alibi_slopes, sinks))
    ref_out, ref_lse = reference.attention_forward(q, k, v, **kw)
    if dtype == np.float64:
        nv_out, nv_lse = None, None
    elif tf32:
        orders = [naive_forward(q, k, v, **kw, tf32=True, order=order) for order in ORDERS]
        nv_out, nv_lse = [o for o, _ in orders], [lse for _, lse in orders]
    else:
        nv_out, nv_lse = naive_forward(q, k, v, **kw)
    mags = Magnitudes(q, k, v, **kw)
    common = dict(dtype=dtype, score_magnitude=mags.sigma, tf32=tf32, ftz=mags.ftz)
    return {"out": dict(oracle=ref_out, naive=nv_out, term_magnitude=mags.out, terms=mags.out_terms,
                        se_factor=mags.se_factor, **common),
            # lse = m + log(l): its terms are of size 1 around the scores' own magnitude sigma; it is
            # stored in float32 and no T rounding enters it (l sums the unrounded P)
            "lse": dict(oracle=ref_lse, naive=nv_lse, term_magnitude=1.0, stored_dtype=lse_dtype(dtype), **common)}


def backward_rule_inputs(dout, q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """{"dq": kwargs, "dk": ..., "dv": ...} (and "dsinks" with sinks): as forward_rule_inputs, for
    check_rule on the gradients. dsinks is stored in float32 whatever T is: its ulp floor is float32's
    (ulp_dtype), and for float64 inputs its bound adds its rounding to float32."""
    dout, q, k, v = (to_numpy(x) for x in (dout, q, k, v))
    dtype = q.dtype
    tf32 = bool(tf32) and dtype == np.float32
    kw = dict(softmax_scale=softmax_scale, causal=causal, mask=mask,
              **_features_kw(window_size, softcap, alibi_slopes, sinks))
    names = ("dq", "dk", "dv") if sinks is None else ("dq", "dk", "dv", "dsinks")
    refs = reference.attention_backward(dout, q, k, v, **kw)
    if dtype == np.float64:
        naives = (None,) * len(names)
    elif tf32:
        naives = list(zip(*(naive_backward(dout, q, k, v, **kw, tf32=True, order=order) for order in ORDERS)))
        naives = [list(x) for x in naives]  # per gradient: [torch order, design order]
    else:
        naives = naive_backward(dout, q, k, v, **kw)
    mags = Magnitudes(q, k, v, dout, **kw)
    out = {name: dict(oracle=ref, naive=nv, dtype=dtype, grad=True, term_magnitude=getattr(mags, name),
                      score_magnitude=mags.sigma, stored_magnitude=getattr(mags, name + "_stored"), tf32=tf32,
                      terms=getattr(mags, name + "_terms"), stored=getattr(mags, name + "_stored_elem"),
                      ftz=mags.ftz)
           for name, ref, nv in zip(names, refs, naives)}
    out["dv"]["se_factor"] = mags.se_factor  # dV = P^T dO: P's roundings, as in out
    if sinks is not None:
        out["dsinks"].update(stored_dtype=np.dtype(np.float32), ulp_dtype=np.dtype(np.float32))
    return out


def assert_forward_rule(out, lse, q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Check a kernel's (out, lse) for inputs q, k, v against the oracle by DESIGN.md's rule (both
    criteria, module docstring). Returns {"out": RuleRatios, "lse": RuleRatios}.

    lse may be None. The dtype T is q's. Accepts NumPy or CuPy arrays.
    tf32: for float32 inputs, T is float32 with TF32 products (allow_tf32=True): err_naive is the
    larger error of naive_forward(..., tf32=True) in the "torch" and the "design" order (see the
    module docstring). Other dtypes ignore it (as allow_tf32 does) and take their own rule.
    window_size, softcap, alibi_slopes, sinks: the call's score features (flash_attn_forward's).
    """
    if lse is not None:
        lse_np = to_numpy(lse)
        want = lse_dtype(to_numpy(q).dtype)
        assert lse_np.dtype == want, f"lse dtype {lse_np.dtype}, expected {want}"
    inputs = forward_rule_inputs(q, k, v, softmax_scale=softmax_scale, causal=causal, mask=mask, tf32=tf32,
                                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    got = {"out": out, "lse": lse}
    return {name: check_rule(name, got[name], **kw) for name, kw in inputs.items() if got[name] is not None}


def assert_backward_rule(grads, dout, q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Check a kernel's (dq, dk, dv) against the oracle's gradients by DESIGN.md's rule (both criteria).
    tf32: as assert_forward_rule (err_naive from naive_backward(..., tf32=True), both orders).
    With sinks, grads is (dq, dk, dv, dsinks) (flash_attn_backward's 4-tuple) and dsinks is checked too.
    Returns {"dq": RuleRatios, "dk": ..., "dv": ...} (and "dsinks")."""
    inputs = backward_rule_inputs(dout, q, k, v, softmax_scale=softmax_scale, causal=causal, mask=mask, tf32=tf32,
                                  window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    assert len(grads) == len(inputs), f"{len(grads)} gradients, expected {len(inputs)} ({', '.join(inputs)})"
    if sinks is not None:
        got = to_numpy(grads[3])
        assert got.dtype == np.float32 and got.shape == to_numpy(sinks).shape, \
            f"dsinks: dtype {got.dtype} shape {got.shape}, expected float32 {to_numpy(sinks).shape}"
    return {name: check_rule(name, g, **kw) for g, (name, kw) in zip(grads, inputs.items())}


# ---------------------------------------------------------------------------------------------------
# dropout: naive attention in T with the same keep-mask, and the rule against the oracle given the mask


def naive_with_dropout(q, k, v, dout, keep, p_eff, *, causal=False, mask=None, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, sinks=None, softmax_scale=None):
    """Naive attention and its autograd in q's dtype T (as naive_forward / naive_backward) with the
    dropout keep-mask Z applied to P and dP (scaled by 1 / (1 - p_eff)). Returns (out, (dq, dk, dv)),
    (dq, dk, dv, dsinks) with sinks."""
    qh, kh, vh, dtype, scale, group = _naive_setup(q, k, v, None, softmax_scale)
    feat = _features_kw(window_size, softcap, alibi_slopes, sinks)
    sm = _naive_softmax(qh, kh, dtype, scale, causal, None if mask is None else to_numpy(mask), feat=feat)
    qs, p = sm.qs, sm.p
    z = to_numpy(keep) / (1.0 - p_eff)
    pd = _round(p * z, dtype)
    out = _mm(pd, vh, dtype).transpose(0, 2, 1, 3)
    do = _round(to_numpy(dout).transpose(0, 2, 1, 3), dtype)
    acc = accum_dtype(dtype)
    dv = _mm(pd.swapaxes(-1, -2), do, dtype)
    dp = _round(_mm(do, vh.swapaxes(-1, -2), dtype) * z, dtype)
    ds, delta = _naive_ds(p, dp, dtype, sm, feat["softcap"])
    dq = _round(_mm(ds, kh, dtype) * scale, dtype)
    dk = _mm(ds.swapaxes(-1, -2), qs, dtype)
    b, h, sk, d = dk.shape

    def ungroup(x):
        return _round(x.reshape(b, h // group, group, sk, d).sum(axis=2, dtype=acc), dtype).transpose(0, 2, 1, 3)

    grads = (dq.transpose(0, 2, 1, 3), ungroup(dk), ungroup(dv))
    return out, (grads if sm.p_sink is None else (*grads, _naive_dsinks(sm, delta)))


def assert_dropout_rule(out, grads, dout, q, k, v, keep, p_eff, *, causal=False, mask=None, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, sinks=None, softmax_scale=None):
    """DESIGN.md's rule for a dropout run against the oracle given the regenerated keep-mask: err_naive
    from naive attention in T with the same mask; criterion 1's term magnitudes of the undropped problem
    times 1 / (1 - p_eff) (an upper bound of the dropped terms), criterion 2's elementwise ones of the
    dropped problem. grads may be None; with sinks it is (dq, dk, dv, dsinks). The score features as
    assert_forward_rule."""
    dout, q, k, v = (to_numpy(x) for x in (dout, q, k, v))
    dtype = q.dtype
    inv = 1.0 / (1.0 - p_eff)
    feat = _features_kw(window_size, softcap, alibi_slopes, sinks)
    mags = Magnitudes(q, k, v, dout, softmax_scale=softmax_scale, causal=causal, mask=mask, keep=keep, p_eff=p_eff,
                      **feat)
    nv_out, nv_grads = naive_with_dropout(q, k, v, dout, keep, p_eff, causal=causal, mask=mask,
                                          softmax_scale=softmax_scale, **feat)
    if dtype == np.float64:
        nv_out, nv_grads = None, (None,) * len(nv_grads)
    ref_out, _ = reference.attention_forward(q, k, v, softmax_scale=softmax_scale, causal=causal, mask=mask,
                                             dropout_mask=keep, dropout_p=p_eff, **feat)
    ratios = {"out": check_rule("out", out, ref_out, nv_out, dtype, term_magnitude=mags.out * inv,
                                score_magnitude=mags.sigma, terms=mags.out_terms, ftz=mags.ftz)}
    if grads is None:
        return ratios
    refs = reference.attention_backward(dout, q, k, v, softmax_scale=softmax_scale, causal=causal, mask=mask,
                                        dropout_mask=keep, dropout_p=p_eff, **feat)
    names = ("dq", "dk", "dv") if sinks is None else ("dq", "dk", "dv", "dsinks")
    assert len(grads) == len(names), f"{len(grads)} gradients, expected {len(names)} ({', '.join(names)})"
    for name, g, r, nv in zip(names, grads, refs, nv_grads):
        extra = dict(stored_dtype=np.dtype(np.float32), ulp_dtype=np.dtype(np.float32)) if name == "dsinks" else {}
        ratios[name] = check_rule(name, g, r, nv, dtype, grad=True, term_magnitude=getattr(mags, name) * inv,
                                  score_magnitude=mags.sigma, stored_magnitude=getattr(mags, name + "_stored") * inv,
                                  terms=getattr(mags, name + "_terms"), stored=getattr(mags, name + "_stored_elem"),
                                  ftz=mags.ftz, **extra)
    return ratios


# ---------------------------------------------------------------------------------------------------
# the public checks: any implementation against the oracle


class Case(NamedTuple):
    """One random attention problem of check_attention: shapes (batch, seqlen_q, seqlen_k, nheads,
    nheads_k, head_dim), dtype name, causal, softmax_scale (None: head_dim ** -0.5), the NumPy seed,
    and the score features of flash_attn_forward (default off): window_size (left, right), softcap,
    alibi_slopes and sinks as tuples of floats (float32 values; feature_kwargs() makes the arrays);
    the input distribution and layout (inputs(), layout_view); the call options dropout_p (its
    keep-mask from dropout_seed) and block_mask ((block_q, block_k, density): block_mask_bool(), and
    element_mask() for the oracle). The repr names the fields that are not at their defaults, so it
    stays a valid reproducer either way."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    causal: bool
    softmax_scale: float | None
    seed: int
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: tuple | None = None  # nheads floats, or batch tuples of them
    sinks: tuple | None = None  # nheads floats
    distribution: str = "normal"  # DISTRIBUTIONS
    layout: str = "bshd"  # LAYOUTS (layout_view)
    dropout_p: float = 0.0  # OPTION_DEFAULTS
    block_mask: tuple | None = None  # (block_q, block_k, density)

    def __repr__(self):
        defaults = {**FEATURE_DEFAULTS, **INPUT_DEFAULTS, **OPTION_DEFAULTS}
        fields = [f"{name}={getattr(self, name)!r}" for name in self._fields
                  if name not in defaults or getattr(self, name) != defaults[name]]
        return f"Case({', '.join(fields)})"

    def feature_kwargs(self) -> dict:
        """The keywords of the features that are on (window_size, softcap, alibi_slopes and sinks as
        float32 NumPy arrays): {} for a plain case, so implementations without them still run it."""
        kw = {}
        if tuple(self.window_size) != (-1, -1):
            kw["window_size"] = tuple(self.window_size)
        if self.softcap:
            kw["softcap"] = float(self.softcap)
        for name in ("alibi_slopes", "sinks"):
            if getattr(self, name) is not None:
                kw[name] = np.asarray(getattr(self, name), dtype=np.float32)
        return kw

    def inputs(self, grad: bool = False):
        """(q, k, v) contiguous NumPy arrays in BSHD (batch, seqlen, heads, head_dim); grad: also dout
        like q (q, k, v are the same either way). distribution: "normal" N(0, 1) (the draws of earlier
        versions); "large" q, k ~ N(0, LARGE_AMPLITUDE^2) (peaky, near one-hot softmax rows); "outliers"
        FA3's mix, N(0, 1) plus N(0, 100) on OUTLIER_FRACTION of the q, k, v entries; "ties" every key
        one of TIE_VECTORS vectors per (batch, head), so scores tie exactly. The layout is applied by
        layout_view (the oracle takes these arrays, an implementation the view)."""
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution: expected one of {DISTRIBUTIONS}, got {self.distribution!r}")
        rng = np.random.default_rng(self.seed)
        dt = _dtype_of(self.dtype)
        amp = LARGE_AMPLITUDE if self.distribution == "large" else 1.0
        xs = list(random_inputs(rng, self.batch, self.seqlen_q, self.seqlen_k, self.nheads, self.nheads_k,
                                self.head_dim, dt, amplitude=amp, grad=grad))
        if self.distribution == "outliers":
            extra = np.random.default_rng([self.seed, 1])
            for i in range(3):
                x = xs[i].astype(np.float64)
                hit = extra.random(x.shape) < OUTLIER_FRACTION
                xs[i] = (x + np.where(hit, 10.0 * extra.standard_normal(x.shape), 0.0)).astype(dt)
        elif self.distribution == "ties":
            k = xs[1]
            xs[1] = np.ascontiguousarray(k[:, np.arange(self.seqlen_k) % min(TIE_VECTORS, self.seqlen_k)])
        return tuple(xs)

    def reproducer(self) -> str:
        """A line of Python that rebuilds this case's inputs."""
        return f"flashcupy.testing.{self!r}.inputs()"

    @property
    def dropout_seed(self) -> tuple:
        """The (seed, offset) of the case's dropout keep-mask (flashcupy.dropout.keep_mask; flash-attn's
        rng_state): a function of seed."""
        return (self.seed % 2**32, (self.seed // 2**32) % 2**16)

    def block_mask_bool(self):
        """The block mask's bits, bool (nblocks_q, nblocks_k): each block active with probability
        density, from a generator of the seed's own; None without a block mask."""
        if self.block_mask is None:
            return None
        bq, bk, density = self.block_mask
        rng = np.random.default_rng([self.seed, 3])
        return rng.random((-(-self.seqlen_q // bq), -(-self.seqlen_k // bk))) < density

    def element_mask(self):
        """The block mask as the oracle's element mask, bool (seqlen_q, seqlen_k), or None."""
        m = self.block_mask_bool()
        if m is None:
            return None
        bq, bk, _ = self.block_mask
        return np.repeat(np.repeat(m, bq, axis=0), bk, axis=1)[: self.seqlen_q, : self.seqlen_k]


def layout_view(x, layout: str = "bshd", xp=np):
    """x (a NumPy (batch, seqlen, heads, head_dim) array) with the same values as an array of module xp
    (NumPy or CuPy) in a memory layout (Case.layout): "bshd" contiguous; "bhsd" a BSHD view of
    (batch, heads, seqlen, head_dim) storage (the layout of torch SDPA's tensors); "padded" a view into
    a buffer with 8 more head_dim columns, filled with NaN (rows keep a 16-byte aligned stride, and an
    implementation that reads past head_dim gets NaN)."""
    if layout == "bshd":
        return xp.ascontiguousarray(xp.asarray(x))
    if layout == "bhsd":
        return xp.ascontiguousarray(xp.asarray(x).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "padded":
        big = xp.full(x.shape[:3] + (x.shape[3] + 8,), np.nan, dtype=x.dtype)
        big[..., :x.shape[3]] = xp.asarray(x)
        return big[..., :x.shape[3]]
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _draw_inputs(rng, case: "Case") -> "Case":
    """case with a drawn distribution and layout (random_cases(inputs=True)), independently: half the
    cases draw one of DISTRIBUTIONS (so each non-normal one is in an eighth of them) and half one of
    LAYOUTS (each non-bshd one in a sixth); the rest keep the defaults."""
    d = DISTRIBUTIONS[int(rng.integers(0, len(DISTRIBUTIONS)))] if rng.random() < 0.5 else "normal"
    lay = LAYOUTS[int(rng.integers(0, len(LAYOUTS)))] if rng.random() < 0.5 else "bshd"
    return case._replace(distribution=d, layout=lay)


class Report(NamedTuple):
    """What check_attention saw: every case with its worst error / bound ratio (<= 1 passes), and the
    worst of them."""

    cases: list
    worst: tuple  # (ratio, Case)


def _dtype_of(name):
    if name == "bfloat16":
        bf16 = bfloat16()
        if bf16 is None:
            raise ValueError("dtype: bfloat16 needs ml_dtypes")
        return bf16
    return np.dtype(name)


def worst_ratio(ratios) -> float:
    """The largest error / bound ratio of a {name: RuleRatios} dict (what the assert_* checks return)."""
    return max(r.worst for r in ratios.values())


def assert_attention_close(out, q, k, v, *, lse=None, softmax_scale=None, causal=False, mask=None, tf32=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Check out = softmax(q k^T * softmax_scale) v (and its log-sum-exp lse, if given) of any
    implementation against the float64 oracle by the rule of this module's docstring.

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim), nheads a
    multiple of nheads_k (GQA); out like q, in q's dtype T (float16, bfloat16, float32, float64); lse
    (batch, nheads, seqlen_q) float32 (float64 for float64 inputs), natural log. NumPy arrays or
    anything with .get() (CuPy). causal: flash-attn's bottom-right-aligned causal mask; mask: an optional
    boolean (seqlen_q, seqlen_k) mask of visible keys; tf32: float32 with TF32 products.
    window_size, softcap, alibi_slopes, sinks: flash-attn's score features (flashcupy.reference states
    them: sliding window, tanh soft-capping, ALiBi, attention sinks in the lse).
    Returns {"out": RuleRatios, ...} (ratios to the bound: <= 1 passes). Raises AssertionError naming the
    output, the error and the bound when the rule fails.
    """
    return assert_forward_rule(out, lse, q, k, v, softmax_scale=softmax_scale, causal=causal, mask=mask, tf32=tf32,
                               window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)


SOFTCAPS = (0.5, 1.0, 5.0, 30.0)  # softcap values random_cases / attention_problems draw (30: Gemma 2's)


def _f32(values) -> tuple:
    """Floats rounded to float32, as a (nested) tuple of Python floats (exact in a repr)."""
    return tuple(_f32(v) for v in values) if np.ndim(values) > 1 else tuple(float(x) for x in
                                                                            np.asarray(values, np.float32))


def _draw_features(rng, case: Case) -> Case:
    """case with random score features, each on with probability 1/2 (random_cases(features=True))."""
    w = [int(rng.integers(-1, max(case.seqlen_k, 1) + 1)) if rng.random() < 0.5 else -1 for _ in range(2)]
    softcap = float(rng.choice(SOFTCAPS)) if rng.random() < 0.5 else 0.0
    alibi = None
    if rng.random() < 0.5:
        shape = (case.nheads,) if rng.random() < 0.5 else (case.batch, case.nheads)
        alibi = _f32(rng.uniform(0.01, 1.0, shape))
    sinks = _f32(2.0 * rng.standard_normal(case.nheads)) if rng.random() < 0.5 else None
    return case._replace(window_size=tuple(w), softcap=softcap, alibi_slopes=alibi, sinks=sinks)


def _draw_options(rng, case: Case) -> Case:
    """case with dropout (p from DROPOUT_PS) in a quarter of the cases and, independently, a block mask
    (block sizes from BLOCK_SIZES, density 0.6) in a quarter (random_cases(options=True))."""
    p = float(rng.choice(DROPOUT_PS)) if rng.random() < 0.25 else 0.0
    bm = None
    if rng.random() < 0.25:
        bm = (int(rng.choice(BLOCK_SIZES)), int(rng.choice(BLOCK_SIZES)), 0.6)
    return case._replace(dropout_p=p, block_mask=bm)


def random_cases(n: int, *, seed: int = 0, dtypes=("float16", "bfloat16", "float32", "float64"),
                 causal=(False, True), max_seqlen: int = 96, head_dims=(8, 16, 32, 40, 64, 128),
                 features: bool = False, inputs: bool = False, options: bool = False) -> list:
    """n Case records: seqlens 1..max_seqlen (1 and odd lengths included), seqlen_q != seqlen_k, batch
    1-2, nheads_k 1-2 with GQA groups 1-3, the given dtypes (bfloat16 only where ml_dtypes imports) and
    head dims; a fixed function of seed. features=True: each case also draws the score features, each
    on with probability 1/2 (window sides -1..seqlen_k, softcap from SOFTCAPS, ALiBi slopes in
    [0.01, 1) of shape (nheads,) or (batch, nheads), sinks ~ N(0, 4)); False (default): none, and the
    cases are those of earlier versions. inputs=True: each case also draws its input distribution and
    memory layout (Case.inputs, layout_view), from a generator of its own so the shapes stay those of
    inputs=False. options=True: each case also draws dropout and a block mask (_draw_options), from a
    third generator."""
    rng = np.random.default_rng(seed)
    rng_in = np.random.default_rng([seed, 2])
    rng_opt = np.random.default_rng([seed, 4])
    dtypes = [d for d in dtypes if d != "bfloat16" or bfloat16() is not None]
    out = []
    for i in range(n):
        nheads_k = int(rng.integers(1, 3))
        seqlens = [1, int(rng.integers(1, max_seqlen + 1)), int(rng.integers(1, max_seqlen + 1))]
        case = Case(batch=int(rng.integers(1, 3)), seqlen_q=int(rng.choice(seqlens)),
                    seqlen_k=int(rng.choice(seqlens[1:])), nheads=nheads_k * int(rng.integers(1, 4)),
                    nheads_k=nheads_k, head_dim=int(rng.choice(head_dims)), dtype=str(rng.choice(dtypes)),
                    causal=bool(rng.choice(causal)), softmax_scale=None, seed=int(seed * 100003 + i))
        case = _draw_features(rng, case) if features else case
        case = _draw_options(rng_opt, case) if options else case
        out.append(_draw_inputs(rng_in, case) if inputs else case)
    return out


def check_attention(impl, *, cases: int = 50, seed: int = 0, dtypes=("float16", "bfloat16", "float32", "float64"),
                    causal=(False, True), max_seqlen: int = 96, head_dims=(8, 16, 32, 40, 64, 128),
                    features: bool = False, inputs: bool = False) -> Report:
    """Run impl(q, k, v, causal=..., softmax_scale=...) -> out on `cases` random problems (random_cases)
    and check each by assert_attention_close.

    impl takes NumPy arrays q (batch, seqlen_q, nheads, head_dim), k, v (batch, seqlen_k, nheads_k,
    head_dim) and returns out like q (NumPy, or anything with .get(): convert inside impl for other
    frameworks). Returns a Report when every case passes. Raises AssertionError on the first failing
    case, with the rule's message, the case and its reproducer (Case.reproducer()).
    features=True: the cases carry score features (random_cases), and impl is also given those that
    are on as keywords, flash-attn's names: window_size=(left, right), softcap=float,
    alibi_slopes=float32 (nheads,) or (batch, nheads), sinks=float32 (nheads,) (Case.feature_kwargs()).
    inputs=True: the cases also draw input distributions (large logits, FA3's outlier mix, exact ties)
    and memory layouts (BHSD views, NaN-padded views): impl gets NumPy views (layout_view).
    """
    results, worst = [], (0.0, None)
    for case in random_cases(cases, seed=seed, dtypes=dtypes, causal=causal, max_seqlen=max_seqlen,
                             head_dims=head_dims, features=features, inputs=inputs):
        q, k, v = case.inputs()
        feat = case.feature_kwargs()
        out = impl(*(layout_view(x, case.layout) for x in (q, k, v)), causal=case.causal,
                   softmax_scale=case.softmax_scale, **feat)
        try:
            ratio = worst_ratio(assert_attention_close(out, q, k, v, softmax_scale=case.softmax_scale,
                                                        causal=case.causal, **feat))
        except AssertionError as e:
            raise AssertionError(f"{e}\n  case: {case}\n  inputs: {case.reproducer()}") from None
        results.append((ratio, case))
        worst = max(worst, (ratio, case), key=lambda t: t[0])
    return Report(results, worst)


def attention_problems(*, dtypes=("float16", "float32", "float64"), max_seqlen: int = 64,
                       head_dims=(8, 16, 32, 40, 64), features: bool = False, inputs: bool = False):
    """A hypothesis strategy of Case records (the shapes of random_cases, drawn by hypothesis so that
    it shrinks failures): use as @given(case=attention_problems()), then case.inputs() and, with
    features=True (each score feature on or off, shrinking towards off), case.feature_kwargs();
    inputs=True also draws the input distribution and the layout (shrinking towards normal / bshd):
    give layout_view(x, case.layout) to the implementation."""
    from hypothesis import strategies as st

    @st.composite
    def problems(draw):
        nheads_k = draw(st.integers(1, 2))
        case = Case(batch=draw(st.integers(1, 2)), seqlen_q=draw(st.integers(1, max_seqlen)),
                    seqlen_k=draw(st.integers(1, max_seqlen)), nheads=nheads_k * draw(st.integers(1, 3)),
                    nheads_k=nheads_k, head_dim=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
                    causal=draw(st.booleans()), softmax_scale=None, seed=draw(st.integers(0, 2**31 - 1)))
        if inputs:
            case = case._replace(distribution=draw(st.sampled_from(DISTRIBUTIONS)), layout=draw(st.sampled_from(LAYOUTS)))
        if not features:
            return case
        side = st.one_of(st.just(-1), st.integers(0, max_seqlen))
        floats = st.floats(2.0**-6, 1.0, width=32)
        slopes = st.one_of(st.lists(floats, min_size=case.nheads, max_size=case.nheads).map(tuple),
                           st.lists(st.lists(floats, min_size=case.nheads, max_size=case.nheads).map(tuple),
                                    min_size=case.batch, max_size=case.batch).map(tuple))
        sinks = st.lists(st.floats(-6.0, 6.0, width=32), min_size=case.nheads, max_size=case.nheads).map(tuple)
        return case._replace(window_size=(draw(side), draw(side)),
                             softcap=draw(st.one_of(st.just(0.0), st.sampled_from(SOFTCAPS))),
                             alibi_slopes=draw(st.one_of(st.none(), slopes)), sinks=draw(st.one_of(st.none(), sinks)))

    return problems()
