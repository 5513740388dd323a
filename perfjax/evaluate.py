"""The paper's test-set analysis of a trained patch UNet (paper II-D, II-E, III).

`evaluate` runs the whole analysis on a labelled split (by default the dataset's test split):
stride-32 segmentation and the stride-2 uncertainty map UM (`perfjax.predict.predict_arrays`),
whole/6/12-sector Dice, U and the uncertain sector, MBF from the automatic and the ground-truth
masks (one batched Fermi solve, `perfjax.perfusion.mbf_of_masks`), the OOD classifier
(`perfjax.ood`), and writes ``results.json`` (keys in CONVENTIONS.md), report.md/.html and
figures. Segmenting new data is `perfjax.predict.predict` (``--mode=predict``).
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from perfjax import checkpoints
from perfjax import figures
from perfjax import frame_gain
from perfjax import metrics
from perfjax import ood
from perfjax import panels
from perfjax import perfusion
from perfjax import provenance
from perfjax import reporting
from perfjax import stats
from perfjax import uncertainty
from perfjax import windows
from perfjax.data import writers
from perfjax.conventions import PATCH
from perfjax.errors import InputError
from perfjax.predict import ABSOLUTE_UNITS, RELATIVE_UNITS, predict_arrays


def _true_slice_mbf(split: dict) -> np.ndarray | None:
  if "mbf_sector48" not in split:
    return None
  truth = np.asarray(split["mbf_sector48"], np.float64)
  return None if not np.isfinite(truth).any() else perfusion.slice_mbf(truth)


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
  ok = np.isfinite(a) & np.isfinite(b)
  if ok.sum() < 3:
    nan = float("nan")
    return dict(r2=nan, bland_altman=dict(mean=nan, loa_low=nan, loa_high=nan, n=int(ok.sum())))
  return dict(r2=stats.r2(a[ok], b[ok]), bland_altman=stats.bland_altman(a[ok], b[ok]))


def evaluate(config: ml_collections.ConfigDict, workdir: str, split_name: str = "test",
             split: dict | None = None, n_panels: int = 12) -> dict:
  """The paper's test-set analysis of the best checkpoint in `workdir`; writes results.json."""
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  workdir = os.path.abspath(workdir)
  requested_config = config  # Its fingerprint marks results.json as current (perfjax.cli).
  config = checkpoints.trained_config(config, workdir)
  model, variables = checkpoints.load_params(config, workdir, "best")
  ood.check_ensemble(config)
  if split is None:
    split = datasets.load_split(config.data.dataset, split_name, config.data.data_dir,
                                manual_dir=config.data.get("manual_dir"))
  if not np.asarray(split.get("has_mask", True)).all():
    raise InputError(f"{config.data.dataset}/{split_name}", "evaluation needs a ground-truth mask "
                     "for every slice; segment unlabelled data with --mode=predict")
  pred = predict_arrays(model, variables, split["image"], split["peak_lv_frame"], config,
                        desc=f"{split_name}: segmentation + UM")
  seg, um = pred["segmentation"], pred["um"]
  gt = np.asarray(split["mask"])
  dice = metrics.dice_table(seg, gt, geometry=config.eval.sectors_from)
  # Both sector geometries: ground-truth RVIPs (every network scored on the same sectors) and
  # the network's own RVIPs (the paper's Table 1).
  dice_by_geometry = {g: {k: v for k, v in (
      dice if g == config.eval.sectors_from else metrics.dice_table(seg, gt, geometry=g)
  )["mean"].items() if k != "whole"} for g in ("gt", "pred")}
  unc = uncertainty.configured_uncertainty(um, seg, config.eval)
  mbf_kind = perfusion.mbf_input_kind(config, split)
  with reporting.step(f"{split_name}: MBF of {len(seg)} slices, automatic and ground-truth "
                      f"masks ({mbf_kind})"):
    auto, gt_mbf = perfusion.mbf_of_masks(split, [seg, gt], mbf_kind)
  mbf_slices, mbf_summary = mbf_details(dict(auto=auto, gt_mask=gt_mbf))
  mbf = dict(mbf_auto=auto["slice"], mbf_gt=gt_mbf["slice"], error_auto=auto["error"],
             sector48=dict(auto=auto["sector48"], gt_mask=gt_mbf["sector48"]),
             units=mbf_summary["units"])
  # Relative flow (no sequence) is never set beside the true MBF in ml/g/min.
  absolute = mbf_summary["units"] == ABSOLUTE_UNITS
  if "mbf_sector48" in split and absolute:
    mbf["sector48"]["true"] = np.asarray(split["mbf_sector48"], np.float64)
  mbf_true = _true_slice_mbf(split)
  label_sets = ood.label_sets(config, split, mbf)
  labels, label_name = ood.primary_labels(config, label_sets)
  baselines = ood.other_scores(model, variables, split, pred, config) if label_sets else {}
  ood_all = {name: ood.ood_summary(unc["one_minus_U"], lab, dice["whole"], baselines)
             for name, lab in label_sets.items()}
  scores = {ood.PAPER_SCORE: unc["one_minus_U"], **baselines}
  ood_res = ood.primary_result(scores, labels, dice["whole"], ood.primary_score(config))

  n = len(seg)
  motion = split.get("motion")
  slices = []
  for i in range(n):
    slices.append(dict(
        id=f"{int(split['study_id'][i])}-{int(split['slice_level'][i])}"
        if "study_id" in split else str(i),
        dice=dice["whole"][i], dice_sector6=dice["sector6"][i], dice_sector12=dice["sector12"][i],
        U=unc["U"][i], one_minus_U=unc["one_minus_U"][i], ood_flag=bool(ood_res["flagged"][i]),
        ood_label=None if labels is None else bool(labels[i]),
        ood_scores={name: float(score[i]) for name, score in scores.items()},
        ood_labels={name: bool(lab[i]) for name, lab in label_sets.items()},
        uncertain_sector=int(unc["uncertain_sector"][i]) or None,
        u_sectors_from=unc["sectors_from"][i],
        mbf_auto=mbf["mbf_auto"][i], mbf_gt_mask=mbf["mbf_gt"][i],
        mbf_true=None if mbf_true is None else mbf_true[i], **mbf_slices[i],
        motion=None if motion is None else bool(motion[i]),
        problems=[p for p in (dice["problems"][i], unc["problems"][i],
                              mbf["error_auto"][i] or None) if p] or None))

  studies = study_bullseyes(split, mbf["sector48"])
  agreement = _agreement(mbf["mbf_auto"], mbf["mbf_gt"])
  results = dict(
      config=dict(input=config.input, augment=config.augment.mode, dataset=config.data.dataset,
                  split=split_name, features=config.model.features),
      n_slices=n,
      dice=dict(whole=dice["mean"]["whole"], sector6=dice["mean"]["sector6"],
                sector12=dice["mean"]["sector12"], geometry=config.eval.sectors_from,
                by_geometry=dice_by_geometry),
      ood=dict(auc=ood_res["auc"], threshold=ood_res["threshold"], sensitivity=ood_res["sensitivity"],
               specificity=ood_res["specificity"], labels=label_name, n_ood=ood_res["n_ood"],
               dice_reliable=ood_res["dice_reliable"], dice_unreliable=ood_res["dice_unreliable"],
               score=ood_res["score"], n_positive=ood_res["n_positive"],
               n_negative=ood_res["n_negative"], auc_ci=ood_res["auc_ci"]),
      ood_baselines=ood_all.get(label_name, {}).get("baselines", {}),
      ood_all=ood_all,
      studies=studies,
      mbf=dict(r2=agreement["r2"], bland_altman=agreement["bland_altman"],
               comparison=f"auto vs ground-truth mask ({mbf_summary['units']})", input=mbf_kind,
               **mbf_summary),
      slices=slices)
  if mbf_true is not None and absolute:
    results["mbf"]["vs_true"] = dict(auto=_agreement(mbf["mbf_auto"], mbf_true),
                                     gt_mask=_agreement(mbf["mbf_gt"], mbf_true))
  results["provenance"] = provenance.provenance(requested_config, data=dict(
      dataset=config.data.dataset, split=split_name,
      data_dir=config.data.data_dir or os.environ.get("PERFJAX_DATA_DIR"), slices=n))
  # Each evaluation draws its figures into a fresh folder that then replaces figures/ whole, so
  # the report never shows another run's figures.
  with reporting.step(f"{split_name}: figures and report"):
    fig_dir = reporting.fresh_dir(workdir, "figures")
    shown = _figures(fig_dir, split, pred, dice, unc, ood_res, labels, label_name, mbf, mbf_true,
                     studies, n_panels, config, slices=slices, scores=scores,
                     summaries=ood_all.get(label_name))
    reporting.replace_dir(fig_dir, os.path.join(workdir, "figures"))
  reporting.write_markdown(os.path.join(workdir, "report.md"),
                           reporting.report_markdown(results, workdir, shown))
  # Last: results.json marks a finished evaluation (perfjax.reproduce skips such runs).
  writers.write_json(os.path.join(workdir, "results.json"), results)
  print(summary_text(results))
  return results


_AIF_KINDS = ("series", "study slice", "own")


def frame_gain_summary(r: dict) -> dict:
  """dict(applied, uptake_removed, slices, median_sd_percent) of one mask set's per-frame gain
  correction (`perfusion.mbf_of_masks`' frame_gain, frame_gain_reason,
  frame_gain_uptake_removed): on how many slices a gain was applied, on how many of them with
  the uptake of the tissue it was measured on regressed out, and the median sd (%) of those
  gains."""
  applied = np.array([not str(x) for x in r["frame_gain_reason"]], bool)
  sd = frame_gain.sd_percent(np.asarray(r["frame_gain"], np.float64)[applied])
  removed = np.asarray(r["frame_gain_uptake_removed"], bool)
  return dict(applied=int(applied.sum()), uptake_removed=int(np.sum(removed & applied)),
              slices=int(applied.size),
              median_sd_percent=float(np.median(sd)) if sd.size else float("nan"))


def spill_summary(r: dict) -> dict:
  """dict(sectors_with_term, sectors_fitted) of one mask set's spill-over term
  (`perfusion.mbf_of_masks`' spill48: > 0 where a sector's fit kept it, 0 where not, NaN where
  the sector has no value)."""
  v = np.asarray(r["spill48"], np.float64)
  return dict(sectors_with_term=int(np.sum(v > 0)), sectors_fitted=int(np.isfinite(v).sum()))


def mbf_details(sets: dict[str, dict]) -> tuple[list[dict], dict]:
  """The AIF's source and the flip-angle sensitivity of each mask set's MBF
  (`perfusion.mbf_of_masks` results by name: auto, gt_mask).

  Per slice: ``aif_source`` {set: the reason `perfusion.mbf_from_slices` recorded} and
  ``mbf_flip`` {set: [MBF at flip x (1 - s), at x (1 + s)]}, s = perfusion.FLIP_SENSITIVITY
  (null without the sequence). Summary: ``units`` (ml/g/min when concentration was fitted,
  else `predict.RELATIVE_UNITS`), ``aif_sources`` {set: {series/study slice/own/none: count}}
  and ``flip_sensitivity`` {set: dict(flip_scale, median_change, max_abs_change)}: the
  median (over slices) relative change of slice MBF at each flip scale and the largest
  absolute one, in %; ``frame_gain`` {set: :func:`frame_gain_summary`} when measured;
  ``spill_over`` {set: :func:`spill_summary`} when fitted.
  """
  first = next(iter(sets.values()))
  n = len(first["slice"])
  absolute = first.get("units", "signal") == "mM"
  s = perfusion.FLIP_SENSITIVITY
  per_slice = [dict(aif_source={name: str(r["aif_source"][i]) or None for name, r in sets.items()},
                    mbf_flip={name: [r["flip_lo"][i], r["flip_hi"][i]] if absolute else None
                              for name, r in sets.items()}) for i in range(n)]
  sources, flip = {}, {}
  for name, r in sets.items():
    kinds = [next((k for k in _AIF_KINDS if str(src).startswith(k)), "none")
             for src in r["aif_source"]]
    sources[name] = {k: kinds.count(k) for k in _AIF_KINDS + ("none",) if kinds.count(k)}
    if absolute:
      base = np.asarray(r["slice"], np.float64)
      with np.errstate(invalid="ignore", divide="ignore"):
        change = [100.0 * (np.asarray(r[key], np.float64) / base - 1.0)
                  for key in ("flip_lo", "flip_hi")]
      ok = [c[np.isfinite(c)] for c in change]
      flip[name] = dict(flip_scale=[1.0 - s, 1.0 + s],
                        median_change=[float(np.median(c)) if c.size else float("nan")
                                       for c in ok],
                        max_abs_change=float(max((np.abs(c).max() for c in ok if c.size),
                                                 default=float("nan"))))
  summary = dict(units=ABSOLUTE_UNITS if absolute else RELATIVE_UNITS, aif_sources=sources)
  gains = {name: frame_gain_summary(r) for name, r in sets.items() if "frame_gain_reason" in r}
  if gains:
    summary["frame_gain"] = gains
  spills = {name: spill_summary(r) for name, r in sets.items() if "spill48" in r}
  if spills:
    summary["spill_over"] = spills
  if absolute:
    summary["flip_sensitivity"] = flip
  return per_slice, summary


def study_bullseyes(split: dict, sector48: dict[str, np.ndarray]) -> list[dict]:
  """Per study, MBF on the AHA 16-segment model from its basal/mid/apical slices' 48 sectors.

  Returns a list of dict(study_id, aha16={source: [16]}) with one entry per source (auto,
  gt_mask, true); a segment without a value is NaN (null in results.json).
  """
  if "study_id" not in split or "slice_level" not in split:
    return []
  study, level = np.asarray(split["study_id"]), np.asarray(split["slice_level"])
  out = []
  for sid in np.unique(study):
    rows = np.nonzero(study == sid)[0]
    out.append(dict(study_id=int(sid), aha16={
        name: perfusion.aha16_mbf({int(level[i]): values[i] for i in rows})
        for name, values in sector48.items()}))
  return out


def summary_text(results: dict) -> str:
  d, o, m = results["dice"], results["ood"], results["mbf"]
  ba = m["bland_altman"]
  num, signed = reporting.number_text, lambda v: reporting.number_text(v, "+.3f")
  return (f"{results['n_slices']} slices | Dice whole {num(d['whole'])}, 6-sector "
          f"{num(d['sector6'])}, 12-sector {num(d['sector12'])} | OOD ({o['labels']}, "
          f"{reporting.counts_text(o)}) AUC {reporting.auc_ci_text(o)} at "
          f"{reporting.score_label(o.get('score'))} < {num(o['threshold'])}: sensitivity "
          f"{num(o['sensitivity'])}, "
          f"specificity {num(o['specificity'])} | MBF auto vs GT mask R2 {num(m['r2'])}, "
          f"Bland-Altman {signed(ba['mean'])} [{signed(ba['loa_low'])}, {signed(ba['loa_high'])}] "
          f"{m.get('units', 'ml/g/min')}")


def _figures(fig_dir, split, pred, dice, unc, ood_res, labels, label_name, mbf, mbf_true, studies,
             n_panels, config, slices=None, scores=None, summaries=None) -> dict[str, list[str]]:
  """Draws the evaluation's figures into `fig_dir`; returns the report's figure lists
  (paths relative to the workdir, as they will be once `fig_dir` is renamed to figures/).

  `ood_res`: `perfjax.ood.primary_result` of the recommended score; `scores`: every score by name
  (1 - U under "U"); `summaries`: `perfjax.ood.ood_summary` of the label set `label_name` (the
  AUC CIs and class sizes of the ROC legend)."""
  shown = dict(mbf=[], bullseye=[], slices=[])

  def rel(name):
    return f"figures/{name}"

  h, w = pred["segmentation"].shape[1:]
  panels.coverage_figure(os.path.join(fig_dir, "coverage.png"),
                         windows.coverage(h, w, int(config.model.get("patch", PATCH)),
                                             config.eval.stride_um),
                         config.eval.stride_um)
  scores = scores or {ood.PAPER_SCORE: unc["one_minus_U"]}
  # Fig. 6 of the recommended score (eval.ood_score): its values and threshold t (without
  # labels only 1 - U was computed, and there is no t).
  name = ood_res.get("score", ood.PAPER_SCORE)
  name = name if name in scores else ood.PAPER_SCORE
  panels.dice_vs_confidence(os.path.join(fig_dir, "dice_vs_confidence.png"), dice["whole"],
                            scores[name], labels, ood_res["threshold"], label_name,
                            score=name)
  if ood_res.get("ok"):
    best = int(np.argmax(ood_res["tpr"] - ood_res["fpr"]))
    summaries = summaries or {}
    by_name = {ood.PAPER_SCORE: summaries, **(summaries.get("baselines") or {})}
    curves = uncertainty.roc_curves(
        scores, labels, {score_name: by_name.get(score_name)
                         or ood.score_summary(score, labels, None, score_name)
                         for score_name, score in scores.items()})
    panels.roc_figure(os.path.join(fig_dir, "roc.png"), curves, recommended=name,
                      operating_point=(ood_res["fpr"][best], ood_res["tpr"][best]),
                      labels=label_name, n_total=len(labels))
  motion = split.get("motion")
  units = mbf.get("units", ABSOLUTE_UNITS)
  pairs = [("auto", mbf["mbf_auto"], "GT mask", mbf["mbf_gt"])]
  if mbf_true is not None and units == ABSOLUTE_UNITS:
    pairs += [("auto", mbf["mbf_auto"], "true", mbf_true), ("GT mask", mbf["mbf_gt"], "true",
                                                            mbf_true)]
  for name_a, a, name_b, b in pairs:
    tag = f"{name_a}_vs_{name_b}".replace(" ", "_").lower()
    if np.sum(np.isfinite(a) & np.isfinite(b)) < 2:
      continue
    reporting.save_figure(figures.scatter_plot(b, a, label_x=f"MBF {name_b}",
                                               label_y=f"MBF {name_a}", units=units,
                                               marked=motion),
                          os.path.join(fig_dir, f"mbf_scatter_{tag}.png"))
    reporting.save_figure(figures.bland_altman_plot(a, b, label_a=name_a, label_b=name_b,
                                                    units=units),
                          os.path.join(fig_dir, f"mbf_bland_altman_{tag}.png"))
    shown["mbf"] += [rel(f"mbf_scatter_{tag}.png"), rel(f"mbf_bland_altman_{tag}.png")]
  with_values = [(f"study {st['study_id']}", st["aha16"]) for st in studies
                 if any(np.isfinite(np.asarray(v, np.float64)).any()
                        for v in st["aha16"].values())]
  if with_values:
    reporting.save_figure(figures.bullseye_grid(with_values, label=f"MBF ({units})"),
                          os.path.join(fig_dir, "bullseyes.png"))
    shown["bullseye"].append(rel("bullseyes.png"))
  ids = [s["id"] for s in slices] if slices else [str(i) for i in range(len(dice["whole"]))]
  motion_flags = None if motion is None else np.asarray(motion, bool)
  um_all = np.asarray(pred["um"], np.float64)
  um_vmax = float(np.nanpercentile(um_all, 99.5)) if np.isfinite(um_all).any() else None
  # The most uncertain slices first: lowest 1 - U, those uncertain by definition (1 - U = -inf:
  # a sector without myocardium) before all.
  score = np.nan_to_num(np.asarray(unc["one_minus_U"], np.float64), nan=np.inf, posinf=np.inf)
  order = np.argsort(score, kind="stable")
  for rank, i in enumerate(order[:n_panels], 1):
    name = f"slices/{rank:02d}_slice_{ids[i]}.png"
    title = panels.panel_title(
        ids[i], dice["whole"][i], unc["one_minus_U"][i], bool(ood_res["flagged"][i]),
        None if motion_flags is None else bool(motion_flags[i]))
    panels.panel(os.path.join(fig_dir, name), split["image"][i], pred["segmentation"][i],
                 pred["um"][i], split["mask"][i], f"{rank}. {title}",
                 int(unc["uncertain_sector"][i]), um_vmax=um_vmax)
    shown["slices"].append(rel(name))
  return shown
