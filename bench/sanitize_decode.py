"""Small flash_attn_with_kvcache calls that launch the split-KV decode kernels (cuda/flash_decode.cu), for
compute-sanitizer (memcheck / racecheck / synccheck / initcheck):

    PYTHONPATH=. compute-sanitizer --tool memcheck python bench/sanitize_decode.py

Every dtype; head dims 64 and 128 (and 256 for bf16); GQA packings of 1, 4 and 8 rows and a chunked one
(40 rows); one split and several (the combine kernel); contiguous and paged caches; empty rows; window,
softcap and ALiBi. Prints `ok <case>` per call and `done: N calls ok`."""

import cupy as cp
import numpy as np

from flashcupy import flash_attn_with_kvcache
from flashcupy._arrays import bfloat16


def main():
    rng = np.random.default_rng(0)
    n = 0
    dtypes = [np.float16, bfloat16(), np.float32, np.float64]
    for dtype in dtypes:
        for d in (64, 128) + ((256,) if dtype == bfloat16() else ()):
            for (h, hk, sq) in ((8, 8, 1), (32, 8, 1), (16, 2, 1), (8, 1, 5)):
                for paged in (False, True):
                    batch, cap, page = 3, 96, 16
                    q = cp.asarray(rng.standard_normal((batch, sq, h, d)).astype(dtype))
                    shape = (batch * cap // page + 1, page, hk, d) if paged else (batch, cap, hk, d)
                    kc = cp.asarray(rng.standard_normal(shape).astype(dtype))
                    vc = cp.asarray(rng.standard_normal(shape).astype(dtype))
                    table = (cp.asarray(rng.permutation(shape[0])[:batch * cap // page].reshape(batch, -1).astype(np.int32))
                             if paged else None)
                    lens = cp.asarray(np.array([cap, 0, 37], np.int32))
                    feats = dict(window_size=(30, 0), softcap=4.0,
                                 alibi_slopes=cp.asarray(rng.uniform(0.1, 0.5, h).astype(np.float32))) if n % 3 == 2 else {}
                    for splits in (1, 3):
                        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, causal=sq > 1,
                                                num_splits=splits, **feats)
                        cp.cuda.Device().synchronize()
                        n += 1
                        print(f"ok {np.dtype(dtype).name} hd{d} {h}:{hk} sq{sq} paged={paged} splits={splits} "
                              f"{'features' if feats else 'plain'}", flush=True)
    print(f"done: {n} calls ok")


if __name__ == "__main__":
    main()
