// flash_fwd_sm90.cu: the Hopper (sm_90a) forward: TMA loads into 128-byte-swizzled shared memory,
// wgmma for S = Q K^T (both operands in shared memory) and O += P V (P from registers), one producer
// warpgroup and two consumer warpgroups (warp specialization, FA3 Sec. 3.1, arXiv 2407.08608), raw
// mbarrier phase waits, setmaxnreg. The algorithm is FA2's (arXiv 2307.08691, Algorithm 1): the
// online softmax in base 2, masking through flash_mask.cuh, the same AttnParams as every family.
//
// Versions (bench/NOTES.md has the measurements):
//   v0 one CTA = 128 query rows (64 per consumer warpgroup), key tiles of BLOCK_N, STAGES-deep K/V
//      pipeline; no intra-warpgroup overlap, no ping-pong, no persistence; no dropout or block mask
//      (flashcupy/_gpu_sm90.py sends those to the mma.sync family).
//   v1 OVERLAP: intra-warpgroup overlap (FA3 Sec. 3.2): S_j = Q K_j^T is issued with O += P_{j-1} V_{j-1}
//      and the softmax of S_j runs while the latter is in flight; STAGES 2 or 3.
//   v3 DROPOUT (flash_fwd_kernel's keep bits) and block masks (TileWalk over whole tiles); not yet
//      dispatched (flashcupy/_gpu_sm90.plan_config) until run on a GPU.
//   v2 PINGPONG (with OVERLAP): the two consumer warpgroups take turns issuing their GEMMs (named
//      barriers 1 and 2, FA3 Sec. 3.1), so one's softmax runs under the other's GEMMs.
#include "flash_params.cuh"
#include "flash_mask.cuh"
#include "flash_common.cuh"
#include "flash_sm90.cuh"
#include "flash_wgmma.cuh"

// The three tensor maps of a forward call (flashcupy/_gpu_sm90.py encodes them): 4-D (head_dim,
// nheads, seqlen, batch) views of q, k, v with boxes (64, 1, BLOCK_M or BLOCK_N, 1), 128-byte swizzle.
struct Sm90FwdTma {
    TmaDesc q, k, v;
};

template <typename Elem_, int HEAD_DIM_, int BLOCK_N_, int STAGES_, bool OVERLAP_, bool PINGPONG_ = false>
struct Sm90FwdTraits {
    using Elem = Elem_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_N = BLOCK_N_, STAGES = STAGES_;
    static constexpr bool OVERLAP = OVERLAP_;  // v1: the S GEMM of tile j overlaps the softmax / PV of j - 1
    static constexpr bool PINGPONG = PINGPONG_;  // v2: the consumers take turns issuing their GEMMs (OVERLAP only)
    static constexpr int CONSUMERS = 2, BLOCK_M = 64 * CONSUMERS, NTHREADS = 128 * (CONSUMERS + 1);
    static constexpr int PANELS = HEAD_DIM / 64;          // 64-column (128-byte) panels of a tile row
    static constexpr int Q_PANEL = BLOCK_M * 128, KV_PANEL = BLOCK_N * 128;  // bytes
    static constexpr int Q_BYTES = PANELS * Q_PANEL, KV_BYTES = PANELS * KV_PANEL;
    static constexpr int BARRIERS = 1 + 2 * STAGES;       // q_full, full[STAGES], empty[STAGES]
    // Q, STAGES x (K, V), the barriers, and 1 KB to align the dynamic window to the swizzle atom.
    static constexpr int SMEM_BYTES = Q_BYTES + 2 * STAGES * KV_BYTES + 8 * BARRIERS + 1024;
    static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
    static_assert(HEAD_DIM % 64 == 0 && BLOCK_N % 16 == 0 && BLOCK_N <= 256, "tiles");
};

template <typename Tr, bool CAUSAL, bool DROPOUT, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_fwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ Sm90FwdTma t) {
    using Elem = typename Tr::Elem;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, STAGES = Tr::STAGES;
    constexpr int PANELS = Tr::PANELS;

    extern __shared__ unsigned char smem_raw[];
    const u32 base = (smem_u32(smem_raw) + 1023) & ~1023u;  // 128B-swizzle atoms are 1024-byte aligned
    const u32 s_q = base;
    const u32 s_k = s_q + Tr::Q_BYTES;                  // STAGES x KV_BYTES
    const u32 s_v = s_k + STAGES * Tr::KV_BYTES;        // STAGES x KV_BYTES
    const u32 bars = s_v + STAGES * Tr::KV_BYTES;       // q_full, full[s], empty[s]
    const u32 q_full = bars;
    auto full = [&](int s) { return bars + 8 * (1 + s); };
    auto empty = [&](int s) { return bars + 8 * (1 + STAGES + s); };

    const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // causal: longest rows first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int seqlen_q = p.seqlen_q, head_dim = p.head_dim;
    const float softmax_scale_log2 = p.scale_log2_f, softmax_scale = p.scale_f;
    const Tensor4 out = p.out;
    float* const lse = static_cast<float*>(p.lse);
    const Mask mask = make_mask<FEAT>(p, CAUSAL);
    const float sink = sink_of<FEAT>(p, head);
    using Mod = ScoreMod<FEAT, float, true>;
    [[maybe_unused]] const Mod mod(p, batch, head);  // p read at entry (its fields stay in registers)
    const SparseList kv_list = p.mask.kv_list;  // block mask: blocks are whole BLOCK_M x BLOCK_N tiles
    const DropoutParams dropout = p.dropout;
    const int nheads = p.nheads;
    const int warpgroup = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; ++s) mbar_init(full(s), 1), mbar_init(empty(s), 128 * Tr::CONSUMERS);
        mbar_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {  // producer: one thread issues every TMA load
        regs_dealloc<Tr::PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            mbar_expect_tx(q_full, Tr::Q_BYTES);
#pragma unroll
            for (int c = 0; c < PANELS; ++c) tma_load_4d(s_q + c * Tr::Q_PANEL, t.q, q_full, 64 * c, head, m0, batch);
            TileWalk<BLOCK_N> keys(mask.key_end(m0 + BLOCK_M - 1), kv_list, batch, head, m0);
            int i = 0;
            for (int n0 = keys.first(mask.key_begin(m0)); n0 >= 0; n0 = keys.next(), ++i) {
                const int s = i % STAGES;
                mbar_wait(empty(s), ((i / STAGES) & 1) ^ 1);
                mbar_expect_tx(full(s), 2 * Tr::KV_BYTES);
#pragma unroll
                for (int c = 0; c < PANELS; ++c) {
                    tma_load_4d(s_k + s * Tr::KV_BYTES + c * Tr::KV_PANEL, t.k, full(s), 64 * c, head_k, n0, batch);
                    tma_load_4d(s_v + s * Tr::KV_BYTES + c * Tr::KV_PANEL, t.v, full(s), 64 * c, head_k, n0, batch);
                }
            }
        }
        return;
    }

    // consumers: warpgroup c = 1, 2 owns query rows m0 + 64 (c - 1) + [0, 64)
    regs_alloc<Tr::CONSUMER_REGS>();
    const int wg = warpgroup - 1, tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int wg_row0 = m0 + 64 * wg;
    const int row_lo = wg_row0 + warp * 16 + lane / 4;  // this thread's rows: row_lo and row_lo + 8

    float acc_o[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc_o[i] = 0.f;
    float row_max[2] = {-FC_INF, -FC_INF}, row_sum[2] = {0.f, 0.f};

    // S = Q_wg K^T of one key tile: (64, BLOCK_N) fp32 per warpgroup, both operands K-major in shared
    // memory. acc[4 j + e]: row row_lo + 8 (e / 2), key n0 + 8 j + 2 (lane % 4) + e % 2.
    auto issue_s = [&](float (&acc)[BLOCK_N / 2], u32 k_tile) {
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const u32 koff = (kk % 4) * 32;  // bytes along K inside the 128-byte row of panel kk / 4
            const u64 da = smem_desc(s_q + (kk / 4) * Tr::Q_PANEL + wg * 64 * 128 + koff, 16, 1024);
            const u64 db = smem_desc(k_tile + (kk / 4) * Tr::KV_PANEL + koff, 16, 1024);
            Wgmma<Elem, BLOCK_N, false>::template wgmma_ss<0>(acc, da, db, kk > 0);
        }
    };
    // O += P V: P from registers (k-step kk = keys 16 kk ..), V MN-major in shared memory.
    auto issue_pv = [&](const u32 (&pk)[BLOCK_N / 16][4], u32 v_tile) {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            Wgmma<Elem, HEAD_DIM, true>::template wgmma_rs<1>(acc_o, pk[kk], smem_desc(v_tile + kk * 16 * 128, Tr::KV_PANEL, 1024), 1);
    };
    // The score modifier and the mask on S, then the online softmax (base 2, as flash_fwd_kernel):
    // m_new = max(m, rowmax S), S <- P = 2^(S c - m_new c), l <- l alpha + rowsum P; returns alpha, the
    // factor O must be rescaled by (the caller applies it once no wgmma still accumulates into O).
    auto softmax = [&](float (&acc)[BLOCK_N / 2], int n0, float (&alpha)[2]) {
        if constexpr (Mod::ACTIVE) {
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[4 * j + e] = mod.apply(acc[4 * j + e], row_lo + 8 * (e / 2), n0 + 8 * j + 2 * (lane % 4) + e % 2);
        }
        if (mask.partial(wg_row0, 64, n0, BLOCK_N)) {
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!mask.visible(row_lo + 8 * (e / 2), n0 + 8 * j + 2 * (lane % 4) + e % 2)) acc[4 * j + e] = -FC_INF;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j) mx = fmaxf(mx, fmaxf(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]));
            mx = quad_max(mx);
            const float mx_scaled = mx == -FC_INF ? 0.f : mx * softmax_scale_log2;
            alpha[r] = fast_exp2(row_max[r] * softmax_scale_log2 - mx_scaled);
            row_max[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    const float pr = fast_exp2(fmaf(acc[4 * j + e], softmax_scale_log2, -mx_scaled));
                    acc[4 * j + e] = pr;
                    sum += pr;
                }
            row_sum[r] = row_sum[r] * alpha[r] + sum;
        }
        // Dropout: zero the dropped entries of P (l keeps the undropped sum: the LSE is the softmax's;
        // O gets 1 / (1 - p) once, in the epilogue). The accumulator layout per warp is mma.sync's m16n8
        // one, so the keep bits are flash_fwd_kernel's: one Philox call per 16 x 16 block.
        if constexpr (DROPOUT) {
            const u32 bh = (u32)batch * (u32)nheads + (u32)head;  // mod 2^32, as flashcupy/dropout.py
            for_each_dropout_keep_m16n8<1, BLOCK_N / 8>(dropout, bh, wg_row0 + warp * 16, n0, lane, [&](int, int nt, int e, bool keep) {
                if (!keep) acc[4 * nt + e] = 0.f;
            });
        }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 8; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) acc_o[4 * j + 2 * r] *= alpha[r], acc_o[4 * j + 2 * r + 1] *= alpha[r];
    };
    // The S accumulators of keys 16 kk .. 16 kk + 15 are the A fragment of k-step kk of P V.
    auto pack_p = [&](const float (&acc)[BLOCK_N / 2], u32 (&pk)[BLOCK_N / 16][4]) {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
#pragma unroll
            for (int h = 0; h < 4; ++h) pk[kk][h] = Elem::pack2(acc[8 * kk + 2 * h], acc[8 * kk + 2 * h + 1]);
    };

    // Ping-pong: consumer wg waits on named barrier 1 + wg before issuing its GEMMs and then lets the
    // other one go (arrive on 1 + (1 - wg)); 256 threads per barrier: 128 syncing, 128 arriving.
    // Consumer 1 lets consumer 0 go first; it skips its very last arrive, which nobody would consume.
    auto turn_wait = [&]() { if constexpr (Tr::PINGPONG) named_bar_sync(1 + wg, 256); };
    auto turn_pass = [&](bool last) { if constexpr (Tr::PINGPONG) if (!(last && wg == 1)) named_bar_arrive(2 - wg, 256); };

    mbar_wait(q_full, 0);
    TileWalk<BLOCK_N> keys(mask.key_end(m0 + BLOCK_M - 1), kv_list, batch, head, m0);
    float acc_s[BLOCK_N / 2];
    u32 p_frag[BLOCK_N / 16][4];
    float alpha[2];
    if constexpr (!Tr::OVERLAP) {
        // v0: per key tile, S GEMM, softmax, P V GEMM, in sequence.
        int i = 0;
        for (int n0 = keys.first(mask.key_begin(m0)); n0 >= 0; n0 = keys.next(), ++i) {
            const int s = i % STAGES;
            mbar_wait(full(s), (i / STAGES) & 1);
            wgmma_fence();
            issue_s(acc_s, s_k + s * Tr::KV_BYTES);
            wgmma_commit();
            wgmma_wait<0>();
            softmax(acc_s, n0, alpha);
            rescale_o(alpha);
            pack_p(acc_s, p_frag);
            wgmma_fence();
            issue_pv(p_frag, s_v + s * Tr::KV_BYTES);
            wgmma_commit();
            wgmma_wait<0>();
            mbar_arrive(empty(s));  // this thread is done with stage s (K_j and V_j)
        }
    } else {
        // v1, intra-warpgroup overlap (FA3 Sec. 3.2): the S GEMM of tile j is issued together with the
        // P V GEMM of tile j - 1, and the softmax of tile j runs while the latter is in flight.
        int n0 = keys.first(mask.key_begin(m0));
        if (n0 >= 0) {
            if constexpr (Tr::PINGPONG) if (wg == 1) named_bar_arrive(1, 256);
            mbar_wait(full(0), 0);
            turn_wait();
            wgmma_fence();
            issue_s(acc_s, s_k);
            wgmma_commit();
            turn_pass(false);
            wgmma_wait<0>();
            softmax(acc_s, n0, alpha);  // O is 0: no rescale
            pack_p(acc_s, p_frag);
            int prev = 0, i = 0;
            for (n0 = keys.next(); n0 >= 0; n0 = keys.next()) {
                const int s = ++i % STAGES;
                mbar_wait(full(s), (i / STAGES) & 1);
                turn_wait();
                wgmma_fence();
                issue_s(acc_s, s_k + s * Tr::KV_BYTES);
                wgmma_commit();
                issue_pv(p_frag, s_v + prev * Tr::KV_BYTES);
                wgmma_commit();
                turn_pass(false);
                wgmma_wait<1>();  // S of tile j has landed; P V of tile j - 1 may still run
                softmax(acc_s, n0, alpha);
                wgmma_wait<0>();
                mbar_arrive(empty(prev));  // K and V of tile j - 1 are no longer read
                rescale_o(alpha);
                pack_p(acc_s, p_frag);
                prev = s;
            }
            turn_wait();
            wgmma_fence();
            issue_pv(p_frag, s_v + prev * Tr::KV_BYTES);
            wgmma_commit();
            turn_pass(true);
            wgmma_wait<0>();
            mbar_arrive(empty(prev));
        }
    }

    // Epilogue: O /= l, LSE = m * scale + ln(l); rows with l == 0 (no visible key): O = 0, LSE = -inf.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row_lo + 8 * r;
        const float l = quad_sum(row_sum[r]);
        float inv_l = l > 0.f ? (DROPOUT ? dropout.scale : 1.f) / l : 0.f;
        // FEAT_SINK: the sink joins l. Spelled out rather than through flash_mask.cuh's RowEnd (the other
        // forwards' form): with RowEnd's lambda ptxas schedules this epilogue differently (same instructions,
        // another order) in the plain kernels too, whose SASS is kept as it was when they ran on the GPU.
        [[maybe_unused]] float row_lse = 0.f;
        if constexpr ((FEAT & FEAT_SINK) != 0) {
            row_lse = l > 0.f ? row_max[r] * softmax_scale + logf(l) : -FC_INF;
            add_sink(inv_l, row_lse, sink);
        }
        if (row < seqlen_q) {
            u16* o_row = out.ptr<u16>(batch, head, row);
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 8; ++j) {
                const int col = 8 * j + 2 * (lane % 4);
                if (col < head_dim)
                    *reinterpret_cast<u32*>(o_row + col) = Elem::pack2(acc_o[4 * j + 2 * r] * inv_l, acc_o[4 * j + 2 * r + 1] * inv_l);
            }
            if (lane % 4 == 0)
                lse[stats_index(p, batch, head, row)] =
                    (FEAT & FEAT_SINK) ? row_lse : l > 0.f ? row_max[r] * softmax_scale + logf(l) : -FC_INF;
        }
    }
}
