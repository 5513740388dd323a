"""Readers for real perfusion data and atomic writers for outputs.

Readers return CONVENTIONS.md arrays, checked by `preprocess.validate_slice` with the
file as the source, so every problem is one `InputError(path, problem)`:
`image float32 [H, W, T]` indexed [row, col] (row 0 at the top), `times float64 [T]`
in seconds from the first frame, an optional `mask int32 [H, W]`, and `pixel_mm`
(row spacing, column spacing) in mm or None.

NIfTI (`read_nifti`, `read_nifti_mask`): one slice per file, image `[X, Y, T]` or
`[X, Y, 1, T]`, mask `[X, Y]`, `[X, Y, 1]` or `[X, Y, 1, 1]`. Orientation assumed: the
first voxel axis i runs along image columns (left to right as displayed) and the second
axis j along rows from the BOTTOM up, as NIfTI viewers and dcm2niix lay out a slice, so
`array[row, col] = data[col, Y - 1 - row]` (numpy `rot90`). `write_nifti` applies the
inverse, so files round-trip. Frame times come from a JSON sidecar beside the image
(same name, `.json`) with `"times"` (seconds, one per frame) or `"FrameTimesStart"`;
else, for 4D `[X, Y, 1, T]` files only, from `pixdim[4]` (uniform spacing, unit from the
header; an approximation, since frames are one per heartbeat); neither is an error.

DICOM (`read_dicom_series`): a folder holding one slice's series, one file per frame.
Frame order: InstanceNumber (else the frame times). Frame times, first present in every
file and increasing: AcquisitionDateTime, AcquisitionTime, then TriggerTime (cumulative
ms; the per-beat delay after the R wave does not increase and is rejected). Missing
timing tags are an error. Values are `pixel_array * RescaleSlope + RescaleIntercept`.

NumPy (`read_npz`): keys `image`, `times`, optional `mask`, `pixel_mm`; loaded with
`allow_pickle=False` (pickles are never loaded).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

import numpy as np

from perfjax.data import preprocess
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


def _exists(path: pathlib.Path) -> None:
  if not path.exists():
    raise InputError(path, "file not found")


# ----------------------------------------------------------------------------- NIfTI


def _load_nifti(path: pathlib.Path) -> tuple[np.ndarray, Any]:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  _exists(path)
  try:
    img = nib.load(str(path))
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


def _nifti_times(path: pathlib.Path, header: Any, n_t: int) -> np.ndarray:
  side = sidecar_path(path)
  if side.exists():
    try:
      meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
      raise InputError(side, f"unreadable JSON sidecar ({e})") from None
    key = next((k for k in ("times", "FrameTimesStart") if isinstance(meta, dict) and k in meta),
               None)
    if key is None:
      raise InputError(side, 'JSON sidecar has no "times" (seconds, one per frame)')
    times = preprocess.validate_times(meta[key], n_t, str(side))
    if n_t > 1 and np.median(np.diff(times)) > 10.0:
      raise InputError(side, f"frame times must be in seconds; a median spacing of "
                             f"{np.median(np.diff(times)):.4g} looks like milliseconds")
    return times
  if int(header["dim"][0]) < 4:
    raise InputError(path, f"no frame times: a 3D [X, Y, T] file needs a JSON sidecar "
                           f"{side.name} (pixdim[4] is only used for 4D [X, Y, 1, T] files)")
  dt = float(header["pixdim"][4])
  unit = header.get_xyzt_units()[1]
  if not (np.isfinite(dt) and dt > 0):
    raise InputError(path, f"no frame times: no JSON sidecar {side.name} and pixdim[4] = {dt}")
  return np.arange(n_t, dtype=np.float64) * dt * _SEC_PER_UNIT.get(unit, 1.0)


def read_nifti(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
               n_frames: int = preprocess.N_FRAMES) -> dict[str, Any]:
  """Reads a NIfTI 2D+time image (and optional mask); see the module docstring.

  Returns dict(image float32 [H, W, T], times float64 [T] from 0, mask int32 [H, W] or
  None, pixel_mm (row, col)).
  """
  path = pathlib.Path(path)
  data, header = _load_nifti(path)
  if data.ndim == 4 and data.shape[2] == 1:
    data = data[:, :, 0]
  if data.ndim != 3:
    raise InputError(path, f"expected a 2D+time image [X, Y, T] or [X, Y, 1, T], got shape "
                           f"{list(data.shape)}")
  image = _from_nifti_axes(data.astype(np.float32))
  times = _nifti_times(path, header, image.shape[-1])
  image, times, _ = preprocess.validate_slice(image, times, source=str(path), n_frames=n_frames)
  zooms = header.get_zooms()
  pixel_mm = (float(zooms[1]), float(zooms[0]))
  mask = None
  if mask_path is not None:
    mask = read_nifti_mask(mask_path, image.shape[:2])
  return dict(image=image, times=times - times[0], mask=mask, pixel_mm=pixel_mm)


def read_nifti_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
  """Reads a NIfTI label mask `[X, Y]` (or with singleton trailing axes) as int32 [H, W]."""
  path = pathlib.Path(path)
  data, _ = _load_nifti(path)
  while data.ndim > 2 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 2:
    raise InputError(path, f"expected a 2D mask [X, Y], got shape {list(data.shape)}")
  return preprocess.validate_mask(_from_nifti_axes(data), shape, str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; on success it replaces `path` atomically.

  On any error the temporary file is removed, so nothing half-written is left behind.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (temp file then `os.replace`)."""
  with atomic_path(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=1))


def write_nifti(path: str | os.PathLike, array: Any, pixel_mm: tuple[float, float] = (1.0, 1.0),
                times: Any = None) -> pathlib.Path:
  """Writes `array [H, W]` or `[H, W, T]` ([row, col]) as NIfTI, atomically.

  2D+time arrays are stored `[X, Y, 1, T]`; with `times` a JSON sidecar (same name,
  `.json`) keeps the exact frame times and pixdim[4] their mean spacing. Integer
  arrays are stored as int16 (masks) when they fit, floats as float32. `read_nifti`
  reads the result back to the same arrays.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not is_nifti(path):
    raise InputError(path, f"NIfTI output must end with {' or '.join(NIFTI_SUFFIXES)}")
  array = np.asarray(array)
  if array.ndim not in (2, 3):
    raise InputError(path, f"can write [H, W] or [H, W, T] arrays, got shape {list(array.shape)}")
  if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
    small = array.size == 0 or (array.min() >= -32768 and array.max() <= 32767)
    array = array.astype(np.int16 if small else np.int32)
  else:
    array = array.astype(np.float32)
  data = _to_nifti_axes(array)
  if data.ndim == 3:
    data = data[:, :, None, :]
  affine = np.diag([float(pixel_mm[1]), float(pixel_mm[0]), 1.0, 1.0])
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  zooms = [float(pixel_mm[1]), float(pixel_mm[0])] + [1.0] * (data.ndim - 2)
  if times is not None:
    times = preprocess.validate_times(times, array.shape[-1] if array.ndim == 3 else -1, str(path))
    if times.size > 1:
      zooms[-1] = float(np.mean(np.diff(times)))
  img.header.set_zooms(zooms)
  suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
  with atomic_path(path, suffix) as tmp:  # nibabel compresses by the suffix
    nib.save(img, str(tmp))
    if times is not None:
      with atomic_path(sidecar_path(path)) as side:
        side.write_text(json.dumps({"times": [float(t) for t in times]}))
  return path


# ----------------------------------------------------------------------------- DICOM


def _dicom_seconds(value: Any, tag: str) -> float | None:
  """DICOM TM ('HHMMSS.FFFFFF', old 'HH:MM:SS') or DT ('YYYYMMDDHHMMSS.FFFFFF') in seconds."""
  text = str(value).strip().replace(":", "")
  if not text:
    return None
  try:
    if tag == "AcquisitionDateTime":
      text = text.split("+")[0].split("-")[0]
      base = datetime.datetime.strptime(text[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
      frac = float("0" + text[14:]) if len(text) > 14 else 0.0
      return base.timestamp() + frac
    hh, mm, ss = int(text[0:2]), int(text[2:4] or 0), float(text[4:] or 0)
    return hh * 3600.0 + mm * 60.0 + ss
  except ValueError:
    return None


_TIME_TAGS = ("AcquisitionDateTime", "AcquisitionTime", "TriggerTime")


def read_dicom_series(folder: str | os.PathLike, n_frames: int = preprocess.N_FRAMES
                      ) -> dict[str, Any]:
  """Reads one slice's perfusion series from a folder of DICOM files (one per frame).

  Returns dict(image float32 [rows, cols, T], times float64 [T] from 0, mask None,
  pixel_mm (row, col) or None, time_tag: the tag the times came from, files: in order).
  """
  import pydicom  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(folder, "DICOM series folder not found")
  files = sorted(p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
  if not files:
    raise InputError(folder, "folder holds no DICOM files")
  frames, headers = [], []
  for f in files:
    try:
      ds = pydicom.dcmread(str(f))
      if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise InputError(f, "multi-frame DICOM is not supported; one file per frame")
      pixels = ds.pixel_array.astype(np.float32)
    except InputError:
      raise
    except Exception as e:  # pydicom raises many types for broken or truncated files
      raise InputError(f, f"unreadable or truncated DICOM file ({type(e).__name__}: {e})") from None
    if pixels.ndim != 2:
      raise InputError(f, f"expected a 2D frame, got pixel data of shape {list(pixels.shape)}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    frames.append(pixels * slope + float(getattr(ds, "RescaleIntercept", 0.0) or 0.0))
    headers.append(ds)
  if len({fr.shape for fr in frames}) > 1:
    raise InputError(folder, f"frames differ in size: {sorted({fr.shape for fr in frames})}")
  positions = {tuple(np.round(np.asarray(h.ImagePositionPatient, float), 1))
               for h in headers if "ImagePositionPatient" in h}
  if len(positions) > 1:
    raise InputError(folder, f"series holds {len(positions)} slice positions; give one folder "
                             "per slice")

  candidates = {}
  for tag in _TIME_TAGS:
    if all(tag in h and str(h.get(tag, "")).strip() for h in headers):
      values = [float(h.TriggerTime) if tag == "TriggerTime" else _dicom_seconds(h.get(tag), tag)
                for h in headers]
      if all(v is not None for v in values):
        candidates[tag] = np.asarray(values, np.float64) * (1e-3 if tag == "TriggerTime" else 1.0)
  if not candidates:
    raise InputError(folder, "DICOM series has no timing tags (AcquisitionDateTime, "
                             "AcquisitionTime or TriggerTime) in every file")
  numbers = [h.get("InstanceNumber") for h in headers]
  if all(n is not None for n in numbers) and len(set(int(n) for n in numbers)) == len(numbers):
    order = np.argsort([int(n) for n in numbers], kind="stable")
  else:
    order = np.argsort(next(iter(candidates.values())), kind="stable")
  time_tag, times, problem = None, None, ""
  for tag, values in candidates.items():
    t = values[order]
    if tag == "AcquisitionTime":  # a series that crosses midnight
      t = t + 86400.0 * np.cumsum(np.concatenate([[0], np.diff(t) < -43200]))
    if np.all(np.diff(t) > 0):
      time_tag, times = tag, t
      break
    k = int(np.argmax(np.diff(t) <= 0))
    problem = problem or (f"{tag} does not increase from frame {k} ({files[order[k]].name}) to "
                          f"frame {k + 1} ({files[order[k + 1]].name})")
  if times is None:
    raise InputError(folder, f"frame times are not strictly increasing: {problem}")
  image = np.stack([frames[i] for i in order], axis=-1)
  image, times, _ = preprocess.validate_slice(image, times, source=str(folder), n_frames=n_frames)
  spacing = headers[0].get("PixelSpacing")
  pixel_mm = (float(spacing[0]), float(spacing[1])) if spacing is not None else None
  return dict(image=image, times=times - times[0], mask=None, pixel_mm=pixel_mm,
              time_tag=time_tag, files=[files[i] for i in order])


# ----------------------------------------------------------------------------- npz / dispatch


def read_npz(path: str | os.PathLike, n_frames: int = preprocess.N_FRAMES) -> dict[str, Any]:
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


def read_slice(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
               n_frames: int = preprocess.N_FRAMES) -> dict[str, Any]:
  """Reads one slice from a DICOM folder, a NIfTI file or an .npz; an optional NIfTI mask."""
  path = pathlib.Path(path)
  if path.is_dir():
    out = read_dicom_series(path, n_frames)
  elif is_nifti(path):
    return read_nifti(path, mask_path, n_frames)
  elif path.suffix == ".npz":
    out = read_npz(path, n_frames)
  else:
    _exists(path)
    raise InputError(path, "unknown format: expected a DICOM folder, .nii/.nii.gz or .npz")
  if mask_path is not None:
    out["mask"] = read_nifti_mask(mask_path, out["image"].shape[:2])
  return out


def load_preprocessed(path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
                      target_pixel_mm: float | None = preprocess.TARGET_PIXEL_MM
                      ) -> dict[str, Any]:
  """Reads one slice (`read_slice`) and preprocesses it (`preprocess.preprocess_slice`).

  Returns preprocess_slice's dict (image, raw, times, mask, peak_lv_frame, and the
  geometry that `preprocess.to_original` needs) plus `pixel_mm`: the input's spacing
  (None when the file does not say, in which case the slice is not resampled).
  """
  data = read_slice(path, mask_path)
  out = preprocess.preprocess_slice(data["image"], data["times"], data["mask"],
                                    pixel_mm=data["pixel_mm"], target_pixel_mm=target_pixel_mm,
                                    source=str(path))
  out["pixel_mm"] = data["pixel_mm"]
  return out
