"""Candidate (non-default) configs on the emulator, forward and/or backward against the oracle
(DESIGN.md's rule), before they are timed on a GPU (bench/bench_simt.py --sweep). Each argument:

    fwd:f,HEAD_DIM,BLOCK_M,BLOCK_N,NWARPS,MIN_CTAS                      SimtFwdConfig (float32 'f' / float64 'd')
    dmma_bwd:HEAD_DIM,KBM,KBN,KNW,SPLIT,QBM,QBN,QNW,KKATOM,QKATOM,STAGES  DmmaBwdConfig

Each config runs a few shapes that exercise its tiles: several query / key tiles, a ragged last
tile, causal with Sq > Sk (empty rows), GQA. See README.md for ASan."""
import os, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import emu
g = emu.install()
from flashcupy._configs import DmmaBwdConfig, SimtFwdConfig, dmma_fwd_config
from flashcupy._validate import check_qkv
from helpers import assert_forward_rule, assert_backward_rule, random_inputs

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, causal)
SHAPES = [(1, 70, 61, 2, 1, False), (1, 45, 77, 2, 2, True), (1, 80, 40, 2, 1, True)]


def run(spec):
    kind, rest = spec.split(":")
    a = rest.split(",")
    rng = np.random.default_rng(0)
    for b, sq, sk, h, hk, causal in SHAPES:
        if kind == "fwd":
            dtype = np.float32 if a[0] == "f" else np.float64
            hd = int(a[1])
            cfg = SimtFwdConfig("float" if a[0] == "f" else "double", hd, *map(int, a[2:6]))
            q, k, v = random_inputs(rng, b, sq, sk, h, hk, hd - 8, dtype)  # hd - 8: a head_dim inside the bucket
            out, lse = g.forward(q, k, v, check_qkv(q, k, v), causal=causal, config=cfg)
            assert_forward_rule(out, lse, q, k, v, causal=causal)
        elif kind == "dmma_bwd":
            c = list(map(int, a))
            hd, cfg = c[0], DmmaBwdConfig(*c)
            q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, hd - 8, np.float64, grad=True)
            shape = check_qkv(q, k, v)
            out, lse = g.forward(q, k, v, shape, causal=causal, config=dmma_fwd_config(hd, causal, 80))
            grads = g.backward(do, q, k, v, out, lse, shape, causal=causal, deterministic=False, config=cfg)
            assert_backward_rule(grads, do, q, k, v, causal=causal)
        else:
            raise SystemExit(f"unknown kind {kind}")
        print(f"ok {spec} {(b, sq, sk, h, hk, causal)}", flush=True)


for spec in sys.argv[1:]:
    run(spec)
