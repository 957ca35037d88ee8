"""bench/bench_sm90.py on the CPU: its options, cases, providers and report (the timing needs a GPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_sm90.py")
_spec = importlib.util.spec_from_file_location("bench_sm90", _PATH)
bench_sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sm90)


def test_default_is_the_issue_14_table():
    args = bench_sm90.parse_args([])
    cases = bench_sm90.cases(args)
    assert {(c.dtype, c.head_dim, c.seqlen, c.causal) for c in cases} == {
        (dt, hd, s, causal) for dt in ("fp16", "bf16") for hd in (64, 128)
        for s in (1024, 2048, 4096, 8192, 16384) for causal in (False, True)}
    assert all(c.mode == "fwd" and c.variant == "dense" for c in cases)
    assert all(c.nheads * c.head_dim == 2048 and c.batch * c.seqlen == 16384 for c in cases)
    names = bench_sm90.providers(cases[0], args)
    assert names[0] == "flashcupy-mma" and {"flashcupy-sm90", "sdpa-cudnn", "sdpa-flash"} <= set(names)


def test_hd256_dropout_and_mask_rows():
    args = bench_sm90.parse_args(["--hd256", "--variants", "dropout", "mask", "--seqlens", "4096"])
    assert args.head_dims == [64, 128, 256]
    by = {(c.variant, c.head_dim, c.causal): bench_sm90.providers(c, args) for c in bench_sm90.cases(args)}
    assert "fa3" not in by[("dropout", 128, False)] and "sdpa-flash" in by[("dropout", 128, False)]
    assert by[("mask", 128, True)] == ["flashcupy-mma", "flashcupy-sm90"]  # no peer has block masks
    hd256 = by[("dropout", 256, False)]
    assert any(n.startswith("sm90-n80") for n in hd256) and "flashcupy-mma" in hd256
    assert not any(n.startswith("sm90-n80") for n in by[("mask", 256, False)])  # 80-key tiles: not whole blocks


def test_backward_modes():
    args = bench_sm90.parse_args(["--bwd"])
    assert args.modes == ["bwd"] and args.head_dims == [64, 128, 256]
    case = bench_sm90.cases(args)[0]
    assert bench_sm90.providers(case, args)[0] == "flashcupy"
    ab = bench_sm90.parse_args(["--bwd-ab", "--modes", "bwd", "fwd+bwd"])
    assert ab.modes == ["bwd", "fwd+bwd"]
    assert bench_sm90.providers(bench_sm90.cases(ab)[0], ab)[:2] == ["flashcupy-bwd0", "flashcupy-bwd1"]


def test_bad_options_are_refused():
    for argv in (["--dropout-p", "0"], ["--density", "1.5"], ["--dtypes", "fp32"]):
        with pytest.raises(SystemExit):
            bench_sm90.parse_args(argv)


def test_list_needs_no_gpu(capsys):
    assert bench_sm90.main(["--list", "--seqlens", "1024"]) == 0
    assert "8 cases" in capsys.readouterr().out


def _row(provider, tflops, **kw):
    r = dict(mode="fwd", variant="dense", dtype="bf16", head_dim=128, causal=False, seqlen=4096, provider=provider,
             tflops=tflops, ms=1.0)
    r.update(kw)
    return r


def test_summary_ratios():
    rows = [_row("flashcupy-sm90", 600), _row("sdpa-cudnn", 500), _row("sdpa-flash", 400), _row("flashcupy-mma", 300),
            _row("flashcupy-sm90", 450, seqlen=1024), _row("sdpa-cudnn", 500, seqlen=1024)]
    text = bench_sm90.summary(rows)
    line = next(x for x in text.splitlines() if x.startswith("fwd") and " 4096 " in x)
    assert line.split()[-3:] == ["1.20", "1.50", "2.00"]
    assert "1.20 / 1.20" in text  # seqlen 1024 is left out of the >= 2k summary
    bwd = [_row("flashcupy-bwd1", 300, mode="bwd"), _row("flashcupy-bwd0", 200, mode="bwd"),
           _row("sdpa-cudnn", 400, mode="bwd")]
    line = next(x for x in bench_sm90.summary(bwd).splitlines() if x.startswith("bwd"))
    assert "flashcupy-bwd1" in line and line.split()[-3:] == ["0.75", "-", "1.50"]
