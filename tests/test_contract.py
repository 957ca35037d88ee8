"""The backward checks the forward's contract (issue 13, item 9).

flash_attn_forward returns AttnForward(out, lse, rng_state), a 3-tuple that also carries .options (an
AttnOptions: causal, softmax_scale as resolved, dropout_p, block_mask, allow_tf32).
flash_attn_backward(dout, q, k, v, forward=fwd) repeats those options and raises ValueError naming the
argument when one given explicitly differs, or when out, lse or rng_state is not the forward's. The
matching call gives the same bits as the flash-attn style call that repeats every option by hand.
"""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
from helpers import random_inputs, same_bits

from flashcupy import AttnForward, AttnOptions, BlockMask, flash_attn_backward, flash_attn_forward
from flashcupy import tape as T

B, SQ, SK, H, HK, D = 2, 130, 100, 4, 2, 8


def msg(*parts):
    return ".*".join(re.escape(p) for p in parts)


def inputs(dtype=np.float32, seed=0, head_dim=D):
    return random_inputs(np.random.default_rng(seed), B, SQ, SK, H, HK, head_dim, dtype, grad=True)


def a_mask(seed=0, blocks=(64, 64)):
    m = np.random.default_rng(seed).random((H, -(-SQ // blocks[0]), -(-SK // blocks[1]))) < 0.6
    m[:, :, 0] = True
    return BlockMask(m, *blocks)


MASK = a_mask()
# forward options, the backward's flash-attn style repetition of them (rng_state added per call)
CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "scale": dict(softmax_scale=0.2, causal=True),
    "scale0": dict(softmax_scale=0.0),
    "dropout": dict(dropout_p=0.17, causal=True),
    "block_mask": dict(block_mask=MASK, causal=True),
    "everything": dict(block_mask=MASK, dropout_p=0.1, softmax_scale=0.5, causal=True),
}


def _forward(q, k, v, kw):
    return flash_attn_forward(q, k, v, seed=(5, 6) if kw.get("dropout_p") else None, **kw)


# ---------------------------------------------------------------------------------------------------
# the record


def test_attn_forward_unpacks_as_three_and_carries_the_options():
    q, k, v, _ = inputs()
    fwd = flash_attn_forward(q, k, v, causal=True, dropout_p=0.1, seed=3, block_mask=MASK)
    out, lse, rng_state = fwd  # the unpacking every caller uses
    assert isinstance(fwd, tuple) and len(fwd) == 3 and fwd[0] is out and fwd[1] is lse and fwd[2] == (3, 0)
    assert (fwd.out, fwd.lse, fwd.rng_state) == (out, lse, rng_state)
    assert fwd.options == AttnOptions(causal=True, softmax_scale=D**-0.5, dropout_p=0.1, block_mask=MASK,
                                      allow_tf32=False)
    assert "options=AttnOptions(causal=True" in repr(fwd)


def test_records_are_immutable_and_pickle_with_their_options():
    q, k, v, _ = inputs()
    fwd = flash_attn_forward(q, k, v, softmax_scale=0.3)
    for name in ("options", "out", "anything"):
        with pytest.raises(AttributeError):
            setattr(fwd, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fwd.options.causal = True
    back = pickle.loads(pickle.dumps(fwd))
    assert back.options == fwd.options and same_bits(back.out, fwd.out) and back.rng_state is None


def test_empty_problem_records_options_too():
    q, k, v, do = random_inputs(np.random.default_rng(0), 1, 0, 5, 2, 2, 8, np.float32, grad=True)
    fwd = flash_attn_forward(q, k, v, causal=True)
    assert fwd.options.causal is True
    with pytest.raises(ValueError, match=msg("causal: expected the forward's causal=True", "got False")):
        flash_attn_backward(do, q, k, v, forward=fwd, causal=False)


# ---------------------------------------------------------------------------------------------------
# the matching call: the same bits as repeating the options by hand


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_forward_record_gives_the_bits_of_the_flash_attn_style_call(case, dtype):
    q, k, v, do = inputs(dtype)
    kw = CASES[case]
    fwd = _forward(q, k, v, kw)
    want = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, rng_state=fwd.rng_state, **kw)
    for got in (flash_attn_backward(do, q, k, v, forward=fwd),
                flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, forward=fwd),  # out, lse: the forward's own
                flash_attn_backward(do, q, k, v, forward=fwd, rng_state=fwd.rng_state, **kw)):  # all repeated
        assert all(same_bits(g, w) for g, w in zip(got, want))


def test_equal_values_are_not_mismatches():
    """Explicit options equal to the forward's pass: softmax_scale None vs the resolved default, an int
    seed vs its (seed, 0) pair, an equal BlockMask built anew, views of out and lse over the same memory."""
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v, dropout_p=0.1, seed=9, block_mask=MASK, causal=np.bool_(True))
    want = flash_attn_backward(do, q, k, v, forward=fwd)
    got = flash_attn_backward(do, q, k, v, fwd.out[...], fwd.lse[:], forward=fwd, softmax_scale=D**-0.5,
                              dropout_p=np.float64(0.1), rng_state=9, block_mask=a_mask(), causal=True)
    assert all(same_bits(g, w) for g, w in zip(got, want))
    fwd2 = flash_attn_forward(q, k, v, softmax_scale=D**-0.5)
    flash_attn_backward(do, q, k, v, forward=fwd2, softmax_scale=None)


def test_allow_tf32_is_not_compared_where_it_changes_nothing():
    """On the CPU (and for every dtype but float32 on the GPU) allow_tf32 is ignored, so it is not a mismatch."""
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v, allow_tf32=True)
    assert fwd.options.allow_tf32 is True
    want = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse)
    got = flash_attn_backward(do, q, k, v, forward=fwd, allow_tf32=False)
    assert all(same_bits(g, w) for g, w in zip(got, want))


def test_the_tape_passes_the_forward_record(monkeypatch):
    """flashcupy.tape.flash_attention's backward goes through forward=, so it always gets the check."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return flash_attn_backward(*args, **kwargs)

    monkeypatch.setattr(T, "flash_attn_backward", spy)
    q, k, v, _ = (T.Tensor(x, requires_grad=True) for x in inputs())
    out = T.flash_attention(q, k, v, causal=True, block_mask=MASK, dropout_p=0.1, seed=4)
    out.sum().backward()
    (kw,) = seen
    assert isinstance(kw["forward"], AttnForward) and kw["forward"].options.block_mask is MASK
    assert kw["forward"].rng_state == (4, 0) and kw["forward"].options.causal is True
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---------------------------------------------------------------------------------------------------
# mismatches: ValueError naming the argument


@pytest.mark.parametrize("fwd_kw, bwd_kw, error", [
    (dict(causal=True), dict(causal=False), ("causal: expected the forward's causal=True", "got False")),
    (dict(), dict(causal=True), ("causal: expected the forward's causal=False", "got True")),
    (dict(softmax_scale=0.2), dict(softmax_scale=0.25),
     ("softmax_scale: expected the forward's softmax_scale=0.2 (as resolved)", "got 0.25")),
    (dict(softmax_scale=0.2), dict(softmax_scale=None),
     ("softmax_scale: expected the forward's softmax_scale=0.2", f"got None, i.e. head_dim ** -0.5 = {D**-0.5!r}")),
    (dict(), dict(softmax_scale=0.5), (f"softmax_scale: expected the forward's softmax_scale={D**-0.5!r}", "got 0.5")),
    (dict(dropout_p=0.1), dict(dropout_p=0.2), ("dropout_p: expected the forward's dropout_p=0.1", "got 0.2")),
    (dict(dropout_p=0.1), dict(dropout_p=0.0), ("dropout_p: expected the forward's dropout_p=0.1", "got 0.0")),
    (dict(), dict(dropout_p=0.1), ("dropout_p: expected the forward's dropout_p=0.0", "got 0.1")),
    (dict(block_mask=MASK), dict(block_mask=None), ("block_mask: expected the forward's block_mask", "got None")),
    (dict(), dict(block_mask=MASK), ("block_mask: expected the forward's block_mask", "None, got BlockMask(")),
    (dict(block_mask=MASK), dict(block_mask=a_mask(seed=1)), ("block_mask: expected the forward's block_mask",
                                                                "got BlockMask(")),
    (dict(block_mask=a_mask(blocks=(64, 64))), dict(block_mask=a_mask(blocks=(64, 128))),
     ("block_mask: expected the forward's block_mask", "block_k=128")),
], ids=["causal-dropped", "causal-added", "scale", "scale-none", "scale-default", "dropout", "dropout-dropped",
        "dropout-added", "mask-dropped", "mask-added", "mask-other-values", "mask-other-blocks"])
def test_option_mismatch(fwd_kw, bwd_kw, error):
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v, **fwd_kw)
    with pytest.raises(ValueError, match=msg(*error)):
        flash_attn_backward(do, q, k, v, forward=fwd, **bwd_kw)
    with pytest.raises(ValueError, match=msg(*error)):  # also when out and lse are passed along
        flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, forward=fwd, **bwd_kw)


@pytest.mark.parametrize("name", ["out", "lse"])
@pytest.mark.parametrize("other", ["copy", "another forward's", "a strided view"])
def test_out_or_lse_not_the_forwards(name, other):
    """Compared by identity / data pointer, shape and strides, never by value: a bitwise-equal copy is refused."""
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v)
    arrays = dict(out=fwd.out, lse=fwd.lse)
    if other == "copy":
        arrays[name] = arrays[name].copy()
    elif other == "another forward's":
        arrays[name] = getattr(flash_attn_forward(q, k, v), name)
    else:  # same data pointer and shape, other strides
        arrays[name] = np.lib.stride_tricks.as_strided(arrays[name], strides=(0,) * arrays[name].ndim)
    with pytest.raises(ValueError, match=msg(f"{name}: expected the forward's {name} (forward.{name}: the same array",
                                             "values are not compared", "got a different ndarray")):
        flash_attn_backward(do, q, k, v, arrays["out"], arrays["lse"], forward=fwd)


def test_rng_state_not_the_forwards():
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v, dropout_p=0.1, seed=(5, 6))
    with pytest.raises(ValueError, match=msg("rng_state: expected the forward's rng_state (5, 6)", "got (5, 7)")):
        flash_attn_backward(do, q, k, v, forward=fwd, rng_state=(5, 7))
    with pytest.raises(ValueError, match=msg("rng_state: expected the forward's rng_state (seed, offset)", "got None")):
        flash_attn_backward(do, q, k, v, forward=fwd, rng_state=None)


def test_rng_state_with_dropout_p_zero_is_a_mismatch():
    """An rng_state means the forward had dropout: with dropout_p=0 it raises, with or without forward=."""
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v)
    for call in (lambda: flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, rng_state=(1, 2)),
                 lambda: flash_attn_backward(do, q, k, v, forward=fwd, rng_state=(1, 2))):
        with pytest.raises(ValueError, match=msg("rng_state: expected None with dropout_p=0", "got (1, 2)")):
            call()
    drop = flash_attn_forward(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=msg("rng_state: expected None with dropout_p=0", f"got {drop.rng_state!r}")):
        flash_attn_backward(do, q, k, v, drop.out, drop.lse, rng_state=drop.rng_state)


@pytest.mark.parametrize("bad, got", [((None, None, None), "tuple"), ("fwd", "str"),
                                      ("by hand", "an AttnForward without options"),
                                      ("_replace", "an AttnForward without options")])
def test_forward_not_a_record_of_flash_attn_forward(bad, got):
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v)
    bad = {"by hand": AttnForward(fwd.out, fwd.lse, None), "_replace": fwd._replace(rng_state=None)}.get(bad, bad)
    with pytest.raises(TypeError, match=msg("forward: expected the AttnForward returned by flash_attn_forward",
                                            f"got {got}")):
        flash_attn_backward(do, q, k, v, forward=bad)


@pytest.mark.parametrize("name", ["out", "lse"])
def test_out_and_lse_needed_without_forward(name):
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v)
    arrays = dict(out=fwd.out, lse=fwd.lse)
    arrays[name] = None
    with pytest.raises(TypeError, match=msg(f"{name}: expected the forward's {name} (or forward=", "got None")):
        flash_attn_backward(do, q, k, v, **arrays)


def test_option_types_are_still_validated_with_forward():
    q, k, v, do = inputs()
    fwd = flash_attn_forward(q, k, v)
    with pytest.raises(TypeError, match=msg("causal: expected a bool", "got int")):
        flash_attn_backward(do, q, k, v, forward=fwd, causal=0)
    with pytest.raises(TypeError, match=msg("softmax_scale: expected a float", "got str")):
        flash_attn_backward(do, q, k, v, forward=fwd, softmax_scale="0.3")
    with pytest.raises(TypeError, match="block_mask: expected a flashcupy.blocksparse.BlockMask"):
        flash_attn_backward(do, q, k, v, forward=fwd, block_mask=np.ones((3, 2), bool))


# ---------------------------------------------------------------------------------------------------
# GPU: the same contract on CuPy arrays (the identity check reads data pointers, no host sync)


def _cp():
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "dropout", "block_mask", "everything"])
def test_gpu_forward_record_gives_the_bits_of_the_flash_attn_style_call(case):
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in inputs(np.float16, head_dim=64))
    kw = CASES[case]
    fwd = _forward(q, k, v, kw)
    want = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, rng_state=fwd.rng_state, deterministic=True, **kw)
    got = flash_attn_backward(do, q, k, v, forward=fwd, deterministic=True)
    assert all(isinstance(g, cp.ndarray) and same_bits(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match=msg("out: expected the forward's out", "got a different ndarray")):
        flash_attn_backward(do, q, k, v, fwd.out.copy(), forward=fwd)
    with pytest.raises(ValueError, match=msg("causal: expected the forward's causal=True", "got False")):
        flash_attn_backward(do, q, k, v, forward=fwd, causal=False)


@pytest.mark.gpu
def test_gpu_allow_tf32_is_compared_for_float32():
    """Where allow_tf32 changes the result (CuPy float32), a backward that differs from the forward raises."""
    cp = _cp()
    q, k, v, do = (cp.asarray(x) for x in inputs(np.float32, head_dim=64))
    fwd = flash_attn_forward(q, k, v, causal=True, allow_tf32=True)
    with pytest.raises(ValueError, match=msg("allow_tf32: expected the forward's allow_tf32=True", "got False")):
        flash_attn_backward(do, q, k, v, forward=fwd, allow_tf32=False)
    got = flash_attn_backward(do, q, k, v, forward=fwd)
    want = flash_attn_backward(do, q, k, v, fwd.out, fwd.lse, causal=True, allow_tf32=True)
    assert all(same_bits(g, w) for g, w in zip(got, want))
    half = flash_attn_forward(*(x.astype(cp.float16) for x in (q, k, v)), allow_tf32=True)  # ignored for fp16
    flash_attn_backward(do.astype(cp.float16), *(x.astype(cp.float16) for x in (q, k, v)), forward=half,
                        allow_tf32=False)
