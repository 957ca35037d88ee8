// flash_mask.cuh: the mask and score layer every kernel family uses, forward and backward (flash-attn's
// mask.h + block_info.h). A masking feature is added here once; the families only ask:
//   which key tiles a query tile visits      Mask::key_begin / key_end (+ TileWalk over a block mask)
//   which query tiles a key tile visits      Mask::query_begin / query_end
//   whether a tile needs element masking     Mask::partial
//   whether one element is visible           Mask::visible
//   the score modifier before the softmax    ScoreMod::apply and its derivative ScoreMod::grad
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
    __device__ __forceinline__ Mask(const AttnParams& p, bool causal, bool local = false) {
        seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
        const int offset = p.seqlen_k - p.seqlen_q;
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
    // The query tiles (indices) [begin, end) of TILE rows that see a key of [k0, k0 + keys).
    template <int TILE>
    __device__ __forceinline__ void query_tiles(int k0, int keys, int& begin, int& end) const {
        begin = query_begin(k0) / TILE, end = cdiv(query_end(k0 + keys - 1), TILE);
    }
    // Does the (rows [r0, r0 + rows), keys [k0, k0 + keys)) tile contain any masked element?
    // KEY_TAIL = false ignores keys past seqlen_k (a backward KV kernel whose zero-filled K, V rows
    // past seqlen_k reach only dK, dV rows that are never stored).
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
};

// The score modifier, applied to a raw score s = q . k (before softmax_scale) of (row, key): the
// identity today. Softcap and ALiBi (issue 16) land here: apply() returns the raw score the softmax
// sees and grad() the factor dS picks up (d apply / d s). ACTIVE = false lets the families skip the
// pass over their scores at compile time.
struct ScoreMod {
    static constexpr bool ACTIVE = false;
    __device__ __forceinline__ explicit ScoreMod(const AttnParams&, int /*batch*/, int /*head*/) {}
    template <typename T>
    __device__ __forceinline__ T apply(T s, int /*row*/, int /*key*/) const { return s; }
    template <typename T>
    __device__ __forceinline__ T grad(T /*s*/, int /*row*/, int /*key*/) const { return T(1); }
};

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
