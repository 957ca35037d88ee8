"""Which kernel a GPU call runs: one pure function of (problem, dtype, device) per direction.

    forward_plan(dtype, head_dim, causal, device, *, dropout=False, sparse_blocks=None,
                 allow_tf32=False) -> Plan | None
    backward_plan(dtype, head_dim, causal, device, *, dropout=False, sparse_blocks=None,
                  allow_tf32=False, deterministic=False) -> Plan | None
    path_name(plan) -> str        flashcupy.interface.kernel_path's name of a plan (None included)

Arguments: dtype any NumPy-style dtype; head_dim the problem's (unpadded) head dim; device a
flashcupy._device.DeviceInfo (current_device_info() on a live GPU; an int compute capability stands
for its class's default budget); dropout truthy when dropout_p > 0; sparse_blocks (block_q, block_k)
of a BlockMask or None; allow_tf32 as the public API.

A Plan is (family, config): family one of FAMILIES, config the family's dataclass from
flashcupy._configs, ready for the launch code (flashcupy._gpu for "mma16", flashcupy._gpu_simt for the
others, which takes the config as is). None means no fused kernel: run the chunked path on the GPU
(flashcupy._chunked). The forward and the backward are planned separately; a fused forward with a
chunked backward (or the reverse) is fine, both use the same out / LSE.

Routing (today's rules, plus the device gates):
- float16 / bfloat16 forward on compute capability 9.0, head_dim <= 128, no dropout, no block mask:
  the Hopper family ("wgmma", flashcupy._gpu_sm90; FLASHCUPY_SM90=0 turns it off).
- float16 / bfloat16 backward on compute capability 9.0, head_dim <= 128, no dropout, no block mask,
  not deterministic (see _gpu_sm90_bwd.plan_config): the Hopper backward ("wgmma",
  flashcupy._gpu_sm90_bwd; FLASHCUPY_SM90=0 or FLASHCUPY_SM90_BWD=0 turn it off).
- float16 / bfloat16, head_dim <= 256: the mma.sync family ("mma16"), with dropout and block masks
  fused; fwd_config / bwd_config pick the tiles.
- float32 / float64, head_dim <= 256, no dropout, no block mask: float64 on the FP64 tensor cores
  ("dmma"; the backward above head_dim 160 on CUDA cores, "simt"), float32 with allow_tf32 on the TF32
  tensor cores ("tf32"), other float32 on CUDA cores ("simt"); float_fwd_config / float_bwd_config.
- issue 16's features (window_size, softcap, alibi_slopes, sinks: flashcupy._features FEAT_* bits) run in
  every family above, each in its FEAT specialization, except in the Hopper backward at head_dim <= 64
  with softcap or ALiBi (its tile spills there: Sm90BwdConfig.takes_features), which gives mma.sync.
- everything else (other dtypes, head_dim > 256, fp32/fp64 with dropout or a block mask): None.
- device gates: compute capability < 8.0 gives None for every family (all load tiles with cp.async);
  a configuration whose shared memory exceeds device.smem_optin is never returned: the choosers fall
  back to smaller tiles (the 99 KB class) or to None.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _configs
from ._arrays import is_half
from ._device import as_device

MAX_FUSED_HEAD_DIM = 256

MMA16, SIMT, DMMA, TF32, WGMMA = "mma16", "simt", "dmma", "tf32", "wgmma"
FAMILIES = (MMA16, SIMT, DMMA, TF32, WGMMA)

PATH_NAMES = {
    MMA16: "fused fp16/bf16 (tensor cores)",
    WGMMA: "fused fp16/bf16 (Hopper wgmma + TMA)",
    SIMT: "fused fp32/fp64 (CUDA cores)",
    DMMA: "fused fp64 (FP64 tensor cores)",
    TF32: "fused fp32 (TF32 tensor cores)",
    None: "chunked path on the GPU",
}


class Plan(NamedTuple):
    """A fused kernel launch: the family (FAMILIES) and its configuration dataclass."""

    family: str
    config: object


def _float_family(cfg) -> str:
    if isinstance(cfg, (_configs.DmmaFwdConfig, _configs.DmmaBwdConfig)):
        return TF32 if cfg.elem == "float" else DMMA
    return SIMT


def _is_float(dtype) -> bool:
    return np.dtype(dtype) in (np.float32, np.float64)


def _plan(direction: str, dtype, head_dim: int, causal: bool, device, dropout, sparse_blocks, allow_tf32,
          deterministic=False, features=0):
    device = as_device(device)
    if head_dim > MAX_FUSED_HEAD_DIM:
        return None
    if is_half(dtype):
        if direction == "fwd":
            from . import _gpu_sm90

            cfg = _gpu_sm90.plan_config(head_dim, device, causal=causal, dropout=dropout, sparse_blocks=sparse_blocks,
                                        features=features)
            if cfg is not None:
                return Plan(WGMMA, cfg)
        else:
            from . import _gpu_sm90_bwd

            cfg = _gpu_sm90_bwd.plan_config(head_dim, device, causal=causal, dropout=dropout,
                                            sparse_blocks=sparse_blocks, deterministic=deterministic,
                                            features=features)
            if cfg is not None:
                return Plan(WGMMA, cfg)
        choose = _configs.fwd_config if direction == "fwd" else _configs.bwd_config
        cfg = choose(head_dim, dtype, causal, device, sparse_blocks)
        return None if cfg is None else Plan(MMA16, cfg)
    if _is_float(dtype) and not dropout and sparse_blocks is None:
        choose = _configs.float_fwd_config if direction == "fwd" else _configs.float_bwd_config
        cfg = choose(head_dim, dtype, causal, device, bool(allow_tf32))
        return None if cfg is None else Plan(_float_family(cfg), cfg)
    return None


def forward_plan(dtype, head_dim: int, causal: bool, device, *, dropout=False, sparse_blocks=None,
                 allow_tf32: bool = False, features: int = 0) -> Plan | None:
    """The fused forward to launch for this problem on device, or None for the chunked GPU path.
    features: the call's flashcupy._features FEAT_* bits (Features.bits). Pure."""
    return _plan("fwd", dtype, int(head_dim), causal, device, dropout, sparse_blocks, allow_tf32, features=features)


def backward_plan(dtype, head_dim: int, causal: bool, device, *, dropout=False, sparse_blocks=None,
                  allow_tf32: bool = False, deterministic: bool = False, features: int = 0) -> Plan | None:
    """The fused backward to launch for this problem on device, or None for the chunked GPU path.
    deterministic=True excludes kernels whose dq accumulation order varies between runs; features as
    forward_plan. Pure."""
    return _plan("bwd", dtype, int(head_dim), causal, device, dropout, sparse_blocks, allow_tf32, deterministic,
                 features)


def path_name(plan: Plan | None) -> str:
    """kernel_path's string for a plan: "fused fp16/bf16 (tensor cores)", "fused fp32/fp64 (CUDA
    cores)", "fused fp64 (FP64 tensor cores)", "fused fp32 (TF32 tensor cores)" or, for None,
    "chunked path on the GPU"."""
    return PATH_NAMES[None if plan is None else plan.family]
