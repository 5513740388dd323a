"""Phantom speed: slices per second of perfjax.data.phantom.simulate, and the paper-sized build.

Usage:
  .venv/bin/python benchmarks/bench_phantom.py [--n 120] [--repeats 3] [--no-paper]

Prints one JSON object: per protocol and thread count (workers 1 and 2) the median wall-clock
and CPU seconds (all threads) per slice over the repeats (after one warm-up call), slices/s,
and the time to build the paper-sized set with the default workers (96 FLASH studies x 3
slices + 40 bSSFP studies x 3 slices = 408 slices, motion fraction 0.1) in one process.
The machine is shared: the 1-minute load average is recorded beside.
"""
import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from perfjax.data import phantom  # noqa: E402


def _time(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=120, help="slices per timed call")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-paper", action="store_true", help="skip the paper-sized build")
  args = parser.parse_args()
  out = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
             load_1min_before=os.getloadavg()[0], n=args.n, repeats=args.repeats)
  phantom.simulate(0, 3, "flash")  # warm-up (imports, page cache)
  for protocol in ("flash", "bssfp"):
    for workers in (1, 2):
      runs = [_time(lambda r=r: phantom.simulate(100 + r, args.n, protocol, motion_fraction=0.1,
                                                 workers=workers))
              for r in range(args.repeats)]
      wall = float(np.median([w for w, _ in runs]))
      cpu = float(np.median([c for _, c in runs]))
      out[f"{protocol}_workers{workers}"] = dict(
          wall_s=wall, cpu_s=cpu, slices_per_s=args.n / wall, ms_per_slice_wall=1e3 * wall / args.n,
          ms_per_slice_cpu=1e3 * cpu / args.n)
  if not args.no_paper:
    def build():
      phantom.simulate(1, 96 * 3, "flash", motion_fraction=0.1)
      phantom.simulate(2, 40 * 3, "bssfp", motion_fraction=0.1, study_offset=96)
    wall, cpu = _time(build)
    out["paper_build"] = dict(slices=408, wall_s=wall, cpu_s=cpu, slices_per_s=408 / wall)
  out["load_1min_after"] = os.getloadavg()[0]
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
