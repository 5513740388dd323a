"""Image formation helpers of the phantom: grids, coil, bSSFP banding, motion, blur, noise.

Private to :mod:`perfjax.data.phantom`. Image frame: output pixel (row, col), 128 x 128,
row 0 at the top; heart frame: millimetres about the LV centre, x lateral (right), y
anterior (up), see :mod:`perfjax.data._anatomy`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from perfjax import conventions
from perfjax.data import _anatomy as anat

SIZE = conventions.IMAGE_SIZE
FRAMES = conventions.NUM_FRAMES
OS = 3  # sub-points per output pixel and axis where tissues meet (partial volume)

# Standard normal quantiles at (i + 0.5) / 2^16: noise = GAUSS16[uniform 16-bit integers] is
# Gaussian to 16-bit resolution (tails cut at 4.3 sigma) and 3x cheaper than standard_normal.
GAUSS16 = ndtri((np.arange(1 << 16) + 0.5) / (1 << 16)).astype(np.float32)


def centres(theta_deg, shift_mm, pixel_mm):
  """Heart-frame (x, y) mm [128, 128] of the output pixel centres and the rotation (c, s)."""
  c, s = np.cos(np.deg2rad(theta_deg)), np.sin(np.deg2rad(theta_deg))
  pos = (np.arange(SIZE, dtype=np.float64) - (SIZE - 1) / 2.0) * pixel_mm
  qx = pos[None, :] + shift_mm[0]
  qy = -pos[:, None] + shift_mm[1]
  # heart frame = image frame rotated back by theta
  return c * qx + s * qy, -s * qx + c * qy, (c, s)


def subpoints(rot, pixel_mm):
  """Heart-frame offsets (mm) of the OS x OS sub-points of a pixel about its centre."""
  c, s = rot
  f = (np.arange(OS) - (OS - 1) / 2.0) / OS * pixel_mm
  dx = np.tile(f, OS)  # image-plane columns
  dy = -np.repeat(f, OS)  # image-plane rows (down) -> up
  return c * dx + s * dy, -s * dx + c * dy


def to_pixel(xy, theta_deg, shift_mm, pixel_mm):
  """Heart-frame (x, y) mm [..., 2] -> image (row, col) of the output grid."""
  c = np.deg2rad(theta_deg)
  x, y = xy[..., 0], xy[..., 1]
  qx, qy = np.cos(c) * x - np.sin(c) * y, np.sin(c) * x + np.cos(c) * y
  col = (qx - shift_mm[0]) / pixel_mm + (SIZE - 1) / 2.0
  row = -(qy - shift_mm[1]) / pixel_mm + (SIZE - 1) / 2.0
  return np.stack([row, col], axis=-1)


def coil_sensitivity(params, shift_mm, pixel_mm):
  """Surface-coil receive sensitivity [128, 128] in the image frame, 1 at the LV centre.

  Two elements (anterior at ``angle``, a weaker posterior one opposite) at ``dist`` mm from
  the LV centre, each ``1 / (1 + d^2 / d0^2)``: the far (often lateral) wall is darker.
  """
  angle, dist, d0, post = params
  pos = (np.arange(SIZE) - (SIZE - 1) / 2.0) * pixel_mm
  qx, qy = pos[None, :] + shift_mm[0], -pos[:, None] + shift_mm[1]
  sens = np.zeros((SIZE, SIZE))
  for a, weight in ((angle, 1.0), (angle + 180.0, post)):
    cx, cy = dist * np.cos(np.deg2rad(a)), dist * np.sin(np.deg2rad(a))
    sens += weight / (1.0 + ((qx - cx) ** 2 + (qy - cy) ** 2) / d0 ** 2)
  at_lv = sum(w / (1.0 + dist ** 2 / d0 ** 2) for w in (1.0, post))
  return sens / at_lv


def banding(heart, rng, xy_c, tr, strength):
  """bSSFP off-resonance attenuation [128, 128]: a dark band across the lateral wall.

  The field is a smooth susceptibility bump at the heart-lung interface, elongated along the
  wall, plus a global offset and gradient (Hz); the signal drops where the phase per TR
  passes through pi.
  """
  x, y = xy_c
  phi = rng.uniform(-40, 40)
  r_lat = np.interp(np.mod(phi, 360.0), np.arange(anat.N_ANG) * 360.0 / anat.N_ANG, heart.epi)
  dist = r_lat + rng.uniform(-3, 8)
  c, s = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
  radial = (x - dist * c) * c + (y - dist * s) * s
  tangential = -(x - dist * c) * s + (y - dist * s) * c
  s_rad, s_tan = rng.uniform(5, 10), rng.uniform(12, 25)
  bump = np.exp(-0.5 * ((radial / s_rad) ** 2 + (tangential / s_tan) ** 2))
  df = (0.5 / tr) * rng.uniform(1.1, 1.6) * bump
  df += rng.uniform(-30, 30) + rng.uniform(-0.5, 0.5) * x  # Hz: global offset and gradient
  phase = np.mod(2 * np.pi * df * tr, 2 * np.pi) - np.pi  # 0 at the band (half a cycle per TR)
  return 1.0 - strength * np.exp(-0.5 * (phase / 0.5) ** 2)


def motion_warp(signal_hwt, times, ref, rng, centre_rc, deform):
  """Residual respiratory motion: breathing shifts and mild deformation per frame, 0 at ``ref``.

  The breath-hold ends at a random time (sometimes before the first frame); from then on the
  heart follows a breathing pattern that the motion correction failed to remove: period
  3-5.5 s, amplitude 3-8 px along a random in-plane direction with a small perpendicular
  loop (inhale and exhale paths differ), beat-to-beat jitter, and with ``deform`` a scaling
  of up to 4 % about the LV centre and a smooth non-rigid wave of up to 1 px.

  Returns:
    (warped [H, W, T], shift [T, 2]): shift is the (row, col) displacement of the LV centre.
  """
  amp = rng.uniform(3.0, 8.0)  # px
  direction = rng.uniform(0, 2 * np.pi)
  period, phase = rng.uniform(3.0, 5.5), rng.uniform(0, 2 * np.pi)
  release = rng.uniform(-0.2, 0.6) * times[-1]
  onset = np.clip((times - release) / 2.0, 0.0, 1.0)
  arg = 2 * np.pi * (times - release) / period + phase
  breath = onset * (0.5 - 0.5 * np.cos(arg))
  loop = onset * 0.5 * np.sin(arg)
  breath, loop = breath - breath[ref], loop - loop[ref]
  jitter = rng.normal(0.0, 0.4, (2, FRAMES)) * np.maximum(onset, 0.25)
  jitter[:, ref] = 0.0
  u_row, u_col = np.sin(direction), np.cos(direction)  # unit vector (row, col)
  d_row = amp * (breath * u_row + 0.2 * loop * u_col) + jitter[0]
  d_col = amp * (breath * u_col - 0.2 * loop * u_row) + jitter[1]
  scale = 1.0 + (0.04 * breath if deform else 0.0 * breath)
  wave_amp = rng.uniform(0.3, 1.0) * deform
  wave_dir, wave_len, wave_phase = rng.uniform(0, np.pi), rng.uniform(60, 120), rng.uniform(0, 6.3)
  rows, cols = np.indices((SIZE, SIZE), dtype=np.float64)
  wave = np.sin(2 * np.pi * (rows * np.cos(wave_dir) + cols * np.sin(wave_dir)) / wave_len
                + wave_phase)
  wave -= np.sin(2 * np.pi * (centre_rc[0] * np.cos(wave_dir) + centre_rc[1] * np.sin(wave_dir))
                 / wave_len + wave_phase)  # the LV centre moves by exactly (d_row, d_col)
  out = np.empty_like(signal_hwt)
  for t in range(FRAMES):
    nonrigid = wave_amp * breath[t] * wave
    src_r = centre_rc[0] + (rows - centre_rc[0] - d_row[t] - nonrigid * u_row) / scale[t]
    src_c = centre_rc[1] + (cols - centre_rc[1] - d_col[t] - nonrigid * u_col) / scale[t]
    out[..., t] = ndimage.map_coordinates(signal_hwt[..., t], [src_r, src_c], order=1,
                                          mode="nearest")
  return out, np.stack([d_row, d_col], axis=-1)


def binomial3(a):
  """3 x 3 binomial blur ([1, 2, 1] / 4 per axis, edges replicated) over the first two axes."""
  a = np.concatenate([a[:1], a, a[-1:]], axis=0)
  a = 0.25 * (a[:-2] + a[2:]) + 0.5 * a[1:-1]
  a = np.concatenate([a[:, :1], a, a[:, -1:]], axis=1)
  return 0.25 * (a[:, :-2] + a[:, 2:]) + 0.5 * a[:, 1:-1]


def interp_rows(x, grid, table):
  """Rows of ``table`` [M, T] linearly interpolated at ``x`` [n] on the uniform ``grid``."""
  pos = np.clip(x / grid[-1] * (len(grid) - 1), 0.0, len(grid) - 1 - 1e-9)
  i = pos.astype(np.intp)
  w = (pos - i)[:, None]
  return table[i] * (1.0 - w) + table[i + 1] * w


def magnitude(sig, sigma, rng, raw, image, rows=16):
  """raw = |sig + sigma (n1 + i n2)| (Rician) and image = min-max normalised raw, in place.

  Works on blocks of ``rows`` image rows so the temporaries stay in cache; the imaginary
  noise enters squared straight from a squared quantile table.
  """
  if sigma <= 0:
    raw[...] = sig
  else:
    table = GAUSS16 * np.float32(sigma)
    table2 = np.square(table)
    shape = (rows,) + sig.shape[1:]
    re, im2 = np.empty(shape, np.float32), np.empty(shape, np.float32)
    for r in range(0, SIZE, rows):
      block = slice(r, r + rows)
      idx = rng.integers(0, 1 << 16, (2,) + shape, dtype=np.uint16)
      np.take(table, idx[0], out=re)
      re += sig[block]
      np.square(re, out=re)
      np.take(table2, idx[1], out=im2)
      re += im2
      np.sqrt(re, out=raw[block])
  lo, hi = raw.min(), raw.max()
  scale = np.float32(1.0 / max(hi - lo, 1e-12))
  for r in range(0, SIZE, rows):
    block = slice(r, r + rows)
    np.subtract(raw[block], lo, out=image[block])
    image[block] *= scale


def lowres(signal_hwt, keep):
  """The image of an acquisition that sampled only the central ``keep`` (rows, cols)
  fraction of k-space, zero-filled to 128 x 128: blur plus Gibbs ringing at edges."""
  k = np.fft.fft2(signal_hwt, axes=(0, 1))
  for axis, frac in enumerate(keep):
    f = np.abs(np.fft.fftfreq(SIZE))
    shape = [1, 1, 1]
    shape[axis] = SIZE
    k *= (f <= 0.5 * frac).reshape(shape)
  return np.abs(np.fft.ifft2(k, axes=(0, 1))).astype(np.float32)


def cut_off(raw, image, angle, distance_px):
  """Zeroes (in place) the pixels beyond ``distance_px`` from the centre along ``angle``, as
  at the edge of a reconstructed field of view, and renormalises ``image`` to [0, 1]."""
  rows, cols = np.indices((SIZE, SIZE), dtype=np.float32) - (SIZE - 1) / 2.0
  outside = cols * np.cos(angle) - rows * np.sin(angle) > distance_px
  raw[outside] = 0.0
  lo, hi = raw.min(), raw.max()
  np.subtract(raw, lo, out=image)
  image *= np.float32(1.0 / max(hi - lo, 1e-12))
