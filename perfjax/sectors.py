"""AHA sector geometry of a short-axis slice: LV centre, RV insertion points, sector maps.

Everything follows CONVENTIONS.md ("Orientation and angles", "AHA sectors"):

* angles are about the LV blood-pool centroid (cy, cx),
  ``theta = degrees(atan2(-(row - cy), col - cx)) mod 360`` (90 up/anterior,
  180 left/septal, 270 down/inferior, 0 right/lateral; counter-clockwise as shown);
* the RV insertion points (RVIPs) are the two ends of the arc where the RV blood pool
  touches the myocardium's outer border; theta_s is the bisector of that arc (septal side);
* sector k (1..6) is the wedge ``[theta_s + (k-3)*60, theta_s + (k-2)*60)``; n_angular = 6m
  splits each wedge in m equal parts numbered counter-clockwise from the start of sector 1;
* radial layer 1 (endocardial) when a myocardium pixel is strictly nearer the LV blood pool
  than the outside of the myocardium, else 2 (epicardial); index
  ``(angular - 1) * n_radial + radial``, 0 outside the myocardium.

Degenerate masks (no LV, no myocardium, no RV, RV not touching the myocardium) raise
:class:`perfjax.errors.InputError`; callers that must not crash catch it and flag the slice.
All functions are numpy/scipy (they run per slice, outside jit).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from perfjax import conventions
from perfjax.errors import InputError

MYO, LV, RV = conventions.MYOCARDIUM, conventions.LV_BLOOD_POOL, conventions.RV_BLOOD_POOL
SLICE_LEVELS = {"basal": 0, "mid": 1, "apical": 2}
# Apical slices have 4 AHA segments (13 anterior, 14 septal, 15 inferior, 16 lateral); the six
# sectors map onto them as anterior <- 1, septal <- 2+3, inferior <- 4, lateral <- 5+6, so each of
# the four takes the 6-sector wedges whose centres lie in its 90-degree quadrant.
APICAL_FROM_SIX = ((13, (1,)), (14, (2, 3)), (15, (4,)), (16, (5, 6)))


def _check_mask(mask, source: str = "mask") -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise InputError(source, f"expected a 2D label map [H, W], got shape {mask.shape}")
  if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
    raise InputError(source, f"expected integer labels 0..3, got dtype {mask.dtype}")
  return mask


def lv_centroid(mask, source: str = "mask") -> tuple[float, float]:
  """(cy, cx) centroid of the LV blood pool (label 2) in pixel (row, col) coordinates."""
  mask = _check_mask(mask, source)
  rows, cols = np.nonzero(mask == LV)
  if rows.size == 0:
    raise InputError(source, "no LV blood pool (label 2): the sector centre is undefined")
  return float(rows.mean()), float(cols.mean())


def angle_map(shape: Sequence[int], cy: float, cx: float) -> np.ndarray:
  """Angle in degrees [0, 360) of every pixel of an [H, W] grid about (cy, cx)."""
  rows, cols = np.indices(tuple(shape)[:2], dtype=np.float64)
  return np.mod(np.degrees(np.arctan2(-(rows - cy), cols - cx)), 360.0)


def _largest_component(binary: np.ndarray) -> np.ndarray:
  labels, n = ndimage.label(binary, structure=np.ones((3, 3), bool))
  if n <= 1:
    return binary
  sizes = np.bincount(labels.ravel())[1:]
  return labels == (int(np.argmax(sizes)) + 1)


def _arc(angles_deg: np.ndarray) -> tuple[float, float]:
  """Smallest arc (start, extent) counter-clockwise that holds all angles (wrap-safe).

  The arc is the complement of the largest circular gap between consecutive angles.
  """
  a = np.sort(np.mod(angles_deg, 360.0))
  gaps = np.diff(np.concatenate([a, a[:1] + 360.0]))
  i = int(np.argmax(gaps))  # largest gap runs from a[i] to a[i + 1] (mod n)
  start = a[(i + 1) % a.size]
  extent = 360.0 - gaps[i]
  return float(start), float(extent)


def _contacts(myo: np.ndarray, rv: np.ndarray):
  """Points of the border shared by myocardium and RV pixel squares, and their myo pixels.

  Unit edges between 4-neighbours (both ends of each), so the arc is that of the
  pixelated border itself; corner contacts (diagonal pairs, the shared corner) count only
  when there are no edge contacts.
  """
  h, w = myo.shape
  rr0, cc0 = np.nonzero(myo)
  pts, myo_pts = [], []
  for shifts in (((0, 1), (0, -1), (1, 0), (-1, 0)), ((1, 1), (1, -1), (-1, 1), (-1, -1))):
    for dr, dc in shifts:
      r2, c2 = rr0 + dr, cc0 + dc
      inside = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
      rr, cc = rr0[inside], cc0[inside]
      hit = rv[r2[inside], c2[inside]]
      mid = np.stack([rr[hit] + dr / 2.0, cc[hit] + dc / 2.0], axis=-1)
      ends = [(0.0, 0.0)] if dr and dc else [(dc / 2.0, dr / 2.0), (-dc / 2.0, -dr / 2.0)]
      for er, ec in ends:
        pts.append(mid + np.array([er, ec]))
        myo_pts.append(np.stack([rr[hit], cc[hit]], axis=-1))
    if sum(len(p) for p in pts) >= 2:
      break
  return np.concatenate(pts), np.concatenate(myo_pts)


def rv_insertion_points(mask, center=None, source: str = "mask", max_gap: int = 2) -> dict:
  """RV insertion points where the RV blood pool meets the myocardium's outer border.

  The contact is the border shared by the myocardium's and the RV's pixel squares (unit
  edges between 4-neighbours, both ends of each; shared corners of diagonal neighbours only
  when there are no edges); the RV lies outside the myocardium, so it is on the
  myocardium's outer border. Only the largest 8-connected RV component counts, so stray
  RV islands of a predicted mask do not move the points. The contact angles about the LV
  centre span one arc, found wrap-safe as the complement of the largest gap. Walking
  counter-clockwise (standard display: RV on the left) the arc starts at the anterior
  RVIP and ends at the inferior one; theta_s is the arc's bisector, on the septal side by
  construction. The points lie within about a pixel of the true ones (0.7 px at most
  on random rings), i.e. +-3 degrees at an outer radius of 15 px. When the RV does not
  touch the myocardium but comes within ``max_gap`` px, the gap is closed first by growing
  the RV into background pixels (a fallback: direct contact is always used when present).

  Args:
    mask: int [H, W] labels (0 bg, 1 myo, 2 LV, 3 RV).
    center: optional (cy, cx) to measure angles about; default the LV centroid.
    source: name used in error messages.
    max_gap: largest RV-to-myocardium background gap (px) that still counts as contact.

  Returns:
    dict(anterior=(row, col), inferior=(row, col), theta_anterior, theta_inferior, theta_s)
    with angles in degrees [0, 360); the points are the myocardium pixels of the contacts
    at the arc's ends (the outermost one when several share the extreme angle).
  """
  mask = _check_mask(mask, source)
  cy, cx = lv_centroid(mask, source) if center is None else (float(center[0]), float(center[1]))
  myo = mask == MYO
  rv = mask == RV
  if not myo.any():
    raise InputError(source, "no myocardium (label 1): RV insertion points are undefined")
  if not rv.any():
    raise InputError(source, "no RV blood pool (label 3): RV insertion points are undefined")
  rv = _largest_component(rv)
  pts, myo_pts = _contacts(myo, rv)
  if len(pts) < 2 and max_gap > 0:
    # A thin background gap (a predicted mask, or contours drawn apart): close it by
    # growing the RV into background pixels only, then look for contacts again.
    near = ndimage.distance_transform_edt(~rv) <= max_gap
    pts, myo_pts = _contacts(myo, rv | (near & (mask == 0)))
  if len(pts) < 2:
    raise InputError(source, f"the RV blood pool does not touch the myocardium (fewer than 2 "
                     f"contacts within {max_gap} px): RV insertion points are undefined")
  theta = np.mod(np.degrees(np.arctan2(-(pts[:, 0] - cy), pts[:, 1] - cx)), 360.0)
  start, extent = _arc(theta)
  if extent <= 0.0:
    raise InputError(source, "the RV touches the myocardium at a single angle: RV insertion "
                     "points are undefined")
  end = np.mod(start + extent, 360.0)
  radius = np.hypot(pts[:, 0] - cy, pts[:, 1] - cx)

  def _point(theta_end: float) -> tuple[int, int]:
    d = np.abs(np.mod(theta - theta_end + 180.0, 360.0) - 180.0)
    near = np.nonzero(d <= d.min() + 1e-9)[0]
    j = near[int(np.argmax(radius[near]))]
    return int(myo_pts[j, 0]), int(myo_pts[j, 1])

  return dict(anterior=_point(start), inferior=_point(end), theta_anterior=start,
              theta_inferior=float(end), theta_s=float(np.mod(start + extent / 2.0, 360.0)))


def septal_angle(mask, center=None, source: str = "mask", max_gap: int = 2) -> float:
  """theta_s in degrees: the bisector of the two RV insertion points on the septal side."""
  return rv_insertion_points(mask, center=center, source=source, max_gap=max_gap)["theta_s"]


def _check_n_angular(n_angular: int) -> int:
  if int(n_angular) != n_angular or n_angular <= 0 or n_angular % 6:
    raise InputError("n_angular", f"must be a positive multiple of 6, got {n_angular}")
  return int(n_angular)


def angular_index(shape: Sequence[int], center, theta_s: float, n_angular: int = 6) -> np.ndarray:
  """Angular (sub-)sector 1..n_angular of every pixel of an [H, W] grid, myocardium or not.

  Sub-sector j covers ``[theta_s - 120 + (j-1) w, theta_s - 120 + j w)`` with w = 360 /
  n_angular, so j = 1 starts sector 1 and numbering runs counter-clockwise; for n_angular = 6
  this is the AHA wedge of CONVENTIONS.md. The wedges of every pixel are what the
  uncertainty regions M_k (a dilated myocardium) are cut with.
  """
  n_angular = _check_n_angular(n_angular)
  if not np.isfinite(theta_s):
    raise InputError("theta_s", f"must be finite, got {theta_s}")
  if np.shape(center) != (2,) or not np.all(np.isfinite(center)):
    raise InputError("center", f"must be a finite (cy, cx), got {center}")
  width = 360.0 / n_angular
  theta = angle_map(shape, float(center[0]), float(center[1]))
  rel = np.mod(theta - (float(theta_s) - 120.0), 360.0)
  # The tiny epsilon puts a pixel lying on a boundary (up to rounding) in the upper wedge,
  # matching the half-open [start, end) intervals.
  idx = np.floor(rel / width + 1e-9).astype(np.int32)
  return np.mod(idx, n_angular).astype(np.int32) + 1


def radial_layer(mask, source: str = "mask") -> np.ndarray:
  """int32 [H, W]: 1 endocardial, 2 epicardial on myocardium pixels, 0 elsewhere.

  Layer 1 when the Euclidean distance to the nearest LV blood-pool pixel is strictly less
  than the distance to the nearest pixel outside myocardium and LV (ties are epicardial).
  """
  mask = _check_mask(mask, source)
  myo = mask == MYO
  lv = mask == LV
  if not lv.any():
    raise InputError(source, "no LV blood pool (label 2): radial layers are undefined")
  d_lv = ndimage.distance_transform_edt(~lv)
  inside = myo | lv
  if inside.all():
    raise InputError(source, "myocardium and LV fill the whole image: no outside to measure")
  d_out = ndimage.distance_transform_edt(inside)
  layer = np.where(d_lv < d_out, 1, 2).astype(np.int32)
  return np.where(myo, layer, 0).astype(np.int32)


def sector_map(mask, n_angular: int = 6, n_radial: int = 1, theta_s: float | None = None,
               center=None, source: str = "mask") -> np.ndarray:
  """int32 [H, W] sector index per CONVENTIONS.md: 0 outside the myocardium, 1..K inside.

  Index ``(angular - 1) * n_radial + radial``: 6 x 1 (AHA 6), 6 x 2 (12-sector), 24 x 2
  (48-sector). ``theta_s`` and ``center`` default to the mask's own RVIP bisector and LV
  centroid; pass the ground truth's to divide a predicted mask with the same geometry.
  Radial layers always come from the mask itself.
  """
  mask = _check_mask(mask, source)
  n_angular = _check_n_angular(n_angular)
  if n_radial not in (1, 2):
    raise InputError("n_radial", f"must be 1 or 2, got {n_radial}")
  myo = mask == MYO
  if not myo.any():
    raise InputError(source, "no myocardium (label 1): nothing to divide into sectors")
  if center is None:
    center = lv_centroid(mask, source)
  if theta_s is None:
    theta_s = rv_insertion_points(mask, center=center, source=source)["theta_s"]
  ang = angular_index(mask.shape, center, theta_s, n_angular)
  if n_radial == 1:
    out = ang
  else:
    out = (ang - 1) * 2 + radial_layer(mask, source)
  return np.where(myo, out, 0).astype(np.int32)


def sector_means(values, smap: np.ndarray, n_sectors: int) -> np.ndarray:
  """Mean of ``values`` [H, W] (or [H, W, ...]) over each sector 1..n_sectors; NaN if empty."""
  values = np.asarray(values, dtype=np.float64)
  smap = np.asarray(smap)
  flat = values.reshape(smap.size, -1)
  ids = smap.ravel()
  counts = np.bincount(ids, minlength=n_sectors + 1)[1:n_sectors + 1].astype(np.float64)
  inside = np.nonzero((ids >= 1) & (ids <= n_sectors))[0]  # the sector pixels only
  ids, flat = ids[inside], flat[inside]
  sums = np.stack([np.bincount(ids, weights=flat[:, c], minlength=n_sectors + 1)[1:n_sectors + 1]
                   for c in range(flat.shape[1])], axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    means = sums / counts[:, None]
  return means.reshape((n_sectors,) + values.shape[2:])


def _level(level) -> int:
  if isinstance(level, str):
    if level.lower() not in SLICE_LEVELS:
      raise InputError("level", f"must be one of {sorted(SLICE_LEVELS)} or 0/1/2, got {level!r}")
    return SLICE_LEVELS[level.lower()]
  if level not in (0, 1, 2):
    raise InputError("level", f"must be 0 (basal), 1 (mid) or 2 (apical), got {level!r}")
  return int(level)


def aha16(level, values6, weights6=None) -> dict[int, float]:
  """Six sector values of one slice -> {AHA segment number: value} for a 16-segment bullseye.

  Basal (level 0) sectors 1..6 are segments 1..6, mid (1) are 7..12. Apical (2) has four
  segments: 13 anterior <- sector 1, 14 septal <- sectors 2 and 3, 15 inferior <- sector 4,
  16 lateral <- sectors 5 and 6 (a mean, weighted by ``weights6`` such as pixel counts when
  given; NaN sectors are skipped).
  """
  lvl = _level(level)
  v = np.asarray(values6, dtype=np.float64)
  if v.shape != (6,):
    raise InputError("values6", f"expected 6 sector values, got shape {v.shape}")
  if lvl < 2:
    return {lvl * 6 + k + 1: float(v[k]) for k in range(6)}
  w = np.ones(6) if weights6 is None else np.asarray(weights6, dtype=np.float64)
  if w.shape != (6,) or np.any(w < 0):
    raise InputError("weights6", f"expected 6 non-negative weights, got {w}")
  out = {}
  for seg, sectors in APICAL_FROM_SIX:
    idx = np.asarray(sectors) - 1
    ok = np.isfinite(v[idx]) & (w[idx] > 0)
    out[seg] = float(np.sum(v[idx][ok] * w[idx][ok]) / np.sum(w[idx][ok])) if ok.any() else np.nan
  return out


def bullseye16(values6_by_level: dict, weights6_by_level: dict | None = None) -> np.ndarray:
  """float64 [16]: AHA segments 1..16 (index 0 is segment 1) from {level: 6 values}.

  Segments of levels not given are NaN.
  """
  out = np.full(16, np.nan)
  for level, values6 in values6_by_level.items():
    weights = None if weights6_by_level is None else weights6_by_level.get(level)
    for seg, value in aha16(level, values6, weights).items():
      out[seg - 1] = value
  return out
