"""cuda/flash_mask.cuh against flashcupy/_mask.py (the rule the chunked path and the oracle use):
the header is compiled for the host with g++ (a shim for the few CUDA built-ins it uses) and asked,
for many (seqlen_q, seqlen_k, causal, window), every element's visibility (visible and visible_rt) and every tile's key range,
query range, partial flag and any_visible flag; each must agree with, or cover, the Python rule."""

import itertools
import shutil
import subprocess

import numpy as np
import pytest

from flashcupy import _build, _mask

SHIM = r"""
#include <cstdio>
#include <algorithm>
using std::max; using std::min;
#define __device__
#define __forceinline__ inline
static inline int __clz(int x) { return __builtin_clz((unsigned)x); }
template <typename T> static inline T __ldg(const T* p) { return *p; }
#include <cmath>
#include <cstring>
using std::exp; using std::log1p; using std::tanh; using std::abs;
static inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
"""

MAIN = r"""
int main() {
    int sq, sk, causal, wl, wr, tq, tk;
    while (scanf("%d %d %d %d %d %d %d", &sq, &sk, &causal, &wl, &wr, &tq, &tk) == 7) {
        AttnParams p = {};
        p.seqlen_q = sq, p.seqlen_k = sk, p.mask.causal = causal, p.mask.window_left = wl, p.mask.window_right = wr;
        const Mask m(p, causal != 0, true);
        for (int i = 0; i < sq; ++i) { for (int j = 0; j < sk; ++j) putchar('0' + m.visible(i, j)); }
        putchar('\n');
        for (int i = 0; i < sq; ++i) { for (int j = 0; j < sk; ++j) putchar('0' + m.visible_rt(i, j)); }
        putchar('\n');
        int same = 1;  // KEY_TAIL = false, keys past seqlen_k and rows past seqlen_q included (tile padding)
        for (int i = 0; i < sq + tq; ++i)
            for (int j = 0; j < sk + tk; ++j) same &= m.visible<false>(i, j) == m.visible_rt<false>(i, j);
        printf("S %d\n", same);
        for (int r0 = 0; r0 < sq; r0 += tq) {
            const int r1 = min(sq, r0 + tq) - 1;
            printf("R %d %d %d\n", r0, m.key_begin(r0), m.key_end(r1));
            for (int k0 = 0; k0 < sk; k0 += tk)
                printf("T %d %d %d %d\n", r0, k0, (int)m.partial(r0, tq, k0, tk), (int)m.any_visible(r0, tq, k0, tk));
        }
        for (int k0 = 0; k0 < sk; k0 += tk) {
            const int k1 = min(sk, k0 + tk) - 1;
            printf("C %d %d %d\n", k0, m.query_begin(k0), m.query_end(k1));
        }
        printf("E\n");
    }
}
"""

CASES = [(sq, sk, causal, wl, wr, 4, 8)
         for sq, sk in [(1, 1), (5, 5), (7, 13), (13, 7), (16, 16), (3, 17), (17, 3)]
         for causal in (0, 1)
         for wl, wr in [(-1, -1), (0, 0), (3, -1), (-1, 2), (2, 5), (6, 0)]]


@pytest.fixture(scope="module")
def host_mask(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("mask")
    src = d / "mask.cpp"
    src.write_text(SHIM + _build.load_source("flash_mask.cuh").replace("#pragma once", "") + MAIN)
    exe = d / "mask"
    subprocess.run([cxx, "-std=c++17", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    stdin = "\n".join(" ".join(map(str, c)) for c in CASES) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
    return out.split("E\n")[:-1]


def _expected(sq, sk, causal, wl, wr):
    vis = _mask.visible(np, np.arange(sq), np.arange(sk), sq, sk, bool(causal), (wl, wr))
    return np.ones((sq, sk), bool) if vis is None else vis


@pytest.mark.parametrize("idx", range(len(CASES)))
def test_header_agrees_with_python_rule(host_mask, idx):
    sq, sk, causal, wl, wr, tq, tk = CASES[idx]
    lines = host_mask[idx].strip().split("\n")
    vis = np.array([c == "1" for c in lines[0]]).reshape(sq, sk)
    want = _expected(sq, sk, causal, wl, wr)
    np.testing.assert_array_equal(vis, want)
    # visible_rt (the run-time-causal families' element test) is the same set, with and without KEY_TAIL
    np.testing.assert_array_equal(np.array([c == "1" for c in lines[1]]).reshape(sq, sk), want)
    assert lines[2] == "S 1", CASES[idx]
    for ln in lines[3:]:
        kind, *v = ln.split()
        v = list(map(int, v))
        if kind == "R":  # every visible key of rows [r0, r0 + tq) lies in [key_begin, key_end)
            r0, kb, ke = v
            cols = np.nonzero(want[r0:r0 + tq].any(axis=0))[0]
            assert 0 <= kb and ke <= sk
            assert cols.size == 0 or (kb <= cols.min() and cols.max() < ke), (CASES[idx], v)
        elif kind == "C":  # every row seeing a key of [k0, k0 + tk) lies in [query_begin, query_end)
            k0, qb, qe = v
            rows = np.nonzero(want[:, k0:k0 + tk].any(axis=1))[0]
            assert 0 <= qb and qe <= sq
            assert rows.size == 0 or (qb <= rows.min() and rows.max() < qe), (CASES[idx], v)
        else:  # T: a tile with a masked element (inside the sequences) says partial; none visible: not any_visible
            r0, k0, partial, any_vis = v
            tile = np.zeros((tq, tk), bool)
            sub = want[r0:r0 + tq, k0:k0 + tk]
            tile[:sub.shape[0], :sub.shape[1]] = sub
            rows_in = np.arange(r0, r0 + tq) < sq
            if not tile[rows_in].all():
                assert partial, (CASES[idx], v)
            if sub.any():
                assert any_vis, (CASES[idx], v)


def test_window_is_off_by_default():
    assert _mask.band(5, 9, False) == (None, None)
    assert _mask.band(5, 9, True) == (None, 4)
    assert _mask.band(5, 9, False, (2, 1)) == (2, 5)


# ---- the deterministic dQ turns of the KV-outer backward (Mask::dq_turn, flash_bwd_sm90.cu's dQ writer)

TURN_MAIN = r"""
int main() {
    int sq, sk, causal, wl, wr, desc;
    while (scanf("%d %d %d %d %d %d", &sq, &sk, &causal, &wl, &wr, &desc) == 6) {
        AttnParams p = {};
        p.seqlen_q = sq, p.seqlen_k = sk, p.mask.causal = causal, p.mask.window_left = wl, p.mask.window_right = wr;
        const Mask m(p, causal != 0, true);
        SparseList dense = {};
        for (int kt = 0; kt * TN < sk; ++kt) {  // each key tile's walk, as the kernel's TileWalk over rows
            const int n0 = kt * TN;
            TileWalk<TM> rows(m.query_end(n0 + TN - 1), dense, 0, 0, n0);
            for (int r0 = rows.first(m.query_begin(n0)); r0 >= 0; r0 = rows.next())
                printf("%d %d %d\n", kt, r0, m.dq_turn<TN>(r0, TM, kt, desc != 0));
        }
        printf("E\n");
    }
}
"""

TURN_CASES = [(sq, sk, causal, wl, wr)
              for sq, sk in [(1, 1), (64, 128), (65, 129), (300, 421), (421, 300), (128, 640), (640, 128), (333, 517)]
              for causal in (0, 1)
              for wl, wr in [(-1, -1), (100, -1), (-1, 0), (200, 30), (0, 0)]]


@pytest.mark.parametrize("tm", [64, 128])
def test_dq_turns_are_a_contiguous_order_each_ceiling_launched_first(tmp_path, tm):
    """For every query tile, the CTAs (key tiles of 128) that walk it get turns 0 .. n-1 once each, and
    the CTA a turn waits on (turn - 1) is launched before it: a higher key tile with descending turns
    (causal; the kernel then launches key tiles in descending order), a lower one with ascending turns.
    Otherwise a deterministic call would deadlock or add in an order that depends on timing."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "turn.cpp"
    body = _build.load_source("flash_mask.cuh").replace("#pragma once", "")
    src.write_text(SHIM + f"constexpr int TM = {tm}, TN = 128;\n" + body + TURN_MAIN)
    exe = tmp_path / "turn"
    subprocess.run([cxx, "-std=c++17", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    cases = [c + (desc,) for c in TURN_CASES for desc in (0, 1) if desc == c[2] or c[3:] == (-1, -1)]
    stdin = "\n".join(" ".join(map(str, c)) for c in cases) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("E\n")
    for case, block in zip(cases, out):
        desc = case[-1]
        walkers = {}
        rows = [tuple(map(int, ln.split())) for ln in block.strip().split("\n") if ln]
        for kt, r0, turn in rows:
            walkers.setdefault(r0, []).append((kt, turn))
        assert rows or case[1] == 0, case
        for r0, ws in walkers.items():
            kts = sorted(kt for kt, _ in ws)
            assert kts == list(range(kts[0], kts[-1] + 1)), (case, r0, kts)  # a contiguous range
            turns = dict((t, kt) for kt, t in ws)
            assert sorted(turns) == list(range(len(ws))), (case, r0, ws)
            for t in range(1, len(ws)):  # the one waited on comes earlier in the launch order
                assert (turns[t - 1] > turns[t]) if desc else (turns[t - 1] < turns[t]), (case, r0, ws)
