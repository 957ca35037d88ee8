// flash_simt_fwd.cu: FlashAttention-2 forward in exact float32 / float64 on CUDA cores (FFMA / DFMA).
//
// One CTA per (query tile of BLOCK_M rows, head, batch); each warp owns WARP_M = BLOCK_M / NWARPS
// consecutive query rows, so the online softmax needs no inter-warp reduction (FA2, arXiv
// 2307.08691, Sec. 3.2). A warp is a (4 x 8) grid of lanes: lane (r, c) = (lane / 8, lane % 8)
// owns query rows warp_row0 + r + 4 i (i < TM), keys c + 8 j (j < TN) of each score tile, and
// output columns c * VEC + 8 VEC g + f (g < TG, f < VEC). Per key/value tile:
//   S = Q K_j^T            (micro-tile TM x TN per thread; mma_nt, Q and K both read along d)
//   online softmax on S    (row max / sum over the 8 lanes of a row by shuffles)
//   P -> shared memory     (each warp its own rows; P is re-read as the A operand of P V)
//   O = alpha O + P V_j    (micro-tile TM x TG*VEC; mma_nn)
// K and V tiles stream through shared memory with cp.async: V_j loads while S = Q K_j^T runs,
// K_{j+1} while the softmax and O += P V_j run (as flash_fwd.cu).
//
// float: softmax in base 2 (exp2 of log2e-scaled scores, ex2.approx, ~2 ulp) and float LSE.
// double: exp() of the CUDA math library (<= 1 ulp) and double LSE. Both: LSE in natural log.
//
// Versions (numbers in bench/NOTES.md, "fp32/fp64 SIMT kernels"):
//   v1  FA2 structure on CUDA cores, 4x8-lane warps, register micro-tiles, single-buffered K/V.
//   v1.1 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
//   v1.2 the element mask by Mask::visible_rt (one compare per element on diagonal tiles).
#include "flash_simt.cuh"

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_, int MIN_CTAS_>
struct SimtFwdTraits {
    using T = T_;
    static constexpr int HEAD_DIM = HEAD_DIM_;  // head_dim bucket; the runtime head_dim may be smaller
    static constexpr int BLOCK_M = BLOCK_M_;    // query rows per CTA
    static constexpr int BLOCK_N = BLOCK_N_;    // key rows per pipeline step
    static constexpr int NWARPS = NWARPS_;
    static constexpr int NTHREADS = NWARPS * 32;
    // __launch_bounds__ minimum CTAs per SM: 1 lets ptxas take up to 255 registers (NVRTC 13.5 capped
    // them at 128 and spilled otherwise); 3 or 4 ask for 170 / 128 registers, for configs whose shared
    // memory allows that many CTAs and whose occupancy, not the register blocking, bounds the speed.
    static constexpr int MIN_CTAS = MIN_CTAS_;
    static constexpr int VEC = Simt<T>::VEC;          // elements per 16-byte chunk
    static constexpr int WARP_M = BLOCK_M / NWARPS;   // query rows per warp
    static constexpr int TM = WARP_M / 4;             // rows per thread
    static constexpr int TN = BLOCK_N / 8;            // keys per thread (S)
    static constexpr int TG = HEAD_DIM / (8 * VEC);   // output column chunks per thread
    static constexpr int PITCH = HEAD_DIM + VEC;      // Q, K, V shared-memory row pitch (elements)
    static constexpr int P_PITCH = BLOCK_N + 2 * VEC;  // P row pitch: conflict-free stores and chunk loads
    static constexpr int SMEM_BYTES = ((BLOCK_M + 2 * BLOCK_N) * PITCH + BLOCK_M * P_PITCH) * (int)sizeof(T);
    static_assert(BLOCK_M % (4 * NWARPS) == 0, "each warp owns whole groups of 4 rows");
    static_assert(BLOCK_N % 8 == 0 && BLOCK_N % VEC == 0, "8 key lanes; P read in 16-byte chunks");
    static_assert(HEAD_DIM % (8 * VEC) == 0, "8 column lanes of 16-byte chunks");
};

// p.q, p.out: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim), of T;
// rows 16-byte aligned, head_dim a multiple of 8. p.lse: (batch, nheads, seqlen_q), of T. Scores enter
// the exp scaled by ScaleOf<T>::exp_scale (softmax_scale log2 e for float: base-2 softmax;
// softmax_scale for double). p.mask.causal is read at run time: it only changes loop bounds and the
// mask of diagonal tiles (flash_mask.cuh), and halves the specializations to build.
template <typename Tr, int FEAT = 0>
__global__ void __launch_bounds__(Tr::NTHREADS, Tr::MIN_CTAS)
flash_simt_fwd_kernel(const __grid_constant__ AttnParams p) {
    using T = typename Tr::T;
    using M = Simt<T>;
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, VEC = Tr::VEC;
    constexpr int TM = Tr::TM, TN = Tr::TN, TG = Tr::TG, WARP_M = Tr::WARP_M;
    constexpr int PITCH = Tr::PITCH, P_PITCH = Tr::P_PITCH, NTHREADS = Tr::NTHREADS;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* s_q = reinterpret_cast<T*>(smem_raw);  // (BLOCK_M, PITCH)
    T* s_k = s_q + BLOCK_M * PITCH;            // (BLOCK_N, PITCH)
    T* s_v = s_k + BLOCK_N * PITCH;            // (BLOCK_N, PITCH)
    T* s_p = s_v + BLOCK_N * PITCH;            // (BLOCK_M, P_PITCH); rows of warp w written and read by w only

    const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int lr = lane / 8, lc = lane % 8;  // lane row (0..3), lane column (0..7)
    const int warp_row0 = warp * WARP_M;      // first row of this warp in the tile
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
    const i64 o_row_stride = p.out.row_stride;
    const T scale_exp = ScaleOf<T>::exp_scale(p);
    const Mask mask = make_mask<FEAT>(p, p.mask.causal != 0);
    using Mod = ScoreMod<FEAT, T>;
    [[maybe_unused]] const Mod mod(p, batch, head);
    const T sink = sink_of<FEAT, T>(p, head);

    const T* q_tile = p.q.ptr<const T>(batch, head, m0);
    const T* k_head = p.k.ptr<const T>(batch, head_k);
    const T* v_head = p.v.ptr<const T>(batch, head_k);
    T* o_tile = p.out.ptr<T>(batch, head, m0);
    T* lse_tile = static_cast<T*>(p.lse) + stats_index(p, batch, head, m0);

    // Key tiles n_begin + j BLOCK_N, j < n_blocks, hold every key some row of this tile sees.
    int n_begin, n_blocks;
    mask.key_tiles<BLOCK_N>(m0, BLOCK_M, n_begin, n_blocks);

    // Per owned row i (tile row warp_row0 + lr + 4 i): running max of the raw scores, this lane's
    // part of the running sum of exp, and this lane's columns of O.
    T row_max[TM], row_sum[TM];
    T acc_o[TM][TG * VEC];  // (TM rows, TG chunks of VEC columns)
#pragma unroll
    for (int i = 0; i < TM; ++i) row_max[i] = -M::inf(), row_sum[i] = T(0);
    zero(acc_o);

    if (n_blocks > 0) {
        load_tile_simt<T, BLOCK_M, HEAD_DIM, PITCH, NTHREADS>(s_q, q_tile, q_row_stride, seqlen_q - m0, head_dim);
        load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s_k, k_head + n_begin * k_row_stride, k_row_stride,
                                                              seqlen_k - n_begin, head_dim);
        cp_async_commit();
    }

    const T* q_thr = s_q + (warp_row0 + lr) * PITCH;  // the thread's first Q row; rows 4 apart
    const T* k_thr = s_k + lc * PITCH;                // its first key row; keys 8 apart
    T* p_thr = s_p + (warp_row0 + lr) * P_PITCH;      // its first P row
    const T* v_thr = s_v + lc * VEC;                  // V row 0 at its first column chunk

    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = n_begin + j * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K_j is in shared memory; every warp is done reading V_{j-1}
        load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s_v, v_head + n0 * v_row_stride, v_row_stride,
                                                              seqlen_k - n0, head_dim);
        cp_async_commit();

        // A tile none of whose keys this warp's rows see adds nothing (warp-uniform).
        const bool warp_active = mask.any_visible(m0 + warp_row0, WARP_M, n0, BLOCK_N);
        if (warp_active) {
            // S = Q K_j^T: (TM, TN) per thread
            T acc_s[TM][TN];
            zero(acc_s);
            mma_nt<T, TM, TN, HEAD_DIM, PITCH, PITCH, 4, 8>(acc_s, q_thr, k_thr);

            // The score modifier, then -inf on masked elements; only tiles of this warp that need it.
            if constexpr (Mod::ACTIVE) {
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj)
                        acc_s[i][jj] = mod.apply(acc_s[i][jj], m0 + warp_row0 + lr + 4 * i, n0 + lc + 8 * jj);
            }
            if (mask.partial(m0 + warp_row0, WARP_M, n0, BLOCK_N)) {
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj)
                        if (!mask.visible_rt(m0 + warp_row0 + lr + 4 * i, n0 + lc + 8 * jj)) acc_s[i][jj] = -M::inf();
            }

            // Online softmax: m_new = max(m, rowmax S); P = exp(S*c - m_new*c); O and l rescaled by
            // alpha = exp(m*c - m_new*c), c = scale_exp.
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                T mx = row_max[i];
#pragma unroll
                for (int jj = 0; jj < TN; ++jj) mx = M::max(mx, acc_s[i][jj]);
                mx = max8(mx);
                // A row with no visible key so far keeps max -inf; subtract 0 so exp stays 0, not NaN.
                const T mx_scaled = mx == -M::inf() ? T(0) : mx * scale_exp;
                const T alpha = M::exp_base(row_max[i] * scale_exp - mx_scaled);
                row_max[i] = mx;
                T sum = T(0);
#pragma unroll
                for (int jj = 0; jj < TN; ++jj) {
                    const T pr = M::exp_base(fmadd(acc_s[i][jj], scale_exp, -mx_scaled));
                    sum += pr;
                    sts(p_thr + 4 * i * P_PITCH + lc + 8 * jj, pr);
                }
                row_sum[i] = row_sum[i] * alpha + sum;  // this lane's part; reduced over the row at the end
#pragma unroll
                for (int c = 0; c < TG * VEC; ++c) acc_o[i][c] *= alpha;
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j is in shared memory (and P); every warp is done reading K_j
        if (j + 1 < n_blocks) {
            load_tile_simt<T, BLOCK_N, HEAD_DIM, PITCH, NTHREADS>(s_k, k_head + (n0 + BLOCK_N) * k_row_stride,
                                                                  k_row_stride, seqlen_k - n0 - BLOCK_N, head_dim);
            cp_async_commit();
        }

        // O += P V_j: (TM, TG * VEC) per thread
        if (warp_active) mma_nn<T, TM, TG, BLOCK_N, P_PITCH, PITCH, 4, 8 * VEC>(acc_o, p_thr, v_thr);
    }

    // Epilogue: O /= l, LSE = m * scale + ln(l); rows with l == 0 (no visible key): O = 0, LSE = -inf.
    // Stores go straight from registers, 16 bytes per chunk (8 lanes of a row cover 8 * 16 bytes).
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const T l = sum8(row_sum[i]);
        T inv_l = l > T(0) ? T(1) / l : T(0);
        const auto lse_keys = [&] { return l > T(0) ? row_max[i] * ScaleOf<T>::scale(p) + M::log(l) : -M::inf(); };
        const RowEnd<FEAT, T> end(inv_l, lse_keys, sink);
        const int row = warp_row0 + lr + 4 * i;
        if (m0 + row < seqlen_q) {
#pragma unroll
            for (int g = 0; g < TG; ++g) {
                const int col = lc * VEC + g * 8 * VEC;
                if (col < head_dim) {
                    Chunk<T> c;
#pragma unroll
                    for (int f = 0; f < VEC; ++f) c.e[f] = acc_o[i][g * VEC + f] * inv_l;
                    *reinterpret_cast<Chunk<T>*>(o_tile + row * o_row_stride + col) = c;
                }
            }
            if (lc == 0) lse_tile[row] = end.stored(lse_keys);
        }
    }
}
