"""Issue 16's feature specializations (FEAT_* bits: window, softcap, ALiBi, sinks; and issue 17's
FEAT_VARLEN forward) of every kernel family,
compiled with bare NVRTC (no GPU needed): each builds, and the ptxas report is printed.

The plain kernels (FEAT = 0) are held to no spill by test_compile.py, test_compile_simt.py and
test_compile_sm90.py. The feature kernels sit at the same 255-register edge with a few more live values
(the window's bounds, the softcap factors, the slope): ptxas spills some of them (measured 4-128 B per
thread at sm_80 / sm_90a in the mma.sync KV kernels at head_dim >= 96, local memory that stays in L1).
Here every one must compile and spill at most SPILL_BUDGET bytes, so a change that makes them much
worse fails; the plain kernels' names are unchanged by the bits (FEAT = 0 adds no template argument).
"""

import pytest

from flashcupy import _build, _configs, _gpu_sm90, _gpu_sm90_bwd
from flashcupy._device import as_device
from flashcupy._features import FEAT_ALIBI, FEAT_ALL, FEAT_LOCAL, FEAT_SINK, FEAT_SOFTCAP, FEAT_VARLEN

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

SPILL_BUDGET = 160  # bytes of spill stores or loads per thread
FWD_FEATS = (FEAT_LOCAL, FEAT_SOFTCAP | FEAT_ALIBI, FEAT_SINK, FEAT_ALL)
BWD_FEATS = (FEAT_LOCAL, FEAT_SOFTCAP, FEAT_ALL & ~FEAT_SINK)  # a backward kernel never takes FEAT_SINK
HEAD_DIMS = (64, 128, 256)
H200 = as_device(90)


def _mma_names():
    fwd, bwd = set(), set()
    for hd in HEAD_DIMS:
        fc, bc = _configs.fwd_config(hd, "float16", True, H200, None), _configs.bwd_config(hd, "float16", True, H200, None)
        for causal in (False, True):
            fwd |= {fc.kernel_name("Bf16", causal, drop, f) for f in FWD_FEATS for drop in (False, True)}
            # the packed-sequence forward (no dropout): alone and with every score feature
            fwd |= {fc.kernel_name("Bf16", causal, False, FEAT_VARLEN | f) for f in (0, FEAT_ALL)}
            for f in BWD_FEATS:
                bwd |= {bc.kernel_name("Fp16", causal, bc.atomic_dq(False, False), False, f),
                        bc.dq_kernel_name("Fp16", causal, False, f)}
    return {"flash_fwd.cu": sorted(fwd), "flash_bwd.cu": sorted(bwd)}


def _sm90_names():
    fwd = {cfg.kernel_name(e, c, d, f) for e, c, d, cfg in _gpu_sm90.all_specializations(dropout=True)
           if cfg == _gpu_sm90.config_for(cfg.head_dim, c) and e == "Bf16" for f in FWD_FEATS}
    bwd = {cfg.kernel_name(e, c, det, f) for e, c, det, cfg in _gpu_sm90_bwd.all_specializations(deterministic=True)
           if cfg == _gpu_sm90_bwd.config_for(cfg.head_dim, c) and e == "Bf16" for f in BWD_FEATS
           if cfg.takes_features(f, det)}  # what the dispatcher can launch
    return {_gpu_sm90.SOURCE: sorted(fwd), _gpu_sm90_bwd.SOURCE: sorted(bwd)}


def _float_names():
    out = {}
    for dtype, tf32 in (("float32", False), ("float32", True), ("float64", False)):
        for hd in (64, 128):
            cf = _configs.float_fwd_config(hd, dtype, True, H200, tf32)
            cb = _configs.float_bwd_config(hd, dtype, True, H200, tf32)
            out.setdefault(cf.source, set()).update(cf.kernel_name(f) for f in FWD_FEATS)
            out.setdefault(cb.source, set()).update(n for f in BWD_FEATS for n in (cb.kv_kernel_name(f), cb.dq_kernel_name(f)))
    return {k: sorted(v) for k, v in out.items()}


JOBS = ([(src, names, "sm_90a") for src, names in {**_mma_names(), **_sm90_names(), **_float_names()}.items()]
        + [(src, names, "sm_80") for src, names in _mma_names().items()])


@pytest.fixture(scope="module")
def compiled():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as ex:
        return dict(zip([(src, arch) for src, _, arch in JOBS], ex.map(_build.nvrtc_compile, *zip(*JOBS))))


@pytest.mark.parametrize("source, names, arch", JOBS, ids=[f"{s}-{a}" for s, _, a in JOBS])
def test_feature_specializations_compile(compiled, source, names, arch):
    ok, log, lowered = compiled[source, arch]
    assert ok, log
    report = _build.ptxas_report(log)
    lines = [f"{arch} {n}: {report[lowered[n]]['regs']} regs, {report[lowered[n]]['spill_stores']} B spill st, "
             f"{report[lowered[n]]['spill_loads']} B spill ld" for n in names]
    print("\n".join(lines))
    over = [ln for ln, n in zip(lines, names)
            if max(report[lowered[n]]["spill_stores"], report[lowered[n]]["spill_loads"]) > SPILL_BUDGET]
    assert not over, "over the spill budget:\n" + "\n".join(over)


def test_plain_names_carry_no_feature_argument():
    """FEAT = 0 leaves every family's kernel names as they were (test_compile*.py's lists stay valid)."""
    fc = _configs.fwd_config(64, "float16", False, H200, None)
    assert fc.kernel_name("Fp16", False, False) == fc.kernel_name("Fp16", False, False, 0)
    assert fc.kernel_name("Fp16", False, False, 0).endswith("false, false>")
    assert fc.kernel_name("Fp16", False, False, FEAT_LOCAL).endswith("false, false, 1>")
    sc = _configs.float_fwd_config(64, "float64", False, H200, False)
    assert sc.kernel_name() == sc.kernel_name(0) and sc.kernel_name(FEAT_ALL).endswith(", 15>")
