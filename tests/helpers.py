"""Shared test helpers: DESIGN.md's correctness rule, naive attention computed in a given dtype, inputs.

The correctness rule (DESIGN.md, "Correctness rule"): the oracle is NumPy float64
(flashcupy.reference). For an input dtype T,

    err_kernel = max|kernel - oracle|      err_naive = max|naive attention computed in T - oracle|
    outputs:   err_kernel <= 2 * err_naive + floor
    gradients: err_kernel <= 3 * err_naive + floor
    floor = FLOOR_ULPS ulps of T at the output's magnitude (FLOOR_ULPS * eps(T) * max|oracle|)
            + one ulp of the accumulation dtype at the magnitude of the summed terms, amplified by
              the scores' magnitude through exp() (matters for float32 inputs only)
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

Every function accepts NumPy arrays or anything with .get() (CuPy), so GPU tests can use them too:
    from helpers import assert_forward_rule, assert_backward_rule, random_inputs
"""

from __future__ import annotations

import numpy as np

from flashcupy import reference
from flashcupy._arrays import bfloat16, dtype_name, lse_dtype

FLOOR_ULPS = 4  # "a few ulps of T at the output's magnitude"
FLOAT64_RTOL = 1e-12
TF32_MANTISSA_BITS = 10  # explicit mantissa bits of TF32 (float32 has 23)
TF32_EPS = 2.0**-TF32_MANTISSA_BITS  # its machine epsilon; unit roundoff TF32_EPS / 2 = 2^-11
OUT_FACTOR = 2
GRAD_FACTOR = 3


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


def _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32=False, order="torch"):
    """(qs, p, lse, e, denom): the q the scores were formed from (scaled in T for "torch"), P in T,
    the LSE, exp(S - rowmax) in T and its row sums (1 on rows with no visible key)."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    batch, nheads, seqlen_q, _ = qh.shape
    seqlen_k = kh.shape[2]
    if order == "torch":
        qs = _round(qh * scale, dtype)  # flash-attn's reference scales q in T first
        s = _mm(qs, kh.swapaxes(-1, -2), dtype, tf32)  # (B, H, Sq, Sk) in T
    else:  # DESIGN.md's S = softmax_scale * Q K^T: the scale after the product
        qs = qh
        s = _round(_mm(qh, kh.swapaxes(-1, -2), dtype, tf32) * scale, dtype)
    visible = reference.attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal,
                                       mask=None if mask is None else to_numpy(mask))
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    has_key = denom > 0
    p = np.where(has_key, e / np.where(has_key, denom, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(has_key, np.log(np.where(has_key, denom, 1.0)) + m, -np.inf)[..., 0]
    return qs, _round(p, dtype), lse.astype(lse_dtype(dtype)), _round(e, dtype), np.where(has_key, denom, 1.0)


def _naive_probs(qh, kh, dtype, scale, causal, mask, tf32=False, order="torch"):
    return _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32, order)[:3]


def naive_forward(q, k, v, dtype=None, *, softmax_scale=None, causal=False, mask=None, tf32=False, order="torch"):
    """Attention computed naively in dtype T (default: q's dtype). Returns (out (B, Sq, H, D) in T
    held as float32/float64, lse (B, H, Sq) as float32/float64).
    tf32 (float32 only): q k^T and P V with TF32 operands (tf32_round), float32 accumulation.
    order: "torch" (flash-attn's attention_ref: q scaled in T, out = P V with P normalised in T) or
    "design" (DESIGN.md's equations: S = softmax_scale * (Q K^T), out = exp(S - m) V / l)."""
    qh, kh, vh, dtype, scale, _ = _naive_setup(q, k, v, dtype, softmax_scale, tf32)
    _, p, lse, e, denom = _naive_softmax(qh, kh, dtype, scale, causal, mask, tf32, order)
    if order == "torch":
        out = _mm(p, vh, dtype, tf32)
    else:  # rows with no visible key have e = 0: out 0
        out = _round(_mm(e, vh, dtype, tf32) / denom, dtype)
    return out.transpose(0, 2, 1, 3), lse


def naive_backward(dout, q, k, v, dtype=None, *, softmax_scale=None, causal=False, mask=None, tf32=False,
                   order="torch"):
    """Autograd of naive_forward, each op in dtype T. Returns (dq, dk, dv) shaped like q, k, v.
    tf32 (float32 only): every matmul (the forward's two and dV, dP, dQ, dK) with TF32 operands.
    order "design": dK = softmax_scale * (dS^T Q), the scale after the product as for dQ."""
    qh, kh, vh, dtype, scale, group = _naive_setup(q, k, v, dtype, softmax_scale, tf32)
    do = _round(to_numpy(dout).transpose(0, 2, 1, 3), dtype)
    qs, p, _ = _naive_probs(qh, kh, dtype, scale, causal, mask, tf32, order)
    acc = accum_dtype(dtype)
    dv = _mm(p.swapaxes(-1, -2), do, dtype, tf32)
    dp = _mm(do, vh.swapaxes(-1, -2), dtype, tf32)
    # softmax backward, computed in the accumulation dtype and rounded to T (as torch does)
    ds = _round(p * (dp - (p * dp).sum(axis=-1, keepdims=True, dtype=acc)), dtype)
    dqs = _mm(ds, kh, dtype, tf32)
    dq = _round(dqs * scale, dtype)
    dk = _mm(ds.swapaxes(-1, -2), qs, dtype, tf32)
    if order == "design":  # qs is the unscaled q
        dk = _round(dk * scale, dtype)
    batch, nheads, seqlen_k, head_dim = dk.shape

    def ungroup(x):  # the backward of repeat: sum over the query heads of a group, rounded to T
        x = x.reshape(batch, nheads // group, group, seqlen_k, head_dim).sum(axis=2, dtype=acc)
        return _round(x, dtype).transpose(0, 2, 1, 3)

    return dq.transpose(0, 2, 1, 3), ungroup(dk), ungroup(dv)


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


def rule_bound(dtype, err_naive, magnitude, *, grad=False, term_magnitude=None, score_magnitude=0.0,
               stored_magnitude=0.0, tf32=False):
    """The largest err_kernel DESIGN.md's rule allows for input dtype T:

        factor * err_naive + FLOOR_ULPS * eps(T) * magnitude + eps(A) * (1 + sigma) * terms
                           + eps(T) * stored

    with factor 2 (outputs) or 3 (gradients) and A the accumulation dtype (float32; float64 for
    float64). The last term is one ulp of A at the magnitude of the summed terms (`terms`, e.g.
    max(P |V|) for out), amplified by exp(): a score s of size sigma carries an absolute rounding
    error ~eps(A) * sigma in any evaluation in A, which exp() turns into a relative error of P, and
    so does an LSE of size sigma stored in A (DESIGN.md: float32). For float16 / bfloat16 inputs it is
    negligible (eps(float32) = eps(float16) / 8192); for float32 inputs, whose naive attention runs in
    the kernel's own precision, it is what float32 arithmetic can promise.
    The last term is one ulp of T at the magnitude `stored` of what the rounding of a tensor stored
    in T and read back can move: the backward reads out in T (half an ulp off the exact output) and
    forms D = rowsum(dO o O) from it, so dq and dk carry eps(T) * scale * rowsum(|dO| o |O|) (P |K|)
    even where the exact gradient cancels to 0 (see Magnitudes.dq_stored).
    float64 inputs: err_kernel <= 1e-12 * max(magnitude, terms).
    tf32 (float32 inputs, TF32 products; err_naive from naive attention with tf32=True): the same
    bound, except that the stored term takes TF32_EPS instead of eps(float32). The backward's
    dP = dO V^T reads dO and V rounded to TF32, while D = rowsum(dO o O) reads dO as stored and an O
    whose every product had TF32 operands, so dP - D, and with it dq and dk, keeps TF32-sized noise
    even where the exact gradient cancels to 0 (a row with one visible key), where the naive
    attention, whose D is rowsum(P o dP) of its own dP, gives exactly 0.
    """
    dtype = np.dtype(dtype)
    terms = magnitude if term_magnitude is None else term_magnitude
    if dtype == np.float64:
        return FLOAT64_RTOL * max(magnitude, terms)
    factor = GRAD_FACTOR if grad else OUT_FACTOR
    stored_eps = TF32_EPS if tf32 else eps(dtype)
    return (factor * err_naive + FLOOR_ULPS * eps(dtype) * magnitude
            + eps(accum_dtype(dtype)) * (1.0 + score_magnitude) * terms + stored_eps * stored_magnitude)


def check_rule(name, got, oracle, naive, dtype, *, grad=False, magnitude=None, term_magnitude=None,
               score_magnitude=0.0, stored_magnitude=0.0, tf32=False):
    """Assert DESIGN.md's rule (see rule_bound) for one tensor; naive may be None for float64, or a
    list of naive results (evaluation orders): err_naive is then the largest of their errors.

    magnitude defaults to max|oracle|. tf32: naive has TF32 products (see rule_bound). Returns (err_kernel, bound).
    """
    dtype = np.dtype(dtype)
    err = max_abs_err(got, oracle)
    mag = magnitude_of(oracle) if magnitude is None else magnitude
    if dtype == np.float64:
        err_naive = 0.0
    elif isinstance(naive, list):
        err_naive = max(max_abs_err(x, oracle) for x in naive)
    else:
        err_naive = max_abs_err(naive, oracle)
    bound = rule_bound(dtype, err_naive, mag, grad=grad, term_magnitude=term_magnitude,
                       score_magnitude=score_magnitude, stored_magnitude=stored_magnitude, tf32=tf32)
    what = dtype_name(dtype) + (", TF32 products" if tf32 else "")
    assert err <= bound, (f"{name} ({what}): err_kernel {err:.3e} > bound {bound:.3e} "
                          f"(err_naive {err_naive:.3e}, magnitude {mag:.3e}, terms {term_magnitude}, "
                          f"scores {score_magnitude:.3g}, stored {stored_magnitude:.3g}, "
                          f"{'gradient' if grad else 'output'} rule)")
    return err, bound


class Magnitudes:
    """Term magnitudes of one attention problem, in float64 from the oracle's P (see rule_bound).

    sigma: largest |scaled score| a visible entry can carry, scale * (|q| |k|^T), or |LSE| if larger.
    out:   max(P |V|).
    dq, dk, dv (when dout is given): the gradients' sums over absolute values,
           dS-terms = P o (|dO| |V|^T + rowsum(|dO| o (P |V|))),
           dq: scale * dS-terms |K|, dk: scale * dS-terms^T |Q|, dv: P^T |dO| (summed over a group).
    They also cover the exactly-zero gradients of rows with one visible key, whose float evaluation
    (D = rowsum(dO o O), as the flash backward computes it) still leaves noise of the terms' size.
    dq_stored, dk_stored: what an O off by |O| (a relative error of 1) moves dq and dk by through
    D = rowsum(dO o O): scale * rowsum(|dO| o |O|) (P |K|), and its transpose with |Q|.
    """

    def __init__(self, q, k, v, dout=None, *, softmax_scale=None, causal=False, mask=None):
        q, k, v = (to_numpy(x).astype(np.float64) for x in (q, k, v))
        batch, seqlen_q, nheads, head_dim = q.shape
        seqlen_k, nheads_k = k.shape[1], k.shape[2]
        group = nheads // nheads_k
        scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        p, lse = reference.attention_probs(q, k, softmax_scale=softmax_scale, causal=causal, mask=mask)
        qa = np.abs(q).transpose(0, 2, 1, 3)
        ka, va = (np.repeat(np.abs(x).transpose(0, 2, 1, 3), group, axis=1) for x in (k, v))
        visible = reference.attention_mask(batch, nheads, seqlen_q, seqlen_k, causal=causal,
                                           mask=None if mask is None else to_numpy(mask))
        s_abs = np.where(visible, scale * (qa @ ka.swapaxes(-1, -2)), 0.0)
        self.sigma = max(magnitude_of(s_abs), magnitude_of(lse))
        pv = p @ va  # (B, H, Sq, D)
        self.out = magnitude_of(pv)
        if dout is None:
            return
        doa = np.abs(to_numpy(dout).astype(np.float64)).transpose(0, 2, 1, 3)
        terms = p * (doa @ va.swapaxes(-1, -2) + (doa * pv).sum(axis=-1, keepdims=True))

        def group_sum(x):
            return x.reshape(batch, nheads_k, group, seqlen_k, head_dim).sum(axis=2)

        self.dq = scale * magnitude_of(terms @ ka)
        self.dk = scale * magnitude_of(group_sum(terms.swapaxes(-1, -2) @ qa))
        self.dv = magnitude_of(group_sum(p.swapaxes(-1, -2) @ doa))
        d_abs = (doa * np.abs(p @ np.repeat(v.transpose(0, 2, 1, 3), group, axis=1))).sum(axis=-1, keepdims=True)
        self.dq_stored = scale * magnitude_of(d_abs * (p @ ka))
        self.dk_stored = scale * magnitude_of(group_sum(p.swapaxes(-1, -2) @ (d_abs * qa)))
        self.dv_stored = 0.0


def assert_forward_rule(out, lse, q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False):
    """Check a kernel's (out, lse) for inputs q, k, v against the oracle by DESIGN.md's rule.

    lse may be None. The dtype T is q's. Accepts NumPy or CuPy arrays.
    tf32: for float32 inputs, T is float32 with TF32 products (allow_tf32=True): err_naive is the
    larger error of naive_forward(..., tf32=True) in the "torch" and the "design" order (see the
    module docstring). Other dtypes ignore it (as allow_tf32 does) and take their own rule.
    """
    q, k, v = (to_numpy(x) for x in (q, k, v))
    dtype = q.dtype
    tf32 = bool(tf32) and dtype == np.float32
    kw = dict(softmax_scale=softmax_scale, causal=causal, mask=mask)
    ref_out, ref_lse = reference.attention_forward(q, k, v, **kw)
    if dtype == np.float64:
        nv_out, nv_lse = None, None
    elif tf32:
        orders = [naive_forward(q, k, v, **kw, tf32=True, order=order) for order in ORDERS]
        nv_out, nv_lse = [o for o, _ in orders], [lse for _, lse in orders]
    else:
        nv_out, nv_lse = naive_forward(q, k, v, **kw)
    mags = Magnitudes(q, k, v, **kw)
    check_rule("out", out, ref_out, nv_out, dtype, term_magnitude=mags.out, score_magnitude=mags.sigma, tf32=tf32)
    if lse is not None:
        lse = to_numpy(lse)
        assert lse.dtype == lse_dtype(dtype), f"lse dtype {lse.dtype}, expected {lse_dtype(dtype)}"
        # lse = m + log(l): its terms are of size 1 around the scores' own magnitude sigma
        check_rule("lse", lse, ref_lse, nv_lse, dtype, term_magnitude=1.0, score_magnitude=mags.sigma, tf32=tf32)


def assert_backward_rule(grads, dout, q, k, v, *, softmax_scale=None, causal=False, mask=None, tf32=False):
    """Check a kernel's (dq, dk, dv) against the oracle's gradients by DESIGN.md's rule.
    tf32: as assert_forward_rule (err_naive from naive_backward(..., tf32=True), both orders)."""
    dout, q, k, v = (to_numpy(x) for x in (dout, q, k, v))
    dtype = q.dtype
    tf32 = bool(tf32) and dtype == np.float32
    kw = dict(softmax_scale=softmax_scale, causal=causal, mask=mask)
    refs = reference.attention_backward(dout, q, k, v, **kw)
    if dtype == np.float64:
        naives = (None,) * 3
    elif tf32:
        naives = list(zip(*(naive_backward(dout, q, k, v, **kw, tf32=True, order=order) for order in ORDERS)))
        naives = [list(x) for x in naives]  # per gradient: [torch order, design order]
    else:
        naives = naive_backward(dout, q, k, v, **kw)
    mags = Magnitudes(q, k, v, dout, **kw)
    for name, got, ref, nv in zip(("dq", "dk", "dv"), grads, refs, naives):
        check_rule(name, got, ref, nv, dtype, grad=True, term_magnitude=getattr(mags, name),
                   score_magnitude=mags.sigma, stored_magnitude=getattr(mags, name + "_stored"), tf32=tf32)


# ---------------------------------------------------------------------------------------------------
# dropout: naive attention in T with the same keep-mask, and the rule against the oracle given the mask


def naive_with_dropout(q, k, v, dout, keep, p_eff, *, causal=False, mask=None):
    """Naive attention and its autograd in q's dtype T (as naive_forward / naive_backward) with the
    dropout keep-mask Z applied to P and dP (scaled by 1 / (1 - p_eff)). Returns (out, (dq, dk, dv))."""
    qh, kh, vh, dtype, scale, group = _naive_setup(q, k, v, None, None)
    qs, p, _ = _naive_probs(qh, kh, dtype, scale, causal, None if mask is None else to_numpy(mask))
    z = to_numpy(keep) / (1.0 - p_eff)
    pd = _round(p * z, dtype)
    out = _mm(pd, vh, dtype).transpose(0, 2, 1, 3)
    do = _round(to_numpy(dout).transpose(0, 2, 1, 3), dtype)
    acc = accum_dtype(dtype)
    dv = _mm(pd.swapaxes(-1, -2), do, dtype)
    dp = _round(_mm(do, vh.swapaxes(-1, -2), dtype) * z, dtype)
    ds = _round(p * (dp - (p * dp).sum(axis=-1, keepdims=True, dtype=acc)), dtype)
    dq = _round(_mm(ds, kh, dtype) * scale, dtype)
    dk = _mm(ds.swapaxes(-1, -2), qs, dtype)
    b, h, sk, d = dk.shape

    def ungroup(x):
        return _round(x.reshape(b, h // group, group, sk, d).sum(axis=2, dtype=acc), dtype).transpose(0, 2, 1, 3)

    return out, (dq.transpose(0, 2, 1, 3), ungroup(dk), ungroup(dv))


def assert_dropout_rule(out, grads, dout, q, k, v, keep, p_eff, *, causal=False, mask=None):
    """DESIGN.md's rule for a dropout run against the oracle given the regenerated keep-mask: err_naive
    from naive attention in T with the same mask; term magnitudes of the undropped problem times
    1 / (1 - p_eff) (an upper bound of the dropped terms). grads may be None."""
    dout, q, k, v = (to_numpy(x) for x in (dout, q, k, v))
    dtype = q.dtype
    inv = 1.0 / (1.0 - p_eff)
    mags = Magnitudes(q, k, v, dout, causal=causal, mask=mask)
    nv_out, nv_grads = naive_with_dropout(q, k, v, dout, keep, p_eff, causal=causal, mask=mask)
    ref_out, _ = reference.attention_forward(q, k, v, causal=causal, mask=mask, dropout_mask=keep, dropout_p=p_eff)
    check_rule("out", out, ref_out, nv_out, dtype, term_magnitude=mags.out * inv, score_magnitude=mags.sigma)
    if grads is None:
        return
    refs = reference.attention_backward(dout, q, k, v, causal=causal, mask=mask, dropout_mask=keep, dropout_p=p_eff)
    for name, g, r, nv in zip(("dq", "dk", "dv"), grads, refs, nv_grads):
        check_rule(name, g, r, nv, dtype, grad=True, term_magnitude=getattr(mags, name) * inv,
                   score_magnitude=mags.sigma, stored_magnitude=getattr(mags, name + "_stored") * inv)


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
    """(SimtFwdConfig list, DmmaBwdConfig list) of bench/bench_simt.py's FWD_SWEEP / DMMA_BWD_SWEEP,
    every head dim listed there."""
    import importlib.util
    import os

    from flashcupy._configs import DmmaBwdConfig, SimtFwdConfig

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_simt.py")
    spec = importlib.util.spec_from_file_location("_bench_simt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fwd = [SimtFwdConfig("float", hd, *c) for hd, cs in mod.FWD_SWEEP.items() for c in cs]
    bwd = [DmmaBwdConfig(hd, *c) for hd, cs in mod.DMMA_BWD_SWEEP.items() for c in cs]
    return fwd, bwd
