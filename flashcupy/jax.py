"""flashcupy inside JAX: `flash_attention`, a differentiable JAX function that runs flashcupy's kernels
under `jax.jit`, `jax.grad` and `jax.vmap` (issue 20, item 1).

    import jax, jax.numpy as jnp
    from flashcupy.jax import flash_attention

    @jax.jit
    def loss(q, k, v):
        return flash_attention(q, k, v, causal=True).astype(jnp.float32).sum()

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

How it runs:
- A `jax.custom_vjp` whose forward and backward are `jax.experimental.buffer_callback` calls (JAX >= 0.7):
  XLA hands each call its device buffers and, on a GPU, its stream. There the buffers become CuPy arrays
  without a copy (`__cuda_array_interface__`; bfloat16 as ml_dtypes.bfloat16) and flashcupy's kernels
  run on XLA's stream (`cupy.cuda.ExternalStream`), with no host synchronisation, so the call stays
  inside the compiled program; on the CPU the buffers are NumPy arrays and flashcupy's CPU path runs.
  flashcupy allocates its results (from CuPy's memory pool, on XLA's stream) and they are copied once
  into XLA's output buffers.
- The forward keeps out and lse as residuals; the backward is flash_attn_backward (FlashAttention-2,
  arXiv 2307.08691, Algorithm 2) from them.
- vmap runs the callback once per mapped element (`vmap_method="sequential"`), which is always right;
  folding the mapped axis into the batch would be faster and is not done yet.
- XLA's command buffers (CUDA graphs) do not capture these calls (`command_buffer_compatible` is off):
  flashcupy's temporaries come from CuPy's pool, whose memory a replayed graph could not own.

Not supported here (each raises ValueError naming it): dropout (its seed would have to be read on the
host), block masks. `return_lse=True` returns lse under `jax.lax.stop_gradient`: no gradient flows
through it (flash-attn's autograd function does the same).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback
except ImportError as e:  # pragma: no cover - exercised where jax is absent
    raise ImportError("flashcupy.jax needs jax >= 0.7 (jax.experimental.buffer_callback); "
                      f"import failed: {e}") from None

from ._arrays import lse_dtype
from ._validate import check_bool, check_features, check_qkv

__all__ = ["flash_attention"]

_KDLCPU = 1  # DLPack device type of host memory


class _Options(NamedTuple):  # the static part of a call (hashable: custom_vjp's nondiff argument)
    causal: bool
    softmax_scale: float  # resolved (head_dim ** -0.5 for None)
    window_size: tuple
    softcap: float
    deterministic: bool
    allow_tf32: bool
    has_slopes: bool
    has_sinks: bool


def _stand_in(x):
    """A zero-memory NumPy array of x's shape and dtype (x: a JAX array or tracer), for flashcupy's
    validation at trace time."""
    return np.broadcast_to(np.zeros((), dtype=np.dtype(x.dtype)), tuple(x.shape))


def _check(q, k, v, *, causal, softmax_scale, window_size, softcap, alibi_slopes, sinks):
    """flashcupy's own checks of the arguments (flash_attn_forward's messages), at trace time. Returns
    (AttnShape with the resolved softmax_scale, Features with the validated window and softcap)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if x is not None and not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{name}: expected a JAX array, got {type(x).__name__}")
    qs, ks, vs = (_stand_in(x) for x in (q, k, v))
    shape = check_qkv(qs, ks, vs, softmax_scale)
    features = check_features(np, qs, shape, causal=causal, window_size=window_size, softcap=softcap,
                              alibi_slopes=None if alibi_slopes is None else _stand_in(alibi_slopes),
                              sinks=None if sinks is None else _stand_in(sinks))
    return shape, features


def _cupy_view(buf, dtype):
    """The CuPy array over a GPU Buffer's memory (no copy), of the dtype the trace gave it."""
    import cupy

    cai = buf.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return cupy.empty(shape, dtype=dtype)
    mem = cupy.cuda.UnownedMemory(int(cai["data"][0]), nbytes, buf)
    strides = cai.get("strides")
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0),
                        strides=None if strides is None else tuple(strides))


@contextlib.contextmanager
def _arrays(ctx, first):
    """view(buffer, dtype): the NumPy (CPU) or CuPy (GPU) array over a Buffer; on the GPU the block runs
    on XLA's stream and on the buffers' device."""
    if int(first.__dlpack_device__()[0]) == _KDLCPU:
        yield lambda buf, dtype: np.asarray(buf).view(dtype)
        return
    import cupy

    device = int(first.__dlpack_device__()[1])
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(int(ctx.stream), device):
        yield _cupy_view


def _store(dst, src):
    """dst[...] = src (XLA's output buffer from flashcupy's result), on the current stream; 2-byte types
    through a uint16 view, so bfloat16 needs no arithmetic support from the array module."""
    if dst.dtype.itemsize == 2 and src.dtype == dst.dtype:
        dst, src = dst.view(np.uint16), src.view(np.uint16)
    dst[...] = src


def _call_kwargs(opts: _Options, extra):
    """The options flash_attn_forward and flash_attn_backward both take, with the optional arrays."""
    it = iter(extra)
    return dict(causal=opts.causal, softmax_scale=opts.softmax_scale, window_size=opts.window_size,
                softcap=opts.softcap, allow_tf32=opts.allow_tf32,
                alibi_slopes=next(it) if opts.has_slopes else None, sinks=next(it) if opts.has_sinks else None)


def _operands(q, k, v, slopes, sinks):
    """(the optional arrays that are given, the dtypes of q, k, v and of those)."""
    extra = [x for x in (slopes, sinks) if x is not None]
    return extra, tuple(np.dtype(x.dtype) for x in (q, k, v, *extra))


def _forward_callback(opts: _Options, dtypes, ctx, outs, *args):
    import flashcupy

    with _arrays(ctx, args[0]) as view:
        arrs = [view(b, dt) for b, dt in zip(args, dtypes)]
        res = flashcupy.flash_attn_forward(*arrs[:3], **_call_kwargs(opts, arrs[3:]))
        _store(view(outs[0], dtypes[0]), res.out)
        _store(view(outs[1], lse_dtype(dtypes[0])), res.lse)


def _backward_callback(opts: _Options, dtypes, ctx, outs, *args):
    import flashcupy

    with _arrays(ctx, args[0]) as view:
        t = dtypes[0]
        arrs = [view(b, dt) for b, dt in zip(args, (t, t, t, t, t, lse_dtype(t)) + tuple(dtypes[3:]))]
        grads = flashcupy.flash_attn_backward(*arrs[:6], deterministic=opts.deterministic,
                                              **_call_kwargs(opts, arrs[6:]))
        for buf, g, dt in zip(outs, grads, (t, t, t, np.float32)):
            _store(view(buf, dt), g)


def _forward_call(opts: _Options, q, k, v, slopes, sinks):
    extra, dtypes = _operands(q, k, v, slopes, sinks)
    b, sq, h, _ = q.shape
    result = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), lse_dtype(q.dtype)))
    call = buffer_callback(functools.partial(_forward_callback, opts, dtypes), result, vmap_method="sequential")
    return call(q, k, v, *extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(opts: _Options, q, k, v, slopes, sinks):
    return _forward_call(opts, q, k, v, slopes, sinks)


def _attention_fwd(opts: _Options, q, k, v, slopes, sinks):
    out, lse = _forward_call(opts, q, k, v, slopes, sinks)
    return (out, lse), (q, k, v, slopes, sinks, out, lse)


def _attention_bwd(opts: _Options, residuals, cotangents):
    q, k, v, slopes, sinks, out, lse = residuals
    dout = cotangents[0]  # lse's cotangent is zero: flash_attention returns it under stop_gradient
    extra, dtypes = _operands(q, k, v, slopes, sinks)
    result = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    if sinks is not None:
        result.append(jax.ShapeDtypeStruct(sinks.shape, jnp.float32))
    call = buffer_callback(functools.partial(_backward_callback, opts, dtypes), tuple(result),
                           vmap_method="sequential")
    grads = call(dout.astype(q.dtype), q, k, v, out, lse, *extra)
    dsinks = grads[3] if sinks is not None else None
    dslopes = None if slopes is None else jnp.zeros_like(slopes)  # ALiBi slopes are constants
    return grads[0], grads[1], grads[2], dslopes, dsinks


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, sinks=None, deterministic=False, allow_tf32=False,
                    block_mask=None, return_lse=False):
    """Exact attention softmax(q k^T * softmax_scale) v of JAX arrays, differentiable, usable under
    jax.jit / jax.grad / jax.vmap (flashcupy.flash_attn_forward and flash_attn_backward inside XLA).

    Args:
        q: (batch, seqlen_q, nheads, head_dim) JAX array; float16, bfloat16, float32 or float64 (float64
            needs jax_enable_x64).
        k, v: (batch, seqlen_k, nheads_k, head_dim), q's dtype; nheads % nheads_k == 0 (MQA/GQA).
        causal, softmax_scale, window_size, softcap: as flashcupy.flash_attn_forward (Python values:
            they are static, a new value traces a new program).
        alibi_slopes: float32 (nheads,) or (batch, nheads) JAX array, or None; constants (zero gradient).
        sinks: float32 (nheads,) JAX array, or None; learnable (its gradient is flash_attn_backward's
            dsinks).
        deterministic: bitwise-reproducible gradients on the GPU.
        allow_tf32: float32 products on the TF32 tensor cores (flashcupy.flash_attn_forward).
        dropout_p, block_mask: not supported here yet: anything but 0.0 / None raises ValueError.
        return_lse: also return lse (batch, nheads, seqlen_q), float32 (float64 for float64 inputs),
            natural-log logsumexp of the scaled scores, under jax.lax.stop_gradient.

    Returns:
        out like q; (out, lse) with return_lse=True.

    Raises:
        ValueError / TypeError at trace time, with flashcupy's messages, for bad shapes, dtypes and
        options; ValueError for dropout_p != 0 or a block_mask.

    Source: FlashAttention-2 (arXiv 2307.08691), Algorithms 1 and 2, through flashcupy's kernels.
    """
    if not (isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and float(dropout_p) == 0.0):
        raise ValueError(f"dropout_p: flashcupy.jax.flash_attention has no dropout yet (its seed would be read "
                         f"on the host); expected 0.0, got {dropout_p!r}")
    if block_mask is not None:
        raise ValueError("block_mask: flashcupy.jax.flash_attention does not take block masks yet; expected None")
    causal = check_bool("causal", causal)
    shape, features = _check(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    opts = _Options(causal=causal, softmax_scale=shape.softmax_scale, window_size=features.window,
                    softcap=features.softcap, deterministic=check_bool("deterministic", deterministic),
                    allow_tf32=check_bool("allow_tf32", allow_tf32), has_slopes=alibi_slopes is not None,
                    has_sinks=sinks is not None)
    return_lse = check_bool("return_lse", return_lse)
    out, lse = _attention(opts, q, k, v, alibi_slopes, sinks)
    return (out, jax.lax.stop_gradient(lse)) if return_lse else out
