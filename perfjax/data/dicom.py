"""DICOM reader: one slice's perfusion series from a folder of DICOM files.

The files hold one frame each, or many (an enhanced multi-frame file, such as Enhanced MR
Image Storage: each frame's position, orientation, spacing, rescale and
FrameAcquisitionDateTime come from its per-frame or the shared functional groups, and the
rules below then apply to the frames as to single-frame files). A folder may hold several
slice positions (a multi-slice perfusion series): `dicom_slice_count` counts them and
`read_dicom_series(..., slice_index=k)` reads the k-th along the slice normal.

`read_dicom_series` returns the arrays of `perfjax.data.io`'s readers (CONVENTIONS.md, checked
by `preprocess.validate_slice`, every problem one `InputError(path, problem)`). Frame order:
InstanceNumber (else the frame times). Frame times, first present in every file and
increasing: AcquisitionDateTime, AcquisitionTime, then TriggerTime (cumulative ms; the per-beat
delay after the R wave does not increase and is rejected). Missing timing tags are an error.
Values are `pixel_array * RescaleSlope + RescaleIntercept`. The slice's place comes from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing (`dicom_affine`), and the
array is turned (a transpose and flips, no interpolation) to the CONVENTIONS display by the
rule of NIfTI files (`perfjax.data.grid.display_layout`), so a series gives the same slice in
either format; without an orientation it is kept as stored (rows down the image, as a DICOM
viewer shows it). A mask beside the series is a NIfTI file on the stored layout's voxels
(column i, row j from the bottom, as dcm2niix writes the series) and is turned with it.
"""
from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any

import numpy as np

from perfjax import conventions
from perfjax.data import preprocess
from perfjax.data.grid import (STORED_LAYOUT, apply_layout, check_pixel_mm, display_layout,
                               stored_affine)
from perfjax.errors import InputError


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


def _dicom_numbers(ds: Any, tag: str, n: int, source: pathlib.Path) -> list[float] | None:
  """`n` numbers of a header field (None when absent); anything else names file and tag."""
  if tag not in ds:
    return None
  value = ds.get(tag)
  values = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and \
      not isinstance(value, (str, bytes)) else [value]
  try:
    out = [float(v) for v in values]
  except (TypeError, ValueError):
    raise InputError(source, f"DICOM {tag} {str(value)!r} is not {n} number(s)") from None
  if len(out) != n or not all(np.isfinite(out)):
    raise InputError(source, f"DICOM {tag} {str(value)!r} is not {n} finite number(s)")
  return out


def dicom_affine(ds: Any, n_rows: int, source: pathlib.Path) -> np.ndarray | None:
  """RAS affine of the stored voxels (i = column, j = n_rows - 1 - row) of a DICOM frame, from
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing (None without them)."""
  ipp = _dicom_numbers(ds, "ImagePositionPatient", 3, source)
  iop = _dicom_numbers(ds, "ImageOrientationPatient", 6, source)
  spacing = _dicom_numbers(ds, "PixelSpacing", 2, source)
  if ipp is None or iop is None or spacing is None:
    return None
  row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])  # LPS; along a row, down a column
  normal = np.cross(row_dir, col_dir)
  if not np.linalg.norm(normal) > 0.5:
    raise InputError(source, f"DICOM ImageOrientationPatient {iop} is not two orthogonal "
                             "unit vectors")
  thickness = _dicom_numbers(ds, "SliceThickness", 1, source) if "SliceThickness" in ds else None
  dr, dc = spacing  # PixelSpacing = (between rows, between columns)
  lps = np.eye(4)
  lps[:3, 0] = row_dir * dc
  lps[:3, 1] = -col_dir * dr
  lps[:3, 2] = normal * (thickness[0] if thickness and thickness[0] > 0 else 1.0)
  lps[:3, 3] = np.asarray(ipp) + col_dir * dr * (n_rows - 1)
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _dicom_files(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    raise InputError(folder, "DICOM series folder not found")
  files = sorted(p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
  if not files:
    raise InputError(folder, "folder holds no DICOM files")
  return files


def _read_header(f: pathlib.Path, pixels: bool) -> Any:
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    return pydicom.dcmread(str(f), stop_before_pixels=not pixels)
  except Exception as e:  # pydicom raises many types for broken or truncated files
    raise InputError(f, f"unreadable or truncated DICOM file ({type(e).__name__}: {e})") from None


# What a frame of an enhanced multi-frame file takes from its functional groups, as the
# single-frame header would hold it: (sequence, attribute in it, single-frame attribute).
_FRAME_FIELDS = (
    ("PlanePositionSequence", "ImagePositionPatient", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness", "SliceThickness"),
    ("PixelValueTransformationSequence", "RescaleSlope", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept", "RescaleIntercept"),
    ("FrameContentSequence", "FrameAcquisitionDateTime", "AcquisitionDateTime"),
)


class _Frame:
  """One frame: the file it is in, its index there (None for a single-frame file) and the
  header fields that describe it (for a multi-frame file, gathered from its groups)."""

  def __init__(self, path: pathlib.Path, index: int | None, header: Any):
    self.path, self.index, self.header = path, index, header
    self.name = path.name + ("" if index is None else f" frame {index + 1}")

  def __str__(self) -> str:
    return str(self.path) + ("" if self.index is None else f" (frame {self.index + 1})")


def _frames(f: pathlib.Path, ds: Any) -> list[_Frame]:
  """The frames of one file's header: itself, or each frame of a multi-frame file."""
  from pydicom.dataset import Dataset  # pylint: disable=g-import-not-at-top
  n = _dicom_numbers(ds, "NumberOfFrames", 1, f)
  if n is None or n[0] <= 1:
    return [_Frame(f, None, ds)]
  per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
  if len(per_frame) != int(n[0]):
    raise InputError(f, f"multi-frame DICOM with {int(n[0])} frames but "
                        f"{len(per_frame)} per-frame functional groups")
  shared = list(ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
  out = []
  for k, groups in enumerate(per_frame):
    h = Dataset()
    for tag in ("StudyInstanceUID", "Rows", "Columns", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
                "RescaleIntercept"):
      if tag in ds:
        setattr(h, tag, ds.get(tag))
    for seq, attr, as_single in _FRAME_FIELDS:
      for where in (groups, shared):
        items = where.get(seq) if seq in where else None
        if items and attr in items[0]:
          setattr(h, as_single, items[0].get(attr))
          break
    out.append(_Frame(f, k, h))
  return out


SLICE_GAP_MM = 2.0  # Frames further apart than this along the slice normal are other slices.


def _slice_groups(frames: list[_Frame]) -> list[list[int]]:
  """The frames' indices grouped by slice position and ordered along the slice normal.

  With ImageOrientationPatient, by the position along the normal: a gap of more than
  SLICE_GAP_MM starts a new slice, so frames that drift within the plane (a table or
  in-plane motion correction) stay one slice. Without it, by ImagePositionPatient to 0.1 mm.
  """
  positions = [_dicom_numbers(fr.header, "ImagePositionPatient", 3, fr)
               if "ImagePositionPatient" in fr.header else None for fr in frames]
  keys = [None if p is None else tuple(np.round(p, 1)) for p in positions]
  if len({k for k in keys if k is not None}) <= 1:
    return [list(range(len(frames)))]
  missing = sum(k is None for k in keys)
  if missing:
    raise InputError(frames[0].path.parent, f"{missing} frames lack "
                     "ImagePositionPatient in a series of several slice positions")
  iop = _dicom_numbers(frames[0].header, "ImageOrientationPatient", 6, frames[0])
  if iop is None:
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
      groups.setdefault(k, []).append(i)
    return [groups[k] for k in sorted(groups)]
  depth = np.array([float(np.dot(p, np.cross(iop[:3], iop[3:]))) for p in positions])
  order = np.argsort(depth, kind="stable")
  breaks = np.nonzero(np.diff(depth[order]) > SLICE_GAP_MM)[0] + 1
  return [sorted(int(i) for i in part) for part in np.split(order, breaks)]


def _series_frames(folder: pathlib.Path) -> tuple[list[_Frame], list[list[int]]]:
  """Every frame of a series folder (headers only) and its slice groups."""
  frames = [fr for f in _dicom_files(folder) for fr in _frames(f, _read_header(f, pixels=False))]
  return frames, _slice_groups(frames)


def dicom_slice_count(folder: str | os.PathLike) -> int:
  """How many slice positions a DICOM series folder holds (headers only)."""
  return len(_series_frames(pathlib.Path(folder))[1])


def _pixels(frames: list[_Frame]) -> list[np.ndarray]:
  """Each frame's values (`pixel_array * RescaleSlope + RescaleIntercept`), each file read once."""
  arrays: dict[pathlib.Path, np.ndarray] = {}
  out = []
  for fr in frames:
    if fr.path not in arrays:
      try:
        arrays[fr.path] = _read_header(fr.path, pixels=True).pixel_array.astype(np.float32)
      except InputError:
        raise
      except Exception as e:  # pydicom raises many types for broken or truncated pixel data
        raise InputError(fr.path, f"unreadable or truncated DICOM file ({type(e).__name__}: "
                                  f"{e})") from None
    data = arrays[fr.path]
    pixels = data if fr.index is None else data[fr.index]
    if pixels.ndim != 2:
      raise InputError(fr, f"expected a 2D frame, got pixel data of shape {list(pixels.shape)}")
    slope = (_dicom_numbers(fr.header, "RescaleSlope", 1, fr) or [1.0])[0] or 1.0
    intercept = (_dicom_numbers(fr.header, "RescaleIntercept", 1, fr) or [0.0])[0]
    out.append(pixels * slope + intercept)
  return out


def read_dicom_series(folder: str | os.PathLike, n_frames: int = conventions.NUM_FRAMES,
                      slice_index: int | None = None) -> dict[str, Any]:
  """Reads one slice's perfusion series from a folder of DICOM files (single- or multi-frame);
  of a folder with several slice positions, the ``slice_index``-th along the slice normal.

  Returns dict(image float32 [H, W, T] in the display layout, times float64 [T] from 0, mask
  None, pixel_mm (row, col) or None, time_tag: the tag the times came from, files: in order,
  grid: where the array lies, n_slices: the folder's slice positions).
  """
  folder = pathlib.Path(folder)
  frames_all, groups = _series_frames(folder)
  if slice_index is None and len(groups) > 1:
    raise InputError(folder, f"series holds {len(groups)} slice positions: read one at a time "
                             "(slice_index; predict splits such inputs itself)")
  if slice_index is not None and not 0 <= slice_index < len(groups):
    raise InputError(folder, f"has no slice {slice_index} (it holds {len(groups)})")
  files = [frames_all[i] for i in groups[slice_index or 0]]
  headers = [fr.header for fr in files]
  frames = _pixels(files)
  if len({fr.shape for fr in frames}) > 1:
    raise InputError(folder, f"frames differ in size: {sorted({fr.shape for fr in frames})}")

  candidates, unparsed = {}, []
  for tag in _TIME_TAGS:
    if all(tag in h and str(h.get(tag, "")).strip() for h in headers):
      values = []
      for h, f in zip(headers, files):
        if tag == "TriggerTime":
          try:
            values.append(float(str(h.get(tag)).strip()))
          except ValueError:
            values.append(None)
        else:
          values.append(_dicom_seconds(h.get(tag), tag))
        if values[-1] is None or not np.isfinite(values[-1]):
          unparsed.append(f"{f.name}: {tag} {str(h.get(tag))!r} is not a "
                          f"{'number (ms)' if tag == 'TriggerTime' else 'DICOM time'}")
          break
      else:
        candidates[tag] = np.asarray(values, np.float64) * (1e-3 if tag == "TriggerTime" else 1.0)
  if not candidates:
    raise InputError(folder, "DICOM series has no timing tags (AcquisitionDateTime, "
                             "AcquisitionTime or TriggerTime) usable in every file" +
                     (f": {'; '.join(unparsed)}" if unparsed else ""))
  numbers = [None if "InstanceNumber" not in h or str(h.get("InstanceNumber")).strip() == ""
             else _dicom_numbers(h, "InstanceNumber", 1, f)[0] for h, f in zip(headers, files)]
  if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
    order = np.argsort(numbers, kind="stable")
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
  spacing = _dicom_numbers(headers[0], "PixelSpacing", 2, files[0])
  pixel_mm = None if spacing is None else check_pixel_mm(spacing, f"{folder} (PixelSpacing)")
  first = int(order[0])
  affine = dicom_affine(headers[first], image.shape[0], files[first])
  oriented = affine is not None
  if affine is None:
    affine = stored_affine(pixel_mm or (1.0, 1.0))
  stored_shape = (image.shape[1], image.shape[0])
  # The CONVENTIONS display, by the rule of NIfTI files (`grid.display_layout`).
  layout = display_layout(affine) if oriented else STORED_LAYOUT
  image = apply_layout(image, layout)
  if pixel_mm is not None and layout[0]:
    pixel_mm = (pixel_mm[1], pixel_mm[0])
  grid = dict(kind="dicom", affine=affine, oriented=oriented, layout=layout,
              stored_shape=stored_shape, slice_axis=True, header=None,
              study=str(headers[first].get("StudyInstanceUID", "") or "") or None)
  return dict(image=image, times=times - times[0], mask=None, pixel_mm=pixel_mm,
              time_tag=time_tag, files=[files[i].path for i in order], grid=grid,
              n_slices=len(groups))
