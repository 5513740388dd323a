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
percentile of the region (lung, air and zero-filled borders carry no gain), with at least
``MIN_BODY_NEIGHBOURS`` of their 8 neighbours body pixels too. A pixel's enhancement is the
largest excursion of a low-order polynomial in time fitted to the log signal of its body
neighbours (their mean, the pixel itself left out) once the current g_t is divided out; the
``FLAT_FRACTION`` with the smallest one (fat, non-enhancing soft tissue) set g_t, and the choice
is refined ``N_ROUNDS`` times, starting from a smooth-residual estimate. The neighbours choose
and the pixel's own signal enters the median: chosen by their own noisy curves, the flattest
pixels would be those whose noise happens to follow the current estimate, and the estimate
would keep much of its starting point (on the wide phantom, 16-22 % of the true gain's slow
part was lost so, and with it most of the FLASH tail: benchmarks/RESULTS.md, issue 13). Only
relative gains matter (each curve is read against its own baseline), so g is scaled to a
geometric mean of 1.

Where all the tissue around the heart enhances, its least enhancing pixels still rise with the
contrast, and that rise would be divided out of the myocardium as if it were gain (on the
narrow phantom: a bias of -18 %). So a g_t whose slow part follows the contrast uptake (the
running integral of the LV blood's enhancement) by more than ``UPTAKE_Z_MAX`` times its own
frame-to-frame scatter is not applied as it is. Its uptake is regressed out first: log g_t is
fitted with a constant and the LV blood's enhancement low-passed with the time constants
``UPTAKE_TAUS_S`` (how tissue outside the heart takes up contrast), and the residual is the gain.
That costs the part of the true gain that looks like those templates (2 of the frames' degrees of
freedom). The residual is kept only when it is a gain and not a misfit of the uptake or noise: its
sd at least ``MIN_RESIDUAL_SNR`` times the noise of the median (:func:`median_noise`), and its
whiteness (the sd of its first differences over sqrt(2), over its sd: about 1 for a gain that
jumps from frame to frame, small for a smooth misfit) at least ``MIN_WHITENESS``.

Last, a gain must be one the heart shares. A receiver or saturation gain multiplies the
myocardium too, so its frame-to-frame part (:func:`rough_part`) shows in the common
frame-to-frame part of the myocardium's log curves (their median over its pixels,
:func:`heart_rough`). The slope of the latter on the former is about 1 for a gain and about 0
for a change of the tissue outside the heart alone (breathing moves it; on the real development
set, dividing such a "gain" out made the myocardium's curves rougher on most slices). Dividing
it out makes the heart's curves smoother only where that slope exceeds 1/2
(``MIN_HEART_SLOPE``), so a gain is applied only there. Otherwise no gain is applied and the
reason says why.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

from perfjax import conventions
from perfjax.errors import InputError
from perfjax.neighbours import neighbour_mean, neighbour_sum

HEART_MARGIN_PX = 6
BODY_LEVEL = 0.05
FLAT_FRACTION = 0.1
MIN_BODY_NEIGHBOURS = 4  # of a body pixel's 8 neighbours, body pixels too
UPTAKE_Z_MAX = 3.0
MIN_BODY_PIXELS = 100
N_BASELINE = 3  # frames each pixel is compared with (before any arrival that matters here)
TREND_ORDER = 4  # degree of the per-pixel polynomial trend
N_ROUNDS = 3
UPTAKE_TAUS_S = (2.0, 15.0)  # time constants (s) of the uptake templates regressed out
MIN_RESIDUAL_SNR = 3.0  # the residual's sd over the noise of the flat pixels' median
MIN_WHITENESS = 0.7
NOISE_FLOOR = 1e-4  # of log gain: the noise taken where none is measured (noise-free images),
# and the frame-to-frame sd under which a gain is taken as 1 (no heart agreement asked)
TEMPLATE_DT_S = 0.05  # the grid the templates are low-passed on
MIN_HEART_SLOPE = 0.5
ROUGH_WINDOW = 5  # frames of the local quadratic that rough_part removes


def trend_basis(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(basis [T, K], fit [K, T]): polynomials of degree TREND_ORDER in time and the
  least-squares map from a curve to their coefficients."""
  x = (times - times[0]) / max(times[-1] - times[0], 1e-12) * 2.0 - 1.0
  basis = np.polynomial.legendre.legvander(x, TREND_ORDER)
  return basis, np.linalg.pinv(basis)


def trend_projection(times: np.ndarray) -> np.ndarray:
  """[T, T] least-squares projection onto polynomials of degree TREND_ORDER in time."""
  basis, fit = trend_basis(times)
  return basis @ fit


def frame_gain(raw_hwt, mask_hw, times) -> dict:
  """Per-frame gain [T] of one slice (geometric mean 1), from its non-enhancing tissue.

  Args:
    raw_hwt: [H, W, T] signal (not min-max normalised); mask_hw: int [H, W], > 0 on the heart
      (ground truth or predicted); times: [T] frame times (s).

  Returns:
    dict(gain [T] (ones when it cannot be measured), n_pixels (the pixels that set it),
    reason: "" when measured, else why not, uptake_removed: whether the gain is what is left
    once the uptake of the tissue it was measured on is regressed out).
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
  bright = region & (base > BODY_LEVEL * np.percentile(base[region], 90))
  body = bright & (neighbour_sum(bright[..., None].astype(np.float64))[..., 0]
                   >= MIN_BODY_NEIGHBOURS)
  if body.sum() < MIN_BODY_PIXELS:
    return verdict(n_t, n_region=int(region.sum()), n_body=int(body.sum()))
  log_bright = np.log(np.maximum(raw[bright], 1e-12))
  log_px = log_bright[body[bright]]  # [P, T]
  log_rel = log_px - log_px[:, :N_BASELINE].mean(axis=1, keepdims=True)
  basis, fit = trend_basis(times)
  proj = basis @ fit
  rough = np.eye(n_t) - proj
  # Start: the common part of what no smooth trend explains, median over pixels of
  # (log_px - log_g) @ rough.T each round. log_g is the same for every pixel, so that median is
  # the pixels' median of log_px @ rough.T (computed once) minus log_g @ rough.T.
  median_rough = np.median(log_px @ rough.T, axis=0)
  log_g = np.zeros(n_t)
  for _ in range(N_ROUNDS):
    log_g = log_g + median_rough - log_g @ rough.T
  # The same split for the trend of each pixel's neighbours once log_g is divided out, about
  # the first frames (the trend is linear in a curve: the neighbours' mean of its coefficients).
  coef = np.zeros(bright.shape + (basis.shape[1],))
  coef[bright] = log_bright @ fit.T
  trend = neighbour_mean(coef, bright)[body] @ basis.T
  trend -= trend[:, :N_BASELINE].mean(axis=1, keepdims=True)
  for _ in range(N_ROUNDS):
    shift = log_g @ proj.T
    excursion = np.abs(trend - (shift - shift[:N_BASELINE].mean())).max(axis=1)
    flat = excursion <= np.quantile(excursion, FLAT_FRACTION)
    log_g = np.median(log_rel[flat], axis=0)
  lv = lv_curve(raw[mask == conventions.LV_BLOOD_POOL])
  z = uptake_z(log_g, lv, times, proj)
  even = np.arange(len(flat)) % 2 == 0  # alternate body pixels
  noise = median_noise(np.median(log_rel[flat & even], axis=0),
                       np.median(log_rel[flat & ~even], axis=0))
  return verdict(n_t, int(region.sum()), int(body.sum()), int(flat.sum()), z, log_g, lv, times,
                 noise, heart_rough(raw[mask == conventions.MYOCARDIUM]))


def rough_matrix(n_frames: int) -> np.ndarray:
  """[T, T] the linear map of :func:`rough_part`: a curve less its local quadratic fit over
  ``ROUGH_WINDOW`` frames (Savitzky-Golay; polynomial fits at the ends)."""
  eye = np.eye(n_frames)
  return eye - signal.savgol_filter(eye, ROUGH_WINDOW, 2, axis=0)


def rough_part(curve) -> np.ndarray:
  """[..., T] the frame-to-frame part of curves: what a local quadratic does not follow."""
  curve = np.asarray(curve, np.float64)
  return curve @ rough_matrix(curve.shape[-1]).T


def heart_rough(myo_pixels) -> np.ndarray:
  """[T] the myocardium's common frame-to-frame part: the median over its pixels [P, T] (those
  finite in every frame) of :func:`rough_part` of their log signal; NaN without such pixels."""
  pixels = np.asarray(myo_pixels, np.float64)
  pixels = pixels[np.all(np.isfinite(pixels), axis=1)]
  if pixels.shape[0] == 0:
    return np.full(np.shape(myo_pixels)[1], np.nan)
  return np.median(rough_part(np.log(np.maximum(pixels, 1e-12))), axis=0)


def heart_slope(log_g, heart) -> float:
  """The slope of the heart's common frame-to-frame part ``heart`` [T] on that of log g [T]
  (about 1 for a gain the heart shares, 0 for one it does not); NaN when either is missing."""
  g = rough_part(log_g)
  denom = float(g @ g)
  if not np.all(np.isfinite(heart)) or denom <= 0:
    return float("nan")
  return float(heart @ g / denom)


def median_noise(log_g_even, log_g_odd) -> float:
  """The sd of the noise in the flat pixels' median [T], from the medians of their two halves
  (alternate pixels): a gain is common to both and cancels in their difference, whose sd is
  twice the whole median's noise (each half's median has sqrt(2) times its sd)."""
  diff = np.asarray(log_g_even, np.float64) - np.asarray(log_g_odd, np.float64)
  return float(np.std(diff) / 2.0)


def verdict(n_frames: int, n_region: int = 0, n_body: int = 0, n_flat: int = 0,
            z: float = float("nan"), log_g=None, lv=None, times=None,
            noise: float = float("nan"), heart=None) -> dict:
  """:func:`frame_gain`'s outcome from what it measured, checked in its order: the frame count,
  the pixels outside the heart (``n_region``), the body pixels among them, the uptake test's
  ``z``, then (z above its limit) the gain with its uptake regressed out; ``log_g`` [T] is the
  measured log gain, ``lv`` [T] the LV blood's mean curve, ``times`` [T] the frame times,
  ``noise`` the sd of log g's noise (:func:`median_noise`), ``heart`` [T] the myocardium's
  common frame-to-frame part (:func:`heart_rough`); last, the heart's agreement
  (:func:`heart_slope`).
  Shared with `perfjax.batched_curves`. ``uptake_removed`` says whether the applied gain is the
  residual of that regression."""
  ones = np.ones(n_frames)

  def refused(n_pixels, reason):
    return dict(gain=ones, n_pixels=n_pixels, reason=reason, uptake_removed=False)
  if n_frames <= TREND_ORDER + N_BASELINE:
    return refused(0, f"too few frames ({n_frames})")
  if n_region < MIN_BODY_PIXELS:
    return refused(0, "too little image outside the heart")
  if n_body < MIN_BODY_PIXELS:
    return refused(n_body, f"fewer than {MIN_BODY_PIXELS} body pixels outside the heart")
  if not np.isfinite(z):
    return refused(n_flat, "no LV blood pool curve to tell gain from enhancement")
  log_g = np.asarray(log_g, np.float64)
  uptake_removed = z > UPTAKE_Z_MAX
  if uptake_removed:
    log_g, sd, whiteness = without_uptake(log_g, lv, times)
    noise = float(np.fmax(noise, NOISE_FLOOR))
    if not (sd >= MIN_RESIDUAL_SNR * noise and whiteness >= MIN_WHITENESS):
      return refused(n_flat, f"the least enhancing tissue outside the heart follows the "
                             f"contrast uptake (z = {z:.1f}), and what is left without its "
                             f"uptake is not a gain (sd {100 * sd:.2f} %, {sd / noise:.1f} "
                             f"times its noise; whiteness {whiteness:.2f}): enhancement, not "
                             f"gain")
  heart = np.full(n_frames, np.nan) if heart is None else np.asarray(heart, np.float64)
  moves = np.std(rough_part(log_g)) > NOISE_FLOOR  # a gain of 1 needs no agreement
  if moves and not np.all(np.isfinite(heart)):
    return refused(n_flat, "no myocardium curve to check the gain against")
  slope = heart_slope(log_g, heart)
  if moves and not slope >= MIN_HEART_SLOPE:
    return refused(n_flat, f"the myocardium does not share the gain measured outside the heart "
                           f"(slope {slope:.2f} of its frame-to-frame part on the gain's): a "
                           f"change of that tissue alone, not a gain")
  return dict(gain=np.exp(log_g - log_g.mean()), n_pixels=n_flat, reason="",
              uptake_removed=bool(uptake_removed))


def uptake_templates(lv, times) -> np.ndarray:
  """[T, len(UPTAKE_TAUS_S)] the LV blood's enhancement (``lv`` [T] less its first frames)
  low-passed (first order, unit gain) with each of ``UPTAKE_TAUS_S``, at the frame ``times``."""
  enh = lv - lv[:N_BASELINE].mean()
  fine = np.arange(times[0], times[-1] + TEMPLATE_DT_S, TEMPLATE_DT_S)
  enh_fine = np.interp(fine, times, enh)
  cols = []
  for tau in UPTAKE_TAUS_S:
    a = np.exp(-TEMPLATE_DT_S / tau)
    cols.append(np.interp(times, fine, signal.lfilter([1.0 - a], [1.0, -a], enh_fine)))
  return np.stack(cols, axis=1)


def without_uptake(log_g, lv, times) -> tuple[np.ndarray, float, float]:
  """log g [T] less its fit by :func:`uptake_templates` (and a constant), with the residual's
  sd and whiteness. The LV curve carries the gain too, so it is divided by the current
  estimate and the fit repeated ``N_ROUNDS`` times."""
  times = np.asarray(times, np.float64)
  estimate = log_g
  for _ in range(N_ROUNDS):
    basis = np.column_stack([np.ones_like(times),
                             uptake_templates(lv / np.exp(estimate - estimate.mean()), times)])
    coef = np.linalg.lstsq(basis, log_g, rcond=None)[0]
    estimate = log_g - basis[:, 1:] @ coef[1:]
  residual = log_g - basis @ coef
  sd = float(np.sqrt(np.sum(residual ** 2) / (len(times) - basis.shape[1])))
  whiteness = float(np.std(np.diff(residual)) / np.sqrt(2.0) / max(sd, 1e-12))
  return estimate, sd, whiteness


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
