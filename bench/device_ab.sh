#!/usr/bin/env bash
# One device session for a kernel-architecture change: GPU tests, GPU tests under the 99 KB
# shared-memory cap, and an A/B benchmark of this tree against a base tree in the same run.
#   bash bench/device_ab.sh tests        # GPU suite, then the suite with FLASHCUPY_SMEM_LIMIT_KB=99
#   bash bench/device_ab.sh bench        # flashcupy bench --quick and bench_simt, base then new then base
#   bash bench/device_ab.sh sanitize [SCRIPT]  # compute-sanitizer memcheck / racecheck / synccheck of SCRIPT
#                                        # (default bench/sanitize_sm90.py, the Hopper forward)
# The base tree is bench/ab/base (flashcupy/, cuda/, bench/ of the commit before the change, made by
# `bash bench/device_ab.sh make-base <commit>` here; untracked, carried to the device with the tree).
# Logs and JSON go to $OUT (the device tool brings them back) or ./runs/ab. The short table prints last.
set -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-runs/ab}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
stage=${1:-tests}; shift || true
case $stage in
make-base)
  rm -rf bench/ab/base && mkdir -p bench/ab/base
  git archive "${1:?commit}" flashcupy cuda bench/bench_simt.py bench/bench_kernels.py | tar -x -C bench/ab/base
  echo "bench/ab/base = $1"; exit 0 ;;
tests)
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
  export PYTHONPATH=$ROOT CUPY_CACHE_DIR=/tmp/cupy-cache-new
  python3 -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=25 "$@" 2>&1 | tee "$OUT/pytest.log" | tail -15
  FLASHCUPY_SMEM_LIMIT_KB=99 python3 -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=25 "$@" 2>&1 \
    | tee "$OUT/pytest-99kb.log" | tail -15
  echo "== full:  $(tail -1 "$OUT/pytest.log")"; echo "== 99 KB: $(tail -1 "$OUT/pytest-99kb.log")" ;;
sanitize)  # compute-sanitizer on one small call of every specialization, made by SCRIPT
  script=${1:-bench/sanitize_sm90.py}
  [ -f "$script" ] || { echo "sanitize: no script $script" >&2; exit 2; }
  name=$(basename "$script" .py); name=${name#sanitize_}  # logs: sanitize-sm90-memcheck.log, ...
  export PYTHONPATH=$ROOT CUPY_CACHE_DIR=/tmp/cupy-cache-new
  python3 "$script" > /dev/null  # compile outside the sanitizer
  for tool in memcheck racecheck synccheck; do
    opts=()
    # memcheck also counts failed host API calls as errors: cuda-bindings' lazy driver-symbol lookup makes
    # cuGetProcAddress_v2 calls that return CUDA_ERROR_INVALID_VALUE (34 such "errors" in the first run, no
    # device memory error among them). Device-side checking is unchanged.
    [ $tool = memcheck ] && opts=(--report-api-errors no)
    compute-sanitizer --tool $tool "${opts[@]}" python3 "$script" > "$OUT/sanitize-$name-$tool.log" 2>&1
    echo "== $name $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize-$name-$tool.log" | tail -1)"
  done ;;
bench)
  # The new tree runs with FLASHCUPY_SM90=0: this compares the same kernels (mma.sync, SIMT, DMMA/TF32)
  # before and after; bench/bench_sm90.py measures the Hopper family against cuDNN.
  run() {  # run TAG TREE WHAT...: the quick sweep (our kernels only), the fp32/fp64/TF32 kernels, dropout
    local tag=$1 tree=$2; shift 2
    for what in "$@"; do
      case $what in
      quick) (cd "$tree" && FLASHCUPY_SM90=0 PYTHONPATH=$tree CUPY_CACHE_DIR=/tmp/cupy-cache-$tag python3 -m flashcupy bench \
          --quick --providers flashcupy --no-accuracy --no-plots --plain --json "$OUT/quick-$tag.json" \
          > "$OUT/quick-$tag.log" 2>&1) ;;
      simt) (cd "$tree" && PYTHONPATH=$tree CUPY_CACHE_DIR=/tmp/cupy-cache-$tag python3 bench/bench_simt.py \
          --dtypes float32 float64 --head-dims 64 128 --seqlens 1024 4096 --tf32 --json "$OUT/simt-$tag.json" \
          > "$OUT/simt-$tag.log" 2>&1) ;;
      drop) (cd "$tree" && FLASHCUPY_SM90=0 PYTHONPATH=$tree CUPY_CACHE_DIR=/tmp/cupy-cache-$tag python3 bench/bench_kernels.py \
          --modes fwd+bwd --dtypes bf16 --head-dims 64 128 --seqlens 4096 16384 --providers flashcupy --dropout 0.1 \
          --json "$OUT/drop-$tag.json" > "$OUT/drop-$tag.log" 2>&1) ;;
      esac
      echo "$tag $what done ($SECONDS s)"
    done
  }
  whats=${WHATS:-quick simt drop}
  for tag in ${TAGS:-base1 new base2}; do  # TAGS picks the runs (e.g. "base1 new" for a part that is slow)
    case $tag in base*) run "$tag" "$ROOT/bench/ab/base" $whats ;; *) run "$tag" "$ROOT" $whats ;; esac
  done
  [ "${TABLE:-1}" = 1 ] && python3 bench/ab_table.py "$OUT" ;;
esac
