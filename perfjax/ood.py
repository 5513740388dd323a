"""Out-of-distribution detection on a labelled split (paper II-E, III-D).

The label sets a split supports (`label_sets`: the phantom's motion record, or the paper's
`mbf_patch2`, which runs a second, patch2 model), the one named by the config
(`primary_labels`), the field's usual uncertainties as baselines (`baseline_scores`: TTA,
MC dropout) and the ROC figures of 1 - U and of each baseline (`ood_summary`).
"""
from __future__ import annotations

import jax
import numpy as np

from perfjax import checkpoints
from perfjax import perfusion
from perfjax import uncertainty
from perfjax.conventions import MBF_OOD_TOLERANCE, PATCH
from perfjax.errors import InputError
from perfjax.fast_unet import UNetPredictor
from perfjax.inputs import model_inputs
from perfjax.predict import predict_arrays


def label_sets(config, split: dict, mbf: dict) -> dict[str, np.ndarray]:
  """Every OOD label set of CONVENTIONS.md this split supports: name -> [N] bool.

  ``motion``: the phantom's record that motion correction failed. ``mbf_patch2`` (the paper's)
  needs a trained patch2-UNet (eval.patch2_workdir): its slice MBF differing from the
  ground-truth-mask MBF by more than eval.ood_tolerance (the paper's 5 %) marks a slice OOD.
  """
  sets = {}
  if "motion" in split and np.asarray(split.get("has_truth", True)).all():
    sets["motion"] = np.asarray(split["motion"], bool)
  if config.eval.get("patch2_workdir"):
    p2_dir = config.eval.patch2_workdir
    p2_config = checkpoints.load_workdir_config(p2_dir)
    p2_model, p2_vars = checkpoints.load_params(p2_config, p2_dir, "best")
    p2 = predict_arrays(p2_model, p2_vars, split["image"], split["peak_lv_frame"], p2_config,
                        with_um=False, desc="patch2 masks")
    p2_mbf = perfusion.mbf_of_masks(split, [p2["segmentation"]],
                                    perfusion.mbf_input_kind(config, split))[0]["slice"]
    with np.errstate(invalid="ignore", divide="ignore"):
      rel = np.abs(p2_mbf - mbf["mbf_gt"]) / np.abs(mbf["mbf_gt"])
    tolerance = float(config.eval.get("ood_tolerance", MBF_OOD_TOLERANCE))
    sets["mbf_patch2"] = np.where(np.isfinite(rel), rel > tolerance, True)
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


def baseline_scores(model, variables, split: dict, config) -> dict[str, np.ndarray]:
  """1 - U of the field's usual uncertainties, to be scored by the same ROC as the paper's.

  ``tta``: per-pixel std of the myocardium probability over test-time augmentations (flips,
  shifts, noise) of stride-32 inference. ``mc_dropout``: over dropout samples (only for a model
  trained with dropout). Named in eval.baselines; U is computed from each map as for UM.
  """
  inputs = model_inputs(split["image"], split["peak_lv_frame"], config.input)
  key = jax.random.key(config.seed)
  patch = int(config.model.get("patch", PATCH))
  out = {}
  for name in config.eval.baselines:
    if name == "tta":
      res = uncertainty.tta_uncertainty(UNetPredictor(model), variables, inputs, key,
                                        n_samples=config.eval.baseline_samples, patch=patch)
    elif name == "mc_dropout":
      if not config.model.dropout_rate:
        continue  # A model trained without dropout has no dropout to sample.
      res = uncertainty.mc_dropout_uncertainty(model, variables, inputs, key,
                                               n_samples=config.eval.baseline_samples,
                                               patch=patch)
    else:
      raise InputError("eval.baselines", f"unknown baseline {name!r}; use 'tta', 'mc_dropout'")
    unc = uncertainty.batch_uncertainty(res["um"], res["segmentation"],
                                        dilation=config.eval.um_dilation)
    out[name] = unc["one_minus_U"]
  return out
