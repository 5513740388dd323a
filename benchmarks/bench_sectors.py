"""Per-slice cost of the sector geometry, sector Dice and U on a 128 x 128 slice (CPU, numpy/scipy).

Run: JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/bench_sectors.py [--repeats 50]
     [--baselines]
The slice is a ring myocardium (LV radius 16 px, wall 8 px) with an RV crescent, the
size of the phantom's hearts; the numbers bound the evaluation's per-slice bookkeeping.
With --baselines it also times the TTA and MC-dropout uncertainty maps (8 samples of the
stride-32 prediction of the default UNet, f=16, 30 frames, random weights) per slice.
"""
import argparse
import time

import numpy as np

from perfjax import metrics, sectors, uncertainty


def ring_mask(h=128, cy=63.4, cx=64.7, r_in=16.0, r_out=24.0, rv_out=36.0, a0=115.0, a1=245.0):
  rows, cols = np.indices((h, h))
  r = np.hypot(rows - cy, cols - cx)
  theta = np.mod(np.degrees(np.arctan2(-(rows - cy), cols - cx)), 360.0)
  mask = np.zeros((h, h), np.int32)
  mask[r < r_in] = 2
  mask[(r >= r_in) & (r < r_out)] = 1
  mask[(r >= r_out) & (r < rv_out) & (np.mod(theta - a0, 360.0) <= np.mod(a1 - a0, 360.0))] = 3
  return mask


def timed(fn, repeats):
  fn()
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats * 1e3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--baselines", action="store_true")
  args = parser.parse_args()
  gt = ring_mask()
  pred = ring_mask(cy=64.2, cx=64.1, r_in=15.5, r_out=24.5, a0=110.0, a1=250.0)
  um = np.random.default_rng(0).uniform(0, 0.2, gt.shape) * (pred == 1)
  cases = {
      "rv_insertion_points": lambda: sectors.rv_insertion_points(gt),
      "sector_map 6x1": lambda: sectors.sector_map(gt, 6, 1),
      "sector_map 24x2 (48)": lambda: sectors.sector_map(gt, 24, 2),
      "sector_dice 6x1": lambda: metrics.sector_dice(pred, gt, 6, 1),
      "sector_dice 6x2": lambda: metrics.sector_dice(pred, gt, 6, 2),
      "dice_table (1 slice: whole, 6, 12)": lambda: metrics.dice_table(pred[None], gt[None]),
      "slice_uncertainty dilation 0": lambda: uncertainty.slice_uncertainty(um, pred),
      "slice_uncertainty dilation 2": lambda: uncertainty.slice_uncertainty(um, pred, dilation=2),
  }
  print(f"| operation (128x128 slice) | ms per slice (mean of {args.repeats}) |")
  print("|---|---|")
  for name, fn in cases.items():
    print(f"| {name} | {timed(fn, args.repeats):.2f} |")
  if args.baselines:
    baselines(n_slices=4)


def baselines(n_slices):
  import jax  # noqa: PLC0415 (only for this optional part)
  import jax.numpy as jnp  # noqa: PLC0415
  from perfjax.fast_unet import UNetPredictor  # noqa: PLC0415
  from perfjax.model import UNet  # noqa: PLC0415

  images = np.random.default_rng(0).uniform(size=(n_slices, 128, 128, 30)).astype(np.float32)
  model = UNet(features=16, dropout_rate=0.1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 30)))
  predictor = UNetPredictor(UNet(features=16))
  key = jax.random.key(1)
  runs = {
      "TTA, 8 samples x 9 windows": lambda: uncertainty.tta_uncertainty(predictor, variables, images, key),
      "MC dropout, 8 samples x 9 windows": lambda: uncertainty.mc_dropout_uncertainty(
          model, variables, images, key),
  }
  print(f"\n| baseline UM ({n_slices} slices per call) | first call s | warm ms per slice |")
  print("|---|---|---|")
  for name, fn in runs.items():
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fn()
    t2 = time.perf_counter()
    print(f"| {name} | {t1 - t0:.2f} | {(t2 - t1) / n_slices * 1e3:.0f} |")


if __name__ == "__main__":
  main()
