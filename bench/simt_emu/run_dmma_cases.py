"""The tensor-core kernels (cuda/flash_dmma_*.cu) on the emulator: float64 (DMMA) by default, float32 with
allow_tf32 (TF32) with --tf32. Every case of the list below (or dtype-free case strings
batch,seqlen_q,seqlen_k,nheads,nheads_k,head_dim,causal,bhsd[,scale0]), forward + backward, against the
oracle by DESIGN.md's rule (float64: relative error <= 1e-12; TF32: the TF32 naive reference of
tests/helpers.py, tf32=True), plus the worst relative error seen. EMU_ARCH=80 or 90 (default) picks
that GPU's configs. See README.md."""
import os, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import emu
g = emu.install()
from flashcupy._validate import check_qkv
from flashcupy import reference
from helpers import assert_forward_rule, assert_backward_rule, random_inputs

CASES = [
    "1,37,45,2,1,64,0,0", "1,37,45,2,1,64,1,0", "2,70,30,4,2,64,1,1",   # Sq > Sk: empty causal rows
    "1,1,77,2,2,64,1,0", "1,33,100,3,3,32,1,0", "1,50,50,2,1,40,0,1",    # seqlen_q 1, hd32, hd40 (bucket 64)
    "1,45,61,2,1,128,1,0", "1,20,33,2,2,96,0,0", "1,24,40,2,1,256,1,0",  # 8-row warps (fp64), d_split 2
    "1,19,23,2,1,200,0,0", "1,65,65,2,2,64,1,0,1",                       # hd200 (bucket 224), scale 0
]
TF32_CASES = ["1,29,70,2,1,160,1,0",    # the 192 backward (d_split 2)
              "1,130,150,1,1,128,0,0"]  # several query and key tiles


def bhsd(x):
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    assert (np.isneginf(got) == np.isneginf(want)).all()
    return float(np.abs(got[fin] - want[fin]).max() / max(np.abs(want[fin]).max(), 1e-300))


args = sys.argv[1:]
tf32 = "--tf32" in args
args = [a for a in args if a != "--tf32"]
dtype = np.float32 if tf32 else np.float64
rng = np.random.default_rng(0)
worst = 0.0
for spec in args or CASES + (TF32_CASES if tf32 else []):
    a = [int(x) for x in spec.split(",")]
    b, sq, sk, h, hk, d, causal, view = a[:8]
    scale = 0.0 if len(a) > 8 and a[8] else None
    causal = bool(causal)
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    xs = [bhsd(x) for x in (q, k, v, do)] if view else [q, k, v, do]
    shape = check_qkv(*xs[:3], softmax_scale=scale)
    emu.launches.clear()
    out, lse = g.forward(*xs[:3], shape, causal=causal, allow_tf32=tf32)
    assert_forward_rule(out, lse, q, k, v, causal=causal, softmax_scale=scale, tf32=tf32)
    grads = g.backward(xs[3], *xs[:3], out, lse, shape, causal=causal, deterministic=False, allow_tf32=tf32)
    assert_backward_rule(grads, do, q, k, v, causal=causal, softmax_scale=scale, tf32=tf32)
    ref = reference.attention_forward(q, k, v, causal=causal, softmax_scale=scale)
    rg = reference.attention_backward(do, q, k, v, causal=causal, softmax_scale=scale)
    errs = [rel_err(out, ref[0]), rel_err(lse, ref[1])] + [rel_err(x, y) for x, y in zip(grads, rg)]
    worst = max(worst, *errs)
    names = [n.replace("flash_", "").replace("_kernel", "") for n, *_ in emu.launches]
    print(f"ok {spec}: rel err out/lse/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs) + f"  [{'; '.join(names)}]",
          flush=True)
print(f"worst relative error {worst:.2e}")
