#!/usr/bin/env bash
# The one prepared run on the H200/H100 (sm_90): benchmarks/gpu_check.sh OUTDIR
#
# Ordered so that a run of ~8 minutes returns the numbers that matter first; every step has a timeout and the next
# step runs whatever the previous one did:
#   1. build for sm_90 only, 16 jobs (ninja checked), ptxas -v report folded in   -> build.log
#   2. smoke: every public op once on backend cuda, bf16, vs its reference     -> smoke.log (PASS/FAIL per op)
#   3. benchmark, gpt2 shapes: attention, mlp, layernorm_residual, softmax_causal, then the losses and the quantized
#      linears (fwd+bwd / fwd, peak memory per row); eager vs gptkernels-cuda, no
#      torch.compile, fixed --time-budget                                     -> bench.log, results.json
#   4. model: gpt2 decode ms/token (profile, with CUDA graphs) and training tokens/s per backend -> model.log
#   5. host overhead per call (bench --suite overhead; tolerated if this bench lacks it) -> overhead.json (+ bench.log)
#   6. GPU tests last: backend cuda, a small matrix per test function (benchmarks/gpu_quick.py), one
#      `timeout -s INT` per op group so pytest still prints its summary and every op is reached; torch.compile
#      cases and slow-marked ones (if any) only with time left              -> tests.log
#   7. summary table, printed last                                            -> summary.txt
# Triton and torch.compile benchmark rows: benchmarks/gpu_check_triton.sh, a second call when time is left.
#
# Files: at most these 8 land in OUTDIR (the machine sends back no more): build.log smoke.log bench.log
# results.json model.log overhead.json tests.log summary.txt. Logs are tee'd there directly (a killed step keeps
# its log); tools write into a scratch folder and only the named result is moved over when the step ends; the
# summary step deletes anything else.
#
# Environment:
#   DEADLINE_S=450        the whole script's budget; later steps get what earlier ones leave
#   SKIP_BUILD=1          reuse an existing build (a rerun on a machine that still has it)
#   GPU_CHECK_DEVICE=cpu  dry run on a machine without a GPU: no build, every step on --device cpu / backend cpu,
#                         tiny model; proves the plumbing (timeouts, file count, summary parsing)
#   PY=python3            the interpreter (the image promises python3)
#   SMOKE_S, BENCH_BUDGET_S, PROFILE_S, TRAIN_S, OVERHEAD_S: caps of those steps (defaults below)
#
# Dry run, 2026-12-07, on a 2-core VM without a GPU (other jobs on the cores), torch 2.14 / triton 3.8, in-place
# build, PYTHONPATH=worktree, a fake nvidia-smi on PATH: GPU_CHECK_DEVICE=cpu DEADLINE_S=420 BENCH_BUDGET_S=40
# PROFILE_S=40 TRAIN_S=45 OVERHEAD_S=20 SMOKE_S=60 -> 278 s, 7 files (no overhead.json: this bench has no --suite):
#   build (skipped; versions + import check) 13 s | smoke 20 s (8/8 PASS) | bench 64 s (attention + mlp timed,
#   layernorm_residual and softmax_causal skipped by the 40 s budget) | model 13 s (tiny) | overhead 3 s (exit 2,
#   logged, moved on) | tests 161 s (75 passed in 6 groups; compile group 41 s) | summary 4 s.
# With DEADLINE_S=150 the test groups hit their 15 s floors: SIGINT stops pytest, which still prints its summary.
# Again after the shared prelude (gpu_common.sh) and the overhead suite landed, 2026-12-07: GPU_CHECK_DEVICE=cpu
# DEADLINE_S=240 BENCH_BUDGET_S=30 PROFILE_S=30 TRAIN_S=30 OVERHEAD_S=30 SMOKE_S=60 -> 130 s, exit 0, all 8 files:
#   build 6 | smoke 6 | bench 35 | model 13 | overhead 7 (--quick on CPU) | tests 56.
set -uo pipefail
DEADLINE_DEFAULT_S=450 SCRATCH_PREFIX=gpu_check
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
KEEP="build.log smoke.log bench.log results.json model.log overhead.json tests.log summary.txt"
declare -A STEP_S  # seconds per step, for the summary
step_start() { STEP_T=$(date +%s); echo; echo "== $1 ($(now) s elapsed, $(left) s left, $(date -u +%T)Z)"; }
step_end() { STEP_S[$1]=$(( $(date +%s) - STEP_T )); }
if [ "$DEV" = cpu ]; then
  BACKEND=cpu BENCH_DTYPE=float32 MODEL=tiny OVERHEAD_QUICK=--quick  # CPU GEMVs of 19 MB: full rounds take 30 s
  export GPTKERNELS_CUDA=0 CUDA_VISIBLE_DEVICES=""
else
  BACKEND=cuda BENCH_DTYPE=bfloat16 MODEL=gpt2 OVERHEAD_QUICK=
fi

# ---------------------------------------------------------------------------------------------------------------
step_start "1/7 build for sm_90"
{
  echo "# gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null), device $DEV"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 || echo "nvidia-smi failed"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/build.log"
if [ "$DEV" = cpu ] || [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (GPU_CHECK_DEVICE=$DEV, SKIP_BUILD=${SKIP_BUILD:-0})" | tee -a "$OUT/build.log"
  BUILD_RC=skipped
else
  if ! command -v ninja >/dev/null; then  # without ninja torch builds one file at a time: minutes, not seconds
    NINJA_BIN=$($PY -c "import ninja, os; print(ninja.BIN_DIR)" 2>/dev/null) && export PATH="$NINJA_BIN:$PATH"
  fi
  echo "ninja: $(command -v ninja || echo 'NOT FOUND: the build will be serial') $(ninja --version 2>/dev/null)" \
    | tee -a "$OUT/build.log"
  # NVCC_APPEND_FLAGS: nvcc adds -Xptxas -v to every .cu compile, so the resource report (registers, shared
  # memory, spills per kernel) lands in this log, from the build itself.
  NVCC_APPEND_FLAGS="-Xptxas -v" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 GPTKERNELS_CUDA=1 PIP_NO_INDEX=1 \
    timeout -k 10 "${BUILD_S:-240}" $PY -m pip install --no-build-isolation --no-deps -v -e . 2>&1 \
    | tee -a "$OUT/build.log" | grep -E "gptkernels setup|error|Successfully" | tail -20
  BUILD_RC=${PIPESTATUS[0]}
fi
$PY -c "import gptkernels; print('import', gptkernels.__file__, gptkernels._dispatch.build_info())" 2>&1 \
  | tail -3 | tee -a "$OUT/build.log"
echo "build exit $BUILD_RC" | tee -a "$OUT/build.log"
step_end build

# ---------------------------------------------------------------------------------------------------------------
step_start "2/7 smoke: every op on backend $BACKEND"
timeout -s INT -k 5 "$(clamp "${SMOKE_S:-75}" 20 120)" $PY benchmarks/gpu_smoke.py --device "$DEV" 2>&1 \
  | tee "$OUT/smoke.log" | grep -E "^SMOKE (PASS|FAIL|SUMMARY)|Error"
echo "smoke exit ${PIPESTATUS[0]}" | tee -a "$OUT/smoke.log"
step_end smoke

# ---------------------------------------------------------------------------------------------------------------
# Leave the model, overhead and test steps ~200 s; the bench stops starting new problems after BUDGET.
BUDGET=$(clamp $(( $(left) - 230 )) 30 "${BENCH_BUDGET_S:-110}")
step_start "3/7 benchmark gpt2 shapes, eager vs gptkernels-$BACKEND, --time-budget $BUDGET"
mkdir -p "$SCRATCH/bench"
timeout -k 10 $(( BUDGET + 60 )) $PY -m gptkernels bench --device "$DEV" --dtype "$BENCH_DTYPE" \
  --ops attention,mlp,layernorm_residual,softmax_causal,cross_entropy,linear_cross_entropy,qlinear_int8,qlinear_int4 \
  --shapes gpt2 --providers "eager,gptkernels-$BACKEND" \
  --no-compile --time-budget "$BUDGET" --out "$SCRATCH/bench" --no-progress --verbose 2>&1 | tee "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
[ -s "$SCRATCH/bench/results.json" ] && mv "$SCRATCH/bench/results.json" "$OUT/results.json"
step_end bench

# ---------------------------------------------------------------------------------------------------------------
step_start "4/7 model: decode latency + training throughput ($MODEL)"
if [ "$DEV" = cpu ]; then
  PROFILE_ARGS=(--prompt-len 16 --new-tokens 8 --repeats 1)
  TRAIN_ARGS=(--batch-size 4 --block-size 64 --steps 6 --warmup 2 --log-every 3 --corpus-bytes 2000000)
else
  PROFILE_ARGS=(--prompt-len 128 --new-tokens 64 --repeats 2 --cuda-graphs)
  TRAIN_ARGS=(--batch-size 16 --block-size 1024 --steps 12 --warmup 2 --log-every 4 --corpus-bytes 4000000)
fi
{
  # Each command's cap covers imports, CUDA start and (train) the checkpoint write at the end; train has no flag
  # to skip the checkpoint, so it goes to the scratch folder.
  timeout -k 5 "$(clamp "${PROFILE_S:-60}" 20 120)" $PY -m gptkernels profile --model "$MODEL" --batch 1 \
    --device "$DEV" --providers eager,gptkernels "${PROFILE_ARGS[@]}" --json "$SCRATCH/profile.json"
  echo "profile exit $?"
  [ -s "$SCRATCH/profile.json" ] && { echo "## profile.json"; cat "$SCRATCH/profile.json"; echo; }
  for be in auto torch; do
    timeout -k 5 "$(clamp "${TRAIN_S:-50}" 20 120)" $PY -m gptkernels train --model "$MODEL" --device "$DEV" \
      --backend "$be" "${TRAIN_ARGS[@]}" --eval-every 0 --eval-steps 1 --out-dir "$SCRATCH/train-$be" --no-progress
    echo "train backend=$be exit $?"
  done
} 2>&1 | tee "$OUT/model.log" | grep -E "^(eager|gptkernels)|^done|exit|Error" | tail -20
step_end model

# ---------------------------------------------------------------------------------------------------------------
step_start "5/7 host overhead per call"
mkdir -p "$SCRATCH/overhead"
{
  echo; echo "## bench --suite overhead"
  # cuda vs eager only: Triton's first calls JIT-compile and autotune (the second script has the Triton rows).
  timeout -k 5 "$(clamp "${OVERHEAD_S:-45}" 15 90)" $PY -m gptkernels bench --suite overhead --device "$DEV" \
    --providers "eager,gptkernels-$BACKEND" --out "$SCRATCH/overhead" --no-progress $OVERHEAD_QUICK
  rc=$?
  [ $rc = 2 ] && echo "overhead: this bench has no --suite overhead (usage error, exit 2); step skipped"
  echo "overhead exit $rc"
} 2>&1 | tee -a "$OUT/bench.log" | grep -E "exit|skipped|Error" | tail -5
OVH=$(ls "$SCRATCH"/overhead/*.json 2>/dev/null | head -1)
[ -n "$OVH" ] && mv "$OVH" "$OUT/overhead.json"
step_end overhead

# ---------------------------------------------------------------------------------------------------------------
# Per op group one pytest under `timeout -s INT`: SIGINT makes pytest stop and still print its summary (-rfE lists
# failures and errors). pytest-timeout is not installed on the GPU machine, hence the group timeouts.
step_start "6/7 tests: backend $BACKEND, small matrix per test (benchmarks/gpu_quick.py)"
export GPTKERNELS_QUICK_BACKEND=$BACKEND GPTKERNELS_QUICK_PER_TEST=${GPTKERNELS_QUICK_PER_TEST:-6}
PYTEST=($PY -m pytest -p gpu_quick -p no:cacheprovider -v -rfE --durations=5)
RESERVE_S=15  # the summary step
run_group() {  # run_group NAME SHARE_OF_WHAT_IS_LEFT pytest-args...
  local name=$1 share=$2; shift 2
  local s; s=$(clamp $(( ($(left) - RESERVE_S) / share )) 15 150)
  if (( $(left) - RESERVE_S < 15 )); then
    echo "TESTS $name: not run (out of time)" | tee -a "$OUT/tests.log"
    return
  fi
  echo "### $name (timeout ${s}s): $*" >> "$OUT/tests.log"
  PYTHONPATH="$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT -k 15 "$s" "${PYTEST[@]}" "$@" \
    > "$SCRATCH/group.log" 2>&1
  local rc=$?
  cat "$SCRATCH/group.log" >> "$OUT/tests.log"
  local line; line=$(grep -E "^=+ .*(passed|failed|error|no tests ran|deselected).* in [0-9.]+s" "$SCRATCH/group.log" \
    | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  [ $rc = 124 ] || [ $rc = 130 ] && line="$line (stopped at the ${s}s timeout)"
  echo "TESTS $name: ${line:-no summary} (exit $rc)" | tee -a "$OUT/tests.log"
}
: > "$OUT/tests.log"
run_group layernorm 6 -m "not slow" tests/test_layernorm.py
run_group softmax 5 -m "not slow" tests/test_softmax.py
run_group attention 4 -m "not slow" tests/test_attention.py
run_group mlp 3 -m "not slow" tests/test_mlp.py
OTHER=$(ls tests/test_*.py | grep -vE "test_(layernorm|softmax|attention|mlp)\.py" | tr '\n' ' ')
# shellcheck disable=SC2086
run_group other 2 -m "not slow" $OTHER
GPTKERNELS_QUICK_COMPILE=only run_group compile 2 -m "not slow" tests/test_layernorm.py tests/test_softmax.py \
  tests/test_attention.py tests/test_mlp.py
SLOW_FILES=$(grep -l "mark.slow" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
if [ -n "$SLOW_FILES" ] && PYTHONPATH="$REPO/benchmarks" "${PYTEST[@]}" --collect-only -q -m slow $SLOW_FILES 2>/dev/null \
    | grep -q "::"; then
  run_group slow 1 -m slow $SLOW_FILES
else
  echo "TESTS slow: none selected for backend $BACKEND (no pass run)" | tee -a "$OUT/tests.log"
fi
step_end tests

# ---------------------------------------------------------------------------------------------------------------
step_start "7/7 summary"
{
  echo "gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null), device $DEV, $(now) s"
  grep -m1 -E "MiB" "$OUT/build.log" | sed 's/^/gpu: /'
  echo "steps (s): build ${STEP_S[build]} | smoke ${STEP_S[smoke]} | bench ${STEP_S[bench]} | model ${STEP_S[model]}" \
       "| overhead ${STEP_S[overhead]} | tests ${STEP_S[tests]}"
  echo "build: exit $BUILD_RC; ptxas: $(grep -c 'Compiling entry function' "$OUT/build.log") kernels," \
       "$(grep -E 'bytes spill stores' "$OUT/build.log" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads')" \
       "with spills; $(grep -m1 -E '^import ' "$OUT/build.log" | cut -c1-160)"
  echo "-- smoke"
  grep -E "^SMOKE (PASS|FAIL|SUMMARY)" "$OUT/smoke.log" | cut -c1-150 || echo "smoke: no result lines"
  echo "-- tests"
  grep -E "^TESTS " "$OUT/tests.log"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -15
  echo "-- model"
  grep -E "^(eager|gptkernels)|^done|exit [1-9]" "$OUT/model.log" | cut -c1-180
  echo "-- benchmark (headline per op, % of the ceiling measured in the same run)"
  if [ -s "$OUT/results.json" ]; then
    timeout 60 $PY -m gptkernels bench --summary "$OUT/results.json" 2>&1 | tail -40
  else
    echo "benchmark: no results.json"
  fi
  echo "-- host overhead"
  if [ -s "$OUT/overhead.json" ]; then
    timeout 60 $PY -m gptkernels bench --summary "$OUT/overhead.json" 2>&1 | tail -25 \
      || echo "overhead.json: $(wc -c < "$OUT/overhead.json") bytes (no summary for it)"
  else
    echo "overhead: no overhead.json"
  fi
} 2>&1 | tee "$SCRATCH/summary.txt"
mv "$SCRATCH/summary.txt" "$OUT/summary.txt"
for f in "$OUT"/* "$OUT"/.[!.]*; do  # only the 8 named files may stay
  [ -e "$f" ] || continue
  case " $KEEP " in *" $(basename "$f") "*) ;; *) echo "removing unexpected $(basename "$f")"; rm -rf "$f" ;; esac
done
rm -rf "$SCRATCH"
echo "$(ls -A "$OUT" | wc -l) files in $OUT (at most 8 come back): $(ls -A "$OUT" | tr '\n' ' ')"
echo "total $(now) s"
