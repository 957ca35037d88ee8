"""The environment of a run: device, clocks, versions, commit."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from .common import _cupy


# ---------------------------------------------------------------------------------------------------
# the environment: device, clocks, versions, commit


def _run_cmd(cmd, cwd=None, timeout=10.0):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "power.draw", "temperature.gpu", "memory.total", "persistence_mode")


def _nvidia_smi(pci_bus_id=None, name=None) -> dict:
    """nvidia-smi's clocks, power limit, driver... of the GPU at pci_bus_id (else the one named name, or
    the only one); {} where nvidia-smi is missing or says nothing."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    out = _run_cmd(cmd + ["-i", pci_bus_id]) if pci_bus_id else None
    if not out:
        out = _run_cmd(cmd)
        if not out:
            return {}
        lines = out.splitlines()
        named = [line for line in lines if name and line.split(",")[0].strip() == name]
        if len(lines) == 1 or len(set(named)) == 1:  # the only GPU, or only one model in the box
            out = lines[0] if len(lines) == 1 else named[0]
        else:
            return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return {k: v for k, v in zip(SMI_FIELDS, values) if v and "N/A" not in v}


def _dist_version(*names):
    from importlib import metadata

    for n in names:
        with contextlib.suppress(Exception):
            return metadata.version(n)
    return None


def collect_env(device: str) -> dict:
    """Device (name, memory, clocks), versions and the git commit; every field best effort."""
    from .. import __version__

    versions = {"python": platform.python_version(), "numpy": np.__version__, "flashcupy": __version__}
    for mod, dists in (("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")), ("torch", ("torch",)),
                       ("triton", ("triton",)), ("jax", ("jax",)), ("jaxlib", ("jaxlib",)),
                       ("ml_dtypes", ("ml_dtypes",)), ("rich", ("rich",)), ("matplotlib", ("matplotlib",))):
        m = sys.modules.get(mod)
        versions[mod] = getattr(m, "__version__", None) if m is not None else _dist_version(*dists)
    dev = {"kind": device, "name": None}
    if device == "gpu":
        with contextlib.suppress(Exception):
            cp = _cupy()
            d = cp.cuda.Device()
            props = cp.cuda.runtime.getDeviceProperties(d.id)
            name = props.get("name", b"")
            dev.update(name=name.decode() if isinstance(name, bytes) else str(name), index=d.id,
                       compute_capability=str(d.compute_capability), pci_bus_id=d.pci_bus_id,
                       memory_total_mib=int(props.get("totalGlobalMem", 0)) // 2**20,
                       multiprocessors=props.get("multiProcessorCount"))
            for key, out in (("clockRate", "sm_clock_max_mhz"), ("memoryClockRate", "mem_clock_max_mhz")):
                if props.get(key):
                    dev[out] = props[key] // 1000
            versions["cuda_runtime"] = str(cp.cuda.runtime.runtimeGetVersion())
            versions["driver"] = str(cp.cuda.runtime.driverGetVersion())
        smi = _nvidia_smi(dev.get("pci_bus_id"), dev.get("name"))
        if smi:
            dev["nvidia_smi"] = smi
            versions["driver"] = smi.get("driver_version", versions.get("driver"))
            dev["name"] = dev["name"] or smi.get("name")
        if "torch" in sys.modules:
            with contextlib.suppress(Exception):
                torch = sys.modules["torch"]
                versions["torch_cuda"] = torch.version.cuda
                versions["cudnn"] = str(torch.backends.cudnn.version())
    else:
        dev["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    root = Path(__file__).resolve().parent.parent.parent  # the checkout: flashcupy/bench/env.py
    commit = _run_cmd(["git", "rev-parse", "HEAD"], cwd=root)
    status = _run_cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if commit else None
    git = {"commit": commit, "dirty": None if status is None else bool(status)}
    host = {"platform": platform.platform(), "python": sys.version.split()[0]}
    return {"device": dev, "versions": versions, "git": git, "host": host}


def _device_memory_bytes(device: str) -> float:
    if device == "gpu":
        with contextlib.suppress(Exception):
            return float(_cupy().cuda.runtime.memGetInfo()[1])
        return 0.0
    with contextlib.suppress(Exception):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return 0.0


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "device"
