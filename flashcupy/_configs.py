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

    @property
    def nthreads(self) -> int:
        return 32 * self.nwarps

    @property
    def smem_bytes(self) -> int:
        return (self.block_m + 2 * self.block_n) * (self.head_dim + 8) * 2

    def kernel_name(self, elem: str, causal: bool, dropout: bool = False) -> str:
        traits = f"FwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}>"
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


def fwd_config(head_dim: int, dtype, causal: bool, arch: int = 80) -> FwdConfig:
    """The forward kernel configuration for a problem. Pure: same arguments, same answer."""
    del dtype, causal, arch  # one table serves both 16-bit dtypes, both masks, sm_80 and sm_90 for now
    bucket = head_dim_bucket(head_dim)
    (bm, bn, nw), _reason = _FWD_TABLE[bucket]
    return FwdConfig(bucket, bm, bn, nw)


def all_fwd_specializations():
    """Every (elem, causal, dropout, config) the library can launch: CI compiles each one."""
    for elem in ("Fp16", "Bf16"):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for dropout in (False, True):
                    yield elem, causal, dropout, fwd_config(bucket, None, causal)


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


def bwd_config(head_dim: int, dtype, causal: bool, arch: int = 80) -> BwdConfig:
    """The backward kernels' configuration for a problem. Pure."""
    del dtype, causal, arch
    bucket = head_dim_bucket(head_dim)
    (bm, bn, split, dq_bm, dq_bn, atomic), _reason = _BWD_TABLE[bucket]
    return BwdConfig(bucket, bm, bn, split, dq_bm, dq_bn, atomic)


def all_bwd_specializations():
    """Every (elem, causal, dropout, config) of the backward family: CI compiles each one."""
    for elem in ("Fp16", "Bf16"):
        for bucket in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                for dropout in (False, True):
                    yield elem, causal, dropout, bwd_config(bucket, None, causal)


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

    def kernel_name(self) -> str:
        """causal is a run-time argument of the kernel (one specialization serves both masks)."""
        traits = f"SimtFwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}>"
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
    ("float", 128): ((32, 64, 4), "2 rows per thread (O 2x16); 128 regs (64x32/4 spills 4 B at sm_80)"),
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
    ("float", 64): ((64, 32, 64, 4), "KV 168 regs (3 CTAs/SM, 71 KB smem); 64x64 needs 254 regs; dQ 128"),
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
