"""pytest configuration shared by every test module.

- Hypothesis profiles: "ci" (loaded when the CI environment variable is set) runs 200 examples per
  property test with fresh random draws; "dev" (the default) runs fewer for a quick local loop.
  Select one explicitly with HYPOTHESIS_PROFILE=ci|dev.
- Tests marked `gpu` skip themselves where flashcupy._arrays.gpu_available() is False, so the same
  `pytest` command works on machines with and without a GPU.
- tests/ is put on sys.path so any test module can `from helpers import ...`.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# JAX (tests/test_jax.py, the benchmark's JAX peers) would otherwise take 75% of the GPU's memory on its
# first GPU use, and every CuPy test after it in the process would have the rest
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=False,  # fresh random draws every run; failures print a reproduction blob
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    from flashcupy._arrays import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU usable through CuPy (flashcupy._arrays.gpu_available())")
    for item in gpu_tests:
        item.add_marker(skip)


def pytest_report_header(config):
    return f"hypothesis profile: {settings.get_current_profile_name()} (max_examples={settings.default.max_examples})"


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded freshly for each test (the seed is printed on failure)."""
    import numpy as np

    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def cpu_path_only():
    """NumPy float64 stays on the CPU even where FLASHCUPY_NUMPY_FLOAT64_ON_GPU=1 opts in (module scope:
    hypothesis tests take no function fixtures). Modules of CPU-path tests use it through
    pytest.mark.usefixtures("cpu_path_only")."""
    from flashcupy import interface

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interface, "NUMPY_FLOAT64_ON_GPU", False)
        yield


_TIMES = os.environ.get("FLASHCUPY_TEST_TIMES")  # a file: "seconds outcome nodeid" appended per test as it ends


def pytest_runtest_logreport(report):
    if _TIMES and (report.when == "call" or report.outcome != "passed"):
        with open(_TIMES, "a") as f:
            f.write(f"{report.duration:8.2f} {report.when}:{report.outcome} {report.nodeid}\n")
