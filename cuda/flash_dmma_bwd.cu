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
//   v2.1 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
//   v2.2 the KV kernel's element mask by Mask::visible_rt: one ISETP per element under need_mask, as
//        before v2.1 (visible()'s run-time causal test added a PLOP3 and an IADD3 per element on every
//        tile). The dQ kernel keeps visible(): with visible_rt two hd128 m16n8k16 sweep configs
//        (<double, 128, 32|64, 16, 2|4, 16>) spill 4 B at sm_90a.
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

// p.q, p.dout: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim);
// p.dk, p.dv: (batch, seqlen_k, nheads, head_dim), this query head's part (rows < seqlen_k, columns <
// head_dim written). p.lse_exp, p.delta: (batch, nheads, seqlen_q) (preprocess kernel; LSE +inf on
// rows with no visible key). All of T; rows 16-byte aligned; head_dim a multiple of 8. Scores enter
// the exp scaled by ScaleOf<T>::exp_scale; dK carries ScaleOf<T>::grad. p.mask.causal: run time.
template <typename Tr, int FEAT = 0, typename T = typename Tr::T>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_dmma_bwd_kv_kernel(const __grid_constant__ AttnParams p) {
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
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int n0 = n_block * BLOCK_N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_key0 = warp * WARP_N;  // first key of this warp in the tile
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, do_row_stride = p.dout.row_stride;
    const T scale_exp = ScaleOf<T>::exp_scale(p);

    const T* q_head = p.q.ptr<const T>(batch, head);
    const T* do_head = p.dout.ptr<const T>(batch, head);
    const T* lse_head = static_cast<const T*>(p.lse_exp) + stats_index(p, batch, head, 0);
    const T* delta_head = static_cast<const T*>(p.delta) + stats_index(p, batch, head, 0);

    load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, p.k.ptr<const T>(batch, head_k, n0), p.k.row_stride,
                                                seqlen_k - n0, head_dim);
    load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, p.v.ptr<const T>(batch, head_k, n0), p.v.row_stride,
                                                seqlen_k - n0, head_dim);

    // Query tiles m_begin .. m_end - 1 hold every row that sees a key of this tile (causal: every key
    // inside seqlen_k is visible to the last query row; a left window can leave the loop empty). The
    // mask is built here, after the K, V loads: built first, the TF32 hd64 kernel spilled 8 B at sm_90a
    // (255 registers).
    const Mask mask = make_mask<FEAT>(p, p.mask.causal != 0);
    int m_begin, m_end;
    mask.query_tiles<BLOCK_M>(n0, BLOCK_N, m_begin, m_end);
    if (m_begin >= m_end) cp_async_drain();  // no row sees this key tile (a left window)
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

        // No row of the tile sees any of this warp's keys: nothing to add (warp-uniform).
        if (!mask.any_visible(m0, BLOCK_M, n0 + warp_key0, WARP_N)) continue;

        // LSE and D of the lane's query columns m0 + 8 jn + 2t + e (+inf / 0 past seqlen_q: P = 0 there);
        // __ldg: the read-only path (ld.global.nc), as the __restrict__ arguments before AttnParams.
        T lse_c[NT][2], dlt_c[NT][2];
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int qi = m0 + 8 * jn + 2 * t + e;
                lse_c[jn][e] = qi < seqlen_q ? __ldg(lse_head + qi) : inf;
                dlt_c[jn][e] = qi < seqlen_q ? __ldg(delta_head + qi) : T(0);
            }

        // S^T = K Q_i^T, dP^T = V dO_i^T: (keys of the warp, BLOCK_M queries)
        T acc_s[NT][R8][2], acc_dp[NT][R8][2];
        zero3(acc_s);
        zero3(acc_dp);
        dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_s, s_k, warp_key0, sq, g, t);
        dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_dp, s_v, warp_key0, sdo, g, t);

        // P^T = exp(S^T c - LSE) (0 where masked), dS^T = P^T o (dP^T - D) (times the score modifier's
        // derivative when there is one). Keys past seqlen_k need no mask: they only reach their own
        // rows of dK, dV, which are not stored (this kernel never writes dQ).
        const bool need_mask = mask.partial<false>(m0, BLOCK_M, n0 + warp_key0, WARP_N);
        [[maybe_unused]] const ScoreMod<FEAT, T> mod(p, batch, head);
#pragma unroll
        for (int jn = 0; jn < NT; ++jn)
#pragma unroll
            for (int h = 0; h < R8; ++h)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int qi = m0 + 8 * jn + 2 * t + e, kj = n0 + warp_key0 + 8 * h + g;
                    T score = acc_s[jn][h][e], dmod = T(1);
                    if constexpr (ScoreMod<FEAT, T>::ACTIVE) dmod = mod.apply_grad(score, qi, kj);
                    T pr = Simt<T>::exp_base(fmadd(score, scale_exp, -lse_c[jn][e]));
                    // select, not multiply: a masked score may overflow exp (its row's LSE excludes it)
                    if (need_mask && !mask.visible_rt<false>(qi, kj)) pr = T(0);
                    acc_s[jn][h][e] = pr;
                    acc_dp[jn][h][e] = pr * (acc_dp[jn][h][e] - dlt_c[jn][e]);
                    if constexpr (ScoreMod<FEAT, T>::ACTIVE) acc_dp[jn][h][e] *= dmod;
                }

        // dV += P^T dO_i, dK += dS^T Q_i over this CTA's column pairs
        dmma_c_as_a<R8, NT, DPS, HEAD_DIM, KATOM>(acc_dv, acc_s, sdo, p0, g, t);
        dmma_c_as_a<R8, NT, DPS, HEAD_DIM, KATOM>(acc_dk, acc_dp, sq, p0, g, t);
    }

    // dK = scale dS^T Q; rows past seqlen_k and columns past head_dim are not stored.
    store_c_pairs<DPS, R8>(p.dk.ptr<T>(batch, head, n0), p.dk.row_stride, acc_dk, ScaleOf<T>::grad(p), p0,
                           seqlen_k - n0, head_dim, warp_key0, g, t);
    store_c_pairs<DPS, R8>(p.dv.ptr<T>(batch, head, n0), p.dv.row_stride, acc_dv, T(1), p0, seqlen_k - n0, head_dim,
                           warp_key0, g, t);
}

// dQ: one CTA per (query tile, head, batch), looping over the key tiles.
// p.dq: (batch, seqlen_q, nheads, head_dim), fully written (rows < seqlen_q, columns < head_dim).
// Same record as flash_simt_bwd_q_kernel<T>.
template <typename Tr, int FEAT = 0, typename T = typename Tr::T>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_dmma_bwd_dq_kernel(const __grid_constant__ AttnParams p) {
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
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * WARP_M;
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
    const T scale_exp = ScaleOf<T>::exp_scale(p);
    const Mask mask = make_mask<FEAT>(p, p.mask.causal != 0);

    const T* k_head = p.k.ptr<const T>(batch, head_k);
    const T* v_head = p.v.ptr<const T>(batch, head_k);

    // Key tiles n_begin + j BLOCK_N, j < n_blocks, hold every key some row of this tile sees.
    int n_begin, n_blocks;
    mask.key_tiles<BLOCK_N>(m0, BLOCK_M, n_begin, n_blocks);

    // LSE and D of the lane's rows (+inf / 0 past seqlen_q).
    T lse_r[R8], dlt_r[R8];
#pragma unroll
    for (int h = 0; h < R8; ++h) {
        const int row = m0 + warp_row0 + 8 * h + g;
        const i64 idx = stats_index(p, batch, head, row);
        lse_r[h] = row < seqlen_q ? __ldg(static_cast<const T*>(p.lse_exp) + idx) : inf;
        dlt_r[h] = row < seqlen_q ? __ldg(static_cast<const T*>(p.delta) + idx) : T(0);

    }

    if (n_blocks > 0) {  // committed and waited for with the first K, V tiles
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, p.q.ptr<const T>(batch, head, m0), p.q.row_stride,
                                                    seqlen_q - m0, head_dim);
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_do, p.dout.ptr<const T>(batch, head, m0), p.dout.row_stride,
                                                    seqlen_q - m0, head_dim);
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + n_begin * k_row_stride, k_row_stride,
                                                    seqlen_k - n_begin, head_dim);
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head + n_begin * v_row_stride, v_row_stride,
                                                    seqlen_k - n_begin, head_dim);
        cp_async_commit();
    }

    T acc_dq[DP][CE][R8][2];  // dQ[row warp_row0 + 8h + g][8 CE p + CE (2t + e) + x]
    zero4(acc_dq);
    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = n_begin + j * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K_j, V_j (and Q, dO) are in shared memory

        const bool warp_active = mask.any_visible(m0 + warp_row0, WARP_M, n0, BLOCK_N);
        T acc_s[NT][R8][2], acc_dp[NT][R8][2];  // S -> P, dP -> dS: (row 8h + g, key n0 + 8 jn + 2t + e)
        if (warp_active) {
            // Before the products: fewer registers live (sm_90a hd128 spilled 4 B when it came after).
            const bool need_mask = mask.partial(m0 + warp_row0, WARP_M, n0, BLOCK_N);
            zero3(acc_s);
            zero3(acc_dp);
            dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_s, s_q, warp_row0, s_k, g, t);
            dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_dp, s_do, warp_row0, s_v, g, t);
            [[maybe_unused]] const ScoreMod<FEAT, T> mod(p, batch, head);
#pragma unroll
            for (int jn = 0; jn < NT; ++jn)
#pragma unroll
                for (int h = 0; h < R8; ++h)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int row = m0 + warp_row0 + 8 * h + g, col = n0 + 8 * jn + 2 * t + e;
                        T score = acc_s[jn][h][e], dmod = T(1);
                        if constexpr (ScoreMod<FEAT, T>::ACTIVE) dmod = mod.apply_grad(score, row, col);
                        T pr = Simt<T>::exp_base(fmadd(score, scale_exp, -lse_r[h]));
                        if (need_mask && !mask.visible(row, col)) pr = T(0);
                        acc_dp[jn][h][e] = pr * (acc_dp[jn][h][e] - dlt_r[h]);
                        if constexpr (ScoreMod<FEAT, T>::ACTIVE) acc_dp[jn][h][e] *= dmod;
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

    store_c_pairs<DP, R8>(p.dq.ptr<T>(batch, head, m0), p.dq.row_stride, acc_dq, ScaleOf<T>::grad(p), 0, seqlen_q - m0,
                          head_dim, warp_row0, g, t);
}
