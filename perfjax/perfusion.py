"""Myocardial blood flow of segmented slices (paper II-D, III-C): curves, conversion, sectors.

Pipeline for one slice (CONVENTIONS.md, "Perfusion"):

1. :func:`extract_curves`: the AIF is the mean signal of the eroded LV blood pool, tissue
   curves are the mean myocardium signal of each of the 48 sectors (24 angular x 2 radial);
   both are baseline-subtracted over the pre-contrast frames (:func:`baseline_frames`).
   Optionally (:func:`signal_to_concentration`) saturation-recovery signal is converted to
   contrast-agent concentration first, which removes the bias of a saturated blood signal.
2. :func:`fit_fermi` (`perfjax.fermi`, re-exported here): Fermi-constrained deconvolution of
   all curves of a data set in one jitted, vmapped solve; MBF in ml/g/min.
3. :func:`slice_mbf` (mean of the 48 sectors) and :func:`aha16_mbf` (16-segment bullseye).

:func:`mbf_from_slices` runs 1-3 for many slices; :func:`mbf_of_masks` for several sets of masks
of one split in one solve.
"""
from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from perfjax import physics
from perfjax import sectors as sectors_lib
from perfjax.errors import InputError
from perfjax.frame_gain import frame_gain as measure_frame_gain
from perfjax.bolus import baseline_frames, check_curve, first_pass_window, foot_and_peak
from perfjax.fermi import fit_fermi
# fit_fermi's units and codes, part of the perfusion API (CONVENTIONS.md: perfusion.fit_fermi).
from perfjax.fermi import (  # noqa: F401  pylint: disable=unused-import
    FLAT_AIF, IMPLAUSIBLE, ML_G_MIN_PER_S, NO_ENHANCEMENT, NONFINITE, NOT_CONVERGED, OK,
    POOR_FIT, REASONS, SHORT_WINDOW, UNCERTAIN)

# ----------------------------------------------------------------------------- curves
SEQUENCE_KEYS = ("protocol", "ts", "tr", "flip_deg", "n_pulses", "t1_blood", "t2_blood",
                 "t1_myo", "t2_myo")


def sequence_from_record(record: dict, i: int) -> dict:
  """Sequence timing and native relaxation of slice ``i`` of a phantom/dataset record.

  Keys used: protocol, seq_ts, seq_tr, seq_flip_deg, seq_n_pulses, t1_blood_s, t2_blood_s,
  t1_myo_s, t2_myo_s and seq_sat_residual where present (else ideal saturation, 0; see
  perfjax.data.phantom.simulate); returns the dict that
  :func:`signal_to_concentration` and :func:`extract_curves` take.
  """
  try:
    return dict(protocol=str(record["protocol"][i]), ts=float(record["seq_ts"][i]),
                tr=float(record["seq_tr"][i]), flip_deg=float(record["seq_flip_deg"][i]),
                n_pulses=float(record["seq_n_pulses"][i]),
                t1_blood=float(record["t1_blood_s"][i]), t2_blood=float(record["t2_blood_s"][i]),
                t1_myo=float(record["t1_myo_s"][i]), t2_myo=float(record["t2_myo_s"][i]),
                sat_residual=float(record["seq_sat_residual"][i])
                if "seq_sat_residual" in record else 0.0)
  except KeyError as e:
    raise InputError("record", f"missing sequence key {e.args[0]!r}") from None


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
  missing = [k for k in SEQUENCE_KEYS if k not in sequence]
  if missing:
    raise InputError("sequence", f"missing keys {missing}")
  sig = np.asarray(signal, np.float64)
  if sig.ndim == 0 or sig.shape[-1] < 2:
    raise InputError("signal", f"expected [..., T] curves, got shape {sig.shape}")
  b = int(n_baseline)
  if not 1 <= b <= sig.shape[-1]:
    raise InputError("n_baseline", f"must be in [1, {sig.shape[-1]}], got {n_baseline}")
  flat = sig.reshape(-1, sig.shape[-1])
  return _convert(flat, flat[:, :b].mean(axis=1), sequence, tissue).reshape(sig.shape)


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


def _amplification_at_peak(aif, signal, base: float, sequence: dict) -> float:
  """:func:`aif_amplification` of ``signal`` [T] at the AIF's peak frame (NaN without one)."""
  if not np.isfinite(aif).any():
    return float("nan")
  return aif_amplification(float(signal[int(np.nanargmax(aif))]), base, sequence)


AIF_PURITY = 0.9  # blood-purity rule (see _blood_pixels)
MIN_AIF_PIXELS = 12  # a study AIF never comes from a pool with fewer pure blood pixels


def blood_purity(curves, purity: float = AIF_PURITY, foot_frac: float = 0.1) -> np.ndarray:
  """Blood-purity rule on a pool's pixel curves [P, T] -> bool [P] (the pure blood pixels).

  Rule: a pixel's enhancement is its value at the pool's peak frame (the argmax of the pool's
  mean curve) minus its mean over the pre-contrast frames (:func:`baseline_frames` of the
  mean curve); a pixel is blood when its enhancement is at least ``purity`` (0.9) x the 90th
  percentile of the pool's enhancements. A pixel with a fraction f of blood and 1 - f of
  myocardium or papillary muscle enhances about f x as much (linear mixing of signal or of
  concentration), so the rule keeps pixels with at most ~10 % of other tissue; the 90th
  percentile, not the maximum, keeps one noisy pixel from setting the bar. All pixels are
  kept when fewer than 4 pass. Pass concentration when the sequence is known (per-pixel
  conversion), else signal.
  """
  c = np.asarray(curves, np.float64)
  curve = np.nanmean(c, axis=0)
  if c.shape[0] < 4 or not np.all(np.isfinite(curve)):
    return np.ones(c.shape[0], bool)
  foot, peak, _ = foot_and_peak(curve, foot_frac)
  b = max(foot, 1)
  enh = c[:, peak] - c[:, :b].mean(axis=1)
  ref = np.nanpercentile(enh, 90)
  keep = np.nan_to_num(enh, nan=-np.inf) >= purity * ref
  return keep if keep.sum() >= 4 and ref > 0 else np.ones(c.shape[0], bool)


def aif_from_series(image, pd, sequence: dict, pool=None, *, purity: float = AIF_PURITY,
                    dose_ratio: float = 1.0, foot_frac: float = 0.1) -> dict:
  """AIF (mM) of a separate AIF series (dual-sequence or dual-bolus acquisition).

  Each pixel is converted to concentration on its own, with M0 from the proton-density frame
  ``pd`` [h, w] (``S = M0 x S_unit(C)``, ``S_unit`` the sequence's signal at M0 = 1), or from
  its pre-contrast frames when ``pd`` is None; pure blood pixels are chosen by the purity rule
  (:func:`_blood_pixels`) inside ``pool`` (default: the 8-connected region of pixels above
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
  b = baseline_frames(img[pool].mean(axis=0), foot_frac)
  flat = img.reshape(-1, t)
  if pd is not None:
    s0 = physics.signal_from_concentration(0.0, sequence["protocol"], sequence["ts"],
                                           sequence["tr"], sequence["flip_deg"],
                                           sequence["n_pulses"], sequence["t1_blood"],
                                           sequence["t2_blood"])
    s_pd = physics.signal_from_concentration(0.0, sequence["protocol"], np.inf, sequence["tr"],
                                             sequence["flip_deg"], sequence["n_pulses"],
                                             sequence["t1_blood"], sequence["t2_blood"])
    base = np.maximum(np.asarray(pd, np.float64).ravel() * s0 / s_pd, 1e-12)
    conc = _convert(flat, base, sequence, "blood")
  else:
    conc = signal_to_concentration(flat, b, sequence, "blood")
  conc = conc.reshape(h, w, t)
  pix = np.zeros((h, w), bool)
  pix[pool] = blood_purity(conc[pool], purity, foot_frac)
  aif = np.nanmean(conc[pix], axis=0) * float(dose_ratio)
  aif = aif - aif[:b].mean()
  base_px = base.reshape(h, w)[pix] if pd is not None else img[pix][:, :b].mean(axis=1)
  amp = _amplification_at_peak(aif, img[pix].mean(axis=0), float(np.mean(base_px)), sequence)
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
  geometry = _curve_geometry(mask, sector_map, theta_s=theta_s, center=center, erosion=erosion,
                             n_angular=n_angular, n_radial=n_radial, myo_border=myo_border)
  return _curves_per_sequence(raw, geometry, [sequence], foot_frac=foot_frac,
                              blood_frac=blood_frac, rician=rician)[0]


def _curve_geometry(mask, sector_map=None, *, theta_s=None, center=None, erosion: int = 2,
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


def _curves_per_sequence(raw, geometry: dict, sequences: list, *, foot_frac: float,
                         blood_frac: float, rician: bool | None) -> list[dict]:
  """:func:`extract_curves`' outputs for each of ``sequences`` (a sequence dict or None), from
  one pass over the signal: the pool's pixels, baseline, noise floor and sector means are
  read once; only the conversions and the purity rule (on concentration) are per sequence."""
  pool = raw[geometry["lv"]]  # [P, T] the eroded pool's pixels (signal)
  if not np.all(np.isfinite(pool)):
    raise InputError("raw", "NaN or Inf in the LV blood pool signal")
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
    pure = blood_purity(px, blood_frac, foot_frac)
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
      amp = _amplification_at_peak(aif, blood_px, float(blood_px[:b].mean()), sequence)
    out.append(dict(aif=aif, curves=curves, counts=geometry["counts"], n_baseline=b,
                    n_aif_pixels=int(pure.sum()), aif_amplification=amp,
                    blood_signal=blood - blood[:b].mean(), signal_curves=sector_signal,
                    window=first_pass_window(aif, foot_frac),
                    sector_map=geometry["sector_map"],
                    units="signal" if sequence is None else "mM"))
  return out


# ----------------------------------------------------------------------------- slice/study
FLIP_SENSITIVITY = 0.1  # MBF is also reported at the flip angle x (1 -/+ this)


def _with_flip(sequence, scale):
  return None if sequence is None else dict(sequence, flip_deg=sequence["flip_deg"] * scale)


def series_lead(times) -> float:
  """Default lead (s) of an AIF series over a slice: one beat (the median frame interval).

  The series and the slices are read out in the same beats at offsets the records do not
  carry; a slice read out after the series sees the bolus "earlier" on the shared frame
  clock, which a Fermi delay tau_d >= 0 cannot fit (MBF too high). Placing the series'
  samples one beat earlier makes every within-beat offset a delay >= 0 that tau_d absorbs
  (the figures: benchmarks/RESULTS.md, issue 13).
  """
  return float(np.median(np.diff(np.asarray(times, np.float64))))


def mbf_from_slices(raw, masks, times, *, sector_maps=None, theta_s=None, centers=None,
                    sequences=None, erosion: int = 2, study_ids=None, exclude=None,
                    aif_series=None, min_aif_pixels: int = MIN_AIF_PIXELS,
                    flip_sensitivity: float = FLIP_SENSITIVITY, frame_gain: bool = True,
                    spill_over: bool = True, **fit_kwargs) -> dict:
  """48-sector and slice MBF of N slices with ONE batched fit_fermi call (N x 48 curves).

  Args:
    raw: [N, H, W, T] signal; masks: [N, H, W]; times: [N, T].
    sector_maps: optional [N, H, W] 48-sector maps; theta_s / centers: optional per-slice
      geometry (e.g. the ground truth's, to divide predicted masks the same way).
    sequences: None (MBF from raw signal: RELATIVE flow, not ml/g/min) or a list of N
      sequence dicts (:func:`sequence_from_record`) to fit concentration instead.
    study_ids: optional [N]; when given, the slices of a study share one AIF (see aif_source).
    exclude: optional bool [N]: slices whose own AIF must not serve their study (a
      motion-correction failure, an OOD flag).
    aif_series: optional list of N dicts (or None entries) with the study's AIF series
      (image [h, w, T], pd [h, w] or None, sequence, dose_ratio, pool or None, optional
      lead_s: how much earlier in each beat it was read out than the slice;
      :func:`aif_from_series`); used, with per-pixel conversion, whenever present and
      ``sequences`` is given.
    min_aif_pixels: a slice AIF from fewer pure blood pixels never serves its study.
    flip_sensitivity: with sequences, MBF is also fitted with the flip angle of every
      conversion scaled by (1 -/+ flip_sensitivity) in the same solve (0 turns it off).
    frame_gain: divide each slice's frames by its per-frame gain, measured on its
      non-enhancing tissue outside the heart (perfjax.frame_gain), before the curves are
      extracted (the AIF series, its own acquisition, is left as it is).
    spill_over: fit each sector as ``AIF (x) h + v * blood`` with v >= 0, ``blood`` the
      slice's own LV pool signal (fermi.fit_fermi's ``spill``): the pool signal that partial
      volume puts into endocardial pixels is not read as flow.
    **fit_kwargs: passed to :func:`fit_fermi`.

  AIF choice (``aif_source`` [N], a reason per slice): "series" (the AIF series, read out
  at another moment of each beat than the slice: its samples are placed ``lead_s`` earlier,
  the series dict's own value when the offset is known, else :func:`series_lead`), else with
  study_ids the study's slice AIF of the most pure blood pixels among those not excluded and
  with >= min_aif_pixels ("study slice <i>: largest clean pool"), else the slice's own AIF
  ("own: <why no study AIF>").

  Returns:
    dict: mbf48 [N, 48] (ml/g/min with sequences, else relative), ok48, reason48, mbf_se48,
    spill48 [N, 48] (the fitted fraction of the pool's signal enhancement in each sector's
    curve, in curve units per signal unit; NaN without spill_over),
    slice_mbf [N], slice_mbf_flip_lo / _hi [N] (NaN without sequences), aif [N, T], curves
    [N, 48, T], counts [N, 48], n_aif_pixels [N], aif_source [N] (str), aif_amplification [N]
    (of the AIF used, :func:`aif_amplification`; NaN without sequences), units ("mM" or
    "signal"), frame_gain [N, T] (ones where not measured or not asked for),
    frame_gain_reason [N] (str, "" when measured), error [N] (str, "" when the slice's
    curves could be extracted; a slice with a degenerate mask gets NaN and its message, never
    an exception), timing (extract_s: frame gains, geometry, curves and AIFs; fit_s: the
    Fermi solve; n_fits: curves x flip-angle variants x models, with and without spill-over).
  """
  t_start = time.perf_counter()
  raw = np.asarray(raw)
  masks = np.asarray(masks)
  times = np.asarray(times, np.float64)
  if raw.ndim != 4 or masks.shape != raw.shape[:3] or times.shape != (raw.shape[0], raw.shape[3]):
    raise InputError("raw", f"expected raw [N,H,W,T], masks [N,H,W], times [N,T]; got "
                     f"{raw.shape}, {masks.shape}, {times.shape}")
  n, t = raw.shape[0], raw.shape[3]
  scales = (1.0,) if sequences is None or not flip_sensitivity else (
      1.0, 1.0 - flip_sensitivity, 1.0 + flip_sensitivity)
  n_v = len(scales)
  aifs = np.full((n_v, n, t), np.nan)
  curves = np.full((n_v, n, 48, t), np.nan)
  blood = np.full((n, t), np.nan)
  counts = np.zeros((n, 48), np.int64)
  n_px = np.zeros(n, np.int64)
  errors = [""] * n
  source = [""] * n
  amp = np.full(n, np.nan)
  gains = np.ones((n, t))
  gain_reason = ["not asked for"] * n
  for i in range(n):
    try:
      raw_i = raw[i]
      if frame_gain:
        fg = measure_frame_gain(raw_i, masks[i], times[i])
        gains[i], gain_reason[i] = fg["gain"], fg["reason"]
        raw_i = raw_i / fg["gain"]
      check_curve(times[i], "times")
      geometry = _curve_geometry(masks[i],
                                 None if sector_maps is None else sector_maps[i],
                                 theta_s=None if theta_s is None else theta_s[i],
                                 center=None if centers is None else centers[i],
                                 erosion=erosion)
      variants = _curves_per_sequence(
          np.asarray(raw_i, np.float64), geometry,
          [None if sequences is None else _with_flip(sequences[i], sc) for sc in scales],
          foot_frac=0.1, blood_frac=AIF_PURITY, rician=None)
      for v, ex in enumerate(variants):
        aifs[v, i], curves[v, i] = ex["aif"], ex["curves"]
      ex = variants[0]
      amp[i], blood[i] = ex["aif_amplification"], ex["blood_signal"]
    except InputError as e:
      errors[i] = str(e)
      continue
    counts[i], n_px[i] = ex["counts"], ex["n_aif_pixels"]
    source[i] = "own"
  bad = np.zeros(n, bool) if exclude is None else np.asarray(exclude, bool)
  if study_ids is not None:
    study_ids = np.asarray(study_ids)
    for sid in np.unique(study_ids):
      rows = np.nonzero(study_ids == sid)[0]
      idx = rows[(n_px[rows] >= min_aif_pixels) & ~bad[rows]]
      if idx.size:
        j = idx[np.argmax(n_px[idx])]
        aifs[:, rows] = aifs[:, j][:, None]
        amp[rows] = amp[j]
        for i in rows:
          source[i] = f"study slice {j}: largest clean pool ({n_px[j]} px)"
      else:
        for i in rows:
          if source[i]:
            source[i] = "own: no slice of the study has a clean pool of >= " \
                        f"{min_aif_pixels} px" + (" outside excluded slices" if bad[rows].any()
                                                  else "")
  lead = np.zeros(n)
  if aif_series is not None and sequences is not None:
    cache = {}
    for i in range(n):
      a = aif_series[i]
      if a is None or errors[i]:
        continue
      key = id(a)
      if key not in cache:
        cache[key] = [aif_from_series(a["image"], a.get("pd"), _with_flip(a["sequence"], sc),
                                      a.get("pool"), dose_ratio=a.get("dose_ratio", 1.0))
                      for sc in scales]
      for v in range(n_v):
        aifs[v, i] = cache[key][v]["aif"]
      amp[i] = cache[key][0]["amplification"]
      source[i] = "series"
      lead[i] = a.get("lead_s", series_lead(times[i]))
  t_fit = time.perf_counter()
  fit = fit_fermi(np.repeat(aifs.reshape(n_v * n, t), 48, axis=0),
                  curves.reshape(n_v * n * 48, t),
                  np.repeat(np.tile(times, (n_v, 1)), 48, axis=0),
                  aif_lead=np.repeat(np.tile(lead, n_v), 48),
                  spill=np.repeat(np.tile(blood, (n_v, 1)), 48, axis=0) if spill_over else None,
                  **fit_kwargs)
  mbf_all = fit["mbf"].reshape(n_v, n, 48)
  mbf48 = mbf_all[0]
  nan = np.full(n, np.nan)
  return dict(mbf48=mbf48, ok48=fit["ok"].reshape(n_v, n, 48)[0],
              reason48=fit["reason"].reshape(n_v, n, 48)[0],
              mbf_se48=fit["mbf_se"].reshape(n_v, n, 48)[0], slice_mbf=slice_mbf(mbf48),
              slice_mbf_flip_lo=slice_mbf(mbf_all[1]) if n_v > 1 else nan,
              slice_mbf_flip_hi=slice_mbf(mbf_all[2]) if n_v > 1 else nan,
              spill48=fit["spill"].reshape(n_v, n, 48)[0],
              aif=aifs[0], curves=curves[0], counts=counts, n_aif_pixels=n_px,
              aif_source=np.array(source), aif_amplification=amp,
              units="signal" if sequences is None else "mM",
              frame_gain=gains, frame_gain_reason=np.array(gain_reason), error=np.array(errors),
              timing=dict(extract_s=t_fit - t_start, fit_s=time.perf_counter() - t_fit,
                          n_fits=int(fit["mbf"].size * (2 if spill_over else 1))))


def slice_mbf(mbf48, min_valid: int = 1) -> np.ndarray:
  """Slice MBF: the mean of the valid (finite) sector values, [..., 48] -> [...].

  NaN where fewer than ``min_valid`` sectors have a value.
  """
  m = np.asarray(mbf48, np.float64)
  if m.ndim == 0 or m.shape[-1] == 0:
    raise InputError("mbf48", f"expected [..., K] sector values, got shape {m.shape}")
  valid = np.isfinite(m)
  n_valid = valid.sum(axis=-1)
  total = np.where(valid, m, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_valid >= max(min_valid, 1), total / n_valid, np.nan)


def aha6_from_48(values48, counts48=None) -> np.ndarray:
  """[..., 48] sector values -> [..., 6] AHA sectors (mean of each sector's 4 x 2 parts).

  48-sector index is ``(angular - 1) * 2 + radial`` with angular 1..24, so AHA sector k holds
  angular sub-sectors 4(k-1)+1..4k. Weighted by pixel ``counts48`` when given; NaN parts are
  skipped; NaN when none is left.
  """
  v = np.asarray(values48, np.float64)
  if v.shape[-1] != 48:
    raise InputError("values48", f"expected [..., 48], got shape {v.shape}")
  w = np.ones_like(v) if counts48 is None else np.broadcast_to(np.asarray(counts48, np.float64),
                                                               v.shape)
  ok = np.isfinite(v) & (w > 0)
  v6 = np.where(ok, v * w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  w6 = np.where(ok, w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(w6 > 0, v6 / w6, np.nan)


def aha16_mbf(mbf48_by_level: dict, counts48_by_level: dict | None = None) -> np.ndarray:
  """Study MBF per AHA segment [16] (index 0 = segment 1) from {level: [48] sector MBF}.

  Levels are 0/1/2 or "basal"/"mid"/"apical"; apical segments follow
  perfjax.sectors.aha16 (13 <- 1, 14 <- 2+3, 15 <- 4, 16 <- 5+6, weighted by pixel counts).
  """
  six, w6 = {}, {}
  for level, v48 in mbf48_by_level.items():
    c48 = None if counts48_by_level is None else counts48_by_level.get(level)
    six[level] = aha6_from_48(v48, c48)
    w6[level] = np.ones(6) if c48 is None else np.asarray(c48, np.float64).reshape(6, 8).sum(1)
  return sectors_lib.bullseye16(six, w6)


# ------------------------------------------------------------------ slices and masks -> MBF


def mbf_input_kind(config, split: dict) -> str:
  """eval.mbf_input: "concentration" (the paper's remedy for blood-signal saturation; needs the
  sequence timing, which the phantom records) or "signal" (raw signal, as the paper did).
  "auto" picks concentration when every slice carries its sequence parameters."""
  kind = config.eval.mbf_input
  if kind not in ("auto", "concentration", "signal"):
    raise InputError("eval.mbf_input", f"expected auto/concentration/signal, got {kind!r}")
  if kind != "auto":
    return kind
  known = all(k in split and np.isfinite(np.asarray(split[k], np.float64)).all()
              for k in ("seq_ts", "seq_tr", "seq_flip_deg", "seq_n_pulses", "t1_blood_s"))
  return "concentration" if known else "signal"


def aif_series_from_record(record: dict, i: int) -> dict | None:
  """Slice ``i``'s AIF series (perfjax.data.phantom fields aif_image, aif_pd, aif_seq_*,
  aif_dose_ratio, has_aif_series) as :func:`mbf_from_slices` takes it; None without one.

  A dual-sequence series (aif_dose_ratio 1) is SR-FLASH; a dual-bolus pre-bolus is imaged
  with the slice's own protocol. Blood T1/T2 are the slice's (nominal) ones.
  """
  if "aif_image" not in record or not bool(np.asarray(record.get("has_aif_series",
                                                                  [True] * (i + 1)))[i]):
    return None
  img = np.asarray(record["aif_image"][i], np.float64)
  if not np.all(np.isfinite(img)):
    return None
  seq = sequence_from_record(record, i)
  ratio = float(record["aif_dose_ratio"][i])
  seq.update(protocol="flash" if ratio == 1.0 else seq["protocol"],
             ts=float(record["aif_seq_ts"][i]), tr=float(record["aif_seq_tr"][i]),
             flip_deg=float(record["aif_seq_flip_deg"][i]),
             n_pulses=float(record["aif_seq_n_pulses"][i]), sat_residual=0.0)
  pd = record.get("aif_pd")
  return dict(image=img, pd=None if pd is None else np.asarray(pd[i], np.float64),
              sequence=seq, dose_ratio=ratio)


def mbf_of_masks(split: dict, mask_sets: list[np.ndarray], kind: str = "signal",
                 use_aif_series: bool = True, frame_gain: bool = True, spill_over: bool = True
                 ) -> list[dict[str, np.ndarray]]:
  """Slice MBF of the split's slices for each set of masks, all in ONE batched Fermi solve.

  Each mask is divided into 48 sectors by its own RV insertion points (for predicted masks,
  the fully automatic pipeline). AIF (see :func:`mbf_from_slices`): the study's AIF series
  when the split has one (concentration only), else the study slice with the largest clean
  pool of pure blood, never a slice flagged for motion. Returns per mask set dict(slice [N],
  sector48 [N, 48], error [N], aif_source [N], aif_amplification [N], flip_lo [N], flip_hi [N],
  reason48 [N, 48],
  frame_gain [N, T], frame_gain_reason [N], spill48 [N, 48], units, timing: the whole call's,
  see :func:`mbf_from_slices`).
  """
  n, m = len(split["raw"]), len(mask_sets)
  sequences = series = None
  if kind == "concentration":
    sequences = [sequence_from_record(split, i) for i in range(n)] * m
    if use_aif_series and "aif_image" in split:
      by_study = {}
      series = []
      for i in range(n):
        sid = int(np.asarray(split.get("study_id", np.arange(n)))[i])
        if sid not in by_study:
          by_study[sid] = aif_series_from_record(split, i)
        series.append(by_study[sid])
      series = series * m
  study = np.asarray(split.get("study_id", np.arange(n)), np.int64)
  offset = study.max() + 1  # Mask sets never share an AIF.
  exclude = np.asarray(split["motion"], bool) if "motion" in split else None
  res = mbf_from_slices(np.concatenate([split["raw"]] * m), np.concatenate(mask_sets),
                        np.concatenate([split["times"]] * m), sequences=sequences,
                        study_ids=np.concatenate([study + j * offset for j in range(m)]),
                        exclude=None if exclude is None else np.concatenate([exclude] * m),
                        aif_series=series, frame_gain=frame_gain, spill_over=spill_over)
  sl = lambda key, j: res[key][j * n:(j + 1) * n]  # noqa: E731
  return [dict(slice=sl("slice_mbf", j), sector48=sl("mbf48", j), error=sl("error", j),
               aif_source=sl("aif_source", j), aif_amplification=sl("aif_amplification", j),
               flip_lo=sl("slice_mbf_flip_lo", j),
               flip_hi=sl("slice_mbf_flip_hi", j), reason48=sl("reason48", j),
               frame_gain=sl("frame_gain", j), frame_gain_reason=sl("frame_gain_reason", j),
               spill48=sl("spill48", j), units=res["units"], timing=res["timing"])
          for j in range(m)]
