"""Readers for real perfusion data: NIfTI, DICOM and .npz slices, one or a folder of them.

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
viewers). `perfjax.data.writers.write_nifti` writes the affine of that layout (`diag(-dx, dy,
1)`, RAS), so its files round-trip. The reader also returns the slice's `grid` (affine, stored
shape, the in-plane transform) and `writers.write_on_grid` puts an output back on the input's
own voxels with the input's own affine, so it overlays the input exactly in any viewer. Frame
times come from a JSON sidecar beside the image (same name, `.json`) with `"times"` (seconds,
one per frame; for `[X, Y, Z, T]` one list for all slices or one per slice) or
`"FrameTimesStart"`; else, for 4D files only, from `pixdim[4]` (uniform spacing, unit from
the header; an approximation, since frames are one per heartbeat); neither is an error. The
sidecar's other fields (study, level, sequence, AIF series): `perfjax.data.sidecar`.

DICOM: a folder holding one series (single- or multi-frame files), of one slice or of several
slice positions read one at a time (`perfjax.data.dicom`).
Where a slice lies (layouts, affines, spacing): `perfjax.data.grid`.

NumPy (`read_npz`): keys `image`, `times`, optional `mask`, `pixel_mm`; loaded with
`allow_pickle=False` (pickles are never loaded).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from perfjax import conventions
from perfjax.data import preprocess
from perfjax.data.dicom import dicom_slice_count, read_dicom_series
from perfjax.data.grid import STORED_LAYOUT, apply_layout, check_pixel_mm, display_layout
from perfjax.data.nifti import from_nifti_axes, is_nifti, load_nifti, must_exist, nifti_stem
from perfjax.data.sidecar import read_sidecar, sidecar_path
from perfjax.errors import InputError

_SEC_PER_UNIT = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6, "unknown": 1.0}


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



# ----------------------------------------------------------------------------- NIfTI

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
  """Frame times (s): the JSON sidecar's "times" (or "FrameTimesStart"), else pixdim[4] of a
  4D file. A sidecar with another key naming times is a mistake, not a fallback."""
  side = sidecar_path(path)
  n_t = data_shape[-1]
  four_d = int(header["dim"][0]) >= 4
  meta = read_sidecar(path) if side.exists() else {}
  key = next((k for k in ("times", "FrameTimesStart") if k in meta), None)
  time_like = [k for k in meta if "time" in str(k).lower()]
  if key is None and side.exists() and (time_like or not four_d):
    raise InputError(side, 'JSON sidecar has no "times" (seconds, one per frame' +
                     (f"; it has {', '.join(repr(k) for k in time_like)})" if time_like else
                      "; pixdim[4] is only used for 4D [X, Y, 1, T] or [X, Y, Z, T] files)"))
  if key is not None:
    values = meta[key]
    if isinstance(values, list) and values and all(isinstance(v, list) for v in values):
      n_z = data_shape[2] if len(data_shape) == 4 else 1
      if len(values) != n_z:
        raise InputError(side, f'"{key}" holds {len(values)} lists (one per slice), the image '
                               f"{n_z} slice(s)")
      values = values[slice_index or 0]
    else:
      _check_time_axis(path, side, values, data_shape)
    return preprocess.validate_times(values, n_t, str(side))
  if not four_d:
    raise InputError(path, f"no frame times: a 3D [X, Y, T] file needs a JSON sidecar "
                           f"{side.name} (pixdim[4] is only used for 4D [X, Y, 1, T] or "
                           "[X, Y, Z, T] files)")
  dt = float(header["pixdim"][4])
  unit = header.get_xyzt_units()[1]
  if not (np.isfinite(dt) and dt > 0):
    where = f'no "times" in {side.name}' if side.exists() else f"no JSON sidecar {side.name}"
    raise InputError(path, f"no frame times: {where} and pixdim[4] = {dt}")
  return preprocess.validate_times(np.arange(n_t, dtype=np.float64) * dt *
                                   _SEC_PER_UNIT.get(unit, 1.0), n_t, str(path))


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
  data, header = load_nifti(path)
  if data.ndim not in (3, 4):
    raise InputError(path, f"expected a 2D+time image [X, Y, T], [X, Y, 1, T] or several "
                           f"slices [X, Y, Z, T], got shape {list(data.shape)}")
  if data.ndim == 4 and data.shape[3] == 1 and data.shape[2] > 1:
    raise InputError(path, f"shape {list(data.shape)} is {data.shape[2]} slices of one time "
                           "frame each; a 2D+time series is [X, Y, T] (frame times in a JSON "
                           "sidecar) or [X, Y, 1, T]")
  grid = _nifti_grid(path, header, data.shape)
  k = _chosen_slice(path, data.shape[2] if data.ndim == 4 else 1, slice_index)
  if data.ndim == 4:
    affine = grid["affine"].copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
    grid["affine"] = affine
  image = data[:, :, k] if data.ndim == 4 else data
  image = apply_layout(from_nifti_axes(image.astype(np.float32)), grid["layout"])
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
  data, header = load_nifti(path)
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
  return preprocess.validate_mask(apply_layout(from_nifti_axes(data), layout), shape, str(path))


# ----------------------------------------------------------------------------- npz / dispatch


def read_npz(path: str | os.PathLike, n_frames: int = conventions.NUM_FRAMES) -> dict[str, Any]:
  """Reads `image [H, W, T]`, `times [T]`, optional `mask`, `pixel_mm` from an .npz (no pickles)."""
  path = pathlib.Path(path)
  must_exist(path)
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


def _mask_of(path: pathlib.Path) -> tuple[str, int] | None:
  """(the image stem, lower case; the suffix's rank in MASK_SUFFIXES) of a mask file's name."""
  stem = nifti_stem(path).lower()
  return next(((stem[:-len(s)], rank) for rank, s in enumerate(MASK_SUFFIXES)
               if stem.endswith(s)), None)


def slice_entries(folder: str | os.PathLike, npz: bool = True
                  ) -> list[tuple[str, pathlib.Path, pathlib.Path | None]]:
  """The slices of a folder, sorted by name: (name, image path, mask path or None).

  A slice is a NIfTI file (`<name>.nii.gz` / `.nii`, any case), with `npz` a `<name>.npz`, or a
  sub-folder of DICOM files (single- or multi-frame); its optional mask is the NIfTI file
  `<name>` + one of MASK_SUFFIXES beside it (any case; `_mask` first, then `.nii.gz` before
  `.nii`). Mask files, sidecars (`.json`) and hidden entries are not slices. The one reading
  rule of `--mode=predict` and of the `manual` dataset's study folders.
  """
  folder = pathlib.Path(folder)
  entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
  masks: dict[str, tuple[pathlib.Path, int]] = {}
  for p in entries:  # name order: of equal rank the later (.nii.gz after .nii) wins
    found = _mask_of(p) if is_nifti(p) and p.is_file() else None
    if found and (found[0] not in masks or found[1] <= masks[found[0]][1]):
      masks[found[0]] = (p, found[1])
  out = []
  for p in entries:
    if p.is_dir():
      stem = p.name
    elif is_nifti(p) or (npz and p.suffix == ".npz"):
      stem = nifti_stem(p) if is_nifti(p) else p.stem
      if stem.lower().endswith(MASK_SUFFIXES):
        continue
    else:
      continue
    out.append((stem, p, masks.get(stem.lower(), (None,))[0]))
  return out


def not_slices(folder: str | os.PathLike, entries: list[tuple]) -> list[str]:
  """The names of a folder's files that its `slice_entries` ``entries`` neither read nor pair
  (a loose DICOM file, a mask without its image), sidecars (`.json`) and hidden files aside."""
  used = {p for _, p, _ in entries} | {m for _, _, m in entries if m is not None}
  return sorted(p.name for p in pathlib.Path(folder).iterdir()
                if p.is_file() and not p.name.startswith(".") and p not in used
                and p.suffix.lower() != ".json")


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
      shape = nib.load(str(path)).shape  # [X, Y, Z, 1]: one input (its reader says why not)
      return int(shape[2]) if len(shape) == 4 and shape[2] > 1 and shape[3] > 1 else 1
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
    must_exist(path)
    raise InputError(path, "unknown format: expected a DICOM folder, .nii/.nii.gz or .npz")
  if mask_path is not None:
    out["mask"] = read_nifti_mask(mask_path, out["image"].shape[:2],
                                  layout=out.get("grid", {}).get("layout", STORED_LAYOUT),
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
