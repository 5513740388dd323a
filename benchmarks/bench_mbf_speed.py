"""A test split's MBF, curve extraction plus Fermi fit, against the scipy peer fitting one curve
at a time (issue 13, "Speed"), side by side in one run.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_mbf_speed.py [--slices 120]
      [--protocol flash] [--seed 41] [--rounds 3] [--peer-curves 600]
      [--peer ../shared/peers/fermi_scipy.py] [--extraction auto|numpy|vectorised|both]

perfjax: `perfusion.mbf_of_masks` on a phantom test split (rest + stress, ground-truth masks,
concentration, AIF series) exactly as the evaluation runs it: frame gains, 48 sector curves and
AIFs for every slice (`timing.extract_s`), then one batched solve (`timing.fit_s`) that fits each
curve with and without the spill-over term at the nominal flip angle and at x0.9 and x1.1, a
first call (compile) and then ``--rounds`` timed calls; with ``--extraction both``, the numpy
extraction (a thread per slice) and the vectorised one (`perfjax.batched_curves`) in turn, the
summary from the faster. The peer (`fermi_scipy.Fitter`:
scipy.optimize.least_squares, trf, analytic Jacobian) fits a random subset of the same sector
curves with the same AIFs and frame times, one curve at a time; its seconds per fit are
extrapolated to (a) the same number of fits as perfjax's job (like for like) and (b) one fit
per sector curve (the peer's own job: no spill-over term, no flip-angle variants). The peer's
model is its own (4 parameters over all frames), so only its speed is compared; its MBF error
against the truth is printed beside it for context.

Needs numpy, scipy, jax and threadpoolctl, all in the GPU image (no ml_collections or TFDS).
Prints JSON lines; the last one is the summary.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from perfjax import perfusion
from perfjax.data import phantom

PEER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "peers" / "fermi_scipy.py"


def load_peer(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location("fermi_scipy", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def emit(**row) -> dict:
  print(json.dumps(row), flush=True)
  return row


def peer_fits(peer, result: dict, times: np.ndarray, truth48: np.ndarray, n_curves: int,
              seed: int) -> dict:
  """The peer on ``n_curves`` random sector curves of the nominal variant, one at a time."""
  aif, curves = result["aif"], result["curves"]  # [N, T], [N, 48, T] (mM, baseline 0)
  ok = np.isfinite(aif).all(1)[:, None] & np.isfinite(curves).all(2)
  rows, secs = np.nonzero(ok)
  pick = np.random.default_rng(seed).choice(rows.size, min(n_curves, rows.size), replace=False)
  fitters, mbf, seconds = {}, [], 0.0
  for j in pick:
    i, s = rows[j], secs[j]
    if i not in fitters:  # one convolution matrix per slice (not timed: favours the peer)
      fitters[i] = peer.Fitter(times[i] - times[i, 0], aif[i])
    t0 = time.perf_counter()
    theta, status, _ = fitters[i].fit(curves[i, s])
    seconds += time.perf_counter() - t0
    flow = theta[0] / (1.0 + np.exp(-theta[1] / theta[2])) if status > 0 else np.nan
    mbf.append(flow * perfusion.ML_G_MIN_PER_S)
  err = np.abs(np.asarray(mbf) / truth48[rows[pick], secs[pick]] - 1.0)
  return dict(n=int(pick.size), s_per_fit=seconds / max(pick.size, 1),
              median_abs_err=float(np.nanmedian(err)), failed=int(np.isnan(err).sum()))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--slices", type=int, default=120)
  ap.add_argument("--protocol", default="flash", choices=["flash", "bssfp"])
  ap.add_argument("--seed", type=int, default=41)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--peer-curves", type=int, default=600)
  ap.add_argument("--peer", type=pathlib.Path, default=PEER)
  ap.add_argument("--extraction", default="auto", choices=["auto", "numpy", "vectorised", "both"],
                  help="the curve extraction timed: mbf_of_masks' default for the platform, "
                       "the numpy thread per slice, the batched jitted calls, or both in turn")
  args = ap.parse_args()
  if not args.peer.is_file():
    ap.error(f"--peer {args.peer}: no such file (the scipy peer, shared/peers/fermi_scipy.py)")
  emit(jax=jax.__version__, devices=str(jax.devices()), numpy=np.__version__,
       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  rec = phantom.simulate(args.seed, args.slices, args.protocol, 0.0, stress="mixed")
  truth48 = rec["mbf_sector48"].astype(np.float64)

  def run(vectorised):
    t0 = time.perf_counter()
    out = perfusion.mbf_of_masks(rec, [rec["mask"]], "concentration", vectorised=vectorised)[0]
    return out, time.perf_counter() - t0

  paths = dict(auto=[None], numpy=[False], vectorised=[True], both=[False, True])[args.extraction]
  timed = {}
  for vectorised in paths:  # each path's first call (compiles), then its timed rounds
    name = {None: "default", False: "numpy", True: "vectorised"}[vectorised]
    first, first_s = run(vectorised)
    emit(section="first call", extraction=name, seconds=round(first_s, 2), **{
        k: round(v, 3) for k, v in first["timing"].items()})
    rounds = [run(vectorised) for _ in range(args.rounds)]
    total = statistics.median(s for _, s in rounds)
    extract = statistics.median(r["timing"]["extract_s"] for r, _ in rounds)
    fit = statistics.median(r["timing"]["fit_s"] for r, _ in rounds)
    n_fits = first["timing"]["n_fits"]
    ok = np.isfinite(first["sector48"])
    error = np.abs(first["sector48"][ok] / truth48[ok] - 1.0)
    timed[name] = (total, extract, fit)
    emit(section="perfjax", extraction=name, slices=args.slices, protocol=args.protocol,
         n_fits=n_fits, total_s=round(total, 3), extract_s=round(extract, 3),
         fit_s=round(fit, 3), rounds=[round(s, 3) for _, s in rounds],
         ok_sectors=int(ok.sum()), median_abs_err=float(np.median(error)))
  name = min(timed, key=lambda k: timed[k][0])  # the summary's: the faster path
  total, extract, fit = timed[name]

  # The curves the job fitted (nominal flip angle): extract them again with its settings.
  seqs = [perfusion.sequence_from_record(rec, i) for i in range(args.slices)]
  series = [perfusion.aif_series_from_record(rec, i) for i in range(args.slices)]
  full = perfusion.mbf_from_slices(rec["raw"], rec["mask"], rec["times"], sequences=seqs,
                                   study_ids=rec["study_id"], aif_series=series,
                                   flip_sensitivity=0.0)
  peer = peer_fits(load_peer(args.peer), full, rec["times"].astype(np.float64), truth48,
                   args.peer_curves, args.seed)
  emit(section="scipy peer", **peer)
  n_sector_curves = args.slices * 48
  same = peer["s_per_fit"] * n_fits
  own = peer["s_per_fit"] * n_sector_curves
  emit(section="summary", slices=args.slices, extraction=name, perfjax_s=round(total, 3),
       perfjax_extract_s=round(extract, 3), perfjax_fit_s=round(fit, 3), n_fits=n_fits,
       peer_ms_per_fit=round(1e3 * peer["s_per_fit"], 3),
       peer_same_fits_s=round(same, 1), ratio_same_fits=round(same / total, 1),
       peer_one_fit_per_curve_s=round(own, 1), ratio_one_fit_per_curve=round(own / total, 2))


if __name__ == "__main__":
  main()
