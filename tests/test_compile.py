"""Compile every kernel specialization with bare NVRTC for sm_80 and sm_90a (no GPU needed) and
check the ptxas report: no error, no spill, registers within the cap. Prints the register report
(pytest -s, or on failure)."""

import pytest

from flashcupy import _build, _configs

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_90a")


def _fwd_names():
    return sorted({cfg.kernel_name(elem, causal) for elem, causal, cfg in _configs.all_fwd_specializations()})


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_specializations_compile_without_spills(arch):
    names = _fwd_names()
    ok, log, lowered = _build.nvrtc_compile("flash_fwd.cu", names, arch)
    assert ok, log
    report = _build.ptxas_report(log)
    lines = []
    for name in names:
        r = report[lowered[name]]
        lines.append(f"{arch} {name}: {r['regs']} regs, {r['spill_stores']} B spill st, {r['spill_loads']} B spill ld")
    print("\n".join(lines))
    assert len(report) == len(names)
    spilled = [ln for ln, name in zip(lines, names) if report[lowered[name]]["spill_stores"] or report[lowered[name]]["spill_loads"]]
    assert not spilled, "spills:\n" + "\n".join(spilled)


def test_sources_inline_every_local_header():
    src = _build.load_source("flash_fwd.cu")
    assert '#include "' not in src
    assert "struct Fp16" in src and "flash_fwd_kernel" in src


def test_config_table_covers_every_bucket():
    for bucket in _configs.HEAD_DIM_BUCKETS:
        cfg = _configs.fwd_config(bucket, None, False)
        assert cfg.head_dim == bucket and cfg.block_m % (16 * cfg.nwarps) == 0
        assert cfg.smem_bytes <= 163 * 1024  # fits sm_80's opt-in limit too
    for d in (1, 8, 33, 100, 255):
        assert _configs.fwd_config(d, None, True).head_dim >= d
    with pytest.raises(ValueError, match="head_dim"):
        _configs.head_dim_bucket(264)
