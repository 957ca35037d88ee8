// CPU emulation of the CUDA subset used by flash_simt*.cu: one std::thread per CUDA thread, blocks
// run one after another; shared memory accesses (lds/sts, cp.async) are checked by a race detector
// with barrier epochs; global memory is malloc'ed exactly (run under ASan for bounds).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <algorithm>
using std::min; using std::max;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__  // the one AttnParams argument, by value (emu.py fills a host copy)
#define FC_SIMT_SMEM_HOOKS 1
#define FC_DMMA_HOOKS 1
#define FC_MMA16_HOOKS 1  // flash_common.cuh's element types and PTX wrappers: the versions below

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
extern thread_local EmuDim threadIdx;
extern EmuDim blockIdx, gridDim, blockDim;
extern unsigned char* emu_smem;
extern size_t emu_smem_bytes;
void emu_fail(const char* what, size_t off);
void emu_syncthreads();
void emu_warp_sync();
extern thread_local int emu_tid;
extern unsigned long long emu_warp_slot[32][32];  // [warp][lane]
void emu_shadow_read(size_t off, size_t n, bool check_init = true);
void emu_shadow_write(size_t off, size_t n);

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
#define FC_INF __int_as_float(0x7f800000)
#define __syncthreads() emu_syncthreads()

inline float fast_exp2(float x) { return std::exp2f(x); }
inline u32 __umulhi(u32 a, u32 b) { return (u32)(((unsigned long long)a * b) >> 32); }
inline void __syncwarp(unsigned = 0xffffffffu);
template <typename V> inline V __ldg(const V* p) { return *p; }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }

inline size_t emu_off(const void* p) {
    auto o = (const unsigned char*)p - emu_smem;
    if (o < 0 || (size_t)o >= emu_smem_bytes) emu_fail("pointer outside shared memory", (size_t)o);
    return (size_t)o;
}
inline u32 smem_u32(const void* p) { return (u32)emu_off(p); }

struct EmuCopy { u32 dst; unsigned char data[16]; };
extern thread_local std::vector<EmuCopy> emu_pending;
inline void cp_async_16(u32 dst, const void* src, int src_bytes) {
    if (dst % 16) emu_fail("cp.async dst misaligned", dst);
    if ((uintptr_t)src % 16) emu_fail("cp.async src misaligned", 0);
    if (dst + 16 > emu_smem_bytes) emu_fail("cp.async dst out of smem", dst);
    EmuCopy c; c.dst = dst; std::memset(c.data, 0, 16);
    if (src_bytes) std::memcpy(c.data, src, src_bytes);  // ASan checks this read
    emu_shadow_write(dst, 16);  // the copy may land any time from now to the wait
    emu_pending.push_back(c);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {
    static_assert(N == 0, "emulator: wait_group 0 only");
    for (auto& c : emu_pending) { emu_shadow_write(c.dst, 16); std::memcpy(emu_smem + c.dst, c.data, 16); }
    emu_pending.clear();
}

template <typename V> inline V lds(const V* p) {
    size_t o = emu_off(p);
    if (sizeof(V) == 16 && o % 16) emu_fail("lds misaligned", o);
    emu_shadow_read(o, sizeof(V));
    return *p;
}
template <typename V> inline void sts(V* p, const V& x) {
    size_t o = emu_off(p);
    emu_shadow_write(o, sizeof(V));
    *p = x;
}

template <typename T> inline T __shfl_xor_sync(unsigned, T x, int m) {
    static_assert(sizeof(T) <= 8, "");
    const int w = emu_tid / 32, l = emu_tid % 32;
    std::memcpy(&emu_warp_slot[w][l], &x, sizeof(T));
    emu_warp_sync();
    T y; std::memcpy(&y, &emu_warp_slot[w][l ^ m], sizeof(T));
    emu_warp_sync();
    return y;
}
// mma.sync.aligned.m8n8k4.row.col.f64 as the PTX ISA defines its fragments (lane = 4 g + t):
// A[g][t] and B[t][g] come from lane 4 g + t; lane 4 g + t gets D[g][2t + e] = C + sum_k A[g][k] B[k][2t + e].
// The 4 products are summed in k order with fused multiply-adds (the hardware's order and
// rounding inside one instruction are not specified: any float64 order is within the tests' bound).
extern double emu_mma_a[32][32], emu_mma_a1[32][32], emu_mma_b[32][32];  // [warp][lane]
inline void dmma_m8n8k4(double (&c)[2], double a, double b) {
    const int w = emu_tid / 32, l = emu_tid % 32, g = l / 4, t = l % 4;
    emu_mma_a[w][l] = a;
    emu_mma_b[w][l] = b;
    emu_warp_sync();
    for (int e = 0; e < 2; ++e) {
        const int n = 2 * t + e;
        double acc = c[e];
        for (int k = 0; k < 4; ++k) acc = std::fma(emu_mma_a[w][4 * g + k], emu_mma_b[w][4 * n + k], acc);
        c[e] = acc;
    }
    emu_warp_sync();
}

// TF32 (allow_tf32): cvt.rna.tf32.f32 = round to 10 explicit mantissa bits, nearest, ties away from
// zero (add half of the dropped 13 bits to the magnitude, then clear them; inf / NaN unchanged).
inline float tf32_round(float x) {
    u32 u; std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    float y; std::memcpy(&y, &u, 4); return y;
}
inline float __uint_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
inline u32 __float_as_uint(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }
// mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 as the PTX ISA defines its fragments: lane 4g + t
// holds A[g][t] (a0), A[g + 8][t] (a1), B[t][g]; gets D[g + 8h][2t + e] (c[h][e]). Products of TF32
// values are exact in float32; summed in k order with float fused multiply-adds.
inline void tf32_m16n8k4(float (&c)[2][2], float a0, float a1, float b) {
    const int w = emu_tid / 32, l = emu_tid % 32, g = l / 4, t = l % 4;
    emu_mma_a[w][l] = a0;
    emu_mma_a1[w][l] = a1;
    emu_mma_b[w][l] = b;
    emu_warp_sync();
    for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
            const int n = 2 * t + e;
            float acc = c[h][e];
            for (int k = 0; k < 4; ++k)
                acc = std::fmaf((float)(h ? emu_mma_a1 : emu_mma_a)[w][4 * g + k], (float)emu_mma_b[w][4 * n + k], acc);
            c[h][e] = acc;
        }
    emu_warp_sync();
}

// cuda/flash_decode.cu: 16-byte loads as uint4, the fp16 / bf16 element tags of flash_common.cuh (here
// from the host's _Float16 and bit operations: to_float exact, pack2 round to nearest even as
// cvt.rn), __hiloint2double, __ffs.
struct alignas(16) uint4 { u32 x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline double __hiloint2double(int hi, int lo) {
    const unsigned long long u = ((unsigned long long)(u32)hi << 32) | (u32)lo;
    double d; std::memcpy(&d, &u, 8); return d;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} as the PTX ISA defines its fragments (lane = 4 g + t;
// each register two 16-bit elements, the lower column in bits 0..15): A a0 = A[g][2t, 2t+1], a1 = A[g+8][..],
// a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, ..]; B b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; D c0 = D[g][2t],
// c1 = D[g][2t+1], c2 = D[g+8][2t], c3 = D[g+8][2t+1]. Products of 16-bit values are exact in float32; the
// 16 are summed in k order with float fused multiply-adds (the hardware's order is not specified).
extern u32 emu_mma16_a[32][32][4], emu_mma16_b[32][32][2];  // [warp][lane]
template <typename Elem>
inline void emu_mma16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    const int w = emu_tid / 32, l = emu_tid % 32, g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) emu_mma16_a[w][l][i] = a[i];
    emu_mma16_b[w][l][0] = b0, emu_mma16_b[w][l][1] = b1;
    emu_warp_sync();
    auto half = [](u32 r, int hi) { return Elem::to_float((u16)(hi ? r >> 16 : r & 0xffffu)); };
    auto A = [&](int row, int k) {  // held by lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8)
        return half(emu_mma16_a[w][4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
    };
    auto B = [&](int k, int n) {  // lane 4 n + (k % 8) / 2, register k / 8
        return half(emu_mma16_b[w][4 * n + (k % 8) / 2][k / 8], k % 2);
    };
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc = std::fmaf(A(row, k), B(k, col), acc);
        c[e] = acc;
    }
    emu_warp_sync();
}
struct Fp16 {
    static u32 pack2(float lo, float hi) {
        _Float16 a = (_Float16)lo, b = (_Float16)hi;
        u16 ua, ub; std::memcpy(&ua, &a, 2); std::memcpy(&ub, &b, 2);
        return (u32)ua | ((u32)ub << 16);
    }
    static float to_float(u16 x) { _Float16 h; std::memcpy(&h, &x, 2); return (float)h; }
    static void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma16<Fp16>(c, a, b0, b1); }
};
struct Bf16 {
    static u16 round(float f) {
        u32 u; std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
        return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    static u32 pack2(float lo, float hi) { return (u32)round(lo) | ((u32)round(hi) << 16); }
    static float to_float(u16 x) { return __int_as_float(((u32)x) << 16); }
    static void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma16<Bf16>(c, a, b0, b1); }
};

// ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16: lanes 8i .. 8i + 7 give the (16-byte) row addresses
// of matrix i; register i of lane 4 g + t gets row g, elements 2t and 2t + 1 of matrix i, or with .trans
// elements (2t, g) and (2t + 1, g). Reads go through the race detector, without its never-written test:
// flash_fwd.cu / flash_bwd.cu also stage tiles (dS^T, O) by plain stores, which it does not see.
inline void emu_ldmatrix(u32* r, int count, u32 addr, bool trans) {
    const int w = emu_tid / 32, l = emu_tid % 32, g = l / 4, t = l % 4;
    emu_warp_slot[w][l] = addr;
    emu_warp_sync();
    auto elem = [&](int m, int row, int col) {
        const u32 a = (u32)emu_warp_slot[w][8 * m + row];
        if (a % 16) emu_fail("ldmatrix row address misaligned", a);
        if (a + 16 > emu_smem_bytes) emu_fail("ldmatrix row out of shared memory", a);
        emu_shadow_read(a + 2 * col, 2, false);
        u16 x; std::memcpy(&x, emu_smem + a + 2 * col, 2); return (u32)x;
    };
    for (int m = 0; m < count; ++m)
        r[m] = trans ? elem(m, 2 * t, g) | (elem(m, 2 * t + 1, g) << 16) : elem(m, g, 2 * t) | (elem(m, g, 2 * t + 1) << 16);
    emu_warp_sync();
}
inline void ldmatrix_x4(u32 (&r)[4], u32 addr) { emu_ldmatrix(r, 4, addr, false); }
inline void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) { emu_ldmatrix(r, 4, addr, true); }
inline void ldmatrix_x2_trans(u32 (&r)[2], u32 addr) { emu_ldmatrix(r, 2, addr, true); }
inline void __syncwarp(unsigned) { emu_warp_sync(); }

inline float atomicAdd(float* p, float x) { return std::atomic_ref<float>(*p).fetch_add(x); }
inline double atomicAdd(double* p, double x) { return std::atomic_ref<double>(*p).fetch_add(x); }

// launch: run fn on every thread of every block
void emu_launch(EmuDim grid, int nthreads, size_t smem_bytes, const std::function<void()>& fn);
