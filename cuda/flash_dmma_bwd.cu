// flash_dmma_bwd.cu: FlashAttention-2 backward in float64 on the FP64 tensor cores (mma.sync .f64), and
// in float32 on the TF32 tensor cores (mma.sync m16n8k8 .tf32: the allow_tf32 path), one template over
// the element type T (float: operands rounded to TF32, float32 accumulation, softmax in base 2).
//
// Two kernels after flash_simt_bwd_preprocess_kernel<T> (D = rowsum(dO o O), LSE in the exp base with
// -inf -> +inf, in flash_simt_bwd.cu):
//   flash_dmma_bwd_kv_kernel   one CTA per (key tile of BLOCK_N keys, column split, query head,
//                              batch); each warp owns 8 R8 keys and keeps its rows of dK, dV in
//                              registers; the loop runs over query tiles Q_i, dO_i of BLOCK_M rows
//                              (double-buffered in shared memory):
//                                S^T = K Q_i^T, dP^T = V dO_i^T          (dmma_rows, keys as rows)
//                                P^T = exp(S^T c - LSE), dS^T = P^T o (dP^T - D)   (registers)
//                                dV += P^T dO_i, dK += dS^T Q_i          (dmma_c_as_a: P^T, dS^T
//                                                                          never leave registers)
//                              D_SPLIT > 1: each CTA owns HEAD_DIM / D_SPLIT columns of dK, dV (and
//                              recomputes S^T, dP^T): large head dims in the register budget.
//   flash_dmma_bwd_dq_kernel   one CTA per (query tile, head, batch), warps own 8 R8 query rows,
//                              loop over key tiles: S = Q K_j^T, dP = dO V_j^T, dS = P o (dP - D),
//                              dQ += dS K_j (dS as the A operand straight from registers).
// dQ never uses atomics: the backward is always bitwise reproducible (deterministic=True costs
// nothing extra), at the price of recomputing S and dP (7 matrix products instead of 5).
// GQA: each KV CTA handles one query head and writes its dK, dV slice into a (batch, seqlen_k,
// nheads, head_dim) buffer; the Python side sums the group (fixed order).
//
// Fragments, permutations and the shared-memory swizzle: flash_dmma.cuh.
//
// Versions (numbers in bench/NOTES.md, "fp64 on the FP64 tensor cores (DMMA)"):
//   v1  KV kernel + dQ kernel, swizzled smem, P / dS in registers, Q/dO double-buffered.
//   v1.1 KV kernel: STAGES = 1 (single-buffered Q/dO) option, for 2 CTAs per SM at hd128.
//   v2  templated over T: float = TF32 m16n8k8 (16-key / 16-row warps), 4 floats per 16-byte chunk.
#include "flash_dmma.cuh"

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_, int D_SPLIT_, int KATOM_, int STAGES_>
struct DmmaBwdKvTraits {
    using T = T_;  // double (DMMA) or float (TF32)
    static constexpr int CE = DmmaElem<T>::CE;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int BLOCK_M = BLOCK_M_;  // query rows per step
    static constexpr int BLOCK_N = BLOCK_N_;  // keys per CTA
    static constexpr int NWARPS = NWARPS_;
    static constexpr int D_SPLIT = D_SPLIT_;  // CTAs per key tile, each owning HEAD_DIM / D_SPLIT columns
    static constexpr int KATOM = KATOM_;
    // Q_i, dO_i buffers: 2 = tile i + 1 loads while tile i is used; 1 = tile i + 1 loads after every
    // warp is done with tile i (no overlap inside the CTA, but 32 KB less shared memory at hd128:
    // 2 CTAs per SM instead of 1, and the other CTA computes while this one loads).
    static constexpr int STAGES = STAGES_;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int WARP_N = BLOCK_N / NWARPS;  // keys per warp
    static constexpr int R8 = WARP_N / 8;
    static constexpr int NT = BLOCK_M / 8;            // query n8 tiles of S^T
    static constexpr int DPS = HEAD_DIM / (8 * CE) / D_SPLIT;  // column groups of dK, dV per CTA
    // K, V (BLOCK_N, HEAD_DIM); Q, dO STAGES x (BLOCK_M, HEAD_DIM)
    static constexpr int SMEM_BYTES = (2 * BLOCK_N + 2 * STAGES * BLOCK_M) * HEAD_DIM * (int)sizeof(T);
    static_assert(WARP_N == 8 || WARP_N == 16, "a warp owns 8 or 16 keys");
    static_assert(STAGES == 1 || STAGES == 2, "single- or double-buffered Q_i, dO_i");
    static_assert(BLOCK_M % 16 == 0 && HEAD_DIM % (8 * CE * D_SPLIT) == 0, "k16 steps; whole column groups per split");
};

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_, int KATOM_>
struct DmmaBwdDqTraits {
    using T = T_;
    static constexpr int CE = DmmaElem<T>::CE;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int BLOCK_M = BLOCK_M_;  // query rows per CTA
    static constexpr int BLOCK_N = BLOCK_N_;  // keys per step
    static constexpr int NWARPS = NWARPS_;
    static constexpr int KATOM = KATOM_;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int WARP_M = BLOCK_M / NWARPS;
    static constexpr int R8 = WARP_M / 8;
    static constexpr int NT = BLOCK_N / 8;
    static constexpr int DP = HEAD_DIM / (8 * CE);
    // Q, dO (BLOCK_M, HEAD_DIM); K, V (BLOCK_N, HEAD_DIM)
    static constexpr int SMEM_BYTES = (2 * BLOCK_M + 2 * BLOCK_N) * HEAD_DIM * (int)sizeof(T);
    static_assert(WARP_M == 8 || WARP_M == 16, "a warp owns 8 or 16 rows");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % (8 * CE) == 0, "k16 steps");
};

// q, dout: (batch, seqlen_q, nheads, head_dim); k, v: (batch, seqlen_k, nheads_k, head_dim);
// dk, dv: (batch, seqlen_k, nheads, head_dim), this query head's part (rows < seqlen_k, columns <
// head_dim written). lse_exp, delta: (batch, nheads, seqlen_q) contiguous (preprocess kernel; LSE
// +inf on rows with no visible key). Strides in elements; last dimension contiguous; rows 16-byte
// aligned; head_dim a multiple of 8. scale_exp: softmax_scale (double) or softmax_scale log2 e (float).
// causal: 0 or 1.
template <typename Tr, typename T = typename Tr::T>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_dmma_bwd_kv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const T* __restrict__ lse_exp,
                         const T* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                         i64 q_batch_stride, i64 q_row_stride, i64 q_head_stride,
                         i64 k_batch_stride, i64 k_row_stride, i64 k_head_stride,
                         i64 v_batch_stride, i64 v_row_stride, i64 v_head_stride,
                         i64 do_batch_stride, i64 do_row_stride, i64 do_head_stride,
                         i64 dk_batch_stride, i64 dk_row_stride, i64 dk_head_stride,
                         int seqlen_q, int seqlen_k, int nheads, int group, int head_dim,
                         T softmax_scale, T scale_exp, int causal) {
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, NTHREADS = Tr::NTHREADS;
    constexpr int R8 = Tr::R8, NT = Tr::NT, DPS = Tr::DPS, WARP_N = Tr::WARP_N, KATOM = Tr::KATOM;
    constexpr int CE = Tr::CE;
    const T inf = Simt<T>::inf();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* s_k = reinterpret_cast<T*>(smem_raw);          // (BLOCK_N, HEAD_DIM) swizzled
    T* s_v = s_k + BLOCK_N * HEAD_DIM;                 // (BLOCK_N, HEAD_DIM)
    T* s_q = s_v + BLOCK_N * HEAD_DIM;                 // STAGES x (BLOCK_M, HEAD_DIM)
    T* s_do = s_q + Tr::STAGES * BLOCK_M * HEAD_DIM;   // STAGES x (BLOCK_M, HEAD_DIM)

    const int n_block = blockIdx.x / Tr::D_SPLIT, p0 = (blockIdx.x % Tr::D_SPLIT) * DPS;
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / group;
    const int n0 = n_block * BLOCK_N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_key0 = warp * WARP_N;  // first key of this warp in the tile
    const int causal_offset = seqlen_k - seqlen_q;

    const T* q_head = q + batch * q_batch_stride + head * q_head_stride;
    const T* do_head = dout + batch * do_batch_stride + head * do_head_stride;
    const T* lse_head = lse_exp + ((i64)batch * nheads + head) * seqlen_q;
    const T* delta_head = delta + ((i64)batch * nheads + head) * seqlen_q;

    load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(
        s_k, k + batch * k_batch_stride + head_k * k_head_stride + n0 * k_row_stride, k_row_stride, seqlen_k - n0,
        head_dim);
    load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(
        s_v, v + batch * v_batch_stride + head_k * v_head_stride + n0 * v_row_stride, v_row_stride, seqlen_k - n0,
        head_dim);

    // Causal: query rows before n0 - offset see none of these keys (and every key is visible to the
    // last query row, so the loop is never empty for a key tile inside seqlen_k).
    const int m_begin = causal ? max(0, n0 - causal_offset) / BLOCK_M : 0;
    const int m_end = cdiv(seqlen_q, BLOCK_M);
    if (m_begin < m_end) {
        const int m0 = m_begin * BLOCK_M;
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, q_head + m0 * q_row_stride, q_row_stride, seqlen_q - m0,
                                                    head_dim);
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_do, do_head + m0 * do_row_stride, do_row_stride,
                                                    seqlen_q - m0, head_dim);
    }
    cp_async_commit();

    // acc_dv[p][x][h][e] = dV[key warp_key0 + 8h + g][8 CE (p0 + p) + CE (2t + e) + x]; acc_dk likewise.
    T acc_dk[DPS][CE][R8][2], acc_dv[DPS][CE][R8][2];
    zero4(acc_dk);
    zero4(acc_dv);

    for (int mb = m_begin; mb < m_end; ++mb) {
        const int m0 = mb * BLOCK_M, buf = Tr::STAGES == 2 ? (mb - m_begin) & 1 : 0;
        if (Tr::STAGES == 1 && mb > m_begin) {
            __syncthreads();  // every warp is done with tile i - 1: load tile i into the one buffer
            load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, q_head + m0 * q_row_stride, q_row_stride, seqlen_q - m0,
                                                        head_dim);
            load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_do, do_head + m0 * do_row_stride, do_row_stride,
                                                        seqlen_q - m0, head_dim);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i (and K, V) are in shared memory; every warp is done with tile i - 1
        if (Tr::STAGES == 2 && mb + 1 < m_end) {  // prefetch tile i + 1 into the other buffer
            const int m1 = m0 + BLOCK_M;
            load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_q + (buf ^ 1) * BLOCK_M * HEAD_DIM,
                                                        q_head + m1 * q_row_stride, q_row_stride, seqlen_q - m1,
                                                        head_dim);
            load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_do + (buf ^ 1) * BLOCK_M * HEAD_DIM,
                                                        do_head + m1 * do_row_stride, do_row_stride, seqlen_q - m1,
                                                        head_dim);
            cp_async_commit();
        }
        const T* sq = s_q + buf * BLOCK_M * HEAD_DIM;
        const T* sdo = s_do + buf * BLOCK_M * HEAD_DIM;

        // Causal: the tile's last query sees none of this warp's keys -> nothing to add (warp-uniform).
        if (causal && m0 + BLOCK_M - 1 + causal_offset < n0 + warp_key0) continue;

        // LSE and D of the lane's query columns m0 + 8 jn + 2t + e (+inf / 0 past seqlen_q: P = 0 there).
        T lse_c[NT][2], dlt_c[NT][2];
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int qi = m0 + 8 * jn + 2 * t + e;
                lse_c[jn][e] = qi < seqlen_q ? lse_head[qi] : inf;
                dlt_c[jn][e] = qi < seqlen_q ? delta_head[qi] : T(0);
            }

        // S^T = K Q_i^T, dP^T = V dO_i^T: (keys of the warp, BLOCK_M queries)
        T acc_s[NT][R8][2], acc_dp[NT][R8][2];
        zero3(acc_s);
        zero3(acc_dp);
        dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_s, s_k, warp_key0, sq, g, t);
        dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_dp, s_v, warp_key0, sdo, g, t);

        // P^T = exp(S^T c - LSE) (0 where causally masked), dS^T = P^T o (dP^T - D). Keys past
        // seqlen_k need no mask: they only reach their own rows of dK, dV, which are not stored.
        const bool need_mask = causal && n0 + warp_key0 + WARP_N - 1 > m0 + causal_offset;
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
#pragma unroll
            for (int h = 0; h < R8; ++h)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    T p = Simt<T>::exp_base(fmadd(acc_s[jn][h][e], scale_exp, -lse_c[jn][e]));
                    // select, not multiply: a masked score may overflow exp (its row's LSE excludes it)
                    if (need_mask && n0 + warp_key0 + 8 * h + g > m0 + 8 * jn + 2 * t + e + causal_offset) p = T(0);
                    acc_s[jn][h][e] = p;
                    acc_dp[jn][h][e] = p * (acc_dp[jn][h][e] - dlt_c[jn][e]);
                }

        // dV += P^T dO_i, dK += dS^T Q_i over this CTA's column pairs
        dmma_c_as_a<R8, NT, DPS, HEAD_DIM, KATOM>(acc_dv, acc_s, sdo, p0, g, t);
        dmma_c_as_a<R8, NT, DPS, HEAD_DIM, KATOM>(acc_dk, acc_dp, sq, p0, g, t);
    }

    // dK = scale dS^T Q; rows past seqlen_k and columns past head_dim are not stored.
    const i64 tile_off = batch * dk_batch_stride + head * dk_head_stride + n0 * dk_row_stride;
    store_c_pairs<DPS, R8>(dk + tile_off, dk_row_stride, acc_dk, softmax_scale, p0, seqlen_k - n0, head_dim,
                           warp_key0, g, t);
    store_c_pairs<DPS, R8>(dv + tile_off, dk_row_stride, acc_dv, T(1), p0, seqlen_k - n0, head_dim, warp_key0, g, t);
}

// dQ: one CTA per (query tile, head, batch), looping over the key tiles.
// dq: (batch, seqlen_q, nheads, head_dim), fully written (rows < seqlen_q, columns < head_dim).
// Same arguments as flash_simt_bwd_q_kernel<T>.
template <typename Tr, typename T = typename Tr::T>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_dmma_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const T* __restrict__ lse_exp,
                         const T* __restrict__ delta, T* __restrict__ dq,
                         i64 q_batch_stride, i64 q_row_stride, i64 q_head_stride,
                         i64 k_batch_stride, i64 k_row_stride, i64 k_head_stride,
                         i64 v_batch_stride, i64 v_row_stride, i64 v_head_stride,
                         i64 do_batch_stride, i64 do_row_stride, i64 do_head_stride,
                         i64 dq_batch_stride, i64 dq_row_stride, i64 dq_head_stride,
                         int seqlen_q, int seqlen_k, int nheads, int group, int head_dim,
                         T softmax_scale, T scale_exp, int causal) {
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, NTHREADS = Tr::NTHREADS;
    constexpr int R8 = Tr::R8, NT = Tr::NT, DP = Tr::DP, WARP_M = Tr::WARP_M, KATOM = Tr::KATOM;
    constexpr int CE = Tr::CE;
    const T inf = Simt<T>::inf();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* s_q = reinterpret_cast<T*>(smem_raw);  // (BLOCK_M, HEAD_DIM) swizzled
    T* s_do = s_q + BLOCK_M * HEAD_DIM;        // (BLOCK_M, HEAD_DIM)
    T* s_k = s_do + BLOCK_M * HEAD_DIM;        // (BLOCK_N, HEAD_DIM)
    T* s_v = s_k + BLOCK_N * HEAD_DIM;         // (BLOCK_N, HEAD_DIM)

    const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / group;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * WARP_M;
    const int causal_offset = seqlen_k - seqlen_q;

    const T* k_head = k + batch * k_batch_stride + head_k * k_head_stride;
    const T* v_head = v + batch * v_batch_stride + head_k * v_head_stride;

    int n_blocks = cdiv(seqlen_k, BLOCK_N);
    if (causal) n_blocks = min(n_blocks, max(0, cdiv(m0 + BLOCK_M + causal_offset, BLOCK_N)));
    const int warp_last_key = m0 + warp_row0 + WARP_M - 1 + causal_offset;

    // LSE and D of the lane's rows (+inf / 0 past seqlen_q).
    T lse_r[R8], dlt_r[R8];
#pragma unroll
    for (int h = 0; h < R8; ++h) {
        const int row = m0 + warp_row0 + 8 * h + g;
        const i64 idx = ((i64)batch * nheads + head) * seqlen_q + row;
        lse_r[h] = row < seqlen_q ? lse_exp[idx] : inf;
        dlt_r[h] = row < seqlen_q ? delta[idx] : T(0);
    }

    if (n_blocks > 0) {  // committed and waited for with K_0, V_0
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(
            s_q, q + batch * q_batch_stride + head * q_head_stride + m0 * q_row_stride, q_row_stride, seqlen_q - m0,
            head_dim);
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(
            s_do, dout + batch * do_batch_stride + head * do_head_stride + m0 * do_row_stride, do_row_stride,
            seqlen_q - m0, head_dim);
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head, k_row_stride, seqlen_k, head_dim);
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head, v_row_stride, seqlen_k, head_dim);
        cp_async_commit();
    }

    T acc_dq[DP][CE][R8][2];  // dQ[row warp_row0 + 8h + g][8 CE p + CE (2t + e) + x]
    zero4(acc_dq);
    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = j * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K_j, V_j (and Q, dO) are in shared memory

        const bool warp_active = !causal || n0 <= warp_last_key;
        T acc_s[NT][R8][2], acc_dp[NT][R8][2];  // S -> P, dP -> dS: (row 8h + g, key n0 + 8 jn + 2t + e)
        if (warp_active) {
            zero3(acc_s);
            zero3(acc_dp);
            dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_s, s_q, warp_row0, s_k, g, t);
            dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_dp, s_do, warp_row0, s_v, g, t);
            const bool need_mask = n0 + BLOCK_N > seqlen_k ||
                                   (causal && n0 + BLOCK_N - 1 > m0 + warp_row0 + causal_offset);
#pragma unroll
            for (int jn = 0; jn < NT; ++jn)
#pragma unroll
                for (int h = 0; h < R8; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int row = m0 + warp_row0 + 8 * h + g, col = n0 + 8 * jn + 2 * t + e;
                        T p = Simt<T>::exp_base(fmadd(acc_s[jn][h][e], scale_exp, -lse_r[h]));
                        if (need_mask && (col >= seqlen_k || (causal && col > row + causal_offset))) p = T(0);
                        acc_dp[jn][h][e] = p * (acc_dp[jn][h][e] - dlt_r[h]);
                    }
        }
        __syncthreads();  // every warp is done reading V_j
        if (j + 1 < n_blocks) {
            load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head + (n0 + BLOCK_N) * v_row_stride, v_row_stride,
                                                        seqlen_k - n0 - BLOCK_N, head_dim);
            cp_async_commit();
        }
        // dQ += dS K_j
        if (warp_active) dmma_c_as_a<R8, NT, DP, HEAD_DIM, KATOM>(acc_dq, acc_dp, s_k, 0, g, t);
        __syncthreads();  // every warp is done reading K_j
        if (j + 1 < n_blocks) {
            load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + (n0 + BLOCK_N) * k_row_stride, k_row_stride,
                                                        seqlen_k - n0 - BLOCK_N, head_dim);
            cp_async_commit();
        }
    }

    T* dq_tile = dq + batch * dq_batch_stride + head * dq_head_stride + m0 * dq_row_stride;
    store_c_pairs<DP, R8>(dq_tile, dq_row_stride, acc_dq, softmax_scale, 0, seqlen_q - m0, head_dim, warp_row0, g, t);
}
