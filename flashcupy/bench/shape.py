"""The FLOP formula, the benchmark shape, block masks, and what a run measures (Case, Plan)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .common import BLOCK, HIDDEN, MODE_FACTOR, MODES, TOKENS


# ---------------------------------------------------------------------------------------------------
# the FLOP formula, the benchmark shape, block masks


def attention_flops(batch, nheads, seqlen_q, seqlen_k, head_dim, *, causal, mode, density=1.0) -> float:
    """FLOPs of one attention call by the FlashAttention benchmark's formula (DESIGN.md).

    fwd = 4 * batch * nheads * seqlen_q * seqlen_k * head_dim (two GEMMs, QK^T and PV), halved for
    causal when seqlen_q == seqlen_k; bwd = 2.5 x fwd (five GEMMs); fwd+bwd = 3.5 x fwd. density
    (the fraction of the blocks a block-sparse mask keeps) multiplies the count.
    """
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    f = 4.0 * batch * nheads * seqlen_q * seqlen_k * head_dim
    if causal and seqlen_q == seqlen_k:
        f /= 2
    return f * MODE_FACTOR[mode] * float(density)


def fa_shape(seqlen: int, head_dim: int, *, hidden: int = HIDDEN, tokens: int = TOKENS) -> tuple:
    """(batch, nheads) of the FlashAttention benchmark: batch * seqlen = tokens, nheads * head_dim = hidden."""
    return max(1, tokens // seqlen), max(1, hidden // head_dim)


def block_mask(seqlen_q: int, seqlen_k: int, density: float, *, causal: bool = False, block: int = BLOCK,
               seed: int = 0):
    """Block-sparse mask, bool (ceil(seqlen_q / block), ceil(seqlen_k / block)): True = compute the tile.

    Tiles on the (bottom-right aligned) diagonal are always kept, so no query row is left without a
    key; the others are drawn at random (seeded) until the kept fraction of the eligible tiles (all of
    them, or those on or below the diagonal when causal) is the closest to density. Returns None for
    density >= 1 (dense).
    """
    if density >= 1:
        return None
    if not 0 < density:
        raise ValueError(f"density: expected 0 < density <= 1, got {density}")
    nq, nk = -(-seqlen_q // block), -(-seqlen_k // block)
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    diag_col = np.clip(qi + (nk - nq), 0, nk - 1)
    eligible = (kj <= diag_col) if causal else np.ones((nq, nk), dtype=bool)
    mask = np.broadcast_to(kj == diag_col, (nq, nk)).copy()
    want = max(int(mask.sum()), int(round(density * int(eligible.sum()))))
    free = np.flatnonzero((eligible & ~mask).ravel())
    take = np.random.default_rng(seed).permutation(free)[: max(0, want - int(mask.sum()))]
    mask.ravel()[take] = True
    return mask


def kept_fraction(mask, *, causal: bool) -> float:
    """The fraction of the eligible tiles a block mask keeps (1.0 for None)."""
    if mask is None:
        return 1.0
    nq, nk = mask.shape
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    eligible = (kj <= np.clip(qi + (nk - nq), 0, nk - 1)) if causal else np.ones(mask.shape, dtype=bool)
    return float(mask[eligible].sum() / eligible.sum())


def element_mask(mask, seqlen_q: int, seqlen_k: int, *, causal: bool, block: int = BLOCK):
    """The element mask, bool (seqlen_q, seqlen_k), of a block mask (None = dense) and causal; None when
    every element is visible."""
    vis = None
    if mask is not None:
        vis = np.repeat(np.repeat(mask, block, axis=0), block, axis=1)[:seqlen_q, :seqlen_k]
    if causal:
        i, j = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
        c = j <= i + (seqlen_k - seqlen_q)
        vis = c if vis is None else vis & c
    return vis


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration (square attention: seqlen_q = seqlen_k = seqlen)."""

    mode: str
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    density: float
    batch: int
    nheads: int
    kept: float = 1.0  # the fraction of the eligible blocks the block mask keeps (density asked for: density)

    @property
    def key(self) -> tuple:
        return (self.mode, self.dtype, self.head_dim, self.seqlen, self.causal, self.density)

    @property
    def scores(self) -> int:
        """Entries of the (batch, nheads, seqlen, seqlen) score matrix."""
        return self.batch * self.nheads * self.seqlen * self.seqlen

    def label(self) -> str:
        s = f"{self.mode} {self.dtype} hd{self.head_dim} s{self.seqlen} {'causal' if self.causal else 'full'}"
        return s + (f" d{self.density:g}" if self.density < 1 else "")


def case_key(row: dict) -> tuple:
    return (row["mode"], row["dtype"], row["head_dim"], row["seqlen"], row["causal"], row["density"])


@dataclasses.dataclass
class Plan:
    """Everything one run measures and how (the JSON's config)."""

    device: str
    preset: str
    modes: list
    dtypes: list
    head_dims: list
    seqlens: list
    causal: list
    densities: list
    providers: list
    hidden: int
    tokens: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_quadratic_seqlen: int
    accuracy: bool
    seed: int
    memory_budget_bytes: float = 0.0

    @property
    def sparse(self) -> bool:
        return any(d < 1 for d in self.densities)
