#!/usr/bin/env bash
# The whole GPU check in one call (a few minutes): environment, the card's ceilings, every
# kernel's correctness tests compiled (no interpret mode), then the benchmarks. Results go to
# $OUT (the device tool's output folder) or ./out, one log plus one JSON per benchmark.
#   bash benchmarks/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
QUICK=${1:-}
log="$OUT/gpu_check.log"
{
  echo "== $(date -u) commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  echo "== ceilings"; python3 benchmarks/ceilings.py
  echo "== kernel correctness (compiled)"
  python3 -m pytest -q -x -p no:cacheprovider tests/test_quantize.py tests/test_w4a8_matmul.py \
      $(ls tests/test_kv4.py tests/test_attention.py 2>/dev/null) -k "not lowers"
  echo "== gemm"; python3 benchmarks/gemm.py $QUICK
  if [ -f benchmarks/attention.py ]; then echo "== attention"; python3 benchmarks/attention.py $QUICK; fi
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
} 2>&1 | tee "$log"
