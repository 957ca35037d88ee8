// flash_fwd.cu: FlashAttention-2 forward on tensor cores (mma.sync m16n8k16), fp16 / bf16.
//
// One CTA per (query tile of BLOCK_M rows, head, batch). Each warp owns 16 * MT query rows, so
// the online softmax needs no inter-warp reduction (FA2, arXiv 2307.08691, Sec. 3.2). Key/value
// tiles of BLOCK_N rows stream through shared memory with cp.async: V_j loads while S = Q K_j^T
// runs; K_{j+1} loads while the softmax and O += P V_j run. P never leaves registers: the S
// accumulator layout of two n8 tiles is exactly the A-operand layout of one k16 step.
// Softmax in base 2 (exp2 of the log2e-scaled scores, one MUFU op each); LSE in natural log.
//
// Versions (numbers in bench/NOTES.md):
//   v1  FA2 structure, padded smem rows, single-buffered K/V, Q re-read from smem by ldmatrix.
//   v1.1 fused dropout (Philox4x32-10, one call per 8 elements of a thread's fragment).
//   v1.2 block-sparse: key tiles from a block-mask row's active list (TileWalk), same inner loop.
//   v1.3 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
//   v1.4 packed sequences (FEAT_VARLEN: flash_mask.cuh's seq_of); the dense kernels are unchanged.
#include "flash_common.cuh"

template <typename Elem_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_>
struct FwdTraits {
    using Elem = Elem_;
    static constexpr int HEAD_DIM = HEAD_DIM_;  // head_dim bucket; the runtime head_dim may be smaller
    static constexpr int BLOCK_M = BLOCK_M_;    // query rows per CTA
    static constexpr int BLOCK_N = BLOCK_N_;    // key rows per pipeline step
    static constexpr int NWARPS = NWARPS_;
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int MT = BLOCK_M / (16 * NWARPS);  // m16 tiles per warp
    static constexpr int NT = BLOCK_N / 8;              // n8 tiles of S per warp
    static constexpr int DT = HEAD_DIM / 8;             // n8 tiles of O per warp
    static constexpr int PITCH = SmemRow<HEAD_DIM>::PITCH;
    static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * PITCH * 2;
    static_assert(BLOCK_M % (16 * NWARPS) == 0, "each warp owns whole m16 tiles");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % 16 == 0, "k16 steps");
};

// p.q, p.out: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim);
// p.lse: (batch, nheads, seqlen_q) float32. Mask, dropout and block-sparse lists from p (flash_mask.cuh).
// FEAT_VARLEN: one packed batch row, sequence blockIdx.z of cu_seqlens (seq_of); a CTA past its
// sequence's last query tile returns at once (the grid covers max_seqlen_q). No dropout, no block mask.
template <typename Tr, bool CAUSAL, bool DROPOUT, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)  // 1: without it ptxas may cap registers low and spill
flash_fwd_kernel(const __grid_constant__ AttnParams p) {
    using Elem = typename Tr::Elem;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM;
    constexpr int MT = Tr::MT, NT = Tr::NT, DT = Tr::DT, PITCH = Tr::PITCH, NTHREADS = Tr::NTHREADS;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* s_q = reinterpret_cast<u16*>(smem_raw);  // (BLOCK_M, PITCH); reused for O at the end
    u16* s_k = s_q + BLOCK_M * PITCH;              // (BLOCK_N, PITCH)
    u16* s_v = s_k + BLOCK_N * PITCH;              // (BLOCK_N, PITCH)

    constexpr bool VARLEN = (FEAT & FEAT_VARLEN) != 0;
    static_assert(!(VARLEN && DROPOUT), "varlen: no fused dropout yet");
    const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const Seq seq = seq_of<VARLEN>(p, batch);
    if (VARLEN && m0 >= seq.seqlen_q) return;  // CTA-uniform, before any barrier
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row0 = warp * MT * 16;  // first row of this warp in the tile
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
    const i64 o_row_stride = p.out.row_stride;
    const float softmax_scale_log2 = p.scale_log2_f, softmax_scale = p.scale_f;
    const int nheads = p.nheads;
    const DropoutParams dropout = p.dropout;  // fields of p are read here, at entry: a read of p inside a
                                              // loop addresses it through a register (more live registers)
    // Dense: make_mask, as before (the same mask built from the lengths schedules hd32 causal differently).
    const Mask mask = VARLEN ? Mask(p, seqlen_q, seqlen_k, CAUSAL, (FEAT & FEAT_LOCAL) != 0)
                             : make_mask<FEAT>(p, CAUSAL);
    const float sink = sink_of<FEAT>(p, head);
    using Mod = ScoreMod<FEAT, float, true>;
    [[maybe_unused]] const Mod mod(p, seq.seq, head, seqlen_q, seqlen_k);

    const int tb = seq.tensor_batch;
    const u16* q_tile = p.q.ptr<const u16>(tb, head, seq.q0 + m0);
    const u16* k_head = p.k.ptr<const u16>(tb, head_k, seq.k0);
    const u16* v_head = p.v.ptr<const u16>(tb, head_k, seq.k0);
    u16* o_tile = p.out.ptr<u16>(tb, head, seq.q0 + m0);
    float* lse_tile = static_cast<float*>(p.lse) + stats_index(p, tb, head, seq.q0 + m0);

    // Key tiles to visit: those the mask lets some row of this tile see, or only those of the active
    // key blocks of this tile's block-mask row.
    TileWalk<BLOCK_N> keys(mask.key_end(m0 + BLOCK_M - 1), p.mask.kv_list, batch, head, m0);
    int n0 = keys.first(mask.key_begin(m0));

    // Running softmax state per owned row: rows (lane / 4) and (lane / 4 + 8) of each m16 tile.
    float row_max[MT][2], row_sum[MT][2];
    float acc_o[MT][DT][4];  // (16 * MT, HEAD_DIM) per warp, mma C layout
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) row_max[mt][r] = -FC_INF, row_sum[mt][r] = 0.f;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }

    if (n0 >= 0) {
        load_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, q_tile, q_row_stride, seqlen_q - m0, head_dim);
        cp_async_commit();
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + n0 * k_row_stride, k_row_stride, seqlen_k - n0, head_dim);
        cp_async_commit();
    }

    // ldmatrix lane addressing (bytes, relative to each tile's shared-memory base):
    //  Q (A operand, 16x16): lane -> row lane % 16, column (lane / 16) * 8
    //  K (B operand of S, two n8 tiles x k16): key (lane / 16) * 8 + lane % 8, column ((lane / 8) % 2) * 8
    //  V (B operand of O, k16 x two n8 tiles, transposed): key ((lane / 8) % 2) * 8 + lane % 8, column (lane / 16) * 8
    const u32 q_lane = smem_u32(s_q) + ((warp_row0 + lane % 16) * PITCH + (lane / 16) * 8) * 2;
    const u32 k_lane = smem_u32(s_k) + (((lane / 16) * 8 + lane % 8) * PITCH + ((lane / 8) % 2) * 8) * 2;
    const u32 v_lane = smem_u32(s_v) + ((((lane / 8) % 2) * 8 + lane % 8) * PITCH + (lane / 16) * 8) * 2;

    while (n0 >= 0) {
        const int n_next = keys.next();
        cp_async_wait<0>();
        __syncthreads();  // K_j is in shared memory; every warp is done reading V_{j-1}
        load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head + n0 * v_row_stride, v_row_stride,
                                                     seqlen_k - n0, head_dim);
        cp_async_commit();

        // Dropout keep-mask of this tile, one bit per S element (bit 4 (mt NT + nt) + e), made before the
        // S GEMM while its accumulators are not live, so Philox's temporaries never coexist with them.
        // Only in the 8-warp tiles with one m16 tile per warp, where O dominates the live set (ptxas:
        // hd256 128x64/8 at sm_80 went from 255 registers + 88 B of spill to 240); elsewhere (MT == 2, or
        // the 4-warp 99 KB tiles) the bits cost more than they save and the mask is made after the softmax.
        constexpr bool EARLY_KEEP = MT == 1 && Tr::NWARPS == 8;
        constexpr int KEEP_WORDS = (MT * NT * 4 + 31) / 32;
        u32 keep_bits[KEEP_WORDS];
        if constexpr (DROPOUT && EARLY_KEEP) {
            const u32 bh = (u32)batch * (u32)nheads + (u32)head;  // mod 2^32, as flashcupy/dropout.py
#pragma unroll
            for (int w = 0; w < KEEP_WORDS; ++w) keep_bits[w] = 0u;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int q2 = 0; q2 < NT / 2; ++q2) {
                    u32 r[4];
                    dropout_words(r, dropout, bh, m0 + warp_row0 + mt * 16, lane / 4, n0 + q2 * 16, lane % 4);
#pragma unroll
                    for (int ch = 0; ch < 2; ++ch)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int bit = (mt * NT + 2 * q2 + ch) * 4 + e;
                            if (dropout_keep(r, e / 2, ch, e % 2, dropout.keep_threshold)) keep_bits[bit / 32] |= 1u << (bit % 32);
                        }
                }
        }

        // S = Q K_j^T: (16 * MT, BLOCK_N) per warp
        float acc_s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], q_lane + (mt * 16 * PITCH + kk * 16) * 2);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4];
                ldmatrix_x4(b, k_lane + (np * 16 * PITCH + kk * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(acc_s[mt][2 * np], a[mt], b[0], b[1]);
                    Elem::mma(acc_s[mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // The score modifier, then -inf on masked elements; only tiles that need it.
        if constexpr (Mod::ACTIVE) apply_score_mod_m16n8(acc_s, mod, m0 + warp_row0, n0, lane);
        if (mask.partial(m0, BLOCK_M, n0, BLOCK_N)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = m0 + warp_row0 + mt * 16 + lane / 4 + (e / 2) * 8;
                        const int col = n0 + nt * 8 + (lane % 4) * 2 + (e % 2);
                        if (!mask.visible(row, col)) acc_s[mt][nt][e] = -FC_INF;
                    }
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j is in shared memory; every warp is done reading K_j
        if (n_next >= 0) {
            load_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + n_next * k_row_stride, k_row_stride,
                                                         seqlen_k - n_next, head_dim);
            cp_async_commit();
        }

        // Online softmax (base 2): m_new = max(m, rowmax S); P = 2^(S*c - m_new*c); rescale O and l.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = row_max[mt][r];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
                mx = quad_max(mx);
                // A row with no visible key so far keeps max -inf; subtract 0 so exp2 stays 0, not NaN.
                const float mx_scaled = mx == -FC_INF ? 0.f : mx * softmax_scale_log2;
                const float alpha = fast_exp2(row_max[mt][r] * softmax_scale_log2 - mx_scaled);
                row_max[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float p = fast_exp2(fmaf(acc_s[mt][nt][e], softmax_scale_log2, -mx_scaled));
                        acc_s[mt][nt][e] = p;
                        sum += p;
                    }
                row_sum[mt][r] = row_sum[mt][r] * alpha + sum;  // per-lane partial; quad-reduced at the end
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) acc_o[mt][dt][2 * r] *= alpha, acc_o[mt][dt][2 * r + 1] *= alpha;
            }

        // Dropout: zero the dropped entries of P (l keeps the undropped sum: the LSE is the softmax's);
        // the 1 / (1 - p) scale is applied to O once, in the epilogue.
        if constexpr (DROPOUT && EARLY_KEEP) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int bit = (mt * NT + nt) * 4 + e;
                        if (!((keep_bits[bit / 32] >> (bit % 32)) & 1u)) acc_s[mt][nt][e] = 0.f;
                    }
        } else if constexpr (DROPOUT) {
            // The same Philox walk as the bits above, zeroing P in place. Both are
            // for_each_dropout_keep_m16n8 (flash_common.cuh) spelled out: through the helper LLVM orders
            // this kernel's instructions differently (-2..+4 registers in the dropout kernels, not yet
            // measured), and one helper writing bits in both cases spills the MT == 2 tiles (8-32 B).
            const u32 bh = (u32)batch * (u32)nheads + (u32)head;  // mod 2^32, as flashcupy/dropout.py
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int q2 = 0; q2 < NT / 2; ++q2) {
                    u32 r[4];
                    dropout_words(r, dropout, bh, m0 + warp_row0 + mt * 16, lane / 4, n0 + q2 * 16, lane % 4);
#pragma unroll
                    for (int ch = 0; ch < 2; ++ch)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!dropout_keep(r, e / 2, ch, e % 2, dropout.keep_threshold)) acc_s[mt][2 * q2 + ch][e] = 0.f;
                }
        }

        // O += P V_j: P (16 * MT, BLOCK_N) from registers as the A operand, V_j from shared memory.
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Elem::pack2(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
                a[mt][1] = Elem::pack2(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
                a[mt][2] = Elem::pack2(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
                a[mt][3] = Elem::pack2(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                u32 b[4];
                ldmatrix_x4_trans(b, v_lane + (kk * 16 * PITCH + dp * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(acc_o[mt][2 * dp], a[mt], b[0], b[1]);
                    Elem::mma(acc_o[mt][2 * dp + 1], a[mt], b[2], b[3]);
                }
            }
        }
        n0 = n_next;
    }

    // Epilogue: O /= l, LSE = m * scale + ln(l); rows with l == 0 (no visible key): O = 0, LSE = -inf.
    // Each warp stages its own rows of O in s_q (only it ever read those rows), then stores 16 bytes
    // per lane, coalesced.
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = quad_sum(row_sum[mt][r]);
            float inv_l = l > 0.f ? (DROPOUT ? dropout.scale : 1.f) / l : 0.f;
            const auto lse_keys = [&] { return l > 0.f ? row_max[mt][r] * softmax_scale + logf(l) : -FC_INF; };
            const RowEnd<FEAT, float> end(inv_l, lse_keys, sink);
            const int row = warp_row0 + mt * 16 + lane / 4 + r * 8;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const u32 packed = Elem::pack2(acc_o[mt][dt][2 * r] * inv_l, acc_o[mt][dt][2 * r + 1] * inv_l);
                *reinterpret_cast<u32*>(&s_q[row * PITCH + dt * 8 + (lane % 4) * 2]) = packed;
            }
            if (lane % 4 == 0 && m0 + row < seqlen_q)
                lse_tile[row] = end.stored(lse_keys);
        }
    __syncwarp();
    constexpr int CHUNKS = SmemRow<HEAD_DIM>::CHUNKS;
#pragma unroll
    for (int c = lane; c < MT * 16 * CHUNKS; c += 32) {
        const int row = warp_row0 + c / CHUNKS, col = (c % CHUNKS) * 8;
        if (m0 + row < seqlen_q && col < head_dim)
            *reinterpret_cast<uint4*>(o_tile + row * o_row_stride + col) =
                *reinterpret_cast<const uint4*>(&s_q[row * PITCH + col]);
    }
}
