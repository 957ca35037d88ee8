"""Run flashcupy's SIMT and DMMA kernels (cuda/flash_simt_*.cu, cuda/flash_dmma_*.cu) on the CPU: flashcupy._gpu_simt driven with
NumPy arrays and emulated launches (emu_common.h, emu_runtime.cpp). See README.md.

Every kernel takes one AttnParams record by value. flashcupy._params fills it with the host addresses
of NumPy arrays (data_ptr); launch() copies each array the record points into to an exact-size malloc
(ASan sees every out-of-bounds access), points a copy of the record there, runs the kernel and copies
the arrays back."""
import ctypes, hashlib, os, re, subprocess, sys, weakref
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root
from flashcupy import _build, _params

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
    static_assert(std::is_trivially_copyable_v<AttnParams>, "AttnParams");
    auto fp = &KERNEL;
    emu_launch(EmuDim{gx, gy, gz}, nthreads, smem, [&] { emu_call(fp, args); });
}
extern "C" void* emu_malloc(size_t n) { return malloc(n); }
extern "C" void emu_free(void* p) { free(p); }
'''

def _layout_asserts():
    """static_asserts that the host compiler lays AttnParams out as flashcupy._params.ATTN_PARAMS does."""
    dt = _params.ATTN_PARAMS
    lines = [f'static_assert(sizeof(AttnParams) == {dt.itemsize}, "sizeof(AttnParams)");']
    lines += [f'static_assert(__builtin_offsetof(AttnParams, {f}) == {o}, "AttnParams.{f}");'
              for f, o in _params.field_offsets(dt).items()]
    return "\n".join(lines) + "\n"


def source(filename):
    root = _build.cuda_dir()
    seen = set()
    def expand(name):  # flash_common.cuh's PTX is behind FC_MMA16_HOOKS, which emu_common.h defines
        if name in seen:  # #pragma once
            return ""
        seen.add(name)
        text = (root / name).read_text()
        return re.sub(r'^\s*#\s*include\s+"([^"]+)"\s*$', lambda m: expand(m.group(1)), text, flags=re.M)
    src = expand(filename) + _layout_asserts()
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

# Arrays whose host address went into a params record (flashcupy._params.data_ptr, patched by
# install()), by the address of their owning buffer. Weak: a dead array's address may be reused.
_arrays = {}


def _data_ptr(x):
    if x is None:
        return 0
    b = _owner(x)
    _arrays[b.ctypes.data] = weakref.ref(b)
    return int(x.ctypes.data)


def _pointer_fields(dtype, prefix=()):
    """Paths of the pointer fields (_params' "<u8") of a structured dtype."""
    for name in dtype.names:
        sub = dtype.fields[name][0]
        if sub.names:
            yield from _pointer_fields(sub, prefix + (name,))
        elif sub == np.dtype(_params._PTR):
            yield prefix + (name,)


def _find_owner(addr):
    for base, ref in _arrays.items():
        b = ref()
        if b is not None and base <= addr < base + max(b.nbytes, 1):
            return b
    raise AssertionError(f"params record points at {addr:#x}, which is no array data_ptr() saw")


launches = []

def launch(filename, name, smem_bytes, grid, block, params, record=None):
    """params: the kernel's one record (np.void): AttnParams (flashcupy._params.attn_params) unless
    record names another dtype (ConvertParams)."""
    L = lib(filename, name)
    record = _params.ATTN_PARAMS if record is None else record
    rec = np.frombuffer(bytearray(params.tobytes()), dtype=record)
    copies = {}  # id(owner) -> (owner, malloc'ed copy)
    for path in _pointer_fields(record):
        field = rec  # a view of one field of the (1,) record array
        for key in path:
            field = field[key]
        addr = int(field[0])
        if addr == 0:
            continue
        b = _find_owner(addr)
        if id(b) not in copies:
            buf = L.emu_malloc(max(b.nbytes, 1))
            ctypes.memmove(buf, b.ctypes.data, b.nbytes)
            copies[id(b)] = (b, buf)
        field[0] = copies[id(b)][1] + (addr - b.ctypes.data)
    raw = (ctypes.c_uint64 * (rec.nbytes // 8))()  # 8-byte aligned, as the struct needs
    ctypes.memmove(raw, rec.ctypes.data, rec.nbytes)
    arr = (ctypes.c_void_p * 1)(ctypes.cast(raw, ctypes.c_void_p).value)
    L.emu_reset_errors()
    L.emu_run(grid[0], grid[1], grid[2], block[0], smem_bytes, arr)
    for b, buf in copies.values():
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
    _params.data_ptr = _data_ptr
    _gpu_simt._xp = lambda: np
    _gpu_simt._launch = launch
    _gpu_simt._arch = lambda: arch
    return _gpu_simt


def _mma16_kernel(filename, name, smem_bytes=0):
    """flashcupy._build.get_kernel's stand-in for flashcupy._gpu: a callable launched on the emulator."""
    record = _params.CONVERT_PARAMS if "convert_kernel" in name else None

    def run(grid, block, args, shared_mem=0):
        launch(filename, name, shared_mem, tuple(grid) + (1,) * (3 - len(grid)), tuple(block), args[0], record)
    return run


def install_mma16(arch="sm_80"):
    """Point flashcupy._gpu (the fp16 / bf16 mma.sync family: cuda/flash_fwd.cu, flash_bwd.cu) at NumPy and
    the emulator, the configs chosen as on the first device of arch (flashcupy._configs.ARCH_DEVICES;
    sm_80: the Hopper family is not planned). mma.sync m16n8k16 and ldmatrix follow the PTX ISA's
    fragment layouts (emu_common.h)."""
    from flashcupy import _configs, _gpu
    _params.data_ptr = _data_ptr
    _gpu.data_ptr = _data_ptr
    _gpu._cp = lambda: np
    _gpu.get_kernel = _mma16_kernel
    device = _configs.ARCH_DEVICES[arch][0]
    _gpu._device_arch = lambda: device
    return _gpu


def fuzz_case(text):
    """A flashcupy.testing.Case repr as the kernels take it: (case, (q, k, v, dout) NumPy BSHD for the
    oracle, the feature kwargs, the same four in the case's memory layout for the launcher, its AttnShape,
    its validated Features)."""
    from flashcupy import testing
    from flashcupy._validate import check_features, check_qkv
    from flashcupy.fuzz import parse_case

    case = parse_case(text)
    arrays = case.inputs(grad=True)
    feats = case.feature_kwargs()
    views = [testing.layout_view(x, case.layout) for x in arrays]
    shape = check_qkv(*views[:3], softmax_scale=case.softmax_scale)
    features = check_features(np, arrays[0], shape, causal=case.causal, **feats)
    return case, arrays, feats, views, shape, features
