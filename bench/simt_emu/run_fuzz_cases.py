"""flashcupy fuzz cases (testing.Case reprs, as a failure prints them) through the fp32 / fp64 kernels
(cuda/flash_simt_*.cu, flash_dmma_*.cu) on the emulator, with the case's score features and memory
layout, checked as `flashcupy fuzz --case` checks them (forward and backward by DESIGN.md's rule).
--tf32: float32 cases on the TF32 kernels (allow_tf32). Prints each tensor's ratios, and with --lse the
worst LSE rows (kernel, oracle, naive). See README.md.

    python bench/simt_emu/run_fuzz_cases.py [--tf32] [--lse] "Case(batch=1, ...)" ...
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emu  # noqa: E402

g = emu.install()
from flashcupy import testing  # noqa: E402
from flashcupy.interface import sink_grad  # noqa: E402

args = sys.argv[1:]
tf32 = "--tf32" in args
show_lse = "--lse" in args
texts = [a for a in args if not a.startswith("--")]
for text in texts:
    case, (q, k, v, do), feats, xs, shape, features = emu.fuzz_case(text)
    t = tf32 and case.dtype == "float32"
    emu.launches.clear()
    out, lse = g.forward(*xs[:3], shape, causal=case.causal, allow_tf32=t, features=features)
    kw = dict(causal=case.causal, softmax_scale=case.softmax_scale, tf32=t, **feats)
    fwd = testing.forward_rule_inputs(q, k, v, **kw)
    for name, got in (("out", out), ("lse", lse)):
        r = testing.rule_ratios(name, got, **fwd[name])
        print(f"{name}: max {r.max:.3g} rms {r.rms:.3g} bias {r.bias:.3g}")
    if show_lse:
        ref = fwd["lse"]["oracle"]
        nv = fwd["lse"]["naive"]
        nv = nv[0] if isinstance(nv, list) else nv
        err = np.abs(lse.astype(np.float64) - ref)
        err = np.where(np.isfinite(ref), err, 0)
        for i in np.argsort(err.ravel())[::-1][:3]:
            ix = np.unravel_index(i, err.shape)
            print(f"  lse{ix}: kernel {lse[ix]:.9g} oracle {ref[ix]:.9g} naive {nv[ix]:.9g} "
                  f"err {err[ix]:.3g} naive err {abs(nv[ix] - ref[ix]):.3g}")
    grads = g.backward(xs[3], *xs[:3], out, lse, shape, causal=case.causal, deterministic=False, allow_tf32=t,
                       features=features)
    if features.sinks is not None:
        grads = (*grads, sink_grad(np, xs[3], out, lse, features.sinks))
    bwd = testing.backward_rule_inputs(do, q, k, v, **kw)
    for name, got in zip(bwd, grads):
        r = testing.rule_ratios(name, got, **bwd[name])
        print(f"{name}: max {r.max:.3g} rms {r.rms:.3g} bias {r.bias:.3g}")
    names = [n.replace("flash_", "").replace("_kernel", "") for n, *_ in emu.launches]
    print(f"-- {text[:90]}...  [{'; '.join(names)}]", flush=True)
