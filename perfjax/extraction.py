"""AIF and tissue curves of one slice from its images (paper II-D; CONVENTIONS.md, "Perfusion").

:func:`extract_curves`: the AIF is the mean of the eroded LV blood pool's pure blood pixels
(:func:`blood_purity`), tissue curves are the mean myocardium signal of each of the 48 sectors
(24 angular x 2 radial, interior pixels); both baseline-subtracted over the pre-contrast frames.
With the sequence's parameters, saturation-recovery signal is converted to contrast-agent
concentration first (:func:`signal_to_concentration`, per pixel for the blood), which removes
the bias of a saturated blood signal; :func:`aif_amplification` says how close to saturation
an AIF was. :func:`aif_from_series` reads the AIF from a separate AIF series (dual sequence or
dual bolus). `perfjax.perfusion` runs this for many slices and fits the curves.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax import physics
from perfjax import sectors as sectors_lib
from perfjax.bolus import baseline_frames, check_curve, first_pass_window, foot_and_peak
from perfjax.errors import InputError
from perfjax.neighbours import neighbour_sum

SEQUENCE_KEYS = ("protocol", "ts", "tr", "flip_deg", "n_pulses", "t1_blood", "t2_blood",
                 "t1_myo", "t2_myo")


def signal_to_concentration(signal, n_baseline: int, sequence: dict, tissue: str) -> np.ndarray:
  """Saturation-recovery signal curves [..., T] -> contrast-agent concentration (mM).

  M0 (times coil gain) comes from the mean of the first ``n_baseline`` frames, then the
  signal equation of perfjax.physics (SR-FLASH or SR-bSSFP, with the sequence's timing) is
  inverted. ``tissue`` is "blood" or "myo" (native T1/T2 from ``sequence``). Signal below
  the baseline (noise) maps to negative concentration by odd reflection about the baseline,
  so baseline noise stays zero-mean instead of being clipped to 0. Curves with NaN/Inf or a
  non-positive baseline give NaN rows (never raises for them).
  """
  if tissue not in ("blood", "myo"):
    raise InputError("tissue", f"must be 'blood' or 'myo', got {tissue!r}")
  _check_sequence(sequence)
  sig = np.asarray(signal, np.float64)
  if sig.ndim == 0 or sig.shape[-1] < 2:
    raise InputError("signal", f"expected [..., T] curves, got shape {sig.shape}")
  b = int(n_baseline)
  if not 1 <= b <= sig.shape[-1]:
    raise InputError("n_baseline", f"must be in [1, {sig.shape[-1]}], got {n_baseline}")
  flat = sig.reshape(-1, sig.shape[-1])
  return _convert(flat, flat[:, :b].mean(axis=1), sequence, tissue).reshape(sig.shape)


def _check_sequence(sequence: dict) -> None:
  missing = [k for k in SEQUENCE_KEYS if k not in sequence]
  if missing:
    raise InputError("sequence", f"missing keys {missing}")


def _convert(flat, base, sequence, tissue):
  """[P, T] signal with pre-contrast level ``base`` [P] -> concentration (odd reflection)."""
  good = np.all(np.isfinite(flat), axis=1) & (base > 0)
  out = np.full(flat.shape, np.nan)
  if good.any():
    s, s0 = flat[good], base[good][:, None]
    mirrored = np.where(s >= s0, s, 2.0 * s0 - s)
    t1, t2 = (sequence["t1_blood"], sequence["t2_blood"]) if tissue == "blood" else \
        (sequence["t1_myo"], sequence["t2_myo"])
    conc = physics.concentration_from_signal(
        mirrored, base[good], sequence["protocol"], sequence["ts"], sequence["tr"],
        sequence["flip_deg"], sequence["n_pulses"], t1, t2,
        sat_residual=sequence.get("sat_residual", 0.0))
    out[good] = np.where(s >= s0, conc, -conc)
  return out


def _eroded_lv(mask: np.ndarray, erosion: int) -> np.ndarray:
  lv = mask == sectors_lib.LV
  for it in range(int(erosion), 0, -1):
    er = ndimage.binary_erosion(lv, iterations=it)
    if er.sum() >= 4:
      return er
  return lv


def _interior_sectors(sector_map, mask, n_sec):
  """sector_map without myocardium pixels whose 3 x 3 neighbourhood holds another label."""
  myo = mask == sectors_lib.MYO
  inner = ndimage.binary_erosion(myo, structure=np.ones((3, 3), bool))
  out = np.where(inner, sector_map, 0)
  have = np.bincount(out.ravel(), minlength=n_sec + 1)
  empty = have == 0
  empty[0] = False
  keep_all = empty[np.clip(sector_map, 0, n_sec)]
  return np.where(keep_all, sector_map, out).astype(np.int32)


# An AIF whose peak concentration grows by more than this many % per 1 % of blood signal is
# reported as near saturation (predict's aif_note): a per-cent of signal error (noise, M0,
# flip angle, T1) is then many per cent of the AIF's peak, and of MBF (benchmarks/RESULTS.md).
AIF_MAX_AMPLIFICATION = 5.0


def aif_amplification(signal_peak: float, base: float, sequence: dict, eps: float = 0.01
                      ) -> float:
  """d ln C / d ln S of the blood's signal-to-concentration conversion at the AIF's peak.

  ``signal_peak`` is the blood's signal at the AIF's peak frame and ``base`` its pre-contrast
  level (both after the Rician correction); the slope is taken numerically over +``eps``.
  About 1 far from saturation; it grows without bound as the signal nears the most the
  sequence can give (issue 13's cause 1), and is inf where the peak is at or beyond what the
  signal equation reaches (its rising branch, `physics.concentration_from_signal`) within
  ``eps``: the peak concentration is then not determined by the signal. NaN for a non-finite
  or non-positive input.
  """
  if not (np.isfinite(signal_peak) and np.isfinite(base) and signal_peak > base > 0):
    return float("nan")
  c_peak, c_up, c_top = _convert(
      np.array([[signal_peak, signal_peak * (1.0 + eps), 1e6 * signal_peak]]),
      np.array([base]), sequence, "blood")[0]
  if not (np.isfinite(c_peak) and c_peak > 0):
    return float("nan")
  if c_up >= c_top or c_up <= c_peak:
    return float("inf")
  return float(np.log(c_up / c_peak) / np.log1p(eps))


def amplification_at_peak(aif, signal, base: float, sequence: dict) -> float:
  """:func:`aif_amplification` of ``signal`` [T] at the AIF's peak frame (NaN without one)."""
  if not np.isfinite(aif).any():
    return float("nan")
  return aif_amplification(float(signal[int(np.nanargmax(aif))]), base, sequence)


AIF_PURITY = 0.9  # the blood-purity rule's fraction (see blood_purity)
MIN_POOL_NEIGHBOURS = 3  # pool neighbours a pixel needs for its neighbours to judge it
OWN_FLOOR = 0.5  # a pixel whose own enhancement is below this x the reference is never blood
POOL_NOT_FINITE = "NaN or Inf in the LV blood pool signal"


def blood_purity(curves, purity: float = AIF_PURITY, foot_frac: float = 0.1,
                 pool=None) -> np.ndarray:
  """Blood-purity rule on a pool's pixel curves [P, T] -> bool [P] (the pure blood pixels).

  A pixel's enhancement is its value at the pool's peak frame (the argmax of the pool's mean
  curve) minus its mean over the pre-contrast frames (:func:`baseline_frames` of the mean
  curve). A pixel with a fraction f of blood and 1 - f of myocardium or papillary muscle
  enhances about f x as much (linear mixing of signal or of concentration), so a bar at
  ``purity`` (0.9) x the 90th percentile of the pool keeps pixels with at most ~10 % of other
  tissue; the 90th percentile, not the maximum, keeps one noisy pixel from setting the bar.

  With ``pool`` (bool [H, W], True at the curves' pixels in row-major order) the bar is put to
  each pixel's neighbours' enhancement (their mean over its 8 neighbours in the pool, itself
  left out; pixels with at least ``MIN_POOL_NEIGHBOURS``), and its own enhancement need only
  pass ``OWN_FLOOR`` x the pool's 90th percentile (a papillary pixel amid blood). Chosen by
  their own values, the kept pixels are those whose noise went the rule's way, at the peak and
  in the baseline that sets each pixel's M0; near saturation that noise is many times larger
  in concentration, and the AIF's peak came out +50 % high on the phantom's slices
  (benchmarks/RESULTS.md). A pixel with some tissue amid pure blood can pass by its neighbours,
  so the pool should be one whose boundary was eroded away (`curve_geometry`'s). Without
  ``pool`` (an AIF series: a small, coarse pool, not eroded, far from saturation), or when
  fewer than 4 pixels have enough neighbours, the bar is put to the pixel's own enhancement.
  All pixels are kept when fewer than 4 pass. Pass concentration when the sequence is known
  (per-pixel conversion), else signal.
  """
  c = np.asarray(curves, np.float64)
  curve = np.nanmean(c, axis=0)
  if c.shape[0] < 4 or not np.all(np.isfinite(curve)):
    return np.ones(c.shape[0], bool)
  foot, peak, _ = foot_and_peak(curve, foot_frac)
  b = max(foot, 1)
  enh = c[:, peak] - c[:, :b].mean(axis=1)
  own = np.nan_to_num(enh, nan=-np.inf)
  ref = np.nanpercentile(enh, 90)
  keep, bar = own >= purity * ref, ref
  near = _neighbour_enhancement(enh, pool)
  if near is not None and np.isfinite(near).sum() >= 4:
    bar = np.percentile(near[np.isfinite(near)], 90)
    keep = (np.nan_to_num(near, nan=-np.inf) >= purity * bar) & (own >= OWN_FLOOR * ref)
  return keep if keep.sum() >= 4 and ref > 0 and bar > 0 else np.ones(c.shape[0], bool)


def _neighbour_enhancement(enh, pool):
  """[P] the mean enhancement of each pool pixel's pool neighbours (NaN for fewer than
  MIN_POOL_NEIGHBOURS with a finite one); None without ``pool``."""
  if pool is None:
    return None
  pool = np.asarray(pool, bool)
  if pool.ndim != 2 or pool.sum() != enh.size:
    raise InputError("pool", f"expected [H, W] with {enh.size} pixels set, got shape "
                     f"{pool.shape} with {int(pool.sum())}")
  grid = np.zeros(pool.shape + (2,))  # (valid, enhancement) of each pool pixel
  grid[pool] = np.stack([np.isfinite(enh), np.nan_to_num(enh)], axis=-1)
  count, total = neighbour_sum(grid)[pool].T
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = total / count
  return np.where(count >= MIN_POOL_NEIGHBOURS, mean, np.nan)


def aif_from_series(image, pd, sequence: dict, pool=None, *, purity: float = AIF_PURITY,
                    dose_ratio: float = 1.0, foot_frac: float = 0.1) -> dict:
  """AIF (mM) of a separate AIF series (dual-sequence or dual-bolus acquisition).

  Each pixel is converted to concentration on its own, with M0 from the proton-density frame
  ``pd`` [h, w] (``S = M0 x S_unit(C)``, ``S_unit`` the sequence's signal at M0 = 1), or from
  its pre-contrast frames when ``pd`` is None; pure blood pixels are chosen by the purity rule
  (:func:`blood_purity`) inside ``pool`` (default: the 8-connected region of pixels above
  half of the series' brightest enhancement that holds the brightest pixel); the AIF is their
  mean times ``dose_ratio`` (dual bolus: main / pre-bolus dose). Baseline-subtracted.
  Returns dict(aif [T], n_pixels, pixels bool [h, w], n_baseline, amplification: the
  conversion's :func:`aif_amplification` at the AIF's peak).
  """
  img = np.asarray(image, np.float64)
  h, w, t = img.shape
  enh0 = img.max(axis=-1) - img[..., :2].mean(axis=-1)
  if pool is None:
    lab, _ = ndimage.label(enh0 >= 0.5 * enh0.max(), structure=np.ones((3, 3), bool))
    pool = lab == lab.flat[int(np.argmax(enh0))]
  pool = np.asarray(pool, bool)
  in_pool = img[pool]  # [P, T]: only the pool's pixels are converted
  b = baseline_frames(in_pool.mean(axis=0), foot_frac)
  if pd is not None:
    s0 = physics.signal_from_concentration(0.0, sequence["protocol"], sequence["ts"],
                                           sequence["tr"], sequence["flip_deg"],
                                           sequence["n_pulses"], sequence["t1_blood"],
                                           sequence["t2_blood"])
    s_pd = physics.signal_from_concentration(0.0, sequence["protocol"], np.inf, sequence["tr"],
                                             sequence["flip_deg"], sequence["n_pulses"],
                                             sequence["t1_blood"], sequence["t2_blood"])
    base = np.maximum(np.asarray(pd, np.float64)[pool] * s0 / s_pd, 1e-12)
    conc = _convert(in_pool, base, sequence, "blood")
  else:
    conc = signal_to_concentration(in_pool, b, sequence, "blood")
  pure = blood_purity(conc, purity, foot_frac)
  pix = np.zeros((h, w), bool)
  pix[pool] = pure
  aif = np.nanmean(conc[pure], axis=0) * float(dose_ratio)
  aif = aif - aif[:b].mean()
  base_px = base[pure] if pd is not None else in_pool[pure][:, :b].mean(axis=1)
  amp = amplification_at_peak(aif, in_pool[pure].mean(axis=0), float(np.mean(base_px)),
                               sequence)
  return dict(aif=aif, n_pixels=int(pix.sum()), pixels=pix, n_baseline=b, amplification=amp)


def extract_curves(raw, mask, times, sector_map=None, *, theta_s: float | None = None,
                   center=None, erosion: int = 2, n_angular: int = 24, n_radial: int = 2,
                   sequence: dict | None = None, foot_frac: float = 0.1,
                   blood_frac: float = AIF_PURITY, myo_border: bool = True,
                   rician: bool | None = None) -> dict:
  """AIF and sector tissue curves of one slice, baseline-subtracted, ready for fit_fermi.

  Args:
    raw: [H, W, T] signal (not min-max normalised: the ratio tissue/AIF carries the units).
    mask: int [H, W] (0 bg, 1 myo, 2 LV, 3 RV): ground truth or predicted.
    times: [T] frame times (s).
    sector_map: int [H, W] 1..K sectors; default perfjax.sectors.sector_map(mask, n_angular,
      n_radial, theta_s, center) (pass the ground truth's theta_s/center to divide a
      predicted mask with the same geometry).
    erosion: iterations of binary erosion of the LV blood pool for the AIF (keeps partial
      volume with the myocardium out; reduced automatically if the pool would vanish).
    blood_frac: the purity of :func:`blood_purity`: papillary muscles, trabeculae and
      partial-volume pixels of the eroded pool are left out of the AIF. With a sequence,
      each pool pixel is converted to concentration before the rule and the averaging.
    myo_border: leave out of the tissue curves the myocardium pixels that touch another
      label (3 x 3 neighbourhood): their partial volume with the bright blood pool biases
      endocardial MBF upwards. A sector without interior pixels keeps all of its pixels.
    rician: correct the magnitude-noise floor (default: when converting to concentration).
      Magnitude noise lifts the low pre-contrast SR signal (E[M] ~ sqrt(A^2 + sigma^2) at
      SNR > 2) and so M0; near blood saturation a 2-3 % larger M0 lowers the AIF peak
      concentration by 10-15 %. A region's mean curve m becomes sqrt(m^2 - sigma^2), with
      sigma^2 the median over the AIF's blood pixels of their variance over the baseline.
    sequence: if given (see :func:`sequence_from_record`), signals are converted to
      concentration (mM) by :func:`signal_to_concentration` before baseline subtraction.

  Returns:
    dict: aif [T], curves [K, T] (NaN rows for empty sectors), signal_curves [K, T] (the
    sector means before conversion), blood_signal [T] (the AIF's pixels' mean signal,
    baseline-subtracted, never converted: the regressor of spill-over), counts [K] (pixels),
    n_baseline (pre-contrast frames, :func:`baseline_frames` on the AIF), window [T]
    (:func:`first_pass_window`), sector_map [H, W], units ("mM" or "signal"), n_aif_pixels,
    aif_amplification (:func:`aif_amplification` of the pool's blood signal at the AIF's peak;
    NaN without a sequence).
  """
  raw = np.asarray(raw, np.float64)
  mask = np.asarray(mask)
  if raw.ndim != 3:
    raise InputError("raw", f"expected [H, W, T], got shape {raw.shape}")
  if mask.shape != raw.shape[:2]:
    raise InputError("mask", f"shape {mask.shape} does not match raw {raw.shape[:2]}")
  times = check_curve(times, "times")
  if times.size != raw.shape[2]:
    raise InputError("times", f"{times.size} times for {raw.shape[2]} frames")
  geometry = curve_geometry(mask, sector_map, theta_s=theta_s, center=center, erosion=erosion,
                             n_angular=n_angular, n_radial=n_radial, myo_border=myo_border)
  return curves_per_sequence(raw, geometry, [sequence], foot_frac=foot_frac,
                              blood_frac=blood_frac, rician=rician)[0]


def curve_geometry(mask, sector_map=None, *, theta_s=None, center=None, erosion: int = 2,
                    n_angular: int = 24, n_radial: int = 2, myo_border: bool = True) -> dict:
  """What :func:`extract_curves` takes from the mask alone: the sector maps (all of the
  myocardium, and the interior pixels the tissue curves average), the eroded LV pool of the
  AIF, and the pixel counts. Computed once per slice, whatever the signal conversions."""
  if sector_map is None:
    sector_map = sectors_lib.sector_map(mask, n_angular, n_radial, theta_s=theta_s,
                                        center=center)
  sector_map = np.asarray(sector_map)
  n_sec = n_angular * n_radial
  lv = _eroded_lv(mask, erosion)
  if not lv.any():
    raise InputError("mask", "no LV blood pool (label 2): no AIF")
  tissue_map = _interior_sectors(sector_map, mask, n_sec) if myo_border else sector_map
  counts = np.bincount(tissue_map.ravel(), minlength=n_sec + 1)[1:n_sec + 1]
  return dict(sector_map=sector_map, tissue_map=tissue_map, lv=lv, n_sec=n_sec, counts=counts)


def conversion_table(sequence: dict, tissue: str) -> tuple[np.ndarray, np.ndarray]:
  """The (signal at M0 = 1, concentration) table of :func:`signal_to_concentration` for
  ``tissue`` ("blood" or "myo") under ``sequence`` (`physics.inverse_table`)."""
  _check_sequence(sequence)
  t1, t2 = (sequence["t1_blood"], sequence["t2_blood"]) if tissue == "blood" else \
      (sequence["t1_myo"], sequence["t2_myo"])
  return physics.inverse_table(sequence["protocol"], sequence["ts"], sequence["tr"],
                               sequence["flip_deg"], sequence["n_pulses"], t1, t2,
                               sat_residual=sequence.get("sat_residual", 0.0))


def curves_per_sequence(raw, geometry: dict, sequences: list, *, foot_frac: float,
                         blood_frac: float, rician: bool | None) -> list[dict]:
  """:func:`extract_curves`' outputs for each of ``sequences`` (a sequence dict or None), from
  one pass over the signal: the pool's pixels, baseline, noise floor and sector means are
  read once; only the conversions and the purity rule (on concentration) are per sequence."""
  pool = raw[geometry["lv"]]  # [P, T] the eroded pool's pixels (signal)
  if not np.all(np.isfinite(pool)):
    raise InputError("raw", POOL_NOT_FINITE)
  convert = any(s is not None for s in sequences)
  if rician is None:
    rician = convert
  b = baseline_frames(pool.mean(axis=0), foot_frac)
  sigma2 = 0.0
  if rician and b >= 2:
    # median over the pool's pixels, which are flat before the LV bolus (myocardium pixels
    # can already pick up the RV bolus through partial volume)
    sigma2 = float(np.median(np.var(pool[:, :b], axis=1, ddof=1)))
  floor = (lambda x: np.sqrt(np.maximum(x ** 2 - sigma2, 0.0))) if sigma2 > 0 else (
      lambda x: x)
  pool_signal = floor(pool) if convert else pool  # per pixel, before any conversion
  sector_signal = floor(sectors_lib.sector_means(raw, geometry["tissue_map"], geometry["n_sec"]))
  out = []
  for sequence in sequences:
    if sequence is None:
      px = pool
    else:  # per pixel, before averaging (the inverse is non-linear)
      px = signal_to_concentration(pool_signal, b, sequence, "blood")
    pure = blood_purity(px, blood_frac, foot_frac, pool=geometry["lv"])
    blood = floor(pool[pure].mean(axis=0))  # the pool's signal: what partial volume adds
    aif = np.nanmean(px[pure], axis=0)
    if sequence is None:  # signal: the floor of the pool's mean curve
      aif = floor(aif)
    curves = sector_signal
    if sequence is not None:
      curves = signal_to_concentration(curves, b, sequence, "myo")
    aif = aif - aif[:b].mean()
    curves = curves - curves[:, :b].mean(axis=1, keepdims=True)
    amp = float("nan")
    if sequence is not None:
      blood_px = pool_signal[pure].mean(axis=0)
      amp = amplification_at_peak(aif, blood_px, float(blood_px[:b].mean()), sequence)
    out.append(dict(aif=aif, curves=curves, counts=geometry["counts"], n_baseline=b,
                    n_aif_pixels=int(pure.sum()), aif_amplification=amp,
                    blood_signal=blood - blood[:b].mean(), signal_curves=sector_signal,
                    window=first_pass_window(aif, foot_frac),
                    sector_map=geometry["sector_map"],
                    units="signal" if sequence is None else "mM"))
  return out
