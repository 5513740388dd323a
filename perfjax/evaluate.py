"""Evaluation and prediction with a trained patch UNet (paper II-D, II-E, III).

`evaluate` runs the whole analysis on a labelled split (by default the dataset's test split):
stride-32 segmentation, the stride-2 uncertainty map UM, whole/6/12-sector Dice, U and the
uncertain sector, MBF from the automatic and the ground-truth masks (one batched Fermi solve),
the OOD classifier, and writes ``results.json`` (keys in CONVENTIONS.md) plus figures.

`predict` segments unlabelled data (a NIfTI file or folder, or a dataset split) and writes per
slice the segmentation, probabilities and UM as NIfTI, a table of U / 1-U / OOD flag / uncertain
sector, and one PNG per slice. A slice that fails is reported and the others are still written.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any

import jax
from matplotlib.figure import Figure
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from perfjax import figures
from perfjax import inference
from perfjax import metrics
from perfjax import perfusion
from perfjax import reporting
from perfjax import sectors
from perfjax import stats
from perfjax import train
from perfjax import uncertainty
from perfjax.data import io as data_io
from perfjax.data import preprocess
from perfjax.errors import InputError
from perfjax.inputs import model_inputs
from perfjax.model import make_apply_fn

CONFIG_FILE = "config.json"  # Written by perfjax.train.train beside the checkpoints.
SLICES_PER_STEP = 4  # Slices per sliding-window call between progress-bar updates.
MBF_OOD_TOLERANCE = 0.05  # The paper's OOD label: > 5 % slice-MBF discrepancy (III-D).


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise InputError(workdir, f"no {CONFIG_FILE}: not a perfjax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


TRAINED_FIELDS = ("seed", "input", "model", "augment", "train")  # What produced a checkpoint.


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def trained_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the fields that produced the checkpoint taken from the workdir's config.json.

  So a released run (its config.json and best/ checkpoint) is evaluated or used for prediction
  with any config of the same family: the data and eval settings stay the caller's, the model
  is the one that was trained. Differences are printed.
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return config
  saved = load_workdir_config(workdir)
  merged = ml_collections.ConfigDict(config.to_dict())
  for name in TRAINED_FIELDS:
    if name in saved and _plain(saved[name]) != _plain(config[name]):
      print(f"{workdir}: using the trained model's {name} from {CONFIG_FILE}: {saved[name]} "
            f"(the config says {config[name]})")
      merged[name] = saved[name]
  return merged


def predict_arrays(model, variables, images_nhwt: np.ndarray, peak_lv_frame, config,
                   with_um: bool = True, desc: str = "predict") -> dict[str, np.ndarray]:
  """Segmentation (stride eval.stride_seg) and UM (stride eval.stride_um) of N slices.

  Returns probs [N,H,W,4] (mean softmax), segmentation [N,H,W] int32 and, with `with_um`,
  um [N,H,W] (std of the myocardium probability across the stride-2 windows).
  """
  inputs = model_inputs(images_nhwt, peak_lv_frame, config.input)
  apply_fn = make_apply_fn(model, variables, fast=True)
  parts: dict[str, list] = {"probs": [], "segmentation": [], "um": []}
  progress = tqdm(total=len(inputs), desc=desc, unit="slice")
  for lo in range(0, len(inputs), SLICES_PER_STEP):
    batch = inputs[lo:lo + SLICES_PER_STEP]
    seg = inference.sliding_window(apply_fn, batch, stride=config.eval.stride_seg,
                                   chunk_size=config.eval.chunk_size)
    parts["probs"].append(seg["mean"])
    parts["segmentation"].append(seg["segmentation"])
    if with_um:
      dense = inference.sliding_window(apply_fn, batch, stride=config.eval.stride_um,
                                       chunk_size=config.eval.chunk_size)
      parts["um"].append(dense["std"][..., sectors.MYO])
    progress.update(len(batch))
  progress.close()
  return {k: np.concatenate(v) for k, v in parts.items() if v}


def mbf_input_kind(config, split: dict) -> str:
  """eval.mbf_input: "concentration" (the paper's remedy for blood-signal saturation; needs the
  sequence timing, which the phantom records) or "signal" (raw signal, as the paper did).
  "auto" picks concentration when every slice carries its sequence parameters."""
  kind = config.eval.mbf_input
  if kind not in ("auto", "concentration", "signal"):
    raise InputError("eval.mbf_input", f"expected auto/concentration/signal, got {kind!r}")
  if kind != "auto":
    return kind
  known = all(k in split and np.isfinite(np.asarray(split[k], np.float64)).all()
              for k in ("seq_ts", "seq_tr", "seq_flip_deg", "seq_n_pulses", "t1_blood_s"))
  return "concentration" if known else "signal"


def mbf_of_masks(split: dict, mask_sets: list[np.ndarray], kind: str = "signal",
                 ) -> list[dict[str, np.ndarray]]:
  """Slice MBF of the split's slices for each set of masks, all in ONE batched Fermi solve.

  Each mask is divided into 48 sectors by its own RV insertion points (for predicted masks,
  the fully automatic pipeline); the slices of a study share the AIF of the slice with the
  largest blood pool. Returns per mask set dict(slice [N], sector48 [N, 48], error [N]).
  """
  n, m = len(split["raw"]), len(mask_sets)
  sequences = None
  if kind == "concentration":
    sequences = [perfusion.sequence_from_record(split, i) for i in range(n)] * m
  study = np.asarray(split.get("study_id", np.arange(n)), np.int64)
  offset = study.max() + 1  # Mask sets never share an AIF.
  res = perfusion.mbf_from_slices(np.concatenate([split["raw"]] * m),
                                  np.concatenate(mask_sets),
                                  np.concatenate([split["times"]] * m), sequences=sequences,
                                  study_ids=np.concatenate([study + j * offset for j in range(m)]))
  return [dict(slice=res["slice_mbf"][j * n:(j + 1) * n], sector48=res["mbf48"][j * n:(j + 1) * n],
               error=res["error"][j * n:(j + 1) * n]) for j in range(m)]


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


def ood_label_sets(config, split: dict, mbf: dict) -> dict[str, np.ndarray]:
  """Every OOD label set of CONVENTIONS.md this split supports: name -> [N] bool.

  ``motion``: the phantom's record that motion correction failed. ``mbf_patch2`` (the paper's)
  needs a trained patch2-UNet (eval.patch2_workdir): its slice MBF differing from the
  ground-truth-mask MBF by more than 5 % marks a slice OOD.
  """
  sets = {}
  if "motion" in split and np.asarray(split.get("has_truth", True)).all():
    sets["motion"] = np.asarray(split["motion"], bool)
  if config.eval.get("patch2_workdir"):
    p2_dir = config.eval.patch2_workdir
    p2_config = load_workdir_config(p2_dir)
    p2_model, p2_vars = train.load_params(p2_config, p2_dir, "best")
    p2 = predict_arrays(p2_model, p2_vars, split["image"], split["peak_lv_frame"], p2_config,
                        with_um=False, desc="patch2 masks")
    p2_mbf = mbf_of_masks(split, [p2["segmentation"]], mbf_input_kind(config, split))[0]["slice"]
    with np.errstate(invalid="ignore", divide="ignore"):
      rel = np.abs(p2_mbf - mbf["mbf_gt"]) / np.abs(mbf["mbf_gt"])
    sets["mbf_patch2"] = np.where(np.isfinite(rel), rel > MBF_OOD_TOLERANCE, True)
  return sets


def primary_labels(config, label_sets: dict) -> tuple[np.ndarray | None, str]:
  """The label set named by eval.ood_labels and the name actually used.

  Without a patch2 workdir, ``mbf_patch2`` falls back to ``motion`` and says so in ood.labels.
  """
  kind = config.eval.ood_labels
  if kind not in ("motion", "mbf_patch2"):
    raise InputError("eval.ood_labels", f"expected 'motion' or 'mbf_patch2', got {kind!r}")
  for name in (kind, "motion"):
    if name in label_sets:
      return label_sets[name], name
  return None, "none"


ROC_KEYS = ("auc", "threshold", "sensitivity", "specificity", "n_ood", "dice_reliable",
            "dice_unreliable")


def ood_summary(one_minus_u: np.ndarray, labels: np.ndarray, dice_whole: np.ndarray,
                baselines: dict[str, np.ndarray]) -> dict:
  """ROC figures of 1 - U, and of each baseline's 1 - U, against one label set."""
  out = {k: v for k, v in uncertainty.ood_analysis(one_minus_u, labels, dice_whole).items()
         if k in ROC_KEYS}
  out["baselines"] = {
      name: {k: v for k, v in uncertainty.ood_analysis(score, labels, dice_whole).items()
             if k in ROC_KEYS} for name, score in baselines.items()}
  return out


def evaluate(config: ml_collections.ConfigDict, workdir: str, split_name: str = "test",
             split: dict | None = None, n_panels: int = 12) -> dict:
  """The paper's test-set analysis of the best checkpoint in `workdir`; writes results.json."""
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  workdir = os.path.abspath(workdir)
  config = trained_config(config, workdir)
  model, variables = train.load_params(config, workdir, "best")
  if split is None:
    split = datasets.load_split(config.data.dataset, split_name, config.data.data_dir)
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
  unc = uncertainty.batch_uncertainty(um, seg, dilation=config.eval.um_dilation)
  mbf_kind = mbf_input_kind(config, split)
  auto, gt_mbf = mbf_of_masks(split, [seg, gt], mbf_kind)
  mbf = dict(mbf_auto=auto["slice"], mbf_gt=gt_mbf["slice"], error_auto=auto["error"],
             sector48=dict(auto=auto["sector48"], gt_mask=gt_mbf["sector48"]))
  if "mbf_sector48" in split:
    mbf["sector48"]["true"] = np.asarray(split["mbf_sector48"], np.float64)
  mbf_true = _true_slice_mbf(split)
  label_sets = ood_label_sets(config, split, mbf)
  labels, label_name = primary_labels(config, label_sets)
  baselines = baseline_scores(model, variables, split, config) if label_sets else {}
  ood_all = {name: ood_summary(unc["one_minus_U"], lab, dice["whole"], baselines)
             for name, lab in label_sets.items()}
  if labels is None:
    ood = dict(auc=float("nan"), threshold=float("nan"), sensitivity=float("nan"),
               specificity=float("nan"), flagged=np.zeros(len(seg), bool), ok=False,
               problem="no OOD labels for this split", dice_reliable=float("nan"),
               dice_unreliable=float("nan"), n_ood=0)
  else:
    ood = uncertainty.ood_analysis(unc["one_minus_U"], labels, dice["whole"])

  n = len(seg)
  motion = split.get("motion")
  slices = []
  for i in range(n):
    slices.append(dict(
        id=f"{int(split['study_id'][i])}-{int(split['slice_level'][i])}"
        if "study_id" in split else str(i),
        dice=dice["whole"][i], dice_sector6=dice["sector6"][i], dice_sector12=dice["sector12"][i],
        U=unc["U"][i], one_minus_U=unc["one_minus_U"][i], ood_flag=bool(ood["flagged"][i]),
        ood_label=None if labels is None else bool(labels[i]),
        ood_labels={name: bool(lab[i]) for name, lab in label_sets.items()},
        uncertain_sector=int(unc["uncertain_sector"][i]) or None,
        mbf_auto=mbf["mbf_auto"][i], mbf_gt_mask=mbf["mbf_gt"][i],
        mbf_true=None if mbf_true is None else mbf_true[i],
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
      ood=dict(auc=ood["auc"], threshold=ood["threshold"], sensitivity=ood["sensitivity"],
               specificity=ood["specificity"], labels=label_name, n_ood=ood["n_ood"],
               dice_reliable=ood["dice_reliable"], dice_unreliable=ood["dice_unreliable"]),
      ood_baselines=ood_all.get(label_name, {}).get("baselines", {}),
      ood_all=ood_all,
      studies=studies,
      mbf=dict(r2=agreement["r2"], bland_altman=agreement["bland_altman"],
               comparison="auto vs ground-truth mask (ml/g/min)", input=mbf_kind),
      slices=slices)
  if mbf_true is not None:
    results["mbf"]["vs_true"] = dict(auto=_agreement(mbf["mbf_auto"], mbf_true),
                                     gt_mask=_agreement(mbf["mbf_gt"], mbf_true))
  _figures(workdir, split, pred, dice, unc, ood, labels, label_name, mbf, mbf_true, studies,
           n_panels, config)
  reporting.write_markdown(os.path.join(workdir, "report.md"),
                           reporting.report_markdown(results, workdir))
  # Last: results.json marks a finished evaluation (perfjax.reproduce skips such runs).
  reporting.write_json(os.path.join(workdir, "results.json"), results)
  print(summary_text(results))
  return results


def baseline_scores(model, variables, split: dict, config) -> dict[str, np.ndarray]:
  """1 - U of the field's usual uncertainties, to be scored by the same ROC as the paper's.

  ``tta``: per-pixel std of the myocardium probability over test-time augmentations (flips,
  shifts, noise) of stride-32 inference. ``mc_dropout``: over dropout samples (only for a model
  trained with dropout). Named in eval.baselines; U is computed from each map as for UM.
  """
  inputs = model_inputs(split["image"], split["peak_lv_frame"], config.input)
  key = jax.random.key(config.seed)
  out = {}
  for name in config.eval.baselines:
    if name == "tta":
      res = uncertainty.tta_uncertainty(make_apply_fn(model, variables), inputs, key,
                                        n_samples=config.eval.baseline_samples)
    elif name == "mc_dropout":
      if not config.model.dropout_rate:
        continue  # A model trained without dropout has no dropout to sample.
      res = uncertainty.mc_dropout_uncertainty(model, variables, inputs, key,
                                               n_samples=config.eval.baseline_samples)
    else:
      raise InputError("eval.baselines", f"unknown baseline {name!r}; use 'tta', 'mc_dropout'")
    unc = uncertainty.batch_uncertainty(res["um"], res["segmentation"],
                                        dilation=config.eval.um_dilation)
    out[name] = unc["one_minus_U"]
  return out


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


def _bullseye_figure(path: str, study: dict) -> None:
  names = list(study["aha16"])
  values = np.stack([study["aha16"][n] for n in names])
  finite = values[np.isfinite(values)]
  if not finite.size:
    return
  fig = Figure(figsize=(4.2 * len(names), 3.6))
  for ax, name, v in zip(fig.subplots(1, len(names), squeeze=False)[0], names, values):
    figures.bullseye(v, ax=ax, vmin=float(finite.min()), vmax=float(finite.max()))
    ax.set_title(f"study {study['study_id']}: MBF from {name.replace('_', ' ')}", fontsize=9)
  reporting.save_figure(fig, path)


def summary_text(results: dict) -> str:
  d, o, m = results["dice"], results["ood"], results["mbf"]
  ba = m["bland_altman"]
  return (f"{results['n_slices']} slices | Dice whole {d['whole']:.3f}, 6-sector "
          f"{d['sector6']:.3f}, 12-sector {d['sector12']:.3f} | OOD ({o['labels']}) AUC "
          f"{o['auc']:.3f} at 1-U < {o['threshold']:.3f}: sensitivity {o['sensitivity']:.3f}, "
          f"specificity {o['specificity']:.3f} | MBF auto vs GT mask R2 {m['r2']:.3f}, "
          f"Bland-Altman {ba['mean']:+.3f} [{ba['loa_low']:+.3f}, {ba['loa_high']:+.3f}] ml/g/min")


def _figures(workdir, split, pred, dice, unc, ood, labels, label_name, mbf, mbf_true, studies,
             n_panels, config):
  fig_dir = os.path.join(workdir, "figures")
  h, w = pred["segmentation"].shape[1:]
  reporting.coverage_figure(os.path.join(fig_dir, "coverage.png"),
                            inference.coverage_count(h, w, 64, config.eval.stride_um),
                            config.eval.stride_um)
  reporting.dice_vs_confidence(os.path.join(fig_dir, "dice_vs_confidence.png"), dice["whole"],
                               unc["one_minus_U"], labels, ood["threshold"], label_name)
  if ood.get("ok"):
    best = int(np.argmax(ood["tpr"] - ood["fpr"]))
    reporting.roc_figure(os.path.join(fig_dir, "roc.png"), ood["fpr"], ood["tpr"], ood["auc"],
                         (ood["fpr"][best], ood["tpr"][best]))
  pairs = [("auto", mbf["mbf_auto"], "GT mask", mbf["mbf_gt"])]
  if mbf_true is not None:
    pairs += [("auto", mbf["mbf_auto"], "true", mbf_true), ("GT mask", mbf["mbf_gt"], "true",
                                                            mbf_true)]
  for name_a, a, name_b, b in pairs:
    tag = f"{name_a}_vs_{name_b}".replace(" ", "_").lower()
    if np.sum(np.isfinite(a) & np.isfinite(b)) < 2:
      continue
    reporting.save_figure(figures.scatter_plot(b, a, label_x=f"MBF {name_b}",
                                               label_y=f"MBF {name_a}"),
                          os.path.join(fig_dir, f"mbf_scatter_{tag}.png"))
    reporting.save_figure(figures.bland_altman_plot(a, b, label_a=name_a, label_b=name_b),
                          os.path.join(fig_dir, f"mbf_bland_altman_{tag}.png"))
  for study in studies[:n_panels]:
    _bullseye_figure(os.path.join(fig_dir, "bullseye", f"study_{study['study_id']}.png"), study)
  order = np.argsort(unc["one_minus_U"])  # The most uncertain slices first.
  for i in order[:n_panels]:
    _panel(os.path.join(fig_dir, "slices", f"slice_{i:03d}.png"), split["image"][i],
           pred["segmentation"][i], pred["um"][i], split["mask"][i],
           f"slice {i}: Dice {dice['whole'][i]:.3f}, 1-U {unc['one_minus_U'][i]:.3f}",
           int(unc["uncertain_sector"][i]))


def _panel(path, image, seg, um, gt_mask, title, uncertain_sector):
  try:
    smap = sectors.sector_map(seg, 6, 1)
  except InputError:
    smap = None
  reporting.slice_panel(path, image, seg, um, gt_mask, smap, title, uncertain_sector or None)


# ------------------------------------------------------------------------------------------
# Prediction on new data.


def _ood_threshold(workdir: str) -> float | None:
  """The threshold t chosen on labelled data by `evaluate` (results.json), if any."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    t = json.load(f).get("ood", {}).get("threshold")
  return float(t) if t is not None else None


def _is_mask_file(path: pathlib.Path) -> bool:
  stem = path.name.split(".")[0].lower()
  return stem.endswith(("_mask", "_seg", "_label", "_labels"))


def _mask_for(path: pathlib.Path) -> pathlib.Path | None:
  stem = path.name.split(".")[0]
  for suffix in (".nii.gz", ".nii"):
    candidate = path.with_name(f"{stem}_mask{suffix}")
    if candidate.is_file():
      return candidate
  return None


def read_inputs(input_path: str) -> tuple[list[dict], list[dict]]:
  """Preprocessed slices from a NIfTI file, a folder of them, or DICOM series folders.

  A folder's NIfTI files (``X.nii.gz``, with an optional mask ``X_mask.nii.gz`` beside it)
  and sub-folders (one DICOM series each) are read in name order. Returns (slices, failures):
  each slice a dict(id, image, raw, times, mask, peak_lv_frame), each failure dict(id, error).
  """
  root = pathlib.Path(input_path)
  if not root.exists():
    raise InputError(root, "no such file or folder")
  if root.is_file():
    paths = [root]
  else:
    paths = sorted(p for p in root.iterdir()
                   if (data_io.is_nifti(p) and not _is_mask_file(p)) or p.is_dir())
    if not paths:
      raise InputError(root, "holds no NIfTI file (.nii/.nii.gz) and no DICOM series folder")
  slices, failures = [], []
  for path in paths:
    slice_id = path.name.split(".")[0]
    try:
      rec = data_io.read_slice(path, _mask_for(path) if path.is_file() else None)
      pre = preprocess.preprocess_slice(rec["image"], rec["times"], rec.get("mask"),
                                        rec.get("pixel_mm"), source=str(path))
    except InputError as err:
      failures.append(dict(id=slice_id, error=str(err)))
      continue
    slices.append(dict(id=slice_id, **{k: pre[k] for k in ("image", "raw", "times", "mask",
                                                            "peak_lv_frame")}))
  return slices, failures


def _split_slices(config, split_name: str) -> list[dict]:
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  split = datasets.load_split(config.data.dataset, split_name, config.data.data_dir)
  has_mask = split.get("has_mask", np.ones(len(split["image"]), bool))
  return [dict(id=f"{split_name}_{i:03d}", image=split["image"][i], raw=split["raw"][i],
               times=split["times"][i], mask=split["mask"][i] if has_mask[i] else None,
               peak_lv_frame=int(split["peak_lv_frame"][i])) for i in range(len(split["image"]))]


def predict(config: ml_collections.ConfigDict, workdir: str, input: str | None,  # pylint: disable=redefined-builtin
            output: str | None) -> list[dict]:
  """Segments new data with the best checkpoint of `workdir`; see the module docstring.

  `input`: a NIfTI file, a folder (NIfTI files and/or DICOM series folders), or
  ``split:NAME`` for a split of the config's dataset (default ``split:test``). Outputs go to
  `output` (default WORKDIR/predictions): per slice ``ID/segmentation.nii.gz``,
  ``ID/probabilities.nii.gz`` ([H, W, 4]), ``ID/um.nii.gz`` and ``ID/ID.png``, and for all
  slices ``slices.csv`` and ``slices.json`` (U, 1-U, OOD flag, uncertain sector, slice MBF
  from the signal (48 sectors in the JSON), Dice when a mask is given, or the error of a
  slice that failed). All arrays are in the preprocessed
  (LV-centred 128 x 128) frame.
  """
  workdir = os.path.abspath(workdir)
  output = os.path.abspath(output or os.path.join(workdir, "predictions"))
  config = trained_config(config, workdir)
  model, variables = train.load_params(config, workdir, "best")
  input = input or "split:test"
  if input.startswith("split:"):
    slices, failures = _split_slices(config, input.partition(":")[2]), []
  else:
    slices, failures = read_inputs(input)
  threshold = _ood_threshold(workdir)
  rows = [dict(id=f["id"], U=None, one_minus_U=None, ood_flag=None, uncertain_sector=None,
               dice=None, mbf=None, mbf_sector48=None, error=f["error"]) for f in failures]
  if slices:
    pred = predict_arrays(model, variables, np.stack([s["image"] for s in slices]),
                          np.array([s["peak_lv_frame"] for s in slices], np.int32), config)
    unc = uncertainty.batch_uncertainty(pred["um"], pred["segmentation"],
                                        dilation=config.eval.um_dilation)
    # The sequence of new data is unknown: MBF from the signal, as the paper did.
    mbf = perfusion.mbf_from_slices(np.stack([s["raw"] for s in slices]), pred["segmentation"],
                                    np.stack([s["times"] for s in slices]))
    for i, s in enumerate(tqdm(slices, desc="writing", unit="slices")):
      folder = os.path.join(output, s["id"])
      seg, um = pred["segmentation"][i], pred["um"][i]
      data_io.write_nifti(os.path.join(folder, "segmentation.nii.gz"), seg.astype(np.int32))
      data_io.write_nifti(os.path.join(folder, "probabilities.nii.gz"), pred["probs"][i])
      data_io.write_nifti(os.path.join(folder, "um.nii.gz"), um)
      one_minus_u = float(unc["one_minus_U"][i])
      dice = None if s["mask"] is None else metrics.dice(seg, s["mask"])
      sector = int(unc["uncertain_sector"][i]) or None
      _panel(os.path.join(folder, f"{s['id']}.png"), s["image"], seg, um, s["mask"],
             f"{s['id']}: 1-U {one_minus_u:.3f}" + (f", Dice {dice:.3f}" if dice is not None else ""),
             sector)
      rows.append(dict(id=s["id"], U=float(unc["U"][i]), one_minus_U=one_minus_u,
                       ood_flag=None if threshold is None else bool(one_minus_u < threshold),
                       uncertain_sector=sector, dice=dice, mbf=mbf["slice_mbf"][i],
                       mbf_sector48=mbf["mbf48"][i],
                       error=unc["problems"][i] or mbf["error"][i] or None))
  rows.sort(key=lambda r: r["id"])
  reporting.write_json(os.path.join(output, "slices.json"),
                       dict(ood_threshold=threshold, slices=rows))
  _write_csv(os.path.join(output, "slices.csv"), rows)
  n_bad = sum(r["error"] is not None and r["U"] is None for r in rows)
  print(f"predicted {len(slices)} slices into {output}" +
        (f"; {n_bad} failed (see slices.csv)" if n_bad else "") +
        ("" if threshold is not None else "; no OOD threshold yet (run --mode=evaluate on "
         "labelled data first), ood_flag left empty"))
  return rows


def _write_csv(path: str, rows: list[dict]) -> None:
  fields = ["id", "U", "one_minus_U", "ood_flag", "uncertain_sector", "dice", "mbf", "error"]
  with data_io.atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r[k] is None or (isinstance(r[k], float) and not np.isfinite(r[k]))
                           else r[k]) for k in fields})
