r"""Training-step throughput (patches/s), compile time, and which part of the step dominates.

  .venv/bin/python benchmarks/bench_train.py                      # default and paper configs
  .venv/bin/python benchmarks/bench_train.py --variants=default --reps=10 --input=patch2
  .venv/bin/python benchmarks/bench_train.py --json=/tmp/bench_train.json

For each config variant, on random data of the config's batch shape (64x64 windows, C = 30 for
patch3 or 1 for patch2), jitted separately and timed as the median of --reps calls after one
warm-up (compile times are the first call's lower+compile):
  augment    `augment_batch` of the config's mode,
  forward    UNet logits,
  fwd+bwd    cross-entropy value and gradients,
  optimizer  Adam update + apply_updates given gradients,
  step       the real `perfjax.train` step (augment + fwd+bwd + Adam, state donated).
Host devices as launch.py sets them (`perfjax.platform.configure_host_devices()`); the train
step carries its own CPU fusion options.
"""
import argparse
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from perfjax import platform as perfjax_platform  # noqa: E402  pylint: disable=g-import-not-at-top

perfjax_platform.configure_host_devices()  # As launch.py does, before any JAX work.

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from perfjax import augment, feeding, inputs, train  # noqa: E402  pylint: disable=g-import-not-at-top
from perfjax.model import count_params, flops_per_patch  # noqa: E402  pylint: disable=g-import-not-at-top


def _config(input_kind, variant):
  spec = importlib.util.spec_from_file_location("_cfg", ROOT / "configs" / f"{input_kind}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("" if variant == "default" else variant)


def _time(fn, args, reps):
  """(compile seconds, median run seconds) of jitted `fn` on `args`."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - t0)
  return compile_s, statistics.median(runs)


def bench(input_kind, variant, reps, batch_size=None):
  config = _config(input_kind, variant)
  if batch_size:
    config.train.batch_size = batch_size
  b, c = config.train.batch_size, inputs.input_channels(config.input)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 1, (b, 64, 64, c)).astype(np.float32))
  masks = jnp.asarray(rng.integers(0, 4, (b, 64, 64)).astype(np.int32))
  model, tx = train.make_model(config), train.make_optimizer(config)
  mesh = train.make_mesh()
  state = train.initial_state(config, model, tx, mesh)
  params = state["params"]
  key = inputs.prng_key(0)
  mode, aug_cfg = config.augment.mode, train.augment_config(config)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  parts = {
      "augment": (jax.jit(functools.partial(augment.augment_batch, mode=mode, config=aug_cfg)),
                  (key, images, masks)),
      "forward": (jax.jit(lambda p, x: model.apply({"params": p}, x)), (params, images)),
      "fwd+bwd": (jax.jit(jax.value_and_grad(loss_fn)), (params, images, masks)),
      "optimizer": (jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0])),
                    (params, state["opt_state"], params)),
  }
  out = dict(input=input_kind, variant=variant, features=config.model.features,
             depth=config.model.depth, batch=b, channels=c, augment_mode=mode,
             params=count_params(params),
             gflop_per_patch=flops_per_patch(config.model.features, config.model.depth, c) / 1e9)
  for name, (fn, args) in parts.items():
    compile_s, run_s = _time(fn, args, reps)
    out[name] = dict(compile_s=round(compile_s, 2), ms=round(run_s * 1e3, 1))

  step_fn = train.jit_train_step(config, model, tx, mesh)
  batch = feeding.shard_batch(mesh, {"image": np.asarray(images), "mask": np.asarray(masks)})
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  runs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    runs.append(time.perf_counter() - t0)
  step_s = statistics.median(runs)
  out["step"] = dict(compile_s=round(compile_s, 2), ms=round(step_s * 1e3, 1))
  out["patches_per_s"] = round(b / step_s, 1)
  # Training FLOPs ~ 3x the forward pass (forward + two backward convolutions).
  out["train_gflop_per_s"] = round(3 * out["gflop_per_patch"] * b / step_s, 1)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="default,paper")
  parser.add_argument("--input", default="patch3", choices=("patch3", "patch2"))
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=None, help="override the config's")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
  results = []
  for variant in args.variants.split(","):
    r = bench(args.input, variant, args.reps, args.batch_size)
    results.append(r)
    print(f"\n{variant}: {r['input']} f={r['features']} depth={r['depth']} batch={r['batch']} "
          f"augment={r['augment_mode']} params={r['params']:,} "
          f"({r['gflop_per_patch']:.3f} GFLOP/patch forward)")
    print(f"  {'part':10s} {'compile s':>9s} {'ms':>9s} {'of step':>8s}")
    for name in ("augment", "forward", "fwd+bwd", "optimizer", "step"):
      part = r[name]
      print(f"  {name:10s} {part['compile_s']:9.2f} {part['ms']:9.1f} "
            f"{part['ms'] / r['step']['ms']:8.0%}")
    print(f"  throughput: {r['patches_per_s']} patches/s, {r['train_gflop_per_s']} GFLOP/s "
          f"(3x forward FLOPs)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
