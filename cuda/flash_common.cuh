// flash_common.cuh: what every flashcupy kernel shares.
//
// Needs no CUDA header at all (NVRTC compiles it with no include path, so CI can build every
// specialization from the NVRTC wheel alone): 16-bit elements are stored as raw `unsigned short`
// and converted with PTX. Tensor-core instructions are the sm_80 set (mma.sync m16n8k16,
// ldmatrix, cp.async), which also runs on sm_90.
#pragma once
#include "flash_mask.cuh"

#define FC_INF __int_as_float(0x7f800000)
#define FC_LOG2E 1.4426950408889634f
#define FC_LN2 0.6931471805599453f

// ---------------------------------------------------------------------------------------------
// Element types: a tag per 16-bit dtype; the kernels are templates over it. These and the PTX
// wrappers below are the only inline PTX here: the CPU emulator (bench/simt_emu) defines
// FC_MMA16_HOOKS and its own versions (from the PTX ISA's fragment layouts); on the GPU it is unset.
// ---------------------------------------------------------------------------------------------
#ifndef FC_MMA16_HOOKS
struct Fp16 {
    // Two floats -> one register of two fp16 (lo in bits 0..15), round to nearest even.
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ float to_float(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x));
        return f;
    }
    // D (16x8, f32) += A (16x16, row) * B (16x8, col)
    static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct Bf16 {
    static __device__ __forceinline__ u32 pack2(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ float to_float(u16 x) { return __int_as_float(((u32)x) << 16); }
    static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16-byte async copy global -> shared; src_bytes = 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Two 8x8 b16 matrices, transposed; lanes 0..15 give the row addresses.
__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// 2^x, one MUFU instruction; 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#endif  // FC_MMA16_HOOKS

// Let this thread's async copies land (commit, then wait for every group): for a CTA that leaves before
// the loop that would have waited for them (a backward key tile that no query sees, under a left window).
__device__ __forceinline__ void cp_async_drain() {
    cp_async_commit();
    cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Tiles in shared memory: row-major, each row padded by 8 elements (16 bytes) so that the 8 row
// addresses of an ldmatrix phase fall in distinct bank groups for every head dim we build
// (row pitch (HEAD_DIM + 8) * 2 bytes = 4 words mod 32 for HEAD_DIM % 64 == 0, 20 otherwise).
// ---------------------------------------------------------------------------------------------
template <int HEAD_DIM>
struct SmemRow {
    static constexpr int PITCH = HEAD_DIM + 8;  // elements per shared-memory row
    static constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
};

// Async-copy a (ROWS, HEAD_DIM) tile; rows >= rows_valid and columns >= head_dim are zero-filled
// without reading global memory (never out of bounds). head_dim is a multiple of 8.
// When the thread count is a multiple of the chunks per row, each thread keeps one column and one
// pointer and steps down the rows (few live registers); otherwise it walks the flat chunk index.
template <int ROWS, int HEAD_DIM, int NTHREADS>
__device__ __forceinline__ void load_tile_async(u16* smem, const u16* gmem, i64 row_stride,
                                                int rows_valid, int head_dim) {
    constexpr int CHUNKS = SmemRow<HEAD_DIM>::CHUNKS, PITCH = SmemRow<HEAD_DIM>::PITCH;
    if constexpr (NTHREADS % CHUNKS == 0) {
        constexpr int ROW_STEP = NTHREADS / CHUNKS;
        const int r0 = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * 8;
        const bool col_ok = col < head_dim;
        const u16* src = gmem + r0 * row_stride + col;
        u32 dst = smem_u32(smem) + (r0 * PITCH + col) * 2;
#pragma unroll
        for (int r = r0; r < ROWS; r += ROW_STEP) {
            const bool ok = col_ok && r < rows_valid;
            cp_async_16(dst, ok ? src : gmem, ok ? 16 : 0);
            src += ROW_STEP * row_stride;
            dst += ROW_STEP * PITCH * 2;
        }
    } else {
        const u32 base = smem_u32(smem);
#pragma unroll 1
        for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
            const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
            const bool ok = r < rows_valid && col < head_dim;
            cp_async_16(base + (r * PITCH + col) * 2, ok ? gmem + r * row_stride + col : gmem, ok ? 16 : 0);
        }
    }
}

// D = rowsum(dO o O) of one row (batch, head, row) of the backward's preprocess: the 32 lanes of a
// warp each read 8 elements per step; every lane returns the sum. head_dim a multiple of 8.
template <typename Elem>
__device__ __forceinline__ float rowsum_dout_out(const AttnParams& p, int batch, int head, int row, int lane) {
    const u16* a = p.dout.ptr<const u16>(batch, head, row);
    const u16* b = p.out.ptr<const u16>(batch, head, row);
    float sum = 0.f;
    for (int c = lane * 8; c < p.head_dim; c += 256) {
        const uint4 x = *reinterpret_cast<const uint4*>(a + c), y = *reinterpret_cast<const uint4*>(b + c);
        const u16* xs = reinterpret_cast<const u16*>(&x);
        const u16* ys = reinterpret_cast<const u16*>(&y);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum = fmaf(Elem::to_float(xs[e]), Elem::to_float(ys[e]), sum);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    return sum;
}

// ---------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 (Salmon et al., SC 2011); the element -> (counter, word, half) map is
// documented in flashcupy/dropout.py, which computes the same bits on the host.
// ---------------------------------------------------------------------------------------------
// (DropoutParams: flash_params.cuh.)
__device__ __forceinline__ void philox4x32_10(u32 (&r)[4], u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        const u32 lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
        const u32 lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
        c0 = hi1 ^ c1 ^ k0, c1 = lo1, c2 = hi0 ^ c3 ^ k1, c3 = lo0;
    }
    r[0] = c0, r[1] = c1, r[2] = c2, r[3] = c3;
}

// The 8 keep decisions of one Philox call: rows {i, i + 8} x columns {2t, 2t+1, 2t+8, 2t+9} of a
// 16 x 16 block, for i = row0 + (0..7) (row0 % 16 == 0), t = 0..3, column block col0 (% 16 == 0).
__device__ __forceinline__ void dropout_words(u32 (&r)[4], const DropoutParams& dp, u32 bh, int row0, int i7,
                                              int col0, int t) {
    philox4x32_10(r, (u32)((col0 >> 4) * 4 + t), (u32)((row0 >> 4) * 8 + i7), bh, dp.offset, dp.seed_lo, dp.seed_hi);
}
// Element (row half rh, column half ch, column parity par) of such a call: kept?
__device__ __forceinline__ bool dropout_keep(const u32 (&r)[4], int rh, int ch, int par, u32 threshold) {
    return ((r[2 * rh + ch] >> (16 * par)) & 0xFFFFu) < threshold;
}

// The m16n8 accumulator layout (mma.sync's C fragment, and each warp's part of a wgmma m64 tile):
// element e of n8 tile nt of m16 tile mt holds row row0 + 16 mt + lane / 4 + 8 (e / 2), key
// n0 + 8 nt + 2 (lane % 4) + e % 2. Two passes over it that every fp16/bf16 forward-type kernel makes:

// The dropout keep bit of every element, f(mt, nt, e, keep), from one Philox call per 16 x 16 block
// (flashcupy/dropout.py draws the same bits on the host).
template <int MT, int NT, typename F>
__device__ __forceinline__ void for_each_dropout_keep_m16n8(const DropoutParams& dp, u32 bh, int row0, int n0, int lane,
                                                            F&& f) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int q2 = 0; q2 < NT / 2; ++q2) {
            u32 r[4];
            dropout_words(r, dp, bh, row0 + mt * 16, lane / 4, n0 + q2 * 16, lane % 4);
#pragma unroll
            for (int ch = 0; ch < 2; ++ch)
#pragma unroll
                for (int e = 0; e < 4; ++e) f(mt, 2 * q2 + ch, e, dropout_keep(r, e / 2, ch, e % 2, dp.keep_threshold));
        }
}

// The score modifier (flash_mask.cuh's ScoreMod) on raw scores in that layout.
template <int MT, int NT, typename Mod>
__device__ __forceinline__ void apply_score_mod_m16n8(float (&acc)[MT][NT][4], const Mod& mod, int row0, int n0,
                                                      int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[mt][nt][e] = mod.apply(acc[mt][nt][e], row0 + mt * 16 + lane / 4 + (e / 2) * 8, n0 + nt * 8 + (lane % 4) * 2 + (e % 2));
}

// Quad reductions: the four lanes that hold one accumulator row (lane / 4 equal).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
