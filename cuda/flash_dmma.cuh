// flash_dmma.cuh: building blocks of the float64 FlashAttention kernels on the FP64 tensor cores
// (DMMA: mma.sync .f64, sm_80+) and of the float32 kernels on the TF32 tensor cores (mma.sync
// m16n8k8 .tf32, sm_80+; the opt-in allow_tf32 path). Used by flash_dmma_fwd.cu and flash_dmma_bwd.cu,
// whose kernels are templates over the element type T (double or float).
//
// TF32 (T = float): mma.sync m16n8k8 .tf32 holds the same elements per lane as m16n8k8 .f64 (PTX ISA,
// "Matrix fragments for mma.m16n8k8" with .tf32: a0..a3 = (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4);
// b0, b1 = (t, g), (t + 4, g); c0..c3 = (g, 2t + e), (g + 8, 2t + e)), so every fragment below serves
// both types; TF32 warps own 16 rows. Operands are rounded to TF32 (cvt.rna: nearest, ties away from
// zero) as they are read into fragments; products are exact in float32 and accumulate in float32. A
// 16-byte chunk holds CE = 4 floats (2 doubles), so one "row" chunk gives 4 k-slices and one "C as A"
// chunk the B fragments of 4 output n8 tiles (columns d = 32p + 4n + x, x < 4).
//
// Fragments (PTX ISA, "Matrix fragments for mma.m8n8k4 with .f64"; CuTe SM80_8x8x4_F64F64F64F64_TN):
// lane = 4 g + t (g = groupID = lane / 4, t = threadID_in_group = lane % 4),
//   A (8 x 4, row):  the lane holds A[g][t]
//   B (4 x 8, col):  the lane holds B[t][g]
//   C/D (8 x 8):     the lane holds C[g][2t], C[g][2t + 1]
// Everything here is written in those m8n8k4 fragments. A warp tile of R8 = 1 or 2 groups of 8 rows
// is "a[h][kk]" (row 8h + g, slot t of k-slice kk), "b[kk]" (slot t of slice kk, column g) and
// "c[h][e]" (row 8h + g, column 2t + e). The sm_90 shapes m16n8k8 / m16n8k16 .f64 hold exactly the
// same elements (CuTe SM90_16x8x{8,16}_F64F64F64F64_TN: A a_{2kk+h} = row g + 8h, k = 4kk + t;
// B b_kk = k 4kk + t, column g; C c_{2h+e} = row g + 8h, column 2t + e), so dmma_k16 below may issue
// one m16n8k16, two m16n8k8 or 4 R8 m8n8k4 for the same fragments, by a template argument.
//
// The reduction index of a product may be permuted freely (consistently in A and B). Two
// permutations make every operand load a 16-byte LDS.128 and keep P in registers:
//   "row" loads (S = Q K^T, dP = dO V^T; reduction over d): slice pair (2m, 2m + 1) slot t = columns
//       8m + 2t, 8m + 2t + 1: one 16-byte chunk (chunk 4m + t of the row) gives slices 2m and 2m + 1.
//   "C as A" (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q; reduction over the columns of a C
//       tile): slice (n8 tile jn, e) slot t = column 8 jn + 2t + e, which the lane already holds as
//       c[jn][h][e]. The B operand B[column][d] is read as chunk 8p + g of row 8 jn + 2t + e: its two
//       doubles are the B fragments of output n8 tiles 2p and 2p + 1, whose columns are therefore
//       d = 16p + 2n + x (x = tile parity): the lane's C fragment of the pair is d = 16p + 4t + 0..3.
//
// Shared memory: tiles (ROWS, HEAD_DIM) of T, row pitch HEAD_DIM (no padding), 16-byte chunk c
// of row r stored at chunk c ^ dmma_swz(r). 128-bit loads run in 4 phases of 8 lanes; a phase of
// "row" loads touches rows 8j + {2i, 2i + 1} at 4 consecutive chunks, a phase of "C as A" loads rows
// 8j + e + {0, 2, 4, 6} at 2 consecutive chunks; with dmma_swz both land in 8 distinct 16-byte bank
// groups (no bank conflict), which no single padding achieves for both patterns.
#pragma once
#include "flash_simt.cuh"

// Chunk swizzle: bit 2 from the row's parity (row loads: rows 2i, 2i + 1 use opposite halves of a
// 128-byte line), bits 1..2 from (row / 2) % 4 (C-as-A loads: rows e + 2t, t < 4, distinct pairs).
// The same for floats: the load patterns are per 16-byte chunk, whatever it holds.
__device__ __forceinline__ int dmma_swz(int r) { return ((r & 1) << 2) ^ (((r >> 1) & 3) << 1); }

// ---------------------------------------------------------------------------------------------
// Element types: CE elements per 16-byte chunk; in() is the value the tensor core reads (TF32 rounding
// for float); the MMA instructions below.
// ---------------------------------------------------------------------------------------------
#ifndef FC_DMMA_HOOKS
// Round to TF32 (10 explicit mantissa bits), nearest with ties away from zero; the low 13 bits become 0.
__device__ __forceinline__ float tf32_round(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
}
#endif

template <typename T>
struct DmmaElem;
template <>
struct DmmaElem<double> {
    static constexpr int CE = 2;
    static __device__ __forceinline__ double in(double x) { return x; }
};
template <>
struct DmmaElem<float> {
    static constexpr int CE = 4;
    static __device__ __forceinline__ float in(float x) { return tf32_round(x); }
};

// Element offset of chunk c (16 bytes = CE elements) of row r in a swizzled (*, HEAD_DIM) tile.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ int dmma_off(int r, int c) {
    constexpr int CE = DmmaElem<T>::CE;
    static_assert(HEAD_DIM % (8 * CE) == 0, "the swizzle permutes chunks within 128-byte groups");
    return r * HEAD_DIM + (c ^ dmma_swz(r)) * CE;
}

template <int HEAD_DIM, typename T>
__device__ __forceinline__ Chunk<T> lds_dmma(const T* tile, int r, int c) {
    return lds_chunk(tile + dmma_off<T, HEAD_DIM>(r, c));
}

// Async copy of a (ROWS, HEAD_DIM) tile into a swizzled tile; rows >= rows_valid and columns >=
// head_dim are zero-filled without reading global memory. Row starts 16-byte aligned, head_dim a
// multiple of 8 (a chunk is inside the row or past it).
template <int ROWS, int HEAD_DIM, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_dmma(T* smem, const T* gmem, i64 row_stride, int rows_valid,
                                               int head_dim) {
    constexpr int CE = DmmaElem<T>::CE, CHUNKS = HEAD_DIM / CE;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, ch = c % CHUNKS, col = ch * CE;
        const bool ok = r < rows_valid && col < head_dim;
        cp_async_16(smem_u32(smem + dmma_off<T, HEAD_DIM>(r, ch)), ok ? gmem + r * row_stride + col : gmem, ok ? 16 : 0);
    }
}

// ---------------------------------------------------------------------------------------------
// The MMA instructions. The CPU emulator (bench/simt_emu) defines FC_DMMA_HOOKS and its own m8n8k4,
// m16n8k4 .tf32 and tf32_round.
// ---------------------------------------------------------------------------------------------
#ifndef FC_DMMA_HOOKS
// c (8x8) += a (8x4) b (4x8), fragments as above.
__device__ __forceinline__ void dmma_m8n8k4(double (&c)[2], double a, double b) {
    asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
        : "+d"(c[0]), "+d"(c[1])
        : "d"(a), "d"(b));
}
#endif

// c (8 R8 x 8) += a (8 R8 x 16) b (16 x 8): four k-slices. KATOM picks the instruction: 4 -> 4 R8
// m8n8k4 (sm_80+); 8 -> two m16n8k8, 16 -> one m16n8k16 (R8 = 2, sm_90 only; other archs fall back to
// m8n8k4, so every specialization builds everywhere).
template <int R8, int KATOM>
__device__ __forceinline__ void dmma_k16(double (&c)[R8][2], const double (&a)[R8][4], const double (&b)[4]) {
    static_assert(R8 == 1 || R8 == 2, "8 or 16 rows");
    static_assert(KATOM == 4 || ((KATOM == 8 || KATOM == 16) && R8 == 2), "m16 shapes need 16 rows");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(FC_DMMA_HOOKS)
    if constexpr (KATOM == 16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7,%8,%9,%10,%11}, {%12,%13,%14,%15}, {%0,%1,%2,%3};\n"
            : "+d"(c[0][0]), "+d"(c[0][1]), "+d"(c[R8 - 1][0]), "+d"(c[R8 - 1][1])
            : "d"(a[0][0]), "d"(a[R8 - 1][0]), "d"(a[0][1]), "d"(a[R8 - 1][1]), "d"(a[0][2]), "d"(a[R8 - 1][2]),
              "d"(a[0][3]), "d"(a[R8 - 1][3]), "d"(b[0]), "d"(b[1]), "d"(b[2]), "d"(b[3]));
        return;
    } else if constexpr (KATOM == 8) {
#pragma unroll
        for (int k2 = 0; k2 < 4; k2 += 2)
            asm("mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};\n"
                : "+d"(c[0][0]), "+d"(c[0][1]), "+d"(c[R8 - 1][0]), "+d"(c[R8 - 1][1])
                : "d"(a[0][k2]), "d"(a[R8 - 1][k2]), "d"(a[0][k2 + 1]), "d"(a[R8 - 1][k2 + 1]), "d"(b[k2]),
                  "d"(b[k2 + 1]));
        return;
    }
#endif
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int h = 0; h < R8; ++h) dmma_m8n8k4(c[h], a[h][kk], b[kk]);
}

// The TF32 version: c (16 x 8) += a (16 x 16) b (16 x 8), fragments already rounded to TF32 (in()).
// KATOM 8: two mma.sync m16n8k8 .tf32 (sm_80+); the emulator runs them as m16n8k4 halves.
template <int R8, int KATOM>
__device__ __forceinline__ void dmma_k16(float (&c)[R8][2], const float (&a)[R8][4], const float (&b)[4]) {
    static_assert(R8 == 2 && KATOM == 8, "TF32: 16-row warps, m16n8k8");
#ifndef FC_DMMA_HOOKS
#pragma unroll
    for (int k2 = 0; k2 < 4; k2 += 2)
        asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[1][0]), "+f"(c[1][1])
            : "r"(__float_as_uint(a[0][k2])), "r"(__float_as_uint(a[1][k2])), "r"(__float_as_uint(a[0][k2 + 1])),
              "r"(__float_as_uint(a[1][k2 + 1])), "r"(__float_as_uint(b[k2])), "r"(__float_as_uint(b[k2 + 1])));
#else
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) tf32_m16n8k4(c, a[0][kk], a[1][kk], b[kk]);
#endif
}

// Reductions over the 4 lanes of one C row (same g).
template <typename T>
__device__ __forceinline__ T quad_max(T x) {
    x = Simt<T>::max(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return Simt<T>::max(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
template <typename T>
__device__ __forceinline__ T quad_sum(T x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Warp-level products. The warp's rows are tile rows row0 + 8h + g (h < R8).
// ---------------------------------------------------------------------------------------------

#ifndef DMMA_ROWS_UNROLL
#define DMMA_ROWS_UNROLL 2
#endif

// acc[jn] (rows x 8 columns of n8 tile jn) += A B^T over d: A = rows row0.. of tile a, B = rows 8 jn..
// of tile b (both (*, HEAD_DIM) swizzled): S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T.
// Per 16 columns of d a lane reads CPS = 4 / CE chunks of each row: chunk 4 (CPS s + mm) + t holds slot t
// of k-slices CE mm + x (x < CE), columns 16 s + CE (4 mm + t) + x (doubles: the "row" permutation above).
template <int R8, int NT, int HEAD_DIM, int KATOM, typename T>
__device__ __forceinline__ void dmma_rows(T (&acc)[NT][R8][2], const T* a_tile, int row0, const T* b_tile, int g,
                                          int t) {
    constexpr int CE = DmmaElem<T>::CE, CPS = 4 / CE;  // chunks per row per 16 columns
    // Only addresses depend on s: a partial unroll bounds the loads in flight (registers).
#pragma unroll DMMA_ROWS_UNROLL
    for (int s = 0; s < HEAD_DIM / 16; ++s) {
        T a[R8][4];
#pragma unroll
        for (int h = 0; h < R8; ++h)
#pragma unroll
            for (int mm = 0; mm < CPS; ++mm) {
                const Chunk<T> x = lds_dmma<HEAD_DIM>(a_tile, row0 + 8 * h + g, 4 * (CPS * s + mm) + t);
#pragma unroll
                for (int i = 0; i < CE; ++i) a[h][CE * mm + i] = DmmaElem<T>::in(x.e[i]);
            }
#pragma unroll
        for (int jn = 0; jn < NT; ++jn) {
            T b[4];
#pragma unroll
            for (int mm = 0; mm < CPS; ++mm) {
                const Chunk<T> x = lds_dmma<HEAD_DIM>(b_tile, 8 * jn + g, 4 * (CPS * s + mm) + t);
#pragma unroll
                for (int i = 0; i < CE; ++i) b[CE * mm + i] = DmmaElem<T>::in(x.e[i]);
            }
            dmma_k16<R8, KATOM>(acc[jn], a, b);
        }
    }
}

// acc[p][x] (rows x d = 8 CE (p0 + p) + CE n + x) += C X: C (rows x 8 NT columns) in registers as C
// fragments, X = (8 NT, HEAD_DIM) swizzled tile whose row r is C's column r. DPN output groups of CE
// n8 tiles starting at group p0. O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <int R8, int NT, int DPN, int HEAD_DIM, int KATOM, typename T>
__device__ __forceinline__ void dmma_c_as_a(T (&acc)[DPN][DmmaElem<T>::CE][R8][2], const T (&cf)[NT][R8][2],
                                            const T* x_tile, int p0, int g, int t) {
    constexpr int CE = DmmaElem<T>::CE;
    static_assert(NT % 2 == 0, "16 reduction columns per step");
#pragma unroll
    for (int qk = 0; qk < NT / 2; ++qk) {
        T a[R8][4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int h = 0; h < R8; ++h) a[h][2 * jj + e] = DmmaElem<T>::in(cf[2 * qk + jj][h][e]);
#pragma unroll
        for (int p = 0; p < DPN; ++p) {
            T b[CE][4];
#pragma unroll
            for (int jj = 0; jj < 2; ++jj)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const Chunk<T> x = lds_dmma<HEAD_DIM>(x_tile, 8 * (2 * qk + jj) + 2 * t + e, 8 * (p0 + p) + g);
#pragma unroll
                    for (int i = 0; i < CE; ++i) b[i][2 * jj + e] = DmmaElem<T>::in(x.e[i]);
                }
#pragma unroll
            for (int i = 0; i < CE; ++i) dmma_k16<R8, KATOM>(acc[p][i], a, b[i]);
        }
    }
}

template <int A, int B, int C, int D, typename T>
__device__ __forceinline__ void zero4(T (&x)[A][B][C][D]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int k = 0; k < C; ++k)
#pragma unroll
                for (int l = 0; l < D; ++l) x[i][j][k][l] = T(0);
}
template <int A, int B, int C, typename T>
__device__ __forceinline__ void zero3(T (&x)[A][B][C]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
#pragma unroll
            for (int k = 0; k < C; ++k) x[i][j][k] = T(0);
}

// Store a (rows x d groups) C-fragment accumulator times `mul` to global memory: the lane's row 8h + g
// of the tile (if row_ok[h]), columns d = 8 CE (p0 + p) + CE (2t + e) + x, x < CE: one 16-byte chunk
// per (p, e), stored if it starts below head_dim.
template <int DPN, int R8, typename T>
__device__ __forceinline__ void store_c_pairs(T* tile, i64 row_stride, const T (&acc)[DPN][DmmaElem<T>::CE][R8][2],
                                              T mul, int p0, int rows_valid, int head_dim, int row0, int g, int t) {
    constexpr int CE = DmmaElem<T>::CE;
#pragma unroll
    for (int h = 0; h < R8; ++h) {
        const int row = row0 + 8 * h + g;
        if (row >= rows_valid) continue;
#pragma unroll
        for (int p = 0; p < DPN; ++p)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * CE * (p0 + p) + CE * (2 * t + e);
                if (col >= head_dim) continue;
                Chunk<T> c;
#pragma unroll
                for (int i = 0; i < CE; ++i) c.e[i] = acc[p][i][h][e] * mul;
                *reinterpret_cast<Chunk<T>*>(tile + row * row_stride + col) = c;
            }
    }
}
