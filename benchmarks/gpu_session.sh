#!/usr/bin/env bash
# One GPU session in one command (the device machine lends 15 minutes, so everything that needs
# the accelerator runs here, in order, each part time-boxed so that the rest still runs):
#   1. issue 11's training runs, all at once on the one GPU (each is small): the earlier
#      width-16 recipe on synthetic_mixed (3000 steps, patience 8; patch3 seeds 1-2, patch2
#      seeds 0-2), `:release` (width 32 on synthetic_mixed_large, seeds 0-2) and `:release_cpu`
#      (width 16, seeds 0-1), each `--mode=train`; they are scored on real images on the CPU
#      afterwards (benchmarks/real_data.py score), so no real data travels. Beside them,
#      bfloat16's accuracy cost with the released model on the synthetic_mixed test split;
#   2. issue 16's table: benchmarks/bench_gpu.py (perfjax and the PyTorch peer, side by side).
# Outputs under $OUT (the device tool's folder; a local folder otherwise): session.log,
# bench.jsonl, and runs.tgz.part-* (each run's config, metrics, summary, best parameters, log).
#
#   OUT=/tmp/gpu_out TINY=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU smoke test
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
TINY=${TINY:-0}
TRAIN_DEADLINE=${TRAIN_DEADLINE:-350}  # seconds after the start by which training runs stop
END=${END:-575}  # seconds after the start by which everything has ended
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 PERFJAX_DATA_DIR=${PERFJAX_DATA_DIR:-/tmp/tfds}
RUNS=${RUNS:-/tmp/gpu_runs}
mkdir -p "$RUNS"
say() { echo "[$(date +%T) +${SECONDS}s] $*"; }

if ! "$PY" -c "import ml_collections, tensorflow_datasets, array_record" 2>/dev/null; then
  say "installing the carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi -L 2>/dev/null
"$PY" -c "import jax, flax, optax, orbax.checkpoint as o, numpy; print('jax', jax.__version__,
  jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)"

if [ "$TINY" = 1 ]; then
  BENCH="--tiny --reps=1"; ACCURACY=synthetic_small
  PLAN="r16_s1 patch3:tiny 1
p2_s0 patch2:tiny 0
w32_s0 patch3:tiny 0"
else
  BENCH="--reps=2"; ACCURACY=synthetic_mixed
  PLAN=${PLAN:-"r16_s1 patch3:release_cpu 1 --config.data.dataset=synthetic_mixed --config.train.num_steps=3000 --config.train.eval_every=100 --config.train.checkpoint_every=100
r16_s2 patch3:release_cpu 2 --config.data.dataset=synthetic_mixed --config.train.num_steps=3000 --config.train.eval_every=100 --config.train.checkpoint_every=100
p2_s0 patch2:release_cpu 0 --config.data.dataset=synthetic_mixed --config.train.num_steps=3000 --config.train.eval_every=100 --config.train.checkpoint_every=100
p2_s1 patch2:release_cpu 1 --config.data.dataset=synthetic_mixed --config.train.num_steps=3000 --config.train.eval_every=100 --config.train.checkpoint_every=100
p2_s2 patch2:release_cpu 2 --config.data.dataset=synthetic_mixed --config.train.num_steps=3000 --config.train.eval_every=100 --config.train.checkpoint_every=100
w32_s0 patch3:release 0
w32_s1 patch3:release 1
w32_s2 patch3:release 2
l16_s0 patch3:release_cpu 0
l16_s1 patch3:release_cpu 1"}
fi

# 1. Training runs, all at once (each builds or waits for its dataset; builds take a lock).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PIDS=()
while read -r name cfg seed extra; do
  say "train $name: $cfg seed $seed $extra"
  "$PY" launch.py --config="configs/${cfg%%:*}.py:${cfg#*:}" --config.seed="$seed" $extra \
    --workdir="$RUNS/$name" --mode=train > "$RUNS/$name.log" 2>&1 &
  PIDS+=($!)
done <<< "$PLAN"
# bfloat16's accuracy cost (an accuracy figure: its seconds are not timings, the GPU is shared).
timeout 200 "$PY" benchmarks/bench_gpu.py --only=precision --accuracy=$ACCURACY \
  --workdir=released/patch3 | grep '^{' > "$RUNS/precision.jsonl" &
while [ $SECONDS -lt "$TRAIN_DEADLINE" ]; do
  alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  [ $alive = 0 ] && break
  sleep 5
done
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && { say "deadline: stopping $p"; kill "$p"; }; done
sleep 3
for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
pkill -9 -f "bench_gpu.py" 2>/dev/null
cat "$RUNS/precision.jsonl" | tee "$OUT/bench.jsonl"
for log in "$RUNS"/*.log; do echo "== $log"; grep -v "^\s*$" "$log" | tail -2 | cut -c1-300; done
(cd "$RUNS" && for f in */train_summary.json; do
  echo "$f: $(tr -d ' \n' < "$f" | cut -c1-300)"; done)
(cd "$RUNS" && tar czf - --exclude='*/checkpoints' --exclude='*/tensorboard' \
  --exclude='*/training_curves.png' */ *.log *.jsonl) | split -b 15m - "$OUT/runs.tgz.part-"

[ "${BENCH_TOO:-1}" = 1 ] || { ls -la "$OUT"; say "done (no benchmark)"; exit 0; }
# 2. Issue 16's table, alone on the GPU: the PyTorch peer first, then perfjax (rows stream out,
# the target rows first, so a time-boxed run keeps them).
say "bench_gpu.py --only=torch $BENCH"
timeout 100 "$PY" benchmarks/bench_gpu.py --only=torch $BENCH | grep '^{' | tee -a "$OUT/bench.jsonl"
pkill -9 -f "bench_gpu.py" 2>/dev/null
say "bench_gpu.py --only=jax $BENCH"
timeout $((END - SECONDS)) "$PY" benchmarks/bench_gpu.py --only=jax $BENCH | grep '^{' \
  | tee -a "$OUT/bench.jsonl"
pkill -9 -f "bench_gpu.py" 2>/dev/null
ls -la "$OUT"
say "done"
