"""The shared memory and the block size a launch asks for come from one source, the CUDA traits
(issue 13, item 5), checked in CI without a GPU.

The launch code passes cfg.smem_bytes (kv_smem_bytes, dq_smem_bytes) as the dynamic shared memory and
cfg.nthreads as the block size; the kernels carve their tiles out of that memory by the traits'
layout and are compiled with __launch_bounds__(Tr::NTHREADS). For every configuration a chooser can
return under any shared-memory budget, this compiles, with NVRTC, a copy of each kernel source
(headers inlined, as the library builds it) followed by one
    static_assert(Traits::SMEM_BYTES == <Python's smem_bytes>) and (Traits::NTHREADS == <nthreads>)
per traits struct. Instantiating a traits struct also runs its own static_asserts (tile shapes, warp
grids), so a table entry the kernels cannot be built for fails here too. The Hopper forward
(flashcupy._gpu_sm90, its own config class) is checked the same way. No kernel template is
instantiated and the target is PTX only (compute_80; compute_90a for the Hopper source), so the
whole check takes seconds, not the minutes of tests/test_compile*.py.
"""

import re

import numpy as np
import pytest

from flashcupy import _build, _configs
from flashcupy._device import DeviceInfo

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def chooser_outputs(device):
    """Every configuration the choosers return on device (None left out), over every bucket, dtype,
    block-mask class and allow_tf32 setting (causal changes no choice)."""
    out = []
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for sparse in _configs.SPARSE_CLASSES:
            out += [_configs.fwd_config(bucket, F16, False, device, sparse),
                    _configs.bwd_config(bucket, F16, False, device, sparse)]
        for dtype in (F32, F64):
            for tf32 in (False, True):
                out += [_configs.float_fwd_config(bucket, dtype, False, device, tf32),
                        _configs.float_bwd_config(bucket, dtype, False, device, tf32)]
        out += [_configs.simt_fwd_config(bucket, F32, False, device), _configs.simt_bwd_config(bucket, F32, False, device),
                _configs.dmma_fwd_config(bucket, False, device), _configs.dmma_bwd_config(bucket, False, device),
                _configs.tf32_fwd_config(bucket, False, device), _configs.tf32_bwd_config(bucket, False, device)]
        if bucket > 160:
            out.append(_configs.simt_bwd_config(bucket, F64, False, device))
    return [c for c in out if c is not None]


def every_reachable_config():
    """Every configuration a chooser can return under any budget: starting from each class's full
    budget (sm_80, and sm_90, whose DMMA instruction shapes differ), each returned configuration's
    size minus one byte becomes another budget to try (the choosers then take their next candidate),
    until no new configuration appears."""
    found = {}
    for cc in (80, 90):
        full = DeviceInfo.for_cc(cc)
        todo, tried = [full.smem_optin], set()
        while todo:
            budget = todo.pop()
            if budget in tried:
                continue
            tried.add(budget)
            for cfg in chooser_outputs(full.capped(budget)):
                found.setdefault(cfg, None)
                todo.append(cfg.max_smem_bytes - 1)
    return list(found)


def _assert_program(source: str, checks):
    """The source of cuda/<source> plus one templated static_assert per (traits, member, value): a
    failure's message names the instantiation [with GOT=compiled value, WANT=Python value, INDEX=i]."""
    lines = ["template <long long GOT, long long WANT, int INDEX> struct fc_check {",
             '    static_assert(GOT == WANT, "traits constant (GOT) != flashcupy._configs (WANT); INDEX: tests/test_smem.py");',
             "    static constexpr bool ok = true;", "};"]
    for i, (traits, member, value) in enumerate(checks):
        lines.append(f"static_assert(fc_check<{traits}::{member}, {value}, {i}>::ok, \"\");")
    return _build.load_source(source) + "\n// ---- tests/test_smem.py ----\n" + "\n".join(lines) + "\n"


def nvrtc_check(code: str, name: str, arch: str = "compute_80"):
    """(ok, log) of compiling code to PTX with NVRTC and the library's options."""
    return _build.nvrtc_compile_source(code, [], arch, name)[:2]


def checks_by_source(configs):
    """{source: [(traits, member, value)]}, without repeats."""
    out = {}
    for cfg in configs:
        for source, traits, smem, nthreads in cfg.traits_checks():
            rows = out.setdefault(source, {})
            rows[traits, "SMEM_BYTES", smem] = None
            rows[traits, "NTHREADS", nthreads] = None
    return {s: list(rows) for s, rows in out.items()}


def _failures(log: str, checks) -> str:
    bad = []
    for got, want, i in re.findall(r"GOT=(-?\d+)\w*, WANT=(-?\d+)\w*, INDEX=(\d+)", log):
        traits, member, _ = checks[int(i)]
        bad.append(f"{traits}::{member} = {got}, Python says {want}")
    return "\n".join(dict.fromkeys(bad))


def sm90_checks():
    """{source: checks} of the Hopper forward (flashcupy._gpu_sm90: its own config class, planned by
    flashcupy._dispatch on sm_90): every config plan_config returns and every sweep candidate."""
    try:
        from flashcupy import _gpu_sm90
    except ImportError:
        return {}
    h100 = DeviceInfo.for_cc(90)
    cfgs = dict.fromkeys([*(_gpu_sm90.plan_config(hd, h100) for hd in range(8, 129, 8)), *_gpu_sm90.SWEEP])
    rows = {}
    for cfg in cfgs:
        if cfg is not None:
            for elem in ("Fp16", "Bf16"):
                rows[cfg.traits(elem), "SMEM_BYTES", cfg.smem_bytes] = None
                rows[cfg.traits(elem), "NTHREADS", cfg.nthreads] = None
    return {_gpu_sm90.SOURCE: list(rows)} if rows else {}


REACHABLE = every_reachable_config()
CHECKS = {**checks_by_source(REACHABLE), **sm90_checks()}
TARGET = {"flash_fwd_sm90.cu": "compute_90a"}  # wgmma / TMA / setmaxnreg: sm_90a only; the rest compute_80


def test_every_source_and_family_is_checked():
    assert set(CHECKS) - {"flash_fwd_sm90.cu"} == {"flash_fwd.cu", "flash_bwd.cu", "flash_simt_fwd.cu",
                                                    "flash_simt_bwd.cu", "flash_dmma_fwd.cu", "flash_dmma_bwd.cu"}
    kinds = {type(c).__name__ for c in REACHABLE}
    assert kinds == {"FwdConfig", "BwdConfig", "SimtFwdConfig", "SimtBwdConfig", "DmmaFwdConfig", "DmmaBwdConfig"}
    # every configuration CI compiles (and the library can launch on a class it knows) is among them
    for devices in _configs.ARCH_DEVICES.values():
        for device in devices:
            assert set(chooser_outputs(device)) <= set(REACHABLE), device


@pytest.mark.parametrize("source", sorted(CHECKS))
def test_smem_bytes_and_nthreads_equal_the_traits(source):
    checks = CHECKS[source]
    ok, log = nvrtc_check(_assert_program(source, checks), f"test_smem_{source}", TARGET.get(source, "compute_80"))
    assert ok, (f"{source}: the Python configs and the CUDA traits disagree (or the source does not "
                f"compile):\n{_failures(log, checks) or log[-6000:]}")


def test_a_wrong_size_is_caught():
    """The check itself works: a value off by one byte fails to compile and the message names it."""
    cfg = _configs.fwd_config(128, F16, False, 90)
    checks = [(cfg.traits("Fp16"), "SMEM_BYTES", cfg.smem_bytes + 1)]
    ok, log = nvrtc_check(_assert_program("flash_fwd.cu", checks), "test_smem_wrong")
    assert not ok
    assert _failures(log, checks) == f"{cfg.traits('Fp16')}::SMEM_BYTES = {cfg.smem_bytes}, Python says {cfg.smem_bytes + 1}"
