"""Cases on the command line: dtype(f|d),batch,seqlen_q,seqlen_k,nheads,nheads_k,head_dim,causal(0|1),deterministic(0|1)."""
import sys, numpy as np
import os
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import emu
g = emu.install()
from flashcupy._validate import check_qkv
from helpers import assert_forward_rule, assert_backward_rule, random_inputs
rng = np.random.default_rng(0)
def case(dtype, b, sq, sk, h, hk, d, causal, det=False, bwd=True):
    q, k, v, do = random_inputs(rng, b, sq, sk, h, hk, d, dtype, grad=True)
    shape = check_qkv(q, k, v)
    out, lse = g.forward(q, k, v, shape, causal=causal)
    assert_forward_rule(out, lse, q, k, v, causal=causal)
    if bwd:
        grads = g.backward(do, q, k, v, out, lse, shape, causal=causal, deterministic=det)
        assert_backward_rule(grads, do, q, k, v, causal=causal)
    print("ok", dtype.__name__, b, sq, sk, h, hk, d, causal, det, flush=True)
import itertools
for args in sys.argv[1:]:
    a = args.split(",")
    case(np.float32 if a[0] == "f" else np.float64, *map(int, a[1:7]), a[7] == "1", a[8] == "1")
