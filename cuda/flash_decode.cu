// flash_decode.cu: attention of a few query rows over a long KV cache, split over the keys
// (flash-decoding: Dao et al., "Flash-Decoding for long-context inference", 2023; the split-and-merge
// is FlashAttention's rescaling, arXiv 2205.14135 Sec. 3.1, across CTAs).
//
// Decoding is a memory-bound read of K and V: for each (batch row, KV head) only group * seqlen_q
// query rows (the GQA heads that share the KV head, times the new tokens) attend, so one CTA takes
// all of them (ROWS rows: the "several query heads per KV head in one CTA" packing) and the key range
// is split across num_splits CTAs (grid (num_splits, nheads_k * row chunks, batch)) to fill the GPU.
//
// Inside a CTA: a key row is LPK lanes x CPL 16-byte chunks (every lane holds CPL * VEC elements of
// that row, VEC = 16 / sizeof(T)); a warp streams 32 / LPK keys per pass, U passes per iteration, each
// key group (LPK lanes) keeping its own online softmax (m, l, O) for the ROWS rows; K and V chunks of
// an iteration are all loaded before any is used (U * CPL * 2 loads in flight per lane). Scores are
// dot products over the lane's elements, summed over the LPK lanes by butterfly shuffles; every
// product and sum is in the compute type C (float for fp16 / bf16 / fp32, double for fp64), P is not
// rounded to T (CUDA-core FMAs). At the end the key groups of a warp merge by shuffles and the warps
// through shared memory; with one split the CTA writes out (T) and lse, else o_accum / lse_accum
// (C, normalised by the split's own l), which flash_decode_combine_kernel merges.
//
// The mask and score layer (flash_mask.cuh) with the row's own lengths: row b's keys are
// [0, seqused_k[b]), its queries 0..seqlen_q-1 aligned to the end (causal / window bottom-right);
// ALiBi per query head; a sink is added where the row ends (one split: here; else in the combine).
// Paged KV (PAGED): key t of row b is slot t % page_size of page block_table[b, t / page_size]
// (p.k / p.v: (num_blocks, page_size, nheads_k, head_dim), batch_stride = one page).
//
// Versions (numbers in bench/NOTES.md, "Split-KV decode kernel"; old ones in bench/experiments/):
//   v1  CUDA-core dot products, butterfly reductions, one online softmax per key group.
//   v2  K / V staged as raw 16-byte chunks, the next iteration's loaded before this one's arithmetic;
//       scores of all rows first, then the softmax, then P V (one key's chunks converted at a time).
//   v3  paged: page-table entries read one iteration ahead of the K / V loads they address.
#include "flash_common.cuh"
#include "flash_simt.cuh"

// Element types: storage S, compute C, VEC elements per 16 bytes, chunk -> C and C -> T stores.
template <typename E>
struct DecodeElem;
template <typename H>  // Fp16 / Bf16: two 16-bit values per 32-bit word
struct DecodeElem16 {
    using S = u16;  // storage
    using C = float;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ void convert(C (&x)[VEC], const uint4& w) {
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) x[2 * i] = H::to_float((u16)(ws[i] & 0xffff)), x[2 * i + 1] = H::to_float((u16)(ws[i] >> 16));
    }
    static __device__ __forceinline__ void load(C (&x)[VEC], const void* src) {
        convert(x, __ldg(reinterpret_cast<const uint4*>(src)));
    }
    static __device__ __forceinline__ void store(void* dst, const C (&x)[VEC]) {
        uint4 w;
        w.x = H::pack2(x[0], x[1]), w.y = H::pack2(x[2], x[3]), w.z = H::pack2(x[4], x[5]), w.w = H::pack2(x[6], x[7]);
        *reinterpret_cast<uint4*>(dst) = w;
    }
};
template <> struct DecodeElem<Fp16> : DecodeElem16<Fp16> {};
template <> struct DecodeElem<Bf16> : DecodeElem16<Bf16> {};
template <typename F>  // float / double: the chunk is the values
struct DecodeElemWide {
    using S = F;
    using C = F;
    static constexpr int VEC = 16 / sizeof(F);
    static __device__ __forceinline__ void convert(C (&x)[VEC], const uint4& w) {
        if constexpr (sizeof(F) == 4) {
            x[0] = __int_as_float(w.x), x[1] = __int_as_float(w.y), x[2] = __int_as_float(w.z), x[3] = __int_as_float(w.w);
        } else {
            x[0] = __hiloint2double(w.y, w.x), x[1] = __hiloint2double(w.w, w.z);
        }
    }
    static __device__ __forceinline__ void load(C (&x)[VEC], const void* src) {
        convert(x, __ldg(reinterpret_cast<const uint4*>(src)));  // one 128-bit read-only load
    }
    static __device__ __forceinline__ void store(void* dst, const C (&x)[VEC]) {
        Chunk<F> c;
#pragma unroll
        for (int i = 0; i < VEC; ++i) c.e[i] = x[i];
        *reinterpret_cast<Chunk<F>*>(dst) = c;
    }
};
template <> struct DecodeElem<float> : DecodeElemWide<float> {};
template <> struct DecodeElem<double> : DecodeElemWide<double> {};

template <typename E_, int HEAD_DIM_, int ROWS_, int U_, int NWARPS_ = 4>
struct DecodeTraits {
    using E = E_;
    using El = DecodeElem<E>;
    using S = typename El::S;
    using C = typename El::C;
    static constexpr int HEAD_DIM = HEAD_DIM_;  // exact head_dim (a power of two, 32..256)
    static constexpr int ROWS = ROWS_;          // query rows per CTA (group * seqlen_q, or a chunk of it)
    static constexpr int U = U_;                // passes per iteration (loads in flight)
    static constexpr int NWARPS = NWARPS_;
    static constexpr int NTHREADS = 32 * NWARPS;
    // __launch_bounds__ minimum CTAs per SM: without one NVRTC's ptxas capped the registers near 96 and
    // spilled; 3 (<= 168 registers) keeps three CTAs' loads in flight per SM, 2 for the larger row counts,
    // float64, and the paged / featured kernels (their page-table reads and score modifiers spilled at 168)
    static constexpr int MIN_CTAS = ROWS <= 4 && sizeof(C) == 4 ? 3 : 2;
    static constexpr int VEC = El::VEC;
    static constexpr int CHUNKS = HEAD_DIM / VEC;                // 16-byte chunks per key row
    static constexpr int LPK = CHUNKS < 32 ? CHUNKS : 32;        // lanes per key
    static constexpr int CPL = CHUNKS / LPK;                     // chunks per lane
    static constexpr int KPW = 32 / LPK;                         // keys per warp per pass
    static constexpr int KT = U * NWARPS * KPW;                  // keys per CTA iteration
    static constexpr int SMEM_BYTES = NWARPS * ROWS * (HEAD_DIM + 2) * (int)sizeof(C);
    static_assert(CHUNKS % LPK == 0 && (LPK & (LPK - 1)) == 0, "head_dim: a power-of-two number of chunks");
};

template <typename C> __device__ __forceinline__ C exp_c(C x);
template <> __device__ __forceinline__ float exp_c<float>(float x) { return fast_exp2(x); }
template <> __device__ __forceinline__ double exp_c<double>(double x) { return ::exp(x); }
template <typename C> __device__ __forceinline__ C shfl_xor(C x, int m) { return __shfl_xor_sync(0xffffffffu, x, m); }

template <typename Tr, int FEAT = 0, bool PAGED = false>
__global__ void __launch_bounds__(Tr::NTHREADS, FEAT == 0 && !PAGED ? Tr::MIN_CTAS : 2)
flash_decode_kernel(const __grid_constant__ AttnParams p) {
    using S = typename Tr::S;
    using El = typename Tr::El;
    using C = typename Tr::C;
    constexpr int ROWS = Tr::ROWS, U = Tr::U, VEC = Tr::VEC, LPK = Tr::LPK, CPL = Tr::CPL, KPW = Tr::KPW;
    constexpr int NWARPS = Tr::NWARPS, KT = Tr::KT, HEAD_DIM = Tr::HEAD_DIM;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    C* s_o = reinterpret_cast<C*>(smem_raw);          // (NWARPS, ROWS, HEAD_DIM)
    C* s_ml = s_o + NWARPS * ROWS * HEAD_DIM;          // (NWARPS, ROWS, 2): m, l

    const int split = blockIdx.x, batch = blockIdx.z;
    const int chunks_per_head = (p.group * p.seqlen_q + ROWS - 1) / ROWS;
    const int head_k = blockIdx.y / chunks_per_head, r0 = blockIdx.y % chunks_per_head * ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kgroup = lane / LPK, sub = lane % LPK;
    const int seqlen_q = p.seqlen_q, nrows = p.group * seqlen_q;
    const int seqlen_k = __ldg(p.seqused_k + batch);
    const Mask mask(p, seqlen_q, seqlen_k, p.mask.causal != 0, (FEAT & FEAT_LOCAL) != 0);
    const C scale_exp = ScaleOf<C>::exp_scale(p);
    const int* table = PAGED ? p.block_table + batch * p.block_table_stride : nullptr;
    const int page_shift = PAGED ? __ffs(p.page_size) - 1 : 0;

    // this CTA's rows: r = r0 + i (i < ROWS) is query row qi = r % seqlen_q of head head_k * group + r / seqlen_q
    C q[ROWS][CPL][VEC];
    int qrow[ROWS], head[ROWS];
    using Mod = ScoreMod<FEAT, C>;
    [[maybe_unused]] Mod mod[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const int r = min(r0 + i, nrows - 1);  // rows past nrows repeat the last (never stored)
        qrow[i] = r % seqlen_q, head[i] = head_k * p.group + r / seqlen_q;
        if constexpr (Mod::ACTIVE) mod[i] = Mod(p, batch, head[i], seqlen_q, seqlen_k);
#pragma unroll
        for (int c = 0; c < CPL; ++c) El::load(q[i][c], p.q.ptr<const S>(batch, head[i], qrow[i]) + (sub + c * LPK) * VEC);
    }
    // the keys any of the CTA's query rows sees, split evenly (in whole iterations) over the splits
    int qlo = seqlen_q, qhi = -1;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) qlo = min(qlo, qrow[i]), qhi = max(qhi, qrow[i]);
    const int kbeg = mask.key_begin(qlo), kend = mask.key_end(qhi);
    const int per_split = (max(kend - kbeg, 0) + p.num_splits * KT - 1) / (p.num_splits * KT) * KT;
    const int k_lo = kbeg + split * per_split, k_hi = min(kend, k_lo + per_split);

    C m[ROWS], l[ROWS], o[ROWS][CPL][VEC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        m[i] = neg_inf<C>(), l[i] = C(0);
#pragma unroll
        for (int c = 0; c < CPL; ++c)
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[i][c][e] = C(0);
    }
    // K and V of an iteration as raw 16-byte chunks (4 registers each, converted where used); the next
    // iteration's are loaded before this one is computed (v2: the loads of one iteration overlap the
    // arithmetic of the previous one)
    uint4 kr[U][CPL], vr[U][CPL];
    // paged: the page of each of a lane's keys, read one iteration before its K / V loads (v3), so the
    // page-table read and the loads it addresses are not one dependent chain of two memory latencies
    auto key_at = [&](int k0, int u) { return k0 + (u * NWARPS + warp) * KPW + kgroup; };  // this lane's key of pass u
    auto key_of = [&](int k0, int u) { return min(key_at(k0, u), k_hi - 1); };  // to load: past the range a valid row, masked
    auto pages_of = [&](int (&pg)[U], int k0) {
        if constexpr (PAGED) {
#pragma unroll
            for (int u = 0; u < U; ++u) pg[u] = __ldg(table + (key_of(k0, u) >> page_shift));
        }
    };
    auto load_iteration = [&](uint4 (&kd)[U][CPL], uint4 (&vd)[U][CPL], int k0, const int (&pg)[U]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kk = key_of(k0, u);
            const S* kp = PAGED ? p.k.ptr<const S>(pg[u], head_k, kk & (p.page_size - 1)) : p.k.ptr<const S>(batch, head_k, kk);
            const S* vp = PAGED ? p.v.ptr<const S>(pg[u], head_k, kk & (p.page_size - 1)) : p.v.ptr<const S>(batch, head_k, kk);
#pragma unroll
            for (int c = 0; c < CPL; ++c) kd[u][c] = __ldg(reinterpret_cast<const uint4*>(kp + (sub + c * LPK) * VEC));
#pragma unroll
            for (int c = 0; c < CPL; ++c) vd[u][c] = __ldg(reinterpret_cast<const uint4*>(vp + (sub + c * LPK) * VEC));
        }
    };
    [[maybe_unused]] int pg[U];  // paged: the pages of the next iteration to load
    if (k_lo < k_hi) {
        pages_of(pg, k_lo);
        load_iteration(kr, vr, k_lo, pg);
        pages_of(pg, k_lo + KT);
    }
    for (int k0 = k_lo; k0 < k_hi; k0 += KT) {
        uint4 kn[U][CPL], vn[U][CPL];
        if (k0 + KT < k_hi) {
            load_iteration(kn, vn, k0 + KT, pg);
            pages_of(pg, k0 + 2 * KT);
        }
        int key[U];
#pragma unroll
        for (int u = 0; u < U; ++u) key[u] = key_at(k0, u);
        // scores of every (row, key): one key's chunks converted at a time, dot products, butterfly sums
        C s[ROWS][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            C kx[CPL][VEC];
#pragma unroll
            for (int c = 0; c < CPL; ++c) El::convert(kx[c], kr[u][c]);
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                C acc = C(0);
#pragma unroll
                for (int c = 0; c < CPL; ++c)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc = fmadd(q[i][c][e], kx[c][e], acc);
#pragma unroll
                for (int off = LPK / 2; off > 0; off /= 2) acc += shfl_xor(acc, off);
                if constexpr (Mod::ACTIVE) acc = mod[i].apply(acc, qrow[i], key[u]);
                s[i][u] = key[u] < k_hi && mask.visible(qrow[i], key[u]) ? acc * scale_exp : neg_inf<C>();
            }
        }
        // online softmax per row: s becomes P (0 where masked), O and l rescaled to the new max
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            C mx = m[i];
#pragma unroll
            for (int u = 0; u < U; ++u) mx = Simt<C>::max(mx, s[i][u]);
            const bool any = mx != neg_inf<C>();  // nothing visible yet in this key group: O, l stay 0
            const C alpha = any ? exp_c(m[i] - mx) : C(1);  // exp(-inf) = 0 on the first visible key
            m[i] = mx, l[i] *= alpha;
#pragma unroll
            for (int c = 0; c < CPL; ++c)
#pragma unroll
                for (int e = 0; e < VEC; ++e) o[i][c][e] *= alpha;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                s[i][u] = any ? exp_c(s[i][u] - mx) : C(0);
                l[i] += s[i][u];
            }
        }
        // O += P V: one key's value chunks converted at a time
#pragma unroll
        for (int u = 0; u < U; ++u) {
            C vx[CPL][VEC];
#pragma unroll
            for (int c = 0; c < CPL; ++c) El::convert(vx[c], vr[u][c]);
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
#pragma unroll
                for (int c = 0; c < CPL; ++c)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) o[i][c][e] = fmadd(s[i][u], vx[c][e], o[i][c][e]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int c = 0; c < CPL; ++c) kr[u][c] = kn[u][c], vr[u][c] = vn[u][c];
    }
    // merge the KPW key groups of the warp (lanes sub + LPK g hold the same elements)
#pragma unroll
    for (int off = LPK; off < 32; off *= 2) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const C m2 = shfl_xor(m[i], off), l2 = shfl_xor(l[i], off);
            const C mx = Simt<C>::max(m[i], m2);
            const C a = mx == neg_inf<C>() ? C(0) : exp_c(m[i] - mx), b = mx == neg_inf<C>() ? C(0) : exp_c(m2 - mx);
            l[i] = l[i] * a + l2 * b;
#pragma unroll
            for (int c = 0; c < CPL; ++c)
#pragma unroll
                for (int e = 0; e < VEC; ++e) o[i][c][e] = o[i][c][e] * a + shfl_xor(o[i][c][e], off) * b;
            m[i] = mx;
        }
    }
    // merge the warps through shared memory: warp w's (m, l, O) at s_o[w], then each thread one column
    if (kgroup == 0) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
#pragma unroll
            for (int c = 0; c < CPL; ++c)
#pragma unroll
                for (int e = 0; e < VEC; ++e) sts(&s_o[(warp * ROWS + i) * HEAD_DIM + (sub + c * LPK) * VEC + e], o[i][c][e]);
            if (sub == 0) sts(&s_ml[(warp * ROWS + i) * 2], m[i]), sts(&s_ml[(warp * ROWS + i) * 2 + 1], l[i]);
        }
    }
    __syncthreads();
    // one thread per (row, chunk of VEC columns): the warps' partial results rescaled to their common max
    constexpr int CHUNKS = Tr::CHUNKS;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += Tr::NTHREADS) {
        const int i = idx / CHUNKS, d = idx % CHUNKS * VEC;
        if (r0 + i >= nrows) break;  // idx grows with i: every later one is past nrows too
        C mx = neg_inf<C>();
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) mx = Simt<C>::max(mx, lds(&s_ml[(w * ROWS + i) * 2]));
        C lsum = C(0), x[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = C(0);
        if (mx != neg_inf<C>()) {
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const C a = exp_c(lds(&s_ml[(w * ROWS + i) * 2]) - mx);
                lsum += a * lds(&s_ml[(w * ROWS + i) * 2 + 1]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) x[e] += a * lds(&s_o[(w * ROWS + i) * HEAD_DIM + d + e]);
            }
        }
        const int r = r0 + i, h = head_k * p.group + r / seqlen_q, qi = r % seqlen_q;
        // the keys' lse in natural log (float kernels: m in log2(e)-scaled units)
        C lse = lsum > C(0) ? mx / Simt<C>::log_base() + Simt<C>::log(lsum) : neg_inf<C>();
        C o_scale = lsum > C(0) ? C(1) / lsum : C(0);
        if (p.num_splits > 1) {  // the split's partial: normalised by its own l; the combine adds the sink
            const i64 row = (((i64)split * p.batch + batch) * p.nheads + h) * seqlen_q + qi;
            C* dst = static_cast<C*>(p.o_accum) + row * HEAD_DIM + d;
#pragma unroll
            for (int e = 0; e < VEC; ++e) dst[e] = x[e] * o_scale;
            if (d == 0) static_cast<C*>(p.lse_accum)[row] = lse;
        } else {
            if constexpr ((FEAT & FEAT_SINK) != 0) add_sink(o_scale, lse, sink_of<FEAT, C>(p, h));
#pragma unroll
            for (int e = 0; e < VEC; ++e) x[e] *= o_scale;
            El::store(p.out.ptr<S>(batch, h, qi) + d, x);
            if (d == 0) static_cast<C*>(p.lse)[stats_index(p, batch, h, qi)] = lse;
        }
    }
}

// Merge the num_splits partial results of one (batch, head, query row): lse = logaddexp over the
// splits (-inf for an empty one), out = sum_s exp(lse_s - lse) o_s, then the sink. One warp per row,
// lanes over the row's 16-byte chunks (HEAD_DIM / VEC of them, lane ch, ch + 32, ...).
template <typename E, int HEAD_DIM, int FEAT = 0>
__global__ void __launch_bounds__(128)
flash_decode_combine_kernel(const __grid_constant__ AttnParams p) {
    using El = DecodeElem<E>;
    using S = typename El::S;
    using C = typename El::C;
    constexpr int VEC = El::VEC, CHUNKS = HEAD_DIM / VEC;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const i64 rows = (i64)p.batch * p.nheads * p.seqlen_q;
    const i64 row = (i64)blockIdx.x * 4 + warp;  // (batch, head, query row)
    if (row >= rows) return;
    const int qi = (int)(row % p.seqlen_q), h = (int)(row / p.seqlen_q % p.nheads);
    const C* lse_s = static_cast<const C*>(p.lse_accum);
    const C* o_s = static_cast<const C*>(p.o_accum);
    const int ns = p.num_splits;
    C mx = neg_inf<C>();
    for (int s = lane; s < ns; s += 32) mx = Simt<C>::max(mx, lse_s[s * rows + row]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = Simt<C>::max(mx, shfl_xor(mx, off));
    const C base = mx == neg_inf<C>() ? C(0) : mx;
    C sum = C(0);
    for (int s = lane; s < ns; s += 32) sum += m_exp(lse_s[s * rows + row] - base);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += shfl_xor(sum, off);
    C lse = sum > C(0) ? base + Simt<C>::log(sum) : neg_inf<C>();
    C o_scale = sum > C(0) ? C(1) : C(0);
    if constexpr ((FEAT & FEAT_SINK) != 0) add_sink(o_scale, lse, sink_of<FEAT, C>(p, h));
    for (int ch = lane; ch < CHUNKS; ch += 32) {
        C x[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = C(0);
        if (sum > C(0)) {
            for (int s = 0; s < ns; ++s) {
                const C ls = lse_s[s * rows + row];
                if (ls == neg_inf<C>()) continue;
                const C w = m_exp(ls - base) / sum;
#pragma unroll
                for (int e = 0; e < VEC; ++e) x[e] += w * o_s[(s * rows + row) * HEAD_DIM + ch * VEC + e];
            }
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] *= o_scale;
        const int batch = (int)(row / ((i64)p.seqlen_q * p.nheads));
        El::store(p.out.ptr<S>(batch, h, qi) + ch * VEC, x);
    }
    if (lane == 0) static_cast<C*>(p.lse)[row] = lse;
}
