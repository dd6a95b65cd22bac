#!/usr/bin/env bash
# GPU checks, one script for a lent GPU machine, most important first, each part under its own
# timeout so one failure does not cost the rest: versions, the throughput benchmark (JAX CUDA vs
# PyTorch cuDNN), the model tests, a checkpoint written on the GPU (for the CPU restore check),
# optionally a per-piece profile of the PROFILE presets, and a full run of FULL (default small;
# FULL_ARGS adds flags) in whatever time is left of BUDGET_S.
#   OUT=/some/folder DATA=path/to/ptb BUDGET_S=400 bash scripts/gpu_check.sh
#   OUT=/some/folder DATA=path/to/ptb FULL=large FULL_ARGS=--dtype=bfloat16 bash scripts/gpu_check.sh
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_out}; DATA=${DATA:-../shared/data/ptb}; BUDGET_S=${BUDGET_S:-400}
PRESETS=${PRESETS:-small,medium,large,char_small,char_large}; BENCH_S=${BENCH_S:-240}
FULL=${FULL:-small}; FULL_ARGS=${FULL_ARGS:-}; CKPT=${CKPT:-1}; PROFILE=${PROFILE:-}
mkdir -p "$OUT"
quiet() { grep --line-buffered -v -E '^[IW][0-9]{4} |^WARNING: All log messages'; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | quiet | tee -a "$OUT/gpu.txt"
timeout "$BENCH_S" python3 benchmarks/throughput.py --presets="$PRESETS" \
  --steps=small=200,medium=100,large=60,char_small=100,char_large=30 --test_len=8192 \
  --json="$OUT/bench_gpu.json" 2>&1 | quiet | tee "$OUT/bench_gpu.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider \
  tests/model_test.py 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
if [ -n "$PROFILE" ]; then for dtype in float32 bfloat16; do
  timeout 60 python3 benchmarks/profile_step.py --presets="$PROFILE" --dtype=$dtype 2>&1 | quiet | tee -a "$OUT/profile_gpu.txt"
done; fi
[ "$CKPT" = 1 ] && timeout 45 python3 -m zaremba_jax.main --flagfile=experiments/small.flags --hidden_size=64 \
  --data_dir="$DATA" --workdir=/tmp/gpu_ckpt --max_train_steps=50 2>&1 | quiet | tail -3 | tee "$OUT/gpu_ckpt.txt"
[ "$CKPT" = 1 ] && tar czf "$OUT/gpu_ckpt.tgz" -C /tmp gpu_ckpt
left=$((BUDGET_S - SECONDS - 10))
echo "$FULL full run $FULL_ARGS: ${left}s left" | tee "$OUT/${FULL}_gpu.log"
[ "$left" -gt 20 ] && timeout "$left" python3 -m zaremba_jax.main --flagfile="experiments/$FULL.flags" $FULL_ARGS \
  --data_dir="$DATA" --workdir="/tmp/${FULL}_gpu" --log_per_epoch=2 2>&1 | quiet | tee -a "$OUT/${FULL}_gpu.log"
exit 0
