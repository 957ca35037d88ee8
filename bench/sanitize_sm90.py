"""One small call of every Hopper-forward specialization (flashcupy._gpu_sm90.SWEEP x fp16/bf16 x
causal), for compute-sanitizer (issue 14):

    compute-sanitizer --tool memcheck  python3 bench/sanitize_sm90.py
    compute-sanitizer --tool racecheck python3 bench/sanitize_sm90.py
    compute-sanitizer --tool synccheck python3 bench/sanitize_sm90.py

Shapes with ragged tails (seqlen_q 200, seqlen_k 333: partial query and key tiles, TMA boxes past the
end) and GQA; every output is checked finite.
"""

import numpy as np


def main():
    import cupy as cp

    from flashcupy import _gpu, _gpu_sm90
    from flashcupy._arrays import bfloat16
    from flashcupy._validate import check_qkv

    rng = np.random.default_rng(0)
    for elem, causal, cfg in _gpu_sm90.all_specializations():
        dtype = cp.float16 if elem == "Fp16" else bfloat16()
        q, k, v = (cp.asarray(rng.standard_normal((1, s, h, cfg.head_dim)).astype(np.float32)).astype(dtype)
                   for s, h in ((200, 4), (333, 2), (333, 2)))
        out, lse = _gpu.forward(q, k, v, check_qkv(q, k, v), causal=causal, config=cfg)
        cp.cuda.Device().synchronize()
        assert bool(cp.isfinite(out.astype(cp.float32)).all()), (elem, causal, cfg)
        print(f"ok {cfg.kernel_name(elem, causal)}", flush=True)


if __name__ == "__main__":
    main()
