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
void emu_shadow_read(size_t off, size_t n);
void emu_shadow_write(size_t off, size_t n);

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
#define FC_INF __int_as_float(0x7f800000)
#define __syncthreads() emu_syncthreads()

inline float fast_exp2(float x) { return std::exp2f(x); }
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
inline double __hiloint2double(int hi, int lo) {
    const unsigned long long u = ((unsigned long long)(u32)hi << 32) | (u32)lo;
    double d; std::memcpy(&d, &u, 8); return d;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
struct Fp16 {
    static u32 pack2(float lo, float hi) {
        _Float16 a = (_Float16)lo, b = (_Float16)hi;
        u16 ua, ub; std::memcpy(&ua, &a, 2); std::memcpy(&ub, &b, 2);
        return (u32)ua | ((u32)ub << 16);
    }
    static float to_float(u16 x) { _Float16 h; std::memcpy(&h, &x, 2); return (float)h; }
};
struct Bf16 {
    static u16 round(float f) {
        u32 u; std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
        return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    static u32 pack2(float lo, float hi) { return (u32)round(lo) | ((u32)round(hi) << 16); }
    static float to_float(u16 x) { return __int_as_float(((u32)x) << 16); }
};

inline float atomicAdd(float* p, float x) { return std::atomic_ref<float>(*p).fetch_add(x); }
inline double atomicAdd(double* p, double x) { return std::atomic_ref<double>(*p).fetch_add(x); }

// launch: run fn on every thread of every block
void emu_launch(EmuDim grid, int nthreads, size_t smem_bytes, const std::function<void()>& fn);
