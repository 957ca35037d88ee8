"""Compile every float32 / float64 kernel specialization (cuda/flash_simt_*.cu, and the float64 and
TF32 tensor-core kernels cuda/flash_dmma_*.cu) with bare NVRTC for sm_80 and sm_90a (no GPU needed) and
check the ptxas report: no error, no spill. Prints the register report (pytest -s, or on failure).
The eight programs (4 sources x 2 archs) compile two at a time."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import sweep_candidates

from flashcupy import _build, _configs

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_90a")
SOURCES = {"flash_simt_fwd.cu": "fwd", "flash_simt_bwd.cu": "bwd", "flash_dmma_fwd.cu": "dmma_fwd",
           "flash_dmma_bwd.cu": "dmma_bwd"}


def _with_katom8(configs, fields):
    """The configs and, where a kernel runs m16n8k16 (katom 16), its m16n8k8 variant (benchmarked)."""
    import dataclasses

    out = []
    for cfg in configs:
        out.append(cfg)
        out += [dataclasses.replace(cfg, **{f: 8}) for f in fields if getattr(cfg, f) == 16]
    return out


def kernel_names(source: str):
    """Every specialization the library launches, and the candidates bench/bench_simt.py --sweep times."""
    kind = SOURCES[source]
    sweep_fwd, sweep_dmma_bwd = sweep_candidates()
    if kind == "fwd":
        return sorted({cfg.kernel_name() for cfg in [*_configs.all_simt_fwd_specializations(), *sweep_fwd]})
    if kind == "dmma_fwd":
        cfgs = _with_katom8(_configs.all_dmma_fwd_specializations(), ["katom"]) + _configs.all_tf32_fwd_specializations()
        return sorted({cfg.kernel_name() for cfg in cfgs})
    if kind == "dmma_bwd":
        cfgs = _with_katom8(_configs.all_dmma_bwd_specializations(), ["kv_katom", "dq_katom"]) + sweep_dmma_bwd
        cfgs += _configs.all_tf32_bwd_specializations()
        return sorted({n for cfg in cfgs for n in (cfg.kv_kernel_name(), cfg.dq_kernel_name())})
    names = set()
    for cfg in _configs.all_simt_bwd_specializations():
        names |= {cfg.kv_kernel_name(), cfg.dq_kernel_name(), cfg.preprocess_kernel_name()}
    return sorted(names)


@pytest.fixture(scope="module")
def compiled():
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(2) as ex:
        results = ex.map(lambda job: _build.nvrtc_compile(job[0], kernel_names(job[0]), job[1]), jobs)
        return dict(zip(jobs, results))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_specializations_compile_without_spills(compiled, source, arch):
    ok, log, lowered = compiled[source, arch]
    assert ok, log
    report = _build.ptxas_report(log)
    names = kernel_names(source)
    lines, spilled = [], []
    for name in names:
        r = report[lowered[name]]
        line = f"{arch} {name}: {r['regs']} regs, {r['spill_stores']} B spill st, {r['spill_loads']} B spill ld"
        lines.append(line)
        if r["spill_stores"] or r["spill_loads"] or r["stack"]:
            spilled.append(line)
    print("\n".join(lines))
    assert not spilled, "spills:\n" + "\n".join(spilled)


def test_sources_inline_every_local_header():
    for source in SOURCES:
        src = _build.load_source(source)
        assert '#include "' not in src
        assert "struct Simt<double>" in src and "cp_async_16" in src
    assert "mma.sync.aligned.m8n8k4.row.col.f64" in _build.load_source("flash_dmma_fwd.cu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_config_tables_cover_every_bucket(dtype):
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            f = _configs.simt_fwd_config(bucket, dtype, causal)
            b = _configs.simt_bwd_config(bucket, dtype, causal)
            assert f.head_dim == bucket and b.head_dim >= bucket
            assert f.block_m % (4 * f.nwarps) == 0 and f.block_n % 8 == 0
            assert b.block_n % (8 * b.vec) == 0 and b.block_m % 4 == 0
            # fits sm_80's opt-in shared memory (163 KB) as well as sm_90's (227 KB)
            assert f.smem_bytes <= 163 * 1024 and b.smem_bytes <= 163 * 1024
    for d in (1, 8, 33, 100, 255):
        assert _configs.simt_fwd_config(d, dtype, True).head_dim >= d
        assert _configs.simt_bwd_config(d, dtype, True).head_dim >= d
    with pytest.raises(ValueError, match="head_dim"):
        _configs.simt_fwd_config(264, dtype, False)
    with pytest.raises(TypeError):
        _configs.simt_fwd_config(64, np.float16, False)


@pytest.mark.parametrize("arch", [75, 80, 90])
def test_float64_chooser_picks_dmma_from_sm80(arch):
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            f = _configs.float_fwd_config(bucket, np.float64, causal, arch)
            b = _configs.float_bwd_config(bucket, np.float64, causal, arch)
            assert isinstance(f, _configs.DmmaFwdConfig) == (arch >= 80)
            assert isinstance(b, _configs.DmmaBwdConfig) == (arch >= 80 and bucket <= 160)
            # float32 stays on CUDA cores
            assert isinstance(_configs.float_fwd_config(bucket, np.float32, causal, arch), _configs.SimtFwdConfig)
            assert isinstance(_configs.float_bwd_config(bucket, np.float32, causal, arch), _configs.SimtBwdConfig)


@pytest.mark.parametrize("arch", [80, 90])
def test_dmma_config_tables(arch):
    for bucket in _configs.HEAD_DIM_BUCKETS:
        f = _configs.dmma_fwd_config(bucket, False, arch)
        b = _configs.dmma_bwd_config(min(bucket, 160), False, arch)
        assert f.head_dim == bucket and b.head_dim == min(bucket, 160)
        for rows, katom in ((f.block_m // f.nwarps, f.katom), (b.kv_block_n // b.kv_nwarps, b.kv_katom),
                            (b.dq_block_m // b.dq_nwarps, b.dq_katom)):
            assert rows in (8, 16)
            assert katom == (16 if arch >= 90 and rows == 16 else 4)  # m16 shapes: sm_90, 16-row warps
        assert f.block_n % 16 == 0 and b.kv_block_m % 16 == 0 and b.dq_block_n % 16 == 0
        assert (bucket // 16) % b.d_split == 0
        # fits sm_80's opt-in shared memory (163 KB) as well as sm_90's (227 KB)
        assert max(f.smem_bytes, b.kv_smem_bytes, b.dq_smem_bytes) <= 163 * 1024
