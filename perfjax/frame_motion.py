"""Frame-to-frame motion of the heart region: a model-free OOD score for residual motion.

A motion-corrected perfusion series keeps the heart in place from frame to frame; residual
respiratory motion (a motion-correction failure, the failure the paper's U is asked to find)
moves it by pixels between consecutive frames. Consecutive frames are close in contrast (one
heartbeat apart), so the in-plane translation between them is measured by cross-correlation of
their band-passed, windowed central regions (the crop is centred on the LV, CONVENTIONS.md),
with a parabolic sub-pixel peak. The slice's score is minus the mean displacement over the
consecutive frame pairs (pixels), so that, like 1 - U, a higher score is a steadier, more
familiar slice. No network and no training data take part: the score means the same on any
site's images.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from perfjax.errors import InputError

FRAME_MOTION_SCORE = "frame_motion"  # The name of `frame_motion_score` among the OOD scores.
REGION_PX = 80  # Side of the central region compared (the heart: 35-80 px across).
BAND_SIGMAS_PX = (1.0, 6.0)  # Difference of Gaussians: edges kept, shading and noise damped.
MAX_SHIFT_PX = 12  # Displacements searched between consecutive frames.


def _prepared(frame_hw: np.ndarray) -> np.ndarray:
  """Band-passed, zero-mean, unit-norm, Hann-windowed frame (float64)."""
  lo, hi = BAND_SIGMAS_PX
  band = ndimage.gaussian_filter(frame_hw, lo) - ndimage.gaussian_filter(frame_hw, hi)
  n_rows, n_cols = band.shape
  band = band * np.outer(np.hanning(n_rows), np.hanning(n_cols))
  band -= band.mean()
  norm = np.linalg.norm(band)
  return band / norm if norm > 0 else band


def _subpixel(c_minus: float, c_0: float, c_plus: float) -> float:
  """Offset of a parabola's vertex through three samples (0 where they are flat)."""
  denom = c_minus - 2.0 * c_0 + c_plus
  return 0.0 if denom >= 0 else float(np.clip(0.5 * (c_minus - c_plus) / denom, -0.5, 0.5))


def frame_shifts(image_hwt: np.ndarray, region: int = REGION_PX) -> np.ndarray:
  """In-plane translation [T-1, 2] (rows, cols; pixels) from each frame to the next."""
  image = np.asarray(image_hwt, np.float64)
  if image.ndim != 3 or image.shape[-1] < 2:
    raise InputError("image", f"expected [H, W, T] with T >= 2 frames, got shape {image.shape}")
  if not np.isfinite(image).all():
    raise InputError("image", "contains NaN or Inf")
  h, w, _ = image.shape
  size = min(region, h, w)
  r0, c0 = (h - size) // 2, (w - size) // 2
  frames = [_prepared(image[r0:r0 + size, c0:c0 + size, t]) for t in range(image.shape[-1])]
  spectra = [np.fft.rfft2(f, s=(2 * size, 2 * size)) for f in frames]  # zero-padded: linear
  m = min(MAX_SHIFT_PX, size - 1)
  shifts = np.zeros((len(frames) - 1, 2))
  for t in range(len(frames) - 1):
    corr = np.fft.irfft2(spectra[t + 1] * np.conj(spectra[t]), s=(2 * size, 2 * size))
    corr = np.fft.fftshift(corr)[size - m - 1:size + m + 2, size - m - 1:size + m + 2]
    inner = corr[1:-1, 1:-1]
    i, j = np.unravel_index(np.argmax(inner), inner.shape)
    i, j = i + 1, j + 1  # in corr, whose centre (zero shift) is at m + 1
    shifts[t] = (i - m - 1 + _subpixel(corr[i - 1, j], corr[i, j], corr[i + 1, j]),
                 j - m - 1 + _subpixel(corr[i, j - 1], corr[i, j], corr[i, j + 1]))
  return shifts


def frame_motion_score(images_nhwt: np.ndarray, region: int = REGION_PX) -> np.ndarray:
  """[N] minus the mean frame-to-frame displacement (pixels) of each slice's central region."""
  images = np.asarray(images_nhwt)
  if images.ndim != 4:
    raise InputError("images", f"expected [N, H, W, T], got shape {images.shape}")
  return np.array([-np.linalg.norm(frame_shifts(image, region), axis=1).mean()
                   for image in images])
