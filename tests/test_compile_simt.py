"""Compile every float32 / float64 kernel specialization (cuda/flash_simt_*.cu, and the float64 and
TF32 tensor-core kernels cuda/flash_dmma_*.cu) with bare NVRTC for sm_80, sm_86 and sm_90a (no GPU
needed) and check the ptxas report: no error, no spill. Check that every configuration
float_fwd_config / float_bwd_config return for each arch's devices fits its shared memory (sm_86:
99 KB). Prints the register report (pytest -s, or on failure).

What each arch compiles (as tests/test_compile.py): sm_80 and sm_90a every configuration the
choosers return for any device of flashcupy._configs.ARCH_DEVICES (both DMMA instruction shapes:
FLASHCUPY_FORCE_CC=86 runs m8n8k4 on an H200) plus the candidates bench/bench_simt.py --sweep
times and the m16n8k8 variants it benchmarks; sm_86 only the configurations sm_86 chooses that
sm_80 at its full 163 KB does not (the 99 KB candidates). The NVRTC programs run in parallel
processes (cuda-bindings holds the GIL while NVRTC compiles)."""

import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from helpers import sweep_candidates

from flashcupy import _build, _configs
from flashcupy._device import DeviceInfo

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_86", "sm_90a")
SOURCES = ("flash_simt_fwd.cu", "flash_simt_bwd.cu", "flash_dmma_fwd.cu", "flash_dmma_bwd.cu")


def chosen(devices, head_dims=_configs.HEAD_DIM_BUCKETS):
    """{config: None} of every float_fwd_config / float_bwd_config output for devices."""
    out = {}
    for device in devices:
        for bucket in head_dims:
            for dtype in (np.float32, np.float64):
                for tf32 in (False, True):
                    for fn in (_configs.float_fwd_config, _configs.float_bwd_config):
                        cfg = fn(bucket, dtype, False, device, tf32)
                        if cfg is not None:
                            out[cfg] = None
    return out


def _with_katom8(configs):
    """The configs and, where a kernel runs m16n8k16 (katom 16), its m16n8k8 variant (benchmarked)."""
    out = []
    for cfg in configs:
        out.append(cfg)
        if isinstance(cfg, (_configs.DmmaFwdConfig, _configs.DmmaBwdConfig)) and cfg.elem == "double":
            fields = ["katom"] if isinstance(cfg, _configs.DmmaFwdConfig) else ["kv_katom", "dq_katom"]
            out += [dataclasses.replace(cfg, **{f: 8}) for f in fields if getattr(cfg, f) == 16]
    return out


def configs_for(arch: str):
    """The configurations CI compiles for arch (module docstring)."""
    if arch == "sm_86":
        full_80 = chosen([DeviceInfo.for_cc(80)])
        return [c for c in chosen(_configs.ARCH_DEVICES["sm_86"]) if c not in full_80]
    sweep_fwd, sweep_dmma_bwd = sweep_candidates()
    every = chosen([d for a in ("sm_80", "sm_90a") for d in _configs.ARCH_DEVICES[a]])
    return list(dict.fromkeys([*_with_katom8(every), *sweep_fwd, *sweep_dmma_bwd]))


def kernel_names(source: str, arch: str):
    """Every kernel of source that the configurations of arch launch (every backward family's
    preprocess kernel lives in flash_simt_bwd.cu)."""
    names = set()
    for cfg in configs_for(arch):
        if cfg.source == source:
            names |= {cfg.kernel_name()} if hasattr(cfg, "kernel_name") else {cfg.kv_kernel_name(), cfg.dq_kernel_name()}
        if source == "flash_simt_bwd.cu" and hasattr(cfg, "preprocess_kernel_name"):
            names.add(cfg.preprocess_kernel_name())
    return sorted(names)


def _jobs():
    jobs = [(src, arch, kernel_names(src, arch)) for src in SOURCES for arch in ARCHS]
    return sorted([j for j in jobs if j[2]], key=lambda j: -len(j[2]))  # longest first


@pytest.fixture(scope="module")
def compiled():
    jobs = _jobs()
    with ProcessPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(_build.nvrtc_compile, *zip(*[(src, names, arch) for src, arch, names in jobs])))
    return {(src, arch): res for (src, arch, _), res in zip(jobs, results)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_specializations_compile_without_spills(compiled, source, arch):
    names = kernel_names(source, arch)
    if not names:
        pytest.skip(f"no {source} configuration of {arch} differs from sm_80's")
    ok, log, lowered = compiled[source, arch]
    assert ok, log
    report = _build.ptxas_report(log)
    lines, spilled = [], []
    for name in names:
        r = report[lowered[name]]
        line = f"{arch} {name}: {r['regs']} regs, {r['spill_stores']} B spill st, {r['spill_loads']} B spill ld"
        lines.append(line)
        if r["spill_stores"] or r["spill_loads"] or r["stack"]:
            spilled.append(line)
    print("\n".join(lines))
    assert not spilled, "spills:\n" + "\n".join(spilled)


def test_sm86_compiles_the_99kb_configs():
    extra = configs_for("sm_86")
    assert extra and all(c.max_smem_bytes <= _configs.SMEM_99KB for c in extra)
    assert {type(c).__name__ for c in extra} == {"SimtFwdConfig", "SimtBwdConfig", "DmmaFwdConfig", "DmmaBwdConfig"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_chosen_config_fits_its_budget(arch):
    """Every configuration the float choosers return for the arch's devices (every head dim the
    kernels take, both dtypes, allow_tf32 either way) fits that device's opt-in shared memory."""
    devices = _configs.ARCH_DEVICES[arch]
    for device in devices:
        for head_dim in range(8, 257, 8):
            for dtype in (np.float32, np.float64):
                for tf32 in (False, True):
                    for fn in (_configs.float_fwd_config, _configs.float_bwd_config):
                        cfg = fn(head_dim, dtype, True, device, tf32)
                        if cfg is None:  # the chunked path; only the float64 backward above 224 at 99 KB
                            assert (fn, dtype, device.smem_optin) == (_configs.float_bwd_config, np.float64,
                                                                      _configs.SMEM_99KB) and head_dim > 224
                            continue
                        assert cfg.max_smem_bytes <= device.smem_optin, (arch, device, head_dim, dtype, tf32, cfg)
                        assert cfg.head_dim >= head_dim


def test_sources_inline_every_local_header():
    for source in SOURCES:
        src = _build.load_source(source)
        assert '#include "' not in src
        assert "struct Simt<double>" in src and "cp_async_16" in src
    assert "mma.sync.aligned.m8n8k4.row.col.f64" in _build.load_source("flash_dmma_fwd.cu")


def test_simt_config_tables_cover_every_bucket():
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            f = _configs.simt_fwd_config(bucket, np.float32, causal)
            b = _configs.simt_bwd_config(bucket, np.float32, causal)
            assert f.head_dim == bucket and b.head_dim >= bucket
            assert f.block_m % (4 * f.nwarps) == 0 and f.block_n % 8 == 0
            assert b.block_n % (8 * b.vec) == 0 and b.block_m % 4 == 0
            if bucket > 160:  # float64 on CUDA cores: the backward above the DMMA backward's 160 only
                d = _configs.simt_bwd_config(bucket, np.float64, causal)
                assert d.head_dim == bucket and d.block_n % (8 * d.vec) == 0
    for d in (1, 8, 33, 100, 255):
        assert _configs.simt_fwd_config(d, np.float32, True).head_dim >= d
        assert _configs.simt_bwd_config(d, np.float32, True).head_dim >= d
    with pytest.raises(ValueError, match="head_dim"):
        _configs.simt_fwd_config(264, np.float32, False)
    with pytest.raises(TypeError):
        _configs.simt_fwd_config(64, np.float16, False)


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_float64_chooser_picks_dmma_from_sm80(arch):
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            f = _configs.float_fwd_config(bucket, np.float64, causal, arch)
            b = _configs.float_bwd_config(bucket, np.float64, causal, arch)
            assert isinstance(f, _configs.DmmaFwdConfig)
            assert isinstance(b, _configs.DmmaBwdConfig) == (bucket <= 160)
            assert b is not None or (arch == 86 and bucket == 256)
            # float32 stays on CUDA cores
            assert isinstance(_configs.float_fwd_config(bucket, np.float32, causal, arch), _configs.SimtFwdConfig)
            assert isinstance(_configs.float_bwd_config(bucket, np.float32, causal, arch), _configs.SimtBwdConfig)


@pytest.mark.parametrize("device", [75, 70, DeviceInfo(75, 232448, 40, "sm_75 with a large budget")], ids=str)
def test_no_float_config_before_sm80(device):
    """Below sm_80 no float chooser returns a kernel (whatever the shared memory): the chunked path runs,
    because none of these kernels can be built there (test_kernels_cannot_build_for_sm75)."""
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            for dtype in (np.float32, np.float64):
                for tf32 in (False, True):
                    assert _configs.float_fwd_config(bucket, dtype, causal, device, tf32) is None
                    assert _configs.float_bwd_config(bucket, dtype, causal, device, tf32) is None
            assert _configs.simt_fwd_config(bucket, np.float32, causal, device) is None
            assert _configs.tf32_fwd_config(bucket, causal, device) is None
            assert _configs.dmma_fwd_config(bucket, causal, device) is None


def test_kernels_cannot_build_for_sm75():
    """Why the choosers stop at sm_80: every family loads tiles with cp.async, which ptxas refuses below
    sm_80 (the float kernels here; the fp16/bf16 ones also use cvt.f16x2.f32). The same kernels build for
    sm_80 (the compile tests above)."""
    simt = _configs.simt_fwd_config(64, np.float32, False, 80)
    dmma = _configs.dmma_fwd_config(64, False, 80)
    for source, name in (("flash_simt_fwd.cu", simt.kernel_name()), ("flash_dmma_fwd.cu", dmma.kernel_name())):
        ok, log, _ = _build.nvrtc_compile(source, [name], "sm_75")
        assert not ok and "Feature 'cp.async' requires .target sm_80" in log, (source, log[-500:])


@pytest.mark.parametrize("arch", [80, 86, 90])
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
        assert max(f.smem_bytes, b.kv_smem_bytes, b.dq_smem_bytes) <= DeviceInfo.for_cc(arch).smem_optin
    assert _configs.dmma_bwd_config(192, False, arch) is None  # no DMMA backward above 160
