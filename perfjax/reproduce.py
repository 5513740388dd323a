"""The paper's experiments on the synthetic benchmark: four networks, several seeds, one report.

For every seed, patch2-UNet and patch3-UNet are trained with conventional and with advanced
augmentation (same architecture, data and schedule) and evaluated on the bSSFP test split with
both OOD label sets of CONVENTIONS.md (the patch3 runs get the paper's ``mbf_patch2`` labels
from the same seed's patch2-UNet with advanced augmentation). Then:

  reproduce.json   every run's headline figures, mean and spread over seeds, the verdicts
  reproduce.md     (+ .html) Table 1 beside the paper's, MBF agreement, OOD, the verdicts
  figures/         table1.png, dice_vs_confidence.png (Fig. 6), mbf_bland_altman.png

Each run lives in WORKDIR/<input>_<augment>_seed<k>/ and is skipped when its results.json
exists (training itself resumes), so an interrupted reproduction continues where it stopped.

A claim of the paper is judged on the per-seed paired differences d (same seed, same data):
it *agrees* when mean(d) has the claimed sign and |mean(d)| is larger than the spread sd(d)
(ddof 1); it is *contradicted* when the sign is opposite and larger than the spread; otherwise
the difference is within the seed spread and *not a finding*.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from matplotlib.figure import Figure
import ml_collections
import numpy as np

from perfjax import evaluate
from perfjax import figures
from perfjax import panels
from perfjax import reporting
from perfjax import train
from perfjax.data import writers

INPUTS = ("patch2", "patch3")
AUGMENTATIONS = ("conventional", "advanced")
LABEL_SETS = ("mbf_patch2", "motion")

# Paper Table 1 (network's own RVIPs): whole slice, 6-sector, 12-sector mean myocardium Dice.
PAPER_TABLE1 = {
    ("patch2", "conventional"): (0.80, 0.77, 0.62),
    ("patch3", "conventional"): (0.83, 0.77, 0.66),
    ("patch2", "advanced"): (0.82, 0.78, 0.65),
    ("patch3", "advanced"): (0.86, 0.83, 0.71),
}
# Paper III-C (advanced augmentation, vs ground-truth masks, ml/g/min) and III-D.
PAPER_MBF = {"patch3": dict(r2="> 0.95", mean=0.007, loa_low=-0.161, loa_high=0.174),
             "patch2": dict(r2="> 0.95", mean=-0.073, loa_low=-0.347, loa_high=0.200)}
PAPER_OOD = dict(auc=0.936, threshold=0.80, sensitivity=0.826, specificity=0.918,
                 dice_reliable=0.87, dice_unreliable=0.81)
DICE_COLUMNS = ("whole", "sector6", "sector12")


def run_name(input_kind: str, augment: str, seed: int) -> str:
  return f"{input_kind}_{augment}_seed{seed}"


def run_config(config: ml_collections.ConfigDict, input_kind: str, augment: str, seed: int,
               patch2_workdir: str | None) -> ml_collections.ConfigDict:
  """The training config of one run: the experiment's `base` with input, augmentation, seed."""
  run = ml_collections.ConfigDict(config.base.to_dict())
  run.input, run.augment.mode, run.seed = input_kind, augment, int(seed)
  run.eval.patch2_workdir = patch2_workdir
  run.eval.ood_labels = "mbf_patch2" if patch2_workdir else "motion"
  return run


def run_all(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates every (input, augmentation, seed) run missing in `workdir`.

  Writes the report (see the module docstring) and returns its summary (`summarize`).
  """
  workdir = os.path.abspath(workdir)
  runs = {}
  for seed in config.seeds:
    for input_kind in INPUTS:  # patch2 first: the patch3 runs' mbf_patch2 labels need it.
      for augment in AUGMENTATIONS:
        run_dir = os.path.join(workdir, run_name(input_kind, augment, seed))
        p2_dir = (os.path.join(workdir, run_name("patch2", "advanced", seed))
                  if input_kind == "patch3" else None)
        results_path = os.path.join(run_dir, "results.json")
        run_cfg = run_config(config, input_kind, augment, seed, p2_dir)
        if not os.path.isfile(results_path):
          print(f"== {run_name(input_kind, augment, seed)}")
          train.train(run_cfg, run_dir)
          evaluate.evaluate(run_cfg, run_dir, n_panels=config.n_panels)
        else:  # a finished run is kept only when these settings made it
          train.resumable_config(run_cfg, run_dir)
        with open(results_path) as f:
          runs[(input_kind, augment, int(seed))] = json.load(f)
  summary = summarize(runs)
  write_report(workdir, summary, runs)
  return summary


# ------------------------------------------------------------------------------ aggregation


def _value(results: dict, path: str) -> float:
  node: Any = results
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return float("nan")
    node = node[part]
  return float("nan") if node is None else float(node)


def spread(values) -> dict:
  """Mean, sd (ddof 1) and n of the finite values, and all values (NaN kept)."""
  v = np.asarray(values, np.float64)
  f = v[np.isfinite(v)]
  return dict(mean=float(f.mean()) if f.size else float("nan"),
              sd=float(f.std(ddof=1)) if f.size > 1 else float("nan"),
              n=int(f.size), values=v.tolist())


METRICS = {
    "dice.whole": "dice.whole",
    "dice.sector6": "dice.by_geometry.pred.sector6",  # The paper's geometry: own RVIPs.
    "dice.sector12": "dice.by_geometry.pred.sector12",
    "dice.sector6_gt": "dice.by_geometry.gt.sector6",
    "dice.sector12_gt": "dice.by_geometry.gt.sector12",
    "mbf.r2": "mbf.r2",
    "mbf.bias": "mbf.bland_altman.mean",
    "mbf.loa_low": "mbf.bland_altman.loa_low",
    "mbf.loa_high": "mbf.bland_altman.loa_high",
    "mbf_true.r2": "mbf.vs_true.auto.r2",
    "mbf_true.bias": "mbf.vs_true.auto.bland_altman.mean",
    "mbf_true.loa_low": "mbf.vs_true.auto.bland_altman.loa_low",
    "mbf_true.loa_high": "mbf.vs_true.auto.bland_altman.loa_high",
    "mbf_gt_true.r2": "mbf.vs_true.gt_mask.r2",
    "mbf_gt_true.bias": "mbf.vs_true.gt_mask.bland_altman.mean",
}
for _labels in LABEL_SETS:
  for _k in ("auc", "threshold", "sensitivity", "specificity", "n_ood", "dice_reliable",
             "dice_unreliable"):
    METRICS[f"ood.{_labels}.{_k}"] = f"ood_all.{_labels}.{_k}"
  METRICS[f"ood.{_labels}.tta_auc"] = f"ood_all.{_labels}.baselines.tta.auc"


def _loa_width(results: dict) -> float:
  return _value(results, "mbf.bland_altman.loa_high") - _value(results, "mbf.bland_altman.loa_low")


def verdict(differences, claimed_sign: int = 1, unit: str = "seed") -> dict:
  """The paired differences of a claim (one per `unit`: seed, fold), mean, sd and verdict."""
  d = np.asarray(differences, np.float64)
  d = d[np.isfinite(d)]
  out = dict(mean=float(d.mean()) if d.size else float("nan"),
             sd=float(d.std(ddof=1)) if d.size > 1 else float("nan"), n=int(d.size),
             differences=d.tolist())
  if d.size < 2:
    out["verdict"] = f"not a finding (fewer than 2 {unit}s)"
  elif abs(out["mean"]) <= out["sd"]:
    out["verdict"] = f"not a finding (within the {unit} spread)"
  elif np.sign(out["mean"]) == claimed_sign:
    out["verdict"] = "agrees"
  else:
    out["verdict"] = "contradicted"
  return out


def _paired(runs: dict, a: tuple, b: tuple, fn: Callable[[dict], float]) -> list[float]:
  """fn(run a) - fn(run b) for every seed that has both; a, b are (input, augment)."""
  seeds = sorted({s for (_, _, s) in runs})
  return [fn(runs[(*a, s)]) - fn(runs[(*b, s)]) for s in seeds
          if (*a, s) in runs and (*b, s) in runs]


def claims(runs: dict) -> list[dict]:
  """The paper's comparative claims, each judged on the per-seed paired differences."""
  out = []

  def add(text, diffs, sign=1):
    out.append(dict(claim=text, **verdict(diffs, sign)))

  dice = {c: (lambda r, c=c: _value(r, METRICS[f"dice.{c}"])) for c in DICE_COLUMNS}
  for aug in AUGMENTATIONS:
    for col in DICE_COLUMNS:
      add(f"patch3 > patch2 ({aug} augmentation), Dice {col}",
          _paired(runs, ("patch3", aug), ("patch2", aug), dice[col]))
  for inp in INPUTS:
    for col in DICE_COLUMNS:
      add(f"advanced > conventional ({inp}), Dice {col}",
          _paired(runs, (inp, "advanced"), (inp, "conventional"), dice[col]))
  for other in (("patch2", "conventional"), ("patch3", "conventional"), ("patch2", "advanced")):
    whole = _paired(runs, ("patch3", "advanced"), other, dice["whole"])
    s12 = _paired(runs, ("patch3", "advanced"), other, dice["sector12"])
    add(f"the gap of patch3 advanced over {other[0]} {other[1]} widens from whole slice to "
        "12 sectors", [b - a for a, b in zip(whole, s12)])
  add("patch3 has tighter MBF limits of agreement vs ground-truth masks than patch2 (advanced)",
      _paired(runs, ("patch3", "advanced"), ("patch2", "advanced"), _loa_width), sign=-1)
  def reliable_gap(r):
    return (_value(r, "ood_all.mbf_patch2.dice_reliable")
            - _value(r, "ood_all.mbf_patch2.dice_unreliable"))

  p3_advanced = [runs[("patch3", "advanced", s)] for s in sorted({s for (_, _, s) in runs})
                 if ("patch3", "advanced", s) in runs]
  add("reliable slices (1 - U >= t) have higher Dice than unreliable ones (patch3 advanced, "
      "mbf_patch2 labels)", [reliable_gap(r) for r in p3_advanced])
  for labels in LABEL_SETS:
    add(f"beyond the paper: U detects OOD better than the TTA baseline (patch3 advanced, "
        f"{labels} labels, AUC)", [_value(r, f"ood_all.{labels}.auc")
                                   - _value(r, f"ood_all.{labels}.baselines.tta.auc")
                                   for r in p3_advanced])
  return out


def summarize(runs: dict) -> dict:
  """Mean and spread over seeds of every metric of every network, and the verdicts."""
  networks = {}
  for inp in INPUTS:
    for aug in AUGMENTATIONS:
      group = [r for (i, a, _), r in sorted(runs.items()) if (i, a) == (inp, aug)]
      if not group:
        continue
      networks[f"{inp}_{aug}"] = dict(
          input=inp, augment=aug, seeds=sorted(s for (i, a, s) in runs if (i, a) == (inp, aug)),
          paper=dict(zip(DICE_COLUMNS, PAPER_TABLE1[(inp, aug)])),
          **{name: spread([_value(r, path) for r in group]) for name, path in METRICS.items()})
  first = next(iter(runs.values()), {})
  return dict(seeds=sorted({s for (_, _, s) in runs}), n_test_slices=first.get("n_slices"),
              dataset=first.get("config", {}).get("dataset"), networks=networks,
              claims=claims(runs), paper=dict(table1={f"{i}_{a}": v for (i, a), v in
                                                      PAPER_TABLE1.items()},
                                              mbf=PAPER_MBF, ood=PAPER_OOD))


# ---------------------------------------------------------------------------------- report


def is_number(value) -> bool:
  """A number that is not NaN/inf (summaries read back from JSON hold null for NaN)."""
  return value is not None and bool(np.isfinite(value))


def _ms(stat: dict, digits: int = 3) -> str:
  if not is_number(stat["mean"]):
    return "n/a"
  sd = f" ± {stat['sd']:.{digits}f}" if is_number(stat["sd"]) else ""
  missing = len(stat["values"]) - stat["n"]
  return f"{stat['mean']:.{digits}f}{sd}" + (f" ({stat['n']} of {len(stat['values'])} seeds)"
                                            if missing else "")


def report_markdown(summary: dict) -> str:
  """reproduce.md: the tables and verdicts, mean ± sd over seeds (sd with ddof 1)."""
  nets, seeds = summary["networks"], summary["seeds"]
  lines = [
      "# Reproducing the paper on the synthetic benchmark", "",
      f"{len(nets)} networks x {len(seeds)} seeds ({', '.join(map(str, seeds))}); test split: "
      f"{summary['n_test_slices']} bSSFP slices of `{summary['dataset']}` (trained on FLASH). "
      "Every figure is mean ± sd over seeds; the paper's (40 patients, one training run) "
      "beside it.", "",
      "## Table 1: myocardium Dice", "",
      "Sectors from the network's own RV insertion points, as in the paper; the last two "
      "columns use the ground-truth RVIPs (every network on the same sectors).", "",
      "| network | augmentation | whole | 6-sector | 12-sector | paper whole / 6 / 12 | "
      "6-sector (GT RVIPs) | 12-sector (GT RVIPs) |",
      "|---|---|---|---|---|---|---|---|"]
  for n in nets.values():
    p = n["paper"]
    lines.append(f"| {n['input']}-UNet | {n['augment']} | {_ms(n['dice.whole'])} | "
                 f"{_ms(n['dice.sector6'])} | {_ms(n['dice.sector12'])} | "
                 f"{p['whole']:.2f} / {p['sector6']:.2f} / {p['sector12']:.2f} | "
                 f"{_ms(n['dice.sector6_gt'])} | {_ms(n['dice.sector12_gt'])} |")
  lines += ["", "![Table 1](figures/table1.png)", "",
            "## MBF agreement (slice MBF, ml/g/min)", "",
            "| network | augmentation | R2 vs GT mask | bias | LoA | R2 vs true MBF | bias vs true "
            "| LoA vs true | GT mask vs true: R2, bias |", "|---|---|---|---|---|---|---|---|---|"]
  for n in nets.values():
    lines.append(
        f"| {n['input']}-UNet | {n['augment']} | {_ms(n['mbf.r2'])} | {_ms(n['mbf.bias'])} | "
        f"[{_ms(n['mbf.loa_low'])}, {_ms(n['mbf.loa_high'])}] | {_ms(n['mbf_true.r2'])} | "
        f"{_ms(n['mbf_true.bias'])} | [{_ms(n['mbf_true.loa_low'])}, "
        f"{_ms(n['mbf_true.loa_high'])}] | {_ms(n['mbf_gt_true.r2'])}, "
        f"{_ms(n['mbf_gt_true.bias'])} |")
  pm = summary["paper"]["mbf"]
  lines += ["", f"Paper (advanced augmentation, vs GT masks): patch3 R2 {pm['patch3']['r2']}, bias "
            f"{pm['patch3']['mean']:+.3f} [{pm['patch3']['loa_low']:+.3f}, "
            f"{pm['patch3']['loa_high']:+.3f}]; patch2 bias {pm['patch2']['mean']:+.3f} "
            f"[{pm['patch2']['loa_low']:+.3f}, {pm['patch2']['loa_high']:+.3f}]. The paper could "
            "not measure against the true MBF; the phantom can. The last column is the same "
            "pipeline on the ground-truth masks: what the segmentation cannot be blamed for.", "",
            "![MBF Bland-Altman](figures/mbf_bland_altman.png)", "",
            "## Out-of-distribution detection with 1 - U", ""]
  po = summary["paper"]["ood"]
  for labels in LABEL_SETS:
    rows = [n for n in nets.values() if is_number(n[f"ood.{labels}.auc"]["mean"])]
    if not rows:
      continue
    lines += [f"Labels `{labels}`" + (" (the paper's: patch2-UNet advanced slice MBF > 5 % off "
                                      "the GT-mask MBF)" if labels == "mbf_patch2" else
                                      " (the phantom's record of a motion-correction failure)")
              + ":", "",
              "| network | augmentation | OOD slices | AUC | t | sensitivity | specificity | "
              "Dice reliable | Dice unreliable | TTA baseline AUC |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in rows:
      cells = [_ms(n[f"ood.{labels}.{key}"], 1 if key == "n_ood" else 3) for key in
               ("n_ood", "auc", "threshold", "sensitivity", "specificity", "dice_reliable",
                "dice_unreliable", "tta_auc")]
      lines.append(f"| {n['input']}-UNet | {n['augment']} | " + " | ".join(cells) + " |")
    if labels == "mbf_patch2":
      lines.append(f"| paper: patch3-UNet | advanced | | {po['auc']:.3f} | {po['threshold']:.2f} | "
                   f"{po['sensitivity']:.3f} | {po['specificity']:.3f} | "
                   f"{po['dice_reliable']:.2f} | {po['dice_unreliable']:.2f} | |")
    lines.append("")
  lines += ["![Fig. 6](figures/dice_vs_confidence.png)", "",
            "## The paper's claims, judged over seeds", "",
            "d = the per-seed paired difference. *agrees*: mean(d) has the claimed sign and "
            "exceeds sd(d); *contradicted*: the opposite sign, beyond sd(d); otherwise the "
            "difference is within the seed spread and is not a finding.", "",
            "| claim | mean d | sd d | seeds | verdict |", "|---|---|---|---|---|"]
  for c in summary["claims"]:
    sd = f"{c['sd']:.4f}" if is_number(c["sd"]) else "n/a"
    mean = f"{c['mean']:+.4f}" if is_number(c["mean"]) else "n/a"
    lines.append(f"| {c['claim']} | {mean} | {sd} | {c['n']} | {c['verdict']} |")
  return "\n".join(lines) + "\n"


def table1_figure(path: str, summary: dict) -> None:
  """Grouped bars of Table 1 (mean ± sd over seeds) with the paper's values as markers."""
  nets = list(summary["networks"].values())
  fig = Figure(figsize=(7.5, 3.6))
  ax = fig.subplots()
  width = 0.8 / max(len(nets), 1)
  x = np.arange(len(DICE_COLUMNS))
  for j, n in enumerate(nets):
    pos = x - 0.4 + width * (j + 0.5)
    mean = [n[f"dice.{c}"]["mean"] for c in DICE_COLUMNS]
    sd = [np.nan_to_num(n[f"dice.{c}"]["sd"]) for c in DICE_COLUMNS]
    ax.bar(pos, mean, width, yerr=sd, capsize=3, label=f"{n['input']} {n['augment']}")
    ax.plot(pos, [n["paper"][c] for c in DICE_COLUMNS], "k_", markersize=14,
            label="paper" if j == 0 else None)
  ax.set_xticks(x, ["whole slice", "6 sectors", "12 sectors"])
  ax.set_ylabel("myocardium Dice")
  lows = [n[f"dice.{c}"]["mean"] - np.nan_to_num(n[f"dice.{c}"]["sd"]) for n in nets
          for c in DICE_COLUMNS]
  low = min([0.4] + [v for v in lows if np.isfinite(v)])  # every bar and its spread shown
  ax.set_ylim(max(0.0, np.floor(low * 10) / 10), 1.1)
  ax.legend(fontsize=7, ncol=len(nets) + 1, loc="upper center")
  ax.set_title(f"Table 1 on the synthetic benchmark: mean ± sd over {len(summary['seeds'])} "
               "seeds (bars) and the paper (black)", fontsize=8)
  reporting.save_figure(fig, path)


def _slice_values(run: dict, key: str) -> np.ndarray:
  """Per-slice values of results.json (null -> NaN; -inf scores are stored as null)."""
  return np.array([np.nan if s[key] is None else s[key] for s in run["slices"]], np.float64)


def mbf_figure(path: str, runs: dict, seed: int) -> None:
  """Bland-Altman of automatic vs ground-truth-mask slice MBF, patch3 and patch2 (advanced)."""
  fig = Figure(figsize=(9.5, 3.6))
  axes = fig.subplots(1, 2)
  for ax, inp in zip(axes, ("patch3", "patch2")):
    run = runs.get((inp, "advanced", seed))
    if run is None:
      ax.set_axis_off()
      continue
    auto, gt = _slice_values(run, "mbf_auto"), _slice_values(run, "mbf_gt_mask")
    if np.sum(np.isfinite(auto) & np.isfinite(gt)) >= 2:
      figures.bland_altman_plot(auto, gt, ax=ax, label_a=f"{inp}", label_b="GT mask")
    ax.set_title(f"{inp}-UNet advanced, seed {seed}: " + ax.get_title(), fontsize=8)
  reporting.save_figure(fig, path)


def write_report(workdir: str, summary: dict, runs: dict) -> None:
  writers.write_json(os.path.join(workdir, "reproduce.json"), summary)
  fig_dir = os.path.join(workdir, "figures")
  table1_figure(os.path.join(fig_dir, "table1.png"), summary)
  seed = summary["seeds"][0]
  mbf_figure(os.path.join(fig_dir, "mbf_bland_altman.png"), runs, seed)
  run = runs.get(("patch3", "advanced", seed))
  if run is not None:
    labels = "mbf_patch2" if "mbf_patch2" in run.get("ood_all", {}) else run["ood"]["labels"]
    ood = np.array([bool(s.get("ood_labels", {}).get(labels, False)) for s in run["slices"]])
    threshold = run.get("ood_all", {}).get(labels, {}).get("threshold")
    panels.dice_vs_confidence(os.path.join(fig_dir, "dice_vs_confidence.png"),
                              _slice_values(run, "dice"), _slice_values(run, "one_minus_U"),
                              ood, threshold, labels)
  reporting.write_markdown(os.path.join(workdir, "reproduce.md"), report_markdown(summary))
  print(f"wrote {os.path.join(workdir, 'reproduce.md')}")
