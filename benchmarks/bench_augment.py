"""Cost of on-device augmentation per batch, alone and inside the training step (CPU or GPU).

Run: JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/bench_augment.py
     [--batch 32] [--size 64] [--frames 30] [--repeats 10] [--step] [--features 16]
Times `augment_batch` jitted alone for each mode (and the threefry noise variant), then with
--step the whole `perfjax.train.train_step` (UNet, cross-entropy, Adam) with mode none,
conventional and advanced, so the augmentation's share of a real step is read off directly.
Reports compile seconds, and per call the median and min wall ms and the median process CPU
ms (all threads; on a shared machine wall time inflates with the load, CPU time much less).
"""
import argparse
import dataclasses
import functools
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from perfjax import augment


def measure(fn, args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return compile_s, 1e3 * np.median(wall), 1e3 * np.min(wall), 1e3 * np.median(cpu)


def row(name, result):
  compile_s, med, low, cpu = result
  print(f"| {name} | {compile_s:.2f} | {med:.1f} | {low:.1f} | {cpu:.1f} |", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--frames", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument("--step", action="store_true", help="also time the training step")
  args = parser.parse_args()

  try:
    cpu_name = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next(l.split(":", 1)[1].strip() for l in cpu_name.splitlines()
                    if l.startswith("Model name"))
  except (OSError, StopIteration):
    cpu_name = platform.processor()
  print(f"device {jax.devices()[0].device_kind} | cpu {cpu_name} | load {os.getloadavg()[0]:.1f}"
        f" | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  shape = (args.batch, args.size, args.size, args.frames)
  print(f"batch {shape}, {args.repeats} repeats after the compile\n")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random(shape, dtype=np.float32))
  masks = jnp.asarray(rng.integers(0, 4, shape[:3]), jnp.int32)
  key = jax.random.key(0)

  print("| augment_batch alone | compile s | median ms | min ms | CPU ms |")
  print("|---|---|---|---|---|")
  fn = jax.jit(augment.augment_batch, static_argnames=("mode", "config"))
  threefry = dataclasses.replace(augment.AugmentConfig(), fast_noise=False)
  for name, mode, cfg in (("conventional", "conventional", None),
                          ("advanced", "advanced", None),
                          ("advanced, threefry noise", "advanced", threefry)):
    row(name, measure(functools.partial(fn, mode=mode, config=cfg), (key, images, masks),
                      args.repeats))
  if not args.step:
    return

  import optax  # pylint: disable=g-import-not-at-top
  from perfjax import inputs, train  # pylint: disable=g-import-not-at-top
  from perfjax.model import UNet  # pylint: disable=g-import-not-at-top
  model = UNet(features=args.features)
  tx = optax.adam(1e-3)
  params = jax.jit(model.init)(jax.random.key(1), images[:1])["params"]
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key_data(inputs.prng_key(0)))
  batch = dict(image=images, mask=masks)
  print(f"\n| train_step, UNet f={args.features} | compile s | median ms | min ms | CPU ms |")
  print("|---|---|---|---|---|")
  for mode in ("none", "conventional", "advanced"):
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, augment_mode=mode,
                                     augment_cfg=augment.AugmentConfig()))
    row(f"augment {mode}", measure(step, (state, batch), args.repeats))


if __name__ == "__main__":
  main()
