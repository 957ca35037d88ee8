"""The fp16 / bf16 mma.sync kernels (cuda/flash_fwd.cu, cuda/flash_bwd.cu) on the emulator: flashcupy._gpu's
real launch code with NumPy arrays (emu.install_mma16), forward and backward, checked by DESIGN.md's rule.
Cases: flashcupy.testing.Case reprs (as a fuzz failure prints them; their score features and layout), or
the built-in list. --deterministic: the dQ-kernel backward. --varlen: the packed-sequence forward
(flashcupy._gpu.forward_varlen) on VARLEN_CASES instead. EMU_ARCH_NAME (default sm_80) picks the
device whose configs are chosen. See README.md.

    python bench/simt_emu/run_mma16_cases.py ["Case(batch=1, ...)" ...]
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emu  # noqa: E402

g = emu.install_mma16(os.environ.get("EMU_ARCH_NAME", "sm_80"))
from flashcupy import testing  # noqa: E402
from flashcupy._validate import check_features, check_qkv  # noqa: E402
from flashcupy.interface import sink_grad  # noqa: E402

CASES = [
    # plain, one query tile and a key tail, causal with seqlen_q > seqlen_k (empty rows)
    "Case(batch=1, seqlen_q=37, seqlen_k=45, nheads=2, nheads_k=1, head_dim=64, dtype='float16', causal=False, "
    "softmax_scale=None, seed=1)",
    "Case(batch=1, seqlen_q=70, seqlen_k=30, nheads=2, nheads_k=2, head_dim=64, dtype='bfloat16', causal=True, "
    "softmax_scale=None, seed=2)",
    # the 2026-12-04 key-tail bug (the atomic-dQ kernels, head_dim 128 / 256): ALiBi over one key, softcap
    # over five; dq NaN before the fix
    "Case(batch=1, seqlen_q=140, seqlen_k=1, nheads=2, nheads_k=1, head_dim=128, dtype='float16', causal=False, "
    "softmax_scale=None, seed=3, alibi_slopes=(0.9, 0.6), distribution='large')",
    "Case(batch=1, seqlen_q=40, seqlen_k=5, nheads=1, nheads_k=1, head_dim=256, dtype='float16', causal=False, "
    "softmax_scale=None, seed=4, softcap=30.0, distribution='large')",
    # causal, GQA, several key tiles, bf16 hd128 (atomic dQ), a left window with ALiBi and sinks
    "Case(batch=2, seqlen_q=130, seqlen_k=150, nheads=4, nheads_k=2, head_dim=128, dtype='bfloat16', causal=True, "
    "softmax_scale=None, seed=5)",
    "Case(batch=1, seqlen_q=60, seqlen_k=200, nheads=2, nheads_k=2, head_dim=64, dtype='float16', causal=False, "
    "softmax_scale=0.2, seed=6, window_size=(50, 10), alibi_slopes=(0.3, 0.1), sinks=(0.5, -1.0))",
]

# varlen (FEAT_VARLEN): (query lengths, key lengths, nheads, nheads_k, head_dim, dtype, causal, features)
VARLEN_CASES = [
    ((5, 0, 70, 1, 33), (9, 4, 64, 0, 33), 2, 1, 64, "float16", False, {}),
    ((40, 3, 65), (20, 3, 130), 2, 2, 128, "bfloat16", True, {}),
    ((17, 0, 50), (60, 8, 0), 4, 2, 64, "float16", True,
     dict(window_size=(10, -1), alibi_slopes=(0.5, 0.3, 0.2, 0.1), sinks=(0.2, -0.5, 1.0, 0.0))),
    ((12, 30), (12, 30), 2, 1, 256, "float16", False, dict(softcap=5.0)),
    # several query tiles per sequence (BLOCK_M 128), sequences starting mid-tile in the packed rows
    ((300, 129, 0, 257), (280, 300, 10, 1), 2, 1, 128, "bfloat16", True, {}),
    ((300, 129, 0, 257), (280, 300, 10, 1), 2, 2, 64, "float16", False, dict(window_size=(64, 32))),
]


def run_varlen(case, rng):
    """One packed batch through _gpu.forward_varlen; each sequence by the dense rule against the oracle,
    and lse's (nheads, total_q) layout against the CPU path's."""
    import flashcupy
    from flashcupy._arrays import bfloat16

    lens_q, lens_k, h, hk, d, dtype, causal, feats = case
    dt = bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((int(cu_q[-1]), h, d)).astype(dt)
    k = rng.standard_normal((int(cu_k[-1]), hk, d)).astype(dt)
    v = rng.standard_normal((int(cu_k[-1]), hk, d)).astype(dt)
    feats = {n: (np.asarray(x, np.float32) if isinstance(x, tuple) and n != "window_size" else x)
             for n, x in feats.items()}
    shape1 = check_qkv(q[None], k[None], v[None], None)
    shape = type(shape1)(len(lens_q), max(lens_q), max(lens_k), h, hk, d, shape1.softmax_scale)
    features = check_features(np, q, shape, causal=causal, **feats)
    emu.launches.clear()
    out, lse = g.forward_varlen(q, k, v, cu_q, cu_k, None, shape, causal=causal, features=features)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0]) and lse.dtype == np.float32
    worst = 0.0
    for b in range(len(lens_q)):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no key: out 0, lse -inf (the sink with sinks)
            assert not out[q0:q1].astype(np.float32).any()
            want = -np.inf if "sinks" not in feats else feats["sinks"][:, None]
            assert np.array_equal(lse[:, q0:q1], np.broadcast_to(want, lse[:, q0:q1].shape).astype(np.float32))
            continue
        r = testing.assert_forward_rule(out[q0:q1][None], lse[:, q0:q1][None], q[q0:q1][None], k[k0:k1][None],
                                        v[k0:k1][None], causal=causal, **feats)
        worst = max(worst, *(x.worst for x in r.values()))
    cpu = flashcupy.flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, **feats)
    fin = np.isfinite(cpu.lse)
    assert np.array_equal(np.isfinite(lse), fin) and np.abs(lse[fin] - cpu.lse[fin]).max() < 1e-2
    return worst


args = sys.argv[1:]
deterministic = "--deterministic" in args
if "--varlen" in args:
    rng = np.random.default_rng(0)
    worst = 0.0
    for case in VARLEN_CASES:
        w = run_varlen(case, rng)
        worst = max(worst, w)
        print(f"ok varlen (worst {w:.3f}) {case}  [{emu.launches[-1][0][:70]}]", flush=True)
    print(f"done: {len(VARLEN_CASES)} varlen cases, worst error / bound {worst:.3f}")
    sys.exit(0)
texts = [a for a in args if not a.startswith("--")] or CASES
worst = 0.0
for text in texts:
    case, (q, k, v, do), feats, xs, shape, features = emu.fuzz_case(text)
    emu.launches.clear()
    out, lse = g.forward(*xs[:3], shape, causal=case.causal, features=features)
    kw = dict(causal=case.causal, softmax_scale=case.softmax_scale, **feats)
    ratios = testing.assert_forward_rule(out, lse, q, k, v, **kw)
    grads = g.backward(xs[3], *xs[:3], out, lse, shape, causal=case.causal, deterministic=deterministic,
                       features=features)
    if features.sinks is not None:
        grads = (*grads, sink_grad(np, xs[3], out, lse, features.sinks))
    ratios.update(testing.assert_backward_rule(grads, do, q, k, v, **kw))
    w = max(r.worst for r in ratios.values())
    worst = max(worst, w)
    names = sorted({n.split("<")[0].replace("flash_", "").replace("_kernel", "") for n, *_ in emu.launches})
    print(f"ok (worst {w:.3f}) {text[:100]}...  [{'; '.join(names)}]", flush=True)
print(f"done: {len(texts)} cases, worst error / bound {worst:.3f}")
