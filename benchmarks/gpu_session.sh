#!/usr/bin/env bash
# One GPU session in one command (the device machine lends 15 minutes, so everything that needs
# the accelerator runs here, in order, each part time-boxed so that the rest still runs).
# PARTS names the parts and their order (default "train bench"):
#   train  issue 11's training runs (PLAN: "name config:variant seed [flags]" per line), all at
#          once on the one GPU (each is small), each `--mode=train`; they are scored on real
#          images on the CPU afterwards (benchmarks/real_data.py score), so no real data
#          travels. Beside them, bfloat16's accuracy cost with the released model on the
#          synthetic_mixed test split. Until TRAIN_DEADLINE seconds after the start.
#   bench  issue 16's table: benchmarks/bench_gpu.py, the PyTorch peer then perfjax, alone on the
#          GPU (BENCH_SECTIONS: sliding,train), the peer for at most 100 s.
#   main   the paper main job, `launch.py --config=configs/patch3.py:paper` (build the data,
#          train 30000 steps, evaluate), until END; its wall time is in session.log.
#   mbf    issue 13's speed: benchmarks/bench_mbf_speed.py (a test split's MBF against the
#          scipy peer on the host's CPU, one curve at a time) into mbf_speed.jsonl. The peer
#          lives outside the repository: copy /work/shared/peers/fermi_scipy.py to
#          .peers/fermi_scipy.py (ignored by git) and carry .peers; PEER names another path.
# Outputs under $OUT (the device tool's folder; a local folder otherwise): session.log,
# bench.jsonl, and runs.tgz.part-* (each run's config, metrics, summary, results, best
# parameters, log).
#
#   OUT=/tmp/gpu_out TINY=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh   # CPU smoke test
#   PARTS="bench main" BENCH_SECTIONS=sliding bash benchmarks/gpu_session.sh     # 2026-11-28
#   PARTS="mbf bench" bash benchmarks/gpu_session.sh                 # with .peers carried
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
TINY=${TINY:-0}
PARTS=${PARTS:-"train bench"}
BENCH_SECTIONS=${BENCH_SECTIONS:-sliding,train}
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
  BENCH="--tiny --reps=1"; ACCURACY=synthetic_small; MAIN_CONFIG=configs/patch3.py:tiny
  MBF="--slices 6 --rounds 1 --peer-curves 12 --extraction both"
  PLAN="r16_s1 patch3:tiny 1
p2_s0 patch2:tiny 0
w32_s0 patch3:tiny 0"
else
  BENCH="--reps=2"; ACCURACY=synthetic_mixed; MAIN_CONFIG=configs/patch3.py:paper
  MBF="--rounds 3 --peer-curves 300 --extraction both"
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
export XLA_PYTHON_CLIENT_PREALLOCATE=false

stop_all() {  # Stops the given PIDs, politely first.
  for p in "$@"; do kill -0 "$p" 2>/dev/null && { say "deadline: stopping $p"; kill "$p"; }; done
  sleep 3
  for p in "$@"; do kill -9 "$p" 2>/dev/null; done
}

wait_until() {  # wait_until DEADLINE PID...: returns when all have ended or at DEADLINE.
  local deadline=$1; shift
  while [ $SECONDS -lt "$deadline" ]; do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    [ $alive = 0 ] && return
    sleep 5
  done
}

train_part() {
  local pids=()
  while read -r name cfg seed extra; do
    say "train $name: $cfg seed $seed $extra"
    "$PY" launch.py --config="configs/${cfg%%:*}.py:${cfg#*:}" --config.seed="$seed" $extra \
      --workdir="$RUNS/$name" --mode=train > "$RUNS/$name.log" 2>&1 &
    pids+=($!)
  done <<< "$PLAN"
  # bfloat16's accuracy cost (an accuracy figure: its seconds are not timings, the GPU is shared).
  timeout 200 "$PY" benchmarks/bench_gpu.py --only=precision --accuracy=$ACCURACY \
    --workdir=released/patch3 | grep '^{' > "$RUNS/precision.jsonl" &
  wait_until "$TRAIN_DEADLINE" "${pids[@]}"
  stop_all "${pids[@]}"
  pkill -9 -f "bench_gpu.py" 2>/dev/null
  tee -a "$OUT/bench.jsonl" < "$RUNS/precision.jsonl"
}

bench_part() {  # The peer first, then perfjax (rows stream out, the target rows first).
  say "bench_gpu.py --only=torch $BENCH --sections=$BENCH_SECTIONS"
  timeout 100 "$PY" benchmarks/bench_gpu.py --only=torch $BENCH --sections="$BENCH_SECTIONS" \
    | grep '^{' | tee -a "$OUT/bench.jsonl"
  pkill -9 -f "bench_gpu.py" 2>/dev/null
  say "bench_gpu.py --only=jax $BENCH --sections=$BENCH_SECTIONS"
  timeout $((END - SECONDS)) "$PY" benchmarks/bench_gpu.py --only=jax $BENCH \
    --sections="$BENCH_SECTIONS" | grep '^{' | tee -a "$OUT/bench.jsonl"
  pkill -9 -f "bench_gpu.py" 2>/dev/null
}

mbf_part() {
  say "bench_mbf_speed.py $MBF"
  timeout $((END - SECONDS)) "$PY" benchmarks/bench_mbf_speed.py $MBF \
    --peer="${PEER:-.peers/fermi_scipy.py}" | grep '^{' | tee -a "$OUT/mbf_speed.jsonl"
}

main_part() {
  say "main job: $MAIN_CONFIG"
  local start=$SECONDS
  "$PY" launch.py --config="$MAIN_CONFIG" --workdir="$RUNS/main" > "$RUNS/main.log" 2>&1 &
  local pid=$!
  wait_until "$END" "$pid"
  stop_all "$pid"
  wait "$pid" 2>/dev/null
  say "main job ended after $((SECONDS - start)) s (exit $?)"
}

for part in $PARTS; do
  case "$part" in
    train) train_part ;;
    bench) bench_part ;;
    main) main_part ;;
    mbf) mbf_part ;;
    *) say "unknown part $part (expected train, bench, main, mbf)" ;;
  esac
done

for log in "$RUNS"/*.log; do echo "== $log"; grep -v "^\s*$" "$log" | tail -3 | cut -c1-300; done
(cd "$RUNS" && for f in */train_summary.json; do
  [ -f "$f" ] && echo "$f: $(tr -d ' \n' < "$f" | cut -c1-300)"; done)
(cd "$RUNS" && tar czf - --exclude='*/checkpoints' --exclude='*/tensorboard' \
  --exclude='*/training_curves.png' */ *.log *.jsonl 2>/dev/null) | split -b 15m - "$OUT/runs.tgz.part-"
ls -la "$OUT"
say "done"
