"""Myocardium Dice: whole slice, per AHA sector (6 / 12 / 48), and a batch table (paper Table 1).

Sector Dice compares, sector by sector, the predicted myocardium in a sector with the
ground-truth myocardium in the same sector. The angular geometry (LV centre and theta_s)
comes from the ground truth by default (``geometry="gt"``), so every network is scored on
the same wedges; ``geometry="pred"`` divides the prediction with its own LV centre and RV
insertion points, the paper's variant. Radial layers of each mask's pixels always come
from that mask itself (endocardial = nearer its own LV blood pool).

Conventions (documented choices):
* Dice of two empty sets is ``empty`` (default 1.0: both agree there is nothing).
* An empty predicted myocardium scores 0 in every sector the ground truth fills.
* A prediction whose geometry cannot be measured (``geometry="pred"`` without RV contact,
  or ``n_radial=2`` without an LV blood pool) gives NaN with ``ok=False`` and the reason in
  ``problem``: never an exception. A degenerate ground truth raises InputError.
"""
from __future__ import annotations

import numpy as np

from perfjax import sectors
from perfjax.errors import InputError


def _pair(pred, gt, source=("pred", "gt")):
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape:
    raise InputError(source[0], f"shape {pred.shape} differs from {source[1]} shape {gt.shape}")
  return pred, gt


def dice_sets(a, b, empty: float = 1.0) -> float:
  """Dice 2|a & b| / (|a| + |b|) of two boolean arrays; ``empty`` when both are empty."""
  a, b = _pair(np.asarray(a, bool), np.asarray(b, bool), ("a", "b"))
  denom = int(a.sum()) + int(b.sum())
  if denom == 0:
    return float(empty)
  return 2.0 * float(np.logical_and(a, b).sum()) / denom


def dice(pred, gt, label: int = 1, empty: float = 1.0) -> float:
  """Dice of ``label`` between two label maps of the same shape (any number of dims).

  Both empty gives ``empty`` (1.0 by default), never NaN.
  """
  pred, gt = _pair(pred, gt)
  return dice_sets(pred == label, gt == label, empty)


def _nan_result(n: int, problem: str) -> dict:
  return dict(mean=float("nan"), per_sector=np.full(n, np.nan), ok=False, problem=problem)


def sector_dice(pred_mask, gt_mask, n_angular: int = 6, n_radial: int = 1, geometry: str = "gt",
                empty: float = 1.0) -> dict:
  """Myocardium Dice per sector between a predicted and a ground-truth label map [H, W].

  Args:
    pred_mask, gt_mask: int [H, W] labels (0 bg, 1 myo, 2 LV, 3 RV).
    n_angular: a multiple of 6 (6 or 24); n_radial: 1 or 2 (6 x 2 is the 12-sector model).
    geometry: "gt" (default: centre and theta_s of the ground truth) or "pred" (the
      prediction's own, the paper's variant).
    empty: Dice of a sector that both masks leave empty.

  Returns:
    dict(mean, per_sector [K] float64, ok, problem (None when ok)).
  """
  if geometry not in ("gt", "pred"):
    raise InputError("geometry", f"must be 'gt' or 'pred', got {geometry!r}")
  pred_mask, gt_mask = _pair(pred_mask, gt_mask, ("pred_mask", "gt_mask"))
  k = int(n_angular) * int(n_radial)
  center = sectors.lv_centroid(gt_mask, "gt_mask")
  theta_s = sectors.septal_angle(gt_mask, center=center, source="gt_mask")
  gt_map = sectors.sector_map(gt_mask, n_angular, n_radial, theta_s=theta_s, center=center,
                              source="gt_mask")
  if not (pred_mask == sectors.MYO).any():
    pred_map = np.zeros_like(gt_map)
  else:
    try:
      if geometry == "pred":
        center = sectors.lv_centroid(pred_mask, "pred_mask")
        theta_s = sectors.septal_angle(pred_mask, center=center, source="pred_mask")
      pred_map = sectors.sector_map(pred_mask, n_angular, n_radial, theta_s=theta_s,
                                    center=center, source="pred_mask")
    except InputError as err:
      return _nan_result(k, str(err))
  per = np.array([dice_sets(pred_map == s, gt_map == s, empty) for s in range(1, k + 1)])
  return dict(mean=float(per.mean()), per_sector=per, ok=True, problem=None)


def dice_table(pred_masks, gt_masks, geometry: str = "gt") -> dict:
  """Whole-slice, 6-sector and 12-sector myocardium Dice of N slices [N, H, W].

  Returns dict(whole [N], sector6 [N], sector12 [N], ok [N] bool, problems [N] (str or
  None), mean=dict(whole, sector6, sector12)) where each mean skips the slices whose value
  is NaN: a slice flagged in ``ok`` still counts in every mean it has a value for (e.g. its
  6-sector Dice when only the 12-sector one failed). A ground-truth slice without usable
  geometry is flagged the same way (its whole-slice Dice is still computed).
  """
  pred_masks, gt_masks = _pair(pred_masks, gt_masks, ("pred_masks", "gt_masks"))
  if pred_masks.ndim != 3:
    raise InputError("pred_masks", f"expected [N, H, W] label maps, got shape {pred_masks.shape}")
  n = pred_masks.shape[0]
  whole = np.array([dice(pred_masks[i], gt_masks[i]) for i in range(n)], dtype=np.float64)
  s6 = np.full(n, np.nan)
  s12 = np.full(n, np.nan)
  ok = np.ones(n, bool)
  problems: list = [None] * n
  for i in range(n):
    try:
      r6 = sector_dice(pred_masks[i], gt_masks[i], 6, 1, geometry)
      r12 = sector_dice(pred_masks[i], gt_masks[i], 6, 2, geometry)
    except InputError as err:
      ok[i], problems[i] = False, str(err)
      continue
    s6[i], s12[i] = r6["mean"], r12["mean"]
    ok[i] = r6["ok"] and r12["ok"]
    problems[i] = r6["problem"] or r12["problem"]

  def _mean(x):
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

  return dict(whole=whole, sector6=s6, sector12=s12, ok=ok, problems=problems,
              mean=dict(whole=_mean(whole), sector6=_mean(s6), sector12=_mean(s12)))
