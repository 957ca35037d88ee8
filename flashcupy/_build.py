"""Kernel build: read cuda/ sources, inline local headers, compile with CuPy (NVRTC), memoize.

CuPy's disk cache hashes the source string but not headers pulled in with -I, so local
`#include "x.cuh"` lines are inlined here: the cache key then covers every byte that is compiled and
a stale kernel is impossible. The kernels include no CUDA header, so the same source also compiles
with bare NVRTC (nvrtc_compile, used by CI where there is no GPU and CuPy cannot compile).

Debug switch: FLASHCUPY_DEBUG=1 logs each chosen kernel (name, threads, shared memory, registers)
to stderr and dumps the source of a kernel that fails to compile.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)

DEBUG = os.environ.get("FLASHCUPY_DEBUG", "") not in ("", "0")


def debug(msg: str) -> None:
    if DEBUG:
        print(f"[flashcupy] {msg}", file=sys.stderr, flush=True)


def cuda_dir() -> Path:
    """cuda/ inside an installed wheel (flashcupy/cuda), else the source checkout's top-level cuda/."""
    here = Path(__file__).resolve().parent
    for d in (here / "cuda", here.parent / "cuda"):
        if (d / "flash_common.cuh").is_file():
            return d
    raise FileNotFoundError(f"flashcupy kernel sources not found in {here / 'cuda'} or {here.parent / 'cuda'}")


@functools.lru_cache(maxsize=None)
def load_source(filename: str) -> str:
    """The text of cuda/<filename> with every local #include inlined (each header once)."""
    root = cuda_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (root / name).read_text()
        return _INCLUDE.sub(lambda m: f"// ---- {m.group(1)} ----\n" + expand(m.group(1)), text)

    return f"// flashcupy: {filename}\n" + expand(filename)


# -std=c++17 for `if constexpr`; no --use_fast_math: the kernels ask for ex2.approx explicitly and
# keep every other operation IEEE.
BASE_OPTIONS = ("-std=c++17",)


def arch_options(cc: int) -> tuple:
    """Extra options per compute capability (sm_90a enables Hopper-only instructions when a kernel
    guards them with __CUDA_ARCH_FEAT_SM90_ALL; CuPy appends its own -arch=sm_XX after ours)."""
    return ("-arch=sm_90a",) if cc == 90 else ()


@functools.lru_cache(maxsize=None)
def _module(filename: str, name_expression: str, cc: int):
    import cupy as cp

    src = load_source(filename)
    mod = cp.RawModule(code=src, options=BASE_OPTIONS + arch_options(cc), name_expressions=[name_expression])
    try:
        mod.compile()
    except Exception:
        if DEBUG:
            print(src, file=sys.stderr)
        raise
    return mod


_smem_set: set = set()


def get_kernel(filename: str, name_expression: str, smem_bytes: int):
    """The compiled kernel for the current device, with its dynamic shared-memory limit raised."""
    import cupy as cp

    dev = cp.cuda.Device()
    cc = int(dev.compute_capability)
    fn = _module(filename, name_expression, cc).get_function(name_expression)
    key = (dev.id, filename, name_expression)
    if key not in _smem_set:
        if smem_bytes > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem_bytes
        _smem_set.add(key)
        debug(f"{name_expression}: {fn.num_regs} regs, {fn.local_size_bytes} B local, {smem_bytes} B smem, sm_{cc}")
    return fn


def nvrtc_compile(filename: str, name_expressions, arch: str):
    """Compile cuda/<filename> with bare NVRTC (cuda-bindings; no GPU, no CuPy). Returns (ok, log,
    lowered names). arch is e.g. "sm_80" or "sm_90a"; the log holds the ptxas report (registers, spills).
    """
    return nvrtc_compile_source(load_source(filename), name_expressions, arch, filename)


def nvrtc_compile_source(src: str, name_expressions, arch: str, filename: str = "check.cu"):
    """nvrtc_compile of a source text (the CI checks that append static_asserts to a kernel source).
    A "compute_XX" arch stops at PTX (no ptxas report)."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), filename.encode(), 0, [], [])
    try:
        for name in name_expressions:
            nvrtc.nvrtcAddNameExpression(prog, name.encode())
        opts = [o.encode() for o in BASE_OPTIONS] + [f"-arch={arch}".encode()]
        if arch.startswith("sm_"):
            opts.append(b"--ptxas-options=-v")
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        lowered = {}
        if ok:
            for name in name_expressions:
                _, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
                lowered[name] = low.decode()
        return ok, log.decode(errors="replace").rstrip("\x00 "), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_REPORT = re.compile(
    r"Compiling entry function '(?P<fn>[^']+)'.*?(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers", re.S)


def ptxas_report(log: str) -> dict:
    """{mangled name: dict(regs, stack, spill_stores, spill_loads)} parsed from a ptxas -v log."""
    out = {}
    for m in _REPORT.finditer(log):
        out[m["fn"]] = dict(regs=int(m["regs"]), stack=int(m["stack"]), spill_stores=int(m["st"]),
                            spill_loads=int(m["ld"]))
    return out
