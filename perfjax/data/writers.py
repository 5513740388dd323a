"""Atomic writers for outputs: JSON (`write_json`, `jsonable`) and NIfTI (`write_nifti` in the
CONVENTIONS.md display layout, `write_on_grid` on an input's own voxels).

Every file appears whole or not at all (`atomic_path`: written beside its target, then
renamed), with the permissions the umask gives, so an interrupted job never leaves a
half-written output.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterator

import numpy as np

from perfjax.data import preprocess
from perfjax.data.grid import stored_affine, undo_layout
from perfjax.data.nifti import NIFTI_SUFFIXES, is_nifti, to_nifti_axes
from perfjax.data.sidecar import sidecar_path
from perfjax.errors import InputError


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; on success it replaces `path` atomically.

  On any error the temporary file is removed, so nothing half-written is left behind. The
  file gets the ordinary permissions of a new file (0666 less the umask), not mkstemp's 0600.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    if tmp.exists():
      os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def jsonable(value: Any) -> Any:
  """Numpy scalars/arrays to Python; NaN and Inf to None (JSON has neither)."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Strict JSON (numpy to Python, NaN and Inf as null), written atomically."""
  with atomic_path(path, ".json") as tmp:
    tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False))


def _save_nifti(path: pathlib.Path, data: np.ndarray, affine: np.ndarray, header: Any = None,
                zooms: list[float] | None = None, times: Any = None, t_unit: str = "sec",
                intent: str | None = None) -> pathlib.Path:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  if data.dtype == np.bool_ or np.issubdtype(data.dtype, np.integer):
    small = data.size == 0 or (data.min() >= -32768 and data.max() <= 32767)
    data = data.astype(np.int16 if small else np.int32)
  else:
    data = data.astype(np.float32)
  img = nib.Nifti1Image(data, affine)
  if header is not None:  # the input's orientation codes
    img.set_qform(affine, int(header["qform_code"]) or 1)
    img.set_sform(affine, int(header["sform_code"]) or 1)
  else:
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
  img.header.set_xyzt_units("mm", t_unit)
  if zooms is not None:
    img.header.set_zooms(zooms)
  if intent is not None:
    img.header.set_intent(intent)
  suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
  with atomic_path(path, suffix) as tmp:  # nibabel compresses by the suffix
    nib.save(img, str(tmp))
    if times is not None:
      with atomic_path(sidecar_path(path)) as side:
        side.write_text(json.dumps({"times": [float(t) for t in times]}))
  return path


def write_nifti(path: str | os.PathLike, array: Any, pixel_mm: tuple[float, float] = (1.0, 1.0),
                times: Any = None, affine: Any = None, channels: bool = False) -> pathlib.Path:
  """Writes `array [H, W]` or `[H, W, T]` ([row, col]) as NIfTI, atomically.

  2D+time arrays are stored `[X, Y, 1, T]`; with `times` a JSON sidecar (same name,
  `.json`) keeps the exact frame times and pixdim[4] their mean spacing. With `channels`,
  `[H, W, K]` is stored `[X, Y, 1, 1, K]` (K on the 5th dimension, NIfTI's vector intent: e.g.
  class probabilities), never on the time axis. Integer arrays are stored as int16 (masks)
  when they fit, floats as float32. `affine` (RAS, of the stored voxels `[X, Y, ...]` =
  `to_nifti_axes(array)`) defaults to `stored_affine(pixel_mm)`; `read_nifti` reads the
  result back to the same arrays.
  """
  path = pathlib.Path(path)
  if not is_nifti(path):
    raise InputError(path, f"NIfTI output must end with {' or '.join(NIFTI_SUFFIXES)}")
  array = np.asarray(array)
  if array.ndim not in (2, 3):
    raise InputError(path, f"can write [H, W] or [H, W, T] arrays, got shape {list(array.shape)}")
  data = to_nifti_axes(array)
  if affine is None:
    affine = stored_affine(pixel_mm)
  affine = np.asarray(affine, np.float64)
  spatial = [float(np.linalg.norm(affine[:3, k])) for k in range(3)]
  if channels and data.ndim == 3:
    data = data[:, :, None, None, :]
    return _save_nifti(path, data, affine, zooms=spatial + [1.0, 1.0], intent="vector")
  if data.ndim == 3:
    data = data[:, :, None, :]
  zooms = spatial[:2] + [spatial[2], 1.0][:data.ndim - 2]
  if times is not None:
    times = preprocess.validate_times(times, array.shape[-1] if array.ndim == 3 else -1, str(path))
    if times.size > 1:
      zooms[-1] = float(np.mean(np.diff(times)))
  return _save_nifti(path, data, affine, zooms=zooms, times=times)


def write_on_grid(path: str | os.PathLike, array: Any, grid: dict[str, Any],
                  channels: bool = False) -> pathlib.Path:
  """Writes `array [H, W]` (or `[H, W, K]` with `channels`), given on the input slice's array
  grid (`preprocess.to_original`), on the input's own stored voxels with its own affine and
  orientation codes: it overlays the input exactly. `[X, Y]` for a 3D input `[X, Y, T]`,
  `[X, Y, 1]` for `[X, Y, 1, T]`; channels on the 5th dimension `[X, Y, 1, 1, K]`."""
  path = pathlib.Path(path)
  if not is_nifti(path):
    raise InputError(path, f"NIfTI output must end with {' or '.join(NIFTI_SUFFIXES)}")
  array = np.asarray(array)
  data = to_nifti_axes(undo_layout(array, grid["layout"]))
  if tuple(data.shape[:2]) != tuple(grid["stored_shape"]):
    raise InputError(path, f"array {list(array.shape)} is not on the input grid "
                           f"{list(grid['stored_shape'])}")
  affine = np.asarray(grid["affine"], np.float64)
  spatial = [float(np.linalg.norm(affine[:3, k])) or 1.0 for k in range(3)]
  if channels:
    data, zooms = data[:, :, None, None, :], spatial + [1.0, 1.0]
  elif data.ndim == 2 and grid.get("slice_axis"):
    data, zooms = data[:, :, None], spatial
  elif data.ndim == 2:
    data, zooms = data, spatial[:2]
  else:
    raise InputError(path, f"can write [H, W] (or [H, W, K] channels), got {list(array.shape)}")
  return _save_nifti(path, data, affine, header=grid.get("header"), zooms=zooms,
                     intent="vector" if channels else None)
