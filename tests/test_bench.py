"""`flashcupy bench`: the FLOP formula, block masks, ratios, the JSON schema, tables, Markdown, plots, and
runs end to end (NumPy on the CPU everywhere; CuPy on a GPU where there is one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from flashcupy import bench
from flashcupy._arrays import gpu_available

# ---------------------------------------------------------------------------------------------------
# the FLOP formula and the benchmark shape


def test_flops_known_values():
    # FlashAttention benchmark, hd128 at 16k: B=1, H=16; 4 * 16 * 16384^2 * 128 = 2.199 TFLOP forward
    fwd = 4 * 1 * 16 * 16384 * 16384 * 128
    assert fwd == 2_199_023_255_552
    f = bench.attention_flops
    assert f(1, 16, 16384, 16384, 128, causal=False, mode="fwd") == fwd
    assert f(1, 16, 16384, 16384, 128, causal=True, mode="fwd") == fwd / 2
    assert f(1, 16, 16384, 16384, 128, causal=False, mode="bwd") == 2.5 * fwd
    assert f(1, 16, 16384, 16384, 128, causal=False, mode="fwd+bwd") == 3.5 * fwd
    assert f(1, 16, 16384, 16384, 128, causal=True, mode="fwd+bwd") == 1.75 * fwd
    # hd64 at 1k: B=16, H=32
    assert f(16, 32, 1024, 1024, 64, causal=False, mode="fwd") == 4 * 16 * 32 * 1024 * 1024 * 64 == 137_438_953_472
    # causal is halved only for square attention; density multiplies
    assert f(2, 4, 128, 256, 32, causal=True, mode="fwd") == 4 * 2 * 4 * 128 * 256 * 32
    assert f(1, 16, 16384, 16384, 128, causal=False, mode="fwd", density=0.25) == fwd / 4
    # ms -> TFLOP/s as the table reports it: 2.199 TFLOP in 4.0 ms = 549.8 TFLOP/s
    assert fwd / 4.0 / 1e9 == pytest.approx(549.76, abs=0.01)
    with pytest.raises(ValueError, match="mode"):
        f(1, 1, 1, 1, 1, causal=False, mode="backward")


def test_fa_shape():
    assert bench.fa_shape(16384, 128) == (1, 16)
    assert bench.fa_shape(1024, 64) == (16, 32)
    assert bench.fa_shape(4096, 128) == (4, 16)
    assert bench.fa_shape(32768, 64) == (1, 32)  # never batch 0
    assert bench.fa_shape(256, 32, hidden=64, tokens=512) == (2, 2)


# ---------------------------------------------------------------------------------------------------
# block masks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_block_mask(causal, density):
    s = 16 * bench.BLOCK
    m = bench.block_mask(s, s, density, causal=causal, seed=3)
    assert m.shape == (16, 16) and m.dtype == bool
    assert m.diagonal().all(), "every query block keeps its diagonal block (no empty rows)"
    if causal:
        assert not np.triu(m, 1).any(), "causal: no block above the diagonal"
    kept = bench.kept_fraction(m, causal=causal)
    eligible = 136 if causal else 256
    assert abs(kept - max(density, 16 / eligible)) <= 1 / eligible
    assert np.array_equal(m, bench.block_mask(s, s, density, causal=causal, seed=3)), "seeded"
    assert bench.block_mask(s, s, 1.0, causal=causal) is None


def test_element_mask():
    bm = np.array([[True, False], [True, True]])
    vis = bench.element_mask(bm, 200, 200, causal=False, block=128)
    assert vis.shape == (200, 200)
    assert vis[:128, :128].all() and not vis[:128, 128:].any() and vis[128:, :].all()
    both = bench.element_mask(bm, 200, 200, causal=True, block=128)
    assert np.array_equal(both, vis & np.tril(np.ones((200, 200), dtype=bool)))
    assert bench.element_mask(None, 5, 5, causal=False) is None


# ---------------------------------------------------------------------------------------------------
# rows, ratios, schema


def fake_row(provider, tflops=None, *, mode="fwd", dtype="bf16", head_dim=128, seqlen=4096, causal=False,
             density=1.0, status="ok", mem=12.0, err=1e-3):
    batch, nheads = bench.fa_shape(seqlen, head_dim)
    case = bench.Case(mode, dtype, head_dim, seqlen, causal, density, batch, nheads, kept=density)
    row = bench.new_row(provider, case)
    if status == "ok":
        ms = row["flops"] / tflops / 1e9
        row.update(ms=ms, tflops=tflops, peak_mem_mib=mem, max_err=err, setup_s=0.5, timer="triton.do_bench")
    else:
        row.update(status=status, note="why")
    return row


def fake_rows():
    rows = []
    for seqlen in (1024, 4096):
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                k = dict(seqlen=seqlen, causal=causal, mode=mode)
                rows += [fake_row("flashcupy", 300.0, **k), fake_row("naive", 10.0, mem=4000.0, **k),
                         fake_row("sdpa-flash", 340.0, **k), fake_row("sdpa-cudnn", 600.0, **k),
                         fake_row("jax-cudnn", 550.0, mem=None, **k),
                         fake_row("sdpa-math", status="skipped", **k)]
    return rows


def fake_result(rows=None):
    rows = fake_rows() if rows is None else rows
    providers = {p: dict(available=True, used=True, reason=None, version="1.0", description=p)
                 for p in ("flashcupy", "naive", "sdpa-flash", "sdpa-cudnn", "sdpa-math", "jax-cudnn")}
    providers["jax-xla"] = dict(available=False, used=False, reason="No module named 'jax'", version=None,
                                description="")
    env = {"device": {"kind": "gpu", "name": "NVIDIA H200", "nvidia_smi": {"clocks.max.sm": "1980"}},
           "versions": {"cupy": "14.2.0", "torch": "2.11.0"}, "git": {"commit": "0123456789abcdef", "dirty": False}}
    return bench.make_result(config={"hidden": 2048, "tokens": 16384}, env=env, method={"summary": "Median."},
                             providers=providers, rows=rows, command="flashcupy bench --quick", wall_s=12.5,
                             created="2026-11-21T10:00:00+00:00")


def test_ratios():
    rows = bench.add_ratios([fake_row("flashcupy", 300.0), fake_row("sdpa-flash", 340.0),
                             fake_row("sdpa-cudnn", 600.0), fake_row("naive", 10.0),
                             fake_row("sdpa-math", status="skipped"),
                             fake_row("flashcupy", 200.0, causal=True), fake_row("naive", 5.0, causal=True)])
    mine, flash, cudnn, naive, math_, mine_c, naive_c = rows
    assert mine["best_peer"] == "sdpa-cudnn"
    assert mine["ratio_best"] == pytest.approx(0.5)
    assert mine["ratio_flash"] == pytest.approx(300 / 340)
    assert mine["ratio_cudnn"] == pytest.approx(0.5)
    assert cudnn["ratio_best"] == pytest.approx(1.0) and flash["ratio_cudnn"] == pytest.approx(340 / 600)
    assert naive["ratio_flash"] == pytest.approx(10 / 340)
    assert math_["ratio_best"] is None and math_["ratio_flash"] is None
    # a case without SDPA: ratios to flash/cudnn are None, the best peer is naive
    assert mine_c["best_peer"] == "naive" and mine_c["ratio_best"] == pytest.approx(40.0)
    assert mine_c["ratio_flash"] is None and mine_c["ratio_cudnn"] is None
    # ratios use the same FLOP count, so they are ms ratios inverted
    assert mine["ratio_flash"] == pytest.approx(flash["ms"] / mine["ms"])


def test_result_schema_and_json_round_trip(tmp_path):
    result = fake_result()
    bench.validate_result(result)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))  # strict JSON: no NaN/inf anywhere
    back = bench.load_result(path)
    assert back == result
    assert set(back) == set(bench.RESULT_FIELDS)
    for row in back["rows"]:
        assert set(bench.ROW_FIELDS) <= set(row)
        assert row["status"] in bench.STATUSES


def test_result_schema_rejects(tmp_path):
    good = fake_result()

    def broken(edit):
        r = json.loads(json.dumps(good))
        edit(r)
        return r

    cases = [
        (lambda r: r.pop("rows"), "missing 'rows'"),
        (lambda r: r.update(schema="other/1"), "schema"),
        (lambda r: r["rows"][0].pop("tflops"), "missing 'tflops'"),
        (lambda r: r["rows"][0].update(causal="yes"), "causal"),
        (lambda r: r["rows"][0].update(status="fine"), "status"),
        (lambda r: r["rows"][0].update(tflops=None), "positive number"),
        (lambda r: r["rows"][0].update(head_dim=128.5), "head_dim"),
        (lambda r: r["providers"]["naive"].pop("available"), "available"),
        (lambda r: r["env"].pop("git"), "git"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            bench.validate_result(broken(edit))


def test_nan_becomes_null():
    rows = [fake_row("flashcupy", 300.0)]
    rows[0]["max_err"] = float("nan")
    r = bench.make_result(config={}, env={"device": {}, "versions": {}, "git": {}}, method={}, providers={},
                          rows=rows, command="x", wall_s=1.0)
    assert r["rows"][0]["max_err"] is None
    json.dumps(r, allow_nan=False)


# ---------------------------------------------------------------------------------------------------
# tables and Markdown


def test_plain_table():
    result = fake_result()
    header, rows, groups = bench.table_rows(result["rows"])
    assert header[:2] == ["provider", "mode"] and "TFLOP/s" in header and "/best" in header
    text = bench.plain_table(header, rows, groups)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) + (max(groups))  # header, rule, rows, one blank line between cases
    first = next(line for line in lines if line.startswith("flashcupy"))
    assert "300.0" in first and "0.50" in first and "0.88" in first  # TFLOP/s, /best, /flash
    assert "skipped" in text


def test_markdown():
    md = bench.render_markdown(fake_result())
    lines = md.splitlines()
    assert lines[0].startswith("**NVIDIA H200**, 2026-11-21")
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == ("| mode | dtype | hd | causal | seqlen | flashcupy | SDPA flash | cuDNN | best peer "
                        "| /best | /flash | /cuDNN |")
    assert table[1].count("---") == 12
    assert len(table) == 2 + 8  # 2 seqlens x 2 causal x 2 modes
    assert table[2] == "| fwd | bf16 | 128 | no | 1k | 300.0 | 340.0 | 600.0 | sdpa-cudnn 600.0 | 0.50 | 0.88 | 0.50 |"
    assert "flashcupy 0123456789" in md and "cupy 14.2.0" in md and "Absent: jax-xla" in md
    assert "`flashcupy bench --quick`" in md


def test_markdown_when_flashcupy_missing():
    rows = [fake_row("flashcupy", status="error"), fake_row("sdpa-flash", 340.0)]
    md = bench.render_markdown(fake_result(rows))
    assert "| fwd | bf16 | 128 | no | 4k | error | 340.0 | - | sdpa-flash 340.0 | - | - | - |" in md


def test_markdown_command(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_result()))
    assert bench.main(["--markdown", str(path)]) == 0
    assert capsys.readouterr().out == bench.render_markdown(bench.load_result(path))
    path.write_text("{}")
    assert bench.main(["--markdown", str(path)]) == 2
    assert "not a valid flashcupy bench result" in capsys.readouterr().err


def test_cli_has_bench(tmp_path, capsys):
    cli = pytest.importorskip("flashcupy.cli")
    if "bench" not in cli.COMMANDS:
        pytest.skip("bench not registered in flashcupy.cli")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_result()))
    assert cli.main(["bench", "--markdown", str(path)]) == 0
    assert "| mode | dtype |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# options


def test_providers_and_options():
    assert bench.resolve_providers(None) == list(bench.PROVIDERS)
    assert bench.resolve_providers(["flash", "flashcupy"]) == ["flashcupy", "sdpa-flash"]
    assert bench.resolve_providers(["jax,naive"]) == ["naive", "jax-cudnn", "jax-xla"]
    with pytest.raises(bench.CommandError, match="unknown 'fa3'"):
        bench.resolve_providers(["fa3"])
    assert bench._parse_causal(["both"]) == [False, True]
    assert bench._parse_causal(["yes", "1"]) == [True]
    with pytest.raises(bench.CommandError, match="--causal"):
        bench._parse_causal(["maybe"])


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return bench.make_plan(p.parse_args(list(argv)))


def test_plans():
    quick = parse("--quick", "--device", "gpu")
    assert (quick.dtypes, quick.head_dims, quick.seqlens) == (["bf16"], [64, 128], [1024, 4096, 16384])
    assert quick.modes == ["fwd", "fwd+bwd"] and quick.causal == [False, True]
    assert (quick.hidden, quick.tokens) == (2048, 16384)
    full = parse("--device", "gpu", "--mode", "fwd", "--mode", "bwd", "--dtype", "fp16", "--causal", "yes",
                 "--seqlens", "512")
    assert full.modes == ["fwd", "bwd"] and full.dtypes == ["fp16"] and full.causal == [True]
    assert full.seqlens == [512] and full.head_dims == [64, 128]
    assert parse("--quick", "--head-dims", "96").head_dims == [96]  # an option overrides the preset


def test_cpu_presets_win_on_the_cpu(monkeypatch):
    """--device cpu picks the CPU presets, --quick included (it used to run the GPU's bf16 16k-token
    sweep on NumPy); --device auto (the default) is cpu where CuPy has no GPU, gpu where it has one."""
    from flashcupy import _arrays

    cpu_quick = parse("--quick", "--device", "cpu")
    assert (cpu_quick.device, cpu_quick.preset, cpu_quick.dtypes) == ("cpu", "cpu-quick", ["fp32"])
    assert max(cpu_quick.seqlens) <= 256 and cpu_quick.tokens <= 1024
    assert parse("--device", "cpu").preset == "cpu"
    monkeypatch.setattr(_arrays, "gpu_available", lambda: False)
    auto = parse("--quick")
    assert (auto.device, auto.preset) == ("cpu", "cpu-quick")
    monkeypatch.setattr(_arrays, "gpu_available", lambda: True)
    auto = parse("--quick")
    assert (auto.device, auto.preset) == ("gpu", "quick")
    with pytest.raises(bench.CommandError, match="densities"):
        parse("--densities", "0")


# ---------------------------------------------------------------------------------------------------
# plots


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from flashcupy import _plots

    rows = fake_rows()
    for density, speed in ((0.5, 1.8), (0.25, 3.2)):  # block-sparse rows for Fig. 2 right
        rows += [fake_row("flashcupy", 300.0 * speed * density, seqlen=4096, density=density)]
    paths = _plots.plot_result(fake_result(rows), tmp_path, "h200")
    names = sorted(p.name for p in paths)
    assert names == ["h200-block-sparse.png", "h200-memory-bf16.png", "h200-speed-bf16.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------
# end to end


TINY = ["--seqlens", "64", "128", "--head-dims", "16", "--tokens", "256", "--hidden", "32",
        "--warmup-ms", "1", "--rep-ms", "2", "--min-reps", "2", "--plain"]


def test_cpu_bench_end_to_end(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--providers", "flashcupy", "naive", "--mode", "fwd", "bwd", "fwd+bwd",
                     "--dtype", "fp32", "--out", str(tmp_path), "--name", "t", "--no-plots", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    result = bench.load_result(tmp_path / "t.json")
    assert (tmp_path / "t.md").read_text() == bench.render_markdown(result)
    assert "headline" in out.splitlines()[-(2 + 12 + 1)]  # the headline table prints last
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3 * 2  # seqlens x causal x modes x providers
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
        assert r["max_err"] is not None and r["max_err"] < 1e-4  # float32 against the float64 oracle
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0
        assert r["best_peer"] == "naive"  # the fastest provider other than flashcupy, for every row of a case
    assert result["config"]["device"] == "cpu" and result["env"]["device"]["kind"] == "cpu"
    assert set(result["providers"]) == {"flashcupy", "naive"}


def test_cpu_bench_without_optional_modules(tmp_path, monkeypatch, capsys):
    """CI has no cupy, torch, triton, jax, rich or matplotlib: peers are absent, never an error."""
    for mod in ("cupy", "torch", "triton", "jax", "rich", "matplotlib"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    rc = bench.main(["--device", "cpu", "--mode", "fwd", "--dtype", "fp32", "--causal", "no", "--out", str(tmp_path),
                     "--name", "t", "--no-accuracy", *TINY[:-1]])
    assert rc == 0
    result = bench.load_result(tmp_path / "t.json")
    prov = result["providers"]
    assert prov["flashcupy"]["used"] and prov["naive"]["used"]
    for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "jax-cudnn", "jax-xla", "flex"):
        assert not prov[name]["available"] and prov[name]["reason"], name
    assert {r["provider"] for r in result["rows"]} == {"flashcupy", "naive"}
    assert not list(tmp_path.glob("*.png"))
    captured = capsys.readouterr()
    assert "absent" in captured.out and "matplotlib is not installed" in captured.err


def test_cpu_block_sparse_rows(tmp_path):
    rc = bench.main(["--device", "cpu", "--providers", "flashcupy", "naive", "--mode", "fwd", "--dtype", "fp32",
                     "--causal", "no", "--densities", "1", "0.5", "--seqlens", "256", "--head-dims", "16",
                     "--tokens", "256", "--hidden", "32", "--warmup-ms", "1", "--rep-ms", "2", "--min-reps", "2",
                     "--out", str(tmp_path), "--name", "t", "--no-plots", "--plain"])
    assert rc == 0
    rows = {(r["provider"], r["density"]): r for r in bench.load_result(tmp_path / "t.json")["rows"]}
    assert rows[("naive", 0.5)]["status"] == "ok" and rows[("naive", 0.5)]["max_err"] < 1e-4
    assert rows[("naive", 0.5)]["kept"] == 0.5  # 2 x 2 blocks of 128: the diagonal
    assert rows[("naive", 0.5)]["flops"] == pytest.approx(rows[("naive", 1.0)]["flops"] / 2)
    # flashcupy's own block-sparse row: measured on the same mask, checked against the masked oracle
    assert bench.FlashcupyProvider.block_sparse_supported()
    fc = rows[("flashcupy", 0.5)]
    assert fc["status"] == "ok" and fc["max_err"] is not None and fc["max_err"] < 1e-4, fc
    assert fc["kept"] == 0.5 and fc["flops"] == rows[("naive", 0.5)]["flops"]
    assert fc["ms"] > 0 and rows[("flashcupy", 1.0)]["status"] == "ok"


def test_module_imports_without_optional_modules():
    code = ("import sys; sys.modules.update(dict.fromkeys(['cupy', 'torch', 'triton', 'jax', 'rich', 'matplotlib']));"
            "import flashcupy.bench, flashcupy._plots; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU usable through CuPy")
def test_gpu_bench_end_to_end(tmp_path):
    rc = bench.main(["--providers", "flashcupy", "naive", "--mode", "fwd", "--dtype", "fp16", "--causal", "no",
                     "--seqlens", "256", "--head-dims", "64", "--tokens", "1024", "--warmup-ms", "2", "--rep-ms", "10",
                     "--min-reps", "3", "--out", str(tmp_path), "--name", "gpu", "--no-plots", "--plain"])
    assert rc == 0
    result = bench.load_result(tmp_path / "gpu.json")
    assert result["env"]["device"]["kind"] == "gpu" and result["env"]["device"]["name"]
    rows = {r["provider"]: r for r in result["rows"]}
    assert set(rows) == {"flashcupy", "naive"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["peak_mem_mib"] is not None
        assert r["max_err"] is not None and r["max_err"] < 1e-2  # fp16 against the float64 oracle
    assert rows["flashcupy"]["best_peer"] == "naive" and rows["flashcupy"]["ratio_best"] > 0
