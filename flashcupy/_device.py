"""What the kernel choosers need to know about a GPU: compute capability, opt-in shared memory per
block, SM count, name. Queried once per CuPy device id and cached; the overrides below are applied on
every call, so a test can monkeypatch them.

    DeviceInfo(cc, smem_optin, sm_count, name)   frozen; cc as an int (80, 86, 90, 120, ...),
                                                 smem_optin in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    device_info(device_id=None) -> DeviceInfo    that CuPy device (default: the current one), overrides applied
    current_device_info() -> DeviceInfo          device_info() of the current device
    DeviceInfo.for_cc(cc) -> DeviceInfo          a device of that compute capability with its class's
                                                 default budget (DEFAULT_SMEM_OPTIN), e.g. for CPU tests
    as_device(device_or_cc) -> DeviceInfo        a DeviceInfo as is, an int cc through for_cc (old callers)

Opt-in shared memory per block by class (bytes; the CUDA programming guide's table):
sm_75 64 KB (65536); sm_80 / sm_87 163 KB (166912); sm_86 / sm_89 / sm_120 / sm_121 99 KB (101376);
sm_90 / sm_100 / sm_103 227 KB (232448).

Overrides (environment variables, read at query time):
- FLASHCUPY_SMEM_LIMIT_KB=99: caps smem_optin at 99 * 1024 bytes (never raises it). Runs the
  configurations of the 99 KB class (RTX 30xx/40xx/50xx, A10, L4, L40) on an A100 or H100/H200, so
  they can be tested and timed there. The module setting SMEM_LIMIT_KB does the same from Python;
  when both are set the smaller cap wins.
- FLASHCUPY_FORCE_CC=75 (testing only): the choosers see this compute capability instead of the
  device's, and smem_optin is capped at that class's default budget. Kernels are still compiled for
  the real device, so the forced capability must be at or below the real one (ValueError otherwise):
  FLASHCUPY_FORCE_CC=86 on an H200 runs the sm_86 dispatch (99 KB configs, m8n8k4 DMMA), 75 the
  chunked path on the GPU for every call, as on a T4.
Bad values (not a positive integer) raise ValueError naming the variable, at the next GPU call.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from dataclasses import dataclass

KB = 1024

# Opt-in shared memory per block (bytes) of each compute capability we know; others: _default_smem_optin.
DEFAULT_SMEM_OPTIN = {
    70: 98304, 72: 98304, 75: 65536,
    80: 166912, 86: 101376, 87: 166912, 89: 101376,
    90: 232448, 100: 232448, 103: 232448, 120: 101376, 121: 101376,
}

SMEM_LIMIT_KB: int | None = None  # module setting: as FLASHCUPY_SMEM_LIMIT_KB


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU as the configuration choosers see it."""

    cc: int  # compute capability as an int: 80 (A100), 86 (RTX 30xx, A10), 89 (RTX 40xx, L4), 90 (H100/H200)
    smem_optin: int  # bytes of shared memory one block may opt into (MaxSharedMemoryPerBlockOptin)
    sm_count: int = 0  # multiprocessors (0: unknown)
    name: str = ""

    @classmethod
    def for_cc(cls, cc: int, smem_optin: int | None = None) -> "DeviceInfo":
        """A device of compute capability cc with its class's default opt-in budget (or smem_optin)."""
        cc = int(cc)
        return cls(cc, _default_smem_optin(cc) if smem_optin is None else int(smem_optin), 0, f"sm_{cc}")

    def capped(self, smem_bytes: int) -> "DeviceInfo":
        """This device with at most smem_bytes of opt-in shared memory per block."""
        return dataclasses.replace(self, smem_optin=min(self.smem_optin, int(smem_bytes)))

    def fits(self, smem_bytes: int) -> bool:
        return smem_bytes <= self.smem_optin


def _default_smem_optin(cc: int) -> int:
    if cc in DEFAULT_SMEM_OPTIN:
        return DEFAULT_SMEM_OPTIN[cc]
    if cc < 70:
        return 48 * KB
    # an unknown newer part: the smallest budget of its generation we know (99 KB if none)
    same_major = [v for k, v in DEFAULT_SMEM_OPTIN.items() if k // 10 == cc // 10]
    return min(same_major) if same_major else 101376


def as_device(device) -> DeviceInfo:
    """A DeviceInfo, or an int compute capability (80, 90, ...) as DeviceInfo.for_cc(cc)."""
    if isinstance(device, DeviceInfo):
        return device
    try:
        if isinstance(device, bool):
            raise TypeError
        cc = operator.index(device)
    except TypeError:
        raise TypeError(f"device: expected a flashcupy._device.DeviceInfo or an int compute capability, "
                        f"got {type(device).__name__}") from None
    return DeviceInfo.for_cc(cc)


def _env_int(name: str):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
    return value


def with_overrides(info: DeviceInfo) -> DeviceInfo:
    """info after FLASHCUPY_FORCE_CC, FLASHCUPY_SMEM_LIMIT_KB and SMEM_LIMIT_KB (module docstring)."""
    force_cc = _env_int("FLASHCUPY_FORCE_CC")
    if force_cc is not None:
        if force_cc > info.cc:
            raise ValueError(f"FLASHCUPY_FORCE_CC: expected at most the device's compute capability {info.cc} "
                             f"({info.name or 'this GPU'}; the kernels are compiled for the real device), got {force_cc}")
        info = dataclasses.replace(info, cc=force_cc).capped(_default_smem_optin(force_cc))
    module_cap = SMEM_LIMIT_KB
    if module_cap is not None and (isinstance(module_cap, bool) or not isinstance(module_cap, int) or module_cap <= 0):
        raise ValueError(f"flashcupy._device.SMEM_LIMIT_KB: expected None or a positive int, got {module_cap!r}")
    caps = [c for c in (_env_int("FLASHCUPY_SMEM_LIMIT_KB"), module_cap) if c is not None]
    if caps:
        info = info.capped(min(caps) * KB)
    return info


@functools.lru_cache(maxsize=None)
def _query(device_id: int) -> DeviceInfo:
    """The device's own numbers, once per device id (no overrides)."""
    import cupy

    rt = cupy.cuda.runtime
    cc = int(cupy.cuda.Device(device_id).compute_capability)
    smem = int(rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id))
    sms = int(rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, device_id))
    name = rt.getDeviceProperties(device_id)["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return DeviceInfo(cc, smem, sms, str(name))


def device_info(device_id: int | None = None) -> DeviceInfo:
    """The DeviceInfo of a CuPy device (default: the current device), overrides applied."""
    if device_id is None:
        import cupy

        device_id = cupy.cuda.Device().id
    return with_overrides(_query(int(device_id)))


def current_device_info() -> DeviceInfo:
    """device_info() of CuPy's current device."""
    return device_info(None)
