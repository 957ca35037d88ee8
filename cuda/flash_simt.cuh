// flash_simt.cuh: building blocks of the float32 / float64 FlashAttention kernels on CUDA cores.
//
// Exact IEEE arithmetic: every product-sum is an FFMA (float) or DFMA (double), no tensor cores
// and no TF32. The matrix products are register-blocked outer products, as in a SIMT GEMM: each
// thread owns a small micro-tile of the output and, per step of the reduction, reads one 16-byte
// chunk (4 floats / 2 doubles) of each operand row it needs from shared memory (LDS.128).
//
// Tiles in shared memory are row-major with a pitch of HEAD_DIM + VEC elements (16 bytes of
// padding): the 4 (or 8) consecutive rows a warp reads in one instruction then fall in distinct
// 16-byte bank groups, so every operand load is one wavefront (see flash_simt_fwd.cu).
//
// Every shared-memory access goes through lds()/sts() so that a CPU emulator can instrument them
// (it defines FC_SIMT_SMEM_HOOKS and its own versions); on the GPU they are plain loads/stores.
#pragma once
// flash_mask.cuh (AttnParams, ScaleOf, Mask, ScoreMod) comes with flash_common.cuh too; named here for the
// CPU emulator, which replaces flash_common.cuh.
#include "flash_common.cuh"
#include "flash_mask.cuh"

// ---------------------------------------------------------------------------------------------
// Element type traits: float computes softmax in base 2 (exp2 of log2e-scaled scores, one MUFU
// op); double uses the correctly rounded-to-1-ulp exp() of the CUDA math library.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Simt;

template <>
struct Simt<float> {
    static constexpr int VEC = 4;  // elements per 16-byte chunk
    static __device__ __forceinline__ float inf() { return FC_INF; }
    // The natural-log LSE times log_base() is the LSE in the exp base (flash_simt_bwd_preprocess_kernel).
    static __device__ __forceinline__ float log_base() { return 1.4426950408889634f; }  // log2(e)
    // exp in the kernel's base: 2^x. ex2.approx: max rel. error 2^-22 (~2 ulp).
    static __device__ __forceinline__ float exp_base(float x) { return fast_exp2(x); }
    static __device__ __forceinline__ float log(float x) { return logf(x); }
    static __device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
};
__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }

template <>
struct Simt<double> {
    static constexpr int VEC = 2;
    static __device__ __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000ll); }
    static __device__ __forceinline__ double log_base() { return 1.0; }  // base e
    static __device__ __forceinline__ double exp_base(double x) { return ::exp(x); }
    static __device__ __forceinline__ double log(double x) { return ::log(x); }
    static __device__ __forceinline__ double max(double a, double b) { return fmax(a, b); }
};
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

// 16 bytes of T (4 floats or 2 doubles); loads and stores of it are single 128-bit instructions.
template <typename T>
struct __align__(16) Chunk {
    T e[16 / sizeof(T)];
};

#ifndef FC_SIMT_SMEM_HOOKS
template <typename V>
__device__ __forceinline__ V lds(const V* p) { return *p; }
template <typename V>
__device__ __forceinline__ void sts(V* p, const V& x) { *p = x; }
#endif

template <typename T>
__device__ __forceinline__ Chunk<T> lds_chunk(const T* p) {
    return lds(reinterpret_cast<const Chunk<T>*>(p));
}

// Reductions over the 8 lanes that hold one row of a (4 x 8)-lane warp tile (lane % 8 differ).
template <typename T>
__device__ __forceinline__ T max8(T x) {
#pragma unroll
    for (int m = 1; m < 8; m *= 2) x = Simt<T>::max(x, __shfl_xor_sync(0xffffffffu, x, m));
    return x;
}
template <typename T>
__device__ __forceinline__ T sum8(T x) {
#pragma unroll
    for (int m = 1; m < 8; m *= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// ---------------------------------------------------------------------------------------------
// Async copy of a (ROWS, HEAD_DIM) tile of T into shared memory rows of PITCH elements, in 16-byte
// chunks (cp.async.cg). Rows >= rows_valid and columns >= head_dim are zero-filled without reading
// global memory. head_dim is a multiple of 8 and row starts are 16-byte aligned (the Python side
// copies inputs that are not: flashcupy._gpu.kernel_ready).
// ---------------------------------------------------------------------------------------------
template <typename T, int ROWS, int HEAD_DIM, int PITCH, int NTHREADS>
__device__ __forceinline__ void load_tile_simt(T* smem, const T* gmem, i64 row_stride, int rows_valid,
                                               int head_dim) {
    constexpr int VEC = Simt<T>::VEC, CHUNKS = HEAD_DIM / VEC;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * VEC;
        const bool ok = r < rows_valid && col < head_dim;
        cp_async_16(smem_u32(smem + r * PITCH + col), ok ? gmem + r * row_stride + col : gmem, ok ? 16 : 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels. Each adds one product into a thread's register tile `acc`. The thread's rows of
// an operand are `a + i * RS * PA` (i < TM): a row stride RS in rows, so a warp reads consecutive
// rows; K (the reduction length) is a compile-time multiple of VEC. Summation over the reduction
// index is sequential, one FMA per term, in increasing index order.
// ---------------------------------------------------------------------------------------------

// acc[i][j] += sum_k A[i][k] * B[j][k]: both operands row-major along k ("NT": S = Q K^T, dP = dO V^T).
// a: the thread's first row of A (pitch PA, rows RSA apart); b: its first row of B (pitch PB, RSB apart).
template <typename T, int TM, int TN, int K, int PA, int PB, int RSA, int RSB>
__device__ __forceinline__ void mma_nt(T (&acc)[TM][TN], const T* a, const T* b) {
    constexpr int VEC = Simt<T>::VEC;
#pragma unroll 2
    for (int k = 0; k < K; k += VEC) {
        Chunk<T> av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = lds_chunk(a + i * RSA * PA + k);
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = lds_chunk(b + j * RSB * PB + k);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmadd(av[i].e[e], bv[j].e[e], acc[i][j]);
    }
}

// acc[i][g * VEC + f] += sum_k A[i][k] * B[k][c_g + f]  ("NN": O += P V, dQ += dS K).
// a: the thread's first row of A (pitch PA, rows RSA apart); b: B's row 0 at the thread's first
// column chunk (pitch PB); column chunk g starts CS elements after chunk g - 1.
template <typename T, int TM, int TG, int K, int PA, int PB, int RSA, int CS>
__device__ __forceinline__ void mma_nn(T (&acc)[TM][TG * Simt<T>::VEC], const T* a, const T* b) {
    constexpr int VEC = Simt<T>::VEC;
#pragma unroll 2
    for (int k = 0; k < K; k += VEC) {
        Chunk<T> av[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = lds_chunk(a + i * RSA * PA + k);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            Chunk<T> bv[TG];
#pragma unroll
            for (int g = 0; g < TG; ++g) bv[g] = lds_chunk(b + (k + e) * PB + g * CS);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int g = 0; g < TG; ++g)
#pragma unroll
                    for (int f = 0; f < VEC; ++f)
                        acc[i][g * VEC + f] = fmadd(av[i].e[e], bv[g].e[f], acc[i][g * VEC + f]);
        }
    }
}

// acc[g * VEC + e][h * VEC + f] += sum_m X[m][x_g + e] * Y[m][y_h + f]  ("TN": dV += P^T dO,
// dK += dS^T Q). x, y: row 0 at the thread's first column chunk; chunks CSX / CSY elements apart.
template <typename T, int TGX, int TGY, int M, int PX, int PY, int CSX, int CSY>
__device__ __forceinline__ void mma_tn(T (&acc)[TGX * Simt<T>::VEC][TGY * Simt<T>::VEC], const T* x,
                                       const T* y) {
    constexpr int VEC = Simt<T>::VEC;
#pragma unroll 2
    for (int m = 0; m < M; ++m) {
        Chunk<T> xv[TGX], yv[TGY];
#pragma unroll
        for (int g = 0; g < TGX; ++g) xv[g] = lds_chunk(x + m * PX + g * CSX);
#pragma unroll
        for (int h = 0; h < TGY; ++h) yv[h] = lds_chunk(y + m * PY + h * CSY);
#pragma unroll
        for (int g = 0; g < TGX; ++g)
#pragma unroll
            for (int e = 0; e < VEC; ++e)
#pragma unroll
                for (int h = 0; h < TGY; ++h)
#pragma unroll
                    for (int f = 0; f < VEC; ++f)
                        acc[g * VEC + e][h * VEC + f] = fmadd(xv[g].e[e], yv[h].e[f], acc[g * VEC + e][h * VEC + f]);
    }
}

template <typename T, int R, int C>
__device__ __forceinline__ void zero(T (&acc)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) acc[i][j] = T(0);
}
