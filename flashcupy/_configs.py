"""Kernel configurations: one frozen dataclass per kernel family, mirroring its CUDA traits struct,
and one pure function per family that chooses it for (problem, dtype, device). Nothing else picks
block sizes.

The device is a flashcupy._device.DeviceInfo (compute capability, opt-in shared memory per block);
an int compute capability is accepted too and stands for that class's default budget
(DeviceInfo.for_cc). Each table maps a head_dim bucket to candidates in order of preference, each
with a one-line reason; a chooser returns the first candidate whose shared memory fits the device
(device.smem_optin), or None where none fits or the GPU is older than sm_80 (every family loads tiles
with cp.async): the caller then runs the chunked path on the GPU (flashcupy._dispatch). The first
candidate of every table is the configuration measured on the H200 and fits sm_80's 163 KB, so A100 /
H100 / H200 run exactly what they ran before devices were considered; the later candidates exist for
the 99 KB class (sm_86 / sm_89 / sm_120: RTX 30xx / 40xx / 50xx, A10, L4, L40).

Shared-memory sizes and block sizes: the smem_bytes and nthreads properties restate the CUDA traits'
SMEM_BYTES and NTHREADS, and traits_checks() lists them; tests/test_smem.py compiles (NVRTC, in CI)
static_asserts that the two agree for every configuration a chooser can return under any budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import bfloat16
from ._device import DeviceInfo, as_device

# head_dim buckets with a compiled kernel; a head_dim in between runs the next bucket up, its extra
# columns zero-filled on load and never stored (so head_dim must only be a multiple of 8).
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)

MIN_CC = 80  # every family: cp.async tile loads; mma.sync m16n8k16 / m8n8k4 .f64 / m16n8k8 .tf32

SMEM_99KB = 101376  # opt-in shared memory per block of sm_86 / sm_89 / sm_120

# The devices whose configurations can run on a GPU of each NVRTC target: the class's own budget and,
# on sm_80 / sm_90, the 99 KB cap of FLASHCUPY_SMEM_LIMIT_KB=99 (flashcupy._device). CI compiles every
# configuration the choosers return for these (tests/test_compile*.py, tests/test_smem.py).
ARCH_DEVICES = {
    "sm_80": (DeviceInfo.for_cc(80), DeviceInfo.for_cc(80).capped(SMEM_99KB)),
    "sm_86": (DeviceInfo.for_cc(86),),
    "sm_90a": (DeviceInfo.for_cc(90), DeviceInfo.for_cc(90).capped(SMEM_99KB)),
}


def reference_devices(devices=None) -> tuple:
    """devices as a tuple of DeviceInfo; None: every device of ARCH_DEVICES."""
    if devices is None:
        return tuple(dict.fromkeys(d for ds in ARCH_DEVICES.values() for d in ds))
    if isinstance(devices, (DeviceInfo, int)):
        devices = (devices,)
    return tuple(as_device(d) for d in devices)


# Block masks as the choosers see them: blocks are powers of two >= 64 and tiles shrink only where a
# block is 64 (fwd_config / bwd_config), so these four cover every configuration a mask can select.
SPARSE_CLASSES = (None, (64, 64), (64, 128), (128, 64))


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


def _feat(feat: int) -> str:
    """The trailing FEAT template argument of a kernel name (issue 16's FEAT_* bits): nothing for 0, so
    the plain kernels keep their names."""
    return f", {int(feat)}" if feat else ""


def _cbool(x: bool) -> str:
    return "true" if x else "false"


def _first_fitting(device: DeviceInfo, candidates):
    """The first config of candidates (an iterable) whose shared memory fits device; None if none does
    or the device predates sm_80."""
    if device.cc < MIN_CC:
        return None
    for cfg in candidates:
        if device.fits(cfg.max_smem_bytes):
            return cfg
    return None


def _dedup(items):
    return list(dict.fromkeys(x for x in items if x is not None))


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

    @property
    def max_smem_bytes(self) -> int:
        return self.smem_bytes

    def traits(self, elem: str) -> str:
        return f"FwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}>"

    source = "flash_fwd.cu"

    def traits_checks(self):
        """(source, traits, smem_bytes, nthreads) of every traits struct a launch of this config uses: the
        shared memory and the block size it asks for, which must equal the struct's SMEM_BYTES and
        NTHREADS (tests/test_smem.py compiles static_asserts of that with NVRTC)."""
        return [(self.source, self.traits(elem), self.smem_bytes, self.nthreads) for elem in ("Fp16", "Bf16")]

    def kernel_name(self, elem: str, causal: bool, dropout: bool = False, feat: int = 0) -> str:
        return f"flash_fwd_kernel<{self.traits(elem)}, {_cbool(causal)}, {_cbool(dropout)}{_feat(feat)}>"


# bucket -> candidates ((block_m, block_n, nwarps), reason), first fitting wins. Register counts are
# ptxas at sm_80 / sm_86 / sm_90a, no spills (tests/test_compile.py prints the report); speeds in
# bench/NOTES.md. The 99 KB entries are not yet timed on a 99 KB part.
_FWD_TABLE = {
    32: (((128, 64, 4), "as hd64: 2 m16 tiles per warp share every K/V fragment; 158 regs"),),
    64: (((128, 64, 4), "H200: 0.90-0.96x SDPA flash vs 0.74-0.82x for 128x128/8 warps; 180 regs"),),
    96: (((128, 64, 4), "2 m16 tiles per warp; 241 regs at sm_90a, no spill"),),
    128: (((128, 32, 4), "128x64/4 spills 80 B at sm_90a; 128x32/4 fits (229 regs): 0.90-0.93x SDPA flash on H200"),),
    160: (((128, 64, 8), "O needs 80 regs per 16 rows: 8 warps x 16 rows (4 warps x 32 rows hits 255 regs)"),),
    192: (((128, 64, 8), "O needs 96 regs per 16 rows; 8 warps x 16 rows"),
          ((64, 64, 4), "99 KB: 75 KB; FA2's sm8x tile (64x64/4) and our block-sparse tile; 168-170 regs")),
    224: (((128, 64, 8), "O needs 112 regs; smem 118 KB"),
          ((64, 64, 4), "99 KB: 87 KB; FA2's sm8x tile at hd224; 198-206 regs")),
    256: (((128, 64, 8), "O needs 128 regs; smem 135 KB fits sm_80 (164 KB) and sm_90 (227 KB)"),
          ((64, 64, 4), "99 KB: exactly 99 KB; FA2's sm8x tile at hd256; 222-228 regs")),
}


def _fwd_candidates(bucket: int, sparse_blocks):
    for (bm, bn, nw), _reason in _FWD_TABLE[bucket]:
        if sparse_blocks is not None and sparse_blocks[0] % bm:
            bm, nw = 64, 4  # 64-row tiles of 4 warps x 16 rows divide every block (>= 64)
        yield FwdConfig(bucket, bm, bn, nw)


def fwd_config(head_dim: int, dtype, causal: bool, device=80, sparse_blocks=None) -> FwdConfig | None:
    """The forward kernel configuration for a problem on a device (DeviceInfo or int compute capability),
    or None where none fits (the chunked path runs). Pure: same arguments, same answer.

    sparse_blocks: (block_q, block_k) of a block mask; tiles then divide its blocks (block_q = 64
    takes 64-row tiles of 4 warps x 16 rows)."""
    del dtype, causal  # one table serves both 16-bit dtypes and both masks
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(as_device(device), _fwd_candidates(bucket, sparse_blocks))


def all_fwd_specializations(devices=None):
    """Every (elem, causal, dropout, config) fwd_config returns for devices (default: every device of
    ARCH_DEVICES): CI compiles each one."""
    cfgs = _dedup(fwd_config(bucket, None, False, dev, sparse)
                  for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS for sparse in SPARSE_CLASSES)
    for elem in ("Fp16", "Bf16"):
        for cfg in cfgs:
            for causal in (False, True):
                for dropout in (False, True):
                    yield elem, causal, dropout, cfg


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

    def atomic_dq(self, deterministic: bool, dropout: bool) -> bool:
        """Whether the main kernel adds dQ by float32 atomics (else the separate dQ kernel runs):
        the config's default path unless deterministic=True. (Taking the dQ kernel for dropout at
        head_dim 128, where the atomic kernels spill, measured 0.92-0.95x on the H200:
        bench/results/h200-issue13-ab; dropout keeps the atomics.)"""
        del dropout
        return self.dq_atomic and not deterministic

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

    @property
    def max_smem_bytes(self) -> int:
        return max(self.smem_bytes, self.dq_smem_bytes)

    def traits(self, elem: str) -> str:
        return f"BwdTraits<{elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.d_split}>"

    def dq_traits(self, elem: str) -> str:
        return f"BwdDqTraits<{elem}, {self.head_dim}, {self.dq_block_m}, {self.dq_block_n}, {self.dq_block_m // 16}>"

    source = "flash_bwd.cu"

    def traits_checks(self):
        """As FwdConfig.traits_checks: the main kernel's BwdTraits and the dQ kernel's BwdDqTraits."""
        return [c for elem in ("Fp16", "Bf16") for c in ((self.source, self.traits(elem), self.smem_bytes, self.nthreads),
                                                          (self.source, self.dq_traits(elem), self.dq_smem_bytes,
                                                           self.dq_nthreads))]

    def kernel_name(self, elem: str, causal: bool, write_dq: bool, dropout: bool = False, feat: int = 0) -> str:
        return (f"flash_bwd_kernel<{self.traits(elem)}, {_cbool(causal)}, {_cbool(write_dq)}, {_cbool(dropout)}"
                f"{_feat(feat)}>")

    def dq_kernel_name(self, elem: str, causal: bool, dropout: bool = False, feat: int = 0) -> str:
        return f"flash_bwd_dq_kernel<{self.dq_traits(elem)}, {_cbool(causal)}, {_cbool(dropout)}{_feat(feat)}>"


# bucket -> candidates ((block_m, block_n, d_split, dq_block_m, dq_block_n, dq_atomic), reason).
# H200 measurements in bench/NOTES.md: 8 warps x 16 keys (block_n 128) beat 4 warps by 1.4x at hd128
# (each Q/dO tile read from shared memory serves twice the keys); at hd64 the separate dQ kernel beats
# float32 atomics (0.72x vs 0.68x SDPA flash) and is deterministic for free. The 99 KB entries keep
# the K, V tile and the double-buffered Q, dO tiles under 99 KB by shorter query steps or fewer keys
# per CTA (not yet timed on a 99 KB part).
_BWD_TABLE = {
    32: (((64, 128, 1, 128, 64, False), "as hd64"),),
    64: (((64, 128, 1, 128, 64, False), "dQ kernel beats atomics at hd64; 178 regs"),),
    96: (((64, 128, 1, 128, 64, True), "as hd128"),
         ((64, 64, 1, 64, 64, False), "99 KB: 88 KB; our block-sparse tile (4 warps, dQ kernel)")),
    128: (((64, 128, 1, 128, 64, True), "0.66x SDPA flash vs 0.46x for 64x64; 252 regs at sm_90a, no spill"),
          ((32, 64, 1, 64, 64, False), "99 KB: 73.5 KB (64x64: 112 KB); dQ kernel 68 KB")),
    160: (((64, 64, 2, 64, 32, True), "two CTAs per key block, 80 output columns each; 176 regs"),
          ((32, 64, 2, 64, 32, True), "99 KB: 32-query steps, 89.5 KB")),
    192: (((64, 64, 2, 64, 32, True), "96 output columns per CTA; 240 regs"),
          ((16, 64, 2, 64, 32, True), "99 KB: 16-query steps, 78 KB (32-query: 105.5 KB)")),
    224: (((32, 64, 2, 64, 32, True), "112 output columns per CTA; 32-query steps keep smem at 125 KB (sm_80: 163)"),
          ((32, 32, 2, 64, 32, True), "99 KB: 2 warps, 90 KB (4 warps need >= 121.5 KB: 112 columns split 2 ways only)")),
    256: (((32, 64, 2, 64, 32, True), "128 output columns per CTA, 32-query steps; 234 regs"),
          ((16, 32, 2, 64, 32, True), "99 KB: 2 warps, 68 KB (16x64: 102 KB); dQ kernel exactly 99 KB")),
}


def _bwd_candidates(bucket: int, sparse_blocks):
    for (bm, bn, split, dq_bm, dq_bn, atomic), _reason in _BWD_TABLE[bucket]:
        if sparse_blocks is not None:
            block_q, block_k = sparse_blocks
            if block_k < bn:  # 4-warp CTAs: at hd128 the atomic-dQ variant spills 4 B at sm_90a; the dQ kernel fits
                bn, atomic = block_k, False
            dq_bm = min(dq_bm, block_q)
        yield BwdConfig(bucket, bm, bn, split, dq_bm, dq_bn, atomic)


def bwd_config(head_dim: int, dtype, causal: bool, device=80, sparse_blocks=None) -> BwdConfig | None:
    """The backward kernels' configuration for a problem on a device, or None (chunked path). Pure.
    sparse_blocks as fwd_config: the key block of a CTA and the dQ kernel's query tile shrink to 64
    when the mask's blocks are 64."""
    del dtype, causal
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(as_device(device), _bwd_candidates(bucket, sparse_blocks))


def all_bwd_specializations(devices=None):
    """Every (elem, causal, dropout, config) bwd_config returns for devices: CI compiles each one."""
    cfgs = _dedup(bwd_config(bucket, None, False, dev, sparse)
                  for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS for sparse in SPARSE_CLASSES)
    for elem in ("Fp16", "Bf16"):
        for cfg in cfgs:
            for causal in (False, True):
                for dropout in (False, True):
                    yield elem, causal, dropout, cfg


# ---------------------------------------------------------------------------------------------------
# float32 on CUDA cores (exact FFMA: cuda/flash_simt_fwd.cu, cuda/flash_simt_bwd.cu; issue 9), and the
# float64 backward at head_dim > 160 (DFMA), where the FP64 tensor-core backward has no configuration.
# Every other float64 problem runs on the FP64 tensor cores (below); nothing runs before sm_80.

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

    elem: str  # "float" ("double" compiles, but float64 runs on the FP64 tensor cores)
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

    @property
    def max_smem_bytes(self) -> int:
        return self.smem_bytes

    source = "flash_simt_fwd.cu"

    def traits(self) -> str:
        return (f"SimtFwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}, "
                f"{self.min_ctas}>")

    def traits_checks(self):
        """As FwdConfig.traits_checks."""
        return [(self.source, self.traits(), self.smem_bytes, self.nthreads)]

    def kernel_name(self, feat: int = 0) -> str:
        """causal is a run-time argument of the kernel (one specialization serves both masks)."""
        return f"flash_simt_fwd_kernel<{self.traits()}{_feat(feat)}>"


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

    @property
    def max_smem_bytes(self) -> int:
        return self.smem_bytes

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

    def traits(self) -> str:
        return f"SimtBwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}>"

    def traits_checks(self):
        """As FwdConfig.traits_checks: one SimtBwdTraits serves the KV and the dQ kernel."""
        return [(self.source, self.traits(), self.kv_smem_bytes, self.kv_nthreads),
                (self.source, self.traits(), self.dq_smem_bytes, self.dq_nthreads)]

    # causal and dq_atomic are run-time arguments of the kernels.
    def kv_kernel_name(self, feat: int = 0) -> str:
        return f"flash_simt_bwd_kv_kernel<{self.traits()}{_feat(feat)}>"

    def dq_kernel_name(self, feat: int = 0) -> str:
        return f"flash_simt_bwd_q_kernel<{self.traits()}{_feat(feat)}>"

    def preprocess_kernel_name(self) -> str:
        return f"flash_simt_bwd_preprocess_kernel<{self.elem}>"


SIMT_PREPROCESS_THREADS = 128  # flash_simt_bwd_preprocess_kernel: one warp per query row

# float32: bucket -> candidates ((block_m, block_n, nwarps), reason). Registers: sm_90a ptxas, no spills
# (tests/test_compile_simt.py prints the report).
_SIMT_FWD_TABLE = {
    32: (((64, 64, 4), "4 rows x 8 keys per thread; 168 regs, 3 CTAs/SM"),),
    64: (((64, 64, 4), "S 4x8 and O 4x8 per thread; 168 regs, 3 CTAs/SM (70 KB smem each)"),),
    96: (((64, 32, 4), "64-key steps spill 8 B; 168 regs"),),
    128: (((64, 32, 4), "H200: 34.1 TFLOP/s vs 26.7 for 32x64/4 (4 rows per thread; 238 regs at sm_90a, no spill)"),),
    160: (((32, 64, 4), "2 rows per thread (O 2x20); 150 regs"),
          ((32, 32, 4), "99 KB: 32-key steps (as hd192): 66.5 KB")),
    192: (((32, 32, 4), "O 2x24 per thread; 146 regs; 80 KB smem (64-key steps: 125 KB)"),),
    224: (((32, 32, 4), "O 2x28 per thread; 138 regs; 92 KB smem"),),
    256: (((32, 32, 4), "O 2x32 per thread; 162 regs; 105 KB smem (64-key steps: 175 KB)"),
          ((32, 16, 4), "99 KB: 16-key steps, O 2x32 per thread: 68 KB")),
}

# (elem, bucket) -> candidates ((kernel head_dim, block_m, block_n, nwarps), reason). float32 head dims
# 96, 160 and 224 run the next even bucket: their 24 / 40 / 56 column chunks do not split over 128
# threads in layout B (dK, dV) with BLOCK_N = 32. float64 only above 160 (below: the DMMA backward).
_SIMT_BWD_TABLE = {
    ("float", 32): (((32, 64, 64, 4), "KV kernel 168 regs, dQ kernel 168"),),
    ("float", 64): (((64, 64, 64, 4), "H200: 33.5 vs 29.6 TFLOP/s for 32x64/4 (254 regs, no spill; 107 KB smem)"),
                    ((64, 64, 32, 4), "99 KB: H200 sweep 30.5 TFLOP/s, the fastest under 99 KB (71.5 KB)")),
    ("float", 96): (((128, 32, 32, 4), "runs the hd128 kernel (layout B)"),),
    ("float", 128): (((128, 32, 32, 4), "KV 168 regs, dQ 128"),),
    ("float", 160): (((192, 16, 32, 4), "runs the hd192 kernel (layout B)"),),
    ("float", 192): (((192, 16, 32, 4), "KV 168 regs, dQ 80; 32-row steps spill in the dQ kernel"),),
    ("float", 224): (((256, 32, 32, 8), "runs the hd256 kernel (layout B)"),
                     ((256, 8, 32, 4), "99 KB: as hd256")),
    ("float", 256): (((256, 32, 32, 8), "8 warps: dK + dV 2 x 32 per thread; KV 177 regs, dQ 109"),
                     ((256, 8, 32, 4), "99 KB: 8-query steps, 84 KB (K, V alone take 65 KB; 16-query steps 102.5 KB)")),
    ("double", 192): (((192, 16, 16, 4), "KV 220 regs, dQ 126"),
                      ((192, 8, 16, 4), "99 KB: 8-query steps, 75.5 KB")),
    ("double", 224): (((224, 16, 16, 4), "KV 242 regs, dQ 126"),
                      ((224, 8, 16, 4), "99 KB: 8-query steps, 87.5 KB")),
    ("double", 256): (((256, 16, 16, 8), "8 warps (4 warps spill; 32-row steps need 209 KB smem); KV 164 regs, dQ 78"),),
}


def simt_fwd_config(head_dim: int, dtype, causal: bool, device=80) -> SimtFwdConfig | None:
    """The exact float32 (FFMA) forward configuration for a problem on a device, or None. Pure.
    float64 has no SIMT forward: it runs on the FP64 tensor cores (dmma_fwd_config)."""
    del causal  # one table serves both masks
    elem = simt_elem(dtype)
    bucket = head_dim_bucket(head_dim)
    if elem != "float":
        raise TypeError("dtype: no SIMT float64 forward; float64 runs on the FP64 tensor cores (dmma_fwd_config)")
    return _first_fitting(as_device(device),
                          (SimtFwdConfig(elem, bucket, bm, bn, nw) for (bm, bn, nw), _ in _SIMT_FWD_TABLE[bucket]))


def simt_bwd_config(head_dim: int, dtype, causal: bool, device=80) -> SimtBwdConfig | None:
    """The CUDA-core backward configuration (float32; float64 at head_dim > 160), or None. Pure."""
    del causal
    elem = simt_elem(dtype)
    bucket = head_dim_bucket(head_dim)
    if (elem, bucket) not in _SIMT_BWD_TABLE:
        raise ValueError(f"head_dim: no SIMT {elem} backward for bucket {bucket}; "
                         "float64 at head_dim <= 160 runs on the FP64 tensor cores (dmma_bwd_config)")
    return _first_fitting(as_device(device), (SimtBwdConfig(elem, hd, bm, bn, nw)
                                              for (hd, bm, bn, nw), _ in _SIMT_BWD_TABLE[elem, bucket]))


def all_simt_fwd_specializations(devices=None):
    """Every distinct config of the SIMT forward for devices (causal is a run-time argument): CI compiles each."""
    return _dedup(simt_fwd_config(bucket, np.float32, False, dev)
                  for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS)


def all_simt_bwd_specializations(devices=None):
    """Every distinct config of the SIMT backward for devices: CI compiles its KV and dQ kernels (and the
    preprocess kernel of its element type)."""
    return _dedup(simt_bwd_config(bucket, np.dtype(elem_dt), False, dev)
                  for dev in reference_devices(devices)
                  for (elem, bucket) in _SIMT_BWD_TABLE
                  for elem_dt in [np.float32 if elem == "float" else np.float64])


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

    @property
    def max_smem_bytes(self) -> int:
        return self.smem_bytes

    def traits(self) -> str:
        return (f"DmmaFwdTraits<{self.elem}, {self.head_dim}, {self.block_m}, {self.block_n}, {self.nwarps}, "
                f"{self.katom}>")

    def traits_checks(self):
        """As FwdConfig.traits_checks."""
        return [(self.source, self.traits(), self.smem_bytes, self.nthreads)]

    def kernel_name(self, feat: int = 0) -> str:
        return f"flash_dmma_fwd_kernel<{self.traits()}{_feat(feat)}>"


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

    @property
    def max_smem_bytes(self) -> int:
        return max(self.kv_smem_bytes, self.dq_smem_bytes)

    def kv_grid_x(self, seqlen_k: int) -> int:
        return -(-seqlen_k // self.kv_block_n) * self.d_split

    def dq_grid_x(self, seqlen_q: int) -> int:
        return -(-seqlen_q // self.dq_block_m)

    def kv_traits(self) -> str:
        return (f"DmmaBwdKvTraits<{self.elem}, {self.head_dim}, {self.kv_block_m}, {self.kv_block_n}, "
                f"{self.kv_nwarps}, {self.d_split}, {self.kv_katom}, {self.kv_stages}>")

    def dq_traits(self) -> str:
        return (f"DmmaBwdDqTraits<{self.elem}, {self.head_dim}, {self.dq_block_m}, {self.dq_block_n}, "
                f"{self.dq_nwarps}, {self.dq_katom}>")

    def traits_checks(self):
        """As FwdConfig.traits_checks: the KV kernel's DmmaBwdKvTraits and the dQ kernel's DmmaBwdDqTraits."""
        return [(self.source, self.kv_traits(), self.kv_smem_bytes, self.kv_nthreads),
                (self.source, self.dq_traits(), self.dq_smem_bytes, self.dq_nthreads)]

    def kv_kernel_name(self, feat: int = 0) -> str:
        return f"flash_dmma_bwd_kv_kernel<{self.kv_traits()}{_feat(feat)}>"

    def dq_kernel_name(self, feat: int = 0) -> str:
        return f"flash_dmma_bwd_dq_kernel<{self.dq_traits()}{_feat(feat)}>"

    def preprocess_kernel_name(self) -> str:
        return f"flash_simt_bwd_preprocess_kernel<{self.elem}>"  # in flash_simt_bwd.cu


# bucket -> candidates ((block_m, block_n, nwarps), reason). Warps of 16 rows run katom 16 on sm_90
# (one m16n8k16 per 8 m8n8k4: a quarter of the instructions for the same fragments) and m8n8k4 on
# sm_80; warps of 8 rows run m8n8k4 everywhere. First choices from ptxas (sm_90a registers, no spill
# anywhere) and shared memory (<= 163 KB, sm_80's limit), not yet from measurements: bench/bench_simt.py --sweep.
_DMMA_FWD_TABLE = {
    32: (((64, 64, 4), "16 rows per warp; S 16x64 + O 16x32 in registers, 214 regs"),),
    64: (((64, 32, 4), "16 rows per warp; 209 regs (64-key steps: 252), 2 CTAs/SM"),),
    96: (((64, 16, 4), "16 rows per warp, 16-key steps (O 16x96 in registers)"),),
    128: (((64, 16, 4), "16 rows per warp, 16-key steps: 248 regs (32-key steps spill)"),),
    160: (((32, 32, 4), "8 rows per warp: O 8x160 = 40 doubles per lane"),
          ((32, 16, 4), "99 KB: 16-key steps, 80 KB")),
    192: (((32, 32, 4), "8 rows per warp; 214 regs"),
          ((32, 16, 4), "99 KB: 16-key steps, 96 KB")),
    224: (((32, 16, 4), "8 rows per warp; 16-key steps keep smem at 112 KB"),
          ((16, 16, 2), "99 KB: 2 warps of 8 rows, 84 KB")),
    256: (((32, 16, 4), "8 rows per warp; O 8x256 = 64 doubles per lane, 228 regs; 128 KB smem"),
          ((16, 16, 2), "99 KB: 2 warps of 8 rows, 96 KB")),
}

# bucket -> candidates ((kv_block_m, kv_block_n, kv_nwarps, d_split, dq_block_m, dq_block_n, dq_nwarps,
# kv_stages), reason). Buckets 192..256 are absent: the KV kernel's K, V and double-buffered Q, dO
# tiles exceed sm_80's 163 KB there, so float_bwd_config runs the DFMA (SIMT) backward for them.
_DMMA_BWD_TABLE = {
    32: (((16, 64, 4, 1, 64, 32, 4, 2), "as hd64"),),
    64: (((16, 64, 4, 1, 64, 32, 4, 2), "KV: 16 keys per warp (dK, dV 16x64 each in registers, 255 regs); dQ: 16 rows"),),
    96: (((16, 32, 4, 1, 64, 16, 4, 2), "KV: 8 keys per warp (dK, dV 8x96); dQ: 16 rows, 16-key steps"),
         ((16, 32, 4, 1, 32, 16, 4, 2), "99 KB: dQ warps of 8 rows, 72 KB (KV 96 KB)")),
    128: (((16, 32, 4, 1, 32, 16, 4, 1), "H200: single-buffered Q/dO (96 KB, 2 CTAs/SM) + 8-row dQ warps: 16.5 vs 14.0 TFLOP/s"),),
    160: (((16, 32, 4, 2, 32, 16, 4, 2), "KV: dK, dV columns split over 2 CTAs (160 KB smem); dQ: 8 rows per warp"),
          ((16, 16, 2, 2, 16, 16, 2, 1), "99 KB: 2-warp KV (single-buffered) and dQ CTAs, 80 KB each")),
}


def dmma_katom(rows_per_warp: int, device) -> int:
    """The DMMA instruction of a kernel whose warps own rows_per_warp rows: m16n8k16 (16) on sm_90+
    with 16-row warps, else m8n8k4 (4). device: DeviceInfo or int compute capability."""
    return 16 if as_device(device).cc >= 90 and rows_per_warp == 16 else 4


def dmma_fwd_config(head_dim: int, causal: bool, device=90) -> DmmaFwdConfig | None:
    """The float64 tensor-core forward configuration, or None. Pure."""
    del causal  # one table serves both masks
    device = as_device(device)
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(device, (DmmaFwdConfig(bucket, bm, bn, nw, dmma_katom(bm // nw, device))
                                   for (bm, bn, nw), _ in _DMMA_FWD_TABLE[bucket]))


def dmma_bwd_config(head_dim: int, causal: bool, device=90) -> DmmaBwdConfig | None:
    """The float64 tensor-core backward configuration (KV kernel and dQ kernel), or None (also for
    buckets above 160, which have no DMMA backward). Pure."""
    del causal
    device = as_device(device)
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(device, (
        DmmaBwdConfig(bucket, kbm, kbn, knw, split, qbm, qbn, qnw, dmma_katom(kbn // knw, device),
                      dmma_katom(qbm // qnw, device), kv_stages=stages)
        for (kbm, kbn, knw, split, qbm, qbn, qnw, stages), _ in _DMMA_BWD_TABLE.get(bucket, ())))


# TF32 (float32 with allow_tf32): bucket -> candidates ((block_m, block_n, nwarps), reason). 16 rows per
# warp (the m16n8k8 .tf32 shape); O holds head_dim / 2 floats per lane, S block_n / 2. hd64 and hd128
# from the H200 sweep (bench/NOTES.md); the others first choices from ptxas and shared memory.
_TF32_FWD_TABLE = {
    32: (((64, 64, 4), "16 rows per warp, 64-key steps: 24 KB smem"),),
    64: (((64, 128, 4), "H200: 85.2 vs 82.5 TFLOP/s for 64x64/4 (128-key steps: 80 KB smem, 178-180 regs)"),),
    96: (((64, 64, 4), "as hd64: 72 KB"),),
    128: (((128, 64, 8), "H200: 86.5 vs 83.6 TFLOP/s for 64x64/4 (128 KB smem, 174-186 regs)"),
          ((64, 64, 4), "99 KB: H200 sweep 83.6 TFLOP/s (0.97x of 128x64/8), 96 KB")),
    160: (((64, 32, 4), "32-key steps: 80 KB"),),
    192: (((64, 32, 4), "32-key steps: 96 KB"),),
    224: (((64, 32, 4), "32-key steps: 112 KB"),
          ((64, 16, 4), "99 KB: 16-key steps, 84 KB")),
    256: (((64, 32, 4), "32-key steps: 128 KB; O 128 floats per lane"),
          ((64, 16, 4), "99 KB: 16-key steps, 96 KB")),
}

# TF32 backward: bucket -> candidates ((kernel bucket, kv_block_m, kv_block_n, kv_nwarps, d_split,
# dq_block_m, dq_block_n, dq_nwarps, kv_stages), reason). 16 keys (KV) / 16 rows (dQ) per warp. A CTA's
# dK + dV hold head_dim / d_split floats per lane; d_split must leave whole 32-column groups, so
# buckets 160 and 224 run the 192 / 256 kernels (their extra columns are zero-filled, never stored).
_TF32_BWD_TABLE = {
    32: (((32, 32, 64, 4, 1, 64, 64, 4, 2), "KV 32 KB, dQ 32 KB"),),
    64: (((64, 64, 64, 4, 1, 64, 64, 4, 2), "H200: 61.2 vs 57.2 TFLOP/s for KV 32-row steps (KV 96 KB, 230-238 regs)"),),
    96: (((96, 32, 64, 4, 1, 64, 32, 4, 2), "KV 96 KB, dQ 72 KB"),),
    128: (((128, 32, 64, 4, 1, 64, 32, 4, 1), "single-buffered Q/dO: KV 96 KB and dQ 96 KB, 2 CTAs per SM"),),
    160: (((192, 32, 64, 4, 2, 64, 32, 4, 1), "the 192 kernel"),
          ((192, 32, 32, 2, 2, 32, 32, 2, 1), "99 KB: the 192 kernel's 99 KB config")),
    192: (((192, 32, 64, 4, 2, 64, 32, 4, 1), "dK, dV columns split over 2 CTAs: KV 144 KB; dQ 144 KB"),
          ((192, 32, 32, 2, 2, 32, 32, 2, 1), "99 KB: 2-warp KV and dQ CTAs, 96 KB each")),
    224: (((256, 32, 32, 2, 2, 32, 32, 2, 1), "the 256 kernel"),
          ((256, 16, 32, 2, 2, 32, 16, 2, 1), "99 KB: the 256 kernel's 99 KB config")),
    256: (((256, 32, 32, 2, 2, 32, 32, 2, 1), "2-warp CTAs under sm_80's 163 KB: KV 128 KB, dQ 128 KB; d_split 2"),
          ((256, 16, 32, 2, 2, 32, 16, 2, 1), "99 KB: 16-query KV steps, 16-key dQ steps: 96 KB each")),
}


def tf32_fwd_config(head_dim: int, causal: bool, device=90) -> DmmaFwdConfig | None:
    """The float32 TF32 tensor-core forward configuration (allow_tf32), or None. Pure."""
    del causal  # one table serves both masks; m16n8k8 .tf32 exists from sm_80
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(as_device(device), (DmmaFwdConfig(bucket, bm, bn, nw, TF32_KATOM, elem="float")
                                              for (bm, bn, nw), _ in _TF32_FWD_TABLE[bucket]))


def tf32_bwd_config(head_dim: int, causal: bool, device=90) -> DmmaBwdConfig | None:
    """The float32 TF32 tensor-core backward configuration (allow_tf32; KV and dQ kernels), or None. Pure."""
    del causal
    bucket = head_dim_bucket(head_dim)
    return _first_fitting(as_device(device), (
        DmmaBwdConfig(kb, kbm, kbn, knw, split, qbm, qbn, qnw, TF32_KATOM, TF32_KATOM, kv_stages=stages, elem="float")
        for (kb, kbm, kbn, knw, split, qbm, qbn, qnw, stages), _ in _TF32_BWD_TABLE[bucket]))


def float_fwd_config(head_dim: int, dtype, causal: bool, device=80, allow_tf32: bool = False):
    """float32 / float64 forward on a device: the kernel family's configuration, or None (nothing
    fused fits, or the GPU predates sm_80: the chunked path runs). Pure.
    float64 runs on the FP64 tensor cores (DMMA: 2x the DFMA peak on A100 / H100 / H200); float32
    with allow_tf32 on the TF32 tensor cores; other float32 on CUDA cores (SIMT, exact FFMA). TF32
    falls back to the exact kernel where no TF32 configuration fits."""
    device = as_device(device)
    elem = simt_elem(dtype)
    if elem == "double":
        return dmma_fwd_config(head_dim, causal, device)
    if allow_tf32:
        cfg = tf32_fwd_config(head_dim, causal, device)
        if cfg is not None:
            return cfg
    return simt_fwd_config(head_dim, dtype, causal, device)


def float_bwd_config(head_dim: int, dtype, causal: bool, device=80, allow_tf32: bool = False):
    """float32 / float64 backward: the kernel family's configuration, or None. Pure (as
    float_fwd_config; float64 runs the DFMA kernels where the DMMA backward has no configuration:
    head dims above 160)."""
    device = as_device(device)
    elem = simt_elem(dtype)
    if elem == "double":
        cfg = dmma_bwd_config(head_dim, causal, device)
        if cfg is not None or (elem, head_dim_bucket(head_dim)) not in _SIMT_BWD_TABLE:
            return cfg
        return simt_bwd_config(head_dim, dtype, causal, device)
    if allow_tf32:
        cfg = tf32_bwd_config(head_dim, causal, device)
        if cfg is not None:
            return cfg
    return simt_bwd_config(head_dim, dtype, causal, device)


def all_dmma_fwd_specializations(devices=None):
    """Every distinct DMMA forward config for devices (default: ARCH_DEVICES): CI compiles each."""
    return _dedup(dmma_fwd_config(bucket, False, dev) for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS)


def all_dmma_bwd_specializations(devices=None):
    """Every distinct DMMA backward config for devices: CI compiles its KV and dQ kernels."""
    return _dedup(dmma_bwd_config(bucket, False, dev) for dev in reference_devices(devices) for bucket in _DMMA_BWD_TABLE)


def all_tf32_fwd_specializations(devices=None):
    """Every distinct TF32 forward config for devices: CI compiles each."""
    return _dedup(tf32_fwd_config(bucket, False, dev) for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS)


def all_tf32_bwd_specializations(devices=None):
    """Every distinct TF32 backward config for devices: CI compiles its KV and dQ kernels and its preprocess kernel."""
    return _dedup(tf32_bwd_config(bucket, False, dev) for dev in reference_devices(devices) for bucket in HEAD_DIM_BUCKETS)


def float_specializations(devices=None):
    """Every distinct config float_fwd_config / float_bwd_config return for devices (all dtypes, both
    allow_tf32 settings), forward and backward: what tests check fits each device."""
    out = []
    for dev in reference_devices(devices):
        for bucket in HEAD_DIM_BUCKETS:
            for dtype in (np.float32, np.float64):
                for tf32 in (False, True):
                    out += [float_fwd_config(bucket, dtype, False, dev, tf32), float_bwd_config(bucket, dtype, False, dev, tf32)]
    return _dedup(out)


# The candidates bench/bench_simt.py --sweep times; tests/helpers.py sweep_candidates() compiles and checks them.
# float32 SIMT forward: head_dim -> [(block_m, block_n, nwarps, min_ctas)], SimtFwdConfig("float", head_dim, *c)
SIMT_FWD_SWEEP = {
    64: [(64, 64, 4, 1), (64, 32, 4, 1), (128, 64, 8, 1), (32, 64, 4, 1), (32, 32, 4, 1), (128, 64, 4, 1)],
    # hd128: CTAs/SM (smem, regs) x rows per thread TM; LDS.128 per 128 FFMA (S, PV) in NOTES.md
    128: [(32, 64, 4, 1),   # default: 2 CTAs (94 KB smem), TM 2
          (64, 16, 4, 3),   # 3 CTAs (57 KB, 163 regs), TM 4
          (32, 32, 4, 4),   # 4 CTAs (56 KB, 124-128 regs), TM 2
          (64, 32, 8, 2),   # 2 CTAs x 8 warps (78 KB, 124-128 regs), TM 2
          (64, 32, 4, 1),   # 2 CTAs (78 KB, 192-238 regs), TM 4
          (32, 16, 4, 4)],  # 4 CTAs (37 KB, 114 regs), TM 2, 16-key steps
}
# float64 DMMA backward: head_dim -> [DmmaBwdConfig's fields after head_dim], DmmaBwdConfig(head_dim, *c)
DMMA_BWD_SWEEP = {
    64: [(16, 64, 4, 1, 64, 32, 4, 16, 16), (16, 64, 4, 1, 64, 32, 4, 8, 8), (16, 64, 4, 1, 64, 32, 4, 4, 4),
         (16, 32, 4, 1, 64, 32, 4, 4, 16), (32, 32, 4, 1, 64, 16, 4, 4, 16), (16, 64, 4, 1, 32, 32, 4, 16, 4)],
    # hd128, (..., kv_stages): KV and dQ kernels at 1 CTA x 4 warps per SM by default (128 / 160 KB smem);
    # single-buffered Q/dO (stages 1) and 32-row dQ tiles give 2 CTAs per SM (bench/NOTES.md).
    128: [(16, 32, 4, 1, 64, 16, 4, 4, 16, 2),   # default: KV 1x4 warps, dQ 1x4 warps
          (16, 32, 4, 1, 64, 16, 4, 4, 16, 1),   # KV 2x4 warps
          (16, 32, 4, 1, 32, 16, 4, 4, 4, 2),    # dQ 2x4 warps (m8n8k4)
          (16, 32, 4, 1, 32, 16, 4, 4, 4, 1),    # both 2x4 warps
          (16, 64, 8, 1, 64, 16, 8, 4, 4, 1),    # both 1x8 warps (m8n8k4)
          (16, 32, 4, 1, 64, 16, 8, 4, 4, 1),    # KV 2x4, dQ 1x8
          (16, 32, 2, 2, 32, 16, 2, 16, 16, 1),  # both 2x2 warps of 16 rows (m16n8k16), KV d_split 2
          (16, 64, 4, 2, 64, 16, 4, 16, 16, 2)], # KV 16-key warps, d_split 2 (192 KB: sm_90 only)
}
