"""Dataset layer benchmark: TFDS build/read time of a config, peak-LV-frame detection accuracy.

  JAX_PLATFORMS=cpu python benchmarks/bench_data.py --config=synthetic --n_detect=90

Build: a fresh build of `--config` into a temporary folder; the time inside
`phantom.simulate` is measured apart (it runs in a prefetch thread while the previous
chunk is encoded and written, so the two overlap). Read: every record of every split
through `source` (what `load_split` stacks). Detection: `preprocess.detect_lv` on
`--n_detect` phantom FLASH slices (no motion) and bSSFP slices (motion_fraction 0.3),
against the phantom's `peak_lv_frame` and the mask's LV centroid. Preprocessing:
`preprocess_slice` on phantom slices made scanner-like (1.5x coarser pixels, 15 extra
baseline frames and 5 extra frames at the end, no mask).
"""
import argparse
import shutil
import tempfile
import time

import numpy as np

from perfjax.data import datasets, phantom, preprocess


def bench_build(config: str) -> None:
  calls = {"seconds": 0.0, "slices": 0}
  simulate = phantom.simulate

  def timed(*args, **kwargs):
    t0 = time.perf_counter()
    out = simulate(*args, **kwargs)
    calls["seconds"] += time.perf_counter() - t0
    calls["slices"] += len(out["image"])
    return out

  phantom.simulate = timed
  tmp = tempfile.mkdtemp(prefix="perfjax-bench-data-")
  try:
    t0, c0 = time.perf_counter(), time.process_time()
    datasets.prepare(config, tmp)
    build, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(tmp).rglob("*") if p.is_file())
    print(f"build {config}: {calls['slices']} slices in {build:.1f} s wall, {cpu:.1f} s CPU; "
          f"inside phantom.simulate {calls['seconds']:.1f} s wall "
          f"({calls['slices'] / calls['seconds']:.1f} slices/s, in a prefetch thread that "
          f"overlaps the TFDS encoding and writing); {size / 2 ** 20:.0f} MiB on disk")
    b = datasets.builder(config, tmp)  # read what was built (no rebuild if the code changed)
    for split in datasets.SPLITS:
      t0, c0 = time.perf_counter(), time.process_time()
      src = datasets.source(config, split, tmp, prepared=b)
      n = len(src)
      recs = [r for s in range(0, n, 32) for r in src.__getitems__(list(range(s, min(s + 32, n))))]
      dt, cpu = time.perf_counter() - t0, time.process_time() - c0
      print(f"read {config}/{split}: {len(recs)} records in {dt:.2f} s wall, {cpu:.2f} s CPU "
            f"({len(recs) / dt:.0f} records/s wall)")
  finally:
    phantom.simulate = simulate
    shutil.rmtree(tmp, ignore_errors=True)


def bench_detection(n: int) -> None:
  for protocol, motion, seed in (("flash", 0.0, 100), ("bssfp", 0.3, 101)):
    d = phantom.simulate(seed, n, protocol, motion)
    err, dist = [], []
    t0 = time.perf_counter()
    for i in range(n):
      out = preprocess.detect_lv(d["image"][i])
      cy, cx = preprocess.lv_center(d["mask"][i])
      err.append(out["peak_frame"] - int(d["peak_lv_frame"][i]))
      dist.append(np.hypot(out["center"][0] - cy, out["center"][1] - cx))
    dt = (time.perf_counter() - t0) / n
    err, dist, mot = np.abs(err), np.asarray(dist), d["motion"]
    for name, sel in (("all", np.ones(n, bool)), ("no motion", ~mot), ("motion", mot)):
      if sel.any():
        e, c = err[sel], dist[sel]
        print(f"detect {protocol} {name:9s} n={sel.sum():3d}: peak exact {np.mean(e == 0):.2f} "
              f"within 1 {np.mean(e <= 1):.2f} within 2 {np.mean(e <= 2):.2f}; "
              f"LV centre < 3 px {np.mean(c < 3):.2f}, < 8 px {np.mean(c < 8):.2f}")
    print(f"detect {protocol}: {1e3 * dt:.1f} ms per slice")


def bench_preprocess(n: int = 12) -> None:
  """preprocess_slice on scanner-like input: 1.5x coarser pixels, 50 frames, no mask."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  d = phantom.simulate(7, n, "flash", 0.0)
  starts, centred, seconds = [], [], 0.0
  for i in range(n):
    raw = np.concatenate([np.repeat(d["raw"][i][..., :1], 15, -1), d["raw"][i],
                          np.repeat(d["raw"][i][..., -1:], 5, -1)], -1)
    coarse = ndimage.zoom(raw, (1 / 1.5, 1 / 1.5, 1), order=1)  # 85 x 85 x 50
    times = np.concatenate([np.arange(15) * 0.8, d["times"][i] + 12.0,
                            d["times"][i][-1] + 12.0 + 0.8 * np.arange(1, 6)])
    t0 = time.perf_counter()
    out = preprocess.preprocess_slice(coarse, times, None, pixel_mm=1.5 * float(d["pixel_mm"][i]),
                                      target_pixel_mm=float(d["pixel_mm"][i]))
    seconds += time.perf_counter() - t0
    starts.append(out["frame_start"] == 15 + preprocess.bolus_arrival(d["raw"][i]) - 3)
    peak = out["raw"][..., out["peak_lv_frame"]]
    centred.append(peak[60:68, 60:68].mean() > 0.6 * peak.max())
  print(f"preprocess_slice {coarse.shape} no mask: {1e3 * seconds / n:.0f} ms per slice; "
        f"truncation starts 3 frames before the unpadded series' arrival in "
        f"{np.mean(starts):.2f}; bright LV blood at the crop centre in {np.mean(centred):.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="synthetic")
  parser.add_argument("--n_detect", type=int, default=90)
  parser.add_argument("--skip_build", action="store_true")
  args = parser.parse_args()
  if not args.skip_build:
    bench_build(args.config)
  if args.n_detect:
    bench_detection(args.n_detect)
  bench_preprocess()


if __name__ == "__main__":
  main()
