"""Out-of-distribution detection on a labelled split (paper II-E, III-D).

The label sets a split supports (`label_sets`: the phantom's motion record, or the paper's
`mbf_patch2`, which runs a second, patch2 model), the one named by the config
(`primary_labels`), the scores beside the paper's 1 - U (`other_scores`: the softmax entropy
of the stride-32 segmentation in the dilated myocardium, the field's usual uncertainties, TTA
and MC dropout, and a deep ensemble with other trained workdirs), the score named by
eval.ood_score (`primary_score`) and the ROC figures of every score with n and a stratified
bootstrap 95 % CI of the AUC (`score_summary`, `ood_summary`).

Every score is "higher = more reliable" (like 1 - U): a slice is flagged when score < t.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from tqdm.auto import tqdm

from perfjax import checkpoints
from perfjax import failure_figures
from perfjax import frame_motion
from perfjax import metrics
from perfjax import perfusion
from perfjax import postprocess
from perfjax import reporting
from perfjax import uncertainty
from perfjax.data import failures
from perfjax.data import writers
from perfjax.conventions import MBF_OOD_TOLERANCE, PAPER_OOD_SCORE, PATCH
from perfjax.errors import InputError
from perfjax.fast_unet import UNetPredictor
from perfjax.inputs import model_inputs
from perfjax.predict import predict_arrays


def label_sets(config, split: dict, mbf: dict) -> dict[str, np.ndarray]:
  """Every OOD label set of CONVENTIONS.md this split supports: name -> [N] bool.

  ``motion``: the phantom's record that motion correction failed. ``mbf_patch2`` (the paper's)
  needs a trained patch2-UNet (eval.patch2_workdir): its slice MBF differing from the
  ground-truth-mask MBF by more than eval.ood_tolerance (the paper's 5 %) marks a slice OOD,
  and so does a slice where either MBF could not be computed (NaN), since its MBF cannot be
  shown to agree.
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
PAPER_SCORE = PAPER_OOD_SCORE  # The paper's U, scored as 1 - U (eq. 1-2).
ENTROPY_SCORE = uncertainty.ENTROPY_SCORE
VOTE_SCORE = uncertainty.VOTE_SCORE
FRAME_MOTION_SCORE = frame_motion.FRAME_MOTION_SCORE
ENSEMBLE_SCORES = (uncertainty.ENSEMBLE_ENTROPY_SCORE, uncertainty.ENSEMBLE_MI_SCORE)
CI_LEVEL = 0.95  # Two-sided level of every AUC confidence interval (CONVENTIONS.md).
BOOTSTRAP_SAMPLES = 2000  # Stratified bootstrap resamples per AUC interval.
BOOTSTRAP_SEED = 0  # Fixed: the same scores and labels always give the same interval.


def auc_bootstrap_ci(scores, labels, n_samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL) -> list[float]:
  """[low, high] percentile interval of the AUC under a stratified bootstrap.

  Each resample draws the positives from the positives and the negatives from the negatives
  (with replacement, class sizes kept), so every resample has both classes. The AUC of a
  resample is the Mann-Whitney P(pos < neg) + P(tie) / 2, equal to `uncertainty.auc`'s
  trapezoid. Deterministic given ``seed``; [nan, nan] without both classes.
  """
  scores, labels = uncertainty.validated_scores_labels(scores, labels)
  pos, neg = scores[labels], scores[~labels]
  if pos.size == 0 or neg.size == 0:
    return [float("nan"), float("nan")]
  if not 0.0 < level < 1.0:
    raise InputError("level", f"must be in (0, 1), got {level!r}")
  # win[i, j]: credit of the pair (positive i, negative j); a resample weights each pair by
  # how often both were drawn.
  win = (pos[:, None] < neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
  rng = np.random.default_rng(seed)
  draws_pos = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=n_samples)
  draws_neg = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=n_samples)
  aucs = np.einsum("bi,ij,bj->b", draws_pos, win, draws_neg) / (pos.size * neg.size)
  low, high = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return [float(low), float(high)]


def _name_counts_ci(score: np.ndarray, labels: np.ndarray, name: str) -> dict:
  labels = np.asarray(labels, bool)
  return dict(score=name, n_positive=int(labels.sum()), n_negative=int((~labels).sum()),
              auc_ci=auc_bootstrap_ci(score, labels))


def score_summary(score: np.ndarray, labels: np.ndarray, dice_whole: np.ndarray | None,
                  name: str) -> dict:
  """ROC figures of one score against one label set, its name, the class sizes and AUC CI."""
  res = uncertainty.ood_analysis(score, labels, dice_whole)
  return {**{k: res[k] for k in ROC_KEYS}, **_name_counts_ci(score, labels, name)}


def ood_summary(one_minus_u: np.ndarray, labels: np.ndarray, dice_whole: np.ndarray,
                baselines: dict[str, np.ndarray]) -> dict:
  """`score_summary` of 1 - U against one label set, and under ``baselines`` of every other
  score (named as in `other_scores`)."""
  out = score_summary(one_minus_u, labels, dice_whole, PAPER_SCORE)
  out["baselines"] = {name: score_summary(score, labels, dice_whole, name)
                      for name, score in baselines.items()}
  return out


def primary_score(config) -> str:
  """The score named by eval.ood_score ("U", the paper's, unless set), validated."""
  name = config.eval.get("ood_score", PAPER_SCORE) or PAPER_SCORE
  known = (PAPER_SCORE, ENTROPY_SCORE, FRAME_MOTION_SCORE, *config.eval.get("baselines", ()),
           *((VOTE_SCORE,) if config.eval.get("vote_map") else ()),
           *(ENSEMBLE_SCORES if config.eval.get("ensemble_workdirs") else ()))
  if name not in known:
    raise InputError("eval.ood_score", f"unknown score {name!r}; use one of {list(known)}")
  return name


def primary_result(scores: dict[str, np.ndarray], labels: np.ndarray | None,
                   dice_whole: np.ndarray, name: str) -> dict:
  """`uncertainty.ood_analysis` of the score ``name`` (its flags and threshold are the
  evaluation's ood_flag and ood.threshold) with score, n_positive, n_negative and auc_ci;
  NaN figures and nothing flagged when there are no labels."""
  if labels is None:
    nan = float("nan")
    return dict(auc=nan, threshold=nan, sensitivity=nan, specificity=nan,
                flagged=np.zeros(len(dice_whole), bool), ok=False,
                problem="no OOD labels for this split", dice_reliable=nan,
                dice_unreliable=nan, n_ood=0, score=name, n_positive=0, n_negative=0,
                auc_ci=[nan, nan])
  if name not in scores:
    raise InputError("eval.ood_score", f"score {name!r} was not computed (have {list(scores)}; "
                     "mc_dropout needs a model trained with dropout)")
  return {**uncertainty.ood_analysis(scores[name], labels, dice_whole),
          **_name_counts_ci(scores[name], labels, name)}


def other_scores(model, variables, split: dict, pred: dict, config) -> dict[str, np.ndarray]:
  """Every score beside 1 - U, by name: the entropy score of the segmentation ``pred``
  (`perfjax.predict.predict_arrays`: probs, segmentation), the images' frame-to-frame motion
  (`perfjax.frame_motion`, no network), U of the windows' label disagreement where ``pred``
  has it (eval.vote_map), the baselines of eval.baselines and, with eval.ensemble_workdirs,
  the deep ensemble's two scores (`ensemble_scores`)."""
  names = [ENTROPY_SCORE, FRAME_MOTION_SCORE, *([VOTE_SCORE] if "um_vote" in pred else [])]
  out = {name: slice_scores(name, model, variables, split, pred, config) for name in names}
  out.update(baseline_scores(model, variables, split, config))
  if config.eval.get("ensemble_workdirs"):
    out.update(ensemble_scores(split, pred, config))
  return out


def _entropy_dilation(config) -> int:
  """Pixels the predicted myocardium is dilated by for the entropy scores (single model and
  ensemble alike)."""
  return int(config.eval.get("entropy_dilation", uncertainty.ENTROPY_DILATION))


def check_ensemble(config) -> None:
  """Raises InputError, before any compute, for a member of eval.ensemble_workdirs without a
  best checkpoint."""
  for workdir in config.eval.get("ensemble_workdirs") or ():
    if not os.path.isdir(os.path.join(str(workdir), checkpoints.BEST_DIR)):
      raise InputError("eval.ensemble_workdirs", f"{workdir}: no trained model there (its "
                       f"{checkpoints.BEST_DIR}/ checkpoint is missing)")


def ensemble_scores(split: dict, pred: dict, config) -> dict[str, np.ndarray]:
  """`uncertainty.ensemble_scores` of the evaluated model (its `predict_arrays` output
  ``pred``) and the members of eval.ensemble_workdirs, each with its own input and model."""
  check_ensemble(config)
  probs = [pred["probs"]]
  for workdir in config.eval.ensemble_workdirs:
    member = checkpoints.trained_config(config, str(workdir))
    model, variables = checkpoints.load_params(member, str(workdir), "best")
    probs.append(predict_arrays(model, variables, split["image"], split["peak_lv_frame"],
                                member, with_um=False,
                                desc=f"ensemble: {os.path.basename(str(workdir))}")["probs"])
  stacked = np.stack(probs)
  seg = np.argmax(stacked.mean(axis=0), axis=-1).astype(np.int32)
  if config.eval.get("keep_heart", False):
    seg = postprocess.keep_heart_batch(seg)
  return uncertainty.ensemble_scores(stacked, seg, _entropy_dilation(config))


def baseline_scores(model, variables, split: dict, config, names=None) -> dict[str, np.ndarray]:
  """1 - U of the field's usual uncertainties, to be scored by the same ROC as the paper's.

  ``tta``: per-pixel std of the myocardium probability over test-time augmentations (flips,
  shifts, noise) of stride-32 inference. ``mc_dropout``: over dropout samples (only for a model
  trained with dropout). Named in eval.baselines (or ``names``); U is computed from each map as
  for UM.
  """
  inputs = model_inputs(split["image"], split["peak_lv_frame"], config.input)
  key = jax.random.key(config.seed)
  patch = int(config.model.get("patch", PATCH))
  samples = config.eval.baseline_samples
  out = {}
  for name in (config.eval.baselines if names is None else names):
    if name == "tta":
      def run(chunk):
        return uncertainty.tta_uncertainty(UNetPredictor(model), variables, chunk, key,
                                           n_samples=samples, patch=patch)
    elif name == "mc_dropout":
      if not config.model.dropout_rate:
        continue  # A model trained without dropout has no dropout to sample.
      def run(chunk):
        return uncertainty.mc_dropout_uncertainty(model, variables, chunk, key,
                                                  n_samples=samples, patch=patch)
    else:
      raise InputError("eval.baselines", f"unknown baseline {name!r}; use 'tta', 'mc_dropout'")
    res = _in_chunks(run, inputs, name)
    seg = res["segmentation"]  # cleaned as the paper's U's segmentation is
    if config.eval.get("keep_heart", False):
      seg = postprocess.keep_heart_batch(seg)
    unc = uncertainty.configured_uncertainty(res["um"], seg, config.eval)
    out[name] = unc["one_minus_U"]
  return out


BASELINE_CHUNK = 32  # Slices per baseline call (x the samples): bounded memory, progress.


def _in_chunks(run, inputs, name: str) -> dict[str, np.ndarray]:
  """``run(chunk)`` (a baseline of `perfjax.uncertainty`) over chunks of slices, with a progress
  bar. Neither TTA's nor MC dropout's maps depend on the chunks."""
  parts = []
  with tqdm(total=len(inputs), desc=name, unit="slice") as bar:
    for lo in range(0, len(inputs), BASELINE_CHUNK):
      parts.append(run(inputs[lo:lo + BASELINE_CHUNK]))
      bar.update(len(parts[-1]["um"]))
  return {k: np.concatenate([p[k] for p in parts]) for k in ("um", "segmentation")}


def check_score_available(config, name: str) -> None:
  """Raises InputError when the score ``name`` cannot be computed for this model (MC dropout of
  a model trained without dropout), before any compute."""
  if name == "mc_dropout" and not config.model.get("dropout_rate"):
    raise InputError("eval.ood_score", "'mc_dropout' needs a model trained with dropout "
                     "(model.dropout_rate > 0); choose another score")


def slice_scores(name: str, model, variables, split: dict, pred: dict, config) -> np.ndarray:
  """[N] values of the one score ``name`` (`primary_score`) for the slices of ``split`` (image,
  peak_lv_frame) given their `predict_arrays` output ``pred`` (with um for U): computed exactly
  as the evaluation computes it, so the evaluation's threshold applies."""
  if name in (PAPER_SCORE, VOTE_SCORE):
    um = pred["um" if name == PAPER_SCORE else "um_vote"]
    return uncertainty.configured_uncertainty(um, pred["segmentation"],
                                              config.eval)["one_minus_U"]
  if name == ENTROPY_SCORE:
    return uncertainty.batch_entropy_score(pred["probs"], pred["segmentation"],
                                           _entropy_dilation(config))
  if name == FRAME_MOTION_SCORE:
    return frame_motion.frame_motion_score(split["image"])
  if name in ENSEMBLE_SCORES:
    return ensemble_scores(split, pred, config)[name]
  check_score_available(config, name)
  return baseline_scores(model, variables, split, config, names=(name,))[name]


# ----------------------------------------------------------------------------------------------
# Failure types: every score against clean slices, per failure type (perfjax.data.failures).


def failure_evaluation(model, variables, config, data: dict, with_u: bool = True,
                       figure_dir: str | None = None) -> dict:
  """Every score of ``data`` (`perfjax.data.failures.failure_set`) against its clean slices.

  ``with_u=False`` leaves out the paper's U, whose stride-2 map runs 1089 windows a slice
  against the segmentation's 9 (the other scores need only those). With ``figure_dir``, the
  figures of `perfjax.failure_figures` are written there.

  Returns dict(ood_score: the recommended score (eval.ood_score), n_clean, scores: [names],
  all: {score: score_summary of every failed slice against the clean ones}, by_type: {failure:
  {score: score_summary of that failure against the clean ones}}, by_group: the same per
  `failures.FAILURE_GROUPS` present (motion of every amplitude together, ...), slices: {score:
  [M] values, "failure": [M], "dice": [M]}, figures: [file names in figure_dir]).
  """
  recommended = primary_score(config)
  pred = predict_arrays(model, variables, data["image"], data["peak_lv_frame"], config,
                        with_u, desc="failure set")
  scores = {}
  if with_u:
    scores[PAPER_SCORE] = slice_scores(PAPER_SCORE, model, variables, data, pred, config)
  scores.update(other_scores(model, variables, data, pred, config))
  failure = np.asarray(data["failure"])
  clean = failure == failures.CLEAN
  dice = np.array([metrics.dice(p, g) for p, g in zip(pred["segmentation"], data["mask"])])

  def summaries(keep):
    return {name: score_summary(score[keep], ~clean[keep], None, name)
            for name, score in scores.items()}

  out = dict(ood_score=recommended, n_clean=int(clean.sum()), scores=list(scores),
             all=summaries(np.ones_like(clean)),
             by_type={f: summaries(clean | (failure == f))
                      for f in dict.fromkeys(failure[~clean])},
             by_group={g: summaries(clean | np.isin(failure, members))
                       for g, members in failures.FAILURE_GROUPS.items()
                       if np.isin(failure, members).any()},
             slices=dict(failure=failure.tolist(), dice=dice.tolist(),
                         **{score_name: np.asarray(s, np.float64).tolist()
                            for score_name, s in scores.items()}),
             figures=[])
  if figure_dir:
    out["figures"] = failure_figures.write_figures(figure_dir, out, data, pred, scores)
  return out


FAILURES_JSON = "ood_failures.json"  # failure_benchmark's outputs in the workdir
FAILURES_MARKDOWN = "ood_failures.md"  # (+ .html beside it)
FAILURES_FIGURES = "ood_failures_figures"  # the figures of perfjax.failure_figures


def failure_benchmark(config, workdir: str, seed: int = 0, n_slices: int = 12,
                      protocol: str = "bssfp", failure_types=None, with_u: bool = True) -> dict:
  """`failure_evaluation` of the best checkpoint in ``workdir`` on a fresh
  `failures.failure_set(seed, n_slices, protocol)`, with ``ood_score`` (eval.ood_score, the
  recommended score); writes ``workdir/ood_failures.json`` and the table of `failure_markdown`
  as ``ood_failures.md`` / ``.html`` with the figures in ``ood_failures_figures/``
  (``--mode=ood_failures``, ``perfjax ood-failures``)."""
  workdir = os.path.abspath(workdir)
  config = checkpoints.trained_config(config, workdir)
  primary_score(config)  # An unknown eval.ood_score fails here, before any compute.
  model, variables = checkpoints.load_params(config, workdir, "best")
  data = failures.failure_set(seed, n_slices, protocol,
                              failure_types or failures.FAILURE_TYPES)
  staged = reporting.fresh_dir(workdir, FAILURES_FIGURES)
  out = dict(seed=seed, n_slices=n_slices, protocol=protocol,
             **failure_evaluation(model, variables, config, data, with_u, figure_dir=staged))
  reporting.replace_dir(staged, os.path.join(workdir, FAILURES_FIGURES))
  writers.write_json(os.path.join(workdir, FAILURES_JSON), out)
  reporting.write_markdown(os.path.join(workdir, FAILURES_MARKDOWN),
                           failure_markdown(out, workdir))
  return out


def failure_table(out: dict) -> str:
  """The table of `failure_markdown`: one row per failure type, per group of types and for all
  failures together; n+/n- and the AUC [95 % CI] of every score (the recommended one marked)."""
  scores = list(out["scores"])
  recommended = out.get("ood_score")
  head = [s + (" (recommended)" if s == recommended else "") for s in scores]
  lines = ["| failures | n+/n- | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(scores)]
  rows = list(out["by_type"].items())
  rows += [(f"group: {g}", by) for g, by in (out.get("by_group") or {}).items()]
  rows.append(("all failures", out["all"]))
  for name, by_score in rows:
    counts = reporting.counts_text(next(iter(by_score.values()), None))
    lines.append(f"| {name} | {counts} | " +
                 " | ".join(reporting.auc_ci_text(by_score.get(s)) for s in scores) + " |")
  return "\n".join(lines) + "\n"


def failure_markdown(out: dict, workdir: str = "") -> str:
  """`failure_benchmark`'s ``out`` as a short Markdown page: what was scored, the recommended
  score, `failure_table` and its figures."""
  recommended = out.get("ood_score")
  return "\n".join([
      f"# OOD failure benchmark{': ' + workdir if workdir else ''}", "",
      f"Best checkpoint on a fresh failure set (`perfjax.data.failures.failure_set`: seed "
      f"{out.get('seed')}, {out.get('n_slices')} clean {out.get('protocol')} slices and each "
      "failure type made from them). Each row: that failure's slices (positives, n+) against "
      f"the {out['n_clean']} clean ones (negatives, n-); the AUC of each score (higher = more "
      "reliable: a slice is flagged when its score is low) with its stratified bootstrap 95 % "
      "CI. Recommended score (`eval.ood_score`): "
      f"{recommended if recommended else 'n/a'}.", "", failure_table(out),
      *_figure_lines(out.get("figures") or ())])


def _figure_lines(names) -> list[str]:
  """Markdown of the failure benchmark's figures (`perfjax.failure_figures`), in its folder."""
  captions = {failure_figures.DICE_FIGURE: "Dice against each score",
              failure_figures.EXAMPLES_FIGURE: "one slice of each failure type, made from the "
                                               "same clean heart (first row)"}
  lines = []
  for name in names:
    caption = captions.get(name) or ("ROC, " + name[len("roc_"):-len(".png")].replace("_", " "))
    lines += [f"![{caption}]({FAILURES_FIGURES}/{name})", ""]
  return (["## Figures", ""] + lines) if lines else []
