// flash_simt_bwd.cu: FlashAttention-2 backward in exact float32 / float64 on CUDA cores.
//
// Three kernels (FA2, arXiv 2307.08691, Algorithm 2; flash-attn's flash_bwd_* kernels):
//   flash_simt_bwd_preprocess_kernel   D = rowsum(dO o O) and the LSE in the kernels' exp base
//                                      (+inf for rows with no visible key, so that P = 0 there).
//   flash_simt_bwd_kv_kernel           one CTA per (key tile of BLOCK_N rows, query head, batch):
//                                      K_j, V_j stay in shared memory, dK_j and dV_j in registers,
//                                      the loop runs over query tiles Q_i of BLOCK_M rows:
//                                        S = Q_i K_j^T, dP = dO_i V_j^T      (layout A)
//                                        P = exp(S c - LSE), dS = P o (dP - D) -> shared memory
//                                        dV += P^T dO_i, dK += dS^T Q_i       (layout B)
//                                        dq_atomic: dQ_i += scale dS K_j by atomicAdd (layout C)
//   flash_simt_bwd_q_kernel            deterministic dQ: one CTA per (query tile, head, batch),
//                                      looping over key tiles (S, dP and dS recomputed), dQ in
//                                      registers, stored once. Used instead of the atomics when
//                                      deterministic=True (bitwise reproducible).
// With GQA each CTA of the KV kernel handles one query head and writes its dK, dV into a
// (batch, seqlen_k, nheads, head_dim) buffer; the Python side sums over the group.
//
// Thread layouts (all from 4 x 8-lane warps; see SimtBwdTraits):
//   A (BLOCK_M x BLOCK_N scores): rows a_row + A_RS i, keys a_key + A_KS j         (mma_nt)
//   B (BLOCK_N x HEAD_DIM dK, dV): key chunks x column chunks of VEC elements     (mma_tn)
//   C (BLOCK_M x HEAD_DIM dQ): rows c_row + C_RS i, column chunks                  (mma_nn)
//
// Versions (numbers in bench/NOTES.md, "fp32/fp64 SIMT kernels"):
//   v1  FA2 structure, single-buffered Q/dO, dQ by atomics or by a second Q-outer kernel.
//   v1.1 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
//   v1.2 P / dS loop split on Mask::partial (no per-element test on unmasked tiles, as before v1.1),
//        the element mask by Mask::visible_rt (bench/NOTES.md, "fp32 / fp64 A/B regression at the SASS level").
#include "flash_simt.cuh"

// How a CTA covers an (R x C) tile of units (rows or 16-byte chunks): warps are a (WR x NWARPS/WR)
// grid, each warp a (LR x 32/LR) grid of lanes, LR a power of 2 in [lr_min, lr_max]. Returns
// LR * 256 + WR for the split that minimises the loads per reduction step,
// cost_r * R / (LR WR) + cost_c * C / (LC WC) (ties: the smallest LR, then WR), or 0 if none divides.
__host__ __device__ constexpr int simt_split(int nwarps, int r, int c, int lr_min, int lr_max, int cost_r, int cost_c) {
    int best = 0, best_cost = 1 << 30;
    for (int lr = lr_min; lr <= lr_max; lr *= 2)
        for (int wr = 1; wr <= nwarps; ++wr) {
            const int lc = 32 / lr, wc = nwarps / wr;
            if (nwarps % wr != 0 || r % (lr * wr) != 0 || c % (lc * wc) != 0) continue;
            const int cost = cost_r * (r / (lr * wr)) + cost_c * (c / (lc * wc));
            if (cost < best_cost) best = lr * 256 + wr, best_cost = cost;
        }
    return best;
}

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_>
struct SimtBwdTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int BLOCK_M = BLOCK_M_;  // query rows per step
    static constexpr int BLOCK_N = BLOCK_N_;  // key rows per CTA (KV kernel) / per step (Q kernel)
    static constexpr int NWARPS = NWARPS_;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int VEC = Simt<T>::VEC;
    static constexpr int PITCH = HEAD_DIM + VEC;       // Q, dO, K, V row pitch
    static constexpr int P_PITCH = BLOCK_N + 2 * VEC;  // P, dS row pitch

    // Layout A: (BLOCK_M, BLOCK_N), lanes 4 rows x 8 keys, warps A_WM x A_WN; per thread A_TM x A_TN.
    static constexpr int A_SPLIT = simt_split(NWARPS, BLOCK_M, BLOCK_N, 4, 4, 1, 1);
    static constexpr int A_WM = A_SPLIT % 256, A_WN = NWARPS / (A_WM ? A_WM : 1);
    static constexpr int A_TM = BLOCK_M / (4 * A_WM), A_TN = BLOCK_N / (8 * A_WN);
    static constexpr int A_RS = 4 * A_WM, A_KS = 8 * A_WN;  // row and key strides between a thread's entries
    // Layout B: (BLOCK_N / VEC key chunks, HEAD_DIM / VEC column chunks), lanes B_LN x B_LD (8 x 4 or
    // 16 x 2), warps B_WN x B_WD; per thread B_GN key chunks x B_GD column chunks.
    static constexpr int B_SPLIT = simt_split(NWARPS, BLOCK_N / VEC, HEAD_DIM / VEC, 8, 16, 1, 1);
    static constexpr int B_LN = B_SPLIT / 256 ? B_SPLIT / 256 : 8, B_LD = 32 / B_LN;
    static constexpr int B_WN = B_SPLIT % 256, B_WD = NWARPS / (B_WN ? B_WN : 1);
    static constexpr int B_GN = BLOCK_N / (B_LN * VEC * (B_WN ? B_WN : 1)), B_GD = HEAD_DIM / (B_LD * VEC * B_WD);
    static constexpr int B_KS = B_LN * VEC * B_WN, B_DS = B_LD * VEC * B_WD;  // element strides between chunks
    // Layout C: (BLOCK_M, HEAD_DIM / VEC column chunks), lanes 4 rows x 8 chunks, warps C_WM x C_WD;
    // per thread C_TM rows x C_GD chunks.
    static constexpr int C_SPLIT = simt_split(NWARPS, BLOCK_M, HEAD_DIM / VEC, 4, 4, 1, VEC);
    static constexpr int C_WM = C_SPLIT % 256, C_WD = NWARPS / (C_WM ? C_WM : 1);
    static constexpr int C_TM = BLOCK_M / (4 * (C_WM ? C_WM : 1)), C_GD = HEAD_DIM / (8 * VEC * C_WD);
    static constexpr int C_RS = 4 * C_WM, C_DS = 8 * VEC * C_WD;

    // Shared memory: K, V (BLOCK_N, PITCH); Q, dO (BLOCK_M, PITCH); P, dS (BLOCK_M, P_PITCH); LSE, D.
    static constexpr int SMEM_ELEMS = 2 * BLOCK_N * PITCH + 2 * BLOCK_M * PITCH + 2 * BLOCK_M * P_PITCH + 2 * BLOCK_M;
    static constexpr int SMEM_BYTES = SMEM_ELEMS * (int)sizeof(T);
    static_assert(A_SPLIT > 0 && B_SPLIT > 0 && C_SPLIT > 0, "no warp grid divides the tiles");
    static_assert(HEAD_DIM % (8 * VEC) == 0 && BLOCK_N % (8 * VEC) == 0 && BLOCK_M % 4 == 0, "tile shapes");
};

// Pointers into the shared-memory carve-up of SimtBwdTraits (both main kernels use it).
template <typename Tr>
struct SimtBwdSmem {
    using T = typename Tr::T;
    T *k, *v, *q, *dout, *p, *ds, *lse, *delta;
    __device__ __forceinline__ explicit SimtBwdSmem(unsigned char* raw) {
        k = reinterpret_cast<T*>(raw);          // (BLOCK_N, PITCH)
        v = k + Tr::BLOCK_N * Tr::PITCH;         // (BLOCK_N, PITCH)
        q = v + Tr::BLOCK_N * Tr::PITCH;         // (BLOCK_M, PITCH)
        dout = q + Tr::BLOCK_M * Tr::PITCH;      // (BLOCK_M, PITCH)
        p = dout + Tr::BLOCK_M * Tr::PITCH;      // (BLOCK_M, P_PITCH)
        ds = p + Tr::BLOCK_M * Tr::P_PITCH;      // (BLOCK_M, P_PITCH)
        lse = ds + Tr::BLOCK_M * Tr::P_PITCH;    // (BLOCK_M,) LSE in the exp base; +inf past seqlen_q
        delta = lse + Tr::BLOCK_M;               // (BLOCK_M,) D; 0 past seqlen_q
    }
};

// Thread coordinates in the three layouts.
template <typename Tr>
struct SimtBwdThread {
    int a_row, a_key;    // layout A: first row and key
    int b_key, b_col;    // layout B: first key and column (elements)
    int c_row, c_col;    // layout C: first row and column (elements)
    __device__ __forceinline__ SimtBwdThread() {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        a_row = (warp / Tr::A_WN) * 4 + lane / 8;
        a_key = (warp % Tr::A_WN) * 8 + lane % 8;
        b_key = ((warp / Tr::B_WD) * Tr::B_LN + lane % Tr::B_LN) * Tr::VEC;
        b_col = ((warp % Tr::B_WD) * Tr::B_LD + lane / Tr::B_LN) * Tr::VEC;
        c_row = (warp / Tr::C_WD) * 4 + lane / 8;
        c_col = ((warp % Tr::C_WD) * 8 + lane % 8) * Tr::VEC;
    }
};

// LSE and D of query rows [m0, m0 + BLOCK_M) into shared memory (+inf and 0 past seqlen_q).
// __ldg here and in the other global reads of the record's tensors: the read-only path (ld.global.nc),
// which the __restrict__ kernel arguments gave before the AttnParams record.
template <typename Tr>
__device__ __forceinline__ void load_row_stats(const SimtBwdSmem<Tr>& s, const typename Tr::T* lse_row,
                                               const typename Tr::T* delta_row, int rows_valid) {
    using T = typename Tr::T;
    for (int t = threadIdx.x; t < Tr::BLOCK_M; t += Tr::NTHREADS) {
        const bool ok = t < rows_valid;
        sts(s.lse + t, ok ? __ldg(lse_row + t) : Simt<T>::inf());
        sts(s.delta + t, ok ? __ldg(delta_row + t) : T(0));
    }
}

// P = exp(S c - LSE) and dS = P o (dP - D) of one tile into shared memory, from S and dP in registers.
// MASKED: the tile is partial (flash_mask.cuh); an unmasked tile compiles without the per-element
// test, as the kernels before the mask layer did (the compiler split that loop on their need_mask).
template <typename Tr, bool STORE_P, int FEAT, bool MASKED>
__device__ __forceinline__ void p_ds_to_smem(const SimtBwdSmem<Tr>& s, const SimtBwdThread<Tr>& t, const AttnParams& p,
                                             const Mask& mask, int batch, int head, int m0, int n0,
                                             typename Tr::T scale_exp,
                                             const typename Tr::T (&acc_s)[Tr::A_TM][Tr::A_TN],
                                             const typename Tr::T (&acc_dp)[Tr::A_TM][Tr::A_TN]) {
    using T = typename Tr::T;
    constexpr int TM = Tr::A_TM, TN = Tr::A_TN, RS = Tr::A_RS, KS = Tr::A_KS, P_PITCH = Tr::P_PITCH;
    using Mod = ScoreMod<FEAT, T>;
    [[maybe_unused]] const Mod mod(p, batch, head);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int r = t.a_row + RS * i;
        const T lse = lds(s.lse + r), delta = lds(s.delta + r);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int c = t.a_key + KS * j;
            T score = acc_s[i][j], dmod = T(1);
            if constexpr (Mod::ACTIVE) dmod = mod.apply_grad(score, m0 + r, n0 + c);
            T pr = Simt<T>::exp_base(fmadd(score, scale_exp, -lse));
            // select, not multiply: a masked score may overflow exp (its row's LSE excludes it)
            if (MASKED && !mask.visible_rt(m0 + r, n0 + c)) pr = T(0);
            if (STORE_P) sts(s.p + r * P_PITCH + c, pr);
            T ds = pr * (acc_dp[i][j] - delta);
            if constexpr (Mod::ACTIVE) ds *= dmod;
            sts(s.ds + r * P_PITCH + c, ds);
        }
    }
}

// P and dS of one (query tile m0, key tile n0) pair into shared memory, from Q, dO, K, V, LSE, D
// already there: S = Q K^T, dP = dO V^T, P = exp(S c - LSE) (0 where masked), dS = P o (dP - D)
// (times the score modifier's derivative when there is one).
template <typename Tr, bool STORE_P, int FEAT>
__device__ __forceinline__ void scores_to_smem(const SimtBwdSmem<Tr>& s, const SimtBwdThread<Tr>& t,
                                               const AttnParams& p, const Mask& mask, int batch, int head, int m0,
                                               int n0, typename Tr::T scale_exp) {
    using T = typename Tr::T;
    constexpr int TM = Tr::A_TM, TN = Tr::A_TN, RS = Tr::A_RS, KS = Tr::A_KS;
    constexpr int PITCH = Tr::PITCH;
    T acc_s[TM][TN], acc_dp[TM][TN];
    zero(acc_s);
    mma_nt<T, TM, TN, Tr::HEAD_DIM, PITCH, PITCH, RS, KS>(acc_s, s.q + t.a_row * PITCH, s.k + t.a_key * PITCH);
    zero(acc_dp);
    mma_nt<T, TM, TN, Tr::HEAD_DIM, PITCH, PITCH, RS, KS>(acc_dp, s.dout + t.a_row * PITCH, s.v + t.a_key * PITCH);
    if (mask.partial(m0, Tr::BLOCK_M, n0, Tr::BLOCK_N))
        p_ds_to_smem<Tr, STORE_P, FEAT, true>(s, t, p, mask, batch, head, m0, n0, scale_exp, acc_s, acc_dp);
    else
        p_ds_to_smem<Tr, STORE_P, FEAT, false>(s, t, p, mask, batch, head, m0, n0, scale_exp, acc_s, acc_dp);
}

// p.q, p.dout: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim);
// p.dq: (batch, seqlen_q, nheads, head_dim), zero-filled, accumulated with atomicAdd (p.dq_atomic);
// p.dk, p.dv: (batch, seqlen_k, nheads, head_dim), this query head's part (summed over GQA groups by
// the caller). p.lse_exp, p.delta: (batch, nheads, seqlen_q) (preprocess kernel). All of T; rows
// 16-byte aligned; head_dim a multiple of 8. p.mask.causal and p.dq_atomic are read at run time
// (uniform branches; half the specializations).
template <typename Tr, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)  // 1: without it ptxas may cap registers low and spill
flash_simt_bwd_kv_kernel(const __grid_constant__ AttnParams p) {
    using T = typename Tr::T;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, VEC = Tr::VEC;
    constexpr int PITCH = Tr::PITCH, P_PITCH = Tr::P_PITCH, NTHREADS = Tr::NTHREADS;
    constexpr int GN = Tr::B_GN, GD = Tr::B_GD;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const SimtBwdSmem<Tr> s(smem_raw);
    const SimtBwdThread<Tr> t;

    const int n_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int n0 = n_block * BLOCK_N;
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, do_row_stride = p.dout.row_stride, dq_row_stride = p.dq.row_stride;
    const T scale_exp = ScaleOf<T>::exp_scale(p), grad_scale = ScaleOf<T>::grad(p);

    const T* q_head = p.q.ptr<const T>(batch, head);
    const T* do_head = p.dout.ptr<const T>(batch, head);
    const T* lse_head = static_cast<const T*>(p.lse_exp) + stats_index(p, batch, head, 0);
    const T* delta_head = static_cast<const T*>(p.delta) + stats_index(p, batch, head, 0);
    T* dq_head = p.dq.ptr<T>(batch, head);

    load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s.k, p.k.ptr<const T>(batch, head_k, n0), p.k.row_stride,
                                                          seqlen_k - n0, head_dim);
    load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s.v, p.v.ptr<const T>(batch, head_k, n0), p.v.row_stride,
                                                          seqlen_k - n0, head_dim);

    // Query tiles m_begin .. m_end - 1 hold every row that sees a key of this tile (causal: every key
    // inside seqlen_k is visible to the last query row; a left window can leave the loop empty). The
    // mask is built after the K, V loads, as in flash_dmma_bwd.cu (8 registers fewer at hd192 than built
    // first).
    const Mask mask = make_mask<FEAT>(p, p.mask.causal != 0);

    int m_begin, m_end;
    mask.query_tiles<BLOCK_M>(n0, BLOCK_N, m_begin, m_end);
    if (m_begin >= m_end) cp_async_drain();  // no row sees this key tile (a left window)

    T acc_dk[GN * VEC][GD * VEC], acc_dv[GN * VEC][GD * VEC];  // (keys, columns) of layout B
    zero(acc_dk);
    zero(acc_dv);

    for (int mb = m_begin; mb < m_end; ++mb) {
        const int m0 = mb * BLOCK_M;
        load_tile_simt<T, BLOCK_M, HEAD_DIM, PITCH, NTHREADS>(s.q, q_head + m0 * q_row_stride, q_row_stride,
                                                              seqlen_q - m0, head_dim);
        load_tile_simt<T, BLOCK_M, HEAD_DIM, PITCH, NTHREADS>(s.dout, do_head + m0 * do_row_stride, do_row_stride,
                                                              seqlen_q - m0, head_dim);
        cp_async_commit();
        load_row_stats<Tr>(s, lse_head + m0, delta_head + m0, seqlen_q - m0);
        cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i, LSE, D (and K_j, V_j) are in shared memory

        scores_to_smem<Tr, true, FEAT>(s, t, p, mask, batch, head, m0, n0, scale_exp);
        __syncthreads();  // P and dS are in shared memory

        // dV += P^T dO_i, dK += dS^T Q_i: reduction over the BLOCK_M query rows
        mma_tn<T, GN, GD, BLOCK_M, P_PITCH, PITCH, Tr::B_KS, Tr::B_DS>(acc_dv, s.p + t.b_key, s.dout + t.b_col);
        mma_tn<T, GN, GD, BLOCK_M, P_PITCH, PITCH, Tr::B_KS, Tr::B_DS>(acc_dk, s.ds + t.b_key, s.q + t.b_col);

        if (p.dq_atomic) {
            // dQ_i += scale dS K_j: (C_TM, C_GD * VEC) per thread, added to global memory
            constexpr int TM = Tr::C_TM, TG = Tr::C_GD;
            T acc_dq[TM][TG * VEC];
            zero(acc_dq);
            mma_nn<T, TM, TG, BLOCK_N, P_PITCH, PITCH, Tr::C_RS, Tr::C_DS>(acc_dq, s.ds + t.c_row * P_PITCH,
                                                                            s.k + t.c_col);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const int row = m0 + t.c_row + Tr::C_RS * i;
                if (row >= seqlen_q) continue;
#pragma unroll
                for (int g = 0; g < TG; ++g) {
                    const int col = t.c_col + Tr::C_DS * g;
                    if (col >= head_dim) continue;
#pragma unroll
                    for (int f = 0; f < VEC; ++f)
                        atomicAdd(dq_head + row * dq_row_stride + col + f, acc_dq[i][g * VEC + f] * grad_scale);
                }
            }
        }
        __syncthreads();  // every warp is done with Q_i, dO_i, P, dS before the next tile overwrites them
    }

    // dK = scale dS^T Q; rows past seqlen_k and columns past head_dim are not stored.
    T* dk_tile = p.dk.ptr<T>(batch, head, n0);
    T* dv_tile = p.dv.ptr<T>(batch, head, n0);
    const i64 dk_row_stride = p.dk.row_stride, dv_row_stride = p.dv.row_stride;
#pragma unroll
    for (int g = 0; g < GN; ++g)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const int key = t.b_key + Tr::B_KS * g + e;
            if (n0 + key >= seqlen_k) continue;
#pragma unroll
            for (int h = 0; h < GD; ++h) {
                const int col = t.b_col + Tr::B_DS * h;
                if (col >= head_dim) continue;
                Chunk<T> ck, cv;
#pragma unroll
                for (int f = 0; f < VEC; ++f) {
                    ck.e[f] = acc_dk[g * VEC + e][h * VEC + f] * grad_scale;
                    cv.e[f] = acc_dv[g * VEC + e][h * VEC + f];
                }
                *reinterpret_cast<Chunk<T>*>(dk_tile + key * dk_row_stride + col) = ck;
                *reinterpret_cast<Chunk<T>*>(dv_tile + key * dv_row_stride + col) = cv;
            }
        }
}

// Deterministic dQ: one CTA per (query tile, head, batch), looping over the key tiles.
// p.dq: (batch, seqlen_q, nheads, head_dim), fully written (rows < seqlen_q, columns < head_dim).
template <typename Tr, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)  // 1: without it ptxas may cap registers low and spill
flash_simt_bwd_q_kernel(const __grid_constant__ AttnParams p) {
    using T = typename Tr::T;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, VEC = Tr::VEC;
    constexpr int PITCH = Tr::PITCH, P_PITCH = Tr::P_PITCH, NTHREADS = Tr::NTHREADS;
    constexpr int TM = Tr::C_TM, TG = Tr::C_GD;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    const SimtBwdSmem<Tr> s(smem_raw);
    const SimtBwdThread<Tr> t;

    const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
    const T scale_exp = ScaleOf<T>::exp_scale(p);
    const Mask mask = make_mask<FEAT>(p, p.mask.causal != 0);

    const T* k_head = p.k.ptr<const T>(batch, head_k);
    const T* v_head = p.v.ptr<const T>(batch, head_k);

    // Key tiles n_begin + j BLOCK_N, j < n_blocks, hold every key some row of this tile sees.
    int n_begin, n_blocks;
    mask.key_tiles<BLOCK_N>(m0, BLOCK_M, n_begin, n_blocks);

    if (n_blocks > 0) {  // committed and waited for with the first K, V tiles
        load_tile_simt<T, BLOCK_M, HEAD_DIM, PITCH, NTHREADS>(s.q, p.q.ptr<const T>(batch, head, m0), p.q.row_stride,
                                                              seqlen_q - m0, head_dim);
        load_tile_simt<T, BLOCK_M, HEAD_DIM, PITCH, NTHREADS>(s.dout, p.dout.ptr<const T>(batch, head, m0),
                                                              p.dout.row_stride, seqlen_q - m0, head_dim);
        load_row_stats<Tr>(s, static_cast<const T*>(p.lse_exp) + stats_index(p, batch, head, m0),
                           static_cast<const T*>(p.delta) + stats_index(p, batch, head, m0), seqlen_q - m0);
    }

    T acc_dq[TM][TG * VEC];
    zero(acc_dq);
    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = n_begin + j * BLOCK_N;
        load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s.k, k_head + n0 * k_row_stride, k_row_stride,
                                                              seqlen_k - n0, head_dim);
        load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s.v, v_head + n0 * v_row_stride, v_row_stride,
                                                              seqlen_k - n0, head_dim);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();  // K_j, V_j (and Q, dO, LSE, D) are in shared memory

        scores_to_smem<Tr, false, FEAT>(s, t, p, mask, batch, head, m0, n0, scale_exp);
        __syncthreads();  // dS is in shared memory

        mma_nn<T, TM, TG, BLOCK_N, P_PITCH, PITCH, Tr::C_RS, Tr::C_DS>(acc_dq, s.ds + t.c_row * P_PITCH,
                                                                        s.k + t.c_col);
        __syncthreads();  // every warp is done with K_j, V_j, dS before the next tile overwrites them
    }

    T* dq_tile = p.dq.ptr<T>(batch, head, m0);
    const i64 dq_row_stride = p.dq.row_stride;
    const T grad_scale = ScaleOf<T>::grad(p);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = t.c_row + Tr::C_RS * i;
        if (m0 + row >= seqlen_q) continue;
#pragma unroll
        for (int g = 0; g < TG; ++g) {
            const int col = t.c_col + Tr::C_DS * g;
            if (col >= head_dim) continue;
            Chunk<T> c;
#pragma unroll
            for (int f = 0; f < VEC; ++f) c.e[f] = acc_dq[i][g * VEC + f] * grad_scale;
            *reinterpret_cast<Chunk<T>*>(dq_tile + row * dq_row_stride + col) = c;
        }
    }
}

// D = rowsum(dO o O) and LSE in the kernels' exp base (lse * log_base; +inf for -inf, so that
// P = exp(S c - LSE) = 0 on rows with no visible key). One warp per (query row, head, batch).
// p.dout, p.out: (batch, seqlen_q, nheads, head_dim); p.lse, p.lse_exp, p.delta: (batch, nheads,
// seqlen_q); all of T.
template <typename T>
__global__ void __launch_bounds__(128)
flash_simt_bwd_preprocess_kernel(const __grid_constant__ AttnParams p) {
    const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int head = blockIdx.y, batch = blockIdx.z;
    if (row >= p.seqlen_q) return;  // the whole warp
    const T* do_row = p.dout.ptr<const T>(batch, head, row);
    const T* o_row = p.out.ptr<const T>(batch, head, row);
    T sum = T(0);
    for (int d = lane; d < p.head_dim; d += 32) sum = fmadd(__ldg(do_row + d), __ldg(o_row + d), sum);
#pragma unroll
    for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    if (lane == 0) {
        const i64 idx = stats_index(p, batch, head, row);
        const T l = __ldg(static_cast<const T*>(p.lse) + idx);

        static_cast<T*>(p.delta)[idx] = sum;
        static_cast<T*>(p.lse_exp)[idx] = l == -Simt<T>::inf() ? Simt<T>::inf() : l * Simt<T>::log_base();
    }
}
