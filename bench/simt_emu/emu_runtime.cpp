#include "emu_common.h"
#include <memory>
thread_local EmuDim threadIdx;
EmuDim blockIdx, gridDim, blockDim;
unsigned char* emu_smem = nullptr;
size_t emu_smem_bytes = 0;
thread_local int emu_tid = 0;
thread_local std::vector<EmuCopy> emu_pending;
unsigned long long emu_warp_slot[32][32];
double emu_mma_a[32][32], emu_mma_a1[32][32], emu_mma_b[32][32];
u32 emu_mma16_a[32][32][4], emu_mma16_b[32][32][2];
static std::unique_ptr<std::barrier<std::function<void()>>> g_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
static std::atomic<int> g_epoch{0};
static std::mutex g_shadow_mu;
struct Shadow { int w_epoch = -1, w_thread = -1, r_epoch = -1, r_thread = -1; bool init = false; };
static std::vector<Shadow> g_shadow;
int emu_errors = 0;
static char g_first_error[512];
extern "C" const char* emu_first_error() { return g_first_error; }
extern "C" int emu_error_count() { return emu_errors; }
extern "C" void emu_reset_errors() { emu_errors = 0; g_first_error[0] = 0; }

void emu_fail(const char* what, size_t off) {
    std::lock_guard<std::mutex> g(g_shadow_mu);
    if (emu_errors++ == 0)
        snprintf(g_first_error, sizeof g_first_error, "%s: smem offset %zu, thread %d, block (%u,%u,%u), epoch %d",
                 what, off, emu_tid, blockIdx.x, blockIdx.y, blockIdx.z, g_epoch.load());
}
static void fail_locked(const char* what, size_t off) {
    if (emu_errors++ == 0)
        snprintf(g_first_error, sizeof g_first_error, "%s: smem offset %zu, thread %d, block (%u,%u,%u), epoch %d",
                 what, off, emu_tid, blockIdx.x, blockIdx.y, blockIdx.z, g_epoch.load());
}
void emu_shadow_read(size_t off, size_t n, bool check_init) {
    std::lock_guard<std::mutex> g(g_shadow_mu);
    int e = g_epoch.load();
    for (size_t w = off / 4; w < (off + n + 3) / 4; ++w) {
        Shadow& s = g_shadow[w];
        if (check_init && !s.init) fail_locked("read of never-written shared memory", w * 4);
        if (s.w_epoch == e && s.w_thread != emu_tid) fail_locked("race: read after another thread's write in one barrier interval", w * 4);
        if (s.r_epoch != e) s.r_epoch = e, s.r_thread = emu_tid;
        else if (s.r_thread != emu_tid) s.r_thread = -2;
    }
}
void emu_shadow_write(size_t off, size_t n) {
    std::lock_guard<std::mutex> g(g_shadow_mu);
    int e = g_epoch.load();
    for (size_t w = off / 4; w < (off + n + 3) / 4; ++w) {
        Shadow& s = g_shadow[w];
        if (s.w_epoch == e && s.w_thread != emu_tid) fail_locked("race: two threads write in one barrier interval", w * 4);
        if (s.r_epoch == e && s.r_thread != emu_tid) fail_locked("race: write after another thread's read in one barrier interval", w * 4);
        s.w_epoch = e, s.w_thread = emu_tid, s.init = true;
    }
}
void emu_syncthreads() {
    if (!emu_pending.empty()) { /* allowed: copies in flight across a barrier */ }
    g_block_bar->arrive_and_wait();
}
void emu_warp_sync() { g_warp_bars[emu_tid / 32]->arrive_and_wait(); }

void emu_launch(EmuDim grid, int nthreads, size_t smem_bytes, const std::function<void()>& fn) {
    gridDim = grid;
    blockDim = EmuDim{(unsigned)nthreads, 1, 1};
    std::vector<unsigned char> dummy;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = EmuDim{x, y, z};
                emu_smem = (unsigned char*)malloc(smem_bytes);
                memset(emu_smem, 0xff, smem_bytes);  // NaN pattern
                emu_smem_bytes = smem_bytes;
                g_shadow.assign((smem_bytes + 3) / 4, Shadow{});
                g_epoch = 0;
                g_block_bar = std::make_unique<std::barrier<std::function<void()>>>(nthreads, std::function<void()>([] { g_epoch++; }));
                g_warp_bars.clear();
                for (int w = 0; w < (nthreads + 31) / 32; ++w) g_warp_bars.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> ths;
                for (int t = 0; t < nthreads; ++t)
                    ths.emplace_back([t, &fn] {
                        threadIdx = EmuDim{(unsigned)t, 0, 0};
                        emu_tid = t;
                        emu_pending.clear();
                        fn();
                        if (!emu_pending.empty()) emu_fail("cp.async never waited for", 0);
                        // exited threads leave the block barrier
                        g_block_bar->arrive_and_drop();
                    });
                for (auto& th : ths) th.join();
                free(emu_smem);
                emu_smem = nullptr;
            }
}
