// flash_sm90.cuh: the Hopper (sm_90a) primitives of the wgmma family, as thin inline-PTX wrappers:
// TMA tensor-map tile loads, raw mbarrier phase waits, warpgroup register reallocation, wgmma
// fences and shared-memory matrix descriptors. PTX ISA 8.x sections: cp.async.bulk.tensor (9.7.9.25),
// mbarrier (9.7.13.15), setmaxnreg (9.7.17.1), wgmma (9.7.15). Compiled only with -arch=sm_90a.
#pragma once
#include "flash_common.cuh"

typedef unsigned long long u64;

// A CUtensorMap (cuTensorMapEncodeTiled's 128 opaque bytes), passed by value inside a
// __grid_constant__ kernel parameter so that its generic address can be handed to the TMA unit.
struct alignas(64) TmaDesc {
    u64 w[16];
};

__device__ __forceinline__ u64 tma_addr(const TmaDesc& d) { return reinterpret_cast<u64>(&d); }

// ---- mbarrier (a 64-bit barrier in shared memory: an arrival count plus a transaction byte count) ----
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) before anyone uses them.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `parity` has completed (a fresh barrier is in phase 0, so waiting for
// parity 1 returns at once: the producer's first pass over its empty barriers).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred P1;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// ---- TMA: a 4-D box (d, head, row, batch) of a tensor map into shared memory, completing on bar ----
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc& map, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(tma_addr(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// ---- warpgroup register reallocation (producer gives registers to the consumers) ----
template <int REGS>
__device__ __forceinline__ void regs_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS)); }
template <int REGS>
__device__ __forceinline__ void regs_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS)); }

// ---- named barriers (ids 1..15; 0 is __syncthreads): nthreads, a multiple of 32, take part ----
__device__ __forceinline__ void named_bar_sync(int id, int nthreads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int nthreads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

// ---- wgmma ordering ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// A wgmma shared-memory matrix descriptor (PTX ISA 9.7.15.5.1) for the 128-byte swizzle that TMA's
// CU_TENSOR_MAP_SWIZZLE_128B writes: start address, leading and stride byte offsets (16-byte units),
// base offset 0 (atoms 1024-byte aligned), layout type 1 = 128B swizzle.
//   K-major tile (rows of 64 16-bit elements = 128 B, 8-row atoms of 1024 B): lbo unused, sbo = 1024.
//   MN-major tile (the same bytes read transposed): lbo = bytes between 64-column panels, sbo = 1024.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) |
           (1ull << 62);
}

// ---- proxies and 1-D bulk copies (PTX ISA 9.7.9.25.4, 9.7.9.24.7, membar/fence 9.7.12.4) ----
// Generic-proxy writes to shared memory (st.shared) made visible to the async proxy (wgmma operands,
// bulk copies that read them); every writing thread fences before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// bytes (a multiple of 16, both addresses 16-byte aligned) from global memory into shared memory,
// completing on bar's transaction count.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
// dst[i] += src[i] (float32, bytes / 4 of them) in global memory, from shared memory; a bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// At most N bulk groups pending: .read, their shared-memory sources have been read (may be reused);
// without it, the writes to global memory have completed too.
template <int N>
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory"); }

// A counter in global memory as a turnstile (deterministic reductions): sem_wait_eq spins (acquire, GPU
// scope) until *sem == value; sem_release adds 1 (release, GPU scope) after this thread's completed bulk
// writes (bulk_wait<0>) are ordered before it for the generic proxy (fence.proxy.async.global).
__device__ __forceinline__ void sem_wait_eq(const int* sem, int value) {
    int v;
    do {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(sem) : "memory");
    } while (v != value);
    asm volatile("fence.proxy.async.global;\n" ::: "memory");  // later bulk operations see what came before
}
__device__ __forceinline__ void sem_release(int* sem) {
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
}

// Byte offset of element (row, col) of a 16-bit tile stored as TMA's 128-byte swizzle writes it:
// 64-column panels of `rows` rows, 128 bytes per row, the 16-byte chunk index XORed with row % 8.
__device__ __forceinline__ u32 swizzle128_offset(int row, int col, int rows) {
    return (u32)((col / 64) * rows * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) * 16) + (col % 8) * 2);
}
