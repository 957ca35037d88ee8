#!/usr/bin/env bash
# float64 on the FP64 tensor cores (DMMA) on a GPU: three device calls of < 5 minutes each.
#   bash bench/device_run_dmma.sh tests   # GPU tests of the fp32/fp64 kernels: every DMMA config
#                                         # (katom 4/8/16), float64 specializations, empty rows,
#                                         # out-of-bounds, bitwise reproducibility, hypothesis shapes
#   bash bench/device_run_dmma.sh bench   # flashcupy bench table: fp64 and fp32, hd 64/128, seqlens
#                                         # 1k/4k, causal both, vs naive CuPy, SDPA efficient / math
#   bash bench/device_run_dmma.sh sweep   # DMMA config sweep at seqlen 4k (bench_simt.py --sweep),
#                                         # summary table last
# Logs and JSON go to $OUT (the device tool brings them back) or ./runs/device.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/flashcupy-cupy-cache}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-}" in
  tests)
    timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fp32_fp64.py --maxfail=20 \
      -k "float64 or dmma or matches_oracle" 2>&1 | tee "$OUT/pytest-dmma.log" | tail -40 ;;
  bench)
    timeout 290 python3 -m flashcupy bench --mode fwd fwd+bwd --dtype fp64 fp32 --head-dims 64 128 \
      --seqlens 1024 4096 --causal both --providers flashcupy naive efficient math --name dmma \
      --out "$OUT" --no-plots --plain 2>&1 | tee "$OUT/bench-dmma.log" | tail -80 ;;
  sweep)
    timeout 290 python3 bench/bench_simt.py --dtypes float64 --head-dims 64 128 --seqlens 4096 --sweep \
      --repeat 10 --json "$OUT/sweep-dmma.json" 2>&1 | tee "$OUT/sweep-dmma.log" | tail -60 ;;
  *) echo "usage: $0 tests|bench|sweep" >&2; exit 2 ;;
esac
