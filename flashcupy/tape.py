"""A small reverse-mode autodiff tape over NumPy and CuPy arrays: the ops a GPT needs, nothing more.

One code path for both array modules: every op reads `xp` off its input's data, so NumPy tensors run on
the CPU and CuPy tensors on the current GPU device and stream, without a host sync.

How it works (micrograd, with arrays):
- A Tensor holds `data` (an array), `grad` (an array of the same shape and dtype, or None) and, when it
  was made by an op that needs gradients, its parents and a closure `_backward(g)` that receives
  d(loss)/d(this tensor) and accumulates (+=) each parent's share into that parent's grad.
- `backward()` sorts the graph topologically, seeds the root's grad and walks it in reverse.
- Every tensor owns its grad buffer: the first contribution is copied, later ones are added in place.
  (An op like add passes one incoming gradient to two parents; sharing that array between them, then
  adding into one, would silently corrupt the other.)
- Only leaves (tensors no op made: parameters, inputs) keep their grads. An interior tensor's grad is
  released as soon as the walk has passed it on, and so is its closure with the activations it saved
  (unless backward(retain_graph=True)), so memory falls during the backward pass, as in PyTorch.

Ops: add, sub, mul (broadcasting; gradients summed over the broadcast axes), scalar scale and shift,
matmul, linear, reshape, transpose, basic indexing and split, embedding (scatter-add, repeated indices
accumulate), layer_norm, gelu (tanh approximation), sum, mean, cross_entropy (integer targets), and
attention twice: flash_attention over flashcupy.flash_attn_forward / flash_attn_backward, and
naive_attention (matmul, softmax, matmul, the (Sq, Sk) probabilities kept for the backward) for
comparison; both take causal, GQA, dropout (the same keep-mask for the same seed), a block mask and
flash-attn's score features (window_size, softcap, alibi_slopes) and learnable attention sinks: sinks
may be a Tensor that receives its gradient. A residual connection is `x + f(x)`: add, with x used twice.

Mixed precision: the attention ops take a `dtype` keyword. Their inputs are cast to it (bfloat16 or
float16 on the GPU), and their gradients are cast back to each input's own dtype, so a model can keep
float32 master weights and activations while attention runs on the half-precision kernels.

A second backward() through a graph whose activations were released raises RuntimeError (as in
PyTorch); pass retain_graph=True to the first. Leaves accumulate grads over calls: zero_grad() (or
`t.grad = None`) between optimizer steps. `from flashcupy.tape import *` does not export `sum` (it
would shadow the builtin); use `tape.sum` or `Tensor.sum`.

Example:
    import numpy as np
    from flashcupy.tape import Tensor, cross_entropy, linear
    x, targets = np.random.randn(5, 3), np.array([0, 1, 1, 0, 1])
    w = Tensor(np.random.randn(3, 2), requires_grad=True)
    loss = cross_entropy(linear(Tensor(x), w), targets)
    loss.backward()          # w.grad now holds d(loss)/dw
    w.zero_grad()            # before the next step's backward()
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from . import _features, _mask
from . import dropout as _dropout
from ._arrays import bfloat16, cupy_or_none
from ._validate import check_dropout_p
from .interface import flash_attn_backward, flash_attn_forward

__all__ = [
    "Tensor",
    "no_grad",
    "is_grad_enabled",
    "add",
    "sub",
    "mul",
    "matmul",
    "linear",
    "reshape",
    "transpose",
    "split",
    "embedding",
    "layer_norm",
    "gelu",
    "mean",
    "cross_entropy",
    "flash_attention",
    "naive_attention",
]

_grad_enabled = True
_FREED = ("backward(): this graph was already released by an earlier backward(); call the first with "
          "retain_graph=True to go through it twice")


@contextlib.contextmanager
def no_grad():
    """Within this context ops record nothing: outputs have no parents and need no gradient."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def array_module_of(data):
    """cupy for CuPy arrays, numpy otherwise (cupy is never imported for NumPy data)."""
    cp = cupy_or_none()
    return cp if cp is not None and isinstance(data, cp.ndarray) else np


class Tensor:
    """An array with a gradient slot and, if an op made it, the closure that back-propagates into its parents."""

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "name", "_freed")
    __array_ufunc__ = None  # `ndarray + Tensor` defers to Tensor.__radd__ instead of looping over elements

    def __init__(self, data, requires_grad=False, name=None):
        if isinstance(data, Tensor):
            raise TypeError("data: expected an array, got a Tensor (use the tensor itself)")
        if not hasattr(data, "shape"):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None
        self.name = name
        self._freed = False  # an op's output whose closure a backward() released

    # -- properties ---------------------------------------------------------------------------------
    @property
    def xp(self):
        return array_module_of(self.data)

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return int(self.data.size)

    @property
    def is_leaf(self):
        return self._backward is None

    def item(self) -> float:
        """The value of a one-element tensor as a Python float (a host sync on the GPU)."""
        return float(self.data.reshape(()))

    def numpy(self):
        return self.data.get() if self.xp is not np else self.data

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    # -- autodiff -----------------------------------------------------------------------------------
    def backward(self, grad=None, *, retain_graph=False):
        """Accumulate d(self)/d(leaf) * grad into every leaf's .grad that needs a gradient.

        grad: the seed d(loss)/d(self), shaped like self; may be omitted only for a one-element tensor
        (seed 1). retain_graph=False releases the saved activations on the way; True keeps the graph
        for another backward(). Interior grads are always released once used.
        Raises ValueError for a tensor of more than one element without a seed, RuntimeError for a
        tensor that needs no gradient (made under no_grad, or from constants only) and for a graph that
        an earlier backward() already released (a second backward() without retain_graph=True).
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require a gradient "
                               "(it was made under no_grad, or only from tensors that need none)")
        if self._freed:
            raise RuntimeError(_FREED)
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward(): a tensor of shape {self.shape} needs a seed gradient of that "
                                 f"shape; only a one-element tensor (a loss) can be seeded with 1")
            grad = xp.ones_like(self.data)
        if tuple(grad.shape) != self.shape:
            raise ValueError(f"backward(): expected a seed gradient of shape {self.shape}, got {tuple(grad.shape)}")
        order = _topological_order(self)
        if any(node._freed for node in order):
            raise RuntimeError(_FREED)
        _accumulate(self, grad)
        while order:
            node = order.pop()  # reverse topological order: every consumer of node has already run
            if node._backward is None or node.grad is None:
                continue
            node._backward(node.grad)
            node.grad = None  # interior grads are spent once passed on (a retained graph starts clean)
            if not retain_graph:
                node._backward, node._parents, node._freed = None, (), True

    def zero_grad(self):
        """Drop the accumulated gradient (backward() adds into .grad; call this between steps)."""
        self.grad = None

    # -- operators ----------------------------------------------------------------------------------
    def __add__(self, other):
        return _shift(self, other) if _is_scalar(other) else add(self, other)

    def __radd__(self, other):
        return _shift(self, other) if _is_scalar(other) else add(other, self)

    def __sub__(self, other):
        return _shift(self, -other) if _is_scalar(other) else sub(self, other)

    def __rsub__(self, other):
        return _shift(_scale(self, -1.0), other) if _is_scalar(other) else sub(other, self)

    def __mul__(self, other):
        return _scale(self, other) if _is_scalar(other) else mul(self, other)

    def __rmul__(self, other):
        return _scale(self, other) if _is_scalar(other) else mul(other, self)

    def __truediv__(self, other):
        if not _is_scalar(other):
            raise TypeError("Tensor / x: only division by a Python number is supported")
        return _scale(self, 1.0 / other)

    def __neg__(self):
        return _scale(self, -1.0)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def __getitem__(self, index):
        return _getitem(self, index)

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    def sum(self, axis=None, keepdims=False):
        return sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return mean(self, axis=axis, keepdims=keepdims)


# -- the engine -------------------------------------------------------------------------------------


def _topological_order(root):
    """Every tensor reachable from root that needs a gradient, parents before children (iterative DFS)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((p, False) for p in node._parents if p.requires_grad and p not in seen)
    return order


def _accumulate(t, g):
    """t.grad += g, where g has t's shape. The first contribution is copied so t owns its buffer."""
    if not t.requires_grad:
        return
    assert tuple(g.shape) == t.shape, f"gradient of shape {tuple(g.shape)} for a tensor of shape {t.shape}"
    if t.grad is None:
        t.grad = g.astype(t.dtype, copy=True)
    else:
        t.grad += g


def _grad_buffer(t):
    """t.grad, allocated as zeros if absent, for ops that accumulate into part of it."""
    if t.grad is None:
        t.grad = t.xp.zeros_like(t.data)
    return t.grad


def _make(data, parents, backward):
    """The output tensor of an op; it records backward(g) only if some parent needs a gradient."""
    if isinstance(data, np.generic):  # NumPy reductions return scalars; keep every .data an array
        data = np.asarray(data)
    out = Tensor(data)
    if _grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
    return out


def _is_scalar(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added or stretched, so it has `shape` again."""
    if tuple(g.shape) == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


# -- elementwise ------------------------------------------------------------------------------------


def add(a, b):
    """a + b with broadcasting (also the residual connection)."""
    a, b = _as_tensor(a), _as_tensor(b)

    def backward(g):
        if a.requires_grad:
            _accumulate(a, _unbroadcast(g, a.shape))
        if b.requires_grad:
            _accumulate(b, _unbroadcast(g, b.shape))

    return _make(a.data + b.data, (a, b), backward)


def sub(a, b):
    """a - b with broadcasting."""
    a, b = _as_tensor(a), _as_tensor(b)

    def backward(g):
        if a.requires_grad:
            _accumulate(a, _unbroadcast(g, a.shape))
        if b.requires_grad:
            _accumulate(b, -_unbroadcast(g, b.shape))

    return _make(a.data - b.data, (a, b), backward)


def mul(a, b):
    """a * b elementwise with broadcasting."""
    a, b = _as_tensor(a), _as_tensor(b)

    def backward(g):
        if a.requires_grad:
            _accumulate(a, _unbroadcast(g * b.data, a.shape))
        if b.requires_grad:
            _accumulate(b, _unbroadcast(g * a.data, b.shape))

    return _make(a.data * b.data, (a, b), backward)


def _scale(a, c):
    """a * c for a Python number c (kept a kernel argument on the GPU, never a device array)."""

    def backward(g):
        _accumulate(a, g * c)

    return _make(a.data * c, (a,), backward)


def _shift(a, c):
    """a + c for a Python number c."""

    def backward(g):
        _accumulate(a, g)

    return _make(a.data + c, (a,), backward)


# -- linear algebra ---------------------------------------------------------------------------------


def matmul(a, b):
    """a @ b for a, b of rank >= 2, with NumPy's batch broadcasting."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: expected operands of rank >= 2, got shapes {a.shape} and {b.shape}")

    def backward(g):
        if a.requires_grad:
            _accumulate(a, _unbroadcast(g @ b.data.swapaxes(-1, -2), a.shape))
        if b.requires_grad:
            _accumulate(b, _unbroadcast(a.data.swapaxes(-1, -2) @ g, b.shape))

    return _make(a.data @ b.data, (a, b), backward)


def linear(x, weight, bias=None):
    """x @ weight + bias. x (..., n_in), weight (n_in, n_out), bias (n_out,) or None -> (..., n_out).

    The leading axes are flattened so the forward and each gradient is one 2-D GEMM (cuBLAS on the
    GPU); d(weight) = x^T g sums over every token inside that GEMM.
    """
    x, weight = _as_tensor(x), _as_tensor(weight)
    n_in, n_out = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {n_in} (shape {weight.shape})")
    x2 = x.data.reshape(-1, n_in)  # (tokens, n_in)
    out = x2 @ weight.data  # (tokens, n_out)
    if bias is not None:
        bias = _as_tensor(bias)
        out += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g2 = g.reshape(-1, n_out)  # (tokens, n_out)
        if x.requires_grad:
            _accumulate(x, (g2 @ weight.data.T).reshape(x.shape))
        if weight.requires_grad:
            _accumulate(weight, x2.T @ g2)
        if bias is not None and bias.requires_grad:
            _accumulate(bias, g2.sum(axis=0))

    return _make(out.reshape(*x.shape[:-1], n_out), parents, backward)


# -- shapes -----------------------------------------------------------------------------------------


def reshape(x, shape):
    x = _as_tensor(x)

    def backward(g):
        _accumulate(x, g.reshape(x.shape))

    return _make(x.data.reshape(shape), (x,), backward)


def transpose(x, axes=None):
    """Permute axes (reverse them when axes is None), as numpy.transpose."""
    x = _as_tensor(x)
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
    inverse = tuple(np.argsort(axes))

    def backward(g):
        _accumulate(x, g.transpose(inverse))

    return _make(x.data.transpose(axes), (x,), backward)


def _getitem(x, index):
    """x[index] for basic indexing only (ints, slices, Ellipsis, None): a view; its gradient lands in
    that part of x.grad. Integer-array lookups, where indices may repeat, are `embedding`."""
    parts = index if isinstance(index, tuple) else (index,)
    for p in parts:
        if not (p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer))):
            raise TypeError(f"Tensor[...]: only ints, slices, ... and None are supported, got {type(p).__name__}; "
                            f"use embedding() to gather rows by an index array")

    def backward(g):
        _grad_buffer(x)[index] += g

    return _make(x.data[index], (x,), backward)


def split(x, sections, axis=-1):
    """Split x into `sections` equal parts along axis (as numpy.split with an int)."""
    n = x.shape[axis]
    if n % sections:
        raise ValueError(f"split: axis {axis} of size {n} does not divide into {sections} equal parts")
    step = n // sections
    lead = (slice(None),) * (axis % x.ndim)
    return tuple(_getitem(x, lead + (slice(i * step, (i + 1) * step),)) for i in range(sections))


def embedding(weight, indices):
    """weight[indices]: weight (num_embeddings, dim), indices an integer array of any shape -> (*indices.shape, dim).

    The gradient is a scatter-add (xp.add.at), so an index that appears several times accumulates
    every one of its rows' gradients.
    """
    weight = _as_tensor(weight)
    indices = indices.data if isinstance(indices, Tensor) else indices
    dim = weight.shape[-1]

    def backward(g):
        weight.xp.add.at(_grad_buffer(weight), indices.reshape(-1), g.reshape(-1, dim))

    return _make(weight.data[indices], (weight,), backward)


# -- normalisation and nonlinearity -----------------------------------------------------------------


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias (biased variance)."""
    x, weight, bias = _as_tensor(x), _as_tensor(weight), _as_tensor(bias)
    xp = x.xp
    mu = x.data.mean(axis=-1, keepdims=True)
    xc = x.data - mu
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    del xc
    dim = x.shape[-1]

    def backward(g):
        if weight.requires_grad:
            _accumulate(weight, (g * xhat).reshape(-1, dim).sum(axis=0))
        if bias.requires_grad:
            _accumulate(bias, g.reshape(-1, dim).sum(axis=0))
        if x.requires_grad:
            # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * weight
            dxhat = g * weight.data
            dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
            dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
            dx *= rstd
            _accumulate(x, dx)

    return _make(xhat * weight.data + bias.data, (x, weight, bias), backward)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x):
    """GELU, tanh approximation (as GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = _as_tensor(x)
    xp = x.xp
    t = xp.tanh(_GELU_C * x.data * (1.0 + 0.044715 * (x.data * x.data)))  # x*x, not x**3: pow is slow

    def backward(g):
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        x2 = x.data * x.data
        d = 0.5 * (1.0 + t) + (0.5 * _GELU_C) * x.data * (1.0 - t * t) * (1.0 + 0.134145 * x2)
        _accumulate(x, g * d)

    return _make(0.5 * x.data * (1.0 + t), (x,), backward)


# -- reductions and the loss ------------------------------------------------------------------------


def sum(x, axis=None, keepdims=False):
    x = _as_tensor(x)
    xp = x.xp

    def backward(g):
        if axis is not None and not keepdims:
            g = xp.expand_dims(g, axis)
        _accumulate(x, xp.broadcast_to(g, x.shape))

    return _make(x.data.sum(axis=axis, keepdims=keepdims), (x,), backward)


def mean(x, axis=None, keepdims=False):
    x = _as_tensor(x)
    axes = range(x.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    count = int(np.prod([x.shape[a] for a in axes]))
    return _scale(sum(x, axis=axis, keepdims=keepdims), 1.0 / count)


def cross_entropy(logits, targets):
    """Mean softmax cross-entropy in nats. logits (..., V) float; targets (...) integers in [0, V).

    Returns a 0-d tensor. Computed stably through logsumexp; d(logits) = (softmax - onehot) / N.
    Raises TypeError for targets that are not an integer array, ValueError for a shape that does not
    match and, for NumPy targets, for a value outside [0, V). CuPy targets are not read on the host (no
    synchronisation): an out-of-range one makes the loss NaN instead of indexing another class.
    """
    logits = _as_tensor(logits)
    targets = targets.data if isinstance(targets, Tensor) else targets
    xp = logits.xp
    vocab = logits.shape[-1]
    if not hasattr(targets, "dtype") or targets.dtype.kind not in "iu":
        got = getattr(getattr(targets, "dtype", None), "name", type(targets).__name__)
        raise TypeError(f"cross_entropy: targets: expected an integer array of class indices, got {got}")
    if tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {tuple(targets.shape)} do not match logits "
                         f"{logits.shape} (expected {logits.shape[:-1]})")
    bad = None
    if isinstance(targets, np.ndarray):
        if targets.size and (targets.min() < 0 or targets.max() >= vocab):
            v = targets[(targets < 0) | (targets >= vocab)].flat[0]
            raise ValueError(f"cross_entropy: targets: expected class indices in [0, {vocab}), got {int(v)}")
    else:
        bad = (targets < 0) | (targets >= vocab)  # on the device: NaN loss instead of a host check
        targets = xp.where(bad, 0, targets)
    x = logits.data.reshape(-1, vocab)  # (N, V)
    t = targets.reshape(-1, 1)  # (N, 1)
    n = x.shape[0]
    m = x.max(axis=-1, keepdims=True)
    e = xp.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = xp.log(s) + m  # (N, 1)
    loss = (lse - xp.take_along_axis(x, t, axis=-1)).mean()
    if bad is not None:
        loss = xp.where(bad.any(), xp.nan, loss)

    def backward(g):
        p = e / s  # softmax, (N, V)
        rows = xp.arange(n)
        p[rows, t[:, 0]] -= 1.0
        p *= g / n
        _accumulate(logits, p.reshape(logits.shape))

    return _make(loss, (logits,), backward)


# -- attention --------------------------------------------------------------------------------------

def _attention_dtype(q, dtype):
    return np.dtype(q.dtype if dtype is None else dtype)


def _feature_inputs(alibi_slopes, sinks):
    """(alibi array or None, sinks Tensor or None, sinks as float32 data or None). alibi_slopes: an array
    or a Tensor that needs no gradient (ALiBi slopes are fixed, as in flash-attn); sinks: an array or a
    Tensor, cast to float32 for flashcupy (its gradient is cast back to the Tensor's dtype)."""
    if isinstance(alibi_slopes, Tensor):
        if alibi_slopes.requires_grad:
            raise ValueError("alibi_slopes: expected fixed slopes (a Tensor without requires_grad, or an array); "
                             "flashcupy computes no gradient for them (as flash-attn)")
        alibi_slopes = alibi_slopes.data
    if sinks is None:
        return alibi_slopes, None, None
    sinks = _as_tensor(sinks)
    return alibi_slopes, sinks, sinks.data.astype(np.float32, copy=False)


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, dtype=None, dropout_p=0.0, seed=None,
                    block_mask=None, deterministic=False, allow_tf32=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, sinks=None):
    """Attention through flashcupy's flash_attn_forward / flash_attn_backward (O(N) memory).

    q (batch, seqlen_q, nheads, head_dim); k, v (batch, seqlen_k, nheads_k, head_dim), nheads a multiple of
    nheads_k (MQA/GQA). Returns out (batch, seqlen_q, nheads, head_dim) in q's dtype.
    dtype: the dtype attention runs in (default q's); q, k, v and the incoming gradient are cast to it,
        and dq, dk, dv are cast back to each input's dtype. On the GPU, bfloat16 / float16 run the
        fused kernels.
    causal, softmax_scale, dropout_p, seed, deterministic, allow_tf32: as flashcupy.flash_attn_forward / _backward
        (causal is aligned bottom-right when seqlen_q != seqlen_k; with dropout, seed picks the
        keep-mask, default the next state of flashcupy.dropout's generator, and the backward reuses it).
    block_mask: a flashcupy.blocksparse.BlockMask, passed through to flashcupy.
    window_size, softcap, alibi_slopes: as flashcupy.flash_attn_forward (sliding window, tanh
        soft-capping, ALiBi; slopes float32 (nheads,) or (batch, nheads), an array or a Tensor
        without requires_grad: no gradient, as flash-attn).
    sinks: learnable attention sinks, (nheads,), an array or a Tensor: with requires_grad it receives
        dsinks (flashcupy.flash_attn_backward's fourth result). Its data is cast to float32 for
        flashcupy (which takes float32 only) and the gradient back to its dtype.
    Only out and the logsumexp (batch, nheads, seqlen_q) are kept for the backward, which recomputes P.
    """
    q, k, v = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    alibi_slopes, sinks, sinks_data = _feature_inputs(alibi_slopes, sinks)
    run = _attention_dtype(q, dtype)
    extra = {}
    if block_mask is not None:
        extra["block_mask"] = block_mask
    if allow_tf32:
        extra["allow_tf32"] = True
    qd, kd, vd = (t.data.astype(run, copy=False) for t in (q, k, v))
    fwd = flash_attn_forward(qd, kd, vd, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, seed=seed,
                             window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks_data,
                             **extra)

    def backward(g):
        # forward=fwd: the backward repeats the forward's options and rng_state and checks out, lse are its own
        dq, dk, dv, *dsinks = flash_attn_backward(g.astype(run, copy=False), qd, kd, vd, forward=fwd,
                                                  deterministic=deterministic)
        _accumulate(q, dq)
        _accumulate(k, dk)
        _accumulate(v, dv)
        if sinks is not None:
            _accumulate(sinks, dsinks[0])

    parents = (q, k, v) if sinks is None else (q, k, v, sinks)
    return _make(fwd.out.astype(q.dtype, copy=False), parents, backward)


def naive_attention(q, k, v, *, causal=False, softmax_scale=None, dtype=None, dropout_p=0.0, seed=None,
                    block_mask=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None):
    """Attention as matmul, softmax, matmul, materialising P (batch, nheads, seqlen_q, seqlen_k).

    Same arguments, layout and results as flash_attention (the comparison path). In dtype T: every
    matmul (two forward, three backward) reads T operands, accumulates in float32 (float64 for float64)
    and rounds its result to T; the softmax and its gradient are computed in float32 and P is rounded
    to T before it multiplies v. P is kept, in float32, for the backward. bfloat16 matmuls run as float32
    GEMMs on the bf16 values, rounded back to bf16 (CuPy has no bf16 GEMM; the numbers are those of a
    bf16 GEMM with float32 accumulation, up to summation order). Causal is aligned bottom-right; a query
    row with no visible key gives 0, as flashcupy.
    dropout_p, seed: the keep-mask is flashcupy.dropout.keep_mask, the very mask the flash op uses for
    the same seed, so both ops compute the same function; the (Sq, Sk) mask is kept for the backward.
    block_mask: a flashcupy.blocksparse.BlockMask, applied through its element_mask (keys outside the
    active blocks are masked like the causal ones).
    window_size, softcap, alibi_slopes, sinks: as flash_attention, in the softmax's dtype (float32;
    float64 for float64): the score modifier is flashcupy.reference's (flashcupy._features.score_mod),
    the window joins the causal mask (flashcupy._mask), the sink joins each row's denominator, and
    dsinks = -sum over (batch, query) of P_sink * rowsum(P o dP). Not validated beyond their shapes
    (the flash op validates).
    """
    dropout_p = check_dropout_p(dropout_p)
    q, k, v = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    alibi_slopes, sinks, _ = _feature_inputs(alibi_slopes, sinks)
    xp = q.xp
    run = _attention_dtype(q, dtype)
    acc = np.dtype(np.float64) if run == np.float64 else np.dtype(np.float32)  # softmax dtype
    mm = np.dtype(np.float32) if run == bfloat16() else run  # the dtype the GEMMs run in
    batch, seqlen_q, nheads, head_dim = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    if nheads % nheads_k or k.shape != v.shape:
        raise ValueError(f"naive_attention: expected k, v of one shape with nheads_k dividing {nheads}, "
                         f"got k {k.shape}, v {v.shape}")
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)

    def in_t(x):  # the value x has as a T tensor, held in the GEMM dtype
        return x.astype(run, copy=False).astype(mm, copy=False)

    # Heads grouped as (B, Hk, G, S, D): k and v broadcast over the G query heads that share them (GQA).
    def grouped(x):  # (B, S, H, D) -> (B, Hk, G, S, D)
        b, s, h, d = x.shape
        return in_t(x).reshape(b, s, nheads_k, h // nheads_k, d).transpose(0, 2, 3, 1, 4)

    qg = grouped(q.data)  # (B, Hk, G, Sq, D)
    kg = in_t(k.data).transpose(0, 2, 1, 3)[:, :, None]  # (B, Hk, 1, Sk, D)
    vg = in_t(v.data).transpose(0, 2, 1, 3)[:, :, None]  # (B, Hk, 1, Sk, D)
    group = nheads // nheads_k

    def per_head(x):  # (H,) or (B, H) -> (B | 1, Hk, G, 1, 1) in the softmax dtype
        x = xp.asarray(x).astype(acc, copy=False)
        return x.reshape(1 if x.ndim == 1 else x.shape[0], nheads_k, group, 1, 1)

    s = in_t(qg @ kg.swapaxes(-1, -2)).astype(acc, copy=False) * scale  # (B, Hk, G, Sq, Sk)
    s, tanh_s = _features.score_mod(xp, s, float(softcap), None if alibi_slopes is None else per_head(alibi_slopes),
                                    xp.arange(seqlen_q), xp.arange(seqlen_k), seqlen_q, seqlen_k)
    band = _mask.visible(xp, xp.arange(seqlen_q), xp.arange(seqlen_k), seqlen_q, seqlen_k, causal, tuple(window_size))
    if band is not None:
        s = xp.where(band, s, -xp.inf)
    if block_mask is not None:
        block_mask.check(batch, nheads, seqlen_q, seqlen_k)
        visible = block_mask.element_mask(seqlen_q, seqlen_k, xp=xp)  # (B | 1, H | 1, Sq, Sk)
        visible = xp.broadcast_to(visible, (visible.shape[0], nheads, seqlen_q, seqlen_k))
        s = xp.where(visible.reshape(visible.shape[0], nheads_k, nheads // nheads_k, seqlen_q, seqlen_k), s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    sink = None if sinks is None else per_head(sinks.data)  # (1, Hk, G, 1, 1)
    if sink is not None:
        m = xp.maximum(m, sink)
    m = xp.where(m == -xp.inf, 0.0, m)  # rows with no visible key: keep exp finite, P = 0
    p = xp.exp(s - m)
    del s
    denom = p.sum(axis=-1, keepdims=True)
    if sink is not None:  # the sink joins the denominator, without a value
        denom = denom + xp.exp(sink - m)
    denom = xp.where(denom > 0, denom, 1.0)
    p /= denom  # (B, Hk, G, Sq, Sk), float32
    p_sink = None if sink is None else xp.exp(sink - m) / denom  # (B, Hk, G, Sq, 1)
    keep = None
    if dropout_p:  # keep / (1 - p_eff), (B, Hk, G, Sq, Sk); P stays undropped for the softmax backward
        seed, offset = (_dropout.default_generator.next_state() if seed is None
                        else _dropout.check_rng_state("seed", seed))
        mask = _dropout.keep_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, dropout_p, xp=xp)
        keep = mask.reshape(p.shape) * (1.0 / (1.0 - _dropout.effective_dropout_p(dropout_p)))
        keep = keep.astype(acc, copy=False)
    p_dropped = p if keep is None else p * keep
    out = in_t(in_t(p_dropped) @ vg)  # (B, Hk, G, Sq, D)
    del p_dropped

    def ungroup(x):  # (B, Hk, G, Sq, D) -> (B, Sq, H, D)
        return x.transpose(0, 3, 1, 2, 4).reshape(batch, seqlen_q, nheads, head_dim)

    def backward(g):
        gg = grouped(g)  # dO, (B, Hk, G, Sq, D)
        if v.requires_grad:
            p_dropped = p if keep is None else p * keep
            dv = in_t(in_t(p_dropped).swapaxes(-1, -2) @ gg).sum(axis=2, dtype=acc)  # (B, Hk, Sk, D)
            del p_dropped
            _accumulate(v, dv.transpose(0, 2, 1, 3))
        dp = in_t(gg @ vg.swapaxes(-1, -2)).astype(acc, copy=False)  # (B, Hk, G, Sq, Sk)
        if keep is not None:
            dp *= keep
        delta = (p * dp).sum(axis=-1, keepdims=True)  # D = rowsum(P o dP)
        ds = p * (dp - delta)  # softmax backward
        del dp
        if sinks is not None and sinks.requires_grad:  # the sink column's dS = P_sink (0 - D)
            _accumulate(sinks, (-(p_sink * delta).sum(axis=(0, 3, 4))).reshape(nheads).astype(sinks.dtype))
        ds = in_t(_features.softcap_grad(ds, tanh_s) * scale)
        if q.requires_grad:
            _accumulate(q, ungroup(in_t(ds @ kg)))
        if k.requires_grad:
            dk = in_t(ds.swapaxes(-1, -2) @ qg).sum(axis=2, dtype=acc)  # (B, Hk, Sk, D)
            _accumulate(k, dk.transpose(0, 2, 1, 3))

    parents = (q, k, v) if sinks is None else (q, k, v, sinks)
    return _make(ungroup(out).astype(q.dtype, copy=False), parents, backward)
