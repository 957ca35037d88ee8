"""bench/sanitize_all.py and bench/sanitize_all.sh without a GPU (issue 19 item 3): --list plans every
family from the dispatcher's choosers, each call goes to its family's launcher with its config and
features (launchers mocked), the summary parser rejects errors, hazards, missing summaries and missing
calls in canned compute-sanitizer logs, and the shell driver's exit status follows the parser (with a
stand-in compute-sanitizer and Python)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashcupy import _configs, _dispatch, _gpu_sm90, _gpu_sm90_bwd
from flashcupy._device import DeviceInfo

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "sanitize_all.py"
SHELL = ROOT / "bench" / "sanitize_all.sh"


def _load():
    spec = importlib.util.spec_from_file_location("sanitize_all", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sanitize_all"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


sa = _load()
H200, A100 = DeviceInfo.for_cc(90), DeviceInfo.for_cc(80)
KB99 = H200.capped(_configs.SMEM_99KB)


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------ the plan

def test_list_needs_no_gpu_and_names_every_family():
    res = _run("--list", "--cc", "90")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for family in sa.FAMILIES:
        count = next(line for line in lines if line.startswith(f"{family}: "))
        assert int(count.split()[1]) > 0, count
        assert any(line.startswith(f"  {family} ") for line in lines), family
    undispatched = [c for c in sa.plan(H200) if not c.dispatched]  # the Hopper modes not routed yet
    assert res.stdout.count("kernel only: not dispatched yet") == len(undispatched)
    res = _run("--list", "--cc", "80")  # no Hopper family off sm_90: one skip line says so
    assert res.returncode == 0 and "skip wgmma:" in res.stdout and "wgmma: 0 calls" in res.stdout
    assert "mma16 " in res.stdout and "chunked " in res.stdout
    assert _run("--list", "--families", "tf32", "--cc", "90").stdout.count("\n  tf32 ") == len(sa.plan(H200, ["tf32"]))


def test_running_needs_a_gpu_and_cc_is_for_list_only():
    from flashcupy._arrays import gpu_available

    if gpu_available():
        pytest.skip("a GPU is here: the script would run its calls")
    res = _run("--families", "chunked")
    assert res.returncode != 0 and "--list" in res.stderr
    res = _run("--cc", "90")
    assert res.returncode != 0 and "only with --list" in res.stderr


@pytest.mark.parametrize("device", [H200, A100, KB99, DeviceInfo.for_cc(86)],
                         ids=["sm_90", "sm_80", "sm_90@99KB", "sm_86"])
def test_plan_launches_every_config_the_choosers_return(device):
    """Every fp16/bf16 mma.sync config (any block-mask class), every float config and, on sm_90, the Hopper
    configs the dispatcher routes, forward and backward, each causal and not: some planned call launches it."""
    calls = sa.plan(device)
    launched = {(c.family, d, cfg, c.causal) for c in calls for d, cfg in (("fwd", c.fwd), ("bwd", c.bwd))
                if cfg is not None}
    want = set()
    for bucket in _configs.HEAD_DIM_BUCKETS:
        hd = sa.HEAD_DIM[bucket]
        for causal in (False, True):
            for sparse in _configs.SPARSE_CLASSES:
                for d, fn in (("fwd", _configs.fwd_config), ("bwd", _configs.bwd_config)):
                    cfg = fn(hd, np.float16, causal, device, sparse)
                    if cfg is not None:
                        want.add(("mma16", d, cfg, causal))
            for family, dtype, tf32 in (("simt", np.float32, False), ("dmma", np.float64, False),
                                        ("tf32", np.float32, True)):
                f = _dispatch.forward_plan(dtype, hd, causal, device, allow_tf32=tf32)
                b = _dispatch.backward_plan(dtype, hd, causal, device, allow_tf32=tf32)
                for d, p in (("fwd", f), ("bwd", b)):
                    if p is not None and (family == "dmma" or p.family == family):
                        want.add((family, d, p.config, causal))
    if device.cc == 90:
        for hd in (64, 128):
            for causal in (False, True):
                for d, plan_fn in (("fwd", _gpu_sm90.plan_config), ("bwd", _gpu_sm90_bwd.plan_config)):
                    cfg = plan_fn(hd, device, causal=causal)
                    if cfg is not None:
                        want.add(("wgmma", d, cfg, causal))
    assert want and want <= launched, sorted(map(str, want - launched))
    assert {c.family for c in calls} == ({*sa.FAMILIES} if device.cc == 90 else {*sa.FAMILIES} - {"wgmma"})
    assert len(calls) <= 200  # racecheck of all of it must stay a few minutes
    assert len({c.name for c in calls}) == len(calls)  # one line per call in the logs


def test_plan_covers_each_feature_and_no_call_twice():
    calls = sa.plan(H200)
    mma = [c for c in calls if c.family == "mma16"]
    for feature in ("plain", "dropout", "deterministic", "mask64x64", "mask64x128", "mask128x64", "mask128x128"):
        assert {c.causal for c in mma if c.feature == feature} == {False, True}, feature
    assert {c.dtype for c in mma} == {"fp16", "bf16"}
    # deterministic only where it launches other kernels: the atomic-dQ configs (not hd 32 / 64)
    assert {c.head_dim for c in mma if c.feature == "deterministic"} == {
        sa.HEAD_DIM[b] for b in _configs.HEAD_DIM_BUCKETS if _configs.bwd_config(b, np.float16, False, H200).dq_atomic}
    hopper = [c for c in calls if c.family == "wgmma"]
    assert {(c.feature, c.backward) for c in hopper} == {
        ("plain", True), ("dropout", False), ("mask128x128", True), ("deterministic", True), ("window", True),
        ("scores", True)}
    # issue 16's features in every fused family, each call in its FEAT specialization
    for family in ("mma16", "wgmma", "simt", "dmma", "tf32"):
        assert {c.feature for c in calls if c.family == family} >= {"scores"}, family
    assert all(c.feat for c in calls if c.feature in sa.SCORE_FEATURES)
    assert not any(c.feat for c in calls if c.feature not in sa.SCORE_FEATURES)
    for c in hopper:  # "kernel only" exactly where the dispatcher sends the problem elsewhere
        dt = sa._np_dtype(c.dtype)
        f = _dispatch.forward_plan(dt, c.head_dim, c.causal, H200, dropout=c.dropout, sparse_blocks=c.blocks,
                                   features=c.feat)
        b = _dispatch.backward_plan(dt, c.head_dim, c.causal, H200, sparse_blocks=c.blocks,
                                    deterministic=c.deterministic, features=c.feat)
        routed = f == (_dispatch.WGMMA, c.fwd) and (not c.backward or b == (_dispatch.WGMMA, c.bwd))
        assert c.dispatched == routed, c.name
    assert all(c.dispatched for c in hopper if c.feature == "plain")
    assert all(c.blocks in (None, sa.HOPPER_MASK) for c in hopper)
    first_undispatched = next(i for i, c in enumerate(calls) if not c.dispatched)
    assert all(not c.dispatched for c in calls[first_undispatched:])  # kernel-only modes run last
    assert {c.feature for c in calls if c.family == "simt"} == {"plain", "deterministic", "scores"}
    assert [c.bwd for c in calls if c.family == "dmma" and c.head_dim > 160] and all(
        isinstance(c.bwd, _configs.SimtBwdConfig) for c in calls if c.family == "dmma" and c.head_dim > 160)
    assert all(isinstance(c.fwd, _configs.DmmaFwdConfig) and c.fwd.elem == "float" for c in calls if c.family == "tf32")
    assert {(c.dtype, c.feature) for c in calls if c.family == "chunked"} >= {
        ("fp32", "plain"), ("fp32", "dropout"), ("fp32", "mask64x64")}
    keys = [(c.family, c.dtype, c.head_dim, c.causal, c.feature) for c in calls]
    assert len(set(keys)) == len(keys)


def test_99kb_plan_runs_only_fitting_configs_and_forward_only_where_the_backward_is_chunked():
    calls = sa.plan(KB99)
    for c in calls:
        for cfg in (c.fwd, c.bwd):
            assert cfg is None or cfg.max_smem_bytes <= _configs.SMEM_99KB, (c.name, cfg)
    fwd_only = {(c.family, c.head_dim) for c in calls if not c.backward}
    assert ("dmma", 248) in fwd_only  # float64 backward above 224 runs chunked at 99 KB
    # no Hopper backward fits 99 KB: the forward's modes only (deterministic would repeat the plain forward)
    hopper = [c for c in calls if c.family == "wgmma"]
    assert ({c.feature for c in hopper} == {"plain", "dropout", "mask128x128", "window", "scores"}
            and not any(c.backward for c in hopper))
    assert {c.head_dim for c in hopper} == {64}  # the hd128 tile needs 229 KB


def test_shards_partition_the_plan():
    calls = sa.plan(H200)
    shards = [calls[i::3] for i in range(3)]
    assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in calls)
    res = _run("--list", "--cc", "90", "--shard", "1/3")
    assert res.returncode == 0 and f": {len(shards[1])} calls" in res.stdout.splitlines()[0]
    assert _run("--list", "--shard", "3/3").returncode != 0


# -------------------------------------------------------------------------- running a call (mocked)

class _DevArray(np.ndarray):
    """A NumPy array standing in for a CuPy one (.get() copies to the host)."""

    def get(self):
        return np.asarray(self).copy()


class _FakeCupy:
    float32 = np.float32

    @staticmethod
    def asarray(x):
        return np.asarray(x).view(_DevArray)

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        class Device:
            def synchronize(self):
                pass


@pytest.fixture
def mocked(monkeypatch):
    """cupy replaced by NumPy, every launcher by a recorder returning fresh finite outputs."""
    from flashcupy import _gpu, _gpu_simt, interface

    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy)
    calls, rng = [], np.random.default_rng()

    def out_lse(q):
        b, sq, h, _ = q.shape
        return _FakeCupy.asarray(rng.standard_normal(q.shape)), _FakeCupy.asarray(rng.standard_normal((b, h, sq)))

    def forward(name):
        def fn(q, k, v, shape, **kw):
            calls.append((name, "fwd", kw))
            return out_lse(q)
        return fn

    def backward(name):
        def fn(do, q, k, v, out, lse, shape, **kw):
            calls.append((name, "bwd", kw))
            return tuple(_FakeCupy.asarray(rng.standard_normal(x.shape)) for x in (q, k, v))
        return fn

    def public_forward(q, k, v, **kw):
        calls.append(("public", "fwd", {**kw, "FORCE_CC": os.environ.get("FLASHCUPY_FORCE_CC")}))
        return interface.AttnForward(*out_lse(q), None)

    def public_backward(do, q, k, v, forward=None, **kw):
        calls.append(("public", "bwd", {**kw, "FORCE_CC": os.environ.get("FLASHCUPY_FORCE_CC")}))
        return tuple(_FakeCupy.asarray(rng.standard_normal(x.shape)) for x in (q, k, v))

    monkeypatch.setattr(_gpu, "forward", forward("gpu"))
    monkeypatch.setattr(_gpu, "backward", backward("gpu"))
    monkeypatch.setattr(_gpu_simt, "forward", forward("simt"))
    monkeypatch.setattr(_gpu_simt, "backward", backward("simt"))
    monkeypatch.setattr(interface, "flash_attn_forward", public_forward)
    monkeypatch.setattr(interface, "flash_attn_backward", public_backward)
    monkeypatch.setattr(interface, "kernel_path", lambda *a, **k: "chunked path on the GPU")
    return calls


def test_each_call_reaches_its_launcher_with_its_config_and_features(mocked):
    force_cc = os.environ.get("FLASHCUPY_FORCE_CC")
    inputs = sa._Inputs(int(np.random.default_rng().integers(2**31)))
    calls = sa.plan(H200)
    for call in calls:
        mocked.clear()
        sa.run_call(call, inputs)
        launcher = {"mma16": "gpu", "wgmma": "gpu", "chunked": "public"}.get(call.family, "simt")
        assert [(n, d) for n, d, _ in mocked] == [(launcher, "fwd")] + ([(launcher, "bwd")] if call.backward else [])
        fwd_kw = mocked[0][2]
        if call.family == "chunked":
            assert fwd_kw["FORCE_CC"] == "75" and mocked[1][2]["FORCE_CC"] == "75"
            assert (fwd_kw["dropout_p"] > 0) == call.dropout
            assert (fwd_kw["block_mask"] is not None) == (call.blocks is not None)
            continue
        assert fwd_kw["config"] is call.fwd and fwd_kw["causal"] == call.causal
        if call.backward:
            bwd_kw = mocked[1][2]
            assert bwd_kw["config"] is call.bwd and bwd_kw["deterministic"] == call.deterministic
        if launcher == "gpu":
            assert (fwd_kw["dropout"] is not None) == call.dropout
            mask = fwd_kw["block_mask"]
            assert (mask is None) == (call.blocks is None)
            if mask is not None:
                assert (mask.block_q, mask.block_k) == call.blocks
                assert not mask.mask[0, 0, -1].any()  # the empty query block
        else:
            assert fwd_kw["allow_tf32"] == (call.family == "tf32")
    assert os.environ.get("FLASHCUPY_FORCE_CC") == force_cc  # the chunked calls' override is undone


def test_inputs_are_ragged_gqa_and_fresh():
    inputs = sa._Inputs(int(np.random.default_rng().integers(2**31)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", _FakeCupy)
        q, k, v, do = inputs.get("fp32", 64)
        q16 = inputs.get("fp16", 64)[0]
    assert q.shape == (2, 200, 4, 64) and k.shape == v.shape == (2, 333, 2, 64) and do.shape == q.shape
    assert q16.dtype == np.float16 and np.array_equal(q16, q.astype(np.float16))  # the same draws, cast
    assert all(np.abs(x).min() > 0 and np.std(x) > 0.5 for x in (q, k, v, do))  # never zeros
    assert not np.array_equal(q[0], q[1])


def test_finite_check_rejects_nan_and_inf_but_allows_empty_rows():
    call = sa.plan(H200, ["chunked"])[0]
    good = np.random.default_rng().standard_normal((2, 3)).view(_DevArray)
    lse = good.copy().view(_DevArray)
    lse[0, 0] = -np.inf  # a row with no visible key
    sa._check_finite(call, [("out", good), ("lse", lse)])
    for name, value in (("out", np.nan), ("out", np.inf), ("dq", -np.inf), ("lse", np.nan), ("lse", np.inf)):
        bad = good.copy().view(_DevArray)
        bad[1, 2] = value
        with pytest.raises(AssertionError, match=name):
            sa._check_finite(call, [(name, bad)])


# ------------------------------------------------------------------------------------ the summaries

def _log(tool, *, summary=None, ok=3, planned=3, done=True, status=None):
    banner = "========= COMPUTE-SANITIZER\n"
    body = f"plan: {planned} calls on NVIDIA H200 (sm_90, 232448 B)\n" if planned is not None else ""
    body += "".join(f"ok mma16 fp16 hd{64 + i} noncausal plain fwd+bwd\n" for i in range(ok))
    body += f"done: {ok} calls ok\n" if done else ""
    if summary is None:
        summary = ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" if tool == "racecheck"
                   else "========= ERROR SUMMARY: 0 errors")
    tail = f"sanitize_all.sh: exit status {status}\n" if status is not None else ""
    return banner + body + (summary + "\n" if summary else "") + tail


@pytest.mark.parametrize("tool", sa.TOOLS)
def test_clean_log_passes(tool):
    passed, line = sa.summarize(tool, _log(tool, status=0))
    assert passed and line.startswith(f"{tool}: ") and line.endswith("3/3 calls ok: PASS"), line


@pytest.mark.parametrize("tool", ["memcheck", "synccheck", "initcheck"])
@pytest.mark.parametrize("n", [1, 2, 17])
def test_nonzero_error_count_fails(tool, n):
    s = "s" if n > 1 else ""
    passed, line = sa.summarize(tool, _log(tool, summary=f"========= ERROR SUMMARY: {n} error{s}"))
    assert not passed and f"{n} errors" in line and "FAIL" in line


def test_error_count_is_the_summary_not_the_unprinted_count():
    """Past --print-limit the tool adds "ERROR SUMMARY: M errors were not printed" after the total (the
    H200 synccheck log of 2026-12-03: 832 errors, 732 not printed); the count is the total."""
    text = _log("synccheck", summary="========= ERROR SUMMARY: 832 errors\n"
                                     "========= ERROR SUMMARY: 732 errors were not printed. Use --print-limit "
                                     "option to adjust the number of printed errors")
    passed, line = sa.summarize("synccheck", text)
    assert not passed and "832 errors" in line and "732" not in line


@pytest.mark.parametrize("counts", [(1, 1, 0), (2, 0, 2), (5, 3, 2)])
def test_racecheck_hazard_fails(counts):
    h, e, w = counts
    text = _log("racecheck", summary=f"========= RACECHECK SUMMARY: {h} hazard{'s' * (h > 1)} displayed "
                                     f"({e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)})")
    passed, line = sa.summarize("racecheck", text)
    assert not passed and f"{h} hazards ({e} errors, {w} warnings)" in line and "hazards reported" in line


@pytest.mark.parametrize("tool", sa.TOOLS)
def test_missing_summary_fails(tool):
    passed, line = sa.summarize(tool, _log(tool, summary=""))
    assert not passed and "SUMMARY" in line.split("FAIL")[1]
    if tool == "racecheck":  # an ERROR SUMMARY is not racecheck's summary
        assert not sa.summarize(tool, _log(tool, summary="========= ERROR SUMMARY: 0 errors"))[0]


@pytest.mark.parametrize("tool", sa.TOOLS)
def test_missing_calls_or_exit_status_fail(tool):
    for kw, why in ((dict(ok=2), "2 of 3 calls ok"), (dict(done=False), "no done line"),
                    (dict(planned=None), "no plan line"), (dict(status=124), "exit status 124")):
        passed, line = sa.summarize(tool, _log(tool, **kw))
        assert not passed and why in line, (kw, line)
    assert not sa.summarize(tool, "")[0]


def test_shard_logs_sum_into_one_line(tmp_path):
    paths = []
    for i, n in enumerate((3, 4)):
        p = tmp_path / f"racecheck-{i}.log"
        p.write_text(_log("racecheck", ok=n, planned=n, status=0))
        paths.append(str(p))
    res = _run("--summarize", "racecheck", *paths)
    assert res.returncode == 0 and res.stdout.strip() == (
        "racecheck: 0 hazards (0 errors, 0 warnings), 7/7 calls ok over 2 logs: PASS")
    Path(paths[1]).write_text(_log("racecheck", summary="========= RACECHECK SUMMARY: 1 hazard displayed "
                                                        "(1 error, 0 warnings)", ok=4, planned=4))
    res = _run("--summarize", "racecheck", *paths, str(tmp_path / "absent.log"))
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 1
    assert "1 hazards (1 errors, 0 warnings) (1 of 3 logs without a summary)" in res.stdout
    assert "log 2: hazards reported" in res.stdout and "log 3: no RACECHECK SUMMARY" in res.stdout
    assert _run("--summarize", "nocheck", paths[0]).returncode == 2


# ------------------------------------------------------------------------------- the shell driver

FAKE_SANITIZER = """#!/usr/bin/env bash
# stand-in compute-sanitizer: --version, or --tool T [options] COMMAND...: runs COMMAND, then prints T's summary
# (FAKE_HAZARDS: racecheck's hazards; FAKE_ERRORS=TOOL:N: that tool's errors; FAKE_NO_SUMMARY=TOOL: none)
[ "$1" = --version ] && { echo "fake compute-sanitizer"; exit 0; }
tool=$2; shift 2
while [ "${1#--}" != "$1" ]; do shift 2; done
"$@"; rc=$?
if [ "$tool" = racecheck ]; then
  n=${FAKE_HAZARDS:-0}; echo "========= RACECHECK SUMMARY: $n hazards displayed ($n errors, 0 warnings)"
elif [ "$tool" != "${FAKE_NO_SUMMARY:-}" ]; then
  n=0; [ "${FAKE_ERRORS%%:*}" = "$tool" ] && n=${FAKE_ERRORS#*:}  # FAKE_ERRORS=TOOL:COUNT
  echo "========= ERROR SUMMARY: $n errors"
fi
exit $rc
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in Python: --list and --summarize go to the real script; a run prints a two-call plan
for a in "$@"; do case $a in --list|--summarize) exec {python} "$@";; esac; done
echo "plan: 2 calls on fake"; echo "ok a"; echo "ok b"; echo "done: 2 calls ok"
"""


@pytest.fixture
def fakes(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    san, py = tmp_path / "compute-sanitizer", tmp_path / "python"
    san.write_text(FAKE_SANITIZER)
    py.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    for f in (san, py):
        f.chmod(0o755)
    return dict(SANITIZER=str(san), PYTHON=str(py), WARM_JOBS="2", OUT=str(tmp_path / "out"), PATH=os.environ["PATH"])


def _shell(env, **extra):
    return subprocess.run(["bash", str(SHELL)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, **extra})


def test_shell_passes_a_clean_run_and_prints_one_line_per_tool(fakes):
    res = _shell(fakes, JOBS="4", SHARDS="2")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.endswith(": PASS") and not line.startswith("finished")]
    assert [line.split(":")[0] for line in lines] == list(sa.TOOLS)
    progress = [line for line in res.stdout.splitlines() if line.startswith("finished ")]
    assert len(progress) == 8 and all(line.endswith("2/2 calls ok: PASS") for line in progress)
    assert all("4/4 calls ok over 2 logs" in line for line in lines)
    out = Path(fakes["OUT"])
    assert (out / "summary.txt").read_text().splitlines() == lines
    assert "plan for" in (out / "plan.txt").read_text()
    assert "exit status 0" in (out / "memcheck-1.log").read_text()


@pytest.mark.parametrize("fault,tool", [(dict(FAKE_HAZARDS="2"), "racecheck"),
                                        (dict(FAKE_ERRORS="memcheck:3"), "memcheck"),
                                        (dict(FAKE_NO_SUMMARY="initcheck"), "initcheck")])
def test_shell_fails_on_hazard_error_or_missing_summary(fakes, fault, tool):
    res = _shell(fakes, **fault)
    assert res.returncode == 1, res.stdout + res.stderr
    failed = [line for line in res.stdout.splitlines() if "FAIL" in line and not line.startswith("finished")]
    assert len(failed) == 1 and failed[0].startswith(f"{tool}: "), res.stdout


def test_shell_fails_without_a_sanitizer(fakes, tmp_path):
    res = _shell(fakes, SANITIZER=str(tmp_path / "none"))
    assert res.returncode == 2 and "compute-sanitizer" in res.stderr
