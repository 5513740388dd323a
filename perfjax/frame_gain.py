"""Per-frame signal gain of a perfusion series, measured on tissue that does not enhance.

A frame-to-frame change of the whole image's gain (receiver or coil loading drift, saturation
that varies with the heart rate) multiplies every tissue curve of a slice by the same factor
g_t. The 48 sector curves cannot average it out (they share it), and the Fermi fit reads it as
flow: on the wide phantom, whose frames jitter by up to 4 % (sd), it is the largest error of
slice MBF (benchmarks/RESULTS.md, issue 13). An image-only estimate that assumes smooth tissue
curves recovers only about half of it (any smooth part of g_t looks like enhancement).

Rule: g_t is the median, over the body pixels whose curves enhance least, of each pixel's
signal relative to its first frames. Body pixels lie outside the heart (mask > 0 dilated by
``HEART_MARGIN_PX``) and have a pre-contrast signal of at least ``BODY_LEVEL`` x the 90th
percentile of the region (lung, air and zero-filled borders carry no gain). A pixel's
enhancement is the largest excursion of a low-order polynomial in time fitted to its log
signal once the current g_t is divided out; the ``FLAT_FRACTION`` with the smallest one (fat,
non-enhancing soft tissue) set g_t, and the choice is refined ``N_ROUNDS`` times, starting from
a smooth-residual estimate. Only relative gains matter (each curve is read against its own
baseline), so g is scaled to a geometric mean of 1.

Where all the tissue around the heart enhances, its least enhancing pixels still rise with the
contrast, and that rise would be divided out of the myocardium as if it were gain (on the
narrow phantom: a bias of -18 %). So a g_t whose slow part follows the contrast uptake (the
running integral of the LV blood's enhancement) by more than ``UPTAKE_Z_MAX`` times its own
frame-to-frame scatter is refused: no gain is applied and the reason says why.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax import conventions
from perfjax.errors import InputError

HEART_MARGIN_PX = 6
BODY_LEVEL = 0.05
FLAT_FRACTION = 0.1
UPTAKE_Z_MAX = 3.0
MIN_BODY_PIXELS = 100
N_BASELINE = 3  # frames each pixel is compared with (before any arrival that matters here)
TREND_ORDER = 4  # degree of the per-pixel polynomial trend
N_ROUNDS = 3


def trend_projection(times: np.ndarray) -> np.ndarray:
  """[T, T] least-squares projection onto polynomials of degree TREND_ORDER in time."""
  x = (times - times[0]) / max(times[-1] - times[0], 1e-12) * 2.0 - 1.0
  basis = np.polynomial.legendre.legvander(x, TREND_ORDER)
  return basis @ np.linalg.pinv(basis)


def frame_gain(raw_hwt, mask_hw, times) -> dict:
  """Per-frame gain [T] of one slice (geometric mean 1), from its non-enhancing tissue.

  Args:
    raw_hwt: [H, W, T] signal (not min-max normalised); mask_hw: int [H, W], > 0 on the heart
      (ground truth or predicted); times: [T] frame times (s).

  Returns:
    dict(gain [T] (ones when it cannot be measured), n_pixels (the pixels that set it),
    reason: "" when measured, else why not).
  """
  raw = np.asarray(raw_hwt, np.float64)
  mask = np.asarray(mask_hw)
  times = np.asarray(times, np.float64)
  if raw.ndim != 3 or mask.shape != raw.shape[:2] or times.shape != raw.shape[2:]:
    raise InputError("raw", f"expected raw [H, W, T], mask [H, W], times [T]; got {raw.shape}, "
                     f"{mask.shape}, {times.shape}")
  n_t = raw.shape[2]
  if n_t <= TREND_ORDER + N_BASELINE:
    return verdict(n_t)
  outside = ~ndimage.binary_dilation(mask > 0, iterations=HEART_MARGIN_PX)
  finite = np.all(np.isfinite(raw), axis=-1)
  base = np.where(finite, raw[..., :N_BASELINE].mean(axis=-1), 0.0)
  region = outside & finite
  if region.sum() < MIN_BODY_PIXELS:
    return verdict(n_t, n_region=int(region.sum()))
  body = region & (base > BODY_LEVEL * np.percentile(base[region], 90))
  if body.sum() < MIN_BODY_PIXELS:
    return verdict(n_t, n_region=int(region.sum()), n_body=int(body.sum()))
  log_px = np.log(np.maximum(raw[body], 1e-12))  # [P, T]
  log_rel = log_px - log_px[:, :N_BASELINE].mean(axis=1, keepdims=True)
  proj = trend_projection(times)
  rough = np.eye(n_t) - proj
  # Start: the common part of what no smooth trend explains, median over pixels of
  # (log_px - log_g) @ rough.T each round. log_g is the same for every pixel, so that median is
  # the pixels' median of log_px @ rough.T (computed once) minus log_g @ rough.T.
  median_rough = np.median(log_px @ rough.T, axis=0)
  log_g = np.zeros(n_t)
  for _ in range(N_ROUNDS):
    log_g = log_g + median_rough - log_g @ rough.T
  # The same split for each pixel's trend once log_g is divided out, about its first frames.
  trend = log_rel @ proj.T
  trend -= trend[:, :N_BASELINE].mean(axis=1, keepdims=True)
  for _ in range(N_ROUNDS):
    shift = log_g @ proj.T
    excursion = np.abs(trend - (shift - shift[:N_BASELINE].mean())).max(axis=1)
    flat = excursion <= np.quantile(excursion, FLAT_FRACTION)
    log_g = np.median(log_rel[flat], axis=0)
  z = uptake_z(log_g, lv_curve(raw[mask == conventions.LV_BLOOD_POOL]), times, proj)
  return verdict(n_t, int(region.sum()), int(body.sum()), int(flat.sum()), z, log_g)


def verdict(n_frames: int, n_region: int = 0, n_body: int = 0, n_flat: int = 0,
            z: float = float("nan"), log_g=None) -> dict:
  """:func:`frame_gain`'s outcome from what it measured, checked in its order: the frame count,
  the pixels outside the heart (``n_region``), the body pixels among them, the uptake test's
  ``z``; ``log_g`` [T] is the measured log gain. Shared with `perfjax.batched_curves`."""
  ones = np.ones(n_frames)
  if n_frames <= TREND_ORDER + N_BASELINE:
    return dict(gain=ones, n_pixels=0, reason=f"too few frames ({n_frames})")
  if n_region < MIN_BODY_PIXELS:
    return dict(gain=ones, n_pixels=0, reason="too little image outside the heart")
  if n_body < MIN_BODY_PIXELS:
    return dict(gain=ones, n_pixels=n_body,
                reason=f"fewer than {MIN_BODY_PIXELS} body pixels outside the heart")
  if not np.isfinite(z):
    return dict(gain=ones, n_pixels=n_flat,
                reason="no LV blood pool curve to tell gain from enhancement")
  if z > UPTAKE_Z_MAX:
    return dict(gain=ones, n_pixels=n_flat,
                reason=f"the least enhancing tissue outside the heart follows the contrast "
                       f"uptake (z = {z:.1f}): enhancement, not gain")
  log_g = np.asarray(log_g, np.float64)
  return dict(gain=np.exp(log_g - log_g.mean()), n_pixels=n_flat, reason="")


def sd_percent(gain) -> np.ndarray:
  """The sd (%) of log gain over the frames, [..., T] -> [...]: how much a gain moved."""
  return 100.0 * np.std(np.log(np.asarray(gain, np.float64)), axis=-1)


def lv_curve(lv_pixels) -> np.ndarray:
  """The LV blood pool's mean curve [T] from its pixels [P, T]; NaN without a finite pool."""
  if lv_pixels.shape[0] == 0 or not np.all(np.isfinite(lv_pixels)):
    return np.full(lv_pixels.shape[1], np.nan)
  return lv_pixels.mean(axis=0)


def uptake_z(log_g, lv, times, proj) -> float:
  """How far log g follows the contrast uptake, in units of its own frame-to-frame scatter.

  The uptake template is the running integral of the LV blood's enhancement (``lv``, its
  mean curve [T]: the course of a tissue taking up contrast); a gain has no reason to follow
  it. z is log g's component along the (centred, unit) template over the sd of log g about its
  smooth trend (``proj``: :func:`trend_projection`); NaN without an LV blood pool curve (NaN
  ``lv``) or a curve to integrate."""
  if not np.all(np.isfinite(lv)):
    return float("nan")
  enh = np.maximum(lv - lv[:N_BASELINE].mean(), 0.0)
  uptake = np.concatenate([[0.0], np.cumsum(0.5 * (enh[1:] + enh[:-1]) * np.diff(times))])
  uptake = uptake - uptake.mean()
  norm = np.linalg.norm(uptake)
  if norm == 0:
    return float("nan")
  rough = log_g - proj @ log_g
  dof = len(log_g) - TREND_ORDER - 1
  scatter = max(float(np.sqrt(np.sum(rough ** 2) / dof)), 1e-4)
  return float(uptake @ (log_g - log_g.mean()) / norm / scatter)
