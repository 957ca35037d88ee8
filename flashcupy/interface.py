"""Public attention functions: flash_attn_func, flash_attn_forward, flash_attn_backward.

Where a call runs:
- NumPy inputs run on the CPU (the chunked exact path) and return NumPy. float32 and float64
  compute in their own precision; float16 and bfloat16 compute in float32 and return their own
  dtype. Opt-in exception: with NUMPY_FLOAT64_ON_GPU = True (or FLASHCUPY_NUMPY_FLOAT64_ON_GPU=1 in
  the environment), NumPy float64 runs the fused float64 kernels when a GPU is usable and has one for
  the problem (copied there and back, NumPy out). Off by default: NumPy in means the CPU. Host
  tensors with __dlpack__ (torch / JAX on the CPU) are read through np.from_dlpack and count as NumPy.
- CuPy inputs, and any GPU array with __dlpack__ / __cuda_array_interface__ (torch, JAX; converted
  zero-copy by cupy.from_dlpack), run on the current CuPy device and stream and return CuPy arrays.
  flashcupy._dispatch plans each direction from (dtype, head_dim, dropout, block mask, allow_tf32)
  and the device (flashcupy._device.current_device_info(): compute capability, opt-in shared memory
  per block, with the FLASHCUPY_SMEM_LIMIT_KB / FLASHCUPY_FORCE_CC overrides): on sm_80+, float16 /
  bfloat16 with head_dim <= 256 run the fused FlashAttention-2 kernels (cuda/; dropout and block
  masks fused too); float32 runs fused kernels on CUDA cores (exact FFMA, no TF32), or with
  allow_tf32=True on the TF32 tensor cores (mma.sync m16n8k8 .tf32); float64 runs on the FP64 tensor
  cores (mma.sync .f64; the backward above head_dim 160 on CUDA cores): flashcupy._gpu_simt. The
  chunked path on the GPU (exact, O(N) memory, not fused; allow_tf32 unused) runs everything else:
  float32 / float64 with dropout or a block mask, head_dim > 256, every call on GPUs before sm_80
  (the kernels load tiles with cp.async), and a direction whose kernels do not fit the device's
  shared memory (on the 99 KB parts: the float64 backward at head_dim > 224). kernel_path says which.
No call synchronises with the host, so GPU calls can be captured into a CUDA graph.

flash_attn_forward returns AttnForward (a 3-tuple out, lse, rng_state, plus .options, an AttnOptions);
flash_attn_backward(dout, q, k, v, forward=fwd) repeats and checks the forward's options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _build, _chunked, _device, _dispatch, dropout
from ._arrays import array_module, cupy_or_none, gpu_available, lse_dtype
from ._features import FEAT_ALL
from ._features import NONE as NO_FEATURES
from ._validate import AttnShape, check_bool, check_features, check_like, check_lse, check_qkv


@dataclass(frozen=True)
class AttnOptions:
    """The options of one flash_attn_forward call that its backward must repeat (AttnForward.options).

    flash_attn_backward(..., forward=fwd) takes them from here and raises ValueError when an option it
    is given explicitly differs. The arrays alibi_slopes and sinks are the forward's own (as given,
    after conversion of __dlpack__ inputs); the backward compares them by data pointer, shape and
    strides, never by value (no host synchronisation), and `==` on two AttnOptions ignores them.
    """

    causal: bool
    softmax_scale: float  # as resolved: head_dim ** -0.5 when the forward was given None
    dropout_p: float  # as given (the keep-mask rounds it to a multiple of 2^-16)
    block_mask: object  # flashcupy.blocksparse.BlockMask or None (compared by value)
    allow_tf32: bool  # as given; compared only where it changes the result (float32 on the GPU)
    window_size: tuple = (-1, -1)  # as validated: (left, right); with causal, right is -1 (causal bounds it)
    softcap: float = 0.0  # as given (0: off)
    alibi_slopes: object = field(default=None, compare=False)  # the forward's array or None (compared by pointer)
    sinks: object = field(default=None, compare=False)  # the forward's array or None (compared by pointer)


class _AttnForwardTuple(NamedTuple):
    out: object  # (batch, seqlen_q, nheads, head_dim), dtype of q
    lse: object  # (batch, nheads, seqlen_q), float32 (float64 for float64 inputs); -inf on empty rows
    rng_state: object  # dropout (seed, offset), or None without dropout


class _ForwardRecord:
    """The (out, lse, rng_state) tuple of a forward plus an immutable .options attribute (not a fourth
    item): the shared body of AttnForward and flashcupy.varlen.VarlenForward (mixed in before their
    NamedTuple)."""

    options = None  # the options record on records made by a forward (set per instance in __new__)

    def __new__(cls, out, lse, rng_state, options=None):
        self = super().__new__(cls, out, lse, rng_state)
        self.__dict__["options"] = options
        return self

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __reduce__(self):
        return type(self), (self.out, self.lse, self.rng_state, self.options)


class AttnForward(_ForwardRecord, _AttnForwardTuple):
    """What flash_attn_forward returns: the 3-tuple (out, lse, rng_state), and .options (AttnOptions).

    `out, lse, rng_state = flash_attn_forward(...)` unpacks as always; options is an attribute, not a
    fourth item. Give the whole record to the backward, flash_attn_backward(dout, q, k, v, forward=fwd),
    and it repeats the forward's options and checks that out, lse and rng_state are the forward's.
    Immutable. A record built by hand, or by _replace / _make, has options None and cannot be passed
    as forward=.
    """

    def __repr__(self):
        return (f"AttnForward(out={self.out!r}, lse={self.lse!r}, rng_state={self.rng_state!r}, "
                f"options={self.options!r})")


class _FromForward:
    """The default of flash_attn_backward's options: the forward's value when forward= is given, else
    the plain default (causal False, softmax_scale head_dim ** -0.5, dropout_p 0, no rng_state, no
    block_mask, allow_tf32 False)."""

    __slots__ = ()

    def __repr__(self):
        return "FROM_FORWARD"

    def __reduce__(self):
        return "FROM_FORWARD"


FROM_FORWARD = _FromForward()
_PLAIN_DEFAULTS = dict(causal=False, softmax_scale=None, dropout_p=0.0, block_mask=None, allow_tf32=False,
                       window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None)
_OPTION_NAMES = tuple(_PLAIN_DEFAULTS)


# NumPy float64 inputs run the fused float64 kernels when a GPU is usable: True opts in, False keeps them
# on the CPU, None (default) reads FLASHCUPY_NUMPY_FLOAT64_ON_GPU (1 opts in) at each call.
NUMPY_FLOAT64_ON_GPU = None


def numpy_float64_on_gpu() -> bool:
    """Whether NumPy float64 calls may run the GPU's float64 kernels (NUMPY_FLOAT64_ON_GPU, else the
    FLASHCUPY_NUMPY_FLOAT64_ON_GPU environment variable: "1" opts in; unset or "0": no)."""
    if NUMPY_FLOAT64_ON_GPU is not None:
        return bool(NUMPY_FLOAT64_ON_GPU)
    raw = os.environ.get("FLASHCUPY_NUMPY_FLOAT64_ON_GPU", "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"FLASHCUPY_NUMPY_FLOAT64_ON_GPU: expected 0 or 1, got {raw!r}")
    return raw == "1"

NUMPY_PATH = "NumPy chunked path"


def _plan(direction: str, dtype, shape: AttnShape, causal: bool, dropout_p: float, block_mask, allow_tf32: bool,
          device=None, deterministic: bool = False, features: int = 0):
    """The fused kernel a GPU call runs (flashcupy._dispatch.Plan), or None for the chunked path on the
    GPU. device: a DeviceInfo or an int compute capability; default the current CuPy device. features:
    the call's FEAT_* bits (flashcupy._features.Features.bits)."""
    if device is None:
        device = _device.current_device_info()
    sparse = None if block_mask is None else (block_mask.block_q, block_mask.block_k)
    extra = {} if direction == "fwd" else {"deterministic": deterministic}
    plan_fn = _dispatch.forward_plan if direction == "fwd" else _dispatch.backward_plan
    plan = plan_fn(dtype, shape.head_dim, causal, device, dropout=dropout_p > 0, sparse_blocks=sparse,
                   allow_tf32=allow_tf32, features=features, **extra)
    if _build.DEBUG:
        _build.debug(f"{direction} {shape} causal={causal} dropout_p={dropout_p} block_mask={sparse} allow_tf32={allow_tf32} "
                     f"features={features} "
                     f"on {device} -> {_dispatch.path_name(plan)}: {None if plan is None else plan.config}")
    return plan


def _numpy_float64_to_gpu(xp, dtype, shape: AttnShape, direction: str, causal, dropout_p, block_mask,
                          allow_tf32, features=NO_FEATURES) -> bool:
    """NumPy float64 goes to the GPU only when opted in (numpy_float64_on_gpu) and a fused kernel runs
    there for this direction."""
    return (xp is np and numpy_float64_on_gpu() and np.dtype(dtype) == np.float64 and gpu_available()
            and _plan(direction, dtype, shape, causal, dropout_p, block_mask, allow_tf32, features=features.bits)
            is not None)


def kernel_path(dtype, head_dim: int, *, on_gpu: bool, dropout_p: float = 0.0, block_mask=None,
                allow_tf32: bool = False, backward: bool = False, device=None, features: int = 0) -> str:
    """Which implementation a call runs: "fused fp16/bf16 (tensor cores)", "fused fp32/fp64 (CUDA cores)",
    "fused fp64 (FP64 tensor cores)", "fused fp32 (TF32 tensor cores)", "NumPy chunked path" or
    "chunked path on the GPU".

    The forward's path, or the backward's with backward=True (they differ for float64 above head_dim
    160: CUDA cores; and where only one direction's kernels fit the device). on_gpu=True describes
    the current CuPy device (with the FLASHCUPY_SMEM_LIMIT_KB / FLASHCUPY_FORCE_CC overrides,
    flashcupy._device), or device= (a flashcupy._device.DeviceInfo, or an int compute capability
    such as 86 for that class's shared memory) without a GPU. NumPy float64 inputs count as
    on_gpu=False here; opted in (NUMPY_FLOAT64_ON_GPU) with a usable GPU they run the float64 kernels.
    features: the FEAT_* bits of the call's window / softcap / ALiBi / sinks (flashcupy._features:
    FEAT_LOCAL | FEAT_SOFTCAP | FEAT_ALIBI | FEAT_SINK; 0: none)."""
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    backward = check_bool("backward", backward)
    on_gpu = check_bool("on_gpu", on_gpu)
    if block_mask is not None:
        from .blocksparse import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask: expected a flashcupy.blocksparse.BlockMask or None, "
                            f"got {type(block_mask).__name__}")
    if not on_gpu:
        return NUMPY_PATH
    if device is None and not gpu_available():
        raise RuntimeError("kernel_path: on_gpu=True needs a usable CUDA GPU (CuPy found none); give device= "
                           "(a flashcupy._device.DeviceInfo or a compute capability such as 86) to ask about one")
    shape = AttnShape(1, 1, 1, 1, 1, int(head_dim), 1.0)
    if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or not 0 <= features <= FEAT_ALL:
        raise ValueError(f"features: expected an int of flashcupy._features FEAT_* bits (0..{FEAT_ALL}), "
                         f"got {features!r}")
    plan = _plan("bwd" if backward else "fwd", dtype, shape, False, float(dropout_p), block_mask, allow_tf32, device,
                 features=int(features))
    return _dispatch.path_name(plan)


def _chunked_forward(xp, q, k, v, shape, causal, dropout_p, rng_state, block_mask, features=NO_FEATURES):
    keep_fn, p_eff = _chunked_dropout(xp, shape, dropout_p, rng_state)
    return _chunked.forward(q, k, v, shape, causal=causal, visible_fn=_visible_fn(xp, shape, block_mask),
                            keep_fn=keep_fn, dropout_p=p_eff, xp=xp, features=features)


def _chunked_backward(xp, dout, q, k, v, out, lse, shape, causal, dropout_p, rng_state, block_mask,
                      features=NO_FEATURES):
    keep_fn, p_eff = _chunked_dropout(xp, shape, dropout_p, rng_state)
    return _chunked.backward(dout, q, k, v, out, lse, shape, causal=causal, visible_fn=_visible_fn(xp, shape, block_mask),
                             keep_fn=keep_fn, dropout_p=p_eff, xp=xp, features=features)


def sink_grad(xp, dout, out, lse, sinks):
    """The gradient of the learnable sinks, for every path (GPU fused, GPU chunked, CPU): one function.

        dsinks[h] = -sum over (b, i) of exp(sinks[h] - lse[b, h, i]) * D[b, h, i],  D = rowsum(dout o out)

    (flashcupy.reference derives it: d out_i / d sink_h = -P_sink_i out_i; it holds with dropout, whose
    keep-mask is inside out.) dout, out (batch, seqlen_q, nheads, head_dim) in q's dtype; lse (batch,
    nheads, seqlen_q) as the forward returned it (it includes the sinks); sinks float32 (nheads,).
    Computed in float32 (float64 for float64 inputs), returned float32 (nheads,) like sinks; on the
    GPU it is queued on the current stream (no host synchronisation). A row with lse -inf (no visible
    key and a sink of -inf) contributes 0.
    """
    dt = _chunked.compute_dtype(dout.dtype)
    d = (dout.astype(dt) * out.astype(dt)).sum(axis=-1).transpose(0, 2, 1)  # D, (B, H, Sq)
    lse = lse.astype(dt, copy=False)
    lse = xp.where(lse == -xp.inf, 0.0, lse)  # then sinks[h] = -inf too: exp(-inf) = 0, no inf - inf
    p_sink = xp.exp(sinks.astype(dt)[None, :, None] - lse)  # (B, H, Sq)
    return (-(p_sink * d).sum(axis=(0, 2))).astype(np.float32, copy=False)


def _chunked_dropout(xp, shape, dropout_p, rng_state):
    """keep_fn and the (rounded) dropout_p of flashcupy.dropout for the chunked path; (None, 0) without."""
    if not dropout_p:
        return None, 0.0
    seed, offset = rng_state

    def keep_fn(i0, i1):
        return dropout.keep_mask(seed, offset, shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k,
                                 dropout_p, rows=(i0, i1), xp=xp)

    return keep_fn, dropout.effective_dropout_p(dropout_p)


def _check_block_mask(block_mask, shape, xp=np):
    if block_mask is None:
        return None
    from .blocksparse import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected a flashcupy.blocksparse.BlockMask or None, got {type(block_mask).__name__}")
    block_mask.check(shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k)
    if xp is not np:
        block_mask.lists(xp)  # its device copy exists before any work is queued (RuntimeError under capture if not)
    return block_mask


def _visible_fn(xp, shape, block_mask):
    """The chunked path's element visibility of rows [i0, i1) under a block mask (None: all visible)."""
    if block_mask is None:
        return None
    return lambda i0, i1: block_mask.element_mask(shape.seqlen_q, shape.seqlen_k, rows=(i0, i1), xp=xp)


def _address(x) -> int:
    """Data pointer of a NumPy or CuPy array."""
    return int(x.__array_interface__["data"][0]) if isinstance(x, np.ndarray) else int(x.data.ptr)


def _same_array(a, b) -> bool:
    """a is b, or the same memory seen the same way (kind, data pointer, shape, strides, dtype). Never
    compares values (that would synchronise with the GPU)."""
    return a is b or (type(a) is type(b) and tuple(a.shape) == tuple(b.shape) and tuple(a.strides) == tuple(b.strides)
                      and a.dtype == b.dtype and _address(a) == _address(b))


def _forward_record(forward, cls, producer: str, out, lse):
    """(forward's options or None, out, lse) for a backward given forward= (a cls record from producer)
    and / or out and lse: those default to forward's. TypeError for another kind of forward, a record
    without options, or out / lse missing."""
    if forward is not None and not (isinstance(forward, cls) and forward.options is not None):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        got = (f"{article} {cls.__name__} without options (built by hand or by _replace)" if isinstance(forward, cls)
               else type(forward).__name__)
        raise TypeError(f"forward: expected the {cls.__name__} returned by {producer}, got {got}")
    if forward is not None:
        out = forward.out if out is None else out
        lse = forward.lse if lse is None else lse
    for name, x in (("out", out), ("lse", lse)):
        if x is None:
            raise TypeError(f"{name}: expected the forward's {name} (or forward=, the {cls.__name__} of "
                            f"{producer}), got None")
    return None if forward is None else forward.options, out, lse


def _check_same_arrays(forward, out, lse, **optional):
    """ValueError naming the first of optional (name=(given, forward's), None allowed) or of out / lse that
    is not the forward's own array (_same_array: by data pointer, shape and strides, values never read)."""
    for name, (got, want) in optional.items():
        if (got is None) != (want is None) or (got is not None and not _same_array(got, want)):
            what = "None" if want is None else "the same array by data pointer, shape and strides"
            raise ValueError(f"{name}: expected the forward's {name} ({what}; values are not compared), got "
                             f"{'None' if got is None else 'a different ' + type(got).__name__}")
    for name, got, want in (("out", out, forward.out), ("lse", lse, forward.lse)):
        if not _same_array(got, want):
            raise ValueError(f"{name}: expected the forward's {name} (forward.{name}: the same array by data pointer, "
                             f"shape and strides; values are not compared), got a different "
                             f"{type(got).__name__} of shape {tuple(got.shape)}")


def _check_matches_forward(forward, xp, dtype, shape, *, out, lse, causal, softmax_scale, dropout_p, block_mask,
                           allow_tf32, features=NO_FEATURES, alibi_slopes=None, sinks=None):
    """ValueError naming the first of the backward's options and arrays that is not the forward's."""
    opts = forward.options
    if causal != opts.causal:
        raise ValueError(f"causal: expected the forward's causal={opts.causal}, got {causal}")
    if shape.softmax_scale != opts.softmax_scale:
        got = f"None, i.e. head_dim ** -0.5 = {shape.softmax_scale!r}" if softmax_scale is None else repr(softmax_scale)
        raise ValueError(f"softmax_scale: expected the forward's softmax_scale={opts.softmax_scale!r} (as resolved), "
                         f"got {got}")
    if dropout_p != opts.dropout_p:
        raise ValueError(f"dropout_p: expected the forward's dropout_p={opts.dropout_p!r}, got {dropout_p!r}")
    if not (block_mask is opts.block_mask or (block_mask is not None and block_mask == opts.block_mask)):
        raise ValueError(f"block_mask: expected the forward's block_mask (an equal mask with the same blocks) "
                         f"{opts.block_mask!r}, got {block_mask!r}")
    if xp is not np and np.dtype(dtype) == np.float32 and allow_tf32 != opts.allow_tf32:
        raise ValueError(f"allow_tf32: expected the forward's allow_tf32={opts.allow_tf32} (float32 on the GPU: "
                         f"it changes the result), got {allow_tf32}")
    if features.window != tuple(opts.window_size):
        raise ValueError(f"window_size: expected the forward's window_size={opts.window_size} (as validated; with "
                         f"causal the right side is -1), got {features.window}")
    if features.softcap != opts.softcap:
        raise ValueError(f"softcap: expected the forward's softcap={opts.softcap!r}, got {features.softcap!r}")
    _check_same_arrays(forward, out, lse, alibi_slopes=(alibi_slopes, opts.alibi_slopes), sinks=(sinks, opts.sinks))


def flash_attn_forward(q, k, v, *, dropout_p=0.0, softmax_scale=None, causal=False, seed=None,
                       block_mask=None, allow_tf32=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       sinks=None) -> AttnForward:
    """Attention forward returning the output and the logsumexp the backward needs.

    Args:
        q: (batch, seqlen_q, nheads, head_dim); float16, bfloat16, float32 or float64.
        k, v: (batch, seqlen_k, nheads_k, head_dim), dtype of q; nheads % nheads_k == 0 (MQA/GQA).
            Any strides; a last dimension with stride != 1 is copied once on the GPU path.
        dropout_p: probability of dropping an attention weight, in [0, 1), rounded to a multiple
            of 2^-16; kept weights are scaled by 1 / (1 - p). The keep-mask is a pure function of
            (seed, offset, b, h, i, j): flashcupy.dropout.keep_mask regenerates it exactly.
        softmax_scale: scale of q k^T before the softmax (>= 0); default head_dim ** -0.5.
        causal: mask keys after each query, aligned bottom-right when seqlen_q != seqlen_k (as
            flash-attn >= 2.1): query i sees key j iff j <= i + seqlen_k - seqlen_q. Rows that see
            no key (i < seqlen_q - seqlen_k) give out 0 and lse -inf.
        seed: dropout only: an int seed (offset 0) or a (seed, offset) pair; default: the library
            generator's next state (flashcupy.dropout.manual_seed makes runs reproducible). With
            dropout_p=0 it is ignored (not even validated) and rng_state is None.
        block_mask: a flashcupy.blocksparse.BlockMask: only its active (query block, key block)
            tiles are computed (FlashAttention Sec. 3.3); combines with causal and dropout. Rows whose
            blocks are all inactive give out 0 and lse -inf.
        allow_tf32: float32 on the GPU only (other dtypes and the CPU ignore it): True lets the
            products q k^T and P v run on the TF32 tensor cores (sm_80+, head_dim <= 256, no
            dropout, no block mask; elsewhere the exact path runs). Their operands are rounded to
            TF32 (10-bit mantissa, round to nearest, ties away), so out carries relative errors of
            ~1e-3 (float16's order) instead of float32's ~1e-7; accumulation and softmax stay in
            float32. Several times faster than the exact float32 kernel. Default False: exact FFMA.
        window_size: (left, right) ints >= -1, flash-attn's sliding window: query i sees key j iff
            i + offset - left <= j <= i + offset + right, offset = seqlen_k - seqlen_q (bottom-right
            aligned); -1 leaves that side unbounded; (-1, -1) (default) is no window. With causal both
            apply (causal is right = 0). Rows that see no key give out 0 and lse -inf.
        softcap: float >= 0 (0, the default: off), flash-attn's (Gemma 2's) soft-capping: the scaled
            score s = softmax_scale * q.k becomes softcap * tanh(s / softcap) before the softmax
            (softmax_scale enters first, inside the tanh).
        alibi_slopes: float32 (nheads,) or (batch, nheads), or None: flash-attn's ALiBi, adding
            -slope[h] * |i + seqlen_k - seqlen_q - j| to the scaled score after the softcap (then the
            mask). The array kind of q (NumPy / CuPy on q's device); float32 only, as flash-attn
            (other dtypes raise TypeError rather than being converted).
        sinks: float32 (nheads,), or None: learnable attention sinks (GPT-OSS), one logit per query
            head in the space of the scaled (capped, biased) scores, that joins every row's softmax
            denominator without a value vector: P_ij = exp(S'_ij - lse_i) with
            lse_i = log(sum_j exp(S'_ij) + exp(sinks[h])). lse includes the sink; a row that sees no
            key gives out 0 and lse = sinks[h]; a sink of -inf is no sink. Same kind rules as alibi_slopes.
        The four combine with each other, causal, GQA, dropout and block_mask; today every call that
        uses one runs the chunked path (the NumPy one on the CPU, the chunked path on the GPU: the
        fused kernels are getting them; kernel_path(..., features=) tells).

    Returns:
        AttnForward(out, lse, rng_state), a 3-tuple: out like q; lse (batch, nheads, seqlen_q)
        natural-log logsumexp of the scaled scores (of the softmax before dropout; with the sink when
        sinks are given), float32 (float64 for float64 inputs); rng_state the dropout (seed, offset)
        to give the backward, None without dropout. Its attribute options (AttnOptions: causal,
        softmax_scale as resolved, dropout_p, block_mask, allow_tf32, window_size, softcap,
        alibi_slopes, sinks) is what flash_attn_backward(dout, q, k, v, forward=fwd) repeats and checks.

    Non-finite and huge inputs are not checked; what they give (measured on the CPU path):
        - a NaN in row i of q, or a +inf score in it (an inf in q or k of the right sign): out row i
          is NaN and its lse is -inf (as an empty row's: test out, not lse, for NaN); a -inf score
          just hides that key;
        - a NaN in key j of k: every row that sees key j is NaN, lse -inf;
        - a NaN in v[b, j, hk, d] makes out[b, :, h, d] NaN for every query head h of group hk, in
          every row, even rows that cannot see key j (their weight 0 times NaN is NaN); an inf there
          gives inf where key j has weight and NaN elsewhere; lse stays finite;
        - overflow: scores are (q k^T) * softmax_scale in the compute dtype (float32 for float16,
          bfloat16 and float32 inputs, float64 for float64); once |q . k| passes its maximum
          (3.4e38: e.g. float32 entries ~1e20 at head_dim 8, or the ~1e30 of a diverging model) the
          scores overflow to +-inf and every row with a +inf score comes out all NaN, lse -inf (in
          practice all of them). Below that, out and lse stay finite (lse ~ the largest score).
          float16 inputs cannot overflow (65504**2 * head_dim < 3.4e38); float64 overflows past
          ~1e154 entries.
        The GPU kernels' behaviour on such inputs is not specified (not measured).
        NumPy emits RuntimeWarnings ("invalid value", "overflow") in these cases. In the backward any
        NaN or inf spreads (0 * inf, 0 * NaN) through most of dq, dk and dv.

    Raises:
        TypeError: non-array inputs (a numpy.ma.MaskedArray too: its mask would be ignored), a host
            __dlpack__ array NumPy cannot import, unsupported or mismatched dtypes, host and device
            arrays mixed, non-bool flags.
        ValueError: wrong ranks or shapes, nheads not a multiple of nheads_k, bad scalars, a
            window_size value < -1, a negative or non-finite softcap, alibi_slopes / sinks of the wrong
            shape or on another device.
        TypeError also: window_size not a pair of ints, alibi_slopes / sinks not float32 or of
            another array kind than q.
        RuntimeError: a block_mask with no copy on the current device while the stream is capturing
            a CUDA graph (BlockMask.prepare).

    Host arrays with __dlpack__ (torch / JAX CPU tensors) run on the CPU path and return NumPy.

    Source: FlashAttention-2 forward (arXiv 2307.08691, Algorithm 1); see flashcupy.reference. Window,
    softcap and ALiBi as flash-attn 2.6 (flash_attn_func's window_size, softcap, alibi_slopes).
    """
    xp, (q, k, v, *feature_arrays) = array_module(q=q, k=k, v=v, **_given_arrays(alibi_slopes, sinks))
    alibi_slopes, sinks = _put_back(feature_arrays, alibi_slopes, sinks)
    shape = check_qkv(q, k, v, softmax_scale, dropout_p)
    causal = check_bool("causal", causal)
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    block_mask = _check_block_mask(block_mask, shape, xp)
    features = check_features(xp, q, shape, causal=causal, window_size=window_size, softcap=softcap,
                              alibi_slopes=alibi_slopes, sinks=sinks)
    dropout_p = float(dropout_p)
    options = AttnOptions(causal, shape.softmax_scale, dropout_p, block_mask, allow_tf32, features.window,
                          features.softcap, alibi_slopes, sinks)
    rng_state = None
    if dropout_p > 0:
        rng_state = dropout.default_generator.next_state() if seed is None else dropout.check_rng_state("seed", seed)
    if shape.batch * shape.nheads * shape.seqlen_q == 0 or shape.seqlen_k == 0:
        out = xp.zeros(q.shape, dtype=q.dtype)
        lse = xp.full((shape.batch, shape.nheads, shape.seqlen_q), -np.inf, dtype=lse_dtype(q.dtype))
        if features.sinks is not None:  # rows that see no key still see their sink
            lse[...] = features.sinks.astype(lse.dtype)[None, :, None]
        return AttnForward(out, lse, rng_state, options)
    if _numpy_float64_to_gpu(xp, q.dtype, shape, "fwd", causal, dropout_p, block_mask, allow_tf32, features):
        cp = cupy_or_none()  # NumPy float64 -> float64 kernel -> NumPy
        res = flash_attn_forward(*(cp.asarray(x) for x in (q, k, v)), dropout_p=dropout_p,
                                 softmax_scale=softmax_scale, causal=causal, seed=rng_state, block_mask=block_mask,
                                 allow_tf32=allow_tf32, **_features_on_gpu(cp, features))
        return AttnForward(res.out.get(), res.lse.get(), res.rng_state, options)
    plan = None if xp is np else _plan("fwd", q.dtype, shape, causal, dropout_p, block_mask, allow_tf32,
                                       features=features.bits)
    if plan is not None and plan.family in (_dispatch.MMA16, _dispatch.WGMMA):
        from . import _gpu

        out, lse = _gpu.forward(q, k, v, shape, causal=causal, block_mask=block_mask,
                                dropout=(dropout_p, rng_state) if dropout_p > 0 else None, config=plan.config,
                                features=features)
    elif plan is not None:
        from . import _gpu_simt

        out, lse = _gpu_simt.forward(q, k, v, shape, causal=causal, allow_tf32=allow_tf32, config=plan.config,
                                     features=features)
    else:
        out, lse = _chunked_forward(xp, q, k, v, shape, causal, dropout_p, rng_state, block_mask, features)
    return AttnForward(out, lse, rng_state, options)


def _given_arrays(alibi_slopes, sinks) -> dict:
    """The feature arrays that are given, by name, for _arrays.array_module (with q, k, v: one kind)."""
    return {name: x for name, x in (("alibi_slopes", alibi_slopes), ("sinks", sinks)) if x is not None}


def _put_back(converted, alibi_slopes, sinks):
    """(alibi_slopes, sinks) with the given ones replaced by array_module's conversions, in order."""
    it = iter(converted)
    return tuple(None if x is None else next(it) for x in (alibi_slopes, sinks))


def _features_on_gpu(cp, features) -> dict:
    """The feature keywords of a validated Features, with its arrays copied to the current device."""
    return dict(window_size=features.window, softcap=features.softcap,
                alibi_slopes=None if features.alibi_slopes is None else cp.asarray(features.alibi_slopes),
                sinks=None if features.sinks is None else cp.asarray(features.sinks))


def _backward_rng_state(dropout_p: float, rng_state, forward):
    """A backward's rng_state, checked: the forward's (seed, offset) when dropout_p > 0 (equal to
    forward.rng_state when a forward record is given), None with dropout_p = 0. ValueError otherwise."""
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("rng_state: expected the forward's rng_state (seed, offset) when dropout_p > 0, got None")
        rng_state = dropout.check_rng_state("rng_state", rng_state)
        if forward is not None and rng_state != forward.rng_state:
            raise ValueError(f"rng_state: expected the forward's rng_state {forward.rng_state!r}, got {rng_state!r}")
    elif rng_state is not None:
        raise ValueError(f"rng_state: expected None with dropout_p=0 (an rng_state comes from a forward with "
                         f"dropout: give the backward its dropout_p too), got {rng_state!r}")
    return rng_state


def flash_attn_backward(dout, q, k, v, out=None, lse=None, *, dropout_p=FROM_FORWARD, softmax_scale=FROM_FORWARD,
                        causal=FROM_FORWARD, rng_state=FROM_FORWARD, deterministic=False, block_mask=FROM_FORWARD,
                        allow_tf32=FROM_FORWARD, forward=None, window_size=FROM_FORWARD, softcap=FROM_FORWARD,
                        alibi_slopes=FROM_FORWARD, sinks=FROM_FORWARD):
    """Gradients of attention with respect to q, k and v (and the sinks), recomputing P from lse.

    Two ways to call it:
        fwd = flash_attn_forward(q, k, v, causal=True, ...)
        dq, dk, dv = flash_attn_backward(dout, q, k, v, forward=fwd)           # options from fwd, checked
        dq, dk, dv = flash_attn_backward(dout, q, k, v, fwd.out, fwd.lse, causal=True, ...)  # flash-attn style

    Args:
        dout: gradient of the loss with respect to out, shape and dtype of q; any strides.
        q, k, v: the forward's inputs.
        out, lse: the forward's outputs; optional with forward= (then they must be forward.out and
            forward.lse themselves: the same arrays by data pointer, shape and strides; values are
            never compared, so the check costs no host synchronisation).
        forward: the AttnForward flash_attn_forward returned. The options below then default to the
            forward's (AttnForward.options), and one given explicitly must equal it.
        dropout_p, softmax_scale, causal, block_mask: as given to the forward (softmax_scale is compared
            as resolved: None means head_dim ** -0.5; a block_mask by value). Without forward= they
            default to 0.0, None, False, None.
        rng_state: the forward's rng_state (dropout only; with forward=, forward.rng_state). An
            rng_state with dropout_p=0 raises ValueError: it means the forward had dropout.
        deterministic: bitwise-reproducible gradients on the GPU (the CPU path always is).
        allow_tf32: as flash_attn_forward: float32 gradients from the TF32 tensor cores (all five
            products take TF32 operands; relative errors ~1e-3). Always bitwise reproducible there.
            With forward=, compared only for float32 on the GPU (elsewhere it changes nothing).
        window_size, softcap, alibi_slopes, sinks: as given to the forward (flash_attn_forward);
            with forward=, compared with its options (window_size as validated, softcap by value,
            the arrays by data pointer, shape and strides). Without forward= they default to
            (-1, -1), 0.0, None, None. softcap multiplies dS by 1 - tanh^2(s / softcap).

    Returns:
        (dq, dk, dv) shaped and typed like q, k, v; dk and dv are summed over the query heads of a
        group (MQA/GQA). Rows with no visible key contribute nothing. With sinks: (dq, dk, dv, dsinks),
        dsinks float32 (nheads,) like sinks: dsinks[h] = -sum over (b, i) of
        exp(sinks[h] - lse[b, h, i]) * rowsum(dout o out)[b, h, i] (sink_grad; flashcupy.reference
        derives it), the same function on every path.

    Raises: as flash_attn_forward, plus ValueError/TypeError for a dout, out or lse that does not
    match the forward; TypeError for a forward that is not flash_attn_forward's AttnForward; ValueError
    naming the argument for any option, out, lse or rng_state that differs from forward's.

    Source: FlashAttention backward (arXiv 2205.14135, Algorithm 4; arXiv 2307.08691, Algorithm 2).
    """
    opts, out, lse = _forward_record(forward, AttnForward, "flash_attn_forward", out, lse)
    given = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, block_mask=block_mask,
                 allow_tf32=allow_tf32, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 sinks=sinks)
    (causal, softmax_scale, dropout_p, block_mask, allow_tf32, window_size, softcap, alibi_slopes, sinks) = (
        (_PLAIN_DEFAULTS[n] if opts is None else getattr(opts, n)) if given[n] is FROM_FORWARD else given[n]
        for n in _OPTION_NAMES)
    if rng_state is FROM_FORWARD:
        rng_state = None if forward is None else forward.rng_state
    xp, (dout, q, k, v, out, lse, *feature_arrays) = array_module(dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                                                                   **_given_arrays(alibi_slopes, sinks))
    alibi_slopes, sinks = _put_back(feature_arrays, alibi_slopes, sinks)
    shape = check_qkv(q, k, v, softmax_scale, dropout_p)
    check_like("dout", dout, q.shape, q.dtype, "q")
    check_like("out", out, q.shape, q.dtype, "q")
    check_lse(lse, shape, lse_dtype(q.dtype))
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    allow_tf32 = check_bool("allow_tf32", allow_tf32)
    block_mask = _check_block_mask(block_mask, shape, xp)
    features = check_features(xp, q, shape, causal=causal, window_size=window_size, softcap=softcap,
                              alibi_slopes=alibi_slopes, sinks=sinks)
    dropout_p = float(dropout_p)
    if opts is not None:
        _check_matches_forward(forward, xp, q.dtype, shape, out=out, lse=lse, causal=causal,
                               softmax_scale=given["softmax_scale"], dropout_p=dropout_p, block_mask=block_mask,
                               allow_tf32=allow_tf32, features=features, alibi_slopes=alibi_slopes, sinks=sinks)
    rng_state = _backward_rng_state(dropout_p, rng_state, forward)
    softmax_scale = shape.softmax_scale
    if shape.batch * shape.nheads * shape.seqlen_q == 0 or shape.seqlen_k == 0:
        grads = xp.zeros(q.shape, q.dtype), xp.zeros(k.shape, k.dtype), xp.zeros(v.shape, v.dtype)
        return grads if features.sinks is None else (*grads, xp.zeros(shape.nheads, np.float32))
    if _numpy_float64_to_gpu(xp, q.dtype, shape, "bwd", causal, dropout_p, block_mask, allow_tf32, features):
        cp = cupy_or_none()  # NumPy float64 -> float64 kernels -> NumPy
        grads = flash_attn_backward(*(cp.asarray(x) for x in (dout, q, k, v, out, lse)), dropout_p=dropout_p,
                                    softmax_scale=softmax_scale, causal=causal, rng_state=rng_state,
                                    deterministic=deterministic, block_mask=block_mask, allow_tf32=allow_tf32,
                                    **_features_on_gpu(cp, features))
        return tuple(g.get() for g in grads)
    plan = None if xp is np else _plan("bwd", q.dtype, shape, causal, dropout_p, block_mask, allow_tf32,
                                       deterministic=deterministic, features=features.bits)
    if plan is not None and plan.family in (_dispatch.MMA16, _dispatch.WGMMA):
        from . import _gpu

        grads = _gpu.backward(dout, q, k, v, out, lse, shape, causal=causal, deterministic=deterministic,
                              dropout=(dropout_p, rng_state) if dropout_p > 0 else None, block_mask=block_mask,
                              config=plan.config, features=features)
    elif plan is not None:
        from . import _gpu_simt

        grads = _gpu_simt.backward(dout, q, k, v, out, lse, shape, causal=causal, deterministic=deterministic,
                                   allow_tf32=allow_tf32, config=plan.config, features=features)
    else:
        grads = _chunked_backward(xp, dout, q, k, v, out, lse, shape, causal, dropout_p, rng_state, block_mask,
                                  features)
    if features.sinks is None:
        return grads
    return (*grads, sink_grad(xp, dout, out, lse, features.sinks))

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *, deterministic=False,
                    return_lse=False, seed=None, block_mask=None, allow_tf32=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, sinks=None, return_attn_probs=False):
    """Exact attention softmax(q k^T * softmax_scale) v, computed without storing the attention matrix.

    q: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim). Arguments,
    errors and the behaviour on NaN, inf and overflow as flash_attn_forward (seed is ignored when
    dropout_p is 0; window_size, softcap, alibi_slopes and sinks as there, flash-attn's names). Returns
    out (like q), or (out, lse) when return_lse is True; return_attn_probs is flash-attn's name for
    it (accepted as an alias: no probabilities are returned, lse is what they would be computed from).
    deterministic (a bool, as flash-attn's): the forward is always bitwise reproducible, so it changes
    nothing here; it concerns a backward (flash_attn_backward, the tape).
    For gradients use flash_attn_forward / flash_attn_backward, or the tape (flashcupy.tape).
    NumPy (and host __dlpack__) in -> NumPy out (CPU); CuPy / GPU __dlpack__ in -> CuPy out (GPU), on
    the current stream.
    """
    check_bool("deterministic", deterministic)
    return_lse = check_bool("return_lse", return_lse) | check_bool("return_attn_probs", return_attn_probs)
    res = flash_attn_forward(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, seed=seed,
                             block_mask=block_mask, allow_tf32=allow_tf32, window_size=window_size, softcap=softcap,
                             alibi_slopes=alibi_slopes, sinks=sinks)
    return (res.out, res.lse) if return_lse else res.out


def _unpack(name, x, n, what):
    """The n views x[:, :, i] of a packed (batch, seqlen, n, heads, head_dim) array (no copy)."""
    if x.ndim != 5 or int(x.shape[2]) != n:
        raise ValueError(f"{name}: expected shape (batch, seqlen, {n}, {what}, head_dim), got {tuple(x.shape)}")
    return tuple(x[:, :, i] for i in range(n))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash_attn_func on packed self-attention inputs, flash-attn's flash_attn_qkvpacked_func.

    qkv: (batch, seqlen, 3, nheads, head_dim), q, k, v along axis 2 (views, no copy); every other
    argument and the result as flash_attn_func (keyword-only there). Raises ValueError for another
    shape, TypeError for a non-array, then as flash_attn_func.
    """
    q, k, v = _unpack("qkv", array_module(qkv=qkv)[1][0], 3, "nheads")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kwargs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash_attn_func with k and v packed, flash-attn's flash_attn_kvpacked_func.

    q: (batch, seqlen_q, nheads, head_dim); kv: (batch, seqlen_k, 2, nheads_k, head_dim), k and v
    along axis 2 (views, no copy); every other argument and the result as flash_attn_func. Raises
    ValueError for another kv shape, TypeError for a non-array, then as flash_attn_func.
    """
    k, v = _unpack("kv", array_module(kv=kv)[1][0], 2, "nheads_k")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kwargs)
