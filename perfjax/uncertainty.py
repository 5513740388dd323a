"""Slice uncertainty U (paper eq. 1-2), the uncertain sector, an entropy score, OOD ROC, baselines.

U_i (CONVENTIONS.md "Uncertainty and out-of-distribution"): for each of the six AHA sectors
k, the sum of the uncertainty map UM over the region M_k (wedge k of the segmented
myocardium dilated by ``dilation`` px) divided by A_k (segmented-myocardium pixels in
wedge k); U is the mean over the six. A slice is flagged OOD when ``1 - U < t``.

Documented choices:
* A sector with A_k == 0, or a segmentation whose sectors cannot be placed (no LV, no
  myocardium, no RV contact), makes the slice uncertain by definition: ``U = +inf`` and
  ``one_minus_U = -inf`` (below any threshold), ``ok=False`` with the reason in
  ``problem``; nothing is divided by zero. JSON writers should store these as null or a
  string (Python's json writes ``-Infinity``).
* The total variation of UM in a region is the anisotropic sum of |forward differences|
  over the neighbour pairs whose both pixels lie in the region (the region's border is
  not a jump). The uncertain sector is the one with the largest TV (the first on ties).
* ROC: a slice is called positive (OOD) when ``score < t``; thresholds are the distinct
  scores ascending plus +inf, so ``t`` is the smallest score still called reliable.
  Ties between a positive and a negative give the diagonal step (half credit) in the
  trapezoid AUC, which therefore equals the Mann-Whitney P(pos < neg) + P(tie) / 2.

Entropy score (``entropy_score``): 1 - the mean normalised softmax entropy of the
segmentation's stride-32 probabilities over the predicted myocardium dilated by 3 px: a
slice-level score of how soft the segmentation is where it matters, proposed in issue 14
beside U (how each separates failures: `perfjax.ood.failure_evaluation`).

Baselines (the field's usual alternatives, scored by the same ``slice_uncertainty``):
test-time augmentation (flips, circular shifts, noise; the std across augmentations of
the myocardium probability of each stride-32 prediction) and Monte-Carlo dropout (a UNet
with ``dropout_rate > 0`` applied with ``train=True`` and a fresh dropout key per sample).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from scipy import ndimage

from perfjax import sectors
from perfjax import windows
from perfjax.errors import InputError
from perfjax.conventions import MYOCARDIUM, PATCH, SEG_STRIDE
from perfjax.inference import WindowPredictor, sliding_window

N_SECTORS = 6


# ----------------------------------------------------------------------------------------------
# U per slice and the uncertain sector.


def total_variation(um, region) -> float:
  """Anisotropic TV of ``um`` [H, W] over neighbour pairs both inside boolean ``region``."""
  um = np.asarray(um, np.float64)
  region = np.asarray(region, bool)
  rows = region[1:, :] & region[:-1, :]
  cols = region[:, 1:] & region[:, :-1]
  return float(np.abs(np.diff(um, axis=0))[rows].sum() + np.abs(np.diff(um, axis=1))[cols].sum())


def dilate(binary, pixels: int) -> np.ndarray:
  """Binary dilation by a Euclidean disc of radius ``pixels`` (0 returns a copy)."""
  binary = np.asarray(binary, bool)
  if pixels == 0 or not binary.any():
    return binary.copy()
  return ndimage.distance_transform_edt(~binary) <= pixels


def _flagged(problem: str) -> dict:
  return dict(U=float("inf"), one_minus_U=float("-inf"), per_sector=np.full(N_SECTORS, np.nan),
              area=np.zeros(N_SECTORS, np.int64), tv=np.full(N_SECTORS, np.nan),
              uncertain_sector=0, ok=False, problem=problem, sectors_from=None)


def slice_uncertainty(um, seg, dilation: int = 0, theta_s: float | None = None,
                      center=None, fallback_theta_s: float | None = None) -> dict:
  """U of one slice from its uncertainty map and predicted segmentation.

  Args:
    um: float [H, W] uncertainty map (the myocardium-probability std across windows).
    seg: int [H, W] predicted labels b(P) (0 bg, 1 myo, 2 LV, 3 RV); its own LV centre
      and RV insertion points place the sectors unless ``theta_s``/``center`` are given.
    dilation: pixels by which the segmented myocardium is dilated to form M_k.
    theta_s, center: sector geometry to use instead of the segmentation's own.
    fallback_theta_s: theta_s when the segmentation has no RV insertion points (a network
      trained without RV labels predicts no RV); None flags such a slice uncertain (paper).

  Returns:
    dict(U, one_minus_U, per_sector [6] (sum UM over M_k / A_k), area [6] (A_k), tv [6],
    uncertain_sector (1..6, by TV; 0 when the sectors cannot be placed), ok, problem,
    sectors_from: "rv_insertion_points", "given" or "fallback").
  """
  um = np.asarray(um, np.float64)
  seg = np.asarray(seg)
  if um.ndim != 2 or seg.shape != um.shape:
    raise InputError("um", f"expected [H, W] matching seg {seg.shape}, got shape {um.shape}")
  if not np.isfinite(um).all():
    raise InputError("um", "contains NaN or Inf")
  if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 0:
    raise InputError("dilation", f"must be a non-negative integer, got {dilation!r}")
  myo = seg == MYOCARDIUM
  if not myo.any():
    return _flagged("seg: no segmented myocardium")
  sectors_from = "given" if theta_s is not None else "rv_insertion_points"
  try:
    if center is None:
      center = sectors.lv_centroid(seg, "seg")
    if theta_s is None:
      try:
        theta_s = sectors.septal_angle(seg, center=center, source="seg")
      except InputError:
        if fallback_theta_s is None:
          raise
        theta_s, sectors_from = float(fallback_theta_s), "fallback"
    wedge = sectors.angular_index(seg.shape, center, theta_s, N_SECTORS)
  except InputError as err:
    return _flagged(str(err))
  region = dilate(myo, int(dilation))
  area = np.bincount(wedge[myo], minlength=N_SECTORS + 1)[1:].astype(np.int64)
  sums = np.bincount(wedge[region], weights=um[region], minlength=N_SECTORS + 1)[1:]
  tv = np.array([total_variation(um, region & (wedge == k)) for k in range(1, N_SECTORS + 1)])
  with np.errstate(invalid="ignore", divide="ignore"):
    per = np.where(area > 0, sums / np.maximum(area, 1), np.nan)
  out = dict(per_sector=per, area=area, tv=tv, uncertain_sector=int(np.argmax(tv)) + 1,
             sectors_from=sectors_from)
  if (area == 0).any():
    empty = [int(k) + 1 for k in np.nonzero(area == 0)[0]]
    out.update(U=float("inf"), one_minus_U=float("-inf"), ok=False,
               problem=f"seg: no segmented myocardium in sector(s) {empty}")
    return out
  u = float(per.mean())
  out.update(U=u, one_minus_U=1.0 - u, ok=True, problem=None)
  return out


def batch_uncertainty(um_nhw, seg_nhw, dilation: int = 0, theta_s=None, centers=None,
                      fallback_theta_s: float | None = None) -> dict:
  """``slice_uncertainty`` of N slices; theta_s [N] and centers [N, 2] optional.

  Returns dict(U [N], one_minus_U [N], per_sector [N, 6], uncertain_sector [N] int,
  ok [N] bool, problems [N] (str or None), sectors_from [N] (str or None)).
  """
  um_nhw, seg_nhw = np.asarray(um_nhw), np.asarray(seg_nhw)
  if um_nhw.ndim != 3 or um_nhw.shape != seg_nhw.shape:
    raise InputError("um", f"expected [N, H, W] matching seg {seg_nhw.shape}, got {um_nhw.shape}")
  rs = [slice_uncertainty(um_nhw[i], seg_nhw[i], dilation,
                          None if theta_s is None else theta_s[i],
                          None if centers is None else centers[i], fallback_theta_s)
        for i in range(len(um_nhw))]
  return dict(U=np.array([r["U"] for r in rs]),
              one_minus_U=np.array([r["one_minus_U"] for r in rs]),
              per_sector=np.stack([r["per_sector"] for r in rs]),
              uncertain_sector=np.array([r["uncertain_sector"] for r in rs], np.int32),
              ok=np.array([r["ok"] for r in rs]), problems=[r["problem"] for r in rs],
              sectors_from=[r["sectors_from"] for r in rs])


def configured_uncertainty(um_nhw, seg_nhw, eval_config) -> dict:
  """``batch_uncertainty`` with the evaluation config's dilation (``um_dilation``) and sector
  fallback (``u_fallback_septal_angle``): U computed the same way wherever it is scored."""
  return batch_uncertainty(um_nhw, seg_nhw, dilation=eval_config.um_dilation,
                           fallback_theta_s=eval_config.get("u_fallback_septal_angle"))


# ----------------------------------------------------------------------------------------------
# Softmax entropy in the predicted myocardium: a slice-level score beside U.

ENTROPY_DILATION = 3  # px the predicted myocardium is dilated by for the entropy score


def pixel_entropy(probs_hwk) -> np.ndarray:
  """Shannon entropy of each pixel's class probabilities [..., K], divided by log K (0..1)."""
  p = np.asarray(probs_hwk, np.float64)
  k = p.shape[-1]
  if k < 2:
    raise InputError("probs", f"need at least 2 classes for an entropy, got shape {p.shape}")
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -terms.sum(axis=-1) / np.log(k)


ENTROPY_SCORE = "entropy"  # The name of `entropy_score` among the OOD scores.
# 1 - U with UM replaced by the windows' label disagreement (eval.vote_map; a variant of U).
VOTE_SCORE = "U_vote"


def entropy_score(probs_hwk, seg, dilation: int = ENTROPY_DILATION) -> float:
  """1 - mean normalised softmax entropy over the predicted myocardium dilated by ``dilation``.

  ``probs_hwk`` are the segmentation's mean probabilities over the windows (stride 32), ``seg``
  its argmax. Higher is more reliable, like 1 - U, so the same ROC rule (OOD when score < t)
  applies; unlike eq. 2 the sum is not divided by the segmented area (motion thickens the
  segmented myocardium). No predicted myocardium: -inf (uncertain by definition).
  """
  probs_hwk, seg = np.asarray(probs_hwk), np.asarray(seg)
  if probs_hwk.ndim != 3 or probs_hwk.shape[:2] != seg.shape:
    raise InputError("probs", f"expected [H, W, K] matching seg {seg.shape}, got {probs_hwk.shape}")
  if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 0:
    raise InputError("dilation", f"must be a non-negative integer, got {dilation!r}")
  region = dilate(seg == MYOCARDIUM, int(dilation))
  if not region.any():
    return float("-inf")
  return float(1.0 - pixel_entropy(probs_hwk)[region].mean())


def batch_entropy_score(probs_nhwk, seg_nhw, dilation: int = ENTROPY_DILATION) -> np.ndarray:
  """``entropy_score`` of N slices: [N] float64."""
  probs_nhwk, seg_nhw = np.asarray(probs_nhwk), np.asarray(seg_nhw)
  if probs_nhwk.ndim != 4 or probs_nhwk.shape[:3] != seg_nhw.shape:
    raise InputError("probs", f"expected [N, H, W, K] matching seg {seg_nhw.shape}, got "
                     f"{probs_nhwk.shape}")
  return np.array([entropy_score(p, s, dilation) for p, s in zip(probs_nhwk, seg_nhw)],
                  np.float64)


# ----------------------------------------------------------------------------------------------
# A deep ensemble (Lakshminarayanan et al. 2017): the same slices through M independently
# trained networks (e.g. the reproduction's seeds).

ENSEMBLE_ENTROPY_SCORE = "ensemble_entropy"  # 1 - entropy of the members' mean (total)
ENSEMBLE_MI_SCORE = "ensemble_mi"  # 1 - mutual information (the members' disagreement)


def ensemble_scores(probs_mnhwk, seg_nhw, dilation: int = ENTROPY_DILATION
                    ) -> dict[str, np.ndarray]:
  """Two slice scores of M members' mean softmax [M, N, H, W, K] over the ensemble's predicted
  myocardium ``seg_nhw`` dilated by ``dilation``, both "higher = more reliable".

  ``ensemble_entropy``: `entropy_score` of the members' mean. ``ensemble_mi``: 1 - the mean
  normalised mutual information H(mean) - mean_m H(member m), which is 0 where the members
  agree however soft they are. No predicted myocardium: -inf, as for `entropy_score`.
  """
  probs, seg = np.asarray(probs_mnhwk, np.float64), np.asarray(seg_nhw)
  if probs.ndim != 5 or probs.shape[1:4] != seg.shape or probs.shape[0] < 2:
    raise InputError("probs", f"expected [M >= 2, N, H, W, K] matching seg {seg.shape}, got "
                     f"{probs.shape}")
  mean = probs.mean(axis=0)
  information = pixel_entropy(mean) - pixel_entropy(probs).mean(axis=0)  # [N, H, W], >= 0
  mi = np.full(len(seg), float("-inf"))
  for i, s in enumerate(seg):
    region = dilate(s == MYOCARDIUM, int(dilation))
    if region.any():
      mi[i] = 1.0 - information[i][region].mean()
  return {ENSEMBLE_ENTROPY_SCORE: batch_entropy_score(mean, seg, dilation),
          ENSEMBLE_MI_SCORE: mi}


# ----------------------------------------------------------------------------------------------
# ROC of 1 - U against OOD labels.


def validated_scores_labels(scores, labels):
  """Scores as float64 [N] (no NaN or +Inf) and labels as bool [N] (from bool or 0/1)."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  if scores.shape != labels.shape or scores.size == 0:
    raise InputError("scores", f"need as many scores as labels (> 0), got {scores.size} and "
                     f"{labels.size}")
  if np.isnan(scores).any() or np.isposinf(scores).any():
    raise InputError("scores", "contain NaN or +Inf (-Inf marks an uncertain-by-definition slice)")
  if labels.dtype != bool:
    if not np.isin(labels, (0, 1)).all():
      raise InputError("labels", "must be boolean or 0/1")
    labels = labels.astype(bool)
  return scores, labels


def roc_curve(scores, labels) -> dict:
  """ROC of the rule "positive (OOD) when score < t" over every distinct threshold.

  Returns dict(fpr, tpr, thresholds, auc): arrays from (0, 0) (t = smallest score, nothing
  flagged) to (1, 1) (t = +inf, all flagged), thresholds ascending; auc by the trapezoid
  rule (ties between classes count one half).
  """
  scores, labels = validated_scores_labels(scores, labels)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise InputError("labels", f"need both classes for a ROC, got {n_pos} positive and "
                     f"{n_neg} negative")
  values = np.unique(scores)
  thresholds = np.concatenate([values, [np.inf]])
  # flagged(t) = scores < t: counts of positives / negatives strictly below each threshold.
  pos_sorted = np.sort(scores[labels])
  neg_sorted = np.sort(scores[~labels])
  tp = np.searchsorted(pos_sorted, thresholds, side="left")
  fp = np.searchsorted(neg_sorted, thresholds, side="left")
  tp[-1], fp[-1] = n_pos, n_neg
  tpr, fpr = tp / n_pos, fp / n_neg
  auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
  return dict(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=auc)


def roc_curves(scores: dict[str, np.ndarray], labels, summaries: dict[str, dict]) -> dict:
  """What `perfjax.panels.roc_figure` draws: name -> dict(fpr, tpr, auc, auc_ci,
  n_positive, n_negative), the ROC of each score against ``labels`` with the AUC, CI and class
  sizes of its summary (``summaries[name]``, `perfjax.ood.score_summary`). A score without a
  ROC (one class only, NaN values) is left out."""
  curves = {}
  for name, score in scores.items():
    try:
      roc = roc_curve(score, labels)
    except InputError:
      continue
    curves[name] = dict(fpr=roc["fpr"], tpr=roc["tpr"], **{
        k: summaries[name].get(k) for k in ("auc", "auc_ci", "n_positive", "n_negative")})
  return curves


def auc(scores, labels) -> float:
  """Area under ``roc_curve`` (positives expected to score lower)."""
  return roc_curve(scores, labels)["auc"]


def _mean_or_nan(x) -> float:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else float("nan")


def ood_analysis(one_minus_u, ood_labels, dice=None) -> dict:
  """OOD classifier of the paper (III-D): ROC of 1 - U, threshold t at maximum Youden J.

  Args:
    one_minus_u: [N] scores (low = uncertain; -inf for uncertain-by-definition slices).
    ood_labels: [N] bool, True for OOD slices (the positives).
    dice: optional [N] myocardium Dice, to report the mean of reliable (1 - U >= t) and
      unreliable (1 - U < t) slices.

  Returns:
    dict(auc, threshold, sensitivity, specificity, youden, n, n_ood, flagged [N] bool,
    dice_reliable, dice_unreliable, fpr, tpr, thresholds, ok, problem). With one class
    only, the ROC figures are NaN, ``ok`` is False and nothing is flagged. Ties in J go
    to the smallest threshold (fewest slices flagged).
  """
  scores, labels = validated_scores_labels(one_minus_u, ood_labels)
  n, n_ood = labels.size, int(labels.sum())
  if dice is not None:
    dice = np.asarray(dice, np.float64).ravel()
    if dice.shape != scores.shape:
      raise InputError("dice", f"expected {scores.size} values, got {dice.size}")
  out = dict(n=n, n_ood=n_ood)
  if n_ood == 0 or n_ood == n:
    flagged = np.zeros(n, bool)
    nan = float("nan")
    out.update(auc=nan, threshold=nan, sensitivity=nan, specificity=nan, youden=nan,
               fpr=np.array([]), tpr=np.array([]), thresholds=np.array([]), ok=False,
               problem=f"ood_labels: need both classes, got {n_ood} OOD of {n}")
  else:
    roc = roc_curve(scores, labels)
    j = roc["tpr"] - roc["fpr"]
    best = int(np.argmax(j))
    t = float(roc["thresholds"][best])
    flagged = scores < t
    out.update(auc=roc["auc"], threshold=t, sensitivity=float(roc["tpr"][best]),
               specificity=float(1.0 - roc["fpr"][best]), youden=float(j[best]),
               fpr=roc["fpr"], tpr=roc["tpr"], thresholds=roc["thresholds"], ok=True, problem=None)
  out["flagged"] = flagged
  if dice is None:
    out.update(dice_reliable=float("nan"), dice_unreliable=float("nan"))
  else:
    out.update(dice_reliable=_mean_or_nan(dice[~flagged]),
               dice_unreliable=_mean_or_nan(dice[flagged]))
  return out


# ----------------------------------------------------------------------------------------------
# Baselines: test-time augmentation and Monte-Carlo dropout.


def _um_from_samples(probs_snhwk: np.ndarray) -> dict:
  """Per-pixel std (ddof=1) across samples of the myocardium probability, and the mean."""
  mean = probs_snhwk.mean(axis=0)
  um = probs_snhwk[..., MYOCARDIUM].std(axis=0, ddof=1) if len(probs_snhwk) > 1 else \
      np.zeros(probs_snhwk.shape[1:-1], probs_snhwk.dtype)
  return dict(um=um.astype(np.float32), mean=mean.astype(np.float32),
              segmentation=np.argmax(mean, axis=-1).astype(np.int32))


def tta_transforms(key, n_samples: int, max_shift: int = 4, noise_std: float = 0.02) -> list:
  """n_samples augmentation parameters: sample 0 is the identity, the others random.

  Each is dict(flip_rows, flip_cols (bool), shift (drow, dcol) in [-max_shift, max_shift],
  noise_key (a jax key or None), noise_std).
  """
  if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 2:
    raise InputError("n_samples", f"need at least 2 samples for a std, got {n_samples!r}")
  out = [dict(flip_rows=False, flip_cols=False, shift=(0, 0), noise_key=None, noise_std=0.0)]
  for s in range(1, int(n_samples)):
    k_flip, k_shift, k_noise = jax.random.split(jax.random.fold_in(key, s), 3)
    flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (2,)))
    shift = np.asarray(jax.random.randint(k_shift, (2,), -max_shift, max_shift + 1))
    out.append(dict(flip_rows=bool(flips[0]), flip_cols=bool(flips[1]),
                    shift=(int(shift[0]), int(shift[1])), noise_key=k_noise,
                    noise_std=float(noise_std)))
  return out


def _augment(images_nhwc: np.ndarray, t: dict) -> np.ndarray:
  """Every slice gets the same noise field (from noise_key): a slice's augmentation depends on
  neither the other slices of the call nor its place among them."""
  x = images_nhwc
  if t["flip_rows"]:
    x = x[:, ::-1]
  if t["flip_cols"]:
    x = x[:, :, ::-1]
  x = np.roll(x, t["shift"], axis=(1, 2))
  if t["noise_key"] is not None and t["noise_std"] > 0:
    noise = jax.random.normal(t["noise_key"], x.shape[1:], np.float32)
    x = x + t["noise_std"] * np.asarray(noise)[None]
  return np.ascontiguousarray(x, np.float32)


def _unaugment(probs_nhwk: np.ndarray, t: dict) -> np.ndarray:
  x = np.roll(probs_nhwk, (-t["shift"][0], -t["shift"][1]), axis=(1, 2))
  if t["flip_cols"]:
    x = x[:, :, ::-1]
  if t["flip_rows"]:
    x = x[:, ::-1]
  return x


def tta_uncertainty(predict_fn: Callable, params, images_nhwc, key, n_samples: int = 8,
                    max_shift: int = 4, noise_std: float = 0.02, patch: int = PATCH,
                    stride: int = SEG_STRIDE, **window_kwargs) -> dict:
  """Test-time-augmentation uncertainty map of each slice.

  Every slice is predicted (``perfjax.inference.sliding_window(predict_fn, params, ...)`` at
  ``stride``, e.g. with ``perfjax.fast_unet.UNetPredictor(model)`` and its variables) under
  ``n_samples`` augmentations of the whole slice (random row/column flips, circular shifts
  of up to ``max_shift`` px, Gaussian noise of ``noise_std``; sample 0 unaugmented); the
  probabilities are mapped back and UM is their per-pixel std (ddof=1) of the myocardium
  channel. All augmented copies go through one ``sliding_window`` call. A sample's noise is
  the same for every slice, so a slice's map is the same alone, in chunks or in any batch
  (predict scores one slice at a time against the evaluation's threshold).

  Returns:
    dict(um [N,H,W], mean [N,H,W,K] (mean probabilities over the samples),
    segmentation [N,H,W] (argmax of that mean)).
  """
  images_nhwc = np.asarray(images_nhwc, np.float32)
  if images_nhwc.ndim != 4:
    raise InputError("images", f"expected [N, H, W, C], got shape {images_nhwc.shape}")
  transforms = tta_transforms(key, n_samples, max_shift, noise_std)
  batch = np.concatenate([_augment(images_nhwc, t) for t in transforms])
  probs = sliding_window(predict_fn, params, batch, patch=patch, stride=stride,
                         **window_kwargs)["mean"]
  n = images_nhwc.shape[0]
  samples = np.stack([_unaugment(probs[s * n:(s + 1) * n], t) for s, t in enumerate(transforms)])
  return _um_from_samples(samples)


@dataclasses.dataclass(frozen=True)
class DropoutPredictor(WindowPredictor):
  """A UNet's softmax with dropout on, as a `WindowPredictor` of params = (variables, key):
  one compilation for all samples (the key is traced). In a sliding window each window's
  dropout key is folded with its place in its slice (row, col), so a slice's masks depend on
  neither the other slices of the call nor how the windows are batched."""
  model: Any

  def __call__(self, params, patches_bhwc):
    variables, key = params
    logits = self.model.apply(variables, patches_bhwc, train=True, rngs={"dropout": key})
    return jax.nn.softmax(logits, axis=-1)

  def windows(self, params, prepared, images_nhwc, origins_b3, patch: int):
    del prepared
    variables, key = params
    patches = windows.gather(images_nhwc, origins_b3, patch)
    keys = jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(key, r), c))(
        origins_b3[:, 1], origins_b3[:, 2])

    def one(patch_hwc, window_key):
      return self.model.apply(variables, patch_hwc[None], train=True,
                              rngs={"dropout": window_key})[0]

    return jax.nn.softmax(jax.vmap(one)(patches, keys), axis=-1)


def mc_dropout_uncertainty(model, variables, images_nhwc, key, n_samples: int = 8,
                           patch: int = PATCH, stride: int = SEG_STRIDE,
                           **window_kwargs) -> dict:
  """Monte-Carlo-dropout uncertainty map of each slice.

  ``model`` is a ``perfjax.model.UNet`` with ``dropout_rate > 0`` and ``variables`` its
  variables (``{"params": ...}``, as ``model.init`` returns). Each sample runs the
  sliding window at ``stride`` with dropout active (``train=True``) and its own dropout
  key ``fold_in(key, s)``; UM is the per-pixel std (ddof=1) across samples of the
  myocardium probability. Returns dict(um, mean, segmentation) like ``tta_uncertainty``.
  """
  if getattr(model, "dropout_rate", 0.0) <= 0.0:
    raise InputError("model", "MC dropout needs a model with dropout_rate > 0")
  if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 2:
    raise InputError("n_samples", f"need at least 2 samples for a std, got {n_samples!r}")
  images_nhwc = np.asarray(images_nhwc, np.float32)
  predictor = DropoutPredictor(model)
  samples = []
  for s in range(int(n_samples)):
    samples.append(sliding_window(predictor, (variables, jax.random.fold_in(key, s)), images_nhwc,
                                  patch=patch, stride=stride, **window_kwargs)["mean"])
  return _um_from_samples(np.stack(samples))
