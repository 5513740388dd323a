"""Preprocessing of a perfusion slice into the model's input (paper II-A).

A raw 2D+time series `[H, W, T]` (any size, T >= 30, any pixel size) becomes the
CONVENTIONS.md arrays: `image [128, 128, 30]` in [0, 1], `raw` beside it, `times [30]`
from 0, an optional `mask [128, 128]`, and the peak-LV-enhancement frame for patch2.

The steps, in order (`preprocess_slice`):

1. Validation (`validate_slice`): rank, shape, finite values, >= 30 frames, strictly
   increasing times, mask labels in 0..3 with some myocardium. Every problem raises
   `InputError(source, problem)`.
2. Truncation to 30 frames around the first pass (`first_pass_start`). The rule: the
   blood-pool pixels are the 1 % of pixels with the largest enhancement (temporal
   maximum minus the median of the first three frames); bolus arrival is the first
   frame where their mean curve rises above 10 % of its own peak enhancement; the kept
   window starts `n_pre` (5) frames before arrival so the baseline is kept, and is
   moved back when the series ends before 30 frames. `times` are re-zeroed. Arrival
   thus lands on frame 5 (earlier only when the series has fewer baseline frames),
   whatever the series' length or frame rate, and the LV peak of real series falls
   where the training data has it (on the real development set at frames 9-29,
   median 18; in the wide phantom at frames 10-28, median 19-20).
3. Spatial resampling to `target_pixel_mm` (linear per frame; the mask through its
   one-hot planes, so labels stay whole) when the pixel size is known.
4. LV-centred crop to 128 x 128: the centre is the LV blood-pool centroid of the mask
   when one is given, else the LV found from the images alone (`detect_lv`). Outside
   the image the crop is padded with the volume's minimum (0 for the mask).
5. Peak-LV-enhancement frame from the cropped images alone (`detect_lv`).
6. Min-max normalisation of the whole 2D+time volume to [0, 1]; `raw` keeps the signal.

LV detection from the images alone (`detect_lv`), in the spirit of automated AIF/LV
detection: per pixel enhancement above the pre-contrast baseline (median of the first
three frames, after a 1-pixel Gaussian blur) and its half-rise frame; blood pools are the
strongly enhancing pixels (>= 50 % of the 99.5th percentile) that rise after the
baseline frames (half-rise frame >= 2), split into connected blobs (a blob whose
half-rise times are bimodal, RV and LV touching, is cut in two). The
RV is the earliest-filling blob near the image centre; the LV is, among the blobs that
fill at least 0.75 frames later (the LV and the aorta), the one that best combines size,
nearness to the image centre and nearness to the RV (they share the septum). The peak
frame is the argmax of the mean enhancement curve of the LV core (its pixels above 70 % of
its 90th-percentile enhancement, away from partial volume with the myocardium; the
average of many pixels keeps noise from deciding the frame on the flat, saturated peak).
Accuracy on the phantom: benchmarks/RESULTS.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from perfjax import conventions
from perfjax.errors import InputError

N_FRAMES = conventions.NUM_FRAMES
SIZE = conventions.IMAGE_SIZE
N_CLASSES = conventions.NUM_CLASSES
N_PRE = 5  # frames kept before bolus arrival (the wide phantom's arrivals: frames 2-23)
N_BASE = 3
TARGET_PIXEL_MM = 1.4
MAX_RESAMPLED = 1024  # pixels per side after resampling (`resample`)
MAX_INPUT_PIXELS = 2048  # rows or columns of an input slice (`validate_slice`)


# ----------------------------------------------------------------------------- validation


# A first pass is imaged every heartbeat or two: a median frame spacing above the first is
# milliseconds, and one below the second (240 beats a minute) is not a frame's time at all (e.g.
# a 4D NIfTI's pixdim[4] holding the read-out's repetition time).
MAX_FRAME_SPACING_S = 10.0
MIN_FRAME_SPACING_S = 0.25


def validate_times(times: Any, n_t: int, source: str = "times") -> np.ndarray:
  """Checks frame times `[T]` (seconds): finite, strictly increasing and with a median spacing
  within MIN_FRAME_SPACING_S-MAX_FRAME_SPACING_S; returns float64."""
  try:
    times = np.asarray(times, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise InputError(source, f"times are not numeric ({e})") from None
  if times.shape != (n_t,):
    raise InputError(source, f"times must have shape [{n_t}] (one per frame), got "
                             f"{list(times.shape)}")
  if not np.all(np.isfinite(times)):
    raise InputError(source, f"times contain {int(np.sum(~np.isfinite(times)))} NaN/Inf values")
  steps = np.diff(times)
  if np.any(steps <= 0):
    k = int(np.argmax(steps <= 0))
    raise InputError(source, f"times are not strictly increasing (frame {k}: {times[k]:.4g} s, "
                             f"frame {k + 1}: {times[k + 1]:.4g} s)")
  if n_t > 1 and np.median(steps) > MAX_FRAME_SPACING_S:
    raise InputError(source, f"frame times must be in seconds; a median spacing of "
                             f"{np.median(steps):.4g} looks like milliseconds")
  if n_t > 1 and np.median(steps) < MIN_FRAME_SPACING_S:
    raise InputError(source, f"a median frame spacing of {np.median(steps):.4g} s is shorter "
                             "than a heartbeat: these are not the frames' times in seconds (a "
                             "4D NIfTI's pixdim[4] may hold the read-out's repetition time; "
                             'give "times" in a JSON sidecar)')
  return times


def validate_mask(mask: Any, shape: tuple[int, int] | None = None,
                  source: str = "mask") -> np.ndarray:
  """Checks a label mask `[H, W]` (0 bg, 1 myo, 2 LV, 3 RV) with some myocardium; int32."""
  try:
    mask = np.asarray(mask)
  except (TypeError, ValueError) as e:
    raise InputError(source, f"mask is not an array ({e})") from None
  if mask.ndim != 2:
    raise InputError(source, f"mask must be 2D [H, W], got shape {list(mask.shape)}")
  if shape is not None and mask.shape != tuple(shape):
    raise InputError(source, f"mask shape {list(mask.shape)} does not match the image's "
                             f"{list(shape)}")
  if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)
          or mask.dtype == np.bool_):
    raise InputError(source, f"mask must be numeric, got dtype {mask.dtype}")
  if np.issubdtype(mask.dtype, np.floating):
    if not np.all(np.isfinite(mask)):
      raise InputError(source, "mask contains NaN/Inf values")
    if np.any(mask != np.round(mask)):
      raise InputError(source, "mask has non-integer labels")
  labels = np.unique(mask)
  bad = labels[(labels < 0) | (labels > N_CLASSES - 1)]
  if bad.size:
    raise InputError(source, f"mask has labels outside 0..3: {bad[:8].tolist()}")
  mask = mask.astype(np.int32)
  if not np.any(mask == conventions.MYOCARDIUM):
    raise InputError(source, "mask has no myocardium (label 1)")
  return mask


def validate_slice(image: Any, times: Any = None, mask: Any = None, source: str = "image",
                   n_frames: int = N_FRAMES, shape: tuple[int, ...] | None = None,
                   min_size: int = 16) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Checks one 2D+time slice; returns (image float32, times float64 or None, mask int32 or None).

  image `[H, W, T]` finite with T >= n_frames and H, W >= min_size (or exactly `shape`);
  times `[T]` strictly increasing; mask `[H, W]` labels 0..3 with myocardium. Raises
  `InputError(source, problem)` on the first problem found.
  """
  try:
    image = np.asarray(image)
  except (TypeError, ValueError) as e:
    raise InputError(source, f"image is not an array ({e})") from None
  if (not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_)
      or np.iscomplexobj(image)):
    raise InputError(source, f"image must be real numbers (magnitude), got dtype {image.dtype}")
  if image.ndim != 3:
    raise InputError(source, f"image must be 2D+time [H, W, T], got rank {image.ndim} "
                             f"(shape {list(image.shape)})")
  if shape is not None and image.shape != tuple(shape):
    raise InputError(source, f"image must have shape {list(shape)}, got {list(image.shape)}")
  h, w, t = image.shape
  if h < min_size or w < min_size:
    raise InputError(source, f"image is too small: {h} x {w} pixels (at least {min_size})")
  if max(h, w) > MAX_INPUT_PIXELS:
    raise InputError(source, f"image is too large: {h} x {w} pixels (at most {MAX_INPUT_PIXELS})")
  if t < n_frames:
    raise InputError(source, f"image has {t} time frames; at least {n_frames} are needed")
  image = image.astype(np.float32)
  n_bad = int(np.sum(~np.isfinite(image)))
  if n_bad:
    raise InputError(source, f"image contains {n_bad} NaN/Inf values")
  if times is not None:
    times = validate_times(times, t, source)
  if mask is not None:
    mask = validate_mask(mask, (h, w), source)
  return image, times, mask


# ----------------------------------------------------------------------------- truncation


def _baseline(image_hwt: np.ndarray, n_base: int = N_BASE) -> np.ndarray:
  return np.median(image_hwt[..., :max(1, min(n_base, image_hwt.shape[-1]))], axis=-1)


def blood_curve(image_hwt: np.ndarray, fraction: float = 0.01, n_base: int = N_BASE) -> np.ndarray:
  """Mean curve `[T]` of the `fraction` of pixels that enhance most (the blood pools)."""
  img = np.asarray(image_hwt, np.float32)
  enh = img.max(axis=-1) - _baseline(img, n_base)
  n = max(20, int(round(fraction * enh.size)))
  idx = np.argpartition(enh.ravel(), -n)[-n:]
  return img.reshape(-1, img.shape[-1])[idx].mean(axis=0)


def bolus_arrival(image_hwt: np.ndarray, level: float = 0.1, n_base: int = N_BASE) -> int:
  """First frame where the blood-pool curve exceeds `level` of its peak enhancement."""
  curve = blood_curve(image_hwt, n_base=n_base)
  base = np.median(curve[:max(1, min(n_base, curve.size))])
  rise = curve - base
  peak = rise.max()
  if peak <= 0:
    return 0
  return int(np.argmax(rise > level * peak))


def first_pass_start(image_hwt: np.ndarray, n_frames: int = N_FRAMES, n_pre: int = N_PRE) -> int:
  """Start frame of the `n_frames` window kept: `n_pre` frames before bolus arrival."""
  t = image_hwt.shape[-1]
  if t <= n_frames:
    return 0
  start = max(0, bolus_arrival(image_hwt) - n_pre)
  return int(min(start, t - n_frames))


def truncate_first_pass(image_hwt: np.ndarray, times: np.ndarray, n_frames: int = N_FRAMES,
                        n_pre: int = N_PRE) -> tuple[np.ndarray, np.ndarray, int]:
  """Keeps `n_frames` around the first pass; returns (image, times from 0, start frame)."""
  start = first_pass_start(image_hwt, n_frames, n_pre)
  sl = slice(start, start + n_frames)
  times = np.asarray(times, np.float64)[sl]
  return image_hwt[..., sl], (times - times[0]).astype(np.float32), start


# ----------------------------------------------------------------------------- geometry


def resample(image_hwt: np.ndarray, pixel_mm: tuple[float, float] | float,
             target_mm: float = TARGET_PIXEL_MM, mask: np.ndarray | None = None,
             max_size: int | None = None, source: str = "pixel size"
             ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
  """Resamples rows/cols from `pixel_mm` (row, col spacing) to `target_mm` pixels.

  Linear interpolation per frame; the mask goes through its one-hot planes (linear,
  then argmax) so labels stay whole. Returns (image, mask, zoom factors). A result larger
  than `max_size` (default MAX_RESAMPLED) pixels per side is an `InputError`, raised before
  any memory is asked for (a header's 200 mm pixel would otherwise ask for tens of GiB).
  """
  max_size = MAX_RESAMPLED if max_size is None else int(max_size)
  pr, pc = (pixel_mm, pixel_mm) if np.isscalar(pixel_mm) else pixel_mm
  if not (np.isfinite(pr) and np.isfinite(pc) and pr > 0 and pc > 0 and target_mm > 0):
    raise InputError(source, f"pixel spacing must be positive, got {pixel_mm} -> {target_mm}")
  zoom = (float(pr) / target_mm, float(pc) / target_mm)
  if abs(zoom[0] - 1) < 1e-3 and abs(zoom[1] - 1) < 1e-3:
    return image_hwt, mask, (1.0, 1.0)
  h, w = image_hwt.shape[:2]
  out_hw = (max(1, int(round(h * zoom[0]))), max(1, int(round(w * zoom[1]))))
  if max(out_hw) > max_size:  # checked before any memory is asked for
    raise InputError(source, f"resampling {h} x {w} pixels of {pr:g} x {pc:g} mm to {target_mm:g} "
                             f"mm would give {out_hw[0]} x {out_hw[1]} pixels (at most "
                             f"{max_size}); check the header's pixel size")
  factors = (out_hw[0] / h, out_hw[1] / w)
  image = ndimage.zoom(np.asarray(image_hwt, np.float32), factors + (1.0,), order=1,
                       mode="nearest", grid_mode=True)
  if mask is not None:
    planes = np.stack([mask == c for c in range(N_CLASSES)], -1).astype(np.float32)
    planes = ndimage.zoom(planes, factors + (1.0,), order=1, mode="nearest", grid_mode=True)
    mask = planes.argmax(-1).astype(np.int32)
  return image, mask, factors


def lv_center(mask: np.ndarray) -> tuple[float, float]:
  """(row, col) centroid of the LV blood pool (label 2), else of the myocardium."""
  for label in (2, 1):
    rows, cols = np.nonzero(mask == label)
    if rows.size:
      return float(rows.mean()), float(cols.mean())
  raise InputError("mask", "mask has neither LV blood pool nor myocardium to centre on")


def crop_center(array: np.ndarray, center: tuple[float, float], size: int = SIZE,
                fill: float | None = None) -> np.ndarray:
  """`size x size` crop of `array [H, W, ...]` centred on `center` (row, col).

  The centre pixel lands at (size // 2, size // 2); where the crop leaves the image it
  is filled with `fill` (default: the array's minimum, so normalisation is unchanged).
  """
  h, w = array.shape[:2]
  r0 = int(round(center[0])) - size // 2
  c0 = int(round(center[1])) - size // 2
  fill = array.min() if fill is None else fill
  out = np.full((size, size) + array.shape[2:], fill, dtype=array.dtype)
  rs, re = max(r0, 0), min(r0 + size, h)
  cs, ce = max(c0, 0), min(c0 + size, w)
  if rs < re and cs < ce:
    out[rs - r0:re - r0, cs - c0:ce - c0] = array[rs:re, cs:ce]
  return out


def normalize(image: np.ndarray, source: str = "image") -> np.ndarray:
  """Min-max normalisation of the whole volume to [0, 1] (float32)."""
  lo, hi = float(image.min()), float(image.max())
  if not hi > lo:
    raise InputError(source, "image is constant; it cannot be normalised")
  return ((image - lo) / (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------- LV detection


def _otsu(values: np.ndarray, bins: int = 64) -> float:
  """Otsu's threshold of `values` (maximum between-class variance of a 2-class split)."""
  hist, edges = np.histogram(values, bins=bins)
  mids = 0.5 * (edges[1:] + edges[:-1])
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  m0 = np.cumsum(hist * mids)
  mu0 = m0 / np.maximum(w0, 1)
  mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
  between = w0 * w1 * (mu0 - mu1) ** 2
  return float(mids[int(np.argmax(between[:-1]))])


def detect_lv(image_hwt: np.ndarray, n_base: int = N_BASE, threshold: float = 0.5,
              sigma: float = 1.0, lag: float = 0.75, centre_scale: float = 0.25,
              septum_px: float = 12.0, source: str = "image") -> dict[str, Any]:
  """Finds the LV blood pool from the images alone (no mask).

  Returns dict(center=(row, col), peak_frame=int, lv=bool [H, W], rv=bool [H, W] (empty
  when no earlier-enhancing blob was found), onset=float [H, W] half-rise frame,
  curve=[T] mean enhancement of the LV blood-pool core, candidates=[(row, col), ...]: the
  centroids of the blood-pool blobs, the LV's first, then the others in the order of the
  LV rule's score (those it ruled out last, the largest first)).
  """
  img = ndimage.gaussian_filter(np.asarray(image_hwt, np.float32), (sigma, sigma, 0))
  h, w, t = img.shape
  enh = img - _baseline(img, n_base)[..., None]
  amp = enh.max(-1)
  ref = np.percentile(amp, 99.5)
  if not ref > 0:
    raise InputError(source, "no contrast enhancement found; cannot locate the LV")
  # Half-rise frame, linearly interpolated: earlier for the RV than for the LV.
  above = enh >= 0.5 * np.maximum(amp, 1e-12)[..., None]
  k = np.argmax(above, -1)
  prev = np.take_along_axis(enh, np.maximum(k - 1, 0)[..., None], -1)[..., 0]
  cur = np.take_along_axis(enh, k[..., None], -1)[..., 0]
  frac = np.where((k > 0) & (cur > prev), (0.5 * amp - prev) / np.maximum(cur - prev, 1e-12), 0.0)
  onset = np.where(k > 0, k - 1 + np.clip(frac, 0, 1), 0.0)

  # Blood enhances after the baseline frames; bright before them is not the bolus (it is
  # residual motion of bright tissue).
  cand = ndimage.binary_opening((amp >= threshold * ref) & (onset >= n_base - 1), iterations=1)
  labels, n = ndimage.label(cand)
  if n == 0:
    raise InputError(source, "no enhancing blood pool found; cannot locate the LV")
  labels, n = _split_by_onset(labels, n, onset, min_gap=lag)
  idx = np.arange(1, n + 1)
  ones = np.ones_like(amp)
  areas = ndimage.sum_labels(ones, labels, idx)
  big = areas >= max(8.0, 0.1 * areas.max())
  comps, areas = idx[big], areas[big]
  cents = np.array(ndimage.center_of_mass(ones, labels, comps)).reshape(-1, 2)
  dist = np.hypot(cents[:, 0] - (h - 1) / 2, cents[:, 1] - (w - 1) / 2)
  onsets = np.asarray(ndimage.mean(onset, labels, comps))
  # The RV fills first (the earliest blob near the centre: residual motion makes edges
  # at the border look like early enhancement); the LV is among the blobs that fill `lag`
  # frames later (so does the aorta): the one next to the RV (they share the septum),
  # near the centre.
  score = np.sqrt(areas) * np.exp(-(dist / (centre_scale * min(h, w))) ** 2)
  central = dist <= 1.2 * centre_scale * min(h, w)
  rv = np.zeros_like(cand)
  if np.any(central):
    first = int(np.argmin(np.where(central, onsets, np.inf)))
    late = onsets >= onsets[first] + lag
    if np.any(late):
      rv = labels == comps[first]
      gap_rv = ndimage.distance_transform_edt(~rv)
      gaps = np.array([gap_rv[labels == c].min() for c in comps])
      score = np.where(late, score * np.exp(-(gaps / septum_px) ** 2), -1.0)
  lv = labels == comps[int(np.argmax(score))]
  # The peak frame from the blood-pool core, away from partial volume with the myocardium.
  core = lv & (amp >= 0.7 * np.percentile(amp[lv], 90))
  curve = enh[core].mean(0)
  rows, cols = np.nonzero(lv)
  ranked = np.lexsort((-areas, -score))  # by score; the ruled-out blobs (-1) by size
  return dict(center=(float(rows.mean()), float(cols.mean())), peak_frame=int(np.argmax(curve)),
              lv=lv, rv=rv, onset=onset.astype(np.float32), curve=curve,
              candidates=[(float(cents[j, 0]), float(cents[j, 1])) for j in ranked])


def _split_by_onset(labels: np.ndarray, n: int, onset: np.ndarray, min_gap: float
                    ) -> tuple[np.ndarray, int]:
  """Splits blobs whose half-rise frames are bimodal (RV and LV touching) in two."""
  labels = labels.copy()
  for lab in range(1, n + 1):
    blob = labels == lab
    vals = onset[blob]
    if vals.size < 16:
      continue
    thr = _otsu(vals)
    hi, lo = vals > thr, vals <= thr
    if (hi.sum() >= 0.15 * vals.size and lo.sum() >= 0.15 * vals.size
        and vals[hi].mean() - vals[lo].mean() >= min_gap):
      n += 1
      labels[blob & (onset <= thr)] = n
  return labels, n


def peak_lv_frame(image_hwt: np.ndarray, source: str = "image") -> int:
  """The peak-LV-enhancement frame, found from the images alone (patch2's input frame)."""
  return detect_lv(image_hwt, source=source)["peak_frame"]


# ----------------------------------------------------------------------------- pipeline


def preprocess_slice(image: Any, times: Any, mask: Any = None,
                     pixel_mm: tuple[float, float] | float | None = None,
                     target_pixel_mm: float | None = TARGET_PIXEL_MM, n_frames: int = N_FRAMES,
                     size: int = SIZE, n_pre: int = N_PRE, source: str = "image",
                     centre: str = "mask", center: tuple[float, float] | None = None
                     ) -> dict[str, Any]:
  """Raw slice `[H, W, T]` -> model input per CONVENTIONS.md (see the module docstring).

  Returns dict(image float32 [size, size, n_frames] in [0, 1], raw float32 (same, signal),
  times float32 [n_frames] from 0, mask int32 [size, size] or None, peak_lv_frame int,
  center (row, col) in the resampled frame before the crop, frame_start int, zoom,
  shape: the input's (H, W), resampled_shape: (H, W) after resampling, lv_candidates: when
  the LV was found from the images, `detect_lv`'s candidates in the resampled frame, the
  centre first; else []). The crop is
  centred on the mask's LV (`centre="mask"`, when a mask is given) or on the LV found
  from the images (`centre="images"`, always used without a mask), or at `center`
  (row, col) in the resampled frame when given (`perfjax.predict` re-centres a crop on
  the LV its model segmented); `to_original` maps model outputs back to the input's pixel
  grid with these.
  """
  image, times, mask = validate_slice(image, times, mask, source=source, n_frames=n_frames)
  if times is None:
    raise InputError(source, "frame times are required")
  shape = image.shape[:2]
  image, times, start = truncate_first_pass(image, times, n_frames, n_pre)
  zoom = (1.0, 1.0)
  if pixel_mm is not None and target_pixel_mm is not None:
    image, mask, zoom = resample(image, pixel_mm, target_pixel_mm, mask)
  if centre not in ("mask", "images"):
    raise InputError(source, f"centre must be 'mask' or 'images', got {centre!r}")
  candidates = []
  if center is not None:
    center = (float(center[0]), float(center[1]))
  elif mask is not None and centre == "mask":
    center = lv_center(mask)
  else:
    found = detect_lv(image, source=source)
    center, candidates = found["center"], found["candidates"]
  raw = crop_center(image, center, size)
  if mask is not None:
    mask = crop_center(mask, center, size, fill=0).astype(np.int32)
    if not np.any(mask == conventions.MYOCARDIUM):
      raise InputError(source, "the LV-centred crop holds no myocardium")
  peak = detect_lv(raw, source=source)["peak_frame"]
  return dict(image=normalize(raw, source), raw=raw.astype(np.float32), times=times, mask=mask,
              peak_lv_frame=int(peak), center=center, frame_start=int(start), zoom=zoom,
              shape=tuple(shape), resampled_shape=tuple(image.shape[:2]),
              lv_candidates=candidates)


def to_original(array: np.ndarray, info: dict[str, Any], labels: bool = False) -> np.ndarray:
  """Maps a model output on the crop (`[size, size, ...]`: a segmentation, probabilities,
  an uncertainty or MBF map) back to the input image's pixel grid.

  `info` is `preprocess_slice`'s output (center, zoom, shape, resampled_shape). Outside
  the crop the result is 0. Labels are resampled by nearest neighbour, values linearly.
  """
  array = np.asarray(array)
  size = array.shape[0]
  rh, rw = info["resampled_shape"]
  out = np.zeros((rh, rw) + array.shape[2:], array.dtype)
  r0 = int(round(info["center"][0])) - size // 2
  c0 = int(round(info["center"][1])) - size // 2
  rs, re = max(r0, 0), min(r0 + size, rh)
  cs, ce = max(c0, 0), min(c0 + size, rw)
  if rs < re and cs < ce:
    out[rs:re, cs:ce] = array[rs - r0:re - r0, cs - c0:ce - c0]
  h, w = info["shape"]
  if (rh, rw) != (h, w):
    factors = (h / rh, w / rw) + (1.0,) * (array.ndim - 2)
    out = ndimage.zoom(out, factors, order=0 if labels else 1, mode="nearest", grid_mode=True)
  return out
