"""Providers: every attention implementation the bench measures, each used only where it runs here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import numpy as np

from .common import BLOCK, MEMORY_FRACTION, _cupy, _short
from .inputs import Inputs, np_dtype
from .shape import Case, Plan


# ---------------------------------------------------------------------------------------------------
# providers


@dataclasses.dataclass
class Runner:
    """What a provider hands the harness for one case.

    fn() is the timed call; it returns {"out" | "dq" | "dk" | "dv": array} for the accuracy check.
    minus, when given, is timed too and subtracted (JAX's bwd = (fwd+bwd) - fwd).
    to_numpy(array) -> float64 NumPy array in BSHD layout.
    """

    fn: object
    to_numpy: object
    minus: object = None
    note: str = ""


class Provider:
    """One attention implementation. Subclasses set name, family (the allocator/timer: cupy, numpy,
    torch or jax) and implement probe (why it is absent, or None) and make (a Runner for a case)."""

    name = ""
    family = "cupy"
    description = ""

    def __init__(self, device: str):
        self.device = device

    def probe(self):
        """None when usable here, else the reason it is absent (never raises)."""
        return None

    def version(self):
        return None

    def wanted(self, plan: Plan):
        """None when this provider belongs in the run, else why not (e.g. block-sparse only)."""
        return None

    def check(self, case: Case, plan: Plan):
        """(status, note) when this case is not run, else None."""
        return None

    def score_bytes(self, case: Case):
        """Bytes per (query, key) score held at once, for providers that materialise the scores; None for
        O(N) providers."""
        return None

    def make(self, case: Case, inputs: Inputs) -> Runner:
        raise NotImplementedError


def _bshd_numpy(x) -> np.ndarray:
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x).astype(np.float64)


class _CupyProvider(Provider):
    """A provider that runs on NumPy (device "cpu") or CuPy: usable wherever CuPy sees a GPU."""

    def __init__(self, device):
        super().__init__(device)
        self.family = "numpy" if device == "cpu" else "cupy"

    def probe(self):
        if self.device == "cpu":
            return None
        from .._arrays import cupy_or_none, gpu_available

        if cupy_or_none() is None:
            return "cupy is not installed"
        return None if gpu_available() else "no CUDA GPU usable through CuPy"


class FlashcupyProvider(_CupyProvider):
    name = "flashcupy"
    description = "flashcupy.flash_attn_forward / flash_attn_backward"

    def version(self):
        from .. import __version__

        return __version__

    @staticmethod
    def block_sparse_supported() -> bool:
        import inspect

        from ..interface import flash_attn_forward

        return "block_mask" in inspect.signature(flash_attn_forward).parameters

    def check(self, case, plan):
        if case.density < 1 and not self.block_sparse_supported():
            return ("not available", "flashcupy has no block-sparse API yet")
        return None

    def _path_note(self, case) -> str:
        from ..interface import kernel_path

        path = kernel_path(np_dtype(case.dtype), case.head_dim, on_gpu=self.device != "cpu")
        return "" if path.startswith("fused") else path

    def make(self, case, inputs):
        from ..interface import flash_attn_backward, flash_attn_forward

        q, k, v, do = inputs.native()
        kw = dict(causal=case.causal)
        if case.density < 1:  # one BlockMask per mask: its device lists are built once, then reused
            from ..blocksparse import BlockMask

            kw["block_mask"] = inputs._cached(("BlockMask", case.causal, case.density), lambda: BlockMask(
                inputs.block_mask(case.causal, case.density), BLOCK, BLOCK))
        if case.mode == "fwd":
            def fn():
                return {"out": flash_attn_forward(q, k, v, **kw).out}
        elif case.mode == "bwd":
            res = flash_attn_forward(q, k, v, **kw)

            def fn():
                return dict(zip(("dq", "dk", "dv"), flash_attn_backward(do, q, k, v, res.out, res.lse, **kw)))
        else:
            def fn():
                r = flash_attn_forward(q, k, v, **kw)
                dq, dk, dv = flash_attn_backward(do, q, k, v, r.out, r.lse, **kw)
                return dict(out=r.out, dq=dq, dk=dk, dv=dv)
        return Runner(fn=fn, to_numpy=_bshd_numpy, note=self._path_note(case))


class NaiveProvider(_CupyProvider):
    """Standard attention: S = scale * Q K^T, P = softmax(S), O = P V, all (seqlen x seqlen) in memory;
    the backward from P (dV = P^T dO, dP = dO V^T, dS = P o (dP - rowsum(dO o O)), dQ, dK)."""

    name = "naive"
    description = "matmul-softmax-matmul on CuPy (NumPy on the CPU)"

    def version(self):
        if self.device == "cpu":
            return np.__version__
        return _cupy().__version__

    def compute_dtype(self, dtype: str):
        """(dtype the scores are computed in, note)."""
        if self.device == "gpu" and dtype == "bf16":
            return np.dtype(np.float16), "on fp16 copies (CuPy has no bf16 matmul)"
        if self.device == "cpu" and dtype in ("bf16", "fp16"):
            return np.dtype(np.float32), "in fp32 (NumPy has no fast half matmul)"
        return np_dtype(dtype), ""

    def score_bytes(self, case):
        itemsize = self.compute_dtype(case.dtype)[0].itemsize
        return itemsize * (1 if case.mode == "fwd" else 2) + 1  # S (and dP); +1 for the mask and slack

    def make(self, case, inputs):
        dt, note = self.compute_dtype(case.dtype)
        q, k, v, do = inputs.cast(dt)
        xp = np if self.device == "cpu" else _cupy()
        neg = inputs.additive_mask(case.causal, case.density, dt)
        scale = case.head_dim ** -0.5
        qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))  # (B, H, S, D) views

        def forward():
            s = xp.matmul(qh, kh.transpose(0, 1, 3, 2))  # (B, H, Sq, Sk), dt
            s *= scale
            if neg is not None:
                s += neg
            s -= s.max(axis=-1, keepdims=True)
            xp.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True, dtype=xp.float32)  # P, in place
            return s, xp.matmul(s, vh)  # P (B, H, Sq, Sk), O (B, H, Sq, D)

        def backward(p, o):
            dv = xp.matmul(p.transpose(0, 1, 3, 2), doh)  # (B, H, Sk, D)
            ds = xp.matmul(doh, vh.transpose(0, 1, 3, 2))  # dP (B, H, Sq, Sk)
            ds -= (doh.astype(xp.float32) * o.astype(xp.float32)).sum(axis=-1, keepdims=True)  # dP - D
            ds *= p  # dS
            dq = xp.matmul(ds, kh)
            dq *= scale
            dk = xp.matmul(ds.transpose(0, 1, 3, 2), qh)
            dk *= scale
            return dq, dk, dv

        def bshd(x):
            return x.transpose(0, 2, 1, 3)

        if case.mode == "fwd":
            def fn():
                return {"out": bshd(forward()[1])}
        elif case.mode == "bwd":
            p0, o0 = forward()

            def fn():
                return dict(zip(("dq", "dk", "dv"), map(bshd, backward(p0, o0))))
        else:
            def fn():
                p, o = forward()
                dq, dk, dv = backward(p, o)
                return dict(out=bshd(o), dq=bshd(dq), dk=bshd(dk), dv=bshd(dv))
        return Runner(fn=fn, to_numpy=_bshd_numpy, note=note)


class SdpaProvider(Provider):
    """torch scaled_dot_product_attention with one backend forced (BHSD views of the same inputs)."""

    family = "torch"
    BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}

    def __init__(self, device, name):
        super().__init__(device)
        self.name = name
        self.backend = self.BACKENDS[name]
        self.description = f"torch SDPA, backend {self.backend}"

    def probe(self):
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except Exception as e:
            return f"torch not importable ({_short(e, 60)})"
        if not hasattr(SDPBackend, self.backend):
            return f"this torch has no SDPBackend.{self.backend}"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch has no CUDA device"
        return None

    def version(self):
        import torch

        return torch.__version__

    def check(self, case, plan):
        if case.density < 1:
            return ("unsupported", "no block-sparse attention in SDPA")
        return None

    def score_bytes(self, case):
        if self.backend != "MATH":
            return None
        return 12 if case.mode == "fwd" else 24  # fp32 scores, softmax and their gradients

    def make(self, case, inputs):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.backend)
        q, k, v, do = (t.transpose(1, 2) for t in inputs.torch())  # (B, H, S, D) views, no copy
        causal = case.causal

        def attn(a, b, c):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=causal)

        return _torch_runner(case, attn, q, k, v, do)


def _torch_runner(case, attn, q, k, v, do) -> Runner:
    """A Runner for a torch attention function attn(q, k, v) on BHSD tensors; the backward alone is
    autograd.grad on a retained graph."""
    import torch

    def leaves():
        return tuple(x.detach().requires_grad_() for x in (q, k, v))

    if case.mode == "fwd":
        def fn():
            with torch.no_grad():
                return {"out": attn(q, k, v)}
    elif case.mode == "bwd":
        a, b, c = leaves()
        o = attn(a, b, c)

        def fn():
            return dict(zip(("dq", "dk", "dv"), torch.autograd.grad(o, (a, b, c), do, retain_graph=True)))
    else:
        def fn():
            a, b, c = leaves()
            o = attn(a, b, c)
            dq, dk, dv = torch.autograd.grad(o, (a, b, c), do)
            return dict(out=o, dq=dq, dk=dk, dv=dv)

    def to_numpy(t):
        return t.detach().transpose(1, 2).to(torch.float64).cpu().numpy()

    return Runner(fn=fn, to_numpy=to_numpy)


class JaxProvider(Provider):
    """jax.nn.dot_product_attention(implementation=...), jitted, on BTNH (= BSHD) arrays."""

    family = "jax"

    def __init__(self, device, name):
        super().__init__(device)
        self.name = name
        self.implementation = name.split("-", 1)[1]
        self.description = f"jax.nn.dot_product_attention(implementation={self.implementation!r})"

    def probe(self):
        if self.device == "cpu" and self.implementation == "cudnn":
            return "cuDNN needs a GPU"
        _jax_environment()
        try:
            import jax
            import jax.numpy as jnp  # noqa: F401
        except Exception as e:
            return f"jax not importable ({_short(e, 60)})"
        try:
            backend = jax.default_backend()
        except Exception as e:
            return f"jax has no backend ({_short(e, 60)})"
        if self.device == "gpu" and backend not in ("gpu", "cuda"):
            return f"jax has no GPU backend (default backend: {backend}; install jax[cuda13])"
        if not hasattr(jax.nn, "dot_product_attention"):
            return "this jax has no jax.nn.dot_product_attention"
        return None

    def version(self):
        import jax

        return jax.__version__

    def check(self, case, plan):
        if case.density < 1:
            return ("unsupported", "no block-sparse attention in jax.nn")
        if case.dtype == "fp64":
            import jax

            if not jax.config.jax_enable_x64:
                return ("unsupported", "float64 needs jax_enable_x64")
        return None

    def score_bytes(self, case):
        if self.implementation != "xla":
            return None
        return 12 if case.mode == "fwd" else 24  # fp32 logits, probabilities and their gradients

    def make(self, case, inputs):
        import jax
        import jax.numpy as jnp

        q, k, v, do = inputs.jax()
        attn = functools.partial(jax.nn.dot_product_attention, is_causal=case.causal,
                                 implementation=self.implementation)
        fwd = jax.jit(lambda q, k, v: {"out": attn(q, k, v)})

        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(attn, q, k, v)
            dq, dk, dv = vjp(do)
            return dict(out=o, dq=dq, dk=dk, dv=dv)

        fb = jax.jit(fwd_bwd)
        wide = jnp.float64 if case.dtype == "fp64" else jnp.float32

        def to_numpy(x):
            return np.asarray(x.astype(wide)).astype(np.float64)

        if case.mode == "fwd":
            return Runner(fn=lambda: fwd(q, k, v), to_numpy=to_numpy)
        if case.mode == "fwd+bwd":
            return Runner(fn=lambda: fb(q, k, v, do), to_numpy=to_numpy)
        return Runner(fn=lambda: fb(q, k, v, do), minus=lambda: fwd(q, k, v), to_numpy=to_numpy,
                      note="bwd = (fwd+bwd) - fwd")


def _jax_environment() -> None:
    """Before jax is imported: no up-front grab of 75% of the GPU (CuPy and torch share it), and a cap
    on JAX's pool. A user's own settings win."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(MEMORY_FRACTION))


class FlexProvider(Provider):
    """torch FlexAttention (torch.compile'd) with a BlockMask from the same block mask; block-sparse runs
    only (dense included there, as the baseline of the speedup)."""

    name = "flex"
    family = "torch"
    description = "torch.nn.attention.flex_attention (compiled) with a BlockMask"
    _compiled = None

    def probe(self):
        try:
            import torch
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except Exception as e:
            return f"torch FlexAttention not importable ({_short(e, 60)})"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch has no CUDA device"
        return None

    def version(self):
        import torch

        return torch.__version__

    def wanted(self, plan):
        return None if plan.sparse else "block-sparse only: give --densities below 1"

    def make(self, case, inputs):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if FlexProvider._compiled is None:
            FlexProvider._compiled = torch.compile(flex_attention, dynamic=False)
        flex = FlexProvider._compiled
        q, k, v, do = (t.transpose(1, 2) for t in inputs.torch())
        dev = q.device
        bm = inputs.block_mask(case.causal, case.density)
        blocks = None if bm is None else torch.as_tensor(bm, device=dev)
        causal = case.causal
        mask = None
        if blocks is not None or causal:
            def mask_mod(b, h, q_idx, kv_idx):
                keep = (q_idx >= kv_idx) if causal else (q_idx >= 0)
                if blocks is not None:
                    keep = keep & blocks[q_idx // BLOCK, kv_idx // BLOCK]
                return keep
            mask = create_block_mask(mask_mod, None, None, case.seqlen, case.seqlen, device=dev, BLOCK_SIZE=BLOCK)

        def attn(a, b, c):
            return flex(a, b, c, block_mask=mask)

        return _torch_runner(case, attn, q, k, v, do)


def build_providers(names, device) -> list:
    classes = {"flashcupy": FlashcupyProvider, "naive": NaiveProvider, "flex": FlexProvider}
    out = []
    for n in names:
        if n in SdpaProvider.BACKENDS:
            out.append(SdpaProvider(device, n))
        elif n.startswith("jax-"):
            out.append(JaxProvider(device, n))
        else:
            out.append(classes[n](device))
    return out


def probe_providers(providers, plan) -> dict:
    """{name: {available, used, reason, version, description}}; never raises."""
    info = {}
    for p in providers:
        try:
            reason = p.probe()
        except Exception as e:  # a provider that breaks while probing is absent, not fatal
            reason = f"{type(e).__name__}: {_short(e, 80)}"
        version = None
        if reason is None:
            with contextlib.suppress(Exception):
                version = p.version()
        wanted = p.wanted(plan) if reason is None else None
        info[p.name] = dict(available=reason is None, used=reason is None and wanted is None,
                            reason=reason or wanted, version=None if version is None else str(version),
                            description=p.description)
    return info
