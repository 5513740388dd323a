"""Anatomical clean-up of a predicted segmentation: one heart per slice.

A network that sees 64 x 64 windows cannot know where the heart is in the whole crop; on
real images it labels bright structures of the surroundings (liver, chest wall, vessels)
as blood pool or myocardium. The crop is centred on one heart, so whatever is not
connected to it is wrong by construction: keep the heart's LV blood pool (of the pool's
components, the one with the most pool and myocardium around it, weighted by its nearness to
the crop's centre: a vessel or an island at the crop's edge can be larger than an apical LV),
the myocardium that touches it, and the RV blood pool next to that myocardium (the usual
connected-component step of cardiac segmentation pipelines). Classes are those of
CONVENTIONS.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax.conventions import BACKGROUND, LV_BLOOD_POOL, MYOCARDIUM, RV_BLOOD_POOL

_EIGHT = np.ones((3, 3), bool)
MYO_REACH_PX = 2  # myocardium counts as the heart's when within this of the kept LV pool
RV_REACH_PX = 3  # an RV component counts when within this of the kept myocardium
# The Gaussian weight on an LV component's distance from the crop's centre has this sigma, as a
# fraction of the crop's side (32 px of 128: the LV of a centred crop keeps >= 0.9).
CENTRE_SIGMA = 0.25


def _largest(binary_hw: np.ndarray) -> np.ndarray:
  labels, n = ndimage.label(binary_hw, structure=_EIGHT)
  if n <= 1:
    return binary_hw.copy()
  sizes = np.bincount(labels.ravel())[1:]
  return labels == 1 + int(np.argmax(sizes))


def _touching(binary_hw: np.ndarray, anchor_hw: np.ndarray, reach_px: int) -> np.ndarray:
  """The 8-connected components of ``binary_hw`` within ``reach_px`` of ``anchor_hw``."""
  labels, n = ndimage.label(binary_hw, structure=_EIGHT)
  if n == 0:
    return binary_hw.copy()
  near = ndimage.binary_dilation(anchor_hw, _EIGHT, iterations=reach_px)
  keep = np.unique(labels[near & binary_hw])
  return np.isin(labels, keep[keep > 0])


def _heart_lv(lv_hw: np.ndarray, myo_hw: np.ndarray) -> np.ndarray:
  """The LV pool component of most pool + touching myocardium pixels, times a Gaussian weight
  (sigma CENTRE_SIGMA of the side) of its centroid's distance from the crop's centre."""
  labels, n = ndimage.label(lv_hw, structure=_EIGHT)
  if n <= 1:
    return lv_hw.copy()
  h, w = lv_hw.shape
  sigma2 = (CENTRE_SIGMA * max(h, w)) ** 2
  scores = []
  for k in range(1, n + 1):
    component = labels == k
    rows, cols = np.nonzero(component)
    d2 = (rows.mean() - (h - 1) / 2) ** 2 + (cols.mean() - (w - 1) / 2) ** 2
    size = component.sum() + _touching(myo_hw, component, MYO_REACH_PX).sum()
    scores.append(size * np.exp(-0.5 * d2 / sigma2))
  return labels == 1 + int(np.argmax(scores))


def keep_heart(segmentation_hw: np.ndarray) -> np.ndarray:
  """[H, W] int labels -> the same with everything but one heart set to background.

  The heart: the LV blood-pool component of `_heart_lv` (or, with no LV pool, the largest
  myocardium component), the myocardium components within ``MYO_REACH_PX`` of it, and the
  RV components within ``RV_REACH_PX`` of that myocardium. A slice with no LV pool and no
  myocardium is returned unchanged.
  """
  seg = np.asarray(segmentation_hw)
  lv, myo, rv = seg == LV_BLOOD_POOL, seg == MYOCARDIUM, seg == RV_BLOOD_POOL
  if lv.any():
    lv = _heart_lv(lv, myo)
    myo = _touching(myo, lv, MYO_REACH_PX)
  elif myo.any():
    myo = _largest(myo)
  else:
    return seg.copy()
  rv = _touching(rv, myo if myo.any() else lv, RV_REACH_PX)
  out = np.full_like(seg, BACKGROUND)
  out[myo] = MYOCARDIUM
  out[lv] = LV_BLOOD_POOL
  out[rv] = RV_BLOOD_POOL
  return out


def keep_heart_batch(segmentation_nhw: np.ndarray) -> np.ndarray:
  """:func:`keep_heart` for each slice of ``[N, H, W]``."""
  seg = np.asarray(segmentation_nhw)
  return np.stack([keep_heart(s) for s in seg]) if len(seg) else seg.copy()
