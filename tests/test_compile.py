"""Compile every kernel specialization with bare NVRTC for sm_80 and sm_90a (no GPU needed) and
check the ptxas report: no error, no spill, registers within the cap. Prints the register report
(pytest -s, or on failure)."""

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from flashcupy import _build, _configs

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_90a")


def _fwd_names():
    return sorted({cfg.kernel_name(elem, causal, dropout)
                   for elem, causal, dropout, cfg in _configs.all_fwd_specializations()})


def _bwd_names():
    names = set()
    for elem, causal, dropout, cfg in _configs.all_bwd_specializations():
        # the main kernel with atomic dQ only where the config uses it; without (deterministic) always
        names |= {cfg.kernel_name(elem, causal, cfg.dq_atomic, dropout), cfg.kernel_name(elem, causal, False, dropout),
                  cfg.dq_kernel_name(elem, causal, dropout), f"flash_bwd_preprocess_kernel<{elem}>",
                  f"flash_bwd_convert_kernel<{elem}>"}
    return sorted(names)


FAMILIES = {"flash_fwd.cu": _fwd_names, "flash_bwd.cu": _bwd_names}
CHUNKS = 2  # each family is compiled as CHUNKS NVRTC programs per arch, all in a thread pool


@pytest.fixture(scope="module")
def compiled():
    """{(source, arch): (ok, log, lowered)} for every family; the NVRTC programs run in parallel
    processes (cuda-bindings holds the GIL while NVRTC compiles, so threads would run serially)."""
    jobs = [(src, arch, FAMILIES[src]()[i::CHUNKS]) for src in FAMILIES for arch in ARCHS for i in range(CHUNKS)]
    with ProcessPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(_build.nvrtc_compile, *zip(*[(src, names, arch) for src, arch, names in jobs])))
    merged = {}
    for (src, arch, _), (ok, log, lowered) in zip(jobs, results):
        prev = merged.get((src, arch), (True, "", {}))
        merged[src, arch] = (prev[0] and ok, prev[1] + log, {**prev[2], **lowered})
    return merged


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(FAMILIES))
def test_specializations_compile_without_spills(compiled, source, arch):
    names = FAMILIES[source]()
    ok, log, lowered = compiled[source, arch]
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


@pytest.mark.parametrize("source", sorted(FAMILIES))
def test_sources_inline_every_local_header(source):
    src = _build.load_source(source)
    assert '#include "' not in src
    assert src.count("struct Fp16 {") == 1


def test_config_table_covers_every_bucket():
    for bucket in _configs.HEAD_DIM_BUCKETS:
        cfg = _configs.fwd_config(bucket, None, False)
        assert cfg.head_dim == bucket and cfg.block_m % (16 * cfg.nwarps) == 0
        assert cfg.smem_bytes <= 163 * 1024  # fits sm_80's opt-in limit too
        bcfg = _configs.bwd_config(bucket, None, False)
        assert bcfg.head_dim == bucket and bcfg.block_n % 16 == 0 and bucket % (16 * bcfg.d_split) == 0
        assert bcfg.smem_bytes <= 163 * 1024 and bcfg.dq_smem_bytes <= 163 * 1024
    for d in (1, 8, 33, 100, 255):
        assert _configs.fwd_config(d, None, True).head_dim >= d
    with pytest.raises(ValueError, match="head_dim"):
        _configs.head_dim_bucket(264)
