#!/usr/bin/env bash
# One device call: GPU tests, then the kernel benchmark; the short table prints last.
#   bash bench/device_run.sh [pytest args...]    (BENCH_ARGS="..." overrides the benchmark's arguments)
# Logs and JSON go to $OUT (the device tool brings them back) or ./runs/device.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/flashcupy-cupy-cache}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cc', cupy.cuda.Device().compute_capability)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=25 "$@" 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 bench/bench_kernels.py ${BENCH_ARGS:---modes fwd --dtypes bf16 --head-dims 64 128 --seqlens 1024 4096 16384} \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
