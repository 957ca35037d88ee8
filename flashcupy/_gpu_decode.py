"""Launch code of the split-KV decode kernels (cuda/flash_decode.cu) behind flash_attn_with_kvcache.

`supported(...)` says whether a call can take them (CuPy arrays, head_dim a power of two in 32..256,
16-byte aligned rows with a contiguous last dimension: the kernels read the cache in place, never
copy it); `decode_config(...)` picks the rows per CTA and the loads in flight from the registers a
thread needs; `forward(...)` launches the decode kernel over (num_splits, nheads_k x row chunks,
batch) CTAs and, with more than one split, the combine kernel. Launches go to CuPy's current stream
and nothing here synchronises with the host.

Source: flash-decoding (Dao, Haziza, Massa, Sizov 2023: split the keys across CTAs, merge the partial
(out, lse) exactly); flash-attn's flash_attn_with_kvcache (paged KV through block_table, GQA heads
packed into one CTA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _gpu_simt
from ._arrays import dtype_name, lse_dtype
from ._build import debug
from ._gpu import rows_aligned, zero_scale_inputs
from ._params import attn_params

SOURCE = "flash_decode.cu"
HEAD_DIMS = (32, 64, 128, 256)  # a power-of-two number of 16-byte chunks per row (DecodeTraits)
NWARPS = 4
MAX_SPLITS = 256
ELEM = {"float16": "Fp16", "bfloat16": "Bf16", "float32": "float", "float64": "double"}
VEC = {"Fp16": 8, "Bf16": 8, "float": 4, "double": 2}  # elements per 16-byte chunk (DecodeElem)


@dataclass(frozen=True)
class DecodeConfig:
    """One DecodeTraits<elem, head_dim, rows, u> specialization (cuda/flash_decode.cu)."""

    elem: str      # Fp16, Bf16, float, double
    head_dim: int
    rows: int      # query rows per CTA (GQA heads x new tokens, or a chunk of them)
    u: int         # passes per iteration: U x CPL x 2 16-byte loads in flight per lane

    @property
    def compute_bytes(self) -> int:
        return 8 if self.elem == "double" else 4

    @property
    def keys_per_iteration(self) -> int:  # DecodeTraits::KT
        return self.u * NWARPS * (32 // _lanes_per_key(self.elem, self.head_dim))

    @property
    def smem_bytes(self) -> int:
        return NWARPS * self.rows * (self.head_dim + 2) * self.compute_bytes

    def kernel_name(self, feat: int, paged: bool) -> str:
        return (f"flash_decode_kernel<DecodeTraits<{self.elem}, {self.head_dim}, {self.rows}, {self.u}>, {feat}, "
                f"{'true' if paged else 'false'}>")

    def combine_name(self, feat: int) -> str:
        return f"flash_decode_combine_kernel<{self.elem}, {self.head_dim}, {feat}>"


def _lanes_per_key(elem: str, head_dim: int) -> int:  # DecodeTraits::LPK: one lane a chunk, at most 32
    return min(head_dim // VEC[elem], 32)


def decode_config(dtype, head_dim: int, rows_needed: int) -> DecodeConfig:
    """The specialization for rows_needed = group x seqlen_q query rows per KV head. A lane holds
    CPL x VEC elements of a key row (w registers of compute type: 8 for fp16 / bf16, 4-8 for float32,
    4-16 for float64); its q and O take 2 x rows x w registers and the raw K, V chunks of two iterations
    16 x u x CPL, so rows and u shrink as w and CPL grow (tests/test_compile_decode.py checks that none
    spills; float64 at 16 rows did, 1.4 KB, and float32 hd256 at u 8, 620 B)."""
    elem = ELEM[dtype_name(np.dtype(dtype))]
    cpl = head_dim // VEC[elem] // _lanes_per_key(elem, head_dim)  # DecodeTraits::CPL
    per_lane = cpl * VEC[elem] * (2 if elem == "double" else 1)  # registers per row
    rows_max = 8 if elem != "double" else 4 if per_lane <= 4 else 2  # float64: two registers a value
    rows = 1
    while rows < min(rows_needed, rows_max):
        rows *= 2
    # loads in flight: U x CPL chunks of K and of V, twice (this iteration's and the next's), 4 registers each
    u = max(1, (8 if rows == 1 else 4 if rows <= 4 else 2) // cpl)
    return DecodeConfig(elem, head_dim, rows, u)


def _sm_count() -> int:  # a seam, as flashcupy._gpu_simt's _xp and _launch (which this module launches through)
    import cupy

    return int(cupy.cuda.Device().attributes["MultiProcessorCount"])


def supported(q, k_cache, v_cache) -> bool:
    """Whether the decode kernels take this call: CuPy arrays, head_dim in HEAD_DIMS, every row
    16-byte aligned with a contiguous last dimension (else the chunked path runs it)."""
    import cupy

    if not all(isinstance(x, cupy.ndarray) for x in (q, k_cache, v_cache)):
        return False
    return int(q.shape[3]) in HEAD_DIMS and all(rows_aligned(x) for x in (q, k_cache, v_cache))


def auto_splits(ctas: int, max_keys: int, keys_per_iteration: int, sms: int) -> int:
    """flash-attn's num_splits = 0: enough CTAs for about four per SM (the decode kernel holds three
    to four at 164-208 registers), never more splits than two iterations of keys each allow."""
    if max_keys <= 0:
        return 1
    want = -(-4 * sms // max(ctas, 1))
    most = max(1, -(-max_keys // (2 * keys_per_iteration)))
    return int(max(1, min(want, most, MAX_SPLITS)))


def forward(q, k_cache, v_cache, visible, max_visible: int, shape, *, causal: bool, features, num_splits: int,
            block_table=None, page_size: int = 0):
    """Split-KV attention of q (batch, seqlen_q, nheads, head_dim) over each row's first visible[b]
    cached keys. visible: int32 (batch,) on the device; max_visible its largest value (host int, picks
    num_splits when 0). shape: the call's AttnShape (seqlen_k unused). features: flashcupy._features
    .Features. block_table: int32 (batch, max_blocks) for a paged cache of page_size slots per page.
    Returns (out like q, lse (batch, nheads, seqlen_q) float32 / float64)."""
    xp = _gpu_simt._xp()
    b, sq, h, d = (int(s) for s in q.shape)
    hk = int(k_cache.shape[2])
    group = h // hk
    q, scale = zero_scale_inputs(xp, q, shape.softmax_scale)
    cfg = decode_config(q.dtype, d, group * sq)
    row_chunks = -(-group * sq // cfg.rows)
    ctas = b * hk * row_chunks
    if num_splits <= 0:
        num_splits = auto_splits(ctas, max_visible, cfg.keys_per_iteration, _sm_count())
    num_splits = int(min(num_splits, MAX_SPLITS))
    feat = 0 if features is None else features.bits
    paged = block_table is not None
    out = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((b, h, sq), dtype=lse_dtype(q.dtype))
    if b == 0 or sq == 0:  # no CTA to launch
        return out, lse
    cdt = np.float64 if cfg.elem == "double" else np.float32
    arrays = dict(q=q, k=k_cache, v=v_cache, out=out, lse=lse, seqused_k=visible)
    if num_splits > 1:
        arrays.update(o_accum=xp.empty((num_splits, b, h, sq, d), dtype=cdt),
                      lse_accum=xp.empty((num_splits, b, h, sq), dtype=cdt))
    if paged:
        arrays["block_table"] = block_table
    p = attn_params(shape, head_dim=d, scale=scale, grad_scale=shape.softmax_scale, causal=causal,
                    features=features, num_splits=num_splits, page_size=page_size, **arrays)
    debug(f"decode {tuple(q.shape)} cache {tuple(k_cache.shape)} paged={paged} -> {cfg}, {num_splits} splits")
    launch = _gpu_simt._launch
    launch(SOURCE, cfg.kernel_name(feat, paged), cfg.smem_bytes, (num_splits, hk * row_chunks, b), (32 * NWARPS, 1, 1), p)
    if num_splits > 1:
        rows = b * h * sq
        launch(SOURCE, cfg.combine_name(feat), 0, (-(-rows // 4), 1, 1), (128, 1, 1), p)
    return out, lse
