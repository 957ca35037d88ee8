"""Run flashcupy's SIMT and DMMA kernels (cuda/flash_simt_*.cu, cuda/flash_dmma_*.cu) on the CPU: flashcupy._gpu_simt driven with
NumPy arrays and emulated launches (emu_common.h, emu_runtime.cpp). See README.md."""
import ctypes, hashlib, os, re, subprocess, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root
from flashcupy import _build

BUILD = os.environ.get("EMU_BUILD", os.path.expanduser("~/.cache/flashcupy-simt-emu"))
os.makedirs(BUILD, exist_ok=True)
ASAN = os.environ.get("EMU_ASAN", "1") == "1"

INVOKER = r'''
#include <utility>
#include <type_traits>
template <typename... A, size_t... I>
static void emu_invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <typename... A> static void emu_call(void (*f)(A...), void** args) {
    emu_invoke(f, args, std::index_sequence_for<A...>{});
}
extern "C" void emu_run(unsigned gx, unsigned gy, unsigned gz, int nthreads, size_t smem, void** args) {
    auto fp = &KERNEL;
    emu_launch(EmuDim{gx, gy, gz}, nthreads, smem, [&] { emu_call(fp, args); });
}
extern "C" void* emu_malloc(size_t n) { return malloc(n); }
extern "C" void emu_free(void* p) { free(p); }
'''

def source(filename):
    root = _build.cuda_dir()
    def expand(name):
        if name == "flash_common.cuh":
            return "// flash_common.cuh: provided by the emulator\n"
        text = (root / name).read_text()
        return re.sub(r'^\s*#\s*include\s+"([^"]+)"\s*$', lambda m: expand(m.group(1)), text, flags=re.M)
    src = expand(filename)
    src = src.replace("extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu_smem;")
    src = re.sub(r"(?<![A-Za-z_>])::exp\(", "std::exp(", src)
    src = re.sub(r"(?<![A-Za-z_>])::log\(", "std::log(", src)
    return src

_libs = {}
def lib(filename, name):
    key = (filename, name)
    if key in _libs:
        return _libs[key]
    src = '#include "emu_common.h"\n' + source(filename) + "\n#define KERNEL " + name + "\n" + INVOKER
    h = hashlib.sha1((src + str(ASAN) + open(os.path.join(HERE, "emu_runtime.cpp")).read()
                      + open(os.path.join(HERE, "emu_common.h")).read()).encode()).hexdigest()[:16]
    so = os.path.join(BUILD, f"k_{h}.so")
    if not os.path.exists(so):
        cpp = os.path.join(BUILD, f"k_{h}.cpp")
        open(cpp, "w").write(src)
        flags = ["-O1", "-g", "-std=c++20", "-pthread", "-shared", "-fPIC", "-I", HERE, "-w"]
        if ASAN:
            flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        r = subprocess.run(["g++", *flags, cpp, os.path.join(HERE, "emu_runtime.cpp"), "-o", so + ".tmp"],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[:5000])
        os.rename(so + ".tmp", so)
    L = ctypes.CDLL(so)
    L.emu_run.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p]
    L.emu_malloc.restype = ctypes.c_void_p
    L.emu_malloc.argtypes = [ctypes.c_size_t]
    L.emu_free.argtypes = [ctypes.c_void_p]
    L.emu_first_error.restype = ctypes.c_char_p
    _libs[key] = L
    return L

def _owner(x):
    b = x
    while isinstance(b.base, np.ndarray):
        b = b.base
    assert b.flags.c_contiguous
    return b

launches = []

def launch(filename, name, smem_bytes, grid, block, args):
    L = lib(filename, name)
    keep, ptrs, copies = [], [], []
    for a in args:
        if isinstance(a, np.ndarray):
            b = _owner(a)
            off = a.ctypes.data - b.ctypes.data
            buf = L.emu_malloc(max(b.nbytes, 1))
            ctypes.memmove(buf, b.ctypes.data, b.nbytes)
            copies.append((b, buf))
            p = ctypes.c_void_p(buf + off)
        elif isinstance(a, np.int64):
            p = ctypes.c_int64(int(a))
        elif isinstance(a, np.int32):
            p = ctypes.c_int32(int(a))
        elif isinstance(a, np.float32):
            p = ctypes.c_float(float(a))
        elif isinstance(a, np.float64):
            p = ctypes.c_double(float(a))
        else:
            raise TypeError(type(a))
        keep.append(p)
        ptrs.append(ctypes.cast(ctypes.pointer(p), ctypes.c_void_p))
    arr = (ctypes.c_void_p * len(ptrs))(*[q.value for q in ptrs])
    L.emu_reset_errors()
    L.emu_run(grid[0], grid[1], grid[2], block[0], smem_bytes, arr)
    for b, buf in copies:
        ctypes.memmove(b.ctypes.data, buf, b.nbytes)
        L.emu_free(buf)
    launches.append((name, grid, block, smem_bytes))
    if L.emu_error_count():
        raise AssertionError(f"{name}: {L.emu_error_count()} emulator errors; first: {L.emu_first_error().decode()}")

def install(arch=None):
    """Point flashcupy._gpu_simt at numpy and the emulator. arch (default $EMU_ARCH or 90) picks the
    configs as on that GPU; the emulator runs every DMMA shape as m8n8k4 (same fragments)."""
    from flashcupy import _gpu_simt
    arch = int(arch or os.environ.get("EMU_ARCH", "90"))
    _gpu_simt._xp = lambda: np
    _gpu_simt._launch = launch
    _gpu_simt._arch = lambda: arch
    return _gpu_simt
