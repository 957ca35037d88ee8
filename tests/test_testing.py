"""flashcupy.testing, the public checker (issue 19): it passes a correct implementation (flashcupy's
CPU path), catches a 1% error in bfloat16 (the oracle's output x 1.01), names a reproducer, and its
hypothesis strategy draws valid problems. No GPU."""

import os

import numpy as np
import pytest
from hypothesis import given, settings

import flashcupy
from flashcupy import reference, testing


def _flashcupy(q, k, v, *, causal, softmax_scale):
    return flashcupy.flash_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale)


def _oracle_times(factor):
    def impl(q, k, v, *, causal, softmax_scale):
        out, _ = reference.attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        return (np.asarray(out, dtype=np.float64) * factor).astype(q.dtype)
    return impl


def test_a_correct_implementation_passes():
    report = testing.check_attention(_flashcupy, cases=24, seed=1)
    assert len(report.cases) == 24
    assert 0.0 <= report.worst[0] <= 1.0
    assert {c.dtype for _, c in report.cases} >= {"float16", "float32", "float64"}


def test_the_oracle_rounded_to_the_dtype_passes():
    testing.check_attention(_oracle_times(1.0), cases=16, seed=2)


def test_a_one_percent_error_in_bfloat16_is_caught():
    if flashcupy._arrays.bfloat16() is None:
        pytest.skip("needs ml_dtypes")
    with pytest.raises(AssertionError) as e:
        testing.check_attention(_oracle_times(1.01), cases=8, seed=3, dtypes=("bfloat16",))
    msg = str(e.value)
    assert "case: Case(" in msg and "flashcupy.testing.Case(" in msg and ".inputs()" in msg


def test_the_reproducer_rebuilds_the_inputs():
    case = testing.random_cases(1, seed=4)[0]
    q, k, v = case.inputs()
    again = eval(case.reproducer(), {"flashcupy": flashcupy})
    for a, b in zip((q, k, v), again):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert q.shape == (case.batch, case.seqlen_q, case.nheads, case.head_dim)
    assert k.shape == (case.batch, case.seqlen_k, case.nheads_k, case.head_dim)


def test_random_cases_cover_seqlen_one_gqa_and_causal():
    cases = testing.random_cases(200, seed=5)
    assert any(c.seqlen_q == 1 for c in cases) and any(c.seqlen_q != c.seqlen_k for c in cases)
    assert any(c.nheads > c.nheads_k for c in cases) and {c.causal for c in cases} == {False, True}
    assert all(c.nheads % c.nheads_k == 0 for c in cases)


@settings(max_examples=10, deadline=None)
@given(case=testing.attention_problems())
def test_attention_problems_strategy(case):
    q, k, v = case.inputs()
    assert q.shape[2] % k.shape[2] == 0
    testing.assert_attention_close(_flashcupy(q, k, v, causal=case.causal, softmax_scale=None), q, k, v,
                                   causal=case.causal)


# ---- flashcupy fuzz (CPU path here; the same code drives the GPU kernels where CuPy has a GPU)


def _fuzz(argv, capsys):
    from flashcupy import cli

    rc = cli.main(["fuzz", "--device", "cpu", *argv])
    return rc, capsys.readouterr().out


def test_fuzz_campaign_passes_and_writes_its_report(tmp_path, capsys):
    import json

    rc, out = _fuzz(["--max-examples", "10", "--max-seqlen", "40", "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cases"] == 10 and report["failures"] == [] and report["device"] == "cpu"
    assert 0 < report["worst_ratio"] <= 1 and report["worst_case"].startswith("Case(")


def _out_times_1_01(real):
    """fuzz._forward with its out x 1.01 (the rule's 1% mutant)."""

    def broken(q, k, v, causal, **features):
        res = real(q, k, v, causal, **features)
        return res._replace(out=(np.asarray(res.out, np.float64) * 1.01).astype(q.dtype))

    return broken


def test_fuzz_catches_a_broken_forward_and_prints_a_reproducer(monkeypatch, capsys):
    from flashcupy import fuzz

    real = fuzz._forward
    monkeypatch.setattr(fuzz, "_forward", _out_times_1_01(real))
    for name in [n for n in os.environ if n.startswith("FLASHCUPY_")]:
        monkeypatch.delenv(name)
    rc, out = _fuzz(["--max-examples", "6", "--max-seqlen", "40", "--dtypes", "float16", "--directions", "fwd"], capsys)
    assert rc == 1 and "FAIL Case(" in out and "reproduce: flashcupy fuzz" in out
    line = next(ln for ln in out.splitlines() if "reproduce:" in ln)
    case = line.split('--case "', 1)[1].rstrip('"')
    rc, out = _fuzz(["--directions", "fwd", "--case", case], capsys)  # the replay fails the same way
    assert rc == 1 and "1 cases" in out
    monkeypatch.setattr(fuzz, "_forward", real)
    rc, out = _fuzz(["--directions", "fwd", "--case", case], capsys)  # and passes once the bug is gone
    assert rc == 0, out


def test_fuzz_reproducer_names_the_dispatch_environment(monkeypatch, capsys):
    """FLASHCUPY_* variables pick the kernel family: a failure's reproducer starts with them (the H200
    campaign of 2026-12-04 printed reproducers of FLASHCUPY_SM90=0 processes without it)."""
    from flashcupy import fuzz

    monkeypatch.setattr(fuzz, "_forward", _out_times_1_01(fuzz._forward))
    for name in [n for n in os.environ if n.startswith("FLASHCUPY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLASHCUPY_SM90", "0")
    monkeypatch.setenv("FLASHCUPY_DEBUG_X", "a b")
    rc, out = _fuzz(["--max-examples", "2", "--max-seqlen", "24", "--dtypes", "float16", "--directions", "fwd"], capsys)
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "reproduce:" in ln)
    assert line.split("reproduce: ", 1)[1].startswith("FLASHCUPY_DEBUG_X='a b' FLASHCUPY_SM90=0 flashcupy fuzz --device cpu")


def test_fuzz_rejects_a_case_that_is_not_one(capsys):
    rc, _ = _fuzz(["--case", "42"], capsys)
    assert rc == 2


def test_fuzz_draws_the_score_features_it_is_given(monkeypatch, capsys):
    """--features picks which of window / softcap / ALiBi / sinks a case may draw (none: plain); the calls
    under test receive them as flash-attn's keywords, and a campaign with them passes on the CPU path."""
    from flashcupy import fuzz

    seen = []
    real = fuzz._forward

    def spy(q, k, v, causal, **features):
        seen.append(set(features) - {"softmax_scale"})
        return real(q, k, v, causal, **features)

    monkeypatch.setattr(fuzz, "_forward", spy)
    rc, out = _fuzz(["--max-examples", "24", "--max-seqlen", "40", "--features", "window", "sinks"], capsys)
    assert rc == 0, out
    drawn = set().union(*seen)
    assert drawn == {"window_size", "sinks"}, drawn  # 24 cases at probability 1/2 each: both appear
    seen.clear()
    rc, out = _fuzz(["--max-examples", "8", "--max-seqlen", "40", "--features", "none"], capsys)
    assert rc == 0 and seen and all(not s for s in seen)


def test_fuzz_draws_dropout_and_block_masks(monkeypatch, capsys):
    """--features dropout blockmask: a quarter of the cases each run with fused dropout (the case's own
    seed) and a block mask; the campaign passes on the CPU path, and a kernel whose keep-mask comes
    from another seed is caught (the dropout rule regenerates the case's mask)."""
    from flashcupy import fuzz

    seen = []
    real = fuzz._forward

    def spy(q, k, v, causal, **kw):
        seen.append({n for n in ("dropout_p", "block_mask", "seed") if n in kw})
        return real(q, k, v, causal, **kw)

    monkeypatch.setattr(fuzz, "_forward", spy)
    rc, out = _fuzz(["--max-examples", "40", "--max-seqlen", "140", "--features", "dropout", "blockmask"], capsys)
    assert rc == 0, out
    assert {"dropout_p", "seed"} in seen and {"block_mask"} in seen, seen
    case = testing.Case(batch=1, seqlen_q=70, seqlen_k=150, nheads=2, nheads_k=1, head_dim=32, dtype="float16",
                        causal=True, softmax_scale=None, seed=11, dropout_p=0.25, block_mask=(64, 128, 0.6))
    assert fuzz.parse_case(repr(case)) == case and "dropout_p=0.25" in repr(case)
    assert fuzz.check_case(case, ("fwd", "bwd"), gpu=False) <= 1.0

    def other_seed(q, k, v, causal, **kw):
        kw["seed"] = (kw["seed"][0] + 1, kw["seed"][1])
        return real(q, k, v, causal, **kw)

    monkeypatch.setattr(fuzz, "_forward", other_seed)
    with pytest.raises(AssertionError, match=r"out \(float16\)"):
        fuzz.check_case(case, ("fwd",), gpu=False)


def test_fuzz_head_dims_and_allow_tf32_reach_the_calls(monkeypatch, capsys, tmp_path):
    """--head-dims picks the head dims drawn; --allow-tf32 gives float32 cases allow_tf32=True (and the
    rule's tf32 form) and no other dtype; both are in the report and in a failure's reproducer."""
    import json

    from flashcupy import fuzz

    seen = []
    real = fuzz._forward

    def spy(q, k, v, causal, **kw):
        seen.append((q.shape[-1], q.dtype.name, kw.get("allow_tf32", False)))
        return real(q, k, v, causal, **kw)

    monkeypatch.setattr(fuzz, "_forward", spy)
    rc, out = _fuzz(["--max-examples", "12", "--max-seqlen", "24", "--head-dims", "24", "256", "--allow-tf32",
                     "--dtypes", "float32", "float64", "--features", "none", "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0, out
    assert {d for d, _, _ in seen} == {24, 256}, seen
    assert all(tf32 == (dt == "float32") for _, dt, tf32 in seen) and {dt for _, dt, _ in seen} == {"float32", "float64"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head_dims"] == [24, 256] and report["allow_tf32"] is True

    def broken(q, k, v, causal, **kw):
        res = real(q, k, v, causal, **kw)
        return res._replace(out=(np.asarray(res.out, np.float64) * 1.01).astype(q.dtype))

    monkeypatch.setattr(fuzz, "_forward", broken)
    rc, out = _fuzz(["--max-examples", "3", "--max-seqlen", "24", "--allow-tf32", "--dtypes", "float32",
                     "--directions", "fwd"], capsys)
    assert rc == 1 and "--allow-tf32 --case" in out
    rc, out = _fuzz(["--head-dims", "0"], capsys)
    assert rc == 2


def test_fuzz_draws_softmax_scales_including_zero(monkeypatch, capsys):
    """The campaign draws softmax_scale (0 included: the kernels' zeroed-q special case) and gives it to
    the calls under test and to the rule; a forward that ignored it is caught."""
    from flashcupy import fuzz

    seen = []
    real = fuzz._forward

    def spy(q, k, v, causal, **kw):
        seen.append(kw.get("softmax_scale"))
        return real(q, k, v, causal, **kw)

    monkeypatch.setattr(fuzz, "_forward", spy)
    rc, out = _fuzz(["--max-examples", "64", "--max-seqlen", "24", "--features", "none", "--directions", "fwd"], capsys)
    assert rc == 0, out
    assert None in seen and 0.0 in seen and any(s not in (None, 0.0) for s in seen), seen

    def ignores_scale(q, k, v, causal, softmax_scale=None, **kw):
        return real(q, k, v, causal, **kw)

    monkeypatch.setattr(fuzz, "_forward", ignores_scale)
    rc, out = _fuzz(["--max-examples", "64", "--max-seqlen", "24", "--features", "none", "--directions", "fwd"], capsys)
    assert rc == 1 and "softmax_scale=" in out


# -- input distributions and memory layouts (issue 19) --------------------------------------------------


def test_distributions_draw_what_they_say():
    base = testing.Case(batch=2, seqlen_q=40, seqlen_k=300, nheads=4, nheads_k=2, head_dim=64, dtype="float32",
                        causal=False, softmax_scale=None, seed=9)
    qn, kn, vn = base.inputs()
    ql, kl, _ = base._replace(distribution="large").inputs()
    assert 3.0 < ql.std() / qn.std() < 5.0 and 3.0 < kl.std() / kn.std() < 5.0
    qo, ko, vo = base._replace(distribution="outliers").inputs()
    for normal, mixed in ((qn, qo), (kn, ko), (vn, vo)):
        moved = normal != mixed  # about 0.1% of the entries, each N(0, 100) more
        assert 0 < moved.mean() < 0.005 and np.abs(mixed).max() > 8.0
    _, kt, _ = base._replace(distribution="ties").inputs()
    assert np.array_equal(kt[:, 4:8], kt[:, 0:4]) and len(np.unique(kt[0, :, 0, 0])) == testing.TIE_VECTORS
    with pytest.raises(ValueError, match="distribution"):
        base._replace(distribution="uniform").inputs()


@pytest.mark.parametrize("layout", testing.LAYOUTS)
def test_layout_views_hold_the_values_in_their_layout(layout):
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 16)).astype(np.float16)
    y = testing.layout_view(x, layout)
    assert y.shape == x.shape and np.array_equal(y, x)
    if layout == "bshd":
        assert y.flags.c_contiguous
    elif layout == "bhsd":
        assert y.strides[2] > y.strides[1] and not y.flags.c_contiguous  # heads outside rows
    else:
        assert y.strides[2] == 24 * 2 and np.isnan(y.base).sum() == 2 * 5 * 3 * 8  # 8 NaN columns a row


def test_check_attention_with_inputs_covers_them_and_still_catches_one_percent():
    report = testing.check_attention(_flashcupy, cases=40, seed=21, inputs=True, max_seqlen=48,
                                     head_dims=(8, 16, 32))
    cases = [c for _, c in report.cases]
    assert {c.distribution for c in cases} == set(testing.DISTRIBUTIONS)
    assert {c.layout for c in cases} == set(testing.LAYOUTS)
    shapes = [c._replace(distribution="normal", layout="bshd") for c in cases]
    assert shapes == testing.random_cases(40, seed=21, max_seqlen=48, head_dims=(8, 16, 32))  # same shapes
    if flashcupy._arrays.bfloat16() is not None:
        with pytest.raises(AssertionError):
            testing.check_attention(_oracle_times(1.01), cases=8, seed=3, dtypes=("bfloat16",), inputs=True)

    def reads_past_head_dim(q, k, v, *, causal, softmax_scale):  # sees the NaN padding of a padded view
        if q.base is not None and q.base.shape[-1] == q.shape[-1] + 8:  # (inside the buffer: only there)
            wide = np.lib.stride_tricks.as_strided(q, q.shape[:3] + (q.shape[3] + 1,), q.strides)
            q = q + 0 * wide[..., 1:]
        return _flashcupy(q, k, v, causal=causal, softmax_scale=softmax_scale)

    with pytest.raises(AssertionError):
        testing.check_attention(reads_past_head_dim, cases=40, seed=21, inputs=True, max_seqlen=48,
                                head_dims=(8, 16, 32))


def test_case_repr_names_non_default_inputs_and_round_trips():
    from flashcupy.fuzz import parse_case

    c = testing.random_cases(1, seed=4)[0]
    assert "distribution" not in repr(c) and "layout" not in repr(c)
    d = c._replace(distribution="ties", layout="padded")
    assert "distribution='ties'" in repr(d) and "layout='padded'" in repr(d)
    assert parse_case(repr(d)) == d
