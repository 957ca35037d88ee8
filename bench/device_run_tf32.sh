#!/usr/bin/env bash
# allow_tf32 (float32 on the TF32 tensor cores) on a GPU, in one device call of < 10 minutes:
#   bash bench/device_run_tf32.sh        GPU tests of the float kernels (tests/test_gpu_tf32.py,
#                                        tests/test_gpu_fp32_fp64.py: the DMMA templates serve both),
#                                        then bench_simt.py: float32 hd64/hd128 4k fwd + bwd, exact and
#                                        TF32 (defaults and TF32_*_SWEEP) vs SDPA efficient and naive,
#                                        and float64 defaults (no regression); one summary table last.
#   SKIP_TESTS=1 / SKIP_BENCH=1 skip a part; TEST_PATHS="-m gpu tests" runs every GPU test; extra
#   arguments go to pytest; SWEEP_ARGS replaces --sweep (e.g. SWEEP_ARGS=--repeat=20 times defaults only).
# Logs and JSON go to $OUT (the device tool brings them back) or ./runs/device.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/flashcupy-cupy-cache}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider ${TEST_PATHS:-tests/test_gpu_tf32.py tests/test_gpu_fp32_fp64.py} \
    --maxfail=20 "$@" 2>&1 | tee "$OUT/pytest-tf32.log" | tail -30
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 150 python3 bench/bench_simt.py --dtypes float32 --head-dims 64 128 --seqlens 4096 --modes fwd bwd --tf32 \
    ${SWEEP_ARGS:---sweep} --repeat 10 --json "$OUT/tf32-fp32.json" > "$OUT/tf32-fp32.log" 2>&1
  timeout 60 python3 bench/bench_simt.py --dtypes float64 --head-dims 64 128 --seqlens 4096 --causal 0 --modes fwd bwd \
    --repeat 10 --json "$OUT/tf32-fp64.json" > "$OUT/tf32-fp64.log" 2>&1
  grep -v "^|" "$OUT/tf32-fp32.log" "$OUT/tf32-fp64.log" | tail -50
  python3 bench/bench_simt.py --summary-from "$OUT"/tf32-fp32.json "$OUT"/tf32-fp64.json
fi
