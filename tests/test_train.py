"""`flashcupy train` end to end on the CPU (tiny configs, through cli.main) and its pieces: data,
schedule, checkpoint/resume, Ctrl-C, optional dependencies. One GPU test compares flash and naive
attention losses from the same seed."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from flashcupy import cli
from flashcupy import train as tr

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
SUMMARY_KEYS = {"config", "device", "steps", "final_train_loss", "final_val_loss", "tokens_per_s", "peak_memory_bytes",
                "unigram_entropy", "train_losses", "val_losses", "interrupted", "loss_unit"}


def prose(n_sentences=400, seed=0) -> str:
    """Varied English-like text (so train and validation differ, but share an alphabet)."""
    rng = np.random.default_rng(seed)
    words = "the a flash attention kernel reads tiles of keys and values once per query block".split()
    return "\n".join(" ".join(rng.choice(words, size=rng.integers(4, 12))) + "." for _ in range(n_sentences))


def run_train(tmp_path, *args, name="run", status=0) -> dict:
    out = tmp_path / name
    assert cli.main(["train", *args, "--out", str(out)]) == status
    (summary,) = out.glob("*.json")
    return json.loads(summary.read_text())


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(prose())
    return path


def test_smoke_on_a_text_file(tmp_path, text_file, capsys):
    s = run_train(tmp_path, "--text", str(text_file), "--steps", "4", "--eval-every", "2", *TINY)
    assert SUMMARY_KEYS <= s.keys()
    assert s["steps"] == 4 and len(s["train_losses"]) == 4 and not s["interrupted"]
    assert [step for step, _ in s["val_losses"]] == [2, 4]
    assert all(math.isfinite(x) for x in s["train_losses"]) and math.isfinite(s["final_val_loss"])
    assert s["config"]["width"] == 32 and s["device"].startswith("cpu")
    assert s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 0
    # Untrained, the loss is about ln 256; the unigram entropy of this text is far below it.
    assert abs(s["train_losses"][0] - math.log(256)) < 0.5
    assert 0 < s["unigram_entropy"] < math.log(256)
    out = capsys.readouterr().out
    assert "nats/byte" in out and "bits/byte" in out and "unigram" in out
    pytest.importorskip("matplotlib")
    assert Path(s["files"]["plot"]).stat().st_size > 0


def test_smoke_on_the_default_corpus(tmp_path):
    s = run_train(tmp_path, "--steps", "2", "--eval-every", "2", *TINY)
    assert "standard library" in s["corpus"]["source"] and s["corpus"]["files"] > 100
    assert s["corpus"]["val_bytes"] == int(0.1 * s["corpus"]["bytes"])
    assert all(math.isfinite(x) for x in s["train_losses"])


def test_loss_decreases_on_repeated_text(tmp_path):
    path = tmp_path / "repeat.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    s = run_train(tmp_path, "--text", str(path), "--steps", "30", "--lr", "1e-2", "--warmup", "5",
                  "--eval-every", "30", *TINY)
    losses = s["train_losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5, losses
    assert s["final_val_loss"] < s["unigram_entropy"]


def test_flash_and_naive_attention_train_alike_on_cpu(tmp_path, text_file):
    args = ["--text", str(text_file), "--steps", "5", "--eval-every", "5", *TINY]
    flash = run_train(tmp_path, *args, "--attention", "flash", name="flash")
    naive = run_train(tmp_path, *args, "--attention", "naive", name="naive")
    np.testing.assert_allclose(flash["train_losses"], naive["train_losses"], rtol=1e-4)


def test_resume_continues_the_same_run(tmp_path, text_file):
    args = ["--text", str(text_file), "--warmup", "10", "--eval-every", "100", *TINY]
    whole = run_train(tmp_path, *args, "--steps", "6", name="whole")
    ckpt = tmp_path / "ckpt.npz"
    first = run_train(tmp_path, *args, "--steps", "3", "--save", str(ckpt), name="first")
    assert first["steps"] == 3 and ckpt.exists()
    resumed = run_train(tmp_path, "--resume", str(ckpt), "--steps", "6", "--device", "cpu", "--eval-every", "100",
                        name="resumed")  # the text, model and seed come from the checkpoint
    assert resumed["steps"] == 6 and resumed["config"]["width"] == 32
    np.testing.assert_allclose(resumed["train_losses"], whole["train_losses"], rtol=1e-5)
    assert cli.main(["train", "--resume", str(ckpt), "--width", "64", "--device", "cpu",
                     "--out", str(tmp_path / "bad")]) == 2


def test_ctrl_c_ends_cleanly_with_a_summary(tmp_path, text_file, monkeypatch):
    real = tr.learning_rate

    def interrupt_at_step_2(step, cfg):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, cfg)

    monkeypatch.setattr(tr, "learning_rate", interrupt_at_step_2)
    ckpt = tmp_path / "ckpt.npz"
    s = run_train(tmp_path, "--text", str(text_file), "--steps", "50", "--save", str(ckpt), *TINY, status=130)
    assert s["interrupted"] and s["steps"] == 3 and len(s["train_losses"]) == 3
    assert s["final_val_loss"] is not None and ckpt.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_works_without_tqdm_and_matplotlib(tmp_path, text_file, monkeypatch, capsys):
    for name in ("tqdm", "tqdm.auto", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    s = run_train(tmp_path, "--text", str(text_file), "--steps", "3", "--log-every", "1", *TINY)
    assert s["files"]["plot"] is None
    out = capsys.readouterr().out
    assert "step 3/3" in out and "no loss-curve PNG" in out


@pytest.mark.parametrize("args, message", [
    (["--width", "30", "--heads", "4"], "multiple of --heads"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--steps", "0"], "positive"),
])
def test_bad_options_exit_2(tmp_path, text_file, capsys, args, message):
    argv = ["train", "--text", str(text_file), *TINY, *args, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_gpu_requested_without_one(tmp_path, capsys):
    from flashcupy._arrays import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    assert cli.main(["train", "--device", "gpu", "--out", str(tmp_path)]) == 2
    assert "--device gpu" in capsys.readouterr().err


def test_help_lists_the_train_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--text", "--attention", "--seq-len", "--resume", "--dtype", "--eval-every", "--preset"):
        assert option in out


# -- pieces --------------------------------------------------------------------------------------------


def test_unigram_entropy_in_nats():
    assert tr.unigram_entropy(np.arange(256, dtype=np.uint8)) == pytest.approx(math.log(256))
    assert tr.unigram_entropy(np.frombuffer(b"abab", np.uint8)) == pytest.approx(math.log(2))


def test_learning_rate_schedule():
    cfg = tr.TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert tr.learning_rate(0, cfg) == pytest.approx(0.1)
    assert tr.learning_rate(9, cfg) == pytest.approx(1.0)
    assert tr.learning_rate(10, cfg) == pytest.approx(1.0)
    assert tr.learning_rate(55, cfg) == pytest.approx(0.55)
    assert tr.learning_rate(100, cfg) == pytest.approx(0.1)
    lrs = [tr.learning_rate(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_batch_order_depends_only_on_seed_and_step():
    a = tr.batch_offsets(10_000, tr.TrainConfig(steps=5, batch_size=3, seq_len=8, seed=7))
    b = tr.batch_offsets(10_000, tr.TrainConfig(steps=9, batch_size=3, seq_len=8, seed=7))
    np.testing.assert_array_equal(a, b[:5])
    assert a.max() <= 10_000 - 8 - 1


def test_windows_are_next_byte_pairs():
    data = np.arange(50, dtype=np.uint8)
    x, y = tr.windows(data, np.array([0, 10]), 4, np)
    np.testing.assert_array_equal(x, [[0, 1, 2, 3], [10, 11, 12, 13]])
    np.testing.assert_array_equal(y, x + 1)


def test_parameter_count_and_init():
    cfg = tr.resolve(tr.TrainConfig(layers=2, width=16, heads=2, seq_len=8, device="cpu"), np)
    model = tr.GPT(cfg, np)
    c = 16
    assert model.size == 256 * c + 8 * c + 2 * (12 * c * c + 13 * c) + 2 * c + c * 256
    assert np.all(model.params["h1.ln2.w"].data == 1) and np.all(model.params["h0.attn.qkv.b"].data == 0)
    assert model.params["wte"].grad.base is model.flat_grad  # grads are views of the flat buffer


def test_compare_torch_trains_the_identical_model(tmp_path, text_file):
    """--compare-torch: the PyTorch twin (same init, batches, schedule, AdamW, clipping) follows
    flashcupy's run step for step on the CPU in float32 (both exact; only summation order differs),
    and the summary holds both runs and their comparison. Skipped without torch (as in CI)."""
    pytest.importorskip("torch")
    s = run_train(tmp_path, "--text", str(text_file), "--steps", "12", "--eval-every", "6", *TINY, "--compare-torch")
    twin, c = s["torch"], s["comparison"]
    assert len(twin["train_losses"]) == 12 and [st for st, _ in twin["val_losses"]] == [6, 12]
    np.testing.assert_allclose(twin["train_losses"], s["train_losses"], rtol=1e-5)
    assert twin["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    assert c["tokens_per_s_ratio"] > 0 and c["tail_steps"] >= 1 and twin["autocast"] is None


def test_compare_torch_refuses_resume(tmp_path, text_file, capsys):
    assert cli.main(["train", "--text", str(text_file), *TINY, "--resume", str(tmp_path / "x.npz"),
                     "--compare-torch", "--out", str(tmp_path)]) == 2
    assert "--compare-torch" in capsys.readouterr().err


# -- GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_flash_and_naive_losses_agree(tmp_path):
    """Same seed and data: the first 20 step losses agree within 2% (issue 6 asks 50 steps of the default)."""
    pytest.importorskip("cupy")
    args = ["--text", str(Path(tr.__file__).parent), "--steps", "20", "--layers", "2", "--width", "128",
            "--heads", "2", "--seq-len", "256", "--batch-size", "4", "--device", "gpu", "--eval-every", "20"]
    flash = run_train(tmp_path, *args, "--attention", "flash", name="flash")
    naive = run_train(tmp_path, *args, "--attention", "naive", name="naive")
    assert flash["attention_dtype"] == "bfloat16" and flash["device"].startswith("gpu")
    np.testing.assert_allclose(flash["train_losses"], naive["train_losses"], rtol=0.02)
    assert flash["train_losses"][-1] < flash["train_losses"][0]


def test_long_preset_sets_the_long_context_and_explicit_options_win(tmp_path, text_file):
    """--preset long: context 2048 bytes, one sequence a step on the CPU (16384 on the GPU); an option
    given explicitly overrides the preset's value."""
    cfg = tr.resolve(tr.TrainConfig(preset="long"), np)
    assert (cfg.seq_len, cfg.batch_size, cfg.steps) == (2048, 1, 200) and cfg.layers == tr.DEFAULTS["cpu"]["layers"]
    assert tr.PRESETS["long"]["gpu"]["seq_len"] == 16384
    assert tr.resolve(tr.TrainConfig(preset="long", seq_len=512), np).seq_len == 512
    s = run_train(tmp_path, "--text", str(text_file), "--preset", "long", "--steps", "2", "--eval-every", "2",
                  "--layers", "1", "--width", "32", "--heads", "2", "--seq-len", "256", "--device", "cpu")
    assert s["config"]["preset"] == "long" and s["config"]["batch_size"] == 1 and s["config"]["seq_len"] == 256
    assert s["steps"] == 2 and all(math.isfinite(x) for x in s["train_losses"])
