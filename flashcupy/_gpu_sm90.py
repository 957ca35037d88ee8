"""Launch code of the Hopper (sm_90a) forward, cuda/flash_fwd_sm90.cu: TMA tensor maps, the
AttnParams record, grid, launch.

`plan_config(...)` says whether a fp16/bf16 forward takes this path (compute capability 9.0,
head_dim <= 128, no dropout, no block mask, within the shared-memory budget; FLASHCUPY_SM90=0 turns it
off): flashcupy._dispatch plans with it and flashcupy._gpu.forward asks it when given no config.
Tensor maps come from cuda-bindings' cuTensorMapEncodeTiled (about 2.4 us each, research/hopper.md
1.6; three per forward) over (head_dim, nheads, seqlen, batch) views of q, k, v with a 128-byte
swizzle, cached by (data pointer, dtype, shape, strides, box) in an LRU of 256 (_tma_desc): the 128
bytes depend on nothing else, so a freed pointer reused by a new array of the same shape gets the
right descriptor. Boxes past a tensor's end are zero-filled by the TMA unit, so ragged seqlens and
head dims below the tile's need no copy.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from ._build import debug, get_kernel
from ._configs import _cbool, _feat, elem_name
from ._params import attn_params

SOURCE = "flash_fwd_sm90.cu"


@dataclass(frozen=True)
class Sm90FwdConfig:
    """Mirror of Sm90FwdTraits in cuda/flash_fwd_sm90.cu."""

    head_dim: int  # 64 or 128: the tile's head dim (the caller's is <= it)
    block_n: int = 128
    stages: int = 2
    overlap: bool = False  # v1: intra-warpgroup overlap of the S GEMM with the softmax and the PV GEMM
    pingpong: bool = False  # v2: the consumer warpgroups take turns issuing GEMMs (needs overlap)
    consumers: int = 2

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def nthreads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def smem_bytes(self) -> int:
        panels = self.head_dim // 64
        return (panels * self.block_m * 128 + 2 * self.stages * panels * self.block_n * 128
                + 8 * (1 + 2 * self.stages) + 1024)

    @property
    def max_smem_bytes(self) -> int:
        """The most shared memory one launch asks for (flashcupy._dispatch checks it against the budget)."""
        return self.smem_bytes

    def traits(self, elem: str) -> str:
        return (f"Sm90FwdTraits<{elem}, {self.head_dim}, {self.block_n}, {self.stages}, {_cbool(self.overlap)}, "
                f"{_cbool(self.pingpong)}>")

    def kernel_name(self, elem: str, causal: bool, dropout: bool = False, feat: int = 0) -> str:
        return f"flash_fwd_sm90_kernel<{self.traits(elem)}, {_cbool(causal)}, {_cbool(dropout)}{_feat(feat)}>"

    def takes_block_mask(self, block_q: int, block_k: int) -> bool:
        """A block mask's blocks must be whole tiles: block_q a multiple of BLOCK_M, block_k a power-of-two
        multiple of BLOCK_N (TileWalk)."""
        tiles = block_k // self.block_n
        return block_q % self.block_m == 0 and block_k % self.block_n == 0 and tiles & (tiles - 1) == 0


def config_for(head_dim: int, causal: bool = False) -> Sm90FwdConfig:
    """The tile for a head dim (<= 128). H200, bf16, FA shape, 4k and 16k (bench/results/
    h200-sm90-fwd-sweep-v1.json): intra-warpgroup overlap with 3 stages is best or within 3% at hd128
    (585 vs 539 TFLOP/s at 4k; 555 vs 564 at 16k non-causal), at hd64 overlap with 2 stages without
    causal (426 / 444 vs 401 / 422) and 3 stages with it (393 / 448 vs 367 / 417)."""
    if head_dim <= 64:
        return Sm90FwdConfig(64, 128, 3 if causal else 2, True)
    return Sm90FwdConfig(128, 128, 3, True)


# Candidates timed by bench/bench_sm90.py --sweep (bench/NOTES.md); config_for picks among them.
SWEEP = tuple(Sm90FwdConfig(hd, 128, stages, overlap, pingpong) for hd in (64, 128) for stages in (2, 3)
              for overlap, pingpong in ((False, False), (True, False), (True, True))) + (
    Sm90FwdConfig(128, 176, 2, True, False), Sm90FwdConfig(128, 176, 2, True, True),  # FA3's hd128 non-causal tile
    Sm90FwdConfig(256, 80, 2, True, False), Sm90FwdConfig(256, 80, 2, False, False))  # FA3's hd256 tile: not yet
# run on a GPU, so plan_config does not choose it (head_dim > 128 stays on mma.sync until it is measured)


def all_specializations(dropout: bool = False):
    """(elem, causal, config) of every kernel this path can launch or sweep (CI compiles each; with
    dropout=True, (elem, causal, dropout, config) including the dropout kernels of the chosen configs)."""
    if not dropout:
        return [(elem, causal, cfg) for elem in ("Fp16", "Bf16") for causal in (False, True) for cfg in SWEEP]
    chosen = {config_for(hd, c) for hd in (64, 128) for c in (False, True)}
    return ([(elem, causal, False, cfg) for elem, causal, cfg in all_specializations()]
            + [(elem, causal, True, cfg) for elem in ("Fp16", "Bf16") for causal in (False, True) for cfg in sorted(
                chosen, key=str)])


def enabled() -> bool:
    return os.environ.get("FLASHCUPY_SM90", "1") not in ("0", "")


def plan_config(head_dim: int, device, *, causal: bool = False, dropout=False, sparse_blocks=None, features=0):
    """The Sm90FwdConfig flashcupy._dispatch plans for a fp16/bf16 forward on device (a DeviceInfo), or
    None where this family does not run it (not sm_90, dropout, a block mask, head_dim > 128, the
    shared-memory budget, FLASHCUPY_SM90=0). features: FEAT_* bits (every one runs here)."""
    if not enabled() or device.cc != 90 or dropout or sparse_blocks is not None or head_dim > 128:
        return None
    cfg = config_for(head_dim, causal)
    return cfg if device.fits(cfg.smem_bytes) else None


def _tma_desc(x, rows_box: int) -> bytes:
    """128 bytes of a CUtensorMap over x (batch, seqlen, nheads, d) viewed as (d, nheads, seqlen, batch),
    box (64, 1, rows_box, 1), 128-byte swizzle, zero fill past the edges. Cached (_encode_tma)."""
    return _encode_tma(int(x.data.ptr), x.dtype.name, x.dtype.itemsize, tuple(x.shape), tuple(x.strides),
                       int(rows_box))


@functools.lru_cache(maxsize=256)
def _encode_tma(ptr: int, dtype_name: str, itemsize: int, shape: tuple, strides: tuple, rows_box: int) -> bytes:
    """cuTensorMapEncodeTiled of _tma_desc, from hashable arguments only (the LRU key). A failed encode
    raises and is not cached."""
    from cuda.bindings import driver

    dtype = (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if dtype_name == "bfloat16"
             else driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    b, s, h, d = shape
    dims = [d, h, s, b]
    dim_strides = [strides[2], strides[1], strides[0]]  # bytes, dims 1..3
    # size-1 dims: any legal stride
    dim_strides = [st if n > 1 else d * itemsize for st, n in zip(dim_strides, (h, s, b))]
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtype, 4, ptr, [driver.cuuint64_t(v) for v in dims], [driver.cuuint64_t(v) for v in dim_strides],
        [driver.cuuint32_t(v) for v in (64, 1, rows_box, 1)], [driver.cuuint32_t(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for shape {shape}, strides {strides}")
    return ctypes.string_at(tmap.getPtr(), 128)


def forward(q, k, v, shape, *, causal: bool, scale: float, config=None, dropout=None, block_mask=None,
            features=None):
    """Hopper forward. q, k, v: kernel-ready CuPy arrays (16-byte aligned, head_dim padded to a multiple
    of 8: flashcupy._gpu.kernel_ready); scale: the softmax scale the kernel applies (flashcupy._gpu.forward
    passes 1 with a zeroed q for a caller's 0). dropout: None or (dropout_p, (seed, offset)), the keep bits
    of flashcupy.dropout; block_mask: a BlockMask whose blocks are whole tiles (Sm90FwdConfig.takes_block_mask,
    else ValueError); features: a flashcupy._features.Features or None (its FEAT_* bits pick the
    specialization). Returns (out like q, lse (batch, nheads, seqlen_q) float32)."""
    import cupy as cp

    d8 = q.shape[3]
    cfg = config or config_for(d8, causal)
    elem = elem_name(q.dtype)
    if block_mask is not None and not cfg.takes_block_mask(block_mask.block_q, block_mask.block_k):
        raise ValueError(f"block_mask: blocks {block_mask.block_q}x{block_mask.block_k} are not whole "
                         f"{cfg.block_m}x{cfg.block_n} tiles of the Hopper forward")
    name = cfg.kernel_name(elem, causal, dropout is not None, 0 if features is None else features.bits)
    debug(f"sm90 fwd {shape} -> {cfg}")
    kernel = get_kernel(SOURCE, name, cfg.smem_bytes)
    out = cp.empty(q.shape, dtype=q.dtype)
    lse = cp.empty((shape.batch, shape.nheads, shape.seqlen_q), dtype=cp.float32)
    p = attn_params(shape, head_dim=d8, scale=scale, causal=causal, dropout=dropout, block_mask=block_mask,
                    features=features, q=q, k=k, v=v, out=out, lse=lse)
    tma = np.frombuffer(_tma_desc(q, cfg.block_m) + _tma_desc(k, cfg.block_n) + _tma_desc(v, cfg.block_n),
                        dtype=np.uint8)
    tma_arg = tma.view(np.dtype((np.void, tma.size)))[0]
    grid = (math.ceil(shape.seqlen_q / cfg.block_m), shape.nheads, shape.batch)
    kernel(grid, (cfg.nthreads, 1, 1), (p, tma_arg), shared_mem=cfg.smem_bytes)
    return out, lse
