"""Readers for real perfusion data and atomic writers for outputs.

Readers return CONVENTIONS.md arrays, checked by `preprocess.validate_slice` with the
file as the source, so every problem is one `InputError(path, problem)`:
`image float32 [H, W, T]` indexed [row, col] (row 0 at the top), `times float64 [T]`
in seconds from the first frame, an optional `mask int32 [H, W]`, and `pixel_mm`
(row spacing, column spacing) in mm or None.

NIfTI (`read_nifti`, `read_nifti_mask`): image `[X, Y, T]` or `[X, Y, 1, T]`, mask `[X, Y]`,
`[X, Y, 1]` or `[X, Y, 1, 1]`; or several slices of one acquisition, image `[X, Y, Z, T]` (as
dcm2niix writes a multi-slice perfusion series) and mask `[X, Y, Z]`, read one slice at a time
(`slice_index`; `slice_count` says how many); real numbers only (complex and RGB files are
refused, never cast). Orientation: the file's affine (sform, else qform) is read
and the slice is reoriented, without interpolation (only a transpose and flips of the two
in-plane axes), to the CONVENTIONS.md display, the radiological one a DICOM viewer shows for
an axial or short-axis image: of the 8 in-plane layouts the one whose columns point most
toward the patient's left (+L) and whose rows point most toward posterior + inferior
(+P +I) is chosen, so the anterior wall is at the top and the RV on the image's left (ties:
the stored layout). A file with no orientation (sform and qform codes 0) is taken as stored:
`array[row, col] = data[col, Y - 1 - row]` (numpy `rot90`, the layout of dcm2niix and NIfTI
viewers). `write_nifti` writes the affine of that layout (`diag(-dx, dy, 1)`, RAS), so its
files round-trip. The reader also returns the slice's `grid` (affine, stored shape, the
in-plane transform) and `write_on_grid` puts an output back on the input's own voxels
with the input's own affine, so it overlays the input exactly in any viewer. Frame times
come from a JSON sidecar beside the image (same name, `.json`) with `"times"` (seconds,
one per frame; for `[X, Y, Z, T]` one list for all slices or one per slice) or
`"FrameTimesStart"`; else, for 4D files only, from `pixdim[4]` (uniform spacing, unit from
the header; an approximation, since frames are one per heartbeat); neither is an error.

DICOM: a folder holding one series (single- or multi-frame files), of one slice or of several
slice positions read one at a time (`perfjax.data.dicom`).
Where a slice lies (layouts, affines, spacing): `perfjax.data.grid`.

NumPy (`read_npz`): keys `image`, `times`, optional `mask`, `pixel_mm`; loaded with
`allow_pickle=False` (pickles are never loaded).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Iterator

import numpy as np

from perfjax import conventions
from perfjax.data import preprocess
from perfjax.data.dicom import dicom_slice_count, read_dicom_series
from perfjax.data.grid import (STORED_LAYOUT, apply_layout, check_pixel_mm, display_layout,
                               stored_affine, undo_layout)
from perfjax.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEC_PER_UNIT = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6, "unknown": 1.0}


def _nifti_stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def is_nifti(path: str | os.PathLike) -> bool:
  return str(path).endswith(NIFTI_SUFFIXES)


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
  """The JSON sidecar that holds a NIfTI file's frame times: `name.nii.gz` -> `name.json`."""
  path = pathlib.Path(path)
  return path.with_name(_nifti_stem(path) + ".json")


# The sidecar's optional sequence (`"sequence": {...}`): with it, predict fits concentration and
# reports MBF in ml/g/min; without it the flow is relative (uncalibrated signal). Times in
# seconds, the flip angle in degrees; native T1/T2 default to 3 T literature values.
SEQUENCE_FIELDS = ("protocol", "ts", "tr", "flip_deg", "n_pulses")
SEQUENCE_DEFAULTS = dict(t1_blood=1.85, t2_blood=0.25, t1_myo=1.20, t2_myo=0.045)
_SEQUENCE_BOUNDS = dict(ts=(0.0, 2.0), tr=(1e-4, 0.05), flip_deg=(1.0, 180.0),
                        n_pulses=(0.0, 1000.0), t1_blood=(0.1, 5.0), t2_blood=(0.005, 2.0),
                        t1_myo=(0.1, 5.0), t2_myo=(0.005, 2.0))
LEVEL_NAMES = ("basal", "mid", "apical")


def level_from_name(name: str) -> int:
  """Slice level from a name: 0 for basal/base, 1 for mid, 2 for apical/apex, else -1 (the
  rule of the manual dataset and of predict's study output)."""
  low = name.lower()
  for level, words in enumerate((("basal", "base"), ("mid",), ("apical", "apex"))):
    if any(re.search(rf"(^|[^a-z]){w}", low) for w in words):
      return level
  return -1


def _meta_path(path: pathlib.Path) -> pathlib.Path:
  """The sidecar of a file (`sidecar_path`) or of a DICOM folder (`folder.json` beside it)."""
  return path.with_name(path.name + ".json") if path.is_dir() else sidecar_path(path)


def _sidecar(path: pathlib.Path) -> dict[str, Any]:
  side = _meta_path(path)
  if not side.is_file():
    return {}
  try:
    meta = json.loads(side.read_text())
  except (OSError, ValueError) as e:
    raise InputError(side, f"unreadable JSON sidecar ({e})") from None
  if not isinstance(meta, dict):
    raise InputError(side, "JSON sidecar must be an object")
  return meta


def parse_sequence(value: Any, source: Any) -> dict[str, Any]:
  """A sidecar's `"sequence"` object -> the sequence dict of `perfjax.perfusion` (checked)."""
  if not isinstance(value, dict):
    raise InputError(source, '"sequence" must be an object with ' + ", ".join(SEQUENCE_FIELDS))
  missing = [k for k in SEQUENCE_FIELDS if k not in value]
  if missing:
    raise InputError(source, f'"sequence" lacks {", ".join(missing)} (needs '
                             f'{", ".join(SEQUENCE_FIELDS)}; optional t1_blood, t2_blood, '
                             "t1_myo, t2_myo in s)")
  unknown = sorted(set(value) - set(SEQUENCE_FIELDS) - set(SEQUENCE_DEFAULTS))
  if unknown:
    raise InputError(source, f'"sequence" has unknown fields {unknown}')
  protocol = str(value["protocol"]).lower()
  if protocol not in ("flash", "bssfp"):
    raise InputError(source, f'"sequence" protocol must be "flash" or "bssfp", got '
                             f'{value["protocol"]!r}')
  out: dict[str, Any] = dict(protocol=protocol)
  for key in SEQUENCE_FIELDS[1:] + tuple(SEQUENCE_DEFAULTS):
    out[key] = _bounded_number(value.get(key, SEQUENCE_DEFAULTS.get(key)), source,
                               f'"sequence" {key}', _SEQUENCE_BOUNDS[key],
                               " (seconds; the flip angle in degrees)")
  return out


def _bounded_number(raw: Any, source: Any, what: str, bounds: tuple[float, float],
                    units: str = "") -> float:
  """``raw`` as a finite float within ``bounds``, else the sidecar's one-line InputError."""
  try:
    number = float(raw)
  except (TypeError, ValueError):
    raise InputError(source, f"{what} {raw!r} is not a number") from None
  lo, hi = bounds
  if not (np.isfinite(number) and lo <= number <= hi):
    raise InputError(source, f"{what} = {number:g} is outside [{lo:g}, {hi:g}]{units}")
  return number


AIF_SERIES_FIELDS = ("file", "sequence")  # required; optional: pd_file, dose_ratio, lead_s


def _series_array(value: Any, side: pathlib.Path, key: str, ndim: int) -> np.ndarray:
  """A NIfTI file named by the sidecar's "aif_series" (relative to the sidecar's folder) as a
  float64 array of ``ndim`` dimensions (a singleton third axis dropped)."""
  if not isinstance(value, str) or not value:
    raise InputError(side, f'"aif_series" {key} must be a file name')
  path = (side.parent / value) if not pathlib.Path(value).is_absolute() else pathlib.Path(value)
  data, _ = _load_nifti(path)
  data = _from_nifti_axes(np.asarray(data, np.float64))
  if data.ndim == ndim + 1 and data.shape[2] == 1:
    data = data[:, :, 0]
  if data.ndim != ndim or not np.all(np.isfinite(data)):
    raise InputError(path, f"the AIF series' {key} must be a finite {ndim}-D image, got shape "
                           f"{list(data.shape)}")
  return data


def parse_aif_series(value: Any, side: pathlib.Path) -> dict[str, Any]:
  """A sidecar's `"aif_series"` object -> the series dict of `perfjax.perfusion`.

  `{"file": "aif.nii.gz", "sequence": {...}}` (`parse_sequence`; the series' own, e.g. the
  short-saturation FLASH of a dual-sequence AIF) with optional `"pd_file"` (the series'
  proton-density frame, [X, Y]), `"dose_ratio"` (main / pre-bolus dose of a dual bolus;
  default 1) and `"lead_s"` (how much earlier in each beat the series is read out than this
  slice, e.g. from the trigger times; default one beat). The series has the slice's frames,
  beat for beat ([X, Y, T] or [X, Y, 1, T]); its files are relative to the sidecar's folder.
  """
  if not isinstance(value, dict):
    raise InputError(side, '"aif_series" must be an object with ' + ", ".join(AIF_SERIES_FIELDS))
  missing = [k for k in AIF_SERIES_FIELDS if k not in value]
  unknown = sorted(set(value) - set(AIF_SERIES_FIELDS) - {"pd_file", "dose_ratio", "lead_s"})
  if missing or unknown:
    problem = " and ".join(([f"lacks {', '.join(missing)}"] if missing else []) +
                           ([f"has unknown fields {unknown}"] if unknown else []))
    raise InputError(side, f'"aif_series" {problem} (needs file, sequence; optional pd_file, '
                           "dose_ratio, lead_s)")
  out: dict[str, Any] = dict(image=_series_array(value["file"], side, "file", 3),
                             sequence=dict(parse_sequence(value["sequence"], side),
                                           sat_residual=0.0))
  out["pd"] = (None if value.get("pd_file") is None
               else _series_array(value["pd_file"], side, "pd_file", 2))
  if out["pd"] is not None and out["pd"].shape != out["image"].shape[:2]:
    raise InputError(side, f'"aif_series" pd_file is {list(out["pd"].shape)}, its file '
                           f'{list(out["image"].shape[:2])}')
  for key, bounds in (("dose_ratio", (1.0, 100.0)), ("lead_s", (-2.0, 5.0))):
    if key in value:
      out[key] = _bounded_number(value[key], side, f'"aif_series" {key}', bounds)
  return out


def _input_name(path: pathlib.Path) -> str:
  return path.name if path.is_dir() else _nifti_stem(path)


def slice_level(path: str | os.PathLike, slice_index: int | None = None,
                n_slices: int = 1) -> int:
  """A slice's level (0 basal, 1 mid, 2 apical, -1 unknown): the sidecar's `"slice_level"`
  (0/1/2 or "basal"/"mid"/"apical"; for an input of ``n_slices`` > 1, a list of one per
  slice), else a one-slice input's name (`level_from_name`), else -1."""
  path = pathlib.Path(path)
  side = _meta_path(path)
  level = _sidecar(path).get("slice_level")
  if isinstance(level, list) and n_slices > 1:
    if len(level) != n_slices:
      raise InputError(side, f'"slice_level" lists {len(level)} levels, the input holds '
                             f"{n_slices} slices")
    level = level[slice_index or 0]
  if level is None:
    return level_from_name(_input_name(path)) if n_slices == 1 else -1
  if isinstance(level, str) and level.lower() in LEVEL_NAMES:
    return LEVEL_NAMES.index(level.lower())
  if not (isinstance(level, int) and not isinstance(level, bool) and level in (0, 1, 2)):
    raise InputError(side, f'"slice_level" must be 0, 1, 2 or one of {list(LEVEL_NAMES)}, got '
                           f"{level!r}")
  return level


def per_slice(entries: list[tuple]) -> list[tuple]:
  """(name, image path, mask path, slice index) of each slice of `slice_entries`' (name, image
  path, mask path) inputs: index None for a one-slice input; a multi-slice NIfTI `[X, Y, Z, T]`
  or DICOM series gives `<name>_slice1`, ... in the order of its slices (`slice_count`)."""
  out = []
  for name, path, mask in entries:
    n = slice_count(path)
    out += ([(name, path, mask, None)] if n == 1 else
            [(f"{name}_slice{k + 1}", path, mask, k) for k in range(n)])
  return out


def slice_metadata(path: str | os.PathLike, grid: dict[str, Any] | None = None,
                   slice_index: int | None = None, n_slices: int = 1) -> dict[str, Any]:
  """What predict needs beyond the pixels: study, slice level and acquisition sequence.

  From the JSON sidecar (`name.json` beside a NIfTI/.npz file `name.nii.gz`/`name.npz` or a
  DICOM folder `name/`), all optional: `"study"` (text), `"slice_level"` (`slice_level`),
  `"sequence"` (`parse_sequence`), `"aif_series"` (`parse_aif_series`, only with a sequence).
  Defaults: the study is the DICOM StudyInstanceUID, else the file of a multi-slice input
  (``n_slices`` > 1), else the folder that holds the file; no sequence, no AIF series (None).
  Returns dict(study, slice_level, sequence, aif_series).
  """
  path = pathlib.Path(path)
  meta = _sidecar(path)
  side = _meta_path(path)
  study = meta.get("study")
  if study is None and grid is not None:
    study = grid.get("study")
  if study is None:
    study = _input_name(path) if n_slices > 1 else (path.resolve().parent.name or "study")
  level = slice_level(path, slice_index, n_slices)
  sequence = meta.get("sequence")
  series = meta.get("aif_series")
  if series is not None and sequence is None:
    raise InputError(side, '"aif_series" needs the slice\'s own "sequence" too (the tissue '
                           "curves are converted with it)")
  return dict(study=str(study), slice_level=int(level),
              sequence=None if sequence is None else parse_sequence(sequence, side),
              aif_series=None if series is None else parse_aif_series(series, side))


def _exists(path: pathlib.Path) -> None:
  if not path.exists():
    raise InputError(path, "file not found")


# ----------------------------------------------------------------------------- NIfTI


# Bounds of what a NIfTI slice can be, checked before its data are read.
MAX_PIXELS = 2048  # rows or columns of an input slice
MAX_FRAMES = 2000


def _load_nifti(path: pathlib.Path) -> tuple[np.ndarray, Any]:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  _exists(path)
  try:
    img = nib.load(str(path))
    dtype = np.dtype(img.get_data_dtype())
  except Exception as e:  # nibabel raises many types for broken or truncated files
    raise InputError(path, f"unreadable or truncated NIfTI file ({type(e).__name__}: "
                           f"{e})") from None
  # The dtype is checked before any cast: a complex file would lose its imaginary part and an
  # RGB file (a structured dtype) does not cast at all.
  if dtype.names is not None or dtype.kind == "V":
    raise InputError(path, f"colour (RGB) NIfTI data ({dtype}) is not supported; give the "
                           "magnitude image as real numbers")
  if dtype.kind == "c":
    raise InputError(path, f"complex NIfTI data ({dtype}) is not supported; give the "
                           "magnitude image (abs) as real numbers")
  if dtype.kind not in "biuf":
    raise InputError(path, f"NIfTI data must be real numbers, got dtype {dtype}")
  shape = tuple(int(n) for n in img.shape)
  if len(shape) >= 2 and max(shape[:2]) > MAX_PIXELS:
    raise InputError(path, f"image is too large: {shape[0]} x {shape[1]} pixels (at most "
                           f"{MAX_PIXELS})")
  if len(shape) >= 3 and shape[-1] > MAX_FRAMES:
    raise InputError(path, f"image has {shape[-1]} frames (at most {MAX_FRAMES})")
  try:
    data = np.asarray(img.dataobj)
  except Exception as e:  # nibabel raises many types for broken or truncated files
    raise InputError(path, f"unreadable or truncated NIfTI file ({type(e).__name__}: "
                           f"{e})") from None
  return data, img.header


def _from_nifti_axes(data: np.ndarray) -> np.ndarray:
  """NIfTI [i, j, ...] -> [row, col, ...]: `out[r, c] = data[c, Y - 1 - r]`."""
  return np.ascontiguousarray(np.flip(np.swapaxes(data, 0, 1), 0))


def _to_nifti_axes(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.swapaxes(np.flip(array, 0), 0, 1))


def _grid_pixel_mm(path: pathlib.Path, zooms, layout) -> tuple[float, float]:
  dx, dy = float(zooms[0]), float(zooms[1])
  pixel_mm = (dx, dy) if layout[0] else (dy, dx)
  check_pixel_mm(pixel_mm, path)
  return pixel_mm


def _nifti_grid(path: pathlib.Path, header: Any, data_shape: tuple[int, ...]) -> dict[str, Any]:
  """Where the slice lies: the file's affine and how the array was laid out from its voxels."""
  code_s, code_q = int(header["sform_code"]), int(header["qform_code"])
  oriented = code_s > 0 or code_q > 0
  try:
    affine = np.asarray(header.get_best_affine(), np.float64)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(path, f"unreadable affine in the NIfTI header ({e})") from None
  if not np.all(np.isfinite(affine)):
    raise InputError(path, "the NIfTI affine holds NaN/Inf values")
  layout = display_layout(affine) if oriented else STORED_LAYOUT
  return dict(kind="nifti", affine=affine, oriented=oriented, layout=layout,
              stored_shape=tuple(int(n) for n in data_shape[:2]),
              slice_axis=len(data_shape) == 4, header=header)


def _nifti_times(path: pathlib.Path, header: Any, data_shape: tuple[int, ...],
                 slice_index: int | None = None) -> np.ndarray:
  side = sidecar_path(path)
  n_t = data_shape[-1]
  if side.exists():
    try:
      meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
      raise InputError(side, f"unreadable JSON sidecar ({e})") from None
    key = next((k for k in ("times", "FrameTimesStart") if isinstance(meta, dict) and k in meta),
               None)
    if key is None:
      raise InputError(side, 'JSON sidecar has no "times" (seconds, one per frame)')
    values = meta[key]
    if isinstance(values, list) and values and all(isinstance(v, list) for v in values):
      n_z = data_shape[2] if len(data_shape) == 4 else 1
      if len(values) != n_z:
        raise InputError(side, f'"{key}" holds {len(values)} lists (one per slice), the image '
                               f"{n_z} slice(s)")
      values = values[slice_index or 0]
    else:
      _check_time_axis(path, side, values, data_shape)
    times = preprocess.validate_times(values, n_t, str(side))
    if n_t > 1 and np.median(np.diff(times)) > 10.0:
      raise InputError(side, f"frame times must be in seconds; a median spacing of "
                             f"{np.median(np.diff(times)):.4g} looks like milliseconds")
    return times
  if int(header["dim"][0]) < 4:
    raise InputError(path, f"no frame times: a 3D [X, Y, T] file needs a JSON sidecar "
                           f"{side.name} (pixdim[4] is only used for 4D [X, Y, 1, T] or "
                           "[X, Y, Z, T] files)")
  dt = float(header["pixdim"][4])
  unit = header.get_xyzt_units()[1]
  if not (np.isfinite(dt) and dt > 0):
    raise InputError(path, f"no frame times: no JSON sidecar {side.name} and pixdim[4] = {dt}")
  return np.arange(n_t, dtype=np.float64) * dt * _SEC_PER_UNIT.get(unit, 1.0)


def _check_time_axis(path: pathlib.Path, side: pathlib.Path, times: Any,
                     data_shape: tuple[int, ...]) -> None:
  """A file stored time first ([T, X, Y], as numpy-written files often are) has as many
  sidecar times as its first axis: say so, rather than that the times do not fit 'frames'
  that are really image columns."""
  n = len(times) if isinstance(times, list) else -1
  if n == data_shape[-1] or n not in data_shape[:-1]:
    return
  axis = data_shape[:-1].index(n)
  raise InputError(path, f"its axes are {list(data_shape)} and the {n} frame times of "
                         f"{side.name} match axis {axis}, not the last: perfjax reads a 2D+time "
                         f"NIfTI as [X, Y, T] or [X, Y, 1, T] (time last); move the time axis "
                         f"last and permute the affine's columns to match")


def _chosen_slice(path: pathlib.Path, n_slices: int, slice_index: int | None) -> int:
  """Which slice of a file with ``n_slices`` to read (0 for a one-slice file)."""
  if slice_index is None:
    if n_slices > 1:
      raise InputError(path, f"holds {n_slices} slices: read one at a time (slice_index; "
                             "predict splits such inputs itself)")
    return 0
  if not 0 <= slice_index < n_slices:
    raise InputError(path, f"has no slice {slice_index} (it holds {n_slices})")
  return int(slice_index)


def read_nifti(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
               n_frames: int = conventions.NUM_FRAMES,
               slice_index: int | None = None) -> dict[str, Any]:
  """Reads a NIfTI 2D+time image (and optional mask); see the module docstring.

  ``slice_index``: which slice of an `[X, Y, Z, T]` file (and of its `[X, Y, Z]` mask); its
  grid's affine is moved to that slice, so outputs written on it overlay that slice.

  Returns dict(image float32 [H, W, T], times float64 [T] from 0, mask int32 [H, W] or
  None, pixel_mm (row, col), grid: where the array lies (for `write_on_grid`), n_slices: the
  file's).
  """
  path = pathlib.Path(path)
  data, header = _load_nifti(path)
  if data.ndim not in (3, 4):
    raise InputError(path, f"expected a 2D+time image [X, Y, T], [X, Y, 1, T] or several "
                           f"slices [X, Y, Z, T], got shape {list(data.shape)}")
  grid = _nifti_grid(path, header, data.shape)
  k = _chosen_slice(path, data.shape[2] if data.ndim == 4 else 1, slice_index)
  if data.ndim == 4:
    affine = grid["affine"].copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
    grid["affine"] = affine
  image = data[:, :, k] if data.ndim == 4 else data
  image = apply_layout(_from_nifti_axes(image.astype(np.float32)), grid["layout"])
  times = _nifti_times(path, header, data.shape, slice_index)
  image, times, _ = preprocess.validate_slice(image, times, source=str(path), n_frames=n_frames)
  pixel_mm = _grid_pixel_mm(path, header.get_zooms(), grid["layout"])
  n_slices = data.shape[2] if data.ndim == 4 else 1
  mask = None
  if mask_path is not None:
    mask = read_nifti_mask(mask_path, image.shape[:2], layout=grid["layout"], slice_index=k,
                           n_slices=n_slices)
  return dict(image=image, times=times - times[0], mask=mask, pixel_mm=pixel_mm, grid=grid,
              n_slices=n_slices)


def read_nifti_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None,
                    layout=None, slice_index: int | None = None,
                    n_slices: int = 1) -> np.ndarray:
  """Reads a NIfTI label mask `[X, Y]` (or with singleton trailing axes) as int32 [H, W];
  for an image of ``n_slices`` > 1, slice ``slice_index`` of the mask `[X, Y, Z]`.

  `layout`: the image's in-plane layout (`read_nifti`'s grid), so the mask lands on the image;
  default: the mask file's own affine.
  """
  path = pathlib.Path(path)
  data, header = _load_nifti(path)
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if n_slices > 1:
    if data.ndim != 3 or data.shape[2] != n_slices:
      raise InputError(path, f"the image holds {n_slices} slices: expected a mask "
                             f"[X, Y, {n_slices}], got shape {list(data.shape)}")
    data = data[:, :, _chosen_slice(path, n_slices, slice_index)]
  elif data.ndim == 3 and data.shape[2] == 1:
    data = data[:, :, 0]
  if data.ndim != 2:
    raise InputError(path, f"expected a 2D mask [X, Y], got shape {list(data.shape)}")
  if layout is None:
    layout = _nifti_grid(path, header, data.shape)["layout"]
  return preprocess.validate_mask(apply_layout(_from_nifti_axes(data), layout), shape, str(path))


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
  `_to_nifti_axes(array)`) defaults to `stored_affine(pixel_mm)`; `read_nifti` reads the
  result back to the same arrays.
  """
  path = pathlib.Path(path)
  if not is_nifti(path):
    raise InputError(path, f"NIfTI output must end with {' or '.join(NIFTI_SUFFIXES)}")
  array = np.asarray(array)
  if array.ndim not in (2, 3):
    raise InputError(path, f"can write [H, W] or [H, W, T] arrays, got shape {list(array.shape)}")
  data = _to_nifti_axes(array)
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
  data = _to_nifti_axes(undo_layout(array, grid["layout"]))
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


# ----------------------------------------------------------------------------- npz / dispatch


def read_npz(path: str | os.PathLike, n_frames: int = conventions.NUM_FRAMES) -> dict[str, Any]:
  """Reads `image [H, W, T]`, `times [T]`, optional `mask`, `pixel_mm` from an .npz (no pickles)."""
  path = pathlib.Path(path)
  _exists(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile/ValueError (pickled objects are refused)/OSError
    raise InputError(path, f"unreadable .npz file ({type(e).__name__}: {e})") from None
  for key in ("image", "times"):
    if key not in arrays:
      raise InputError(path, f"missing array '{key}' (has {sorted(arrays)})")
  image, times, mask = preprocess.validate_slice(arrays["image"], arrays["times"],
                                                 arrays.get("mask"), str(path), n_frames)
  pixel_mm = None
  if "pixel_mm" in arrays:
    pm = np.broadcast_to(np.asarray(arrays["pixel_mm"], np.float64).ravel(), (2,))
    pixel_mm = (float(pm[0]), float(pm[1]))
  return dict(image=image, times=times - times[0], mask=mask, pixel_mm=pixel_mm)


MASK_SUFFIXES = ("_mask", "_seg", "_label", "_labels")  # A file stem ending so is not a slice.


def slice_entries(folder: str | os.PathLike, npz: bool = True
                  ) -> list[tuple[str, pathlib.Path, pathlib.Path | None]]:
  """The slices of a folder, sorted by name: (name, image path, mask path or None).

  A slice is a NIfTI file (`<name>.nii.gz` / `.nii`), with `npz` a `<name>.npz`, or a
  sub-folder of DICOM files (single- or multi-frame); its optional mask is `<name>_mask.nii.gz` (or
  `.nii`) beside it. Files whose stem ends in one of MASK_SUFFIXES, sidecars (`.json`) and
  hidden entries are not slices. The one reading rule of `--mode=predict` and of the `manual`
  dataset's study folders.
  """
  folder = pathlib.Path(folder)
  entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
  names = {p.name for p in entries}
  out = []
  for p in entries:
    if p.is_dir():
      stem = p.name
    elif is_nifti(p) or (npz and p.suffix == ".npz"):
      stem = _nifti_stem(p) if is_nifti(p) else p.stem
      if stem.lower().endswith(MASK_SUFFIXES):
        continue
    else:
      continue
    mask = next((folder / f"{stem}_mask{s}" for s in NIFTI_SUFFIXES
                 if f"{stem}_mask{s}" in names), None)
    out.append((stem, p, mask))
  return out


def slice_count(path: str | os.PathLike) -> int:
  """How many slices an input holds: Z of an `[X, Y, Z, T]` NIfTI, the slice positions of a
  DICOM series folder, else 1; from the headers alone. 1 for what cannot be read (reading
  it then reports the problem)."""
  path = pathlib.Path(path)
  try:
    if path.is_dir():
      return dicom_slice_count(path)
    if is_nifti(path):
      import nibabel as nib  # pylint: disable=g-import-not-at-top
      shape = nib.load(str(path)).shape
      return int(shape[2]) if len(shape) == 4 and shape[2] > 1 else 1
  except Exception:  # pylint: disable=broad-except  (the reader names the problem)
    return 1
  return 1


def read_slice(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
               n_frames: int = conventions.NUM_FRAMES,
               slice_index: int | None = None) -> dict[str, Any]:
  """Reads one slice from a DICOM folder, a NIfTI file or an .npz; an optional NIfTI mask.
  ``slice_index``: which slice of a multi-slice NIfTI or DICOM series (`slice_count`)."""
  path = pathlib.Path(path)
  if path.is_dir():
    out = read_dicom_series(path, n_frames, slice_index)
  elif is_nifti(path):
    return read_nifti(path, mask_path, n_frames, slice_index)
  elif path.suffix == ".npz":
    _chosen_slice(path, 1, slice_index)
    out = read_npz(path, n_frames)
  else:
    _exists(path)
    raise InputError(path, "unknown format: expected a DICOM folder, .nii/.nii.gz or .npz")
  if mask_path is not None:
    out["mask"] = read_nifti_mask(mask_path, out["image"].shape[:2], layout=STORED_LAYOUT,
                                  slice_index=slice_index, n_slices=out.get("n_slices", 1))
  return out


def load_preprocessed(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
                      target_pixel_mm: float | None = preprocess.TARGET_PIXEL_MM,
                      slice_index: int | None = None) -> dict[str, Any]:
  """Reads one slice (`read_slice`, ``slice_index`` of a multi-slice input) and preprocesses
  it (`preprocess.preprocess_slice`).

  Returns preprocess_slice's dict (image, raw, times, mask, peak_lv_frame, and the
  geometry that `preprocess.to_original` needs) plus `pixel_mm`: the input's spacing
  (None when the file does not say, in which case the slice is not resampled), and
  `n_slices`: the input's (`read_slice`).
  """
  data = read_slice(path, mask_path, slice_index=slice_index)
  out = preprocess.preprocess_slice(data["image"], data["times"], data["mask"],
                                    pixel_mm=data["pixel_mm"], target_pixel_mm=target_pixel_mm,
                                    source=str(path))
  out["pixel_mm"] = data["pixel_mm"]
  out["n_slices"] = data.get("n_slices", 1)
  return out
