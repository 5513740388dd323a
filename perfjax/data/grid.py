"""Where a slice's pixels lie: the in-plane layouts, the display rule, affines and spacing.

A reader's `grid` is a dict: `kind` ("nifti" or "dicom"), `affine` (RAS mm of the stored voxels
[X, Y, ...]), `oriented` (the file said where it lies), `layout` (transpose, flip rows, flip
cols: how the CONVENTIONS display array was made from the stored layout's array),
`stored_shape` [X, Y], `slice_axis` (a singleton third axis), `header` (NIfTI) and `study`
(DICOM). `perfjax.data.io` reads and writes files with it; `perfjax.predict` places its
outputs with `array_affine`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from perfjax.errors import InputError

# Bounds of what a perfusion slice can be: anything outside is a header error, found before any
# compute (a 200 mm "pixel" would otherwise ask the resampler for tens of GiB).
PIXEL_MM_RANGE = (0.05, 20.0)


def check_pixel_mm(pixel_mm, source) -> tuple[float, float]:
  """(row, col) spacing in mm within PIXEL_MM_RANGE, else `InputError(source, ...)`."""
  lo, hi = PIXEL_MM_RANGE
  try:
    pr, pc = (float(v) for v in pixel_mm)
  except (TypeError, ValueError) as e:
    raise InputError(source, f"pixel spacing must be two numbers (row, col) in mm, got "
                             f"{pixel_mm!r} ({e})") from None
  if not all(np.isfinite(v) and lo <= v <= hi for v in (pr, pc)):
    raise InputError(source, f"pixel spacing {pr:g} x {pc:g} mm is outside {lo:g}-{hi:g} mm: "
                             "check the header's pixel size (pixdim / PixelSpacing)")
  return pr, pc


# The in-plane layouts: (transpose, flip rows, flip columns), applied in that order to the
# stored layout's array. The first is the stored layout (preferred on ties).
LAYOUTS = [(t, fr, fc) for t in (False, True) for fr in (False, True) for fc in (False, True)]
STORED_LAYOUT = LAYOUTS[0]
_TARGET_RIGHT = np.array([1.0, 0.0, 0.0])  # +L (LPS)
_TARGET_DOWN = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)  # +P +I (LPS)


def apply_layout(array: np.ndarray, layout) -> np.ndarray:
  transpose, flip_r, flip_c = layout
  if transpose:
    array = np.swapaxes(array, 0, 1)
  if flip_r:
    array = np.flip(array, 0)
  if flip_c:
    array = np.flip(array, 1)
  return np.ascontiguousarray(array)


def undo_layout(array: np.ndarray, layout) -> np.ndarray:
  transpose, flip_r, flip_c = layout
  if flip_c:
    array = np.flip(array, 1)
  if flip_r:
    array = np.flip(array, 0)
  if transpose:
    array = np.swapaxes(array, 0, 1)
  return np.ascontiguousarray(array)


def display_layout(affine: np.ndarray) -> tuple[bool, bool, bool]:
  """The in-plane layout (transpose, flip rows, flip cols) of the CONVENTIONS display.

  `affine` maps stored voxels (i, j, k) to RAS mm. In the stored layout's array columns run
  along +i and rows along -j; of the 8 layouts the one whose column direction is nearest
  +L and whose row direction is nearest +P+I (LPS) wins; ties keep the earlier layout.
  """
  a = np.asarray(affine, np.float64)[:3, :3] * np.array([-1.0, -1.0, 1.0])[:, None]  # -> LPS
  norms = np.linalg.norm(a, axis=0)
  if not (np.all(np.isfinite(a)) and norms[0] > 0 and norms[1] > 0):
    return STORED_LAYOUT
  right0, down0 = a[:, 0] / norms[0], -a[:, 1] / norms[1]
  best, best_score = STORED_LAYOUT, -np.inf
  for layout in LAYOUTS:
    transpose, flip_r, flip_c = layout
    right, down = (down0, right0) if transpose else (right0, down0)
    right = -right if flip_c else right
    down = -down if flip_r else down
    score = float(right @ _TARGET_RIGHT + down @ _TARGET_DOWN)
    if score > best_score + 1e-6:
      best, best_score = layout, score
  return best


def stored_affine(pixel_mm: tuple[float, float]) -> np.ndarray:
  """RAS affine of an array `[H, W]` stored by `write_nifti` (columns +L, rows +P): the
  display layout of the reader without any transform."""
  return np.diag([-float(pixel_mm[1]), float(pixel_mm[0]), 1.0, 1.0])


def array_affine(grid: dict[str, Any], to_input: Any, shape_hw: tuple[int, int]) -> np.ndarray:
  """RAS affine for `write_nifti` of an array `[H', W']` whose (row, col) map to the input
  array's (row, col) by the 3 x 3 homogeneous `to_input` (the crop's `transform`): the crop's
  outputs then lie where they belong in the input's patient space."""
  layout = grid["layout"]
  n_x, n_y = grid["stored_shape"]  # stored voxels [X, Y]; the stored layout's array is [Y, X]
  hh, ww = (n_x, n_y) if layout[0] else (n_y, n_x)  # the input array's [H, W]
  undo = np.eye(3)
  if layout[2]:
    undo = np.array([[1, 0, 0], [0, -1, ww - 1], [0, 0, 1]], float) @ undo
  if layout[1]:
    undo = np.array([[-1, 0, hh - 1], [0, 1, 0], [0, 0, 1]], float) @ undo
  if layout[0]:
    undo = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float) @ undo
  to_voxel = np.array([[0, 1, 0], [-1, 0, n_y - 1], [0, 0, 1]], float)  # (r0, c0) -> (i, j)
  written = np.array([[0, -1, shape_hw[0] - 1], [1, 0, 0], [0, 0, 1]], float)  # (i', j') -> (r, c)
  m = to_voxel @ undo @ np.asarray(to_input, float) @ written  # (i', j', 1) -> (i, j, 1)
  affine = np.asarray(grid["affine"], float)
  out = np.eye(4)
  for k in range(2):
    out[:3, k] = affine[:3, 0] * m[0, k] + affine[:3, 1] * m[1, k]
  out[:3, 2] = affine[:3, 2]
  out[:3, 3] = affine[:3, 3] + affine[:3, 0] * m[0, 2] + affine[:3, 1] * m[1, 2]
  return out


def grid_summary(grid: dict[str, Any]) -> dict[str, Any]:
  """The JSON-able part of a grid (for slices.json)."""
  return dict(kind=grid["kind"], affine=np.asarray(grid["affine"], float).round(6).tolist(),
              stored_shape=list(grid["stored_shape"]), oriented=bool(grid["oriented"]),
              layout=dict(zip(("transpose", "flip_rows", "flip_cols"),
                              (bool(v) for v in grid["layout"]))))
