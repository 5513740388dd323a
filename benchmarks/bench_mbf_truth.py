"""Slice MBF against the phantom's truth (issue 13's targets), with and without the frame-gain
correction, over several phantom seeds: rest + stress, motion-free, AIF series, concentration.

  python benchmarks/bench_mbf_truth.py --seeds 5 11 12 --slices 48 \
      --protocols bssfp flash --parameter-error both [--auto released/patch3]
  python benchmarks/bench_mbf_truth.py --seeds 41 42 --protocols flash --true-gain refused all
  python benchmarks/bench_mbf_truth.py --seeds 41 42 43 --protocols bssfp flash \
      --frame-gain yes --aif series own-pool

``--true-gain`` and ``--noise`` take parts of the error away, to see what the rest is made of:
the phantom's true per-frame gain (``frame_gain_true``) divided out of every slice ("all") or
only where no measured gain was divided out ("refused"; the measured one elsewhere), and the
images' noise scaled (0: noise-free slices and AIF series).

Prints one JSON line per (variability, protocol, parameter error, masks, frame gain,
spill-over term): the
number of slices, median |error|, median bias, 95th percentile of |error| and R^2 (Pearson),
each with a 95 % interval from resampling studies (errors are slice MBF / truth - 1). With
``--aif own-pool`` each slice's own blood pool is the AIF (no AIF series, no study sharing:
predict's case without one), and every line summarises the AIFs' `aif_amplification`. With
``--auto WORKDIR`` the model's stride-32 segmentation is scored beside the ground-truth masks,
both in one batched solve (each mask divided by its own RV insertion points). ``--plot PNG``
draws each line's slices: MBF against the truth and a Bland-Altman plot.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from perfjax import perfusion
from perfjax.data import phantom
from real_data import segment  # benchmarks/real_data.py, beside this script

N_BOOT = 2000


def _figures(err: np.ndarray, est: np.ndarray, truth: np.ndarray) -> dict:
  ok = np.isfinite(err)
  e, a = err[ok], np.abs(err[ok])
  return dict(median_abs=float(np.median(a)), bias=float(np.median(e)),
              p95=float(np.percentile(a, 95)),
              r2=float(np.corrcoef(est[ok], truth[ok])[0, 1] ** 2))


def summarize(est, truth, study, seed: int = 0) -> dict:
  """The four figures and their study-bootstrap 95 % intervals; n counts finite slices."""
  est, truth, study = (np.asarray(x) for x in (est, truth, study))
  err = est / truth - 1.0
  out = dict(n=int(np.isfinite(err).sum()), n_studies=int(np.unique(study).size),
             **_figures(err, est, truth))
  rng = np.random.default_rng(seed)
  ids = np.unique(study)
  rows = [np.nonzero(study == s)[0] for s in ids]
  boots = []
  for _ in range(N_BOOT):
    pick = np.concatenate([rows[j] for j in rng.integers(0, len(ids), len(ids))])
    if np.isfinite(err[pick]).sum() >= 3:
      boots.append(_figures(err[pick], est[pick], truth[pick]))
  for key in ("median_abs", "bias", "p95", "r2"):
    vals = np.array([b[key] for b in boots])
    out[key + "_ci95"] = [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[5, 11, 12])
  ap.add_argument("--slices", type=int, default=48, help="slices per seed (3 per study)")
  ap.add_argument("--protocols", nargs="+", default=["bssfp"], choices=["bssfp", "flash"])
  ap.add_argument("--variability", nargs="+", default=["wide"], choices=["wide", "narrow"])
  ap.add_argument("--parameter-error", default="no", choices=["no", "yes", "both"])
  ap.add_argument("--auto", default=None, help="workdir of a model to segment the slices")
  ap.add_argument("--frame-gain", default="both", choices=["no", "yes", "both"])
  ap.add_argument("--spill-over", default="yes", choices=["no", "yes", "both"])
  ap.add_argument("--true-gain", nargs="+", default=[], choices=["refused", "all"],
                  help="also score with the phantom's true frame gain divided out")
  ap.add_argument("--noise", type=float, default=1.0, help="the phantom's noise scale")
  ap.add_argument("--aif", nargs="+", default=["series"], choices=["series", "own-pool"],
                  help="the AIF series (shipped), or each slice's own blood pool, one slice at "
                       "a time as predict runs without an AIF series")
  ap.add_argument("--plot", default=None,
                  help="PNG: slice MBF against the truth and Bland-Altman, one column per line")
  args = ap.parse_args()
  panels = []
  choice = {"no": [False], "yes": [True], "both": [False, True]}
  errors = choice[args.parameter_error]
  options = [(g, s, a) for g in choice[args.frame_gain] for s in choice[args.spill_over]
             for a in args.aif]
  for variability in args.variability:
    for protocol in args.protocols:
      for p_err in errors:
        rows: dict[tuple, list] = {}
        t0 = time.perf_counter()
        for seed in args.seeds:
          rec = phantom.simulate(seed, args.slices, protocol, 0.0, stress="mixed",
                                 variability=variability, parameter_error=p_err,
                                 noise=args.noise)
          truth = perfusion.slice_mbf(rec["mbf_sector48"].astype(np.float64))
          masks = {"ground truth": rec["mask"]}
          if args.auto:
            masks["automatic"] = segment(args.auto, rec["image"], rec["peak_lv_frame"])
          for gain, spill, aif in options:
            pool = aif == "own-pool"
            as_run = (lambda r: dict(r, study_id=np.arange(len(truth)))) if pool else dict
            res = perfusion.mbf_of_masks(as_run(rec), list(masks.values()), "concentration",
                                         use_aif_series=not pool, frame_gain=gain,
                                         spill_over=spill)
            for name, r in zip(masks, res):
              scored = [(gain, r)]
              for which in args.true_gain:
                scored.append((f"true ({which})", perfusion.mbf_of_masks(
                    as_run(with_true_gain(rec, r, which)), [masks[name]], "concentration",
                    use_aif_series=not pool, frame_gain=False, spill_over=spill)[0]))
              for label, r_label in scored:
                acc = rows.setdefault((name, label, spill, aif), [[], [], [], []])
                acc[0].append(r_label["slice"])
                acc[1].append(truth)
                acc[2].append(seed * 100000 + rec["study_id"])
                acc[3].append(r_label["aif_amplification"])
        for (name, gain, spill, aif), acc in rows.items():
          est, truth, study, amp = (np.concatenate(x) for x in acc)
          line = dict(variability=variability, protocol=protocol, parameter_error=p_err,
                      masks=name, frame_gain=gain, spill_over=spill, aif=aif, seeds=args.seeds,
                      noise=args.noise,
                      **summarize(est, truth, study),
                      aif_amplification=amplification_summary(amp, est / truth - 1.0),
                      seconds=round(time.perf_counter() - t0, 1))
          print(json.dumps(line), flush=True)
          panels.append((f"{variability} {protocol}{', params off' if p_err else ''}, {name}, "
                         f"{'own-pool AIF, ' if aif == 'own-pool' else ''}"
                         f"gain {gain if isinstance(gain, str) else 'on' if gain else 'off'}, "
                         f"spill {'on' if spill else 'off'}",
                         est, truth))
  if args.plot:
    plot(panels, args.plot)


def amplification_summary(amp: np.ndarray, err: np.ndarray) -> dict:
  """The AIFs' `perfusion.aif_amplification`: its 5/50/95th percentiles where finite, how many
  are saturated (inf) or above `AIF_MAX_AMPLIFICATION` (predict's aif_note), and the median
  |error| of the slices with and without a note."""
  noted = amp > perfusion.AIF_MAX_AMPLIFICATION  # inf included; NaN never
  fin = np.isfinite(amp)
  med = lambda sel: (float(np.median(np.abs(err[sel & np.isfinite(err)])))  # noqa: E731
                     if (sel & np.isfinite(err)).any() else None)
  return dict(p5_50_95=np.percentile(amp[fin], [5, 50, 95]).round(2).tolist() if fin.any()
              else None, n_saturated=int(np.isinf(amp).sum()), n_noted=int(noted.sum()),
              median_abs_noted=med(noted), median_abs_not_noted=med(~noted))


def with_true_gain(rec: dict, res: dict, which: str) -> dict:
  """The record with the phantom's true frame gain divided out of its raw frames: on every
  slice ("all"), or where ``res`` (an `mbf_of_masks` result) divided no measured gain out
  ("refused"; the measured gain is divided out of the other slices)."""
  gain = np.asarray(rec["frame_gain_true"], np.float64)
  if which == "refused":
    refused = np.asarray(res["frame_gain_reason"]) != ""
    gain = np.where(refused[:, None], gain, np.asarray(res["frame_gain"], np.float64))
  return dict(rec, raw=rec["raw"] / gain[:, None, None, :].astype(np.float32))


def plot(panels, path: str) -> None:
  """One column per (set, options): estimate against truth above, Bland-Altman below."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from perfjax import figures  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 7.0), squeeze=False)
  for j, (title, est, truth) in enumerate(panels):
    figures.scatter_plot(truth, est, ax=axes[0, j], label_x="true MBF", label_y="slice MBF")
    axes[0, j].set_title(title + "\n" + axes[0, j].get_title(), fontsize=8)
    figures.bland_altman_plot(est, truth, ax=axes[1, j], label_a="MBF", label_b="truth")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"figure: {path}", flush=True)


if __name__ == "__main__":
  main()
