"""The Hopper forward (cuda/flash_fwd_sm90.cu) compiled with bare NVRTC for sm_90a (no GPU needed):
every specialization builds, ptxas reports no spill, and the shared memory the launcher asks for is
the traits' SMEM_BYTES (a static_assert per config) and fits the H100/H200 opt-in limit."""

import pytest

from flashcupy import _build, _gpu_sm90

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

H100_SMEM_OPTIN = 232448  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90


def _names():
    return sorted({cfg.kernel_name(elem, causal, dropout)
                   for elem, causal, dropout, cfg in _gpu_sm90.all_specializations(dropout=True)})


@pytest.fixture(scope="module")
def compiled():
    return _build.nvrtc_compile(_gpu_sm90.SOURCE, _names(), "sm_90a")


def test_specializations_compile_without_spills(compiled):
    ok, log, lowered = compiled
    assert ok, log
    report = _build.ptxas_report(log)
    lines = [f"sm_90a {n}: {report[lowered[n]]}" for n in _names()]
    print("\n".join(lines))
    spilled = [ln for ln, n in zip(lines, _names()) if report[lowered[n]]["spill_stores"] or report[lowered[n]]["spill_loads"]]
    assert not spilled, "spills:\n" + "\n".join(spilled)
    assert "wgmma" not in log or "serialized" not in log, log  # ptxas: "wgmma.mma_async instructions are serialized"


def test_smem_bytes_match_the_traits():
    checks = [f'static_assert({cfg.traits(elem)}::SMEM_BYTES == {cfg.smem_bytes}, "{cfg.traits(elem)}");'
              for elem, _, cfg in _gpu_sm90.all_specializations()]
    src = _build.load_source(_gpu_sm90.SOURCE) + "\n" + "\n".join(checks) + "\n"
    ok, log, _ = _build.nvrtc_compile_source(src, [], "compute_90a", "smem_check.cu")
    assert ok, log
    for _, _, cfg in _gpu_sm90.all_specializations():
        assert cfg.smem_bytes <= H100_SMEM_OPTIN


def test_generated_wgmma_header_is_current():
    """cuda/flash_wgmma.cuh is tools/gen_wgmma.py's output (regenerate, never edit by hand)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    gen = subprocess.run([sys.executable, str(root / "tools" / "gen_wgmma.py")], capture_output=True, text=True,
                         check=True).stdout
    assert gen == (root / "cuda" / "flash_wgmma.cuh").read_text()


# ---- the Hopper backward (cuda/flash_bwd_sm90.cu) ----
from flashcupy import _gpu_sm90_bwd  # noqa: E402

# Known spills (bytes of spill stores), each a measured trade-off; any other spill fails, and so does a
# stale entry. hd64 with 128-row query tiles holds S^T and dP^T (64 + 64 fp32) beside dK, dV (32 + 32) at
# the 240-register consumer budget; since v1 splits the masked and unmasked tile bodies, the causal
# kernels keep a few loop values on the stack, and the deterministic ones a few of the dQ writer's
# (its warpgroup has 24 registers: more would exceed the launch's allocation, bench/NOTES.md, Hopper
# backward v1); the causal deterministic ones a few more since the writer computes each query tile's
# descending turn (Mask::dq_turn: 24 -> 40 B at hd64, 0 -> 4 B at hd128).
BWD_KNOWN_SPILLS = {
    f"flash_bwd_sm90_kernel<Sm90BwdTraits<{e}, {hd}, {bm}, {st}, {ov}, {lpt}>, {causal}, {det}>": b
    for e in ("Fp16", "Bf16")
    for hd, bm, st, ov, lpt, causal, det, b in (
        (64, 128, 2, 0, "false", "false", "false", 8), (64, 128, 2, 0, "false", "true", "false", 32),
        (64, 128, 2, 1, "false", "false", "false", 8), (64, 128, 2, 1, "false", "true", "false", 32),
        (64, 128, 2, 1, "false", "false", "true", 48), (64, 128, 2, 1, "false", "true", "true", 40),
        (128, 64, 2, 0, "false", "true", "true", 4))
}


def _bwd_names():
    elems = ("Fp16", "Bf16")
    return sorted({cfg.kernel_name(elem, causal, det)
                   for elem, causal, det, cfg in _gpu_sm90_bwd.all_specializations(deterministic=True)}
                  | {f"flash_bwd_sm90_prep_kernel<{e}>" for e in elems} | {f"flash_bwd_sm90_dq_kernel<{e}>" for e in elems})


def test_backward_specializations_compile():
    ok, log, lowered = _build.nvrtc_compile(_gpu_sm90_bwd.SOURCE, _bwd_names(), "sm_90a")
    assert ok, log
    report = _build.ptxas_report(log)
    print("\n".join(f"sm_90a {n}: {report[lowered[n]]}" for n in _bwd_names()))
    spills = {n: report[lowered[n]]["spill_stores"] for n in _bwd_names()
              if report[lowered[n]]["spill_stores"] or report[lowered[n]]["spill_loads"]}
    unexpected = {n: b for n, b in spills.items() if b > BWD_KNOWN_SPILLS.get(n, 0)}
    assert not unexpected, f"spills: {unexpected}"
    stale = {n for n in BWD_KNOWN_SPILLS if n not in spills}
    assert not stale, f"stale entries of BWD_KNOWN_SPILLS (no longer spill): {stale}"
    assert "serialized" not in log, log


def test_backward_smem_bytes_match_the_traits():
    checks = [f'static_assert({cfg.traits(elem)}::SMEM_BYTES == {cfg.smem_bytes}, "{cfg.traits(elem)}");'
              for elem, _, cfg in _gpu_sm90_bwd.all_specializations()]
    src = _build.load_source(_gpu_sm90_bwd.SOURCE) + "\n" + "\n".join(checks) + "\n"
    ok, log, _ = _build.nvrtc_compile_source(src, [], "compute_90a", "smem_check.cu")
    assert ok, log
    for _, _, cfg in _gpu_sm90_bwd.all_specializations():
        assert cfg.smem_bytes <= H100_SMEM_OPTIN
