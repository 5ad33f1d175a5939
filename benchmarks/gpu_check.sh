#!/usr/bin/env bash
# The whole GPU check in one call: environment, the card's ceilings, every kernel's correctness
# tests compiled (no interpret mode), the engine on the GPU, then the benchmarks, and a
# one-screen summary of the targets. Results go to $OUT (the device tool's output folder) or
# ./out, one log plus one JSON per benchmark.
#   bash benchmarks/gpu_check.sh [--quick]     # --quick: under ~4 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
QUICK=${1:-}
log="$OUT/gpu_check.log"
{
  echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  echo "== ceilings"; timeout 60 python3 benchmarks/ceilings.py
  echo "== kernel correctness (compiled)"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_quantize.py \
      tests/test_w4a8_matmul.py tests/test_kv4.py tests/test_attention.py -k "not lowers"
  echo "== Mosaic GPU W4A8 GEMM (compiled; sm_90 only, first run on a GPU)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_w4a8_mgpu.py -k "not lowers"
  echo "== engine on the GPU (Pallas kernels in the whole model)"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py \
      -k "batch_of_different or kv4_batch or preemption or chunks" 
  echo "== gemm (triton and mosaic kernels)"; timeout 300 python3 benchmarks/gemm.py $QUICK
  if [ -z "$QUICK" ]; then
    echo "== mosaic GEMM config sweep (first shape)"
    mkdir -p "$OUT/sweep"; OUT=$OUT/sweep timeout 400 python3 benchmarks/gemm.py --quick --mgpu-sweep
  fi
  echo "== attention"; timeout 300 python3 benchmarks/attention.py $QUICK
  echo "== throughput (Llama-3-8B shapes, 1024 in / 512 out)"
  if [ -n "$QUICK" ]; then
    timeout 400 python3 benchmarks/throughput.py --quick --batches 256
  else
    timeout 900 python3 benchmarks/throughput.py
    echo "== long context (Llama-3-8B shapes)"
    timeout 600 python3 benchmarks/long_context.py --llama3-8b --lengths 4096 16384 32768 \
        --batches 1 --variants w4a8kv4 fp32
  fi
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 benchmarks/summary.py "$OUT"
} 2>&1 | tee "$log"
