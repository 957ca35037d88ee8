#!/usr/bin/env bash
# fp32 hd128 forward and fp64 (DMMA) hd128 backward tuning on a GPU: two device calls of < 5 minutes.
#   bash bench/device_run_tuning.sh tests   # tests/test_gpu_fp32_fp64.py: every default specialization
#                                           # and every config the sweep times (sweep_candidates)
#   bash bench/device_run_tuning.sh sweep   # bench_simt.py --sweep at seqlen 4k, causal both:
#                                           # float32 hd128 fwd configs (FWD_SWEEP[128]) vs SDPA
#                                           # efficient and naive; float64 hd128 bwd configs
#                                           # (DMMA_BWD_SWEEP[128]); one summary table last
# Logs and JSON go to $OUT (the device tool brings them back) or ./runs/device.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/flashcupy-cupy-cache}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-}" in
  tests)
    timeout 285 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fp32_fp64.py --maxfail=20 \
      2>&1 | tee "$OUT/pytest-tuning.log" | tail -40 ;;
  sweep)
    timeout 120 python3 bench/bench_simt.py --dtypes float32 --head-dims 128 --seqlens 4096 --modes fwd --sweep \
      --repeat 10 --json "$OUT/sweep-fp32-hd128-fwd.json" > "$OUT/sweep-fp32.log" 2>&1
    timeout 150 python3 bench/bench_simt.py --dtypes float64 --head-dims 128 --seqlens 4096 --modes bwd --sweep \
      --repeat 10 --json "$OUT/sweep-fp64-hd128-bwd.json" > "$OUT/sweep-fp64.log" 2>&1
    grep -v "^|" "$OUT/sweep-fp32.log" "$OUT/sweep-fp64.log" | tail -60
    python3 bench/bench_simt.py --summary-from "$OUT"/sweep-fp32-hd128-fwd.json "$OUT"/sweep-fp64-hd128-bwd.json ;;
  *) echo "usage: $0 tests|sweep" >&2; exit 2 ;;
esac
