"""A pixel's 8 neighbours: their sum and their mean over a set of pixels, itself left out.

Rules that choose pixels by a noisy value (the frame gain's flattest body pixels, the AIF's
purest blood pixels) read that value from the pixel's neighbours instead of from the pixel
itself: chosen by their own values, the kept pixels are those whose noise went the rule's way,
and their mean carries that noise as a bias (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import numpy as np


def neighbour_sum(values_hwc) -> np.ndarray:
  """[H, W, C] the sum of each pixel's 8 neighbours (zero beyond the image)."""
  padded = np.pad(np.asarray(values_hwc, np.float64), ((1, 1), (1, 1), (0, 0)))
  h, w = padded.shape[0] - 2, padded.shape[1] - 2
  return sum(padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
             for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)


def neighbour_mean(values_hwc, valid_hw) -> np.ndarray:
  """[H, W, C] the mean of ``values_hwc`` over each pixel's ``valid_hw`` neighbours (itself
  left out); NaN where none is valid."""
  valid = np.asarray(valid_hw, np.float64)[..., None]
  total = neighbour_sum(np.where(valid > 0, values_hwc, 0.0))
  count = neighbour_sum(valid)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.nan)
