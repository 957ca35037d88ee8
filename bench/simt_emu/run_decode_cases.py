"""The split-KV decode kernels (cuda/flash_decode.cu) on the CPU emulator, through flashcupy/_gpu_decode.py's
own launch code, against the oracle over each row's visible cache prefix (DESIGN.md's rule).

    ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
        python bench/simt_emu/run_decode_cases.py            # the built-in case list

A case: dtype, batch, seqlen_q, nheads, nheads_k, head_dim, capacity, causal, paged, num_splits, features
(window / softcap / alibi). Every specialization builds once with g++ (about a minute under ASan)."""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
import emu  # noqa: E402

from flashcupy import _gpu_decode  # noqa: E402
from flashcupy._arrays import bfloat16  # noqa: E402
from flashcupy._validate import check_features, check_qkv  # noqa: E402
from helpers import assert_forward_rule  # noqa: E402

emu.install()  # flashcupy._gpu_simt's _xp / _launch (the decode launcher's too) and _params.data_ptr
_gpu_decode._sm_count = lambda: 4  # a small GPU: auto splits stay few on small caches

DT = {"f16": np.float16, "bf16": bfloat16(), "f32": np.float32, "f64": np.float64}


def case(rng, dt, batch, sq, h, hk, d, cap, causal, paged, splits, feat):
    dtype = DT[dt]
    page = 16
    q = rng.standard_normal((batch, sq, h, d)).astype(dtype)
    k = rng.standard_normal((batch, cap, hk, d)).astype(dtype)
    v = rng.standard_normal((batch, cap, hk, d)).astype(dtype)
    lens = rng.integers(0, cap + 1, batch).astype(np.int32)
    lens[0] = cap
    if batch > 2:
        lens[1] = 0
        lens[2] = min(2, cap)  # causal with seqlen_q > 2: its first rows see no key
    kw = {}
    if "window" in feat:
        kw["window_size"] = (int(rng.integers(0, cap)), -1 if not causal else 0)
    if "softcap" in feat:
        kw["softcap"] = 3.0
    if "alibi" in feat:
        kw["alibi_slopes"] = rng.uniform(0.05, 0.5, (batch, h)).astype(np.float32)
    view = np.zeros((batch, 0, hk, d), dtype)
    shape = check_qkv(q, view, view, None, 0.0)
    features = check_features(np, q, shape, causal=causal, window_size=kw.get("window_size", (-1, -1)),
                              softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"))
    table, kc, vc = None, k, v
    if paged:
        nb = cap // page
        perm = rng.permutation(batch * nb + 2)
        table = perm[:batch * nb].reshape(batch, nb).astype(np.int32)
        kc = rng.standard_normal((batch * nb + 2, page, hk, d)).astype(dtype)
        vc = rng.standard_normal((batch * nb + 2, page, hk, d)).astype(dtype)
        for b in range(batch):
            for j in range(nb):
                kc[table[b, j]] = k[b, j * page:(j + 1) * page]
                vc[table[b, j]] = v[b, j * page:(j + 1) * page]
    out, lse = _gpu_decode.forward(q, kc, vc, lens, int(lens.max()), shape, causal=causal, features=features,
                                   num_splits=splits, block_table=table, page_size=page if paged else 0)
    worst = 0.0
    for b in range(batch):
        n = int(lens[b])
        fk = dict(kw)
        if "alibi_slopes" in fk:
            fk["alibi_slopes"] = fk["alibi_slopes"][b:b + 1]
        r = assert_forward_rule(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal, **fk)
        worst = max(worst, max(max(x) for x in r.values()))
    print(f"ok {dt} b{batch} sq{sq} h{h}:{hk} d{d} cap{cap} causal={causal} paged={paged} splits={splits} {feat}: "
          f"worst {worst:.3f}", flush=True)


CASES = [
    ("f32", 3, 1, 4, 1, 32, 48, False, False, 1, ()),
    ("f32", 3, 1, 8, 2, 64, 80, False, False, 3, ()),
    ("f64", 2, 2, 4, 2, 32, 64, True, False, 2, ()),
    ("bf16", 3, 1, 8, 2, 64, 64, False, True, 0, ()),
    ("f16", 2, 3, 6, 2, 32, 48, True, False, 4, ("window",)),
    ("bf16", 2, 1, 4, 1, 128, 96, False, False, 5, ("softcap", "alibi")),
    ("f32", 2, 4, 16, 2, 32, 32, True, True, 2, ("alibi",)),  # rows 32: several row chunks
    # edge cases: causal rows with no visible key (seqlen_q > a row's length), more splits than key
    # iterations, hd256 (one key per warp pass), float64 hd256 (4 chunks a lane), pages crossed inside
    # an iteration, a left-only window, GQA 16 x 2 rows in 4 chunks
    ("bf16", 3, 4, 4, 4, 256, 32, True, True, 16, ()),
    ("f64", 2, 1, 2, 1, 256, 48, False, True, 3, ("window",)),
    ("f16", 3, 2, 32, 2, 64, 80, True, False, 9, ("softcap",)),
    ("f32", 2, 3, 4, 4, 128, 64, False, True, 1, ("window", "alibi")),
]

if __name__ == "__main__":
    rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
    for c in CASES:
        case(rng, *c)
    print(f"done: {len(CASES)} cases")
