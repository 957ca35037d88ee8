"""Launch code of the Hopper (sm_90a) backward, cuda/flash_bwd_sm90.cu: workspaces, tensor maps, the
three kernels (statistics, main, dQ conversion).

`plan_config(...)` says whether a fp16/bf16 backward takes this path (compute capability 9.0,
head_dim <= 128, no dropout, not deterministic (its mode is not yet dispatched: see plan_config), no
block mask, within the shared-memory budget; FLASHCUPY_SM90=0 or FLASHCUPY_SM90_BWD=0 turn it off):
flashcupy._dispatch plans with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ._build import debug, get_kernel
from ._configs import _feat, elem_name
from ._params import attn_params

SOURCE = "flash_bwd_sm90.cu"


@dataclass(frozen=True)
class Sm90BwdConfig:
    """Mirror of Sm90BwdTraits in cuda/flash_bwd_sm90.cu: 128 keys per CTA (64 per consumer warpgroup),
    query tiles of block_m rows, a stages-deep Q / dO pipeline."""

    head_dim: int  # 64 or 128: the tile's head dim (the caller's is <= it)
    block_m: int
    stages: int = 2
    overlap: int = 2  # v1: dV / dK GEMMs issued before the dS^T barrier (1), dV also before dS^T (2); 0: v0
    lpt: int = 0  # v1: causal launches longest key blocks first in groups of (batch, head) pairs whose rows
    # fill lpt MB of L2 (0: the (key block, head, batch) grid)
    consumers: int = 2

    @property
    def block_n(self) -> int:
        return 64 * self.consumers

    @property
    def nthreads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def smem_bytes(self) -> int:
        panels = self.head_dim // 64
        kv = panels * self.block_n * 128
        q = panels * self.block_m * 128
        ds = (self.block_m // 64) * self.block_n * 128
        barriers = 1 + 2 * self.stages + 2 * self.consumers
        return (2 * kv + 2 * self.stages * q + 2 * ds + self.consumers * 64 * 64 * 4 + 2 * self.stages * self.block_m * 4
                + 8 * barriers + 1024)

    @property
    def max_smem_bytes(self) -> int:
        return self.smem_bytes

    def traits(self, elem: str) -> str:
        return (f"Sm90BwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.stages}, "
                f"{self.overlap}, {'true' if self.lpt else 'false'}>")

    def kernel_name(self, elem: str, causal: bool, deterministic: bool = False, feat: int = 0) -> str:
        return (f"flash_bwd_sm90_kernel<{self.traits(elem)}, {'true' if causal else 'false'}, "
                f"{'true' if deterministic else 'false'}{_feat(feat)}>")

    def takes_features(self, features: int, deterministic: bool = False) -> bool:
        """Whether this tile runs issue 16's FEAT_* bits (a sink never reaches the backward kernel). The
        hd64 tile (128 queries: S^T and dP^T take 128 of the consumers' 240 registers) spills 36-600 B
        with softcap or ALiBi, so it takes only the window (12-36 B); the hd128 tile takes all of them.
        A window is not taken with deterministic=True: the dQ turnstiles count key blocks from 0."""
        from ._features import FEAT_LOCAL, FEAT_SINK

        features &= ~FEAT_SINK
        if deterministic and features & FEAT_LOCAL:
            return False
        return self.head_dim >= 128 or not features & ~FEAT_LOCAL

    def takes_block_mask(self, block_q: int, block_k: int) -> bool:
        """Blocks of whole tiles: block_k a multiple of the 128 keys of a CTA, block_q a power-of-two
        multiple of block_m (TileWalk)."""
        tiles = block_q // self.block_m
        return block_k % self.block_n == 0 and block_q % self.block_m == 0 and tiles & (tiles - 1) == 0


def config_for(head_dim: int, causal: bool = False) -> Sm90BwdConfig:
    """The tile for a head dim (<= 128): every consumer computes one 64 x 64 chunk of the dQ tile, so
    hd64 walks query tiles of 128 rows and hd128 of 64. OVERLAP 1 at hd64, 0 at hd128 (within 1-2% of
    each other in the v1 sweep, best of each), no LPT order (bench/NOTES.md, Hopper backward v1)."""
    del causal
    return Sm90BwdConfig(64, 128, overlap=1) if head_dim <= 64 else Sm90BwdConfig(128, 64, overlap=0)


# config_for's choices first; the rest are the measured alternatives (bench_sm90 --bwd --sweep).
SWEEP = (Sm90BwdConfig(64, 128, 2, overlap=1), Sm90BwdConfig(128, 64, 2, overlap=0),
         Sm90BwdConfig(64, 128, 2, overlap=0), Sm90BwdConfig(128, 64, 2, overlap=2),
         Sm90BwdConfig(128, 64, 2, overlap=2, lpt=16))


def all_specializations(deterministic: bool = False):
    """(elem, causal, config) of every kernel this path can launch (CI compiles each); with
    deterministic=True, (elem, causal, deterministic, config), adding the deterministic kernels of
    config_for's choices (SWEEP[:2])."""
    out = [(elem, causal, cfg) for elem in ("Fp16", "Bf16") for causal in (False, True) for cfg in SWEEP]
    if not deterministic:
        return out
    return ([(e, c, False, cfg) for e, c, cfg in out]
            + [(e, c, True, cfg) for e in ("Fp16", "Bf16") for c in (False, True) for cfg in SWEEP[:2]])


def enabled() -> bool:
    return all(os.environ.get(v, "1") not in ("0", "") for v in ("FLASHCUPY_SM90", "FLASHCUPY_SM90_BWD"))


def plan_config(head_dim: int, device, *, causal: bool = False, dropout=False, sparse_blocks=None,
                deterministic: bool = False, features: int = 0):
    """The Sm90BwdConfig flashcupy._dispatch plans for a fp16/bf16 backward on device (a DeviceInfo), or
    None where this family does not run it (not sm_90, dropout, a block mask, head_dim > 128, the
    shared-memory budget, FLASHCUPY_SM90=0 / FLASHCUPY_SM90_BWD=0), and deterministic=True: the kernel's
    deterministic mode (the dQ writer's turnstiles, backward(deterministic=True)) passed its GPU tests
    (H200, 2026-12-03) but costs 1.6-1.7x the default at causal hd64 / hd128 (issue 15 asks <= 1.25x), and
    a CUDA-graph test failed in the one run that routed it (bench/NOTES.md), so deterministic calls stay
    on the mma.sync family for now; features: the call's FEAT_* bits, where the tile takes them
    (Sm90BwdConfig.takes_features)."""
    if (not enabled() or device.cc != 90 or dropout or deterministic or sparse_blocks is not None
            or head_dim > 128):
        return None
    cfg = config_for(head_dim, causal)
    return cfg if device.fits(cfg.smem_bytes) and cfg.takes_features(features, deterministic) else None


def lpt_group(pairs: int, seqlen_q: int, head_dim: int, budget_mb: int) -> int:
    """(batch, head) pairs per group of the causal LPT grid: as many as have Q, dO (2 bytes each) and the
    float32 dQ accumulator and statistics within budget_mb MB (of the H100/H200's 50 MB of L2), at least 1,
    at most `pairs`, and enough that the groups fit gridDim.y (65535)."""
    per_pair = seqlen_q * (head_dim * (2 + 2 + 4) + 8)
    return max(1, -(-pairs // 65535), min(pairs, (budget_mb << 20) // per_pair))


def stats_rows(seqlen_q: int) -> int:
    """Rows of the padded statistics and of dq_accum (cuda: stats_rows_padded)."""
    return -(-seqlen_q // 128) * 128


def backward(dout, q, k, v, out, lse, shape, *, causal: bool, score_scale: float, config=None, block_mask=None,
             deterministic: bool = False, features=None):
    """Hopper backward on kernel-ready arrays (flashcupy._gpu.backward prepares them: 16-byte aligned,
    head_dim padded to a multiple of 8, q zeroed with score_scale 1 for a caller's softmax_scale 0).
    Returns (dq like q, dk_rows, dv_rows): (batch, seqlen_k, nheads, d) rows, the dtype of q without
    GQA, float32 with it (the caller sums each group). deterministic: dQ added in key-block order
    (bitwise repeatable; dK, dV always are). features: a flashcupy._features.Features or None (a sink
    only through lse: flashcupy._gpu.backward_feat)."""
    import cupy as cp

    from ._gpu_sm90 import _tma_desc

    cfg = config or config_for(shape.head_dim, causal)
    if block_mask is not None and not cfg.takes_block_mask(block_mask.block_q, block_mask.block_k):
        raise ValueError(f"block_mask: blocks {block_mask.block_q}x{block_mask.block_k} are not whole "
                         f"{cfg.block_m}x{cfg.block_n} tiles of the Hopper backward")
    elem = elem_name(q.dtype)
    b, sq, sk, h, g = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads, shape.group
    d8 = q.shape[3]
    debug(f"sm90 bwd {shape} -> {cfg}")
    rows = stats_rows(sq)
    delta = cp.empty((b, h, rows), dtype=cp.float32)
    lse_log2 = cp.empty((b, h, rows), dtype=cp.float32)
    chunks = b * h * (rows // 64) * (cfg.head_dim // 64) * 4096
    # deterministic: the turnstiles (b, h, rows / 64) int32 follow the chunks, zeroed with them
    dq_accum = cp.zeros(chunks + (b * h * (rows // 64) if deterministic else 0), dtype=cp.float32)
    kv_dtype = q.dtype if g == 1 else cp.float32
    dk_rows = cp.empty((b, sk, h, d8), dtype=kv_dtype)
    dv_rows = cp.empty((b, sk, h, d8), dtype=kv_dtype)
    dq = cp.empty((b, sq, h, d8), dtype=q.dtype)
    p = attn_params(shape, head_dim=d8, scale=score_scale, grad_scale=shape.softmax_scale, causal=causal,
                    block_mask=block_mask, dkv_fp32=g != 1, features=features, q=q, k=k, v=v, out=out, dout=dout,
                    dq=dq, dk=dk_rows,
                    dv=dv_rows, lse=lse, delta=delta, lse_exp=lse_log2, dq_accum=dq_accum)

    prep = get_kernel(SOURCE, f"flash_bwd_sm90_prep_kernel<{elem}>", 0)
    prep((rows // 4, h, b), (128, 1, 1), (p,))
    tma = np.frombuffer(_tma_desc(q, cfg.block_m) + _tma_desc(dout, cfg.block_m) + _tma_desc(k, cfg.block_n)
                        + _tma_desc(v, cfg.block_n), dtype=np.uint8)
    tma_arg = tma.view(np.dtype((np.void, tma.size)))[0]
    from ._gpu import backward_feat

    kernel = get_kernel(SOURCE, cfg.kernel_name(elem, causal, deterministic, backward_feat(features)), cfg.smem_bytes)
    n_blocks = math.ceil(sk / cfg.block_n)
    if cfg.lpt and causal:  # longest key blocks first, L2-sized head groups (the kernel decodes this grid)
        group = lpt_group(b * h, sq, cfg.head_dim, cfg.lpt)
        grid = (n_blocks * group, -(-(b * h) // group), 1)
    else:
        grid = (n_blocks, h, b)
    kernel(grid, (cfg.nthreads, 1, 1), (p, tma_arg), shared_mem=cfg.smem_bytes)
    post = get_kernel(SOURCE, f"flash_bwd_sm90_dq_kernel<{elem}>", 0)
    n = b * sq * h * (d8 // 2)
    post((max(1, min(-(-n // 256), 8192)),), (256, 1, 1), (p,))
    return dq, dk_rows, dv_rows
