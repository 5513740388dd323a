"""Sliding-window inference speed: perfjax (plain and fast) vs the PyTorch/MONAI peer, side by side.

One 128x128x30 slice, UNet f=16 (0.322 GFLOP per 64x64 patch). Measures in ONE run, in
interleaved rounds so that load from other processes hits every contender alike:
  * the float32 matmul ceiling (jitted jnp.dot 2048^3 and numpy),
  * perfjax.inference.sliding_window at stride 2 (1089 windows, mean+std) and stride 32
    (9 windows), with UNetPredictor(fast=False) and (fast=True), the windows split over all
    XLA host devices (launch.py's default) and, for comparison, on one device,
  * the peer /work/shared/peers/unet_torch_monai.py as subprocesses in their own venv:
    MONAI sliding_window_inference with defaults (NCHW, glibc malloc), MONAI with a
    channels-last model under tcmalloc (LD_PRELOAD), and hand-batched channels-last PyTorch
    under tcmalloc (the peers' fastest eager path),
  * peak resident memory against chunk_size (one subprocess per chunk size).
Prints JSON lines and a summary; medians over rounds. Wall time is what counts; process CPU
time / 2 is printed too because the machine is shared (2 cores).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_inference.py --rounds 3

Host devices as launch.py sets them (`perfjax.platform.configure_host_devices()`: one per core,
up to 4, unless XLA_FLAGS sets the count); the sliding window carries its own YNN fusion options.

Peer venv: python3 -m venv /work/peer-torch && /work/peer-torch/bin/pip install torch==2.13.0 monai;
tcmalloc: apt-get install -y libgoogle-perftools4.
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perfjax import platform  # noqa: E402

platform.configure_host_devices()  # As launch.py does, before any JAX work.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from perfjax import inference  # noqa: E402
from perfjax import windows  # noqa: E402
from perfjax.fast_unet import UNetPredictor  # noqa: E402
from perfjax.model import UNet, flops_per_patch, init_params  # noqa: E402

PEER = "/work/shared/peers/unet_torch_monai.py"
PEER_PY = "/work/peer-torch/bin/python"
TCMALLOC = "/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def emit(**kw):
  print(json.dumps(kw), flush=True)
  return kw


def timed(fn, reps):
  """Median wall and median CPU/2 seconds over reps (after one warm-up call)."""
  fn()
  walls, cpus = [], []
  for _ in range(reps):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append((time.process_time() - c) / 2)
  return statistics.median(walls), statistics.median(cpus), min(walls)


def matmul_peak(reps=10):
  n = 2048
  a = jax.random.uniform(jax.random.key(0), (n, n))
  b = jax.random.uniform(jax.random.key(1), (n, n))
  f = jax.jit(jnp.dot)
  wall, cpu, best = timed(lambda: f(a, b).block_until_ready(), reps)
  an, bn = np.asarray(a), np.asarray(b)
  wn, cn, bestn = timed(lambda: an @ bn, reps)
  fl = 2 * n ** 3 / 1e9
  return emit(tag="matmul2048", jax_gflops=round(fl / wall, 1), jax_gflops_best=round(fl / best, 1),
              jax_gflops_cpu=round(fl / cpu, 1), numpy_gflops=round(fl / wn, 1),
              numpy_gflops_best=round(fl / bestn, 1))


def make_model(features):
  model = UNet(features=features)
  return model, init_params(model, jax.random.key(0))


def bench_jax(model, params, image, fast, stride, chunk, reps, features, one_device=False):
  fn = UNetPredictor(model, fast=fast)
  devices = jax.local_devices()[:1] if one_device else None
  run = lambda: inference.sliding_window(fn, params, image, stride=stride,  # noqa: E731
                                         chunk_size=chunk, devices=devices)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  wall, cpu, best = timed(run, reps)
  n = len(windows.grid(128, 128, 64, stride))
  gf = flops_per_patch(features) * n / 1e9
  return emit(tag="perfjax", fast=fast, stride=stride, chunk=chunk,
              devices=1 if one_device else jax.local_device_count(), ms=round(wall * 1e3, 1),
              ms_best=round(best * 1e3, 1), cpu_half_ms=round(cpu * 1e3, 1),
              gflops=round(gf / wall, 1), gflops_best=round(gf / best, 1),
              first_call_s=round(first, 1), xla_flags=os.environ.get("XLA_FLAGS", ""))


def run_peer(mode, args, tcmalloc, extra=()):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if tcmalloc:
    env["LD_PRELOAD"] = TCMALLOC
  cmd = [PEER_PY, PEER, mode, "--f", str(args.features), "--reps", str(args.peer_reps), *extra]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  if r.returncode != 0 or not rows:
    return [emit(tag="peer_error", mode=mode, stderr=r.stderr[-500:])]
  out = []
  for row in rows:
    row.pop("times", None)
    out.append(emit(tag="peer", mode=mode, allocator="tcmalloc" if tcmalloc else "glibc", **{
        k: v for k, v in row.items() if k != "tag"}, peer_tag=row.get("tag")))
  return out


def child_memory(args):
  """Runs one stride-2 map at --chunk and prints the peak RSS (MiB) of this process."""
  model, params = make_model(args.features)
  image = np.random.default_rng(0).random((1, 128, 128, 30), dtype=np.float32)
  inference.sliding_window(UNetPredictor(model, fast=args.fast), params, image, stride=2,
                           chunk_size=args.chunk)
  emit(tag="memory", chunk=args.chunk, fast=args.fast,
       maxrss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--features", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--peer-reps", type=int, default=3)
  ap.add_argument("--chunk", type=int, default=8, help="chunk for the fast path")
  ap.add_argument("--one-device-chunk", type=int, default=32,
                  help="chunk for the fast path on one device (its best)")
  ap.add_argument("--plain-chunk", type=int, default=16)
  ap.add_argument("--memory-chunks", default="8,32,128,512")
  ap.add_argument("--skip-peer", action="store_true")
  ap.add_argument("--skip-memory", action="store_true")
  ap.add_argument("--child-memory", action="store_true")
  ap.add_argument("--fast", action="store_true")
  args = ap.parse_args()
  if args.child_memory:
    return child_memory(args)

  emit(tag="machine", cpu=subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                                         text=True).stdout.strip(),
       date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), jax=jax.__version__,
       loadavg=os.getloadavg(), xla_flags=os.environ.get("XLA_FLAGS", ""))
  model, params = make_model(args.features)
  image = np.random.default_rng(0).random((1, 128, 128, 30), dtype=np.float32)
  ref = inference.sliding_window(UNetPredictor(model), params, image, stride=2, chunk_size=64)
  fast = inference.sliding_window(UNetPredictor(model, fast=True), params, image, stride=2,
                                  chunk_size=args.chunk)
  emit(tag="fast_vs_plain", max_abs_mean=float(np.abs(fast["mean"] - ref["mean"]).max()),
       max_abs_std=float(np.abs(fast["std"] - ref["std"]).max()))

  rows = []
  for rnd in range(args.rounds):
    emit(tag="round", round=rnd, loadavg=os.getloadavg())
    rows.append(matmul_peak())
    for stride in (2, 32):
      rows.append(bench_jax(model, params, image, True, stride, args.chunk if stride == 2 else 9,
                            args.reps if stride == 2 else 5 * args.reps, args.features))
    if jax.local_device_count() > 1:
      rows.append(bench_jax(model, params, image, True, 2, args.one_device_chunk, args.reps,
                            args.features, one_device=True))
    rows.append(bench_jax(model, params, image, False, 2, args.plain_chunk, args.reps, args.features))
    if not args.skip_peer:
      rows += run_peer("monai", args, tcmalloc=False, extra=("--sw", "64"))
      rows += run_peer("monai", args, tcmalloc=True, extra=("--sw", "64", "--channels-last"))
      rows += run_peer("plain", args, tcmalloc=True, extra=("--channels-last", "--chunks", "32"))

  def med(filt, key):
    vals = [r[key] for r in rows if filt(r) and key in r]
    return statistics.median(vals) if vals else None

  summary = {
      "jnp_dot_gflops": med(lambda r: r["tag"] == "matmul2048", "jax_gflops"),
      "numpy_gflops": med(lambda r: r["tag"] == "matmul2048", "numpy_gflops"),
      "devices": jax.local_device_count(),
      "fast_s2_ms": med(lambda r: r["tag"] == "perfjax" and r["fast"] and r["stride"] == 2
                        and r["devices"] == jax.local_device_count(), "ms"),
      "fast_one_device_s2_ms": med(lambda r: r["tag"] == "perfjax" and r["fast"]
                                   and r["stride"] == 2 and r["devices"] == 1
                                   and jax.local_device_count() > 1, "ms"),
      "fast_s2_cpu_half_ms": med(lambda r: r["tag"] == "perfjax" and r["fast"] and r["stride"] == 2
                                 and r["devices"] == jax.local_device_count(), "cpu_half_ms"),
      "fast_s32_ms": med(lambda r: r["tag"] == "perfjax" and r["fast"] and r["stride"] == 32, "ms"),
      "plain_s2_ms": med(lambda r: r["tag"] == "perfjax" and not r["fast"], "ms"),
  }
  for alloc in ("glibc", "tcmalloc"):  # glibc: NCHW defaults; tcmalloc: channels-last as well
    summary[f"monai_{alloc}_s2_ms"] = med(
        lambda r, a=alloc: r["tag"] == "peer" and r["mode"] == "monai" and r["allocator"] == a
        and r.get("overlap", 0) > 0.9, "ms_per_slice")
    summary[f"monai_{alloc}_s32_ms"] = med(
        lambda r, a=alloc: r["tag"] == "peer" and r["mode"] == "monai" and r["allocator"] == a
        and r.get("overlap", 1) == 0.5, "ms_per_slice")
  summary["torch_cl_tcmalloc_s2_ms"] = med(
      lambda r: r["tag"] == "peer" and r["mode"] == "plain" and r.get("stride") == 2, "ms_per_slice")
  gf = flops_per_patch(args.features) * 1089 / 1e9
  if summary["fast_s2_ms"]:
    summary["fast_s2_gflops"] = round(gf / summary["fast_s2_ms"] * 1e3, 1)
    summary["fast_s2_fraction_of_jnp_dot"] = round(summary["fast_s2_gflops"] / summary["jnp_dot_gflops"], 3)
    for k in ("monai_glibc_s2_ms", "monai_tcmalloc_s2_ms", "torch_cl_tcmalloc_s2_ms", "plain_s2_ms",
              "fast_one_device_s2_ms"):
      if summary.get(k):
        summary["speedup_vs_" + k[:-3]] = round(summary[k] / summary["fast_s2_ms"], 2)
  emit(tag="summary", **summary)

  if not args.skip_memory:
    for chunk in [int(c) for c in args.memory_chunks.split(",")]:
      for is_fast in (True,):
        cmd = [sys.executable, __file__, "--child-memory", "--chunk", str(chunk),
               "--features", str(args.features)] + (["--fast"] if is_fast else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps(dict(tag="memory_error", chunk=chunk,
                                                       stderr=r.stderr[-300:])), flush=True)


if __name__ == "__main__":
  main()
