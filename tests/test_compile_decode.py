"""Compile every split-KV decode specialization (cuda/flash_decode.cu) that flashcupy._gpu_decode
.decode_config can choose, with bare NVRTC for sm_80 and sm_90a (no GPU needed), and check the ptxas
report: no error, no spill, no more than 255 registers. The FEAT bits compiled are the plain contiguous
kernel and (sm_90a) all of them (window, softcap, ALiBi, sink) paged; rows 1..8 as the chooser picks
them for every dtype and head dim. Prints the register report (pytest -s, or on failure)."""

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from flashcupy import _build, _gpu_decode
from flashcupy._arrays import bfloat16

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

DTYPES = [np.float16, np.float32, np.float64] + ([bfloat16()] if bfloat16() is not None else [])
ARCHS = ("sm_80", "sm_90a")


def configs():
    out = {}
    for dtype in DTYPES:
        for d in _gpu_decode.HEAD_DIMS:
            for rows in (1, 2, 4, 8, 16, 32):
                out[_gpu_decode.decode_config(dtype, d, rows)] = None
    return list(out)


def names(arch):
    """sm_90a (the H100 / H200): every config plain and contiguous, and with every FEAT bit and paged (the
    two ends of the specializations); sm_80: the plain contiguous ones (CI's time)."""
    out = []
    for cfg in configs():
        out.append(cfg.kernel_name(0, False))
        if arch == "sm_90a":
            out.append(cfg.kernel_name(15, True))
        for feat in (0, 15):
            if cfg.combine_name(feat) not in out:
                out.append(cfg.combine_name(feat))
    return out


def _compile(arch):
    ok, log, _ = _build.nvrtc_compile(_gpu_decode.SOURCE, names(arch), arch)
    return ok, log


@pytest.fixture(scope="module")
def reports():
    with ProcessPoolExecutor(len(ARCHS)) as pool:
        return dict(zip(ARCHS, pool.map(_compile, ARCHS)))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decode_specialization_compiles_without_spills(arch, reports):
    ok, log = reports[arch]
    assert ok, log[:3000]
    rep = _build.ptxas_report(log)
    assert len(rep) == len(names(arch)), f"{len(rep)} kernels reported, {len(names(arch))} compiled"
    for name, r in sorted(rep.items()):
        print(f"{arch} {name[:100]:100s} {r['regs']:3d} regs, spill {r['spill_stores']} B")
    spills = {n: r for n, r in rep.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"spills: {spills}"


def test_config_rows_cover_the_group_and_fit_shared_memory():
    for cfg in configs():
        assert cfg.rows in (1, 2, 4, 8) and cfg.smem_bytes <= 48 * 1024, cfg
    for dtype in DTYPES:  # rows: the next power of two of group * seqlen_q, up to the chooser's cap (float64 hd128: 2)
        assert _gpu_decode.decode_config(dtype, 128, 3).rows == (2 if dtype == np.float64 else 4)
        assert _gpu_decode.decode_config(dtype, 64, 3).rows == 4
        assert _gpu_decode.decode_config(dtype, 128, 1).rows == 1


def test_auto_splits():
    # one row, 8 KV heads on 132 SMs: about 4 CTAs per SM, at least two iterations of keys per split
    assert _gpu_decode.auto_splits(8, 32768, 32, 132) == 66
    assert _gpu_decode.auto_splits(8, 100, 32, 132) == 2
    assert _gpu_decode.auto_splits(1024, 32768, 32, 132) == 1
    assert _gpu_decode.auto_splits(8, 0, 32, 132) == 1
    assert _gpu_decode.auto_splits(1, 10**7, 32, 132) == _gpu_decode.MAX_SPLITS
