"""flashcupy.torch: the custom ops (attn_fwd / attn_bwd) and flash_attn_func on torch tensors, checked
against the NumPy float64 oracle by DESIGN.md's rule: eager, autograd (loss.backward()), opcheck,
torch.compile(fullgraph=True) forward and backward, GQA, causal, dropout, sinks, strided inputs, errors.
CPU tensors run flashcupy's CPU path; the tests marked gpu repeat the main ones on CUDA tensors (and on
a side stream). Skipped where torch is not installed (CI)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flashcupy  # noqa: E402
from flashcupy import dropout as fc_dropout  # noqa: E402
from flashcupy._arrays import bfloat16  # noqa: E402
from flashcupy.testing import (assert_backward_rule, assert_dropout_rule, assert_forward_rule,  # noqa: E402
                               random_inputs)

fct = pytest.importorskip("flashcupy.torch")

NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GPU = pytest.mark.gpu


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    return "cuda"


def np_dtype(dt):
    return bfloat16() if dt == torch.bfloat16 else NP_DTYPES[dt]


def to_torch(a, device="cpu", requires_grad=False):
    """NumPy (ml_dtypes bfloat16 included) -> a fresh torch tensor on device."""
    if a.dtype == bfloat16():
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t.to(device).requires_grad_(requires_grad)


def to_np(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


def problem(rng, dtype, batch=2, seqlen_q=33, seqlen_k=47, nheads=4, nheads_k=2, head_dim=32, device="cpu"):
    """Fresh random (q, k, v, dout) as NumPy arrays and as torch leaves requiring grad."""
    arrays = random_inputs(rng, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, np_dtype(dtype), grad=True)
    q, k, v = (to_torch(a, device, True) for a in arrays[:3])
    return arrays, (q, k, v, to_torch(arrays[3], device))


def grads_of(q, k, v, out, dout, *extra):
    (out * dout).sum().backward()  # d loss / d out = dout
    return tuple(x.grad for x in (q, k, v, *extra))


# ---------------------------------------------------------------------------------------------------
# eager: forward and autograd against the oracle


def check_forward_backward(rng, dtype, causal, device="cpu", **shape):
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, dtype, device=device, **shape)
    out, lse = fct.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and not lse.requires_grad
    assert_forward_rule(to_np(out), to_np(lse), qn, kn, vn, causal=causal)
    grads = grads_of(q, k, v, out, dout)
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    assert_backward_rule(tuple(to_np(g) for g in grads), don, qn, kn, vn, causal=causal)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_forward_backward_vs_oracle(rng, dtype, causal):
    check_forward_backward(rng, dtype, causal)


@pytest.mark.parametrize("nheads,nheads_k", [(4, 4), (6, 2), (4, 1)])
def test_cpu_gqa_mqa(rng, nheads, nheads_k):
    check_forward_backward(rng, torch.float32, True, nheads=nheads, nheads_k=nheads_k, seqlen_q=40, seqlen_k=24)


def test_rule_rejects_a_wrong_causal_through_the_op(rng):
    """The check can fail: the op's causal output is not the non-causal oracle's, and a 2% error in dq
    from the op is rejected."""
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.float32)
    out = fct.flash_attn_func(q, k, v, causal=True)
    with pytest.raises(AssertionError):
        assert_forward_rule(to_np(out), None, qn, kn, vn, causal=False)
    dq, dk, dv = (to_np(g) for g in grads_of(q, k, v, out, dout))
    with pytest.raises(AssertionError):
        assert_backward_rule((dq * 1.02, dk, dv), don, qn, kn, vn, causal=True)


def test_cpu_strided_inputs_and_expanded_dout(rng):
    """BHSD data as a transposed view (stride(-1) == 1, no copy), a q whose last dimension is strided
    (made contiguous), and the stride-0 dout of out.sum()."""
    b, s, h, d = 2, 24, 4, 16
    qn, kn, vn = random_inputs(rng, b, s, s, h, h, d, np.float32)
    q = torch.from_numpy(np.ascontiguousarray(qn.transpose(0, 2, 1, 3))).transpose(1, 2).requires_grad_(False)
    wide = torch.from_numpy(np.repeat(kn, 2, axis=-1).copy())  # (b, s, h, 2d); [..., ::2] is kn, stride 2
    k = wide[..., ::2]
    assert q.stride(-1) == 1 and not q.is_contiguous() and k.stride(-1) == 2
    v = torch.from_numpy(vn.copy())
    for x in (q, k, v):
        x.requires_grad_(True)
    out = fct.flash_attn_func(q, k, v, causal=True)
    assert_forward_rule(to_np(out), None, qn, kn, vn, causal=True)
    out.sum().backward()
    don = np.ones_like(qn)
    assert_backward_rule(tuple(to_np(x.grad) for x in (q, k, v)), don, qn, kn, vn, causal=True)


def test_cpu_one_tensor_as_q_k_v_accumulates_its_gradients(rng):
    """flash_attn_func(x, x, x): autograd sums dq + dk + dv into x.grad (a tensor used three times)."""
    (xn, _, _, don), _ = problem(rng, torch.float64, seqlen_q=21, seqlen_k=21, nheads=2, nheads_k=2)
    x = to_torch(xn, requires_grad=True)
    out = fct.flash_attn_func(x, x, x, causal=True)
    (out * to_torch(don)).sum().backward()
    want = sum(flashcupy.reference.attention_backward(don, xn, xn, xn, causal=True))
    np.testing.assert_allclose(to_np(x.grad), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_inputs_and_outputs_are_not_copied(rng, dtype, monkeypatch):
    """flashcupy reads the tensors' own memory (NumPy views; bfloat16 through an int16 view) and out
    is the memory flashcupy wrote (torch.from_numpy)."""
    seen = {}
    real = fct.interface.flash_attn_forward

    def spy(q, k, v, **kw):
        res = real(q, k, v, **kw)
        seen.update(q=q, k=k, out=res.out)
        return res

    monkeypatch.setattr(fct.interface, "flash_attn_forward", spy)
    _, (q, k, v, _) = problem(rng, dtype)
    out = fct.flash_attn_func(q, k, v)
    assert seen["q"].dtype == np_dtype(dtype)
    for name, t in (("q", q), ("k", k), ("out", out)):
        assert seen[name].__array_interface__["data"][0] == t.data_ptr(), name


def test_cpu_options_window_softcap_alibi_sinks(rng):
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.float32, nheads=4, nheads_k=2)
    slopes_n = rng.uniform(0.05, 0.5, 4).astype(np.float32)
    sinks_n = rng.standard_normal(4).astype(np.float32)
    sinks = torch.from_numpy(sinks_n.copy()).requires_grad_(True)
    feat = dict(window_size=(9, 3), softcap=5.0, alibi_slopes=slopes_n, sinks=sinks_n)
    out = fct.flash_attn_func(q, k, v, window_size=(9, 3), softcap=5.0, alibi_slopes=torch.from_numpy(slopes_n),
                              sinks=sinks)
    assert_forward_rule(to_np(out), None, qn, kn, vn, **feat)
    grads = grads_of(q, k, v, out, dout, sinks)
    assert grads[3].dtype == torch.float32 and grads[3].shape == (4,)
    assert_backward_rule(tuple(to_np(g) for g in grads), don, qn, kn, vn, **feat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dropout_backward_repeats_the_keep_mask(rng, dtype):
    p = 0.25
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, dtype, batch=1, seqlen_q=20, seqlen_k=30)
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))  # often >= 2^63: the int64 wrap is exercised
    offset = int(rng.integers(0, 2**32))
    out = fct.flash_attn_func(q, k, v, dropout_p=p, causal=True, seed=(seed, offset))
    grads = grads_of(q, k, v, out, dout)
    keep = fc_dropout.keep_mask(seed, offset, 1, 4, 20, 30, p)
    assert_dropout_rule(to_np(out), tuple(to_np(g) for g in grads), don, qn, kn, vn, keep,
                        fc_dropout.effective_dropout_p(p), causal=True)


def test_cpu_dropout_without_seed_draws_a_new_mask_each_call(rng):
    _, (q, k, v, _) = problem(rng, torch.float32)
    a = fct.flash_attn_func(q, k, v, dropout_p=0.5)
    b = fct.flash_attn_func(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile


def fwd_args(q, k, v, *, dropout_p=0.0, causal=False, sinks=None, alibi=None, seed=None):
    return (q, k, v, dropout_p, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, alibi, sinks, seed, 0, False, False)


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "sinks", "dropout_seeded"])
def test_opcheck(rng, case):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    _, (q, k, v, dout) = problem(rng, torch.float32, batch=1, seqlen_q=9, seqlen_k=13, head_dim=16)
    kw = {"plain": {}, "causal_gqa": dict(causal=True),
          "sinks": dict(sinks=torch.randn(4, requires_grad=True), alibi=torch.rand(4)),
          "dropout_seeded": dict(dropout_p=0.3, seed=int(rng.integers(0, 2**62)))}[case]
    args = fwd_args(q, k, v, **kw)
    torch.library.opcheck(torch.ops.flashcupy.attn_fwd.default, args)
    out, lse, rng_state = torch.ops.flashcupy.attn_fwd(*args)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, rng_state, kw.get("dropout_p", 0.0),
                q.shape[-1] ** -0.5, kw.get("causal", False), -1, -1, 0.0, kw.get("alibi"),
                None if kw.get("sinks") is None else kw["sinks"].detach(), False, False)
    torch.library.opcheck(torch.ops.flashcupy.attn_bwd.default, bwd_args)


def compiled_loss(backend):
    def loss_fn(q, k, v, dout):
        out = fct.flash_attn_func(q, k, v, causal=True)
        return (out * dout).sum(), out

    return torch.compile(loss_fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(rng, backend):
    """Compiled forward and backward (the fake impl traces, the real op runs) equal eager bit for bit,
    and pass the rule."""
    torch._dynamo.reset()
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.float32)
    try:
        loss, out = compiled_loss(backend)(q, k, v, dout)
    except Exception as e:  # inductor on the CPU needs a C++ compiler
        if backend == "inductor" and "compil" in str(e).lower() and "flashcupy" not in str(e):
            pytest.skip(f"inductor cannot compile here: {type(e).__name__}")
        raise
    assert out.requires_grad
    loss.backward()
    grads = tuple(x.grad.clone() for x in (q, k, v))
    assert_forward_rule(to_np(out), None, qn, kn, vn, causal=True)
    assert_backward_rule(tuple(to_np(g) for g in grads), don, qn, kn, vn, causal=True)
    for x in (q, k, v):
        x.grad = None
    eager_out = fct.flash_attn_func(q, k, v, causal=True)
    eager_grads = grads_of(q, k, v, eager_out, dout)
    assert torch.equal(out, eager_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_compile_dropout_draws_a_fresh_seed_each_call(rng):
    """Under torch.compile the dropout seed is drawn inside the op at run time (flashcupy.dropout's
    generator), not baked into the graph; the backward repeats each call's own keep-mask."""
    torch._dynamo.reset()
    p, (b, s, h) = 0.5, (1, 16, 4)
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.float32, batch=b, seqlen_q=s, seqlen_k=s, nheads=h)
    f = torch.compile(lambda q, k, v: fct.flash_attn_func(q, k, v, dropout_p=p), fullgraph=True, backend="aot_eager")
    f(q, k, v)  # compiles (the fake impl draws nothing) and runs once
    gen = fc_dropout.default_generator
    seed, offset = gen.seed, gen.offset
    out_a, out_b = f(q, k, v), f(q, k, v)
    assert not torch.equal(out_a, out_b)
    grads = grads_of(q, k, v, out_b, dout)
    keep = fc_dropout.keep_mask(seed, (offset + 1) % 2**32, b, h, s, s, p)
    assert_dropout_rule(to_np(out_b), tuple(to_np(g) for g in grads), don, qn, kn, vn, keep,
                        fc_dropout.effective_dropout_p(p))


# ---------------------------------------------------------------------------------------------------
# errors name the argument


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, r"^k: expected head_dim 16"),
    (lambda q, k, v: (q, k, v[:, :5]), ValueError, r"^v: expected the shape of k"),
    (lambda q, k, v: (q, k[:, :, [0, 1, 0]], v[:, :, [0, 1, 0]]), ValueError, r"^k: expected nheads_k dividing nheads=4"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"^q: expected rank 4"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"^k: expected batch 2"),
    (lambda q, k, v: (q, k.double(), v.double()), TypeError, r"^k: expected the dtype of q"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"^q: expected dtype in"),
    (lambda q, k, v: (q, k.numpy(), v), TypeError, r"^k: expected a torch.Tensor"),
])
def test_errors_name_the_argument(rng, make, exc, match):
    _, (q, k, v, _) = problem(rng, torch.float32, head_dim=16)
    q, k, v = make(q.detach(), k.detach(), v.detach())
    with pytest.raises(exc, match=match):
        fct.flash_attn_func(q, k, v)


def test_errors_from_flashcupy_name_the_argument(rng):
    _, (q, k, v, _) = problem(rng, torch.float32)
    with pytest.raises(ValueError, match=r"^window_size"):
        fct.flash_attn_func(q, k, v, window_size=(-3, 0))
    with pytest.raises(TypeError, match=r"^causal: expected a bool"):
        fct.flash_attn_func(q, k, v, causal=1)


def test_import_flashcupy_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, flashcupy; flashcupy.flash_attn_func; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------
# CUDA tensors: zero-copy through CuPy on torch's current stream


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_backward_vs_oracle(rng, dtype, causal):
    device = cuda_or_skip()
    check_forward_backward(rng, dtype, causal, device=device, head_dim=64, seqlen_q=129, seqlen_k=200)


@GPU
def test_gpu_zero_copy_output_and_side_stream(rng):
    """On a side stream the op queues on that stream (torch's current one): the result is right
    without a synchronisation of the default stream, and out is a torch tensor on q's device."""
    device = cuda_or_skip()
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.bfloat16, device=device, head_dim=64, seqlen_q=256,
                                                 seqlen_k=256)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device=device)  # work queued ahead of ours on the side stream
        _ = big @ big
        out = fct.flash_attn_func(q, k, v, causal=True)
        grads = grads_of(q, k, v, out, dout)
    side.synchronize()
    assert isinstance(out, torch.Tensor) and out.device == q.device
    assert_forward_rule(to_np(out), None, qn, kn, vn, causal=True)
    assert_backward_rule(tuple(to_np(g) for g in grads), don, qn, kn, vn, causal=True)


@GPU
def test_gpu_compile_fullgraph(rng):
    device = cuda_or_skip()
    torch._dynamo.reset()
    (qn, kn, vn, don), (q, k, v, dout) = problem(rng, torch.bfloat16, device=device, head_dim=64)
    loss, out = compiled_loss("inductor")(q, k, v, dout)
    loss.backward()
    assert_forward_rule(to_np(out), None, qn, kn, vn, causal=True)
    assert_backward_rule(tuple(to_np(x.grad) for x in (q, k, v)), don, qn, kn, vn, causal=True)


@GPU
def test_gpu_opcheck(rng):
    device = cuda_or_skip()
    _, (q, k, v, _) = problem(rng, torch.bfloat16, device=device, head_dim=64)
    torch.library.opcheck(torch.ops.flashcupy.attn_fwd.default, fwd_args(q, k, v, causal=True))
