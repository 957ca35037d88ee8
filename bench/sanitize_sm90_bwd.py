"""One small call of every Hopper-backward specialization (flashcupy._gpu_sm90_bwd.SWEEP x fp16/bf16 x
causal, and the deterministic kernels of config_for's tiles), for compute-sanitizer (issue 15):

    bash bench/device_ab.sh sanitize bench/sanitize_sm90_bwd.py

Shapes with ragged tails (seqlen_q 200, seqlen_k 333: partial query and key tiles, TMA boxes past the
end) and GQA (4 query heads over 2 KV heads: the float32 dK/dV rows); the forward runs on the mma.sync
path (FLASHCUPY_SM90 untouched: the Hopper forward is sanitized by bench/sanitize_sm90.py); every
gradient is checked finite.
"""

import numpy as np


def main():
    import cupy as cp

    from flashcupy import _gpu, _gpu_sm90_bwd
    from flashcupy._arrays import bfloat16
    from flashcupy._validate import check_qkv

    rng = np.random.default_rng(0)
    for elem, causal, det, cfg in _gpu_sm90_bwd.all_specializations(deterministic=True):
        dtype = cp.float16 if elem == "Fp16" else bfloat16()
        q, k, v, do = (cp.asarray(rng.standard_normal((1, s, h, cfg.head_dim)).astype(np.float32)).astype(dtype)
                       for s, h in ((200, 4), (333, 2), (333, 2), (200, 4)))
        shape = check_qkv(q, k, v)
        out, lse = _gpu.forward(q, k, v, shape, causal=causal)
        grads = _gpu.backward(do, q, k, v, out, lse, shape, causal=causal, deterministic=det, config=cfg)
        cp.cuda.Device().synchronize()
        for name, x in zip(("dq", "dk", "dv"), grads):
            assert bool(cp.isfinite(x.astype(cp.float32)).all()), (name, elem, causal, det, cfg)
        print(f"ok {cfg.kernel_name(elem, causal, det)}", flush=True)


if __name__ == "__main__":
    main()
