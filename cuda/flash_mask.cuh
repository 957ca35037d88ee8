// flash_mask.cuh: the mask and score layer every kernel family uses, forward and backward (flash-attn's
// mask.h + block_info.h). A masking feature is added here once; the families only ask:
//   which key tiles a query tile visits      Mask::key_begin / key_end (+ TileWalk over a block mask)
//   which query tiles a key tile visits      Mask::query_begin / query_end
//   whether a tile needs element masking     Mask::partial
//   whether one element is visible           Mask::visible
//   the score modifier before the softmax    ScoreMod<FEAT, T>::apply, and apply_grad with its derivative
//   a learnable sink at a row's end          add_sink (the forward's epilogue; the backward sees it in lse)
// Which of these a specialization compiles is its FEAT bits (FEAT_LOCAL, FEAT_SOFTCAP, FEAT_ALIBI,
// FEAT_SINK; make_mask<FEAT>, ScoreMod<FEAT, T>, sink_of<FEAT>): FEAT = 0 is the plain kernel.
//
// Visibility of key j to query i (rows and keys of one (batch, head); offset = seqlen_k - seqlen_q
// aligns the diagonal bottom-right, as flash-attn >= 2.1):
//   j < seqlen_k
//   causal:  j <= i + offset
//   window:  i + offset - window_left <= j <= i + offset + window_right   (-1: that side unbounded)
//   block mask: (i / block_q, j / block_k) active                        (TileWalk: whole tiles only)
// flashcupy/_mask.py states the same rule for the chunked path and the oracle.
#pragma once
#include "flash_params.cuh"

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Bounds on d = key - row of the visible band: lo <= d <= hi (INT bounds when unbounded).
struct Mask {
    int seqlen_q, seqlen_k;
    int lo, hi;        // band: lo <= key - row <= hi
    bool causal_band;  // hi is finite (causal or a right window): the band has an upper diagonal
    bool left_band;    // lo is finite (a left window)

    // causal: the family's compile-time flag (fp16/bf16 kernels) or p.mask.causal (run time); local:
    // whether the kernel reads p.mask.window_* (a compile-time flag: false builds no window code, and
    // with a constant causal the compiler folds every branch below).
    __device__ __forceinline__ Mask(const AttnParams& p, bool causal, bool local = false)
        : Mask(p, p.seqlen_q, p.seqlen_k, causal, local) {}
    // One sequence's lengths given explicitly (KV-cache rows and varlen sequences of different lengths;
    // the diagonal is aligned to that sequence's end).
    __device__ __forceinline__ Mask(const AttnParams& p, int seqlen_q_, int seqlen_k_, bool causal, bool local) {
        seqlen_q = seqlen_q_, seqlen_k = seqlen_k_;
        const int offset = seqlen_k_ - seqlen_q_;
        const int wr = local ? p.mask.window_right : -1, wl = local ? p.mask.window_left : -1;
        causal_band = causal || wr >= 0;
        left_band = wl >= 0;
        hi = causal ? offset : wr >= 0 ? offset + wr : (1 << 30);  // causal already implies key <= row + offset
        lo = left_band ? offset - wl : -(1 << 30);
    }

    // Keys [key_begin(r0), key_end(r1)) hold every key visible to some row in [r0, r1] (ascending).
    __device__ __forceinline__ int key_begin(int row_first) const { return left_band ? max(0, row_first + lo) : 0; }
    __device__ __forceinline__ int key_end(int row_last) const {
        return causal_band ? max(0, min(seqlen_k, row_last + hi + 1)) : seqlen_k;
    }
    // Queries [query_begin(k0), query_end(k1)) hold every row that sees some key in [k0, k1].
    __device__ __forceinline__ int query_begin(int key_first) const {
        return causal_band ? min(seqlen_q, max(0, key_first - hi)) : 0;
    }
    __device__ __forceinline__ int query_end(int key_last) const {
        return left_band ? max(0, min(seqlen_q, key_last - lo + 1)) : seqlen_q;
    }
    // The key tiles of TILE keys a query tile of rows [r0, r0 + rows) visits, for the families that
    // count tiles: keys first + j TILE, j < count (first a multiple of TILE).
    template <int TILE>
    __device__ __forceinline__ void key_tiles(int r0, int rows, int& first, int& count) const {
        first = key_begin(r0) / TILE * TILE;
        count = max(0, cdiv(key_end(r0 + rows - 1) - first, TILE));
    }
    // Deterministic dQ (the KV-outer backwards): the turn of key tile kt (TILE keys) among the key tiles
    // whose CTAs walk the query tile of rows [r0, r0 + rows) (TileWalk from query_begin(kt TILE) to
    // query_end(kt TILE + TILE - 1)); those are key tiles first .. first + count - 1 of key_tiles over
    // the rows that exist (the query tile clamped to seqlen_q), so the turns are 0 .. count - 1, once
    // each. descending: the last key tile adds first (causal: the order in which the walks, each
    // starting at its diagonal, reach the query tile; the launch order must then put higher key tiles
    // first); else the first one does (launch order ascending).
    template <int TILE>
    __device__ __forceinline__ int dq_turn(int r0, int rows, int kt, bool descending) const {
        // last key tile: cdiv(key_end(last row), TILE) - 1; first: key_begin(r0) / TILE (key_tiles)
        return descending ? cdiv(key_end(min(r0 + rows, seqlen_q) - 1), TILE) - 1 - kt : kt - key_begin(r0) / TILE;
    }
    // The query tiles (indices) [begin, end) of TILE rows that see a key of [k0, k0 + keys).
    template <int TILE>
    __device__ __forceinline__ void query_tiles(int k0, int keys, int& begin, int& end) const {
        begin = query_begin(k0) / TILE, end = cdiv(query_end(k0 + keys - 1), TILE);
    }
    // Does the (rows [r0, r0 + rows), keys [k0, k0 + keys)) tile contain any masked element?
    // KEY_TAIL = false ignores keys past seqlen_k: a backward KV kernel whose zero-filled K, V rows past
    // seqlen_k reach only dK, dV rows that are never stored, and dQ only through dS K with dS zeroed
    // there first (P = 2^(0 - lse) of such a key overflows for a row with a very negative LSE, and
    // inf * 0 is NaN: flash_bwd.cu).
    template <bool KEY_TAIL = true>
    __device__ __forceinline__ bool partial(int r0, int rows, int k0, int keys) const {
        return (KEY_TAIL && k0 + keys > seqlen_k) || (causal_band && k0 + keys - 1 - r0 > hi) ||
               (left_band && k0 - (r0 + rows - 1) < lo);
    }
    // Does the tile contain any visible element (rows and keys inside the sequences assumed)?
    __device__ __forceinline__ bool any_visible(int r0, int rows, int k0, int keys) const {
        return !(causal_band && k0 - (r0 + rows - 1) > hi) && !(left_band && k0 + keys - 1 - r0 < lo);
    }
    template <bool KEY_TAIL = true>
    __device__ __forceinline__ bool visible(int row, int key) const {
        const int d = key - row;
        return !(KEY_TAIL && key >= seqlen_k) && !(causal_band && d > hi) && !(left_band && d < lo);
    }
    // visible() for the families whose causal flag is a run-time value (fp32 / fp64: SIMT, DMMA,
    // TF32). The same set: without an upper diagonal hi is 2^30, which key - row never exceeds (rows
    // and keys < 2^30), so causal_band needs no test, and the bound is compared against row + hi,
    // which the compiler adds once per row: one ISETP per element and bound. visible()'s run-time
    // causal_band test and per-element key - row cost these kernels an IADD3 + ISETP + PLOP3 per
    // element (bench/NOTES.md, "fp32 / fp64 A/B regression at the SASS level"); a compile-time causal
    // (fp16 / bf16, Hopper) folds that test away, so those keep visible().
    template <bool KEY_TAIL = true>
    __device__ __forceinline__ bool visible_rt(int row, int key) const {
        return !(KEY_TAIL && key >= seqlen_k) && key <= row + hi && !(left_band && key < row + lo);
    }
};

// Compile-time features of a kernel specialization (issue 16), the FEAT_* bits of flashcupy/_features.py:
// every kernel template takes `int FEAT` (0: the plain kernel, whose code is as before the features).
enum : int { FEAT_LOCAL = 1, FEAT_SOFTCAP = 2, FEAT_ALIBI = 4, FEAT_SINK = 8, FEAT_VARLEN = 16 };

// The sequence a CTA works on (issue 17's varlen): blockIdx.z = b. Dense (VARLEN false): the record's
// batch row b, rows from 0, p.seqlen_q / p.seqlen_k. Varlen (FEAT_VARLEN): the record describes one
// packed batch row (p.batch 1, p.seqlen_q = total_q, p.seqlen_k = total_k, LSE (nheads, total_q)), and
// sequence b is its rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and [cu_seqlens_k[b], + seqlen_k)
// of k and v, seqlen_k = seqused_k[b] if given, else cu_seqlens_k[b + 1] - cu_seqlens_k[b].
// tensor_batch: the batch index of the tensors' pointers; seq: b (ALiBi's slope row, dropout's bits).
struct Seq {
    int tensor_batch, seq, q0, k0, seqlen_q, seqlen_k;
};
template <bool VARLEN>
__device__ __forceinline__ Seq seq_of(const AttnParams& p, int b) {
    if constexpr (!VARLEN) {
        return Seq{b, b, 0, 0, p.seqlen_q, p.seqlen_k};
    } else {
        const int q0 = __ldg(p.cu_seqlens_q + b), k0 = __ldg(p.cu_seqlens_k + b);
        const int sk = p.seqused_k ? __ldg(p.seqused_k + b) : __ldg(p.cu_seqlens_k + b + 1) - k0;
        return Seq{0, b, q0, k0, __ldg(p.cu_seqlens_q + b + 1) - q0, sk};
    }
}

// The Mask of a specialization: the window is read only where FEAT has FEAT_LOCAL.
template <int FEAT>
__device__ __forceinline__ Mask make_mask(const AttnParams& p, bool causal) {
    return Mask(p, causal, (FEAT & FEAT_LOCAL) != 0);
}

// Float / double helpers of the score layer (NVRTC has no <cmath>: explicit float and double forms).
template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ll); }
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
// The half-precision families' tanh: MUFU.TANH (max relative error 2^-10.7, under the fp16 / bf16
// rounding of the scores that the naive reference in those dtypes makes).
__device__ __forceinline__ float tanh_approx(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else  // the host compile of tests/test_mask.py
    return tanhf(x);
#endif
}

// The score modifier, applied to a raw score s = q . k (before softmax_scale) of (row, key), in the
// family's compute type T, as flash-attn defines softcap and ALiBi on the scaled score x = scale * s:
//   softcap:  x -> softcap * tanh(x / softcap)
//   ALiBi:    x -> x - slope[batch, head] * |row + seqlen_k - seqlen_q - key|   (after the softcap)
// apply() returns the raw score the softmax sees (the scaled one divided by scale, so each family
// scales as before), apply_grad() also the factor dS picks up, d apply / d s = 1 - tanh^2 (ALiBi adds
// a constant: factor 1). ACTIVE = false lets the families skip the pass at compile time. APPROX:
// tanh.approx (the fp16 / bf16 families); the exact tanhf / tanh otherwise.
// scale here is the kernels' (1 for a caller's softmax_scale of 0, with q zeroed: then x = 0 and the
// modified score is softcap * tanh(0) - slope * |...|, as the caller's 0 gives).
template <int FEAT, typename T = float, bool APPROX = false>
struct ScoreMod {
    static constexpr bool SOFTCAP = (FEAT & FEAT_SOFTCAP) != 0, ALIBI = (FEAT & FEAT_ALIBI) != 0;
    static constexpr bool ACTIVE = SOFTCAP || ALIBI;
    T cap_in = T(0), cap_out = T(0), slope = T(0);  // scale / softcap, softcap / scale, slope / scale
    int offset = 0;

    ScoreMod() = default;  // off until assigned (arrays of them: one per row of a decode CTA)
    __device__ __forceinline__ explicit ScoreMod(const AttnParams& p, int batch, int head)
        : ScoreMod(p, batch, head, p.seqlen_q, p.seqlen_k) {}
    // One sequence's lengths given explicitly (as Mask's).
    __device__ __forceinline__ ScoreMod(const AttnParams& p, int batch, int head, int seqlen_q, int seqlen_k) {
        const T scale = T(p.scale);
        if constexpr (SOFTCAP) cap_in = scale / T(p.softcap), cap_out = T(p.softcap) / scale;
        if constexpr (ALIBI) {
            slope = T(__ldg(p.alibi_slopes + batch * p.alibi_batch_stride + head)) / scale;
            offset = seqlen_k - seqlen_q;
        }
    }
    __device__ __forceinline__ T tanh_(T x) const {
        if constexpr (APPROX && sizeof(T) == 4) return tanh_approx(x);
        else return m_tanh(x);
    }
    __device__ __forceinline__ T apply(T s, int row, int key) const {
        if constexpr (SOFTCAP) s = cap_out * tanh_(s * cap_in);
        if constexpr (ALIBI) s -= slope * T(abs(row + offset - key));
        return s;
    }
    // apply(s) into s; returns d apply / d s.
    __device__ __forceinline__ T apply_grad(T& s, int row, int key) const {
        T g = T(1);
        if constexpr (SOFTCAP) {
            const T t = tanh_(s * cap_in);
            s = cap_out * t, g = T(1) - t * t;
        }
        if constexpr (ALIBI) s -= slope * T(abs(row + offset - key));
        return g;
    }
};

// A learnable attention sink (FEAT_SINK) at the end of one softmax row: the row's normaliser gains
// exp(sink) without a value vector, in natural-log units of the scaled scores. o_scale (what O is
// multiplied by, 1 / l before) picks up the keys' share, 1 / (1 + exp(sink - lse)), and lse becomes
// logaddexp(lse, sink). lse = -inf (no visible key): o_scale 0 (O stays 0), lse = sink. A sink of
// -inf changes nothing, bit for bit; a NaN sink makes the row NaN. Once per row: exact exp / log1p.
template <typename T>
__device__ __forceinline__ void add_sink(T& o_scale, T& lse, T sink) {
    if (sink == neg_inf<T>()) return;
    const T d = sink - lse;  // +inf for an empty row
    o_scale = o_scale / (T(1) + m_exp(d));
    lse = d > T(0) ? sink + m_log1p(m_exp(-d)) : lse + m_log1p(m_exp(d));
}
// The end of one softmax row in a forward's epilogue, for every family: o_scale (the factor O gets,
// 1 / l or 0) picks up FEAT's sink here, and stored() gives the lse to store. lse_keys() is the family's
// lse of the keys alone (its own base and scale); without FEAT_SINK it is only evaluated where stored()
// is, so the plain kernels' epilogues compile as they did before the features.
template <int FEAT, typename T>
struct RowEnd {
    [[maybe_unused]] T lse = T(0);
    template <typename F>
    __device__ __forceinline__ RowEnd(T& o_scale, const F& lse_keys, T sink) {
        if constexpr ((FEAT & FEAT_SINK) != 0) {
            lse = lse_keys();
            add_sink(o_scale, lse, sink);
        }
    }
    template <typename F>
    __device__ __forceinline__ T stored(const F& lse_keys) const {
        if constexpr ((FEAT & FEAT_SINK) != 0) return lse;
        else return lse_keys();
    }
};

// The sink of head as T; -inf without FEAT_SINK (add_sink then compiles to nothing).
template <int FEAT, typename T = float>
__device__ __forceinline__ T sink_of(const AttnParams& p, int head) {
    if constexpr ((FEAT & FEAT_SINK) != 0) return T(__ldg(p.sinks + head));
    else return neg_inf<T>();
}

// ---------------------------------------------------------------------------------------------
// Which tiles a CTA visits along one sequence, in ascending order: every tile of [start, limit)
// (index == nullptr, dense) or the tiles of the active blocks of one block-mask row or column
// (block-sparse; index holds count block numbers, ascending; a block is 2^block_shift tiles).
// Tiles that end at or before first()'s `start` are skipped; the walk ends at the first tile starting
// at or after `limit`. Tiles start at multiples of TILE.
// ---------------------------------------------------------------------------------------------
template <int TILE>
struct TileWalk {
    const int* index = nullptr;  // nullptr: dense
    int count = 0;               // active blocks (sparse)
    int block_shift = 0;         // log2(tiles per block) (sparse; blocks are power-of-two multiples of TILE)
    int limit;
    int pos = 0;                 // dense: tile number; sparse: active block * tiles per block + tile within it

    // The walk over [start, limit) (first(start) begins it), through the active blocks of list entry
    // (batch, head, own row r0) when the block mask is on.
    __device__ __forceinline__ TileWalk(int limit_, const SparseList& list, int batch, int head, int r0) : limit(limit_) {
        if (list.index == nullptr) return;
        const i64 off = batch * list.batch_stride + head * list.head_stride + r0 / list.rows_per_entry;
        index = list.index + off * list.nblocks, count = __ldg(list.counts + off);
        block_shift = 31 - __clz(list.block / TILE);
    }
    __device__ __forceinline__ int current() const {
        if (index == nullptr) return pos * TILE < limit ? pos * TILE : -1;
        if ((pos >> block_shift) >= count) return -1;
        const int r0 = ((__ldg(index + (pos >> block_shift)) << block_shift) + (pos & ((1 << block_shift) - 1))) * TILE;
        return r0 < limit ? r0 : -1;
    }
    __device__ __forceinline__ int next() { ++pos; return current(); }
    __device__ __forceinline__ int first(int start) {
        pos = index == nullptr ? max(start, 0) / TILE : 0;
        int r0 = current();
        while (r0 >= 0 && r0 + TILE <= start) r0 = next();
        return r0;
    }
};
