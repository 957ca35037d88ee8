"""The wheel carries every kernel source: a non-editable install finds cuda/ inside the package."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_kernel_source(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, stdin=subprocess.DEVNULL)
    (wheel,) = tmp_path.glob("flashcupy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "cuda").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources and all(f"flashcupy/cuda/{s}" in names for s in sources), sorted(names)
