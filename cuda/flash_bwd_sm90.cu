// flash_bwd_sm90.cu: the Hopper (sm_90a) backward: wgmma for all five GEMMs, TMA loads into
// 128-byte-swizzled shared memory, one producer warpgroup (a TMA warp and a dQ-writer warp) and two
// consumer warpgroups (FA3, arXiv 2407.08608, App. B.1 and Algorithm 3). The algorithm is FA2's
// (arXiv 2307.08691, Algorithm 2), KV-outer, on the same AttnParams and flash_mask.cuh as every family.
//
//   flash_bwd_sm90_prep_kernel   D = rowsum(dO o O) and lse * log2(e), float32, into (batch, nheads,
//                                seqlen_q rounded up to 128) buffers (+inf / 0 in the padding and for
//                                rows with no visible key), which the TMA warp copies with 1-D bulk loads
//   flash_bwd_sm90_kernel        one CTA per (128-key block, head, batch); consumer warpgroup w owns keys
//                                n0 + 64 w + [0, 64) and keeps dK, dV of them in registers while the CTA
//                                walks the query tiles of BLOCK_M rows:
//                                  S^T = K_w Q^T, dP^T = V_w dO^T           (SS; rows = keys)
//                                  P^T = 2^(S^T c - lse_log2), dS^T = P^T o (dP^T - D)
//                                  dV_w += P^T dO, dK_w += dS^T Q            (RS: P^T, dS^T stay in registers)
//                                  dQ chunk w = dS K                         (SS; dS^T of both warpgroups
//                                                                            through shared memory)
//                                and the dQ-writer warp adds each 64 x 64 float32 chunk to p.dq_accum with
//                                one cp.reduce.async.bulk (no atomics in the MMA warps)
//   flash_bwd_sm90_dq_kernel     dq = grad_scale * dq_accum, float32 -> fp16/bf16
//
// p.dq_accum holds 64 x 64 float32 chunks, (batch, nheads, seqlen_q pad / 64, head_dim tile / 64, 4096),
// each in the wgmma accumulator's fragment order: element (r, c) of a chunk is at
//   ((c / 8 * 4 + r / 16) * 32 + (r % 8) * 4 + (c % 8) / 2) * 4 + 2 * ((r % 16) / 8) + c % 2
// so that every warp stores 512 contiguous bytes at a time (dq_chunk_index).
//
// Versions (bench/NOTES.md has the measurements):
//   v0 the above; STAGES-deep Q/dO pipeline, dS^T double-buffered; no dropout, no deterministic mode
//      (flashcupy/_gpu_sm90_bwd.py sends those to the mma.sync family).
//   v1 OVERLAP 1: dV += P^T dO and dK += dS^T Q are issued before the two consumers meet at the dS^T
//      barrier, so they run while it waits (v0 issued dV, dK and dQ after it); OVERLAP 2 also issues dV
//      as soon as P^T is packed, so it runs while dS^T is computed (that keeps P^T packed beside the fp32
//      S^T and dP^T: at hd64 with 128-row tiles ptxas serializes the wgmmas, so hd64 takes 1).
//      DETERMINISTIC (a kernel flag): the dQ writer adds the chunks of each 64-row dQ tile in key-block
//      order. CTA j waits until the tile's turnstile (dq_turnstiles) reads its turn (Mask::dq_turn), adds,
//      waits until its additions have completed in global memory (not only read from shared memory:
//      flash-attn #2244 / PR #2510), then adds 1. The key blocks that add to a tile are a contiguous range
//      [first, last]; non-causal, turns ascend from `first` and blocks launch in ascending order; causal,
//      they descend from `last` (each key block walks its query tiles from its diagonal up, so the last
//      block reaches a query tile first; ascending turns made every block wait for block 0's walk to
//      get there: 1.6-1.7x the default's time at 2k-16k, bench/NOTES.md) and the key blocks launch in
//      descending order (shortest walks first, the reverse of LPT), so a CTA only waits on CTAs
//      launched before it.
//      LPT (causal only): longest key blocks first within groups of (batch, head) pairs whose Q, dO and
//      dQ accumulator fit in L2 (FA3's LPT backward scheduler does the same): grid (n_blocks * G, groups),
//      x = key block * G + pair within the group. A plain longest-first order over every head (tried
//      first) was 5-12% slower than the (key block, head, batch) grid at 2k-16k: its working set is every
//      head's rows, and the L2 misses cost more than the tail it saves (bench/NOTES.md).
#include "flash_params.cuh"
#include "flash_mask.cuh"
#include "flash_common.cuh"
#include "flash_sm90.cuh"
#include "flash_wgmma.cuh"

// The four tensor maps of a backward call (flashcupy/_gpu_sm90_bwd.py encodes them): 4-D (head_dim,
// nheads, seqlen, batch) views with boxes (64, 1, rows, 1), 128-byte swizzle; q and dout boxes of
// BLOCK_M rows, k and v of BLOCK_N.
struct Sm90BwdTma {
    TmaDesc q, dout, k, v;
};

template <typename Elem_, int HEAD_DIM_, int BLOCK_M_, int STAGES_, int OVERLAP_, bool LPT_>
struct Sm90BwdTraits {
    using Elem = Elem_;
    static constexpr int HEAD_DIM = HEAD_DIM_, BLOCK_M = BLOCK_M_, STAGES = STAGES_;
    static constexpr int OVERLAP = OVERLAP_;  // v1: dV / dK GEMMs before the dS^T barrier (1), dV before dS^T (2)
    static constexpr bool LPT = LPT_;          // v1: causal launches longest key blocks first, L2-sized head groups
    static constexpr int CONSUMERS = 2, BLOCK_N = 64 * CONSUMERS, NTHREADS = 128 * (CONSUMERS + 1);
    static constexpr int PANELS = HEAD_DIM / 64;  // 64-column (128-byte) panels of a K/V/Q/dO row
    static constexpr int KV_PANEL = BLOCK_N * 128, KV_BYTES = PANELS * KV_PANEL;
    static constexpr int Q_PANEL = BLOCK_M * 128, Q_BYTES = PANELS * Q_PANEL;
    static constexpr int DS_PANEL = BLOCK_N * 128, DS_BYTES = (BLOCK_M / 64) * DS_PANEL;  // dS^T: keys x queries
    static constexpr int DQ_CHUNK = 64 * 64 * 4;                 // one float32 64 x 64 chunk of dQ
    static constexpr int STATS_BYTES = BLOCK_M * 4;
    static constexpr int BARRIERS = 1 + 2 * STAGES + 2 * CONSUMERS;  // kv_full, full/empty[s], dq_full/empty[w]
    // K, V, STAGES x (Q, dO), 2 x dS^T, one dQ chunk per consumer, STAGES x (lse, D), the barriers, and
    // 1 KB to align the dynamic window to the swizzle atom.
    static constexpr int SMEM_BYTES = 2 * KV_BYTES + 2 * STAGES * Q_BYTES + 2 * DS_BYTES + CONSUMERS * DQ_CHUNK +
                                      2 * STAGES * STATS_BYTES + 8 * BARRIERS + 1024;
    static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
    // setmaxnreg moves registers within what the launch gave the CTA (__launch_bounds__(NTHREADS, 1):
    // 65536 / NTHREADS rounded down to 8 per thread, 168 at 384), not the whole register file: a
    // budget above it makes the consumers' setmaxnreg.inc wait forever (32 / 240 hung on the H200).
    static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 128 * CONSUMERS <= (65536 / NTHREADS / 8 * 8) * NTHREADS,
                  "register budget of the warpgroups exceeds the launch allocation");
    // Each consumer computes one 64 x 64 chunk of the BLOCK_M x HEAD_DIM dQ tile per step.
    static_assert(HEAD_DIM % 64 == 0 && BLOCK_M % 64 == 0 && (BLOCK_M / 64) * PANELS == CONSUMERS, "tiles");
};

// Rows of the padded statistics (a multiple of 128: every BLOCK_M tile is inside, bulk copies aligned).
__device__ __forceinline__ int stats_rows_padded(const AttnParams& p) { return (p.seqlen_q + 127) & ~127; }

// Float offset of chunk (query tile qt of 64 rows, column panel c) of (batch, head) in p.dq_accum.
__device__ __forceinline__ i64 dq_chunk_index(const AttnParams& p, int batch, int head, int qt, int c) {
    const int panels = (p.head_dim + 63) / 64;
    return ((((i64)batch * p.nheads + head) * (stats_rows_padded(p) / 64) + qt) * panels + c) * 4096;
}

// DETERMINISTIC's turnstiles, (batch, nheads, seqlen_q pad / 64) int32, zeroed with p.dq_accum: they
// follow its chunks in the same allocation (flashcupy/_gpu_sm90_bwd.py sizes it so).
__device__ __forceinline__ int* dq_turnstiles(const AttnParams& p) {
    return reinterpret_cast<int*>(p.dq_accum + dq_chunk_index(p, p.batch, 0, 0, 0));
}

// D and lse * log2(e) (+inf where lse is -inf: no visible key, so P = 0) into p.delta and p.lse_exp,
// (batch, nheads, stats_rows_padded) float32; padding rows get D = 0, lse_log2 = +inf. One warp per row.
template <typename Elem>
__global__ void __launch_bounds__(128)
flash_bwd_sm90_prep_kernel(const __grid_constant__ AttnParams p) {
    const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int head = blockIdx.y, batch = blockIdx.z;
    const int rows = stats_rows_padded(p);
    if (row >= rows) return;
    const float sum = row < p.seqlen_q ? rowsum_dout_out<Elem>(p, batch, head, row, lane) : 0.f;
    if (lane == 0) {
        const float l = row < p.seqlen_q ? static_cast<const float*>(p.lse)[stats_index(p, batch, head, row)] : -FC_INF;
        const i64 i = ((i64)batch * p.nheads + head) * rows + row;
        static_cast<float*>(p.delta)[i] = sum;
        static_cast<float*>(p.lse_exp)[i] = l == -FC_INF ? FC_INF : l * FC_LOG2E;
    }
}

// p.q, p.dout: (batch, seqlen_q, nheads, head_dim), p.k, p.v: (batch, seqlen_k, nheads_k, head_dim)
// through the tensor maps; p.lse_exp, p.delta from flash_bwd_sm90_prep_kernel; p.dq_accum zeroed
// (unscaled dS K is added); p.dk, p.dv: (batch, seqlen_k, nheads, head_dim) rows, written as Elem
// (p.dkv_fp32 == 0) or float32 (GQA: summed over the group afterwards). dk is scaled here.
template <typename Tr, bool CAUSAL, bool DETERMINISTIC, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_bwd_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ Sm90BwdTma t) {
    using Elem = typename Tr::Elem;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, STAGES = Tr::STAGES;
    constexpr int PANELS = Tr::PANELS;

    extern __shared__ unsigned char smem_raw[];
    const u32 raw = smem_u32(smem_raw);
    const u32 base = (raw + 1023) & ~1023u;  // 128B-swizzle atoms are 1024-byte aligned
    const u32 s_k = base, s_v = s_k + Tr::KV_BYTES;
    const u32 s_q = s_v + Tr::KV_BYTES;                // STAGES x Q_BYTES
    const u32 s_do = s_q + STAGES * Tr::Q_BYTES;       // STAGES x Q_BYTES
    const u32 s_ds = s_do + STAGES * Tr::Q_BYTES;      // 2 x DS_BYTES
    const u32 s_dq = s_ds + 2 * Tr::DS_BYTES;          // CONSUMERS x DQ_CHUNK
    const u32 s_lse = s_dq + Tr::CONSUMERS * Tr::DQ_CHUNK;  // STAGES x STATS_BYTES
    const u32 s_delta = s_lse + STAGES * Tr::STATS_BYTES;   // STAGES x STATS_BYTES
    const u32 bars = s_delta + STAGES * Tr::STATS_BYTES;
    const u32 kv_full = bars;
    auto full = [&](int s) { return bars + 8 * (1 + s); };
    auto empty = [&](int s) { return bars + 8 * (1 + STAGES + s); };
    auto dq_full = [&](int w) { return bars + 8 * (1 + 2 * STAGES + w); };
    auto dq_empty = [&](int w) { return bars + 8 * (1 + 2 * STAGES + Tr::CONSUMERS + w); };

    int n_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
    if constexpr (Tr::LPT && CAUSAL) {  // grid (n_blocks * G, groups): key block slowest within a group
        const int n_blocks = cdiv(p.seqlen_k, BLOCK_N), group = gridDim.x / n_blocks;
        const int pair = blockIdx.y * group + (int)(blockIdx.x % group);
        n_block = blockIdx.x / group;
        if constexpr (DETERMINISTIC) n_block = n_blocks - 1 - n_block;  // descending turns: last block first
        if (pair >= p.batch * p.nheads) return;  // the last group's missing pairs (before any barrier)
        head = pair % p.nheads, batch = pair / p.nheads;
    } else if constexpr (DETERMINISTIC && CAUSAL) {
        n_block = gridDim.x - 1 - n_block;  // grid (n_blocks, h, b): descending key blocks within a head
    }
    const int head_k = head / p.group;
    const int n0 = n_block * BLOCK_N;
    const int seqlen_k = p.seqlen_k, head_dim = p.head_dim, nheads = p.nheads;
    const Mask mask = make_mask<FEAT>(p, CAUSAL);
    using Mod = ScoreMod<FEAT, float, true>;
    const int warpgroup = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        mbar_init(kv_full, 1);
        for (int s = 0; s < STAGES; ++s) mbar_init(full(s), 1), mbar_init(empty(s), 128 * Tr::CONSUMERS);
        for (int w = 0; w < Tr::CONSUMERS; ++w) mbar_init(dq_full(w), 128), mbar_init(dq_empty(w), 1);
        mbar_init_fence();
    }
    __syncthreads();

    // Every role walks the same query tiles: those that see a key of this block (or the active query
    // blocks of this key block's block-mask column).
    TileWalk<BLOCK_M> rows(mask.query_end(n0 + BLOCK_N - 1), p.mask.q_list, batch, head, n0);
    const int m_first = rows.first(mask.query_begin(n0));

    if (warpgroup == 0) {
        regs_dealloc<Tr::PRODUCER_REGS>();
        const i64 stats0 = ((i64)batch * nheads + head) * stats_rows_padded(p);
        if (threadIdx.x == 0 && m_first >= 0) {  // TMA warp: K, V once, then Q, dO, lse, D per query tile
            mbar_expect_tx(kv_full, 2 * Tr::KV_BYTES);
#pragma unroll
            for (int c = 0; c < PANELS; ++c) {
                tma_load_4d(s_k + c * Tr::KV_PANEL, t.k, kv_full, 64 * c, head_k, n0, batch);
                tma_load_4d(s_v + c * Tr::KV_PANEL, t.v, kv_full, 64 * c, head_k, n0, batch);
            }
            const float* lse_exp = static_cast<const float*>(p.lse_exp);
            const float* delta = static_cast<const float*>(p.delta);
            int i = 0;
            for (int m0 = m_first; m0 >= 0; m0 = rows.next(), ++i) {
                const int s = i % STAGES;
                mbar_wait(empty(s), ((i / STAGES) & 1) ^ 1);
                mbar_expect_tx(full(s), 2 * Tr::Q_BYTES + 2 * Tr::STATS_BYTES);
#pragma unroll
                for (int c = 0; c < PANELS; ++c) {
                    tma_load_4d(s_q + s * Tr::Q_BYTES + c * Tr::Q_PANEL, t.q, full(s), 64 * c, head, m0, batch);
                    tma_load_4d(s_do + s * Tr::Q_BYTES + c * Tr::Q_PANEL, t.dout, full(s), 64 * c, head, m0, batch);
                }
                bulk_load(s_lse + s * Tr::STATS_BYTES, lse_exp + stats0 + m0, Tr::STATS_BYTES, full(s));
                bulk_load(s_delta + s * Tr::STATS_BYTES, delta + stats0 + m0, Tr::STATS_BYTES, full(s));
            }
        } else if (threadIdx.x == 32 && m_first >= 0) {  // dQ writer: each consumer's chunk, every step
            float* const dq_accum = p.dq_accum;
            int* const sem = DETERMINISTIC ? dq_turnstiles(p) + ((i64)batch * nheads + head) * (stats_rows_padded(p) / 64) : nullptr;
            int i = 0;
            for (int m0 = m_first; m0 >= 0; m0 = rows.next(), ++i) {
                const int turn = DETERMINISTIC ? mask.dq_turn<BLOCK_N>(m0, BLOCK_M, n_block, CAUSAL) : 0;
#pragma unroll
                for (int w = 0; w < Tr::CONSUMERS; ++w) {
                    const int qt = m0 / 64 + w / PANELS;  // the 64-row dQ tile of chunk w
                    mbar_wait(dq_full(w), i & 1);
                    if (DETERMINISTIC && w % PANELS == 0) sem_wait_eq(sem + qt, turn);
                    const i64 chunk = dq_chunk_index(p, batch, head, qt, w % PANELS);
                    bulk_reduce_add_f32(dq_accum + chunk, s_dq + w * Tr::DQ_CHUNK, Tr::DQ_CHUNK);
                    bulk_commit();
                    bulk_wait_read<0>();  // the chunk has been read: the consumer may overwrite it
                    mbar_arrive(dq_empty(w));
                    if (DETERMINISTIC && w % PANELS == PANELS - 1) {
                        bulk_wait<0>();  // this tile's additions are in global memory
                        sem_release(sem + qt);
                    }
                }
            }
            bulk_wait<0>();  // every addition has landed before the CTA (and its shared memory) ends
        }
        return;
    }

    // consumers: warpgroup wg owns keys kv0 + [0, 64); this thread's keys kv_lo and kv_lo + 8
    regs_alloc<Tr::CONSUMER_REGS>();
    const int wg = warpgroup - 1, tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int kv0 = n0 + 64 * wg;
    const float softmax_scale_log2 = p.scale_log2_f;
    [[maybe_unused]] const Mod mod(p, batch, head);
    const unsigned char* const smem_gen = smem_raw + (base - raw);  // generic pointer of `base`
    auto stats_ptr = [&](u32 addr) { return reinterpret_cast<const float*>(smem_gen + (addr - base)); };

    float acc_dk[HEAD_DIM / 2], acc_dv[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc_dk[i] = 0.f, acc_dv[i] = 0.f;

    if (m_first >= 0) mbar_wait(kv_full, 0);
    int i = 0;
    // One query tile; masked: apply the element masks (the tiles mask.partial names: the causal
    // diagonal, the key tail). Both calls pass a constant after a branch, so the inlined instances are
    // separate code and the unmasked one holds no mask: one loop body with a run-time flag had ptxas
    // compute the predicates of every element before the GEMM issue of every tile (~200 instructions at
    // causal hd128, bench/NOTES.md, v1), as FA2/FA3 split their masking iterations off the main loop.
    // (Not a generic lambda taking BoolConst: NVRTC 13.0 rejects those in device code.)
    auto tile = [&](const bool masked, const int m0) {  // i: the loop's tile count
        const int s = i % STAGES;
        const u32 q_tile = s_q + s * Tr::Q_BYTES, do_tile = s_do + s * Tr::Q_BYTES;
        const u32 ds_tile = s_ds + (i % 2) * Tr::DS_BYTES;
        mbar_wait(full(s), (i / STAGES) & 1);

        // S^T = K_w Q^T and dP^T = V_w dO^T: (64 keys, BLOCK_M queries) per warpgroup, both operands
        // K-major in shared memory. acc[4 j + e]: key kv0 + 16 warp + lane / 4 + 8 (e / 2), query
        // m0 + 8 j + 2 (lane % 4) + e % 2.
        float acc_s[BLOCK_M / 2], acc_dp[BLOCK_M / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const u32 koff = (kk / 4) * Tr::KV_PANEL + wg * 64 * 128 + (kk % 4) * 32;
            const u32 qoff = (kk / 4) * Tr::Q_PANEL + (kk % 4) * 32;
            Wgmma<Elem, BLOCK_M, false>::template wgmma_ss<0>(acc_s, smem_desc(s_k + koff, 16, 1024),
                                                              smem_desc(q_tile + qoff, 16, 1024), kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const u32 koff = (kk / 4) * Tr::KV_PANEL + wg * 64 * 128 + (kk % 4) * 32;
            const u32 qoff = (kk / 4) * Tr::Q_PANEL + (kk % 4) * 32;
            Wgmma<Elem, BLOCK_M, false>::template wgmma_ss<0>(acc_dp, smem_desc(s_v + koff, 16, 1024),
                                                              smem_desc(do_tile + qoff, 16, 1024), kk > 0);
        }
        wgmma_commit();

        // P^T = 2^(S^T c - lse_log2[query]), 0 where masked (rows past seqlen_q have lse_log2 = +inf;
        // keys past seqlen_k are masked, so their zero-filled K rows cannot overflow P).
        const float* lse_log2 = stats_ptr(s_lse + s * Tr::STATS_BYTES);
        const float* dlt = stats_ptr(s_delta + s * Tr::STATS_BYTES);
        wgmma_wait<1>();
        u32 p_frag[BLOCK_M / 16][4], ds_frag[BLOCK_M / 16][4];
        if constexpr (Mod::SOFTCAP) {
            // P^T is packed here for dV; acc_s keeps P^T o (1 - tanh^2), all that dS^T needs (no second
            // array of factors: the consumers have no registers for it).
#pragma unroll
            for (int j = 0; j < BLOCK_M / 8; ++j) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse_log2 + 8 * j + 2 * (lane % 4));
#pragma unroll
                for (int e2 = 0; e2 < 4; e2 += 2) {
                    float pr[2];
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        const int row = m0 + 8 * j + 2 * (lane % 4) + u, key = kv0 + 16 * warp + lane / 4 + 8 * (e2 / 2);
                        const float g = mod.apply_grad(acc_s[4 * j + e2 + u], row, key);
                        pr[u] = fast_exp2(fmaf(acc_s[4 * j + e2 + u], softmax_scale_log2, -(u ? l2.y : l2.x)));
                        if (masked && !mask.visible(row, key)) pr[u] = 0.f;
                        acc_s[4 * j + e2 + u] = pr[u] * g;
                    }
                    p_frag[j / 2][2 * (j % 2) + e2 / 2] = Elem::pack2(pr[0], pr[1]);
                }
            }
        } else {
            if constexpr (Mod::ACTIVE) {
#pragma unroll
                for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc_s[4 * j + e] = mod.apply(acc_s[4 * j + e], m0 + 8 * j + 2 * (lane % 4) + e % 2,
                                                     kv0 + 16 * warp + lane / 4 + 8 * (e / 2));
            }
#pragma unroll
            for (int j = 0; j < BLOCK_M / 8; ++j) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse_log2 + 8 * j + 2 * (lane % 4));
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float pr = fast_exp2(fmaf(acc_s[4 * j + e], softmax_scale_log2, -(e % 2 ? l2.y : l2.x)));
                    if (masked && !mask.visible(m0 + 8 * j + 2 * (lane % 4) + e % 2, kv0 + 16 * warp + lane / 4 + 8 * (e / 2)))
                        pr = 0.f;
                    acc_s[4 * j + e] = pr;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / 16; ++kk)
#pragma unroll
                for (int h = 0; h < 4; ++h) p_frag[kk][h] = Elem::pack2(acc_s[8 * kk + 2 * h], acc_s[8 * kk + 2 * h + 1]);
        }
        // dS^T = P^T o (dP^T - D[query]); both packed as the A fragments of the RS GEMMs (k-step kk =
        // queries 16 kk ..), dS^T also stored to shared memory (keys x queries, 128-byte swizzle) for dQ.
        // dV_w += P^T dO and dK_w += dS^T Q take A from registers, B = dO / Q MN-major. OVERLAP 2 issues
        // dV before computing dS^T, 1 and 2 issue dK (1: and dV) before the barrier, 0 both after it.
        // acc += A^T B over this tile's queries: A^T from registers (P^T or dS^T), B = dO or Q (MN-major).
        auto issue_rs = [&](float (&acc)[HEAD_DIM / 2], const u32 (&a_frag)[BLOCK_M / 16][4], const u32 b_tile) {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / 16; ++kk)
                Wgmma<Elem, HEAD_DIM, true>::template wgmma_rs<1>(acc, a_frag[kk], smem_desc(b_tile + kk * 16 * 128, Tr::Q_PANEL, 1024), 1);
            wgmma_commit();
        };
        auto issue_dv = [&] { issue_rs(acc_dv, p_frag, do_tile); };
        auto issue_dk = [&] { issue_rs(acc_dk, ds_frag, q_tile); };
        if constexpr (Tr::OVERLAP == 2) {
            issue_dv();
            wgmma_wait<1>();  // dP^T is in (dV may still run)
        } else {
            wgmma_wait<0>();
        }
#pragma unroll
        for (int j = 0; j < BLOCK_M / 8; ++j) {
            const float2 d2 = *reinterpret_cast<const float2*>(dlt + 8 * j + 2 * (lane % 4));
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dp[4 * j + e] = acc_s[4 * j + e] * (acc_dp[4 * j + e] - (e % 2 ? d2.y : d2.x));
        }
#pragma unroll
        for (int kk = 0; kk < BLOCK_M / 16; ++kk)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                ds_frag[kk][h] = Elem::pack2(acc_dp[8 * kk + 2 * h], acc_dp[8 * kk + 2 * h + 1]);
                const int key = 64 * wg + 16 * warp + lane / 4 + 8 * (h % 2), query = 16 * kk + 8 * (h / 2) + 2 * (lane % 4);
                asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(ds_tile + swizzle128_offset(key, query, BLOCK_N)),
                             "r"(ds_frag[kk][h])
                             : "memory");
            }
        fence_proxy_async();
        if constexpr (Tr::OVERLAP == 1) issue_dv();
        if constexpr (Tr::OVERLAP >= 1) issue_dk();
        named_bar_sync(1, 128 * Tr::CONSUMERS);  // dS^T of both warpgroups is in shared memory
        if constexpr (Tr::OVERLAP == 0) issue_dv(), issue_dk();

        // This warpgroup's dQ chunk = dS K over all BLOCK_N keys (A = dS^T read transposed, B = K MN-major).
        const int qt = wg / PANELS, dc = wg % PANELS;  // this warpgroup's chunk: query tile, column panel
        float acc_dq[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            Wgmma<Elem, 64, false>::template wgmma_ss<1, 1>(
                acc_dq, smem_desc(ds_tile + qt * Tr::DS_PANEL + kk * 16 * 128, Tr::DS_PANEL, 1024),
                smem_desc(s_k + dc * Tr::KV_PANEL + kk * 16 * 128, Tr::KV_PANEL, 1024), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        mbar_arrive(empty(s));  // Q, dO, lse, D of stage s are no longer read

        // The chunk to shared memory in fragment order (dq_chunk_index), for the dQ writer.
        mbar_wait(dq_empty(wg), (i & 1) ^ 1);
        const u32 dq_dst = s_dq + wg * Tr::DQ_CHUNK + (warp * 32 + lane) * 16;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(dq_dst + j * 4 * 32 * 16), "f"(acc_dq[4 * j]),
                         "f"(acc_dq[4 * j + 1]), "f"(acc_dq[4 * j + 2]), "f"(acc_dq[4 * j + 3])
                         : "memory");
        fence_proxy_async();
        mbar_arrive(dq_full(wg));
    };
    // The masked / unmasked choice is the CTA's (all BLOCK_N keys), not this warpgroup's 64: each
    // inlined copy of `tile` has its own bar.sync 1, so a per-warpgroup choice (one consumer on the causal
    // diagonal or the key tail, the other not) had the two warpgroups meet at different bar.sync
    // instructions, which compute-sanitizer synccheck reports as a divergent barrier (bench/NOTES.md).
    for (int m0 = m_first; m0 >= 0; m0 = rows.next(), ++i) {
        if (mask.partial(m0, BLOCK_M, n0, BLOCK_N)) tile(true, m0);
        else tile(false, m0);
    }

    // dK = grad_scale * dS^T Q, dV = P^T dO: keys kv0 + 16 warp + lane / 4 (+ 8); zero for keys that
    // no query sees.
    const float grad_scale = p.grad_scale_f;
    const int dkv_fp32 = p.dkv_fp32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = kv0 + 16 * warp + lane / 4 + 8 * r;
        if (key >= seqlen_k) continue;
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 8; ++j) {
            const int col = 8 * j + 2 * (lane % 4);
            if (col >= head_dim) continue;
            const float k0 = acc_dk[4 * j + 2 * r] * grad_scale, k1 = acc_dk[4 * j + 2 * r + 1] * grad_scale;
            const float v0 = acc_dv[4 * j + 2 * r], v1 = acc_dv[4 * j + 2 * r + 1];
            if (dkv_fp32) {
                *reinterpret_cast<float2*>(p.dk.ptr<float>(batch, head, key) + col) = make_float2(k0, k1);
                *reinterpret_cast<float2*>(p.dv.ptr<float>(batch, head, key) + col) = make_float2(v0, v1);
            } else {
                *reinterpret_cast<u32*>(p.dk.ptr<u16>(batch, head, key) + col) = Elem::pack2(k0, k1);
                *reinterpret_cast<u32*>(p.dv.ptr<u16>(batch, head, key) + col) = Elem::pack2(v0, v1);
            }
        }
    }
}

// dq[b, row, h, col] = grad_scale * dQ accumulated in p.dq_accum (chunks in fragment order), for
// col < head_dim; two columns per thread.
template <typename Elem>
__global__ void __launch_bounds__(256)
flash_bwd_sm90_dq_kernel(const __grid_constant__ AttnParams p) {
    const int half = p.head_dim / 2, nheads = p.nheads;
    const i64 n = (i64)p.batch * p.seqlen_q * nheads * half;
    const float scale = p.grad_scale_f;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int col = (int)(i % half) * 2;
        const i64 rh = i / half;  // (batch * seqlen_q + row) * nheads + head
        const int head = (int)(rh % nheads);
        const i64 br = rh / nheads;
        const int row = (int)(br % p.seqlen_q), batch = (int)(br / p.seqlen_q);
        const int r = row % 64, c = col % 64;
        const i64 idx = dq_chunk_index(p, batch, head, row / 64, col / 64) +
                        ((c / 8 * 4 + r / 16) * 32 + (r % 8) * 4 + (c % 8) / 2) * 4 + 2 * ((r % 16) / 8);
        const float2 v = *reinterpret_cast<const float2*>(p.dq_accum + idx);
        *reinterpret_cast<u32*>(p.dq.ptr<u16>(batch, head, row) + col) = Elem::pack2(v.x * scale, v.y * scale);
    }
}
