// flash_bwd.cu: FlashAttention-2 backward on tensor cores (mma.sync m16n8k16), fp16 / bf16.
//
// Three steps (FA2, arXiv 2307.08691, Algorithm 2; FA, arXiv 2205.14135, Algorithm 4):
//   flash_bwd_preprocess_kernel   D = rowsum(dO o O), float32 (batch, nheads, seqlen_q)
//   flash_bwd_kernel              one CTA per (key block, head, batch): K_j, V_j stay on chip, dK_j and
//                                 dV_j accumulate in registers while the CTA walks the query blocks;
//                                 dQ_i += dS K_j goes to a float32 buffer with atomics (WRITE_DQ)
//   flash_bwd_dq_kernel           deterministic dQ: one CTA per query block walks the key blocks and
//                                 keeps dQ in registers (recomputes S and dP; no atomics)
//   flash_bwd_convert_kernel      dQ (and GQA dK, dV: summed over the group) float32 -> fp16/bf16
// P is recomputed from the forward's LSE; nothing of size seqlen_q x seqlen_k is stored.
//
// Layout trick of flash_bwd_kernel: each warp owns 16 keys and computes S^T = K Q^T and
// dP^T = V dO^T (rows = keys), so P^T and dS^T are already the A operand of dV += P^T dO and
// dK += dS^T Q. dS^T goes through shared memory once, for dQ = dS K.
// Head dims above 128 split the output columns over D_SPLIT CTAs (S and dP are recomputed by each)
// so the dK, dV accumulators stay in registers.
//
// Versions (numbers in bench/NOTES.md):
//   v1  the above; Q_i, dO_i double-buffered with cp.async; K_j, V_j read from shared memory.
//   v1.1 fused dropout: the forward's keep-mask regenerated from (seed, offset) with Philox.
//   v1.2 block-sparse: query tiles (main kernel) / key tiles (dQ kernel) from the block mask's lists.
//   v1.3 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
#include "flash_common.cuh"

template <typename Elem_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int D_SPLIT_>
struct BwdTraits {
    using Elem = Elem_;
    static constexpr int HEAD_DIM = HEAD_DIM_;
    static constexpr int BLOCK_M = BLOCK_M_;  // query rows per step of the inner loop
    static constexpr int BLOCK_N = BLOCK_N_;  // keys per CTA: 16 per warp
    static constexpr int D_SPLIT = D_SPLIT_;  // CTAs that share a key block, each D_OUT output columns
    static constexpr int D_OUT = HEAD_DIM / D_SPLIT;
    static constexpr int NWARPS = BLOCK_N / 16;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int MQ = BLOCK_M / 8;  // n8 tiles (queries) of S^T per warp
    static constexpr int PITCH = SmemRow<HEAD_DIM>::PITCH;
    static constexpr int DS_PITCH = BLOCK_M + 8;  // dS^T rows, padded as the other tiles
    // dQ = dS K (BLOCK_M x D_OUT) is spread over a WARPS_M x WARPS_N grid of warps.
    static constexpr int WARPS_M = (BLOCK_M / 16) < NWARPS ? (BLOCK_M / 16) : NWARPS;
    static constexpr int WARPS_N = NWARPS / WARPS_M;
    static constexpr int DQ_MT = BLOCK_M / 16 / WARPS_M;
    static constexpr int DQ_NT = D_OUT / 8 / WARPS_N;
    static constexpr int SMEM_BYTES =
        (2 * BLOCK_N * PITCH + 4 * BLOCK_M * PITCH + BLOCK_N * DS_PITCH) * 2 + 4 * BLOCK_M * 4;
    static_assert(BLOCK_N % 16 == 0 && BLOCK_M % 16 == 0 && HEAD_DIM % (16 * D_SPLIT) == 0, "tiles");
    static_assert(NWARPS % WARPS_M == 0 && DQ_NT * WARPS_N * 8 == D_OUT, "dQ warp grid");
};

// D = rowsum(dO o O): one warp per row (rowsum_dout_out). p.delta: (batch, nheads, seqlen_q).
template <typename Elem>
__global__ void __launch_bounds__(128)
flash_bwd_preprocess_kernel(const __grid_constant__ AttnParams p) {
    const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int head = blockIdx.y, batch = blockIdx.z;
    if (row >= p.seqlen_q) return;
    const float sum = rowsum_dout_out<Elem>(p, batch, head, row, lane);
    if (lane == 0) static_cast<float*>(p.delta)[stats_index(p, batch, head, row)] = sum;
}

// Per-row softmax statistics of a query block, staged in shared memory: lse * log2(e) (+inf for rows
// past seqlen_q or with no visible key, so that P = 2^(S c - lse_log2) = 0 there) and D.
__device__ __forceinline__ void load_row_stats(float* s_lse_log2, float* s_delta, const float* lse,
                                               const float* delta, int rows, int rows_valid) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const float l = r < rows_valid ? lse[r] : -FC_INF;
        s_lse_log2[r] = l == -FC_INF ? FC_INF : l * FC_LOG2E;
        s_delta[r] = r < rows_valid ? delta[r] : 0.f;
    }
}

// p.q, p.dout: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim);
// p.lse, p.delta: (batch, nheads, seqlen_q) float32; p.dq_accum: (batch, seqlen_q, nheads, head_dim)
// float32, zeroed (unscaled dS K is added); p.dk, p.dv: (batch, seqlen_k, nheads, head_dim) rows, written
// as Elem (p.dkv_fp32 == 0) or float32 (GQA: summed over the group afterwards). dk is scaled here.
template <typename Tr, bool CAUSAL, bool WRITE_DQ, bool DROPOUT, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)  // 1: without it ptxas may cap registers low and spill
flash_bwd_kernel(const __grid_constant__ AttnParams p) {
    using Elem = typename Tr::Elem;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, D_OUT = Tr::D_OUT;
    constexpr int MQ = Tr::MQ, PITCH = Tr::PITCH, DS_PITCH = Tr::DS_PITCH, NTHREADS = Tr::NTHREADS;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* s_k = reinterpret_cast<u16*>(smem_raw);  // (BLOCK_N, PITCH)
    u16* s_v = s_k + BLOCK_N * PITCH;              // (BLOCK_N, PITCH)
    u16* s_q = s_v + BLOCK_N * PITCH;              // 2 x (BLOCK_M, PITCH), double-buffered
    u16* s_do = s_q + 2 * BLOCK_M * PITCH;         // 2 x (BLOCK_M, PITCH)
    u16* s_ds = s_do + 2 * BLOCK_M * PITCH;        // (BLOCK_N, DS_PITCH): dS^T of the current step
    float* s_lse = reinterpret_cast<float*>(s_ds + BLOCK_N * DS_PITCH);  // 2 x BLOCK_M, lse * log2(e)
    float* s_delta = s_lse + 2 * BLOCK_M;                                // 2 x BLOCK_M

    const int n_block = blockIdx.x / Tr::D_SPLIT, d_base = (blockIdx.x % Tr::D_SPLIT) * D_OUT;
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int n0 = n_block * BLOCK_N;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, do_row_stride = p.dout.row_stride;
    const float softmax_scale_log2 = p.scale_log2_f;
    const int nheads = p.nheads, dkv_fp32 = p.dkv_fp32;
    const float grad_scale = p.grad_scale_f;
    const DropoutParams dropout = p.dropout;  // p read at entry only (see flash_fwd_kernel)
    void* const dk = p.dk.data;
    void* const dv = p.dv.data;
    const Mask mask = make_mask<FEAT>(p, CAUSAL);
    using Mod = ScoreMod<FEAT, float, true>;
    [[maybe_unused]] const Mod mod(p, batch, head);

    const u16* __restrict__ q_head = p.q.ptr<const u16>(batch, head);
    const u16* __restrict__ do_head = p.dout.ptr<const u16>(batch, head);
    const float* __restrict__ lse_head = static_cast<const float*>(p.lse) + stats_index(p, batch, head, 0);
    const float* __restrict__ delta_head = static_cast<const float*>(p.delta) + stats_index(p, batch, head, 0);
    float* __restrict__ dq_accum = p.dq_accum;

    // Query tiles that see any key of this block, or only those of the active query blocks of this
    // key block's block-mask column.
    TileWalk<BLOCK_M> rows(mask.query_end(n0 + BLOCK_N - 1), p.mask.q_list, batch, head, n0);
    int m0 = rows.first(mask.query_begin(n0));

    float acc_dv[D_OUT / 8][4], acc_dk[D_OUT / 8][4];  // (16 keys, D_OUT) per warp
#pragma unroll
    for (int t = 0; t < D_OUT / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dv[t][e] = 0.f, acc_dk[t][e] = 0.f;

    if (m0 >= 0) {
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, p.k.ptr<const u16>(batch, head_k, n0), p.k.row_stride,
                                                     seqlen_k - n0, head_dim);
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, p.v.ptr<const u16>(batch, head_k, n0), p.v.row_stride,
                                                     seqlen_k - n0, head_dim);
        load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, q_head + m0 * q_row_stride, q_row_stride, seqlen_q - m0, head_dim);
        load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_do, do_head + m0 * do_row_stride, do_row_stride, seqlen_q - m0, head_dim);
        cp_async_commit();
        load_row_stats(s_lse, s_delta, lse_head + m0, delta_head + m0, BLOCK_M, seqlen_q - m0);
    }

    // ldmatrix lane addressing (element offsets within a tile):
    //  A from row-major rows (K, V of this warp):        row lane % 16, column (lane / 16) * 8
    //  B, two n8 tiles x k16, from row-major rows (Q, dO): row (lane / 16) * 8 + lane % 8, column ((lane / 8) % 2) * 8
    //  B, k16 x two n8 tiles, transposed (dO, Q, K):      row ((lane / 8) % 2) * 8 + lane % 8, column (lane / 16) * 8
    //  A, transposed from dS^T (rows keys, cols queries): row (lane / 16) * 8 + lane % 8, column ((lane / 8) % 2) * 8
    const int a_off = (warp * 16 + lane % 16) * PITCH + (lane / 16) * 8;
    const int b_off = ((lane / 16) * 8 + lane % 8) * PITCH + ((lane / 8) % 2) * 8;
    const int bt_off = (((lane / 8) % 2) * 8 + lane % 8) * PITCH + (lane / 16) * 8;
    const u32 k_a = smem_u32(s_k) + a_off * 2, v_a = smem_u32(s_v) + a_off * 2;

    for (int step = 0; m0 >= 0; ++step) {
        const int buf = step & 1, m_next = rows.next();
        cp_async_wait<0>();
        __syncthreads();  // Q_i, dO_i, stats landed; every warp is done with step i-1 (dS^T, other buffer)
        if (m_next >= 0) {
            const int m1 = m_next, nb = buf ^ 1;
            load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_q + nb * BLOCK_M * PITCH, q_head + m1 * q_row_stride,
                                                         q_row_stride, seqlen_q - m1, head_dim);
            load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_do + nb * BLOCK_M * PITCH, do_head + m1 * do_row_stride,
                                                         do_row_stride, seqlen_q - m1, head_dim);
            cp_async_commit();
            load_row_stats(s_lse + nb * BLOCK_M, s_delta + nb * BLOCK_M, lse_head + m1, delta_head + m1, BLOCK_M,
                           seqlen_q - m1);
        }
        const u32 q_base = smem_u32(s_q + buf * BLOCK_M * PITCH), do_base = smem_u32(s_do + buf * BLOCK_M * PITCH);
        const float* lse_log2 = s_lse + buf * BLOCK_M;
        const float* dlt = s_delta + buf * BLOCK_M;

        // S^T = K_w Q_i^T and dP^T = V_w dO_i^T: (16 keys, BLOCK_M queries) per warp.
        float acc_s[MQ][4], acc_dp[MQ][4];
#pragma unroll
        for (int t = 0; t < MQ; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[t][e] = 0.f, acc_dp[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            u32 ak[4], av[4];
            ldmatrix_x4(ak, k_a + kk * 32);
            ldmatrix_x4(av, v_a + kk * 32);
#pragma unroll
            for (int np = 0; np < MQ / 2; ++np) {
                u32 b[4];
                ldmatrix_x4(b, q_base + (b_off + np * 16 * PITCH + kk * 16) * 2);
                Elem::mma(acc_s[2 * np], ak, b[0], b[1]);
                Elem::mma(acc_s[2 * np + 1], ak, b[2], b[3]);
                ldmatrix_x4(b, do_base + (b_off + np * 16 * PITCH + kk * 16) * 2);
                Elem::mma(acc_dp[2 * np], av, b[0], b[1]);
                Elem::mma(acc_dp[2 * np + 1], av, b[2], b[3]);
            }
        }

        // P^T = 2^(S^T c - lse_log2[query]) (0 where masked); dS^T = P^T o (dP^T - D[query]).
        // With dropout (Z = keep / (1 - p)): dV uses P^T o Z, and dS^T = P^T o (dP^T o Z - D).
        // Keys past seqlen_k need no mask here: K, V rows there are zero-filled and reach only their own
        // rows of dK, dV, which are not stored, and dQ through dS K, where their dS is zeroed first (a
        // row's P = 2^(0 - lse_log2) there overflows when its LSE is very negative, ALiBi over few keys,
        // and inf * 0 = NaN: the H200 fuzz campaign of 2026-12-04).
        // The score modifier; softcap's dS factor 1 - tanh^2 kept per element (dmod) until dS is formed.
        [[maybe_unused]] float dmod[Mod::SOFTCAP ? MQ : 1][4];
        if constexpr (Mod::ACTIVE) {
#pragma unroll
            for (int t = 0; t < MQ; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float g = mod.apply_grad(acc_s[t][e], m0 + t * 8 + (lane % 4) * 2 + (e % 2),
                                                   n0 + warp * 16 + lane / 4 + (e / 2) * 8);
                    if constexpr (Mod::SOFTCAP) dmod[t][e] = g;
                }
        }
        const bool need_mask = mask.partial<false>(m0, BLOCK_M, n0, BLOCK_N);
#pragma unroll
        for (int t = 0; t < MQ; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = t * 8 + (lane % 4) * 2 + (e % 2);  // query within the block
                const int kj = n0 + warp * 16 + lane / 4 + (e / 2) * 8;
                float pr = fast_exp2(fmaf(acc_s[t][e], softmax_scale_log2, -lse_log2[qi]));
                if (need_mask && !mask.visible<false>(m0 + qi, kj)) pr = 0.f;
                acc_s[t][e] = pr;
            }
        if constexpr (DROPOUT) {
            // This thread holds keys {g, g + 8} x queries {2t, 2t+1} of each query n8 tile: rows
            // (queries) 2t + e2 and 2t + e2 + 8 of a 16-query block share one Philox call.
            const u32 bh = (u32)batch * (u32)nheads + (u32)head;  // mod 2^32, as flashcupy/dropout.py
#pragma unroll
            for (int q2 = 0; q2 < MQ / 2; ++q2)
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    u32 r[4];
                    dropout_words(r, dropout, bh, m0 + q2 * 16, (lane % 4) * 2 + e2, n0 + warp * 16, (lane / 8) % 4);
#pragma unroll
                    for (int th = 0; th < 2; ++th)
#pragma unroll
                        for (int kh = 0; kh < 2; ++kh) {
                            const int t = 2 * q2 + th, e = e2 + 2 * kh;
                            const bool keep = dropout_keep(r, th, kh, (lane / 4) % 2, dropout.keep_threshold);
                            const int qi = t * 8 + (lane % 4) * 2 + e2;
                            acc_dp[t][e] = acc_s[t][e] * ((keep ? acc_dp[t][e] * dropout.scale : 0.f) - dlt[qi]);
                            if constexpr (Mod::SOFTCAP) acc_dp[t][e] *= dmod[t][e];
                            if (!keep) acc_s[t][e] = 0.f;
                        }
                }
        } else {
#pragma unroll
            for (int t = 0; t < MQ; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc_dp[t][e] = acc_s[t][e] * (acc_dp[t][e] - dlt[t * 8 + (lane % 4) * 2 + (e % 2)]);
                    if constexpr (Mod::SOFTCAP) acc_dp[t][e] *= dmod[t][e];
                }
        }

        // dV += P^T dO_i, dK += dS^T Q_i: A from registers (two n8 tiles of S^T = one k16 step),
        // B = rows of dO_i / Q_i transposed, this CTA's D_OUT columns.
#pragma unroll
        for (int kq = 0; kq < BLOCK_M / 16; ++kq) {
            u32 ap[4], ad[4];
            ap[0] = Elem::pack2(acc_s[2 * kq][0], acc_s[2 * kq][1]);
            ap[1] = Elem::pack2(acc_s[2 * kq][2], acc_s[2 * kq][3]);
            ap[2] = Elem::pack2(acc_s[2 * kq + 1][0], acc_s[2 * kq + 1][1]);
            ap[3] = Elem::pack2(acc_s[2 * kq + 1][2], acc_s[2 * kq + 1][3]);
            ad[0] = Elem::pack2(acc_dp[2 * kq][0], acc_dp[2 * kq][1]);
            ad[1] = Elem::pack2(acc_dp[2 * kq][2], acc_dp[2 * kq][3]);
            ad[2] = Elem::pack2(acc_dp[2 * kq + 1][0], acc_dp[2 * kq + 1][1]);
            ad[3] = Elem::pack2(acc_dp[2 * kq + 1][2], acc_dp[2 * kq + 1][3]);
            if (WRITE_DQ) {  // stage dS^T (keys x queries) for dQ = dS K, 0 on keys past seqlen_k
                const int row = warp * 16 + lane / 4, col = kq * 16 + (lane % 4) * 2;
                if (n0 + row >= seqlen_k) ad[0] = ad[2] = 0u;
                if (n0 + row + 8 >= seqlen_k) ad[1] = ad[3] = 0u;
                *reinterpret_cast<u32*>(&s_ds[row * DS_PITCH + col]) = ad[0];
                *reinterpret_cast<u32*>(&s_ds[(row + 8) * DS_PITCH + col]) = ad[1];
                *reinterpret_cast<u32*>(&s_ds[row * DS_PITCH + col + 8]) = ad[2];
                *reinterpret_cast<u32*>(&s_ds[(row + 8) * DS_PITCH + col + 8]) = ad[3];
            }
#pragma unroll
            for (int dp = 0; dp < D_OUT / 16; ++dp) {
                u32 b[4];
                ldmatrix_x4_trans(b, do_base + (bt_off + kq * 16 * PITCH + d_base + dp * 16) * 2);
                Elem::mma(acc_dv[2 * dp], ap, b[0], b[1]);
                Elem::mma(acc_dv[2 * dp + 1], ap, b[2], b[3]);
                ldmatrix_x4_trans(b, q_base + (bt_off + kq * 16 * PITCH + d_base + dp * 16) * 2);
                Elem::mma(acc_dk[2 * dp], ad, b[0], b[1]);
                Elem::mma(acc_dk[2 * dp + 1], ad, b[2], b[3]);
            }
        }

        if (WRITE_DQ) {
            __syncthreads();  // dS^T of every warp is in shared memory
            // dQ_i (BLOCK_M x D_OUT) += dS K_j: warp (wm, wn) of a WARPS_M x WARPS_N grid.
            const int wm = warp % Tr::WARPS_M, wn = warp / Tr::WARPS_M;
            float acc_dq[Tr::DQ_MT][Tr::DQ_NT][4];
#pragma unroll
            for (int mt = 0; mt < Tr::DQ_MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < Tr::DQ_NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_dq[mt][nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                u32 a[Tr::DQ_MT][4];
#pragma unroll
                for (int mt = 0; mt < Tr::DQ_MT; ++mt) {
                    const int qrow = (wm * Tr::DQ_MT + mt) * 16;
                    ldmatrix_x4_trans(a[mt], smem_u32(s_ds) + ((kk * 16 + (lane / 16) * 8 + lane % 8) * DS_PITCH +
                                                               qrow + ((lane / 8) % 2) * 8) * 2);
                }
#pragma unroll
                for (int np = 0; np < Tr::DQ_NT / 2; ++np) {
                    u32 b[4];
                    const int col = d_base + (wn * Tr::DQ_NT + 2 * np) * 8;
                    ldmatrix_x4_trans(b, smem_u32(s_k) + (bt_off + kk * 16 * PITCH + col) * 2);
#pragma unroll
                    for (int mt = 0; mt < Tr::DQ_MT; ++mt) {
                        Elem::mma(acc_dq[mt][2 * np], a[mt], b[0], b[1]);
                        Elem::mma(acc_dq[mt][2 * np + 1], a[mt], b[2], b[3]);
                    }
                }
                if constexpr (Tr::DQ_NT % 2 == 1) {  // an odd last n8 tile (D_OUT = 112): half an x4
                    u32 b[2];
                    const int col = d_base + (wn * Tr::DQ_NT + Tr::DQ_NT - 1) * 8;
                    ldmatrix_x2_trans(b, smem_u32(s_k) + (bt_off + kk * 16 * PITCH + col) * 2);
#pragma unroll
                    for (int mt = 0; mt < Tr::DQ_MT; ++mt) Elem::mma(acc_dq[mt][Tr::DQ_NT - 1], a[mt], b[0], b[1]);
                }
            }
#pragma unroll
            for (int mt = 0; mt < Tr::DQ_MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < Tr::DQ_NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = m0 + (wm * Tr::DQ_MT + mt) * 16 + lane / 4 + (e / 2) * 8;
                        const int col = d_base + (wn * Tr::DQ_NT + nt) * 8 + (lane % 4) * 2 + (e % 2);
                        if (row < seqlen_q && col < head_dim)
                            atomicAdd(&dq_accum[(((i64)batch * seqlen_q + row) * nheads + head) * head_dim + col],
                                      acc_dq[mt][nt][e]);
                    }
        }
        m0 = m_next;
    }

    // dK = grad_scale * dS^T Q, dV = P^T dO: rows n0 + warp*16 + lane/4 (+8), this CTA's columns.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + warp * 16 + lane / 4 + r * 8;
        if (key >= seqlen_k) continue;
        const i64 base = (((i64)batch * seqlen_k + key) * nheads + head) * head_dim;
#pragma unroll
        for (int t = 0; t < D_OUT / 8; ++t) {
            const int col = d_base + t * 8 + (lane % 4) * 2;
            if (col >= head_dim) continue;
            const float k0 = acc_dk[t][2 * r] * grad_scale, k1 = acc_dk[t][2 * r + 1] * grad_scale;
            const float v_scale = DROPOUT ? dropout.scale : 1.f;
            const float v0 = acc_dv[t][2 * r] * v_scale, v1 = acc_dv[t][2 * r + 1] * v_scale;
            if (dkv_fp32) {
                *reinterpret_cast<float2*>(static_cast<float*>(dk) + base + col) = make_float2(k0, k1);
                *reinterpret_cast<float2*>(static_cast<float*>(dv) + base + col) = make_float2(v0, v1);
            } else {
                *reinterpret_cast<u32*>(static_cast<u16*>(dk) + base + col) = Elem::pack2(k0, k1);
                *reinterpret_cast<u32*>(static_cast<u16*>(dv) + base + col) = Elem::pack2(v0, v1);
            }
        }
    }
}

// Deterministic dQ: one CTA per (query block, head, batch), warps own 16 * MT query rows, as the
// forward. Per key block: S = Q K^T, P = 2^(S c - lse_log2), dP = dO V^T, dS = P o (dP - D),
// dQ += dS K (dS from registers as the A operand). dq is written scaled, as Elem, once.
template <typename Elem_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_>
struct BwdDqTraits {
    using Elem = Elem_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, NWARPS = NWARPS_;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int MT = BLOCK_M / (16 * NWARPS);
    static constexpr int NT = BLOCK_N / 8;
    static constexpr int DT = HEAD_DIM / 8;
    static constexpr int PITCH = SmemRow<HEAD_DIM>::PITCH;
    static constexpr int SMEM_BYTES = (2 * BLOCK_M + 2 * BLOCK_N) * PITCH * 2;
    static_assert(BLOCK_M % (16 * NWARPS) == 0 && BLOCK_N % 16 == 0, "tiles");
};

template <typename Tr, bool CAUSAL, bool DROPOUT, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)  // 1: without it ptxas may cap registers low and spill
flash_bwd_dq_kernel(const __grid_constant__ AttnParams p) {
    using Elem = typename Tr::Elem;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM;
    constexpr int MT = Tr::MT, NT = Tr::NT, DT = Tr::DT, PITCH = Tr::PITCH, NTHREADS = Tr::NTHREADS;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* s_q = reinterpret_cast<u16*>(smem_raw);  // (BLOCK_M, PITCH); reused for dQ at the end
    u16* s_do = s_q + BLOCK_M * PITCH;             // (BLOCK_M, PITCH)
    u16* s_k = s_do + BLOCK_M * PITCH;             // (BLOCK_N, PITCH)
    u16* s_v = s_k + BLOCK_N * PITCH;              // (BLOCK_N, PITCH)

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row0 = warp * MT * 16;
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
    const float softmax_scale_log2 = p.scale_log2_f, grad_scale = p.grad_scale_f;
    const int nheads = p.nheads;
    const DropoutParams dropout = p.dropout;  // p read at entry only (see flash_fwd_kernel)
    const i64 dq_row_stride = p.dq.row_stride;
    const Tensor4 tq = p.q, tdo = p.dout;
    const float* const lse = static_cast<const float*>(p.lse);
    const float* const delta = static_cast<const float*>(p.delta);
    const Mask mask = make_mask<FEAT>(p, CAUSAL);
    using Mod = ScoreMod<FEAT, float, true>;
    [[maybe_unused]] const Mod mod(p, batch, head);

    const u16* k_head = p.k.ptr<const u16>(batch, head_k);
    const u16* v_head = p.v.ptr<const u16>(batch, head_k);
    TileWalk<BLOCK_N> keys(mask.key_end(m0 + BLOCK_M - 1), p.mask.kv_list, batch, head, m0);
    int n0 = keys.first(mask.key_begin(m0));

    // Row statistics of the owned rows: lse * log2(e) (+inf: P = 0) and D.
    float lse_log2[MT][2], dlt[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + warp_row0 + mt * 16 + lane / 4 + r * 8;
            const i64 idx = stats_index(p, batch, head, row);
            const float l = row < seqlen_q ? lse[idx] : -FC_INF;
            lse_log2[mt][r] = l == -FC_INF ? FC_INF : l * FC_LOG2E;
            dlt[mt][r] = row < seqlen_q ? delta[idx] : 0.f;
        }
    float acc_dq[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.f;

    if (n0 >= 0) {
        load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, tq.ptr<const u16>(batch, head, m0), tq.row_stride,
                                                     seqlen_q - m0, head_dim);
        load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_do, tdo.ptr<const u16>(batch, head, m0), tdo.row_stride,
                                                     seqlen_q - m0, head_dim);
        cp_async_commit();
    }
    const u32 q_lane = smem_u32(s_q) + ((warp_row0 + lane % 16) * PITCH + (lane / 16) * 8) * 2;
    const u32 do_lane = smem_u32(s_do) + ((warp_row0 + lane % 16) * PITCH + (lane / 16) * 8) * 2;
    const int b_off = ((lane / 16) * 8 + lane % 8) * PITCH + ((lane / 8) % 2) * 8;
    const int bt_off = (((lane / 8) % 2) * 8 + lane % 8) * PITCH + (lane / 16) * 8;

    for (; n0 >= 0; n0 = keys.next()) {
        __syncthreads();  // every warp is done reading K_{j-1}, V_{j-1}
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + n0 * k_row_stride, k_row_stride, seqlen_k - n0, head_dim);
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head + n0 * v_row_stride, v_row_stride, seqlen_k - n0, head_dim);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float acc_s[MT][NT][4], acc_dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f, acc_dp[mt][nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            u32 aq[MT][4], ado[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ldmatrix_x4(aq[mt], q_lane + (mt * 16 * PITCH + kk * 16) * 2);
                ldmatrix_x4(ado[mt], do_lane + (mt * 16 * PITCH + kk * 16) * 2);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4], c[4];
                ldmatrix_x4(b, smem_u32(s_k) + (b_off + np * 16 * PITCH + kk * 16) * 2);
                ldmatrix_x4(c, smem_u32(s_v) + (b_off + np * 16 * PITCH + kk * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(acc_s[mt][2 * np], aq[mt], b[0], b[1]);
                    Elem::mma(acc_s[mt][2 * np + 1], aq[mt], b[2], b[3]);
                    Elem::mma(acc_dp[mt][2 * np], ado[mt], c[0], c[1]);
                    Elem::mma(acc_dp[mt][2 * np + 1], ado[mt], c[2], c[3]);
                }
            }
        }
        const bool need_mask = mask.partial(m0, BLOCK_M, n0, BLOCK_N);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = m0 + warp_row0 + mt * 16 + lane / 4 + (e / 2) * 8;
                    const int col = n0 + nt * 8 + (lane % 4) * 2 + (e % 2);
                    float dmod = 1.f;  // softcap: P is only needed for dS here, so it carries dS's factor
                    if constexpr (Mod::ACTIVE) dmod = mod.apply_grad(acc_s[mt][nt][e], row, col);
                    float pr = fast_exp2(fmaf(acc_s[mt][nt][e], softmax_scale_log2, -lse_log2[mt][e / 2]));
                    if (need_mask && !mask.visible(row, col)) pr = 0.f;
                    acc_s[mt][nt][e] = Mod::SOFTCAP ? pr * dmod : pr;
                }
        // dS = P o (dP o Z - D), Z = keep / (1 - p) with dropout (the forward's mask, same layout).
        if constexpr (DROPOUT) {
            const u32 bh = (u32)batch * (u32)nheads + (u32)head;  // mod 2^32, as flashcupy/dropout.py
            for_each_dropout_keep_m16n8<MT, NT>(dropout, bh, m0 + warp_row0, n0, lane, [&](int mt, int nt, int e, bool keep) {
                if (!keep) acc_dp[mt][nt][e] = 0.f;
                else acc_dp[mt][nt][e] *= dropout.scale;
            });
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_dp[mt][nt][e] = acc_s[mt][nt][e] * (acc_dp[mt][nt][e] - dlt[mt][e / 2]);
        // dQ += dS K_j: dS from registers (A), K_j rows transposed (B).
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Elem::pack2(acc_dp[mt][2 * kk][0], acc_dp[mt][2 * kk][1]);
                a[mt][1] = Elem::pack2(acc_dp[mt][2 * kk][2], acc_dp[mt][2 * kk][3]);
                a[mt][2] = Elem::pack2(acc_dp[mt][2 * kk + 1][0], acc_dp[mt][2 * kk + 1][1]);
                a[mt][3] = Elem::pack2(acc_dp[mt][2 * kk + 1][2], acc_dp[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                u32 b[4];
                ldmatrix_x4_trans(b, smem_u32(s_k) + (bt_off + kk * 16 * PITCH + dp * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(acc_dq[mt][2 * dp], a[mt], b[0], b[1]);
                    Elem::mma(acc_dq[mt][2 * dp + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }

    // dq = grad_scale * acc, staged per warp in s_q (only this warp read its rows), 16-byte stores.
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp_row0 + mt * 16 + lane / 4 + r * 8;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<u32*>(&s_q[row * PITCH + dt * 8 + (lane % 4) * 2]) =
                    Elem::pack2(acc_dq[mt][dt][2 * r] * grad_scale, acc_dq[mt][dt][2 * r + 1] * grad_scale);
        }
    __syncwarp();
    constexpr int CHUNKS = SmemRow<HEAD_DIM>::CHUNKS;
    u16* dq_tile = p.dq.ptr<u16>(batch, head, m0);
    for (int c = lane; c < MT * 16 * CHUNKS; c += 32) {
        const int row = warp_row0 + c / CHUNKS, col = (c % CHUNKS) * 8;
        if (m0 + row < seqlen_q && col < head_dim)
            *reinterpret_cast<uint4*>(dq_tile + row * dq_row_stride + col) =
                *reinterpret_cast<const uint4*>(&s_q[row * PITCH + col]);
    }
}

// out[b, s, hk, c] = scale * sum_{g < group} in[b, s, hk * group + g, c]; in float32 (rows, nheads,
// head_dim) contiguous, out Elem (rows, nheads / group, head_dim) contiguous. rows = batch * seqlen.
struct ConvertParams {
    const float* in;
    u16* out;
    i64 rows;
    int nheads_out, group, head_dim;
    float scale;
};

template <typename Elem>
__global__ void __launch_bounds__(256)
flash_bwd_convert_kernel(const __grid_constant__ ConvertParams c) {
    const float* __restrict__ in = c.in;
    u16* __restrict__ out = c.out;
    const int group = c.group, head_dim = c.head_dim;
    const float scale = c.scale;
    const i64 n = c.rows * c.nheads_out * (head_dim / 2);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int c = (int)(i % (head_dim / 2)) * 2;
        const i64 rh = i / (head_dim / 2);  // row * nheads_out + hk
        const float* src = in + rh * group * head_dim + c;
        float a = 0.f, b = 0.f;
        for (int g = 0; g < group; ++g) a += src[g * head_dim], b += src[g * head_dim + 1];
        *reinterpret_cast<u32*>(out + rh * head_dim + c) = Elem::pack2(a * scale, b * scale);
    }
}
