// flash_params.cuh: the one record every flashcupy kernel takes, by value (flash-attn's
// Flash_fwd_params / Flash_bwd_params in one struct).
//
// flashcupy/_params.py mirrors it as a NumPy structured dtype (align=True: C layout rules) and fills
// it; tests/test_params.py reads sizeof and every field offset back from an NVRTC compile of this
// header and fails on any mismatch. A field the next issues need (varlen, paged KV, window, softcap,
// ALiBi, sinks) has its slot here already; zero / -1 means "off".
//
// Conventions: BSHD tensors (batch, seqlen, nheads, head_dim), strides in elements, the last dimension
// contiguous; head_dim is the kernels' padded head dim (a multiple of 8). lse and delta are
// (batch, nheads, seqlen_q) contiguous.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// A (batch, seqlen, nheads, head_dim) tensor: base pointer and strides in elements.
struct Tensor4 {
    void* data;
    i64 batch_stride, row_stride, head_stride;

    // Element (b, row, h, 0), as a T pointer (i64 offsets: tensors may exceed 2^31 elements).
    template <typename T>
    __device__ __forceinline__ T* ptr(int b, int h, int row = 0) const {
        return static_cast<T*>(data) + b * batch_stride + h * head_stride + row * row_stride;
    }
};

// Dropout: Philox4x32-10 keep-mask (flashcupy/dropout.py computes the same bits on the host).
struct DropoutParams {
    u32 seed_lo, seed_hi, offset;
    u32 keep_threshold;  // keep iff a 16-bit uniform < keep_threshold (1..65536)
    float scale;         // 65536 / keep_threshold = 1 / (1 - p_eff)
};

// A block-mask row's (or column's) active list: count at counts[off], blocks at index[off * nblocks],
// off = batch * batch_stride + head * head_stride + own_row / rows_per_entry. index == nullptr: dense.
struct SparseList {
    const int* counts;
    const int* index;
    i64 batch_stride, head_stride;  // 0 where the mask broadcasts over batch / heads
    int nblocks;                     // length of one list
    int block;                       // rows per block along the listed dimension (the other side's)
    int rows_per_entry;              // rows per block along the CTA's own dimension
};

// What is visible (flash_mask.cuh turns it into tile ranges and element masks).
struct MaskParams {
    int causal;                     // 1: key j visible to query i iff j <= i + seqlen_k - seqlen_q
    int window_left, window_right;  // sliding window in keys around the bottom-right diagonal; -1: unbounded
    SparseList kv_list;             // per query block: active key blocks (forward, dQ kernels)
    SparseList q_list;              // per key block: active query blocks (backward KV kernels)
};

struct AttnParams {
    // Tensors. Forward: q, k, v in; out, lse out. Backward: dout, out, lse in (and q, k, v);
    // dq, dk, dv out; delta (D = rowsum(dO o O)), lse_exp (the LSE in the kernels' exp base) and
    // dq_accum (float32 dQ for atomics) are the backward's workspaces.
    Tensor4 q, k, v, out, dout, dq, dk, dv;
    void* lse;
    void* delta;
    void* lse_exp;
    float* dq_accum;  // (batch, seqlen_q, nheads, head_dim) float32, contiguous

    int batch, seqlen_q, seqlen_k, nheads, nheads_k;
    int group;     // nheads / nheads_k (MQA / GQA: query head h reads key/value head h / group)
    int head_dim;  // padded to a multiple of 8; columns past the caller's are zero-filled, never stored

    // Scales. scale: of q k^T before the softmax (1 when the caller's is 0: q is then zeroed, see
    // flashcupy/_params.py); scale_log2 = scale * log2(e) (base-2 softmax); grad_scale: the caller's
    // softmax_scale, which dq and dk carry. Double for the float64 kernels, float for the others.
    double scale, scale_log2, grad_scale;
    float scale_f, scale_log2_f, grad_scale_f;

    MaskParams mask;
    DropoutParams dropout;

    int dkv_fp32;   // fp16/bf16 backward: dk, dv rows written as float32 (GQA: summed afterwards)
    int dq_atomic;  // backward: dQ by float32 / T atomics inside the KV kernel

    // Issue 17's slots (not read by any kernel yet), then issue 16's features (flash_mask.cuh reads them
    // in the FEAT_* specializations only); zero = off.
    const int* cu_seqlens_q;   // (batch + 1,) varlen query offsets
    const int* cu_seqlens_k;   // (batch + 1,) varlen key offsets
    const int* seqused_k;      // (batch,) keys used per sequence (KV cache)
    const int* block_table;    // (batch, max_blocks) paged KV
    i64 block_table_stride;
    int page_size;
    double softcap;            // 0: off (double: the float64 kernels use it as given)
    const float* alibi_slopes; // (nheads,) or (batch, nheads)
    i64 alibi_batch_stride;
    const float* sinks;        // (nheads,) learnable attention sinks

    // Split-KV decoding (cuda/flash_decode.cu): each of num_splits CTAs of a row writes its partial
    // result, o_accum (num_splits, batch, nheads, seqlen_q, head_dim) and lse_accum (num_splits, batch,
    // nheads, seqlen_q), in the compute type (float; double for float64); the combine kernel merges them.
    void* o_accum;
    void* lse_accum;
    int num_splits;
};

// The scale of the scores as the family's element type: float kernels work in base 2 (exp2 of
// log2(e)-scaled scores), float64 kernels in base e.
template <typename T>
struct ScaleOf;
template <>
struct ScaleOf<float> {
    static __device__ __forceinline__ float scale(const AttnParams& p) { return p.scale_f; }
    static __device__ __forceinline__ float exp_scale(const AttnParams& p) { return p.scale_log2_f; }
    static __device__ __forceinline__ float grad(const AttnParams& p) { return p.grad_scale_f; }
};
template <>
struct ScaleOf<double> {
    static __device__ __forceinline__ double scale(const AttnParams& p) { return p.scale; }
    static __device__ __forceinline__ double exp_scale(const AttnParams& p) { return p.scale; }
    static __device__ __forceinline__ double grad(const AttnParams& p) { return p.grad_scale; }
};

// Row r of the (batch, nheads, seqlen_q) statistics of (batch, head).
__device__ __forceinline__ i64 stats_index(const AttnParams& p, int batch, int head, int row) {
    return ((i64)batch * p.nheads + head) * p.seqlen_q + row;
}
