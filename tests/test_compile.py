"""Compile every fp16/bf16 kernel specialization with bare NVRTC for sm_80, sm_86 and sm_90a (no GPU
needed) and check the ptxas report: no error, no spill. Check that every configuration the choosers
return for each arch's devices fits that device's shared memory (sm_86: 99 KB). Prints the register
report (pytest -s, or on failure).

What each arch compiles (flashcupy._configs.ARCH_DEVICES):
- sm_80 and sm_90a: every configuration the choosers return for any device there (the class's own
  budget and the 99 KB cap of FLASHCUPY_SMEM_LIMIT_KB=99), plus the other arch's, since
  FLASHCUPY_FORCE_CC can run a lower class's configurations on a newer GPU. (For this family the
  sets are the same: its choice does not depend on the compute capability.)
- sm_86: the configurations sm_86 chooses that sm_80 at its full 163 KB does not (the 99 KB
  candidates). The others are sm_80's, compiled above; sm_86 has sm_80's register file and
  instruction set, so its ptxas report for them is sm_80's. This keeps CI's compile time down.
"""

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from flashcupy import _build, _configs
from flashcupy._device import DeviceInfo

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_86", "sm_90a")
SPARSE = (None, (64, 64), (64, 128), (128, 64), (128, 128), (256, 64))


def chosen(devices, head_dims=_configs.HEAD_DIM_BUCKETS):
    """{config: None} of every fwd_config / bwd_config output for devices (every block-mask class)."""
    out = {}
    for device in devices:
        for bucket in head_dims:
            for sparse in SPARSE:
                for fn in (_configs.fwd_config, _configs.bwd_config):
                    cfg = fn(bucket, None, False, device, sparse)
                    if cfg is not None:
                        out[cfg] = None
    return out


def configs_for(arch: str):
    """The configurations CI compiles for arch (module docstring)."""
    if arch == "sm_86":
        full_80 = chosen([DeviceInfo.for_cc(80)])
        return [c for c in chosen(_configs.ARCH_DEVICES["sm_86"]) if c not in full_80]
    return list(chosen([d for a in ("sm_80", "sm_90a") for d in _configs.ARCH_DEVICES[a]]))


def _fwd_names(arch):
    return sorted({cfg.kernel_name(elem, causal, dropout) for cfg in configs_for(arch) if isinstance(cfg, _configs.FwdConfig)
                   for elem in ("Fp16", "Bf16") for causal in (False, True) for dropout in (False, True)})


def _bwd_names(arch):
    names = set()
    for cfg in configs_for(arch):
        if not isinstance(cfg, _configs.BwdConfig):
            continue
        for elem in ("Fp16", "Bf16"):
            names |= {f"flash_bwd_preprocess_kernel<{elem}>", f"flash_bwd_convert_kernel<{elem}>"}
            for causal in (False, True):
                for dropout in (False, True):
                    # the main kernel with atomic dQ only where the config uses it; without (deterministic) always
                    names |= {cfg.kernel_name(elem, causal, cfg.atomic_dq(False, dropout), dropout),
                              cfg.kernel_name(elem, causal, False, dropout), cfg.dq_kernel_name(elem, causal, dropout)}
    return sorted(names)


FAMILIES = {"flash_fwd.cu": _fwd_names, "flash_bwd.cu": _bwd_names}

# The only spills allowed, with the most bytes (stores or loads) each may spill. Since the AttnParams
# port, the head_dim-128 backward kernels of the 64-query-step tiles sit at 255 registers, and no
# placement of the record's reads removes every spill at once (bench/NOTES.md, "fp16/bf16 family on the
# AttnParams record"): the deterministic (dQ-kernel) variants without dropout spill 4-8 B at sm_90a,
# the atomic-dQ variants with dropout 8 B (causal) at sm_90a and 24-88 B at sm_80. Taking the dQ kernel
# for dropout instead measured 0.92-0.95x on the H200, so those stay. Zeroing the dS of keys past
# seqlen_k before dS K (2026-12-04: P = 2^(0 - lse) there can overflow) moved the causal ones: sm_90a
# 16 -> 56 B, sm_80 96 -> 0 B. Any other spill, or more bytes than listed, fails; an entry that no
# longer spills must be removed.
_BWD128 = "flash_bwd_kernel<BwdTraits<{elem}, 128, 64, {n}, 1>, {causal}, {atomic}, {dropout}>"
_ELEMS = ("Fp16", "Bf16")
KNOWN_SPILLS = {
    **{("sm_90a", _BWD128.format(elem=e, n=n, causal=c, atomic="false", dropout="false")): b
       for e in _ELEMS for n in (64, 128) for c, b in (("false", 8), ("true", 4))},
    **{("sm_90a", _BWD128.format(elem=e, n=128, causal="true", atomic="true", dropout="true")): 56 for e in _ELEMS},
    **{("sm_80", _BWD128.format(elem=e, n=128, causal="false", atomic="true", dropout="true")): 40 for e in _ELEMS},
}
CHUNKS = 2  # sm_80 / sm_90a: each family is compiled as CHUNKS NVRTC programs


def _jobs():
    jobs = []
    for src, names_fn in FAMILIES.items():
        for arch in ARCHS:
            names = names_fn(arch)
            chunks = CHUNKS if arch != "sm_86" else 1
            jobs += [(src, arch, names[i::chunks]) for i in range(chunks) if names[i::chunks]]
    return sorted(jobs, key=lambda j: -len(j[2]))  # longest first: the pool's two workers end together


@pytest.fixture(scope="module")
def compiled():
    """{(source, arch): (ok, log, lowered)} for every family; the NVRTC programs run in parallel
    processes (cuda-bindings holds the GIL while NVRTC compiles, so threads would run serially)."""
    jobs = _jobs()
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
    names = FAMILIES[source](arch)
    if not names:
        pytest.skip(f"no {source} configuration of {arch} differs from sm_80's")
    ok, log, lowered = compiled[source, arch]
    assert ok, log
    report = _build.ptxas_report(log)
    lines = []
    for name in names:
        r = report[lowered[name]]
        lines.append(f"{arch} {name}: {r['regs']} regs, {r['spill_stores']} B spill st, {r['spill_loads']} B spill ld")
    print("\n".join(lines))
    assert len(report) == len(names)
    spilled = [ln for ln, name in zip(lines, names)
               if max(report[lowered[name]]["spill_stores"], report[lowered[name]]["spill_loads"])
               > KNOWN_SPILLS.get((arch, name), 0)]
    assert not spilled, "spills:\n" + "\n".join(spilled)
    stale = [k for k in KNOWN_SPILLS if k[0] == arch and k[1] in names and not report[lowered[k[1]]]["spill_stores"]]
    assert not stale, f"KNOWN_SPILLS entries that no longer spill (remove them): {stale}"


def test_sm86_compiles_the_99kb_configs():
    """sm_86's own list is not empty: the 99 KB backward tiles (and nothing sm_80 already builds)."""
    extra = configs_for("sm_86")
    assert extra and all(isinstance(c, _configs.BwdConfig) and c.max_smem_bytes <= _configs.SMEM_99KB for c in extra)
    assert set(extra) <= set(configs_for("sm_80")) and set(configs_for("sm_80")) == set(configs_for("sm_90a"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_chosen_config_fits_its_budget(arch):
    """Every configuration fwd_config / bwd_config return for the arch's devices (every head dim the
    kernels take, every block-mask class) fits that device's opt-in shared memory; sm_86's is 99 KB."""
    devices = _configs.ARCH_DEVICES[arch]
    if arch == "sm_86":
        assert [d.smem_optin for d in devices] == [99 * 1024]
    for device in devices:
        for head_dim in range(8, 257, 8):
            for sparse in SPARSE:
                for fn in (_configs.fwd_config, _configs.bwd_config):
                    cfg = fn(head_dim, None, True, device, sparse)
                    assert cfg is not None, (arch, device, head_dim, sparse, fn.__name__)  # fp16 never goes chunked
                    assert cfg.max_smem_bytes <= device.smem_optin, (arch, device, head_dim, sparse, cfg)
                    assert cfg.head_dim >= head_dim


@pytest.mark.parametrize("source", sorted(FAMILIES))
def test_sources_inline_every_local_header(source):
    src = _build.load_source(source)
    assert '#include "' not in src
    assert src.count("struct Fp16 {") == 1


def test_config_table_covers_every_bucket():
    for bucket in _configs.HEAD_DIM_BUCKETS:
        for device in (80, 86, 90):
            cfg = _configs.fwd_config(bucket, None, False, device)
            assert cfg.head_dim == bucket and cfg.block_m % (16 * cfg.nwarps) == 0
            bcfg = _configs.bwd_config(bucket, None, False, device)
            assert bcfg.head_dim == bucket and bcfg.block_n % 16 == 0 and bucket % (16 * bcfg.d_split) == 0
    for d in (1, 8, 33, 100, 255):
        assert _configs.fwd_config(d, None, True).head_dim >= d
    with pytest.raises(ValueError, match="head_dim"):
        _configs.head_dim_bucket(264)
    assert _configs.fwd_config(64, None, False, 75) is None and _configs.bwd_config(64, None, False, 75) is None
