#!/usr/bin/env bash
# The second GPU call, when time is left after benchmarks/gpu_check.sh: benchmarks/gpu_check_triton.sh OUTDIR
#
# Triton and torch.compile rows cost compile time (Triton autotunes several configs per kernel variant, inductor
# compiles every problem), so they are kept out of the first run. Assumes the extension that gpu_check.sh built
# (no build here). Steps:
#   1. benchmark, gpt2 shapes: attention, mlp, layernorm_residual, softmax_causal; eager, compile,
#      gptkernels-triton, gptkernels-cuda, fixed --time-budget          -> bench_triton.log, results_triton.json
#   2. Triton GPU tests, a small matrix per test function (benchmarks/gpu_quick.py), one `timeout -s INT` per group
#                                                                      -> tests_triton.log
#   3. summary, printed last                                           -> summary_triton.txt
#   4. the Triton cache (TRITON_CACHE_DIR) as one tar, so a later run can start warm: untar it and point
#      TRITON_CACHE_DIR at it                                          -> triton-cache.tar.gz
# At most these 5 files land in OUTDIR.
#
# Environment: DEADLINE_S (default 420), PY (python3), TRITON_CACHE_DIR (default: a folder in the scratch dir,
# seeded from TRITON_CACHE_TAR if that names an earlier triton-cache.tar.gz), GPU_CHECK_DEVICE=cpu (dry run: eager vs
# compile on the CPU, the Triton interpreter's tests), BENCH_BUDGET_S (default 200).
#
# Dry run, 2026-12-07, 2-core VM without a GPU, GPU_CHECK_DEVICE=cpu DEADLINE_S=200 BENCH_BUDGET_S=20: 111 s, 5 files;
# bench 31 s (eager vs compile, the rest skipped by the budget), tests 71 s (attention stopped at its 25 s timeout
# with pytest's summary printed), empty Triton cache (the interpreter compiles nothing).
set -uo pipefail
DEADLINE_DEFAULT_S=420 SCRATCH_PREFIX=gpu_check_triton
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
KEEP="bench_triton.log results_triton.json tests_triton.log summary_triton.txt triton-cache.tar.gz"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$SCRATCH/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -n "${TRITON_CACHE_TAR:-}" ] && [ -s "$TRITON_CACHE_TAR" ]; then
  tar -xzf "$TRITON_CACHE_TAR" -C "$TRITON_CACHE_DIR" && echo "Triton cache seeded from $TRITON_CACHE_TAR"
fi
if [ "$DEV" = cpu ]; then
  PROVIDERS=eager,compile DTYPE=float32 QUICK=triton-interp
  export GPTKERNELS_CUDA=0 CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
else
  PROVIDERS=eager,compile,gptkernels-triton,gptkernels-cuda DTYPE=bfloat16 QUICK=triton
fi

echo "== 1/4 benchmark with Triton and torch.compile ($(left) s left)"
BUDGET=$(clamp $(( $(left) - 150 )) 30 "${BENCH_BUDGET_S:-200}")
mkdir -p "$SCRATCH/bench"
{
  echo "# gpu_check_triton $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null), device $DEV"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 \
    || echo "nvidia-smi failed"
  timeout -k 10 $(( BUDGET + 90 )) $PY -m gptkernels bench --device "$DEV" --dtype "$DTYPE" \
    --ops attention,mlp,layernorm_residual,softmax_causal --shapes gpt2 --providers "$PROVIDERS" \
    --time-budget "$BUDGET" --out "$SCRATCH/bench" --no-progress --verbose
  echo "bench exit $?"
} 2>&1 | tee "$OUT/bench_triton.log" | grep -E "^\[|exit|Error" | tail -30
[ -s "$SCRATCH/bench/results.json" ] && mv "$SCRATCH/bench/results.json" "$OUT/results_triton.json"

echo "== 2/4 Triton tests ($(left) s left)"
export GPTKERNELS_QUICK_BACKEND=$QUICK GPTKERNELS_QUICK_PER_TEST=${GPTKERNELS_QUICK_PER_TEST:-4}
: > "$OUT/tests_triton.log"
for f in layernorm softmax attention mlp; do
  s=$(clamp $(( ($(left) - 40) / 4 )) 15 120)
  if (( $(left) < 55 )); then echo "TESTS $f: not run (out of time)" | tee -a "$OUT/tests_triton.log"; continue; fi
  echo "### $f (timeout ${s}s)" >> "$OUT/tests_triton.log"
  PYTHONPATH="$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT -k 15 "$s" \
    $PY -m pytest -p gpu_quick -p no:cacheprovider -v -rfE -m "not slow" "tests/test_$f.py" > "$SCRATCH/group.log" 2>&1
  rc=$?
  cat "$SCRATCH/group.log" >> "$OUT/tests_triton.log"
  line=$(grep -E "^=+ .* in [0-9.]+s" "$SCRATCH/group.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  [ $rc = 124 ] && line="$line (stopped at the ${s}s timeout)"
  echo "TESTS $f: ${line:-no summary} (exit $rc)" | tee -a "$OUT/tests_triton.log"
done

echo "== 3/4 summary ($(now) s)"
{
  echo "gpu_check_triton $(date -u +%FT%TZ), device $DEV, $(now) s"
  grep -E "^TESTS " "$OUT/tests_triton.log"
  grep -E "^(FAILED|ERROR) " "$OUT/tests_triton.log" | head -15
  if [ -s "$OUT/results_triton.json" ]; then
    timeout 60 $PY -m gptkernels bench --summary "$OUT/results_triton.json" 2>&1 | tail -40
  else
    echo "benchmark: no results_triton.json"
  fi
} 2>&1 | tee "$SCRATCH/summary_triton.txt"
mv "$SCRATCH/summary_triton.txt" "$OUT/summary_triton.txt"

echo "== 4/4 Triton cache -> triton-cache.tar.gz"
tar -czf "$SCRATCH/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null \
  && mv "$SCRATCH/triton-cache.tar.gz" "$OUT/triton-cache.tar.gz"
echo "triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files, tar $(du -h "$OUT/triton-cache.tar.gz" 2>/dev/null | cut -f1)"
for f in "$OUT"/* "$OUT"/.[!.]*; do
  [ -e "$f" ] || continue
  case " $KEEP " in *" $(basename "$f") "*) ;; *) echo "removing unexpected $(basename "$f")"; rm -rf "$f" ;; esac
done
rm -rf "$SCRATCH"
echo "$(ls -A "$OUT" | wc -l) files in $OUT: $(ls -A "$OUT" | tr '\n' ' '); total $(now) s"
