// flash_dmma_fwd.cu: FlashAttention-2 forward in float64 on the FP64 tensor cores (mma.sync .f64), and
// in float32 on the TF32 tensor cores (mma.sync m16n8k8 .tf32: the allow_tf32 path), one template over
// the element type T.
//
// One CTA per (query tile of BLOCK_M rows, head, batch); each warp owns WARP_M = 8 R8 consecutive
// query rows (R8 = 1 or 2), so the online softmax needs no inter-warp reduction (FA2, arXiv
// 2307.08691, Sec. 3.2). Per key/value tile of BLOCK_N keys:
//   S = Q K_j^T            (dmma_rows: Q and K read from swizzled shared memory, 16-byte chunks)
//   online softmax on S    (in registers; row max / sum over the 4 lanes of a C row)
//   O = alpha O + P V_j    (dmma_c_as_a: P never leaves registers, its C fragments are the A
//                           fragments of a permuted key order; V_j rows read in that order)
// K_j and V_j stream through shared memory with cp.async: V_j loads while S = Q K_j^T runs, K_{j+1}
// while the softmax and O += P V_j run (as flash_simt_fwd.cu and flash_fwd.cu).
//
// Numerics: T = double: every product is a float64 tensor-core FMA (round to nearest); softmax with
// the CUDA math library's exp() (<= 1 ulp), float64 LSE in natural log (as flash_simt_fwd_kernel<double>).
// T = float: Q, K, V and P rounded to TF32 (cvt.rna) before the products, float32 accumulation, softmax
// in float32 base 2 (ex2.approx; ScaleOf<float>::exp_scale = softmax_scale log2 e), float32 LSE in
// natural log.
//
// Versions (numbers in bench/NOTES.md, "fp64 on the FP64 tensor cores (DMMA)"):
//   v1  FA2 structure, m8n8k4 fragments (sm_90: m16n8k16 / m16n8k8 by KATOM), swizzled smem,
//       P in registers, single-buffered K/V.
//   v2  templated over T: float = TF32 m16n8k8 (16-row warps), 4 floats per 16-byte chunk.
//   v2.1 one AttnParams record (flash_params.cuh); tile ranges and element masks from flash_mask.cuh.
//   v2.2 the element mask by Mask::visible_rt (one compare per element on diagonal tiles).
#include "flash_dmma.cuh"

template <typename T_, int HEAD_DIM_, int BLOCK_M_, int BLOCK_N_, int NWARPS_, int KATOM_>
struct DmmaFwdTraits {
    using T = T_;                               // double (DMMA) or float (TF32)
    static constexpr int HEAD_DIM = HEAD_DIM_;  // head_dim bucket; the runtime head_dim may be smaller
    static constexpr int BLOCK_M = BLOCK_M_;    // query rows per CTA
    static constexpr int BLOCK_N = BLOCK_N_;    // keys per pipeline step
    static constexpr int NWARPS = NWARPS_;
    static constexpr int KATOM = KATOM_;        // double: 4 m8n8k4, 8 / 16 m16n8k8 / m16n8k16 on sm_90; float: 8
    static constexpr int CE = DmmaElem<T>::CE;  // elements per 16-byte chunk
    static constexpr int NTHREADS = NWARPS * 32;
    static constexpr int WARP_M = BLOCK_M / NWARPS;  // query rows per warp
    static constexpr int R8 = WARP_M / 8;            // 8-row groups per warp
    static constexpr int NT = BLOCK_N / 8;           // n8 tiles of S per warp
    static constexpr int DP = HEAD_DIM / (8 * CE);   // groups of CE n8 tiles of O per warp
    static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * HEAD_DIM * (int)sizeof(T);
    static_assert(WARP_M == 8 || WARP_M == 16, "a warp owns 8 or 16 rows");
    static_assert(BLOCK_N % 16 == 0 && HEAD_DIM % (8 * CE) == 0, "k16 steps over keys, whole chunk groups over d");
};

// p.q, p.out: (batch, seqlen_q, nheads, head_dim); p.k, p.v: (batch, seqlen_k, nheads_k, head_dim);
// p.lse: (batch, nheads, seqlen_q); all of T. Rows 16-byte aligned, head_dim a multiple of 8 (columns
// past it zero-filled, never stored). Scores enter the exp scaled by ScaleOf<T>::exp_scale (base e
// for double, base 2 for float). p.mask.causal is read at run time (uniform branches).
template <typename Tr, int FEAT = 0, typename T = typename Tr::T>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
flash_dmma_fwd_kernel(const __grid_constant__ AttnParams p) {
    constexpr int BLOCK_M = Tr::BLOCK_M, BLOCK_N = Tr::BLOCK_N, HEAD_DIM = Tr::HEAD_DIM, NTHREADS = Tr::NTHREADS;
    constexpr int R8 = Tr::R8, NT = Tr::NT, DP = Tr::DP, WARP_M = Tr::WARP_M, KATOM = Tr::KATOM;
    constexpr int CE = Tr::CE;
    const T inf = Simt<T>::inf();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* s_q = reinterpret_cast<T*>(smem_raw);  // (BLOCK_M, HEAD_DIM) swizzled
    T* s_k = s_q + BLOCK_M * HEAD_DIM;         // (BLOCK_N, HEAD_DIM) swizzled
    T* s_v = s_k + BLOCK_N * HEAD_DIM;         // (BLOCK_N, HEAD_DIM) swizzled

    const int m_block = gridDim.x - 1 - blockIdx.x;  // causal: the longest rows start first
    const int head = blockIdx.y, batch = blockIdx.z, head_k = head / p.group;
    const int m0 = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * WARP_M;  // first row of this warp in the tile
    const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, head_dim = p.head_dim;
    const i64 q_row_stride = p.q.row_stride, k_row_stride = p.k.row_stride, v_row_stride = p.v.row_stride;
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

    // Per owned row h (tile row warp_row0 + 8h + g): running max of the raw scores, this lane's part
    // of the running sum, and O's C fragments: acc_o[p][x][h][e] = O[row][8 CE p + CE (2t + e) + x].
    T row_max[R8], row_sum[R8];
    T acc_o[DP][CE][R8][2];
#pragma unroll
    for (int h = 0; h < R8; ++h) row_max[h] = -inf, row_sum[h] = 0.0;
    zero4(acc_o);

    if (n_blocks > 0) {
        load_tile_dmma<BLOCK_M, HEAD_DIM, NTHREADS>(s_q, q_tile, q_row_stride, seqlen_q - m0, head_dim);
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + n_begin * k_row_stride, k_row_stride,
                                                    seqlen_k - n_begin, head_dim);
        cp_async_commit();
    }

    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = n_begin + j * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K_j is in shared memory; every warp is done reading V_{j-1}
        load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_v, v_head + n0 * v_row_stride, v_row_stride, seqlen_k - n0,
                                                    head_dim);
        cp_async_commit();

        // A tile none of whose keys this warp's rows see adds nothing (warp-uniform).
        const bool warp_active = mask.any_visible(m0 + warp_row0, WARP_M, n0, BLOCK_N);
        T acc_s[NT][R8][2];  // S, then P: acc_s[jn][h][e] = (row 8h + g, key n0 + 8 jn + 2t + e)
        if (warp_active) {
            zero3(acc_s);
            dmma_rows<R8, NT, HEAD_DIM, KATOM>(acc_s, s_q, warp_row0, s_k, g, t);

            // The score modifier, then -inf on masked elements; only tiles of this warp that need it.
            if constexpr (Mod::ACTIVE) {
#pragma unroll
                for (int jn = 0; jn < NT; ++jn)
#pragma unroll
                    for (int h = 0; h < R8; ++h)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            acc_s[jn][h][e] =
                                mod.apply(acc_s[jn][h][e], m0 + warp_row0 + 8 * h + g, n0 + 8 * jn + 2 * t + e);
            }
            if (mask.partial(m0 + warp_row0, WARP_M, n0, BLOCK_N)) {
#pragma unroll
                for (int jn = 0; jn < NT; ++jn)
#pragma unroll
                    for (int h = 0; h < R8; ++h)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            if (!mask.visible_rt(m0 + warp_row0 + 8 * h + g, n0 + 8 * jn + 2 * t + e))
                                acc_s[jn][h][e] = -inf;
            }

            // Online softmax: m_new = max(m, rowmax S); P = exp(S c - m_new c); O, l scaled by
            // alpha = exp(m c - m_new c), c = scale_exp.
#pragma unroll
            for (int h = 0; h < R8; ++h) {
                T mx = row_max[h];
#pragma unroll
                for (int jn = 0; jn < NT; ++jn)
                    mx = Simt<T>::max(mx, Simt<T>::max(acc_s[jn][h][0], acc_s[jn][h][1]));
                mx = quad_max(mx);
                // A row with no visible key so far keeps max -inf; subtract 0 so exp stays 0, not NaN.
                const T mx_scaled = mx == -inf ? T(0) : mx * scale_exp;
                const T alpha = Simt<T>::exp_base(row_max[h] * scale_exp - mx_scaled);
                row_max[h] = mx;
                T sum = 0;
#pragma unroll
                for (int jn = 0; jn < NT; ++jn)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const T pr = Simt<T>::exp_base(fmadd(acc_s[jn][h][e], scale_exp, -mx_scaled));
                        acc_s[jn][h][e] = pr;
                        sum += pr;
                    }
                row_sum[h] = row_sum[h] * alpha + sum;  // this lane's part; reduced over the quad at the end
#pragma unroll
                for (int p = 0; p < DP; ++p)
#pragma unroll
                    for (int x = 0; x < CE; ++x) acc_o[p][x][h][0] *= alpha, acc_o[p][x][h][1] *= alpha;
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j is in shared memory; every warp is done reading K_j
        if (j + 1 < n_blocks) {
            load_tile_dmma<BLOCK_N, HEAD_DIM, NTHREADS>(s_k, k_head + (n0 + BLOCK_N) * k_row_stride, k_row_stride,
                                                        seqlen_k - n0 - BLOCK_N, head_dim);
            cp_async_commit();
        }

        // O += P V_j
        if (warp_active) dmma_c_as_a<R8, NT, DP, HEAD_DIM, KATOM>(acc_o, acc_s, s_v, 0, g, t);
    }

    // Epilogue: O /= l, LSE = m * scale + ln(l); rows with l == 0 (no visible key): O = 0, LSE = -inf.
    T inv_l[R8];
#pragma unroll
    for (int h = 0; h < R8; ++h) {
        const T l = quad_sum(row_sum[h]);
        inv_l[h] = l > T(0) ? T(1) / l : T(0);
        const auto lse_keys = [&] { return l > T(0) ? row_max[h] * ScaleOf<T>::scale(p) + Simt<T>::log(l) : -inf; };
        const RowEnd<FEAT, T> end(inv_l[h], lse_keys, sink);
        const int row = warp_row0 + 8 * h + g;
        if (t == 0 && m0 + row < seqlen_q) lse_tile[row] = end.stored(lse_keys);
#pragma unroll
        for (int p = 0; p < DP; ++p)
#pragma unroll
            for (int x = 0; x < CE; ++x) acc_o[p][x][h][0] *= inv_l[h], acc_o[p][x][h][1] *= inv_l[h];
    }
    store_c_pairs<DP, R8>(o_tile, p.out.row_stride, acc_o, T(1), 0, seqlen_q - m0, head_dim, warp_row0, g, t);
}
