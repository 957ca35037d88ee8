#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, synccheck and initcheck over bench/sanitize_all.py: one small
# ragged call of every kernel specialization flashcupy can launch, forward and backward (issue 19 item 3).
# Fails (exit 1) on any error or hazard, on a log without its tool's summary, and on a call that did not
# print ok; prints one line per tool, e.g.
#   memcheck: 0 errors, 174/174 calls ok: PASS
#   racecheck: 0 hazards (0 errors, 0 warnings), 174/174 calls ok: PASS
#
#   bash bench/sanitize_all.sh                                   # everything, one tool after another
#   TOOLS=racecheck FAMILIES="mma16 wgmma" bash bench/sanitize_all.sh
#   JOBS=4 bash bench/sanitize_all.sh                            # the four tools at once
#   FLASHCUPY_SMEM_LIMIT_KB=99 bash bench/sanitize_all.sh        # the 99 KB class's configurations
#
# Environment (defaults in brackets):
#   OUT [runs/sanitize]  logs: plan.txt, warm-<i>.log, <tool>-<shard>.log, summary.txt
#   TOOLS ["memcheck racecheck synccheck initcheck"]   FAMILIES [all: mma16 wgmma simt dmma tf32 chunked]
#   SHARDS [1]  split each tool's calls over this many sanitizer processes (round robin, --shard)
#   JOBS [1]    sanitizer processes running at once (each tool x shard is one)
#   WARM_JOBS [nproc, at most 16]  processes compiling every kernel first, outside the sanitizers, into
#                  CuPy's disk cache (CUPY_CACHE_DIR as set, else CuPy's default: shared with plain runs); 0: none
#   TIMEOUT [3000] seconds per process (a timed-out log has no summary: it fails)
#   PYTHON [python3]   SANITIZER [compute-sanitizer on PATH, else /usr/local/cuda/bin/compute-sanitizer]
# memcheck runs with --report-api-errors no: cuda-bindings' lazy driver-symbol lookup makes host-side
# cuGetProcAddress calls that return CUDA_ERROR_INVALID_VALUE (bench/NOTES.md: 34 such "errors" in the
# first Hopper run, no device error among them); device-side checking is unchanged.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-runs/sanitize}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
TOOLS=${TOOLS:-memcheck racecheck synccheck initcheck}
FAMILIES=${FAMILIES:-mma16 wgmma simt dmma tf32 chunked}
ncpu=$(nproc 2>/dev/null || echo 8)
SHARDS=${SHARDS:-1}; JOBS=${JOBS:-1}; WARM_JOBS=${WARM_JOBS:-$((ncpu < 16 ? ncpu : 16))}; TIMEOUT=${TIMEOUT:-3000}
PYTHON=${PYTHON:-python3}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SCRIPT=(bench/sanitize_all.py --families $FAMILIES)

[ -x "$SANITIZER" ] || { echo "sanitize_all.sh: no compute-sanitizer (set SANITIZER)" >&2; exit 2; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; "$SANITIZER" --version | tail -1; } \
  2>&1 | tee "$OUT/device.txt"
"$PYTHON" "${SCRIPT[@]}" --list > "$OUT/plan.txt" 2>&1 || { cat "$OUT/plan.txt"; exit 2; }
head -1 "$OUT/plan.txt"
status=0

if [ "$WARM_JOBS" -gt 0 ]; then  # compile outside the sanitizers, in parallel; a failing call fails the run
  t0=$SECONDS; pids=()
  for ((i = 0; i < WARM_JOBS; i++)); do
    timeout -k 5 "$TIMEOUT" "$PYTHON" "${SCRIPT[@]}" --shard "$i/$WARM_JOBS" > "$OUT/warm-$i.log" 2>&1 & pids+=($!)
  done
  for ((i = 0; i < WARM_JOBS; i++)); do
    if ! wait "${pids[$i]}"; then
      status=1; echo "warm-up shard $i failed:"; tail -15 "$OUT/warm-$i.log"
    fi
  done
  echo "warm-up: $(cat "$OUT"/warm-*.log | grep -c '^ok ') calls ok in $((SECONDS - t0)) s"
fi

run_one() {  # run_one TOOL SHARD: one sanitizer process; its exit status is appended to its log
  local tool=$1 shard=$2 opts=() log="$OUT/$1-$2.log"
  [ "$tool" = memcheck ] && opts=(--report-api-errors no)
  timeout -k 5 "$TIMEOUT" "$SANITIZER" --tool "$tool" "${opts[@]}" \
    "$PYTHON" "${SCRIPT[@]}" --shard "$shard/$SHARDS" > "$log" 2>&1
  echo "sanitize_all.sh: exit status $?" >> "$log"
  echo "finished $tool shard $shard: $("$PYTHON" bench/sanitize_all.py --summarize "$tool" "$log")"
}

t0=$SECONDS; running=0
for tool in $TOOLS; do
  for ((s = 0; s < SHARDS; s++)); do
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
    run_one "$tool" "$s" & running=$((running + 1))
  done
done
wait
echo "sanitizers: $((SECONDS - t0)) s"

: > "$OUT/summary.txt"
for tool in $TOOLS; do
  logs=(); for ((s = 0; s < SHARDS; s++)); do logs+=("$OUT/$tool-$s.log"); done
  "$PYTHON" bench/sanitize_all.py --summarize "$tool" "${logs[@]}" | tee -a "$OUT/summary.txt" || status=1
done
exit $status
