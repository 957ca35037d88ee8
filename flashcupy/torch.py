"""flashcupy.torch: flashcupy's attention as a PyTorch operator with autograd (needs torch >= 2.4).

    from flashcupy.torch import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)      # torch tensors in, torch tensors out
    out.sum().backward()                             # q.grad, k.grad, v.grad (and sinks.grad)

Importing this module imports torch; `import flashcupy` never does (flashcupy/__init__ does not import
this module).

Two operators, built with torch.library.custom_op, so the call works in eager mode, in autograd and
under torch.compile(fullgraph=True) (Dynamo sees one opaque op and its fake implementation):
    torch.ops.flashcupy.attn_fwd(q, k, v, ...) -> (out, lse, rng_state)
    torch.ops.flashcupy.attn_bwd(dout, q, k, v, out, lse, rng_state, ...) -> (dq, dk, dv, dsinks)
register_autograd saves q, k, v, out, lse, rng_state (and alibi_slopes, sinks) and the options; the
backward op repeats the forward's dropout keep-mask from rng_state. register_fake gives the shapes:
out like q (contiguous), lse (batch, nheads, seqlen_q) float32 (float64 for float64 inputs),
rng_state int64 (2,) on the CPU, dq / dk / dv like q / k / v, dsinks float32 (nheads,) (or (0,)
without sinks).

Where it runs:
- CUDA tensors go to CuPy zero-copy (cupy.from_dlpack) and flashcupy runs on torch's current stream of
  the tensors' device (cupy.cuda.ExternalStream of torch.cuda.current_stream()), so its kernels are
  ordered with torch's work and no call synchronises with the host; the results come back zero-copy
  (torch.from_dlpack). Their memory is CuPy's pool's (freed into it, for reuse on that stream, when
  torch drops the tensor). A result flashcupy returns strided (dk, dv of GQA, a padded head_dim) is
  made contiguous, one copy, so the real op's strides are the fake's. bfloat16 crosses as an int16 view
  and is viewed as ml_dtypes.bfloat16 in CuPy (no DLPack bfloat16 support needed; still no copy).
- CPU tensors go to NumPy without a copy (tensor.detach().numpy(); bfloat16 is viewed as int16 and
  then as ml_dtypes.bfloat16, no float32 round trip) and flashcupy's CPU path runs (the NumPy chunked
  path: float16 / bfloat16 compute in float32, float32 / float64 in their own precision); its NumPy
  results come back through torch.from_numpy, no copy (or one, where a result is strided as above).
  The chunked path itself makes its float32 working copies.
- Inputs: any strides with stride(-1) == 1 go straight through (BHSD data as a transposed view);
  a tensor whose last dimension is strided (or an expanded dout, stride 0) is made contiguous first.

lse is returned without a gradient (requires_grad False): the backward op does not take d(loss)/d(lse),
so a loss through lse would get a wrong gradient; it is marked non-differentiable instead. rng_state
holds the dropout (seed, offset) as int64 (a seed >= 2^63 wraps to negative; it is unwrapped again);
[0, 0] without dropout. Not here: block_mask (flashcupy.blocksparse.BlockMask is no tensor), varlen.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import interface
from ._arrays import bfloat16

if not hasattr(torch.library, "custom_op") or not hasattr(torch.library, "register_autograd"):
    raise ImportError(f"flashcupy.torch needs torch >= 2.4 (torch.library.custom_op), got torch {torch.__version__}")

__all__ = ["flash_attn_func"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_U64 = 2**64


def _signed64(x: int) -> int:
    """A seed in [0, 2^64) as an int64 (the op schema's int)."""
    return x - _U64 if x >= 2**63 else x


def _unsigned64(x: int) -> int:
    return x + _U64 if x < 0 else x


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# data path: torch <-> NumPy (CPU) or CuPy (CUDA), no copy


def _last_dim_unit(t: Tensor) -> Tensor:
    """t itself if its last dimension has stride 1 (flashcupy takes any other strides), else contiguous."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _converters(to_array, from_array):
    """(torch -> array, array -> torch), both without a copy. bfloat16 crosses as int16 (the same bytes)
    and is viewed as ml_dtypes.bfloat16 on the far side, so it needs no DLPack bfloat16 support from
    NumPy (none) or CuPy (from 14 only)."""
    bf16 = bfloat16()

    def to_flashcupy(t: Tensor):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return to_array(t.view(torch.int16)).view(bf16)
        return to_array(t)

    def to_torch(a) -> Tensor:
        if a.dtype == bf16:
            return from_array(a.view(np.int16)).view(torch.bfloat16)
        return from_array(a)

    return to_flashcupy, to_torch


_NUMPY_SIDE = _converters(lambda t: t.numpy(), torch.from_numpy)


@contextlib.contextmanager
def _flashcupy_side(device: torch.device):
    """(to_flashcupy, to_torch) converters for tensors on device; on CUDA, inside that device's CuPy
    context and torch's current stream."""
    if device.type == "cpu":
        yield _NUMPY_SIDE
        return
    if device.type != "cuda":
        raise TypeError(f"q: expected a CPU or CUDA tensor, got one on {device}")
    import cupy

    index = torch.cuda.current_device() if device.index is None else device.index
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        # __dlpack__(stream=) asks for the current stream on both sides: the same one, so no event is queued
        yield _converters(cupy.from_dlpack, torch.from_dlpack)


def _rng_tensor(rng_state) -> Tensor:
    seed, offset = (0, 0) if rng_state is None else rng_state
    return torch.tensor([_signed64(seed), offset], dtype=torch.int64)


def _window(left: int, right: int) -> tuple:
    return (int(left), int(right))


# ---------------------------------------------------------------------------------------------------
# the operators


@torch.library.custom_op("flashcupy::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
             window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
             sinks: Optional[Tensor], seed: Optional[int], offset: int, deterministic: bool,
             allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """flashcupy.flash_attn_forward on torch tensors: (out, lse, rng_state). seed None draws the
    dropout state from flashcupy.dropout's generator (dropout only); deterministic is for the backward
    (kept here so the autograd context sees it)."""
    q, k, v = (_last_dim_unit(x) for x in (q, k, v))
    with _flashcupy_side(q.device) as (to_fc, to_torch):
        fwd = interface.flash_attn_forward(
            to_fc(q), to_fc(k), to_fc(v), dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
            seed=None if seed is None else (_unsigned64(seed), offset), allow_tf32=allow_tf32,
            window_size=_window(window_left, window_right), softcap=softcap,
            alibi_slopes=None if alibi_slopes is None else to_fc(alibi_slopes),
            sinks=None if sinks is None else to_fc(sinks))
        out, lse = to_torch(fwd.out).contiguous(), to_torch(fwd.lse).contiguous()
    return out, lse, _rng_tensor(fwd.rng_state)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                   sinks, seed, offset, deterministic, allow_tf32):
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, nheads, seqlen_q), dtype=_lse_dtype(q.dtype))
    return out, lse, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("flashcupy::attn_bwd", mutates_args=())
def attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rng_state: Tensor,
             dropout_p: float, softmax_scale: float, causal: bool, window_left: int, window_right: int,
             softcap: float, alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], deterministic: bool,
             allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flashcupy.flash_attn_backward on torch tensors: (dq, dk, dv, dsinks); dsinks is float32 (nheads,)
    with sinks, an empty float32 (0,) without. rng_state: attn_fwd's (read only with dropout_p > 0)."""
    dout, q, k, v, out = (_last_dim_unit(x) for x in (dout, q, k, v, out))
    rng = None
    if dropout_p > 0:
        seed, offset = rng_state.tolist()  # a CPU tensor: no device synchronisation
        rng = (_unsigned64(seed), offset)
    with _flashcupy_side(q.device) as (to_fc, to_torch):
        grads = interface.flash_attn_backward(
            *(to_fc(x) for x in (dout, q, k, v, out, lse)), dropout_p=dropout_p, softmax_scale=softmax_scale,
            causal=causal, rng_state=rng, deterministic=deterministic, allow_tf32=allow_tf32,
            window_size=_window(window_left, window_right), softcap=softcap,
            alibi_slopes=None if alibi_slopes is None else to_fc(alibi_slopes),
            sinks=None if sinks is None else to_fc(sinks))
        dq, dk, dv = (to_torch(g).contiguous() for g in grads[:3])
        dsinks = to_torch(grads[3]).contiguous() if sinks is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dsinks


@attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, rng_state, dropout_p, softmax_scale, causal, window_left, window_right,
                   softcap, alibi_slopes, sinks, deterministic, allow_tf32):
    dsinks = q.new_empty((q.shape[2] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    (q, k, v, dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, _seed,
     _offset, deterministic, allow_tf32) = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, alibi_slopes, sinks)
    ctx.options = (dropout_p, softmax_scale, causal, window_left, window_right, softcap)
    ctx.flags = (deterministic, allow_tf32)
    ctx.has_sinks = sinks is not None
    ctx.mark_non_differentiable(lse, rng_state)


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, out, lse, rng_state, alibi_slopes, sinks = ctx.saved_tensors
    dropout_p, softmax_scale, causal, window_left, window_right, softcap = ctx.options
    deterministic, allow_tf32 = ctx.flags
    dq, dk, dv, dsinks = attn_bwd(dout, q, k, v, out, lse, rng_state, dropout_p, softmax_scale, causal, window_left,
                                  window_right, softcap, alibi_slopes, sinks, deterministic, allow_tf32)
    # one gradient per attn_fwd input: q, k, v, (7 options), alibi_slopes, sinks, (4 options)
    return (dq, dk, dv, None, None, None, None, None, None, None, dsinks if ctx.has_sinks else None,
            None, None, None, None)


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# the public function


def _check_inputs(q, k, v):
    """flashcupy's shape and dtype errors (flashcupy._validate.check_qkv's messages), on torch tensors,
    before the op: its fake implementation would not raise them under torch.compile. Plain Python on
    shapes and torch dtypes, so Dynamo traces it without a graph break."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 (batch, seqlen, nheads, head_dim), got shape {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected dtype in {[str(d) for d in _DTYPES]}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got one on {x.device}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (as q), got {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected head_dim {q.shape[3]} (as q), got {k.shape[3]}")
    if q.shape[3] < 1:
        raise ValueError(f"q: expected head_dim >= 1, got {q.shape[3]}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"k: expected nheads_k dividing nheads={q.shape[2]} (MQA/GQA), got nheads_k={k.shape[2]}")


def _check_bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_lse=False, *, return_attn_probs=False,
                    sinks=None, seed=None, allow_tf32=False):
    """flashcupy.flash_attn_func on torch tensors, differentiable (flash-attn's argument order).

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim), dtype of q
    (float16, bfloat16, float32, float64), one device (CPU or CUDA); nheads % nheads_k == 0. Options as
    flashcupy.flash_attn_forward: dropout_p, softmax_scale (default head_dim ** -0.5), causal (aligned
    bottom-right when seqlen_q != seqlen_k: query i sees key j iff j <= i + seqlen_k - seqlen_q),
    window_size, softcap, alibi_slopes (float32 (nheads,) or (batch, nheads), no gradient), sinks
    (float32 (nheads,), gets a gradient when it requires one), seed (dropout: an int or (seed, offset);
    default flashcupy.dropout's generator, drawn at each call, also under torch.compile), allow_tf32,
    deterministic (the backward's). Returns out (like q), or (out, lse) with return_lse (or flash-attn's
    return_attn_probs, its alias here: no probabilities are returned); lse (batch, nheads, seqlen_q)
    float32 (float64 for float64) carries no gradient. The backward of a dropout call repeats the
    forward's keep-mask (its rng_state is saved with the graph).
    """
    _check_inputs(q, k, v)
    return_lse = _check_bool("return_lse", return_lse) or _check_bool("return_attn_probs", return_attn_probs)
    causal = _check_bool("causal", causal)
    deterministic = _check_bool("deterministic", deterministic)
    allow_tf32 = _check_bool("allow_tf32", allow_tf32)
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints >= -1, got {window_size!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    offset = 0
    if seed is not None and dropout_p > 0:
        if isinstance(seed, (tuple, list)) and len(seed) == 2:
            seed, offset = seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _U64:
            raise TypeError(f"seed: expected an int seed in [0, 2**64) or a (seed, offset) pair, got {seed!r}")
        seed = _signed64(seed)
    else:
        seed = None
    out, lse, _ = attn_fwd(q, k, v, dropout_p, scale, causal, window_size[0], window_size[1], softcap,
                           alibi_slopes, sinks, seed, offset, deterministic, allow_tf32)
    return (out, lse) if return_lse else out
