"""Timing and memory: the median time of a call (Timer) and its peak allocation (peak_memory_mib)."""

from __future__ import annotations

import math
import statistics
import time
import warnings

from .common import L2_FLUSH_BYTES, _cupy, _short


# ---------------------------------------------------------------------------------------------------
# timing and memory


class Timer:
    """Median milliseconds of a call, by DESIGN.md's method (see flashcupy.bench's docstring)."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float, min_reps: int):
        self.device, self.warmup_ms, self.rep_ms, self.min_reps = device, warmup_ms, rep_ms, min_reps
        self._do_bench = None
        self._flush = None
        if device == "gpu":
            try:
                import torch
                import triton.testing

                if torch.cuda.is_available():
                    self._do_bench = triton.testing.do_bench
            except Exception:
                self._do_bench = None

    def method(self, family: str) -> str:
        if self.device == "cpu":
            return "wall"
        if family == "jax":
            return "wall+block_until_ready"
        return "triton.do_bench" if self._do_bench is not None else "cupy-events"

    def time(self, fn, family: str) -> float:
        if self.device == "cpu" or family == "jax":
            return self._wall(fn, family)
        est = self._estimate(fn)
        if self._do_bench is not None:
            try:
                return float(self._do_bench(fn, warmup=max(self.warmup_ms, 2 * est),
                                            rep=max(self.rep_ms, self.min_reps * est), return_mode="median"))
            except Exception as e:  # a triton that cannot time here: our own loop from now on
                warnings.warn(f"triton.testing.do_bench failed ({_short(e, 80)}); timing with CuPy events",
                              stacklevel=2)
                self._do_bench = None
        return self._events(fn, est)

    def _estimate(self, fn) -> float:
        """ms per call from 3 calls (after one unmeasured call)."""
        cp = _cupy()
        fn()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        return max(cp.cuda.get_elapsed_time(start, end) / 3, 1e-3)

    def _events(self, fn, est: float) -> float:
        cp = _cupy()
        if self._flush is None:
            self._flush = cp.empty(L2_FLUSH_BYTES, dtype=cp.uint8)
        for _ in range(min(1000, max(1, math.ceil(self.warmup_ms / est)))):
            fn()
        n = min(1000, max(self.min_reps, int(self.rep_ms / est)))
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(n)]
        for start, end in events:
            self._flush.fill(0)  # evict L2: every call reads its inputs from HBM
            start.record()
            fn()
            end.record()
        events[-1][1].synchronize()
        return statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in events)

    def _wall(self, fn, family: str) -> float:
        if family == "jax":
            import jax

            sync = jax.block_until_ready
        else:
            def sync(out):
                return out
        sync(fn())
        t0 = time.perf_counter()
        sync(fn())
        est = max(time.perf_counter() - t0, 1e-6)
        inner = max(1, int(0.005 / est))  # batch fast calls so each sample spans >= 5 ms
        per_sample = inner * est
        for _ in range(min(1000, max(1, math.ceil(self.warmup_ms / 1e3 / per_sample)))):
            sync(fn())
        n = min(200, max(self.min_reps, int(self.rep_ms / 1e3 / per_sample)))
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = None
            for _ in range(inner):
                out = fn()
            sync(out)
            samples.append((time.perf_counter() - t0) / inner * 1e3)
        return statistics.median(samples)


def peak_memory_mib(family: str, device: str, fn):
    """Peak MiB allocated during one call of fn beyond what was allocated before it, or None where the
    allocator cannot tell (JAX; torch on the CPU)."""
    if family == "jax" or (device == "cpu" and family != "numpy"):
        return None
    if device == "cpu":
        import tracemalloc

        tracemalloc.start()
        try:
            out = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del out
        return peak / 2**20
    if family == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    cp = _cupy()
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    base = pool.used_bytes()

    class PeakHook(cp.cuda.MemoryHook):
        name = "flashcupy-bench-peak"

        def __init__(self):
            self.peak = base

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, pool.used_bytes())

    hook = PeakHook()
    with hook:
        out = fn()
    cp.cuda.Device().synchronize()
    del out
    return (hook.peak - base) / 2**20


def _sync(family: str, device: str, out) -> None:
    if family == "jax":
        import jax

        jax.block_until_ready(out)
    elif device == "gpu":
        _cupy().cuda.Device().synchronize()
