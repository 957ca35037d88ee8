#!/usr/bin/env bash
# One device call for the Hopper backward (issue 15): any of the stages below, in the order given.
#   bash bench/device_bwd.sh tests sanitize sweep ncu long full
# tests     tests/test_gpu_sm90_bwd.py (every SWEEP config) + tests/test_dispatch.py
# sanitize  compute-sanitizer memcheck / racecheck / synccheck of bench/sanitize_sm90_bwd.py
# sweep     bench_sm90 --bwd --sweep (every backward SWEEP config vs SDPA cuDNN / flash), $SWEEP_ARGS
# table     bench_sm90 --modes bwd fwd+bwd: issue 15's table (fp16 + bf16, hd 64/128, 1k-16k), $TABLE_ARGS
# ncu       Nsight Compute of the chosen hd128 16k backward, causal and not
# long      bench/long_context.py at 1M tokens
# fwdtests  tests/test_gpu_sm90.py (the Hopper forward)
# fwdab     the Hopper forward of bench/ab/base (device_ab.sh make-base) against this tree, same run
# full      the whole GPU suite
# probe     bench/graph_probe.py under each condition (Hopper backward under CUDA-graph replay)
# fuzz      flashcupy fuzz --device gpu in $FUZZ_PROCS processes over every family ($OUT/fuzz-report.json)
# warm      compile every sanitizer-plan kernel (bench/sanitize_all.py --shard i/$WARM_JOBS) at the default
#           limit and at 99 KB (unless NO99=1) into CUPY_CACHE_DIR, in parallel
# cache-load / cache-save   CuPy's kernel cache in and out of a call: cache-save writes
#           $OUT/cupy-cache.tar.xz.part-*; copy them into .kcache/ of the carried tree, and cache-load unpacks them
# features  bench/bench_features.py: issue 16's feature costs vs the plain causal kernel (and FlexAttention)
# decode    bench/bench_decode.py: the split-KV decode kernels vs torch SDPA, $DECODE_ARGS (issue 17)
# sandecode compute-sanitizer ($SAN_TOOLS, default all four) over bench/sanitize_decode.py's decode calls
# sanall    bench/sanitize_all.sh: compute-sanitizer over every family x feature ($SAN_TOOLS, default all four)
# shards    the whole GPU suite as $PAR (default 6) pytest processes over contiguous blocks of its test ids,
#           at once (the NumPy oracle is CPU-bound), then again under FLASHCUPY_SMEM_LIMIT_KB=99 unless
#           NO99=1 (ONLY99=1: that run alone, here and in warm); SHARD_K is a -k expression for every pytest (e.g. "not deterministic")
# Every log goes into one archive, $OUT/bwd-logs-<stages>.tgz (the device tool brings back at most 8 files); the
# short lines print as each stage ends.
set -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-runs/bwd}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LOG=$(mktemp -d /tmp/bwd-logs.XXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy-cache-bwd}
ARCHIVE=$OUT/bwd-logs-$(echo "$*" | tr ' ' '-').tgz  # one archive per invocation (several fit in one call)
pack() { tar -czf "$ARCHIVE" -C "$LOG" . ; }
# STAGE_TIMEOUT (seconds): each stage's commands are killed after it (a hang leaves the other stages and logs);
# TIMEOUT_<stage> (e.g. TIMEOUT_warm=200) overrides it for one stage
T() { timeout -k 5 "$stage_timeout" "$@"; }
trap pack EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$LOG/device.txt"
for stage in "$@"; do
  t0=$SECONDS
  v=TIMEOUT_${stage//-/_}; stage_timeout=${!v:-${STAGE_TIMEOUT:-3000}}
  case $stage in
  tests)
    T python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu_sm90_bwd.py tests/test_dispatch.py} 2>&1 | tee "$LOG/tests.log" | tail -4 ;;
  sanitize)
    T python3 bench/sanitize_sm90_bwd.py > "$LOG/sanitize-plain.log" 2>&1 || { tail -20 "$LOG/sanitize-plain.log"; continue; }
    for tool in memcheck racecheck synccheck; do
      opts=(); [ $tool = memcheck ] && opts=(--report-api-errors no)
      T compute-sanitizer --tool $tool "${opts[@]}" python3 bench/sanitize_sm90_bwd.py > "$LOG/sanitize-$tool.log" 2>&1
      echo "== $tool: $(grep -c '^ok ' "$LOG/sanitize-$tool.log") calls ok; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitize-$tool.log" | tail -1)"
    done ;;
  sweep)
    T python3 bench/bench_sm90.py --bwd --sweep ${SWEEP_ARGS:---dtypes bf16 --head-dims 64 128 --seqlens 2048 4096 16384} \
      --json "$LOG/sweep.json" > "$LOG/sweep.log" 2>&1; tail -45 "$LOG/sweep.log" ;;
  table)
    T python3 bench/bench_sm90.py ${TABLE_ARGS:---modes bwd fwd+bwd --deterministic} --json "$LOG/table.json" > "$LOG/table.log" 2>&1
    tail -60 "$LOG/table.log" ;;
  ncu)
    for c in "" --causal; do
      T ncu --kernel-name regex:flash_bwd_sm90_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 bench/profile_sm90_bwd.py --head-dim 128 $c > "$LOG/ncu${c/--/-}.log" 2>&1
      echo "== ncu hd128 16k ${c:-non-causal}:"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|L1/TEX Hit|Issue Slots Busy|No Eligible|Stall|Warp Cycles Per Issued" "$LOG/ncu${c/--/-}.log" | head -14
    done ;;
  long)
    T python3 bench/long_context.py ${LONG_ARGS:-} --json "$LOG/long.json" > "$LOG/long.log" 2>&1; tail -12 "$LOG/long.log" ;;
  fwdtests)
    T python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sm90.py -x 2>&1 | tee "$LOG/fwdtests.log" | tail -4 ;;
  fwdab)
    for tag in base new base2; do
      tree=$ROOT; [ $tag != new ] && tree=$ROOT/bench/ab/base
      PYTHONPATH=$tree CUPY_CACHE_DIR=/tmp/cupy-cache-$tag python3 bench/bench_sm90.py --no-mma --peers sdpa-cudnn \
        ${FWDAB_ARGS:---dtypes bf16 --head-dims 64 128 --seqlens 2048 4096 16384} --json "$LOG/fwdab-$tag.json" \
        > "$LOG/fwdab-$tag.log" 2>&1
    done
    python3 - "$LOG" <<'PY'
import json, sys
d = sys.argv[1]
rows = {t: {(r["head_dim"], r["causal"], r["seqlen"], r["provider"]): r["tflops"]
            for r in json.load(open(f"{d}/fwdab-{t}.json"))["rows"]} for t in ("base", "new", "base2")}
print("hd causal seqlen  base  new  base2  new/base  x cuDNN(new)")
for k in sorted(k for k in rows["new"] if k[3] == "flashcupy-sm90"):
    b, n, b2 = rows["base"].get(k), rows["new"][k], rows["base2"].get(k)
    c = rows["new"].get(k[:3] + ("sdpa-cudnn",))
    print(f"{k[0]:>3} {'y' if k[1] else 'n'} {k[2]:>6} {b or 0:6.0f} {n:5.0f} {b2 or 0:6.0f}  {n / ((b + b2) / 2):.3f}  {n / c if c else 0:.2f}")
PY
    ;;
  shards)
    kargs=(); [ -n "${SHARD_K:-}" ] && kargs=(-k "$SHARD_K")
    T python3 -m pytest -m gpu tests -q -p no:cacheprovider --collect-only "${kargs[@]}" 2>/dev/null | grep '::' > "$LOG/ids.txt"
    n=${PAR:-6}; echo "== $(wc -l < "$LOG/ids.txt") GPU tests in $n shards"
    thr=$(( $(nproc) / n )); [ $thr -lt 1 ] && thr=1  # BLAS threads per shard: the oracle's matmuls, not oversubscribed
    # contiguous blocks, not round robin: neighbouring ids share kernels, so the shards compile mostly
    # different kernels at once instead of all missing CuPy's disk cache on the same one
    tot=$(wc -l < "$LOG/ids.txt")
    for i in $(seq 0 $((n - 1))); do
      awk -v n=$n -v i=$i -v t=$tot 'int((NR - 1) * n / t) == i' "$LOG/ids.txt" > "$LOG/ids-$i.txt"
    done
    for lim in "" 99; do
      [ -n "$lim" ] && [ -n "${NO99:-}" ] && continue
      [ -z "$lim" ] && [ -n "${ONLY99:-}" ] && continue
      for i in $(seq 0 $((n - 1))); do
        mapfile -t ids < "$LOG/ids-$i.txt"
        FLASHCUPY_TEST_TIMES=$LOG/times${lim:+-${lim}kb}-$i.txt FLASHCUPY_SMEM_LIMIT_KB=$lim OMP_NUM_THREADS=$thr OPENBLAS_NUM_THREADS=$thr MKL_NUM_THREADS=$thr \
          T python3 -m pytest -q -p no:cacheprovider --durations=12 "${kargs[@]}" "${ids[@]}" \
          > "$LOG/shard${lim:+-${lim}kb}-$i.log" 2>&1 &
      done
      wait
      echo "== shards${lim:+ at $lim KB}:"; for f in "$LOG"/shard${lim:+-${lim}kb}-[0-9]*.log; do echo "   $(basename "$f"): $(tail -1 "$f")"; done
      grep -h "^FAILED\|^ERROR" "$LOG"/shard${lim:+-${lim}kb}-[0-9]*.log | head -30
      echo "   slowest:"; cat "$LOG"/times${lim:+-${lim}kb}-*.txt 2>/dev/null | sort -rn | head -8
    done ;;
  sandecode)  # compute-sanitizer over bench/sanitize_decode.py (the decode kernels; compiled outside the tools first)
    T python3 bench/sanitize_decode.py > "$LOG/sandecode-plain.log" 2>&1 || { tail -5 "$LOG/sandecode-plain.log"; continue; }
    for tool in ${SAN_TOOLS:-memcheck racecheck synccheck initcheck}; do
      opts=(); [ $tool = memcheck ] && opts=(--report-api-errors no)
      T compute-sanitizer --tool $tool "${opts[@]}" python3 bench/sanitize_decode.py > "$LOG/sandecode-$tool.log" 2>&1
      echo "== decode $tool: $(grep -c '^ok ' "$LOG/sandecode-$tool.log") calls ok; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sandecode-$tool.log" | tail -1)"
    done ;;
  decode)  # issue 17: flash_attn_with_kvcache's split-KV kernels vs torch SDPA (eager and CUDA-graph replays)
    T python3 bench/bench_decode.py ${DECODE_ARGS:-} --json "$LOG/decode.json" > "$LOG/decode.log" 2>&1; tail -24 "$LOG/decode.log" ;;
  features)
    T python3 bench/bench_features.py ${FEAT_ARGS:-} --json "$LOG/features.json" > "$LOG/features.log" 2>&1; tail -14 "$LOG/features.log" ;;
  sanall)
    OUT=$LOG/sanitize TOOLS="${SAN_TOOLS:-memcheck racecheck synccheck initcheck}" JOBS=${SAN_JOBS:-4} \
      TIMEOUT=$stage_timeout bash bench/sanitize_all.sh 2>&1 | tail -8 ;;
  warm)  # compile every kernel the sanitizer plan calls (one small call each), $WARM_JOBS processes, at
         # the default shared-memory limit and at 99 KB unless NO99=1, into CUPY_CACHE_DIR
    for lim in "" 99; do
      [ -n "$lim" ] && [ -n "${NO99:-}" ] && continue
      [ -z "$lim" ] && [ -n "${ONLY99:-}" ] && continue
      nw=${WARM_JOBS:-16}
      for i in $(seq 0 $((nw - 1))); do
        FLASHCUPY_SMEM_LIMIT_KB=$lim T python3 bench/sanitize_all.py --shard "$i/$nw" > "$LOG/warm${lim}-$i.log" 2>&1 &
      done
      wait
      echo "== warm${lim:+ at $lim KB}: $(cat "$LOG"/warm${lim}-*.log | grep -c '^ok ') calls ok; not ok:"
      grep -h -v "^ok \|^#" "$LOG"/warm${lim}-*.log | head -8
    done
    echo "   cache: $(ls "$CUPY_CACHE_DIR" | wc -l) files, $(du -sh "$CUPY_CACHE_DIR" | cut -f1)" ;;
  cache-load)  # unpack the kernel cache carried in .kcache/ (cache-save's parts) into CUPY_CACHE_DIR
    mkdir -p "$CUPY_CACHE_DIR"
    ls "$ROOT"/.kcache/cupy-cache.tar.xz.part-* > /dev/null 2>&1 &&
      cat "$ROOT"/.kcache/cupy-cache.tar.xz.part-* | xz -d | tar -x -C "$CUPY_CACHE_DIR"
    echo "== cache: $(ls "$CUPY_CACHE_DIR" | wc -l) files" ;;
  cache-save)  # CUPY_CACHE_DIR as one xz tar in 15 MiB parts, $OUT/cupy-cache.tar.zst.part-aa, -ab, ...
               # (the device tool brings back 16 MiB a file); copy them into .kcache/ of the carried tree
    tar -C "$CUPY_CACHE_DIR" -cf - . | xz -6 -T0 | split -b 15M - "$OUT/cupy-cache.tar.xz.part-"
    echo "== cache: $(ls "$CUPY_CACHE_DIR" | wc -l) files, $(du -sh "$CUPY_CACHE_DIR" | cut -f1) -> $(cat "$OUT"/cupy-cache.tar.xz.part-* | wc -c) B in $(ls "$OUT"/cupy-cache.tar.xz.part-* | wc -l) parts" ;;
  fuzz)  # flashcupy fuzz on the GPU (issue 19): $FUZZ_PROCS processes at once (default 12), $FUZZ_MINUTES each
         # (default 5), each a seed and one of four draws so every family runs: the default dispatch (Hopper
         # fp16/bf16 hd <= 128, SIMT fp32, DMMA fp64), FLASHCUPY_SM90=0 (the mma.sync family), head dims
         # 160-256 (mma.sync above 128; SIMT / DMMA there), --allow-tf32 float32 (TF32); then one merged report
    np_=${FUZZ_PROCS:-12}; thr=$(( $(nproc) / np_ )); [ $thr -lt 1 ] && thr=1
    for i in $(seq 0 $((np_ - 1))); do
      case $((i % 4)) in
        0) env_=(); args=() ;;
        1) env_=(FLASHCUPY_SM90=0); args=(--dtypes float16 bfloat16) ;;
        2) env_=(); args=(--head-dims 160 192 224 256) ;;
        3) env_=(); args=(--allow-tf32 --dtypes float32) ;;
      esac
      env "${env_[@]}" OMP_NUM_THREADS=$thr OPENBLAS_NUM_THREADS=$thr timeout -k 5 "$stage_timeout" python3 -m flashcupy fuzz --device gpu \
        --seed $((1000 + i)) --minutes "${FUZZ_MINUTES:-5}" --max-examples 1000000 "${args[@]}" ${FUZZ_ARGS:-} \
        --json "$LOG/fuzz-$i.json" > "$LOG/fuzz-$i.log" 2>&1 &
    done
    wait
    python3 - "$LOG" "$OUT/fuzz-report.json" <<'PY'
import glob, json, sys
reports = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/fuzz-*.json"))]
cases = sum(r["cases"] for r in reports)
fails = [f for r in reports for f in r["failures"]]
worst = max(reports, key=lambda r: r["worst_ratio"]) if reports else None
merged = {"processes": len(reports), "cases": cases, "failures": fails,
          "worst_ratio": worst["worst_ratio"] if worst else None, "worst_case": worst["worst_case"] if worst else None,
          "runs": [{k: r[k] for k in ("seed", "dtypes", "head_dims", "allow_tf32", "features", "cases", "seconds",
                                      "worst_ratio")} for r in reports]}
json.dump(merged, open(sys.argv[2], "w"), indent=1)
print(f"== fuzz: {cases} cases in {len(reports)} processes, {len(fails)} failures, worst error / bound "
      f"{merged['worst_ratio']}")
for f in fails[:5]:
    print("   FAIL", f["reproduce"])
PY
    ;;
  probe)  # bench/graph_probe.py under each condition (the Hopper backward's CUDA-graph failure)
    for variant in "" "--before det" "--before nondet" "--keep" "--pool async" "--causal 1"; do
      echo "== graph_probe $variant:"; T python3 bench/graph_probe.py $variant 2>&1 | tail -5
    done
    echo "== graph_probe, FLASHCUPY_SM90_BWD=0:"; FLASHCUPY_SM90_BWD=0 T python3 bench/graph_probe.py 2>&1 | tail -5 ;;
  full)
    T python3 -m pytest -m gpu tests -q -p no:cacheprovider --maxfail=25 2>&1 | tee "$LOG/pytest.log" | tail -6 ;;
  esac
  echo "-- $stage: $((SECONDS - t0)) s"
done
