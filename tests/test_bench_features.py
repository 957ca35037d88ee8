"""bench/bench_features.py without a GPU: the plan, the visible fraction of issue 16's window target and
the summary's ratios on canned rows."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_features", Path(__file__).parents[1] / "bench" / "bench_features.py")
bf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bf)


def test_plan_is_issue_16s_table(capsys):
    assert bf.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(bf.FEATURES)  # fwd and fwd+bwd, bf16 hd128 16k
    c = bf.cases(bf.parse_args([]))[0]
    assert (c.batch, c.nheads, c.seqlen, c.head_dim) == (1, 16, 16384, 128)


def test_visible_fraction():
    assert bf.visible_fraction(8, 100) == 1.0  # a window wider than the sequence is causal
    assert bf.visible_fraction(4, 0) == pytest.approx(4 / 10)  # the diagonal only: n of n (n + 1) / 2
    n, w = 16384, 4096  # issue 16's case: about 0.44
    assert bf.visible_fraction(n, w) == pytest.approx(((w + 1) * n - w * (w + 1) / 2) / (n * (n + 1) / 2))


def test_summary_ratios():
    args = bf.parse_args([])
    rows = [dict(mode="fwd", feature=f, dtype="bf16", head_dim=128, seqlen=16384, provider=p, ms=ms)
            for f, p, ms in (("causal", "flashcupy", 2.0), ("softcap", "flashcupy", 2.1), ("softcap", "flex", 4.2),
                             ("window", "flashcupy", 1.0))]
    text = bf.summary(rows, args)
    soft = next(ln for ln in text.splitlines() if "softcap" in ln).split()
    assert soft[6] == "1.050" and soft[7] == "1.100" and soft[8] == "2.00"
    win = next(ln for ln in text.splitlines() if "window" in ln).split()
    assert win[6] == "0.500" and float(win[7]) == pytest.approx(1.15 * bf.visible_fraction(16384, 4096), abs=1e-3)
