r"""Issue 16's table in one command: perfjax and the PyTorch peer side by side, JSON lines.

  python benchmarks/bench_gpu.py --out=benchmarks/results/gpu_$(date +%F).jsonl   # on a GPU
  python benchmarks/bench_gpu.py --tiny        # tiny sizes: proves the script runs (CPU is fine)
  python benchmarks/bench_gpu.py --only=jax    # perfjax rows only (or --only=torch)
  python benchmarks/bench_gpu.py --only=precision --accuracy=synthetic   # bfloat16's cost

Rows (one JSON object per line, `row` names it; seconds are wall-clock medians):
  env             device, versions, date (one per framework process).
  sliding_window  stride-2 UM (mean + std of 1089 windows per 128 x 128 x 30 slice, random
                  weights) of --slices slices after a compiling warm-up, fast path, "matmul"
                  accumulation (the accelerators' default): f=64 bfloat16 with slices_per_call
                  8 and 30, f=16 float32 with 8, 30 and all slices, f=64 float32; then the
                  CPU's "loop" accumulation for f=64 bfloat16 and f=16 beside them, and f=16
                  bfloat16. TFLOP/s from the analytic FLOPs. (--sections=sliding: these rows
                  and the peer's only.)
  train_step      the real `perfjax.train` step (augment + fwd/bwd + Adam, state donated): paper
                  (f=64, batch 32, advanced augmentation) and default (f=16, batch 16), in each
                  of --dtypes (float32 and bfloat16); `ms` blocks after every step,
                  `ms_pipelined` after --steps steps.
  train_loop      the loop between evaluations, paper and default variants (float32):
                  `perfjax.feeding.BatchFeeder` (windows on the device when they fit, else
                  prefetched by a thread), the step, metrics fetched one step late;
                  `ratio_to_step` = loop ms / pipelined step ms (issue target <= 1.15); the
                  loop runs twice --steps steps. On a CPU, e.g. `--only=jax --sections=train
                  --steps=6 --reps=1 --dtypes=float32` (the paper step takes seconds there).
  torch_*         the same workloads for a hand-batched channels-last PyTorch UNet of the same
                  architecture (float32; bfloat16 under autocast), when torch imports.
  precision       with --accuracy=DATASET (needs the data stack: TFDS, orbax, ml_collections):
                  the cost of bfloat16 on that dataset's test split with the released patch3
                  model (`released/patch3`, or --workdir): myocardium Dice of each precision
                  against the ground truth, segmentations' agreement, and UM (the myocardium
                  std) differences, at --accuracy_stride (default the paper's 2).
Each framework runs in its own subprocess (each takes most of a GPU's memory). The perfjax part
needs only jax, flax, optax and numpy. Record figures with the card, date and versions in
benchmarks/RESULTS.md; never compare figures of different machines.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE, FRAMES, PATCH, CLASSES = 128, 30, 64, 4


def emit(**row) -> dict:
  print(json.dumps(row), flush=True)
  return row


def sizes(tiny: bool, steps: int | None = None) -> dict:
  """Workload sizes: the issue's, or tiny ones that run in seconds on a CPU; `steps` overrides
  the training rows' pipelined step count."""
  if tiny:
    # One width and batch: the paper and default rows share their compiled programs.
    z = dict(slices=1, stride=32, wide=4, narrow=4, paper_batch=4, default_batch=4,
             steps=3, windows=64, chunk_full=9, spc=(1,))
  else:
    z = dict(slices=120, stride=2, wide=64, narrow=16, paper_batch=32, default_batch=16,
             steps=50, windows=4096, chunk_full=1089, spc=(8, 30))
  return z if steps is None else dict(z, steps=steps)


def median_s(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------------------------- perfjax


class Fields(dict):
  """Nested dicts with attribute access: the config fields the step reads (no ml_collections)."""
  __getattr__ = dict.__getitem__


def step_config(features: int, batch: int, dtype: str, augment_mode: str) -> Fields:
  return Fields(seed=0, input="patch3",
                model=Fields(features=features, depth=4, dropout_rate=0.0, dtype=dtype,
                             patch=PATCH),
                augment=Fields(mode=augment_mode),
                train=Fields(batch_size=batch, learning_rate=1e-3, schedule="cosine",
                             warmup_steps=500, num_steps=30_000))


def jax_rows(args) -> None:
  sys.path.insert(0, str(ROOT))
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_host_devices()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from perfjax import feeding, inference, train, windows  # pylint: disable=g-import-not-at-top
  from perfjax.fast_unet import UNetPredictor  # pylint: disable=g-import-not-at-top
  from perfjax.model import (UNet, compute_dtype, flops_per_patch,  # pylint: disable=g-import-not-at-top
                             numpy_params)

  z = sizes(args.tiny, args.steps)
  device = jax.devices()[0]
  emit(row="env", framework="jax", jax=jax.__version__, device=device.device_kind,
       platform=device.platform, devices=jax.device_count(), tiny=args.tiny,
       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  rng = np.random.default_rng(0)
  images = rng.random((z["slices"], IMAGE, IMAGE, FRAMES), dtype=np.float32)
  n_windows = len(windows.grid(IMAGE, IMAGE, PATCH, z["stride"]))

  def sliding(features, dtype, fast, chunk, spc, accumulate="matmul"):
    model = UNet(features=features, depth=4, dtype=compute_dtype(dtype))
    params = numpy_params(model, FRAMES)
    run = lambda x: inference.sliding_window(  # noqa: E731
        UNetPredictor(model, fast=fast), params, x, stride=z["stride"], chunk_size=chunk,
        slices_per_call=spc, accumulate=accumulate)
    t0 = time.perf_counter()
    run(images[:spc])
    compile_s = time.perf_counter() - t0
    seconds = median_s(lambda: run(images), args.reps)
    tflop = flops_per_patch(features) * n_windows * len(images) / 1e12
    emit(row="sliding_window", f=features, dtype=dtype, fast=fast, chunk=chunk,
         slices_per_call=spc, accumulate=accumulate, slices=len(images), stride=z["stride"], seconds=round(seconds, 3),
         slices_per_s=round(len(images) / seconds, 2), tflop_per_s=round(tflop / seconds, 3),
         first_call_s=round(compile_s, 2))

  # The rows of the targets first: a time-boxed run keeps them (the lines stream out).
  # "matmul" is the accelerators' default accumulation; "loop" (the CPU's) beside it.
  spc0, spc1 = z["spc"][0], z["spc"][-1]
  if "sliding" in args.sections:
    for spc in z["spc"]:
      sliding(z["wide"], "bfloat16", True, z["chunk_full"], spc)
    sliding(z["narrow"], "float32", True, z["chunk_full"], spc0)
    sliding(z["narrow"], "float32", True, z["chunk_full"], spc1)
    sliding(z["narrow"], "float32", True, z["chunk_full"], z["slices"])
    sliding(z["wide"], "float32", True, z["chunk_full"], spc0)
    sliding(z["wide"], "bfloat16", True, z["chunk_full"], spc1, accumulate="loop")
    sliding(z["narrow"], "float32", True, z["chunk_full"], spc0, accumulate="loop")
    sliding(z["narrow"], "bfloat16", True, z["chunk_full"], spc1)
  if "train" not in args.sections:
    return

  mesh = train.make_mesh()

  def step_setup(features, batch, dtype, mode):
    config = step_config(features, batch, dtype, mode)
    model, tx = train.make_model(config), train.make_optimizer(config)
    state = train.initial_state(config, model, tx, mesh)
    return config, train.jit_train_step(config, model, tx, mesh), state

  def random_windows(count):
    return {"image": rng.random((count, PATCH, PATCH, FRAMES), dtype=np.float32),
            "mask": rng.integers(0, CLASSES, (count, PATCH, PATCH)).astype(np.int32)}

  pipelined = {}
  step_rows = [(name, features, batch, dtype) for dtype in args.dtypes
               for name, features, batch in (("paper", z["wide"], z["paper_batch"]),
                                             ("default", z["narrow"], z["default_batch"]))]

  def step_row(name, features, batch, dtype):
    _, step_fn, state = step_setup(features, batch, dtype, "advanced")
    batch_arrays = feeding.shard_batch(mesh, random_windows(batch))
    t0 = time.perf_counter()
    state, m = step_fn(state, batch_arrays)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def one():
      box["state"], out = step_fn(box["state"], batch_arrays)
      jax.block_until_ready(out)

    def many():
      out = None
      for _ in range(z["steps"]):
        box["state"], out = step_fn(box["state"], batch_arrays)
      jax.block_until_ready(out)

    ms = median_s(one, max(args.reps, 5)) * 1e3
    ms_pipe = median_s(many, args.reps) * 1e3 / z["steps"]
    pipelined[(name, dtype)] = ms_pipe
    emit(row="train_step", variant=name, f=features, batch=batch, dtype=dtype,
         augment="advanced", ms=round(ms, 3), ms_pipelined=round(ms_pipe, 3),
         steps_per_s=round(1e3 / ms_pipe, 1), first_step_s=round(compile_s, 2))

  for row in step_rows:
    step_row(*row)
    if row[3] == "float32":  # The loop's reference step.
      train_loop_row(z, mesh, step_setup, random_windows, *row[:3], pipelined[row[0], "float32"])


def train_loop_row(z, mesh, step_setup, random_windows, name, features, batch, step_ms) -> None:
  """A variant's loop between evaluations, as perfjax.train.train runs it."""
  import jax  # pylint: disable=g-import-not-at-top
  from perfjax import feeding  # pylint: disable=g-import-not-at-top
  _, step_fn, state = step_setup(features, batch, "float32", "advanced")
  data = random_windows(z["windows"])
  n_steps = z["steps"] * 2
  feeder = feeding.BatchFeeder(mesh, data, seed=0, batch_size=batch, start_step=0,
                               stop_step=n_steps + 1)
  try:
    state, m = step_fn(state, feeder.get(0))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    previous = None
    for step in range(1, n_steps + 1):
      state, m = step_fn(state, feeder.get(step))
      if previous is not None:
        float(previous["loss"])  # One step late: the device is busy with this step.
      previous = m
    float(previous["loss"])
    loop_ms = (time.perf_counter() - t0) * 1e3 / n_steps
  finally:
    feeder.close()
  emit(row="train_loop", variant=name, f=features, batch=batch,
       windows=z["windows"], windows_on_device=feeder.on_device, steps=n_steps,
       ms_per_step=round(loop_ms, 3), step_ms_pipelined=round(step_ms, 3),
       ratio_to_step=round(loop_ms / step_ms, 3))


def precision_rows(args) -> None:
  """bfloat16 against float32 on a test split (Dice, segmentation agreement, UM)."""
  sys.path.insert(0, str(ROOT))
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_host_devices()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from perfjax import checkpoints, inference, inputs, metrics  # pylint: disable=g-import-not-at-top
  from perfjax.conventions import MYOCARDIUM  # pylint: disable=g-import-not-at-top
  from perfjax.data.datasets import load_split  # pylint: disable=g-import-not-at-top
  from perfjax.fast_unet import UNetPredictor  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or str(ROOT / "released" / "patch3")
  config = checkpoints.load_workdir_config(workdir)
  split = load_split(args.accuracy, "test", keys=["image", "mask", "peak_lv_frame"])
  images = inputs.model_inputs(split["image"], split["peak_lv_frame"], config.input)
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    model, variables = checkpoints.load_params(config, workdir, "best")
    t0 = time.perf_counter()
    out[dtype] = inference.sliding_window(UNetPredictor(model, fast=True), variables, images,
                                          stride=args.accuracy_stride, chunk_size=64)
    out[dtype]["seconds"] = time.perf_counter() - t0
  dice = {d: [metrics.dice(seg, gt, label=MYOCARDIUM)
              for seg, gt in zip(out[d]["segmentation"], split["mask"])] for d in out}
  um = {d: out[d]["std"][..., MYOCARDIUM] for d in out}
  um_diff = np.abs(um["bfloat16"] - um["float32"])
  emit(row="precision", dataset=args.accuracy, workdir=workdir, slices=len(images),
       stride=args.accuracy_stride,
       dice_myo_float32=round(float(np.mean(dice["float32"])), 4),
       dice_myo_bfloat16=round(float(np.mean(dice["bfloat16"])), 4),
       dice_myo_max_abs_diff=round(float(np.max(np.abs(np.subtract(
           dice["bfloat16"], dice["float32"])))), 4),
       segmentation_agreement=round(float(np.mean(
           out["bfloat16"]["segmentation"] == out["float32"]["segmentation"])), 5),
       mean_prob_max_abs_diff=round(float(np.abs(
           out["bfloat16"]["mean"] - out["float32"]["mean"]).max()), 4),
       um_float32_mean=round(float(um["float32"].mean()), 5),
       um_max_abs_diff=round(float(um_diff.max()), 4),
       um_mean_abs_diff=round(float(um_diff.mean()), 5),
       seconds_float32=round(out["float32"]["seconds"], 2),
       seconds_bfloat16=round(out["bfloat16"]["seconds"], 2))


# --------------------------------------------------------------------------------------- torch


def torch_rows(args) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  z = sizes(args.tiny, args.steps)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  emit(row="env", framework="torch", torch=torch.__version__, device=(
      torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"), tiny=args.tiny,
       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  torch.backends.cudnn.benchmark = True

  def block(ci, co):
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(co, co, 3, padding=1), nn.ReLU(inplace=True))

  class UNet(nn.Module):
    """The perfjax UNet (depth 4) in PyTorch, as /work/shared/peers/unet_torch_monai.py."""

    def __init__(self, f):
      super().__init__()
      self.e1, self.e2, self.e3, self.b = (block(FRAMES, f), block(f, 2 * f),
                                           block(2 * f, 4 * f), block(4 * f, 8 * f))
      self.u3, self.d3 = nn.ConvTranspose2d(8 * f, 4 * f, 2, 2), block(8 * f, 4 * f)
      self.u2, self.d2 = nn.ConvTranspose2d(4 * f, 2 * f, 2, 2), block(4 * f, 2 * f)
      self.u1, self.d1 = nn.ConvTranspose2d(2 * f, f, 2, 2), block(2 * f, f)
      self.head = nn.Conv2d(f, CLASSES, 1)

    def forward(self, x):
      s1 = self.e1(x)
      s2 = self.e2(F.max_pool2d(s1, 2))
      s3 = self.e3(F.max_pool2d(s2, 2))
      y = self.b(F.max_pool2d(s3, 2))
      y = self.d3(torch.cat([self.u3(y), s3], 1))
      y = self.d2(torch.cat([self.u2(y), s2], 1))
      return self.head(self.d1(torch.cat([self.u1(y), s1], 1)))

  images = torch.from_numpy(np.random.default_rng(0).random(
      (z["slices"], FRAMES, IMAGE, IMAGE), dtype=np.float32)).to(dev)
  ones = torch.ones(1, PATCH * PATCH, 1, device=dev)

  def um_map(model, x, chunk, dtype):
    """Mean and std (ddof 1) over the stride windows of one slice x [1, C, H, W]."""
    s = z["stride"]
    patches = x.unfold(2, PATCH, s).unfold(3, PATCH, s).permute(0, 2, 3, 1, 4, 5)
    patches = patches.reshape(-1, FRAMES, PATCH, PATCH).contiguous(
        memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      probs = torch.cat([torch.softmax(model(patches[i:i + chunk]).float(), 1)
                         for i in range(0, len(patches), chunk)])
    n = len(probs)
    terms = torch.cat([probs, probs * probs], 1).reshape(n, -1).T[None]
    sums = F.fold(terms, (IMAGE, IMAGE), PATCH, stride=s)[0]
    count = F.fold(ones.expand(1, PATCH * PATCH, n), (IMAGE, IMAGE), PATCH, stride=s)[0]
    mean = sums[:CLASSES] / count
    var = (sums[CLASSES:] - count * mean * mean) / (count - 1).clamp_min(1)
    return mean, var.clamp_min(0).sqrt()

  n_windows = ((IMAGE - PATCH) // z["stride"] + 1) ** 2
  for features, dtype, chunk in () if "sliding" not in args.sections else (
                                 (z["wide"], "float32", z["chunk_full"]),
                                 (z["wide"], "bfloat16", z["chunk_full"]),
                                 (z["narrow"], "float32", z["chunk_full"])):
    model = UNet(features).to(dev).eval().to(memory_format=torch.channels_last)

    def run():
      with torch.inference_mode():
        for x in images:
          um_map(model, x[None], chunk, dtype)
      sync()

    um_map(model, images[:1], chunk, dtype)
    seconds = median_s(run, args.reps)
    emit(row="torch_sliding_window", f=features, dtype=dtype, chunk=chunk,
         slices=len(images), stride=z["stride"], windows_per_slice=n_windows,
         seconds=round(seconds, 3), slices_per_s=round(len(images) / seconds, 2))

  for name, features, batch in () if "train" not in args.sections else (
      ("paper", z["wide"], z["paper_batch"]), ("default", z["narrow"], z["default_batch"])):
    for dtype in args.dtypes:
      torch.manual_seed(0)
      model = UNet(features).to(dev).train().to(memory_format=torch.channels_last)
      opt = torch.optim.Adam(model.parameters(), 1e-3)
      x = torch.rand(batch, FRAMES, PATCH, PATCH, device=dev).contiguous(
          memory_format=torch.channels_last)
      y = torch.randint(0, CLASSES, (batch, PATCH, PATCH), device=dev)

      def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
          loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

      def one():
        step()
        sync()

      def many():
        for _ in range(z["steps"]):
          step()
        sync()

      one()
      ms = median_s(one, max(args.reps, 5)) * 1e3
      ms_pipe = median_s(many, args.reps) * 1e3 / z["steps"]
      emit(row="torch_train_step", variant=name, f=features, batch=batch, dtype=dtype,
           augment="none", ms=round(ms, 3), ms_pipelined=round(ms_pipe, 3))


# -------------------------------------------------------------------------------------- driver


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--steps", type=int, default=None, metavar="N",
                      help="train: pipelined steps per timing (the loop runs twice as many; "
                      "default 50, --tiny 3)")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="train: the step rows' precisions, comma-separated")
  parser.add_argument("--only", choices=("jax", "torch", "precision"), default=None)
  parser.add_argument("--sections", default="sliding,train",
                      help="comma-separated: sliding (the UM rows), train (steps and the loop)")
  parser.add_argument("--accuracy", default=None, metavar="DATASET",
                      help="also measure bfloat16's accuracy cost on this dataset's test split "
                      "(e.g. synthetic; synthetic_small for a quick check)")
  parser.add_argument("--accuracy_stride", type=int, default=2)
  parser.add_argument("--workdir", default=None, help="--accuracy: the trained run "
                      "(default released/patch3)")
  parser.add_argument("--worker", choices=("jax", "torch", "precision"), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = parser.parse_args()
  args.sections = tuple(x for x in args.sections.split(",") if x)
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps: expected a positive step count, got {args.steps}")
  args.dtypes = tuple(x for x in args.dtypes.split(",") if x)
  if not args.dtypes or set(args.dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes: expected float32 and/or bfloat16, got {args.dtypes}")
  if set(args.sections) - {"sliding", "train"}:
    parser.error(f"--sections: expected sliding and/or train, got {args.sections}")
  if "precision" in (args.only, args.worker) and not args.accuracy:
    parser.error("precision rows need --accuracy=DATASET")
  if args.worker:
    dict(jax=jax_rows, torch=torch_rows, precision=precision_rows)[args.worker](args)
    return
  frameworks = [args.only] if args.only else ["jax"] + (
      ["torch"] if importlib.util.find_spec("torch") else [])
  if args.accuracy and "precision" not in frameworks:
    frameworks.append("precision")
  rows = []
  for framework in frameworks:
    argv = [sys.executable, __file__, f"--worker={framework}", f"--reps={args.reps}",
            f"--sections={','.join(args.sections)}",
            f"--dtypes={','.join(args.dtypes)}"] + (
        ["--tiny"] if args.tiny else []) + [f"--{k}={v}" for k, v in (
            ("accuracy", args.accuracy), ("accuracy_stride", args.accuracy_stride),
            ("workdir", args.workdir), ("steps", args.steps)) if v is not None]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
      for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
          rows.append(json.loads(line))
    if proc.returncode:
      emit(row="error", framework=framework, returncode=proc.returncode)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  main()
