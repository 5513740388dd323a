"""Failure types of a perfusion slice, made from clean phantom slices, for OOD evaluation.

Each corruption is a pure function of one clean slice (``image [H, W, T]`` normalised to
[0, 1], and its ``mask`` or a seeded ``rng`` where it needs them) and returns the failed
slice, min-max normalised again as CONVENTIONS.md requires. `failure_set` builds an
evaluation set from the phantom: its clean slices are the negatives, and every failure type
applied to each of them (or, for the phantom's own residual motion and for another domain,
the same hearts simulated that way) the positives, recorded in ``failure``.

Failure types (issue 14): residual respiratory motion of three amplitudes and the phantom's
own; a first-pass window that starts too early or too late; strong dark-rim, banding and
ghosting artefacts; a slice beyond the apex (the heart replaced by its surroundings); and
images of another domain (the earlier, "narrow" phantom).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax.conventions import LV_BLOOD_POOL, MYOCARDIUM
from perfjax.data import phantom
from perfjax.errors import InputError

CLEAN = "none"  # ``failure`` of the negatives
MOTION_AMPLITUDES_PX = {"motion_2px": 2.0, "motion_4px": 4.0, "motion_8px": 8.0}
WINDOW_OFFSET_FRAMES = {"window_early": -10, "window_late": 10}
DARK_RIM_DEPTH = 0.7  # fraction of the signal lost in the endocardial band at the LV peak
DARK_RIM_WIDTH_PX = 2
BANDING_DEPTH = 0.8
BANDING_WIDTH_PX = 2.0
GHOST_STRENGTH = 0.5
FAILURE_GROUPS = {"motion": (*MOTION_AMPLITUDES_PX, "motion_phantom"),
                  "window": tuple(WINDOW_OFFSET_FRAMES),
                  "artefact": ("dark_rim", "banding", "ghosting"),
                  "slice_level": ("beyond_apex",), "domain": ("other_domain",)}
FAILURE_TYPES = tuple(f for group in FAILURE_GROUPS.values() for f in group)


def normalise(image_hwt) -> np.ndarray:
  """Min-max normalisation of a whole slice to [0, 1] (paper II-A); a constant slice is 0."""
  image = np.asarray(image_hwt, np.float64)
  span = image.max() - image.min()
  return ((image - image.min()) / span if span > 0 else np.zeros_like(image)).astype(np.float32)


def _check(image_hwt, mask=None):
  image = np.asarray(image_hwt, np.float32)
  if image.ndim != 3:
    raise InputError("image", f"expected [H, W, T], got shape {image.shape}")
  if mask is not None and np.shape(mask) != image.shape[:2]:
    raise InputError("mask", f"expected {image.shape[:2]}, got {np.shape(mask)}")
  return image


def residual_motion(image_hwt, peak_frame: int, amplitude_px: float, rng) -> np.ndarray:
  """Breathing the motion correction left in: each frame translated rigidly along one random
  direction by ``amplitude_px`` x a breathing cycle (period 4-7 frames, about 3-5.5 s at one
  frame per beat), plus 10 % jitter; frame ``peak_frame`` (where the mask holds) stays put."""
  image = _check(image_hwt)
  frames = image.shape[-1]
  t = np.arange(frames)
  period, phase = rng.uniform(4.0, 7.0), rng.uniform(0, 2 * np.pi)
  direction = rng.uniform(0, 2 * np.pi)
  breath = 0.5 - 0.5 * np.cos(2 * np.pi * t / period + phase)
  jitter = rng.normal(0.0, 0.1 * amplitude_px, (frames, 2))
  shift = (amplitude_px * breath[:, None] * [np.sin(direction), np.cos(direction)] + jitter)
  shift -= shift[peak_frame]
  out = np.stack([ndimage.shift(image[..., k], shift[k], order=1, mode="nearest")
                  for k in range(frames)], axis=-1)
  return normalise(out)


def shifted_window(image_hwt, offset: int) -> np.ndarray:
  """The first-pass window started ``offset`` frames late (> 0: the bolus already arriving,
  the last frame repeated at the end) or early (< 0: a long baseline, the first frame
  repeated, the wash-out cut): frame t is the clean frame clip(t + offset)."""
  image = _check(image_hwt)
  frames = image.shape[-1]
  return normalise(image[..., np.clip(np.arange(frames) + int(offset), 0, frames - 1)])


def shifted_peak(peak_frame: int, offset: int, frames: int) -> int:
  """The peak-LV frame of `shifted_window(..., offset)`."""
  return int(np.clip(peak_frame - int(offset), 0, frames - 1))


def _lv_enhancement(image, mask) -> np.ndarray:
  """The LV blood curve above its first frame, scaled to a peak of 1 ([T])."""
  curve = image[np.asarray(mask) == LV_BLOOD_POOL].mean(axis=0) if (
      np.asarray(mask) == LV_BLOOD_POOL).any() else np.zeros(image.shape[-1])
  curve = np.maximum(curve - curve[0], 0.0)
  return curve / curve.max() if curve.max() > 0 else curve


def dark_rim(image_hwt, mask, depth: float = DARK_RIM_DEPTH,
             width_px: int = DARK_RIM_WIDTH_PX) -> np.ndarray:
  """A strong subendocardial dark rim: the myocardium within ``width_px`` of the LV blood pool
  loses ``depth`` of its signal in proportion to the LV enhancement (first pass)."""
  image = _check(image_hwt, mask)
  mask = np.asarray(mask)
  near_lv = ndimage.distance_transform_edt(mask != LV_BLOOD_POOL) <= width_px
  band = (mask == MYOCARDIUM) & near_lv
  loss = depth * band[..., None] * _lv_enhancement(image, mask)[None, None, :]
  return normalise(image * (1.0 - loss))


def banding(image_hwt, mask, rng, depth: float = BANDING_DEPTH,
            width_px: float = BANDING_WIDTH_PX) -> np.ndarray:
  """A dark off-resonance band in every frame: a Gaussian line of ``depth`` and ``width_px``
  through a point within 12 px of the LV centre, at a random angle."""
  image = _check(image_hwt, mask)
  lv = np.argwhere(np.asarray(mask) == LV_BLOOD_POOL)
  centre = lv.mean(axis=0) if lv.size else np.array(image.shape[:2]) / 2.0
  point = centre + rng.uniform(-12.0, 12.0, 2)
  angle = rng.uniform(0, np.pi)
  rows, cols = np.indices(image.shape[:2], dtype=np.float64)
  distance = (rows - point[0]) * np.cos(angle) - (cols - point[1]) * np.sin(angle)
  profile = 1.0 - depth * np.exp(-0.5 * (distance / width_px) ** 2)
  return normalise(image * profile[..., None])


def ghosting(image_hwt, rng, strength: float = GHOST_STRENGTH) -> np.ndarray:
  """An N/2 ghost: the slice plus ``strength`` x itself shifted by half the field of view
  along a random phase-encoding axis (rows or columns), in every frame."""
  image = _check(image_hwt)
  axis = int(rng.integers(2))
  return normalise(image + strength * np.roll(image, image.shape[axis] // 2, axis=axis))


def beyond_apex(image_hwt, mask) -> tuple[np.ndarray, np.ndarray]:
  """A slice past the apex: every heart pixel (mask > 0, dilated by 2 px) takes the time
  curve of the nearest pixel outside it, so no blood pool or myocardium is left.

  Returns (image, mask): the mask is all background.
  """
  image = _check(image_hwt, mask)
  heart = ndimage.binary_dilation(np.asarray(mask) > 0, iterations=2)
  if not heart.any():
    return normalise(image), np.zeros_like(np.asarray(mask))
  _, (near_r, near_c) = ndimage.distance_transform_edt(heart, return_indices=True)
  return normalise(image[near_r, near_c]), np.zeros_like(np.asarray(mask))


def corrupt(failure: str, image_hwt, mask, peak_frame: int, rng) -> dict:
  """One clean slice made into ``failure`` (a corruption of FAILURE_TYPES).

  Returns dict(image, mask, peak_lv_frame): the mask is the clean one (a reference of the
  peak frame) except past the apex (background).
  """
  mask = np.asarray(mask)
  frames = np.shape(image_hwt)[-1]
  peak = int(peak_frame)
  if failure in MOTION_AMPLITUDES_PX:
    image = residual_motion(image_hwt, peak, MOTION_AMPLITUDES_PX[failure], rng)
  elif failure in WINDOW_OFFSET_FRAMES:
    offset = WINDOW_OFFSET_FRAMES[failure]
    image, peak = shifted_window(image_hwt, offset), shifted_peak(peak, offset, frames)
  elif failure == "dark_rim":
    image = dark_rim(image_hwt, mask)
  elif failure == "banding":
    image = banding(image_hwt, mask, rng)
  elif failure == "ghosting":
    image = ghosting(image_hwt, rng)
  elif failure == "beyond_apex":
    image, mask = beyond_apex(image_hwt, mask)
  else:
    raise InputError("failure", f"{failure!r} is not a corruption; use one of "
                     f"{[f for f in FAILURE_TYPES if f not in SIMULATED]}")
  return dict(image=image, mask=mask.astype(np.int32), peak_lv_frame=peak)


# Failure types simulated by the phantom itself (same seed, so the same hearts as the clean).
SIMULATED = {"motion_phantom": dict(motion_fraction=1.0),
             "other_domain": dict(variability="narrow")}
FIELDS = ("image", "mask", "peak_lv_frame")


def failure_set(seed: int, n_slices: int, protocol: str = "bssfp",
                failures=FAILURE_TYPES, workers: int = 2) -> dict:
  """An OOD evaluation set: ``n_slices`` clean phantom slices and each failure of them.

  Returns dict(image [M,H,W,T] float32, mask [M,H,W] int32, peak_lv_frame [M] int32,
  failure [M] str (CLEAN for the clean slices), ood [M] bool, source [M] int32 (the clean
  slice it was made from)), M = n_slices x (1 + len(failures)), clean slices first.
  Deterministic from ``seed``.
  """
  unknown = [f for f in failures if f not in FAILURE_TYPES]
  if unknown:
    raise InputError("failures", f"unknown {unknown}; use some of {list(FAILURE_TYPES)}")
  clean = phantom.simulate(seed, n_slices, protocol, workers=workers)
  parts = {k: [np.asarray(clean[k])] for k in FIELDS}
  names = [CLEAN] * n_slices
  for index, failure in enumerate(failures):
    if failure in SIMULATED:
      made = phantom.simulate(seed, n_slices, protocol, workers=workers, **SIMULATED[failure])
    else:
      slices = [corrupt(failure, clean["image"][i], clean["mask"][i], clean["peak_lv_frame"][i],
                        np.random.default_rng([seed, index, i])) for i in range(n_slices)]
      made = {k: np.stack([s[k] for s in slices]) for k in FIELDS}
    for k in FIELDS:
      parts[k].append(np.asarray(made[k]))
    names += [failure] * n_slices
  failure = np.array(names)
  return dict(image=np.concatenate(parts["image"]).astype(np.float32),
              mask=np.concatenate(parts["mask"]).astype(np.int32),
              peak_lv_frame=np.concatenate(parts["peak_lv_frame"]).astype(np.int32),
              failure=failure, ood=failure != CLEAN,
              source=np.tile(np.arange(n_slices, dtype=np.int32), 1 + len(failures)))
