"""Kernel configurations: one frozen dataclass per kernel family, mirroring its CUDA traits struct,
and one pure function per family that chooses it. Nothing else picks block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import bfloat16

# head_dim buckets with a compiled kernel; a head_dim in between runs the next bucket up, its extra
# columns zero-filled on load and never stored (so head_dim must only be a multiple of 8).
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)


def head_dim_bucket(head_dim: int) -> int:
    for b in HEAD_DIM_BUCKETS:
        if head_dim <= b:
            return b
    raise ValueError(f"head_dim: expected <= {HEAD_DIM_BUCKETS[-1]} for the fused kernels, got {head_dim}")


def elem_name(dtype) -> str:
    """The CUDA element tag of a 16-bit dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "Fp16"
    if bfloat16() is not None and dtype == bfloat16():
        return "Bf16"
    raise TypeError(f"no 16-bit kernel for dtype {dtype}")


def _cbool(x: bool) -> str:
    return "true" if x else "false"


@dataclass(frozen=True)
class FwdConfig:
    """Mirror of FwdTraits in cuda/flash_fwd.cu."""

    head_dim: int  # bucket (HEAD_DIM)
    block_m: int  # query rows per CTA
    block_n: int  # key rows per pipeline step
    nwarps: int
    q_in_regs: bool = False  # Q's A fragments held in registers instead of re-read from smem per K/V tile

    @property
    def nthreads(self) -> int:
        return 32 * self.nwarps

    @property
    def smem_bytes(self) -> int:
        return (self.block_m + 2 * self.block_n) * (self.head_dim + 8) * 2

    def kernel_name(self, elem: str, causal: bool, dropout: bool = False) -> str:
        traits = f"FwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}, {_cbool(self.q_in_regs)}>"
        return f"flash_fwd_kernel<{traits}, {_cbool(causal)}, {_cbool(dropout)}>"


# (bucket) -> (block_m, block_n, nwarps), reason. Register counts are sm_80 ptxas, no spills
# (tests/test_compile.py prints the report); speeds in bench/NOTES.md.
_FWD_TABLE = {
    32: ((128, 64, 4), "as hd64: 2 m16 tiles per warp share every K/V fragment; 158 regs"),
    64: ((128, 64, 4), "H200: 0.90-0.96x SDPA flash vs 0.74-0.82x for 128x128/8 warps; 180 regs"),
    96: ((128, 64, 4), "2 m16 tiles per warp; 241 regs at sm_90a, no spill"),
    128: ((128, 32, 4), "128x64/4 spills 80 B at sm_90a; 128x32/4 fits (229 regs): 0.90-0.93x SDPA flash on H200"),
    160: ((128, 64, 8), "O needs 80 regs per 16 rows: 8 warps x 16 rows (4 warps x 32 rows hits 255 regs)"),
    192: ((128, 64, 8), "O needs 96 regs per 16 rows; 8 warps x 16 rows"),
    224: ((128, 64, 8), "O needs 112 regs; smem 118 KB"),
    256: ((128, 64, 8), "O needs 128 regs; smem 135 KB fits sm_80 (164 KB) and sm_90 (227 KB)"),
}


def fwd_config(head_dim: int, dtype, causal: bool, arch: int = 80, sparse_blocks=None) -> FwdConfig:
    """The forward kernel configuration for a problem. Pure: same arguments, same answer.

    sparse_blocks: (block_q, block_k) of a block mask; tiles then divide its blocks (block_q = 64
    takes 64-row tiles of 4 warps x 16 rows)."""
    del dtype, causal, arch  # one table serves both 16-bit dtypes, both masks, sm_80 and sm_90 for now
    bucket = head_dim_bucket(head_dim)
    (bm, bn, nw), _reason = _FWD_TABLE[bucket]
    if sparse_blocks is not None and sparse_blocks[0] % bm:
        bm, nw = 64, 4
    return FwdConfig(bucket, bm, bn, nw)


def all_fwd_specializations():
    """Every (elem, causal, dropout, config) the library can launch: CI compiles each one."""
    for elem in ("Fp16", "Bf16"):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for dropout in (False, True):
                    for sparse in (None, (64, 64)):  # dense / block-sparse tiles (equal where block_m = 64)
                        yield elem, causal, dropout, fwd_config(bucket, None, causal, sparse_blocks=sparse)


@dataclass(frozen=True)
class BwdConfig:
    """Mirror of BwdTraits (flash_bwd_kernel) and BwdDqTraits (flash_bwd_dq_kernel) in cuda/flash_bwd.cu."""

    head_dim: int  # bucket
    block_m: int  # query rows per inner step
    block_n: int  # keys per CTA (16 per warp)
    d_split: int  # CTAs per key block, each owning head_dim / d_split output columns
    dq_block_m: int  # dQ kernel (deterministic): query rows per CTA (16 per warp)
    dq_block_n: int  # dQ kernel: keys per step
    dq_atomic: bool  # default path: dQ by float32 atomics in the main kernel (else the dQ kernel)

    @property
    def nthreads(self) -> int:
        return 2 * self.block_n  # 32 threads per 16 keys

    @property
    def dq_nthreads(self) -> int:
        return 2 * self.dq_block_m

    @property
    def smem_bytes(self) -> int:
        pitch = self.head_dim + 8
        return (2 * self.block_n * pitch + 4 * self.block_m * pitch + self.block_n * (self.block_m + 8)) * 2 \
            + 4 * self.block_m * 4

    @property
    def dq_smem_bytes(self) -> int:
        return (2 * self.dq_block_m + 2 * self.dq_block_n) * (self.head_dim + 8) * 2

    def kernel_name(self, elem: str, causal: bool, write_dq: bool, dropout: bool = False) -> str:
        traits = f"BwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.d_split}>"
        return f"flash_bwd_kernel<{traits}, {_cbool(causal)}, {_cbool(write_dq)}, {_cbool(dropout)}>"

    def dq_kernel_name(self, elem: str, causal: bool, dropout: bool = False) -> str:
        traits = f"BwdDqTraits<{elem}, {self.head_dim}, {self.dq_block_m}, {self.dq_block_n}, {self.dq_block_m // 16}>"
        return f"flash_bwd_dq_kernel<{traits}, {_cbool(causal)}, {_cbool(dropout)}>"


# (bucket) -> (block_m, block_n, d_split, dq_block_m, dq_block_n, dq_atomic), reason.
# H200 measurements in bench/NOTES.md: 8 warps x 16 keys (block_n 128) beat 4 warps by 1.4x at hd128
# (each Q/dO tile read from shared memory serves twice the keys); at hd64 the separate dQ kernel beats
# float32 atomics (0.72x vs 0.68x SDPA flash) and is deterministic for free.
_BWD_TABLE = {
    32: ((64, 128, 1, 128, 64, False), "as hd64"),
    64: ((64, 128, 1, 128, 64, False), "dQ kernel beats atomics at hd64; 178 regs"),
    96: ((64, 128, 1, 128, 64, True), "as hd128"),
    128: ((64, 128, 1, 128, 64, True), "0.66x SDPA flash vs 0.46x for 64x64; 252 regs at sm_90a, no spill"),
    160: ((64, 64, 2, 64, 32, True), "two CTAs per key block, 80 output columns each; 176 regs"),
    192: ((64, 64, 2, 64, 32, True), "96 output columns per CTA; 240 regs"),
    224: ((32, 64, 2, 64, 32, True), "112 output columns per CTA; 32-query steps keep smem at 125 KB (sm_80: 163)"),
    256: ((32, 64, 2, 64, 32, True), "128 output columns per CTA, 32-query steps; 234 regs"),
}


def bwd_config(head_dim: int, dtype, causal: bool, arch: int = 80, sparse_blocks=None) -> BwdConfig:
    """The backward kernels' configuration for a problem. Pure. sparse_blocks as fwd_config: the key
    block of a CTA and the dQ kernel's query tile shrink to 64 when the mask's blocks are 64."""
    del dtype, causal, arch
    bucket = head_dim_bucket(head_dim)
    (bm, bn, split, dq_bm, dq_bn, atomic), _reason = _BWD_TABLE[bucket]
    if sparse_blocks is not None:
        block_q, block_k = sparse_blocks
        if block_k < bn:  # 4-warp CTAs: at hd128 the atomic-dQ variant spills 4 B at sm_90a; the dQ kernel fits
            bn, atomic = block_k, False
        dq_bm = min(dq_bm, block_q)
    return BwdConfig(bucket, bm, bn, split, dq_bm, dq_bn, atomic)


def all_bwd_specializations():
    """Every (elem, causal, dropout, config) of the backward family: CI compiles each one."""
    for elem in ("Fp16", "Bf16"):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for dropout in (False, True):
                    for sparse in (None, (64, 64)):
                        yield elem, causal, dropout, bwd_config(bucket, None, causal, sparse_blocks=sparse)


# ---------------------------------------------------------------------------------------------------
# float32 / float64 kernels on CUDA cores (cuda/flash_simt_fwd.cu, cuda/flash_simt_bwd.cu; issue 9)

SIMT_DTYPES = ("float", "double")


def simt_elem(dtype) -> str:
    """The CUDA element type of a float32 / float64 dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"no SIMT kernel for dtype {dtype}")


def _simt_itemsize(elem: str) -> int:
    return {"float": 4, "double": 8}[elem]


@dataclass(frozen=True)
class SimtFwdConfig:
    """Mirror of SimtFwdTraits in cuda/flash_simt_fwd.cu."""

    elem: str  # "float" or "double"
    head_dim: int  # bucket (HEAD_DIM)
    block_m: int  # query rows per CTA
    block_n: int  # key rows per pipeline step
    nwarps: int  # each owns block_m / nwarps query rows
    min_ctas: int = 1  # __launch_bounds__ minimum CTAs per SM (ptxas register target 65536 / (threads x it))

    @property
    def nthreads(self) -> int:
        return 32 * self.nwarps

    @property
    def vec(self) -> int:
        return 16 // _simt_itemsize(self.elem)

    @property
    def smem_bytes(self) -> int:
        pitch, p_pitch = self.head_dim + self.vec, self.block_n + 2 * self.vec
        return ((self.block_m + 2 * self.block_n) * pitch + self.block_m * p_pitch) * _simt_itemsize(self.elem)

    source = "flash_simt_fwd.cu"

    def kernel_name(self) -> str:
        """causal is a run-time argument of the kernel (one specialization serves both masks)."""
        traits = (f"SimtFwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}, "
                  f"{self.min_ctas}>")
        return f"flash_simt_fwd_kernel<{traits}>"


@dataclass(frozen=True)
class SimtBwdConfig:
    """Mirror of SimtBwdTraits in cuda/flash_simt_bwd.cu (shared by the KV and the dQ kernel)."""

    elem: str
    head_dim: int
    block_m: int  # query rows per step
    block_n: int  # key rows per CTA (KV kernel) and per step (dQ kernel)
    nwarps: int

    @property
    def nthreads(self) -> int:
        return 32 * self.nwarps

    @property
    def vec(self) -> int:
        return 16 // _simt_itemsize(self.elem)

    @property
    def smem_bytes(self) -> int:
        pitch, p_pitch = self.head_dim + self.vec, self.block_n + 2 * self.vec
        elems = 2 * self.block_n * pitch + 2 * self.block_m * pitch + 2 * self.block_m * p_pitch + 2 * self.block_m
        return elems * _simt_itemsize(self.elem)

    source = "flash_simt_bwd.cu"
    dq_kernel_always = False  # dQ by atomics in the KV kernel unless deterministic=True

    @property
    def kv_nthreads(self) -> int:
        return self.nthreads

    @property
    def kv_smem_bytes(self) -> int:
        return self.smem_bytes

    @property
    def dq_nthreads(self) -> int:
        return self.nthreads

    @property
    def dq_smem_bytes(self) -> int:
        return self.smem_bytes

    def kv_grid_x(self, seqlen_k: int) -> int:
        return -(-seqlen_k // self.block_n)

    def dq_grid_x(self, seqlen_q: int) -> int:
        return -(-seqlen_q // self.block_m)

    def _traits(self) -> str:
        return f"SimtBwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}>"

    # causal and dq_atomic are run-time arguments of the kernels.
    def kv_kernel_name(self) -> str:
        return f"flash_simt_bwd_kv_kernel<{self._traits()}>"

    def dq_kernel_name(self) -> str:
        return f"flash_simt_bwd_q_kernel<{self._traits()}>"

    def preprocess_kernel_name(self) -> str:
        return f"flash_simt_bwd_preprocess_kernel<{self.elem}>"


SIMT_PREPROCESS_THREADS = 128  # flash_simt_bwd_preprocess_kernel: one warp per query row

# (elem, bucket) -> (block_m, block_n, nwarps), reason. Registers: sm_90a ptxas, no spills
# (tests/test_compile_simt.py prints the report); shared memory fits sm_80's 163 KB opt-in.
_SIMT_FWD_TABLE = {
    ("float", 32): ((64, 64, 4), "4 rows x 8 keys per thread; 168 regs, 3 CTAs/SM"),
    ("float", 64): ((64, 64, 4), "S 4x8 and O 4x8 per thread; 168 regs, 3 CTAs/SM (70 KB smem each)"),
    ("float", 96): ((64, 32, 4), "64-key steps spill 8 B; 168 regs"),
    ("float", 128): ((64, 32, 4), "H200: 34.1 TFLOP/s vs 26.7 for 32x64/4 (4 rows per thread; 238 regs at sm_90a, no spill)"),
    ("float", 160): ((32, 64, 4), "2 rows per thread (O 2x20); 150 regs"),
    ("float", 192): ((32, 32, 4), "O 2x24 per thread; 146 regs; 80 KB smem (64-key steps: 125 KB)"),
    ("float", 224): ((32, 32, 4), "O 2x28 per thread; 138 regs; 92 KB smem"),
    ("float", 256): ((32, 32, 4), "O 2x32 per thread; 162 regs; 105 KB smem (64-key steps: 175 KB)"),
    ("double", 32): ((64, 32, 4), "S 4x4, O 4x4 doubles per thread; 168 regs"),
    ("double", 64): ((32, 32, 4), "O 2x8 doubles; 157 regs, 3 CTAs/SM (64x32 needs 222 regs)"),
    ("double", 96): ((32, 32, 4), "O 2x12 doubles; 157 regs"),
    ("double", 128): ((32, 32, 4), "O 2x16 doubles; 168 regs"),
    ("double", 160): ((16, 32, 4), "1 row per thread (O 1x20 doubles); 130 regs"),
    ("double", 192): ((16, 32, 4), "O 1x24 doubles; 162 regs"),
    ("double", 224): ((16, 16, 4), "O 1x28 doubles; 16-key steps: 79 KB smem (32-key: 149 KB)"),
    ("double", 256): ((16, 16, 4), "O 1x32 doubles; 164 regs; 16-key steps: 102 KB smem (32-key: 170 KB)"),
}

# (elem, bucket) -> (kernel head_dim, block_m, block_n, nwarps), reason. float32 head dims 96, 160
# and 224 run the next even bucket: their 24 / 40 / 56 column chunks do not split over 128 threads
# in layout B (dK, dV) with BLOCK_N = 32.
_SIMT_BWD_TABLE = {
    ("float", 32): ((32, 64, 64, 4), "KV kernel 168 regs, dQ kernel 168"),
    ("float", 64): ((64, 64, 64, 4), "H200: 33.5 vs 29.6 TFLOP/s for 32x64/4 (254 regs, no spill; 107 KB smem)"),
    ("float", 96): ((128, 32, 32, 4), "runs the hd128 kernel (layout B)"),
    ("float", 128): ((128, 32, 32, 4), "KV 168 regs, dQ 128"),
    ("float", 160): ((192, 16, 32, 4), "runs the hd192 kernel (layout B)"),
    ("float", 192): ((192, 16, 32, 4), "KV 168 regs, dQ 80; 32-row steps spill in the dQ kernel"),
    ("float", 224): ((256, 32, 32, 8), "runs the hd256 kernel (layout B)"),
    ("float", 256): ((256, 32, 32, 8), "8 warps: dK + dV 2 x 32 per thread; KV 177 regs, dQ 109"),
    ("double", 32): ((32, 32, 32, 4), "KV 128 regs, dQ 96"),
    ("double", 64): ((64, 32, 32, 4), "KV 167 regs, dQ 128"),
    ("double", 96): ((96, 16, 16, 4), "KV 130 regs, dQ 78 (32x16/4 spills 4-8 B)"),
    ("double", 128): ((128, 16, 16, 4), "KV 162 regs, dQ 126"),
    ("double", 160): ((160, 16, 16, 4), "KV 168 regs, dQ 128"),
    ("double", 192): ((192, 16, 16, 4), "KV 220 regs, dQ 126"),
    ("double", 224): ((224, 16, 16, 4), "KV 242 regs, dQ 126"),
    ("double", 256): ((256, 16, 16, 8), "8 warps (4 warps spill; 32-row steps need 209 KB smem); KV 164 regs, dQ 78"),
}


def simt_fwd_config(head_dim: int, dtype, causal: bool, arch: int = 80) -> SimtFwdConfig:
    """The float32 / float64 forward kernel configuration for a problem. Pure."""
    del causal, arch  # one table serves both masks, sm_80 and sm_90 for now
    elem = simt_elem(dtype)
    bucket = head_dim_bucket(head_dim)
    (bm, bn, nw), _reason = _SIMT_FWD_TABLE[elem, bucket]
    return SimtFwdConfig(elem, bucket, bm, bn, nw)


def simt_bwd_config(head_dim: int, dtype, causal: bool, arch: int = 80) -> SimtBwdConfig:
    """The float32 / float64 backward kernels' configuration for a problem. Pure."""
    del causal, arch
    elem = simt_elem(dtype)
    bucket = head_dim_bucket(head_dim)
    (kernel_head_dim, bm, bn, nw), _reason = _SIMT_BWD_TABLE[elem, bucket]
    return SimtBwdConfig(elem, kernel_head_dim, bm, bn, nw)


def all_simt_fwd_specializations():
    """Every distinct config of the SIMT forward (causal is a run-time argument): CI compiles each."""
    seen = []
    for dtype in (np.float32, np.float64):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                cfg = simt_fwd_config(bucket, dtype, causal)
                if cfg not in seen:
                    seen.append(cfg)
                    yield cfg


def all_simt_bwd_specializations():
    """Every distinct config of the SIMT backward: CI compiles its KV and dQ kernels (and the
    preprocess kernel of its element type)."""
    seen = []
    for dtype in (np.float32, np.float64):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                cfg = simt_bwd_config(bucket, dtype, causal)
                if cfg not in seen:
                    seen.append(cfg)
                    yield cfg


# ---------------------------------------------------------------------------------------------------
# float64 on the FP64 tensor cores (DMMA, mma.sync .f64, sm_80+: cuda/flash_dmma_fwd.cu,
# cuda/flash_dmma_bwd.cu), and float32 with allow_tf32 on the TF32 tensor cores (the same kernel
# templates with elem "float": mma.sync m16n8k8 .tf32, 16-row warps, katom 8). float_fwd_config /
# float_bwd_config choose between them and the SIMT kernels.

DMMA_KATOMS = (4, 8, 16)  # 4: m8n8k4 (sm_80+); 8 / 16: m16n8k8 / m16n8k16 (sm_90, 16-row warps only)
TF32_KATOM = 8  # mma.sync m16n8k8 .tf32 (sm_80+)
_ELEM_BYTES = {"double": 8, "float": 4}


@dataclass(frozen=True)
class DmmaFwdConfig:
    """Mirror of DmmaFwdTraits in cuda/flash_dmma_fwd.cu."""

    head_dim: int  # bucket
    block_m: int  # query rows per CTA (8 or 16 per warp)
    block_n: int  # keys per pipeline step
    nwarps: int
    katom: int  # DMMA_KATOMS (8 / 16 need 16 rows per warp); TF32_KATOM for elem "float"
    elem: str = "double"  # "double": FP64 tensor cores; "float": TF32 tensor cores (16 rows per warp)

    source = "flash_dmma_fwd.cu"

    @property
    def nthreads(self) -> int:
        return 32 * self.nwarps

    @property
    def smem_bytes(self) -> int:
        return (self.block_m + 2 * self.block_n) * self.head_dim * _ELEM_BYTES[self.elem]

    def kernel_name(self) -> str:
        traits = (f"DmmaFwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}, "
                  f"{self.katom}>")
        return f"flash_dmma_fwd_kernel<{traits}>"


@dataclass(frozen=True)
class DmmaBwdConfig:
    """Mirror of DmmaBwdKvTraits (KV kernel) and DmmaBwdDqTraits (dQ kernel) in cuda/flash_dmma_bwd.cu."""

    head_dim: int  # bucket
    kv_block_m: int  # KV kernel: query rows per step
    kv_block_n: int  # KV kernel: keys per CTA (8 or 16 per warp)
    kv_nwarps: int
    d_split: int  # KV kernel: CTAs per key tile, each owning head_dim / d_split columns of dK, dV
    dq_block_m: int  # dQ kernel: query rows per CTA (8 or 16 per warp)
    dq_block_n: int  # dQ kernel: keys per step
    dq_nwarps: int
    kv_katom: int  # DMMA_KATOMS (8 / 16 need 16 keys per warp)
    dq_katom: int  # (8 / 16 need 16 rows per warp)
    kv_stages: int = 2  # KV kernel: Q_i, dO_i buffers (2: prefetch under compute; 1: less smem, more CTAs)
    elem: str = "double"  # "double": FP64 tensor cores; "float": TF32 tensor cores (16 rows / keys per warp)

    source = "flash_dmma_bwd.cu"
    dq_kernel_always = True  # no atomics: always the dQ kernel (bitwise reproducible)

    @property
    def kv_nthreads(self) -> int:
        return 32 * self.kv_nwarps

    @property
    def dq_nthreads(self) -> int:
        return 32 * self.dq_nwarps

    @property
    def kv_smem_bytes(self) -> int:
        return (2 * self.kv_block_n + 2 * self.kv_stages * self.kv_block_m) * self.head_dim * _ELEM_BYTES[self.elem]

    @property
    def dq_smem_bytes(self) -> int:
        return (2 * self.dq_block_m + 2 * self.dq_block_n) * self.head_dim * _ELEM_BYTES[self.elem]

    def kv_grid_x(self, seqlen_k: int) -> int:
        return -(-seqlen_k // self.kv_block_n) * self.d_split

    def dq_grid_x(self, seqlen_q: int) -> int:
        return -(-seqlen_q // self.dq_block_m)

    def kv_kernel_name(self) -> str:
        traits = (f"DmmaBwdKvTraits<{self.elem}, {self.head_dim}, {self.kv_block_m}, {self.kv_block_n}, {self.kv_nwarps}, "
                  f"{self.d_split}, {self.kv_katom}, {self.kv_stages}>")
        return f"flash_dmma_bwd_kv_kernel<{traits}>"

    def dq_kernel_name(self) -> str:
        traits = (f"DmmaBwdDqTraits<{self.elem}, {self.head_dim}, {self.dq_block_m}, {self.dq_block_n}, {self.dq_nwarps}, "
                  f"{self.dq_katom}>")
        return f"flash_dmma_bwd_dq_kernel<{traits}>"

    def preprocess_kernel_name(self) -> str:
        return f"flash_simt_bwd_preprocess_kernel<{self.elem}>"  # in flash_simt_bwd.cu


# bucket -> (block_m, block_n, nwarps), reason. Warps of 16 rows run katom 16 on sm_90 (one m16n8k16
# per 8 m8n8k4: a quarter of the instructions for the same fragments) and m8n8k4 on sm_80; warps of 8
# rows run m8n8k4 everywhere. First choices from ptxas (sm_90a registers, no spill anywhere) and
# shared memory (<= 163 KB, sm_80's limit), not yet from measurements: bench/bench_simt.py --sweep.
_DMMA_FWD_TABLE = {
    32: ((64, 64, 4), "16 rows per warp; S 16x64 + O 16x32 in registers, 214 regs"),
    64: ((64, 32, 4), "16 rows per warp; 209 regs (64-key steps: 252), 2 CTAs/SM"),
    96: ((64, 16, 4), "16 rows per warp, 16-key steps (O 16x96 in registers)"),
    128: ((64, 16, 4), "16 rows per warp, 16-key steps: 248 regs (32-key steps spill)"),
    160: ((32, 32, 4), "8 rows per warp: O 8x160 = 40 doubles per lane"),
    192: ((32, 32, 4), "8 rows per warp; 214 regs"),
    224: ((32, 16, 4), "8 rows per warp; 16-key steps keep smem at 112 KB"),
    256: ((32, 16, 4), "8 rows per warp; O 8x256 = 64 doubles per lane, 228 regs; 128 KB smem"),
}

# bucket -> (kv_block_m, kv_block_n, kv_nwarps, d_split, dq_block_m, dq_block_n, dq_nwarps, kv_stages), reason.
# Buckets 192..256 are absent: the KV kernel's K, V and double-buffered Q, dO tiles exceed sm_80's
# 163 KB there, so float_bwd_config runs the DFMA (SIMT) backward for them.
_DMMA_BWD_TABLE = {
    32: ((16, 64, 4, 1, 64, 32, 4, 2), "as hd64"),
    64: ((16, 64, 4, 1, 64, 32, 4, 2), "KV: 16 keys per warp (dK, dV 16x64 each in registers, 255 regs); dQ: 16 rows"),
    96: ((16, 32, 4, 1, 64, 16, 4, 2), "KV: 8 keys per warp (dK, dV 8x96); dQ: 16 rows, 16-key steps"),
    128: ((16, 32, 4, 1, 32, 16, 4, 1), "H200: single-buffered Q/dO (96 KB, 2 CTAs/SM) + 8-row dQ warps: 16.5 vs 14.0 TFLOP/s"),
    160: ((16, 32, 4, 2, 32, 16, 4, 2), "KV: dK, dV columns split over 2 CTAs (160 KB smem); dQ: 8 rows per warp"),
}


def dmma_katom(rows_per_warp: int, arch: int) -> int:
    """The DMMA instruction of a kernel whose warps own rows_per_warp rows: m16n8k16 (16) on sm_90
    with 16-row warps, else m8n8k4 (4)."""
    return 16 if arch >= 90 and rows_per_warp == 16 else 4


def dmma_fwd_config(head_dim: int, causal: bool, arch: int = 90) -> DmmaFwdConfig:
    """The float64 tensor-core forward configuration. Pure."""
    del causal  # one table serves both masks
    bucket = head_dim_bucket(head_dim)
    (bm, bn, nw), _reason = _DMMA_FWD_TABLE[bucket]
    return DmmaFwdConfig(bucket, bm, bn, nw, dmma_katom(bm // nw, arch))


def dmma_bwd_config(head_dim: int, causal: bool, arch: int = 90) -> DmmaBwdConfig:
    """The float64 tensor-core backward configuration (KV kernel and dQ kernel). Pure."""
    del causal
    bucket = head_dim_bucket(head_dim)
    (kbm, kbn, knw, split, qbm, qbn, qnw, stages), _reason = _DMMA_BWD_TABLE[bucket]
    return DmmaBwdConfig(bucket, kbm, kbn, knw, split, qbm, qbn, qnw,
                         dmma_katom(kbn // knw, arch), dmma_katom(qbm // qnw, arch), kv_stages=stages)


# TF32 (float32 with allow_tf32): bucket -> (block_m, block_n, nwarps), reason. 16 rows per warp (the
# m16n8k8 .tf32 shape); O holds head_dim / 2 floats per lane, S block_n / 2. hd64 and hd128 from the
# H200 sweep (bench/NOTES.md); the others first choices from ptxas and shared memory (<= 163 KB).
_TF32_FWD_TABLE = {
    32: ((64, 64, 4), "16 rows per warp, 64-key steps: 24 KB smem"),
    64: ((64, 128, 4), "H200: 85.2 vs 82.5 TFLOP/s for 64x64/4 (128-key steps: 80 KB smem, 178-180 regs)"),
    96: ((64, 64, 4), "as hd64: 72 KB"),
    128: ((128, 64, 8), "H200: 86.5 vs 83.6 TFLOP/s for 64x64/4 (128 KB smem, 174-186 regs)"),
    160: ((64, 32, 4), "32-key steps: 80 KB"),
    192: ((64, 32, 4), "32-key steps: 96 KB"),
    224: ((64, 32, 4), "32-key steps: 112 KB"),
    256: ((64, 32, 4), "32-key steps: 128 KB; O 128 floats per lane"),
}

# TF32 backward: bucket -> (kernel bucket, kv_block_m, kv_block_n, kv_nwarps, d_split, dq_block_m, dq_block_n,
# dq_nwarps, kv_stages), reason. 16 keys (KV) / 16 rows (dQ) per warp. A CTA's dK + dV hold
# head_dim / d_split floats per lane; d_split must leave whole 32-column groups, so buckets 160 and 224
# run the 192 / 256 kernels (their extra columns are zero-filled, never stored).
_TF32_BWD_TABLE = {
    32: ((32, 32, 64, 4, 1, 64, 64, 4, 2), "KV 32 KB, dQ 32 KB"),
    64: ((64, 64, 64, 4, 1, 64, 64, 4, 2), "H200: 61.2 vs 57.2 TFLOP/s for KV 32-row steps (KV 96 KB, 230-238 regs)"),
    96: ((96, 32, 64, 4, 1, 64, 32, 4, 2), "KV 96 KB, dQ 72 KB"),
    128: ((128, 32, 64, 4, 1, 64, 32, 4, 1), "single-buffered Q/dO: KV 96 KB and dQ 96 KB, 2 CTAs per SM"),
    160: ((192, 32, 64, 4, 2, 64, 32, 4, 1), "the 192 kernel"),
    192: ((192, 32, 64, 4, 2, 64, 32, 4, 1), "dK, dV columns split over 2 CTAs: KV 144 KB; dQ 144 KB"),
    224: ((256, 32, 32, 2, 2, 32, 32, 2, 1), "the 256 kernel"),
    256: ((256, 32, 32, 2, 2, 32, 32, 2, 1), "2-warp CTAs under sm_80's 163 KB: KV 128 KB, dQ 128 KB; d_split 2"),
}


def tf32_fwd_config(head_dim: int, causal: bool, arch: int = 90) -> DmmaFwdConfig:
    """The float32 TF32 tensor-core forward configuration (allow_tf32). Pure."""
    del causal, arch  # one table serves both masks; m16n8k8 .tf32 exists from sm_80
    bucket = head_dim_bucket(head_dim)
    (bm, bn, nw), _reason = _TF32_FWD_TABLE[bucket]
    return DmmaFwdConfig(bucket, bm, bn, nw, TF32_KATOM, elem="float")


def tf32_bwd_config(head_dim: int, causal: bool, arch: int = 90) -> DmmaBwdConfig:
    """The float32 TF32 tensor-core backward configuration (allow_tf32; KV and dQ kernels). Pure."""
    del causal, arch
    (kb, kbm, kbn, knw, split, qbm, qbn, qnw, stages), _reason = _TF32_BWD_TABLE[head_dim_bucket(head_dim)]
    return DmmaBwdConfig(kb, kbm, kbn, knw, split, qbm, qbn, qnw, TF32_KATOM, TF32_KATOM, kv_stages=stages,
                         elem="float")


def float_fwd_config(head_dim: int, dtype, causal: bool, arch: int = 80, allow_tf32: bool = False):
    """float32 / float64 forward: the kernel family and its configuration. Pure.
    float64 on sm_80+ runs on the FP64 tensor cores (DMMA: 2x the DFMA peak on A100 / H100 / H200);
    float32 with allow_tf32 on sm_80+ on the TF32 tensor cores; other float32 and older GPUs on CUDA
    cores (SIMT, exact FFMA)."""
    if simt_elem(dtype) == "double" and arch >= 80:
        return dmma_fwd_config(head_dim, causal, arch)
    if simt_elem(dtype) == "float" and allow_tf32 and arch >= 80:
        return tf32_fwd_config(head_dim, causal, arch)
    return simt_fwd_config(head_dim, dtype, causal, arch)


def float_bwd_config(head_dim: int, dtype, causal: bool, arch: int = 80, allow_tf32: bool = False):
    """float32 / float64 backward: the kernel family and its configuration. Pure (as float_fwd_config;
    float64 head dims above 160 run the DFMA kernels: see _DMMA_BWD_TABLE)."""
    if simt_elem(dtype) == "double" and arch >= 80 and head_dim_bucket(head_dim) in _DMMA_BWD_TABLE:
        return dmma_bwd_config(head_dim, causal, arch)
    if simt_elem(dtype) == "float" and allow_tf32 and arch >= 80:
        return tf32_bwd_config(head_dim, causal, arch)
    return simt_bwd_config(head_dim, dtype, causal, arch)


def all_dmma_fwd_specializations():
    """Every distinct DMMA forward config for sm_80 and sm_90: CI compiles each."""
    seen = []
    for arch in (80, 90):
        for bucket in HEAD_DIM_BUCKETS:
            cfg = dmma_fwd_config(bucket, False, arch)
            if cfg not in seen:
                seen.append(cfg)
                yield cfg


def all_dmma_bwd_specializations():
    """Every distinct DMMA backward config for sm_80 and sm_90: CI compiles its KV and dQ kernels."""
    seen = []
    for arch in (80, 90):
        for bucket in _DMMA_BWD_TABLE:
            cfg = dmma_bwd_config(bucket, False, arch)
            if cfg not in seen:
                seen.append(cfg)
                yield cfg


def all_tf32_fwd_specializations():
    """Every distinct TF32 forward config (the same on sm_80 and sm_90): CI compiles each."""
    return list(dict.fromkeys(tf32_fwd_config(bucket, False) for bucket in HEAD_DIM_BUCKETS))


def all_tf32_bwd_specializations():
    """Every distinct TF32 backward config: CI compiles its KV and dQ kernels and its preprocess kernel."""
    return list(dict.fromkeys(tf32_bwd_config(bucket, False) for bucket in HEAD_DIM_BUCKETS))
