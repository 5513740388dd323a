"""Anatomical clean-up of a predicted segmentation: one heart per slice.

A network that sees 64 x 64 windows cannot know where the heart is in the whole crop; on
real images it labels bright structures of the surroundings (liver, chest wall, vessels)
as blood pool or myocardium. The crop is centred on one heart, so whatever is not
connected to it is wrong by construction: keep the largest LV blood pool, the myocardium
that touches it, and the RV blood pool next to that myocardium (the usual connected-
component step of cardiac segmentation pipelines). Classes are those of CONVENTIONS.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax.conventions import BACKGROUND, LV_BLOOD_POOL, MYOCARDIUM, RV_BLOOD_POOL

_EIGHT = np.ones((3, 3), bool)
MYO_REACH_PX = 2  # myocardium counts as the heart's when within this of the kept LV pool
RV_REACH_PX = 3  # an RV component counts when within this of the kept myocardium


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


def keep_heart(segmentation_hw: np.ndarray) -> np.ndarray:
  """[H, W] int labels -> the same with everything but one heart set to background.

  The heart: the largest LV blood-pool component (or, with no LV pool, the largest
  myocardium component), the myocardium components within ``MYO_REACH_PX`` of it, and the
  RV components within ``RV_REACH_PX`` of that myocardium. A slice with no LV pool and no
  myocardium is returned unchanged.
  """
  seg = np.asarray(segmentation_hw)
  lv, myo, rv = seg == LV_BLOOD_POOL, seg == MYOCARDIUM, seg == RV_BLOOD_POOL
  if lv.any():
    lv = _largest(lv)
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
