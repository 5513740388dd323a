"""What the JSON sidecar beside an input says: its study, slice level, acquisition sequence
and AIF series (`slice_metadata`), and where that sidecar lies (`sidecar_path`).

A NIfTI or .npz file `name.nii.gz` / `name.npz` has `name.json` beside it, a DICOM folder
`name/` has `name.json`; every field is optional, and a bad one is one
`InputError(sidecar, problem)`. The frame times a sidecar may hold are read with the image
(`perfjax.data.io`).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from perfjax.data.nifti import from_nifti_axes, load_nifti, nifti_stem
from perfjax.errors import InputError


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
  """The JSON sidecar that holds a NIfTI file's frame times: `name.nii.gz` -> `name.json`."""
  path = pathlib.Path(path)
  return path.with_name(nifti_stem(path) + ".json")


# The sidecar's optional sequence (`"sequence": {...}`): with it, predict fits concentration and
# reports MBF in ml/g/min; without it the flow is relative (uncalibrated signal). Times in
# seconds, the flip angle in degrees; native T1/T2 default to 3 T literature values;
# sat_residual is the fraction of M0 the saturation pulse leaves (0: ideal saturation; real
# scanners leave some, and the conversion needs it: see README).
SEQUENCE_FIELDS = ("protocol", "ts", "tr", "flip_deg", "n_pulses")
SEQUENCE_DEFAULTS = dict(t1_blood=1.85, t2_blood=0.25, t1_myo=1.20, t2_myo=0.045,
                         sat_residual=0.0)
_SEQUENCE_BOUNDS = dict(ts=(0.0, 2.0), tr=(1e-4, 0.05), flip_deg=(1.0, 180.0),
                        n_pulses=(0.0, 1000.0), t1_blood=(0.1, 5.0), t2_blood=(0.005, 2.0),
                        t1_myo=(0.1, 5.0), t2_myo=(0.005, 2.0), sat_residual=(0.0, 0.95))
LEVEL_NAMES = ("basal", "mid", "apical")


def level_from_name(name: str) -> int:
  """Slice level from a name: 0 for basal/base, 1 for mid, 2 for apical/apex, else -1 (the
  rule of the manual dataset and of predict's study output)."""
  low = name.lower()
  for level, words in enumerate((("basal", "base"), ("mid",), ("apical", "apex"))):
    if any(re.search(rf"(^|[^a-z]){w}", low) for w in words):
      return level
  return -1


def meta_path(path: pathlib.Path) -> pathlib.Path:
  """The sidecar of a file (`sidecar_path`) or of a DICOM folder (`folder.json` beside it)."""
  return path.with_name(path.name + ".json") if path.is_dir() else sidecar_path(path)


def read_sidecar(path: pathlib.Path) -> dict[str, Any]:
  side = meta_path(path)
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
                             "t1_myo, t2_myo in s, sat_residual)")
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
  """``raw`` as a finite float within ``bounds``, else the sidecar's one-line InputError (JSON
  true/false is not a number)."""
  if isinstance(raw, bool):
    raise InputError(source, f"{what} {raw!r} is not a number")
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
  if not path.is_file():
    raise InputError(side, f'"aif_series" {key} {value}: no such file ({path})')
  data, _ = load_nifti(path)
  data = from_nifti_axes(np.asarray(data, np.float64))
  if data.ndim == ndim + 1 and data.shape[2] == 1:
    data = data[:, :, 0]
  if data.ndim != ndim or not np.all(np.isfinite(data)):
    raise InputError(path, f"the AIF series' {key} must be a finite {ndim}-D image, got shape "
                           f"{list(data.shape)}")
  return data


BLOOD_FIELDS = ("t1_blood", "t2_blood")  # The series' blood is the slice's: its values carry over.


def parse_aif_series(value: Any, side: pathlib.Path,
                     slice_sequence: dict[str, Any] | None = None) -> dict[str, Any]:
  """A sidecar's `"aif_series"` object -> the series dict of `perfjax.perfusion`.

  `{"file": "aif.nii.gz", "sequence": {...}}` (`parse_sequence`; the series' own, e.g. the
  short-saturation FLASH of a dual-sequence AIF) with optional `"pd_file"` (the series'
  proton-density frame, [X, Y]), `"dose_ratio"` (main / pre-bolus dose of a dual bolus;
  default 1) and `"lead_s"` (how much earlier in each beat the series is read out than this
  slice, e.g. from the trigger times; default one beat). The series has the slice's frames,
  beat for beat ([X, Y, T] or [X, Y, 1, T]); its files are relative to the sidecar's folder.
  Its sequence's native blood T1/T2, when it does not give them, are those of
  ``slice_sequence`` (the same blood), and its ``sat_residual`` is its own (default 0).
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
  sequence = value["sequence"]
  if isinstance(sequence, dict) and slice_sequence is not None:
    sequence = {**{k: slice_sequence[k] for k in BLOOD_FIELDS if k in slice_sequence}, **sequence}
  out: dict[str, Any] = dict(image=_series_array(value["file"], side, "file", 3),
                             sequence=parse_sequence(sequence, side))
  out["pd"] = (None if value.get("pd_file") is None
               else _series_array(value["pd_file"], side, "pd_file", 2))
  if out["pd"] is not None and out["pd"].shape != out["image"].shape[:2]:
    raise InputError(side, f'"aif_series" pd_file is {list(out["pd"].shape)}, its file '
                           f'{list(out["image"].shape[:2])}')
  for key, bounds in (("dose_ratio", (1.0, 100.0)), ("lead_s", (-2.0, 5.0))):
    if key in value:
      out[key] = _bounded_number(value[key], side, f'"aif_series" {key}', bounds)
  return out


def input_name(path: pathlib.Path) -> str:
  return path.name if path.is_dir() else nifti_stem(path)


def slice_level(path: str | os.PathLike, slice_index: int | None = None,
                n_slices: int = 1) -> int:
  """A slice's level (0 basal, 1 mid, 2 apical, -1 unknown): the sidecar's `"slice_level"`
  (0/1/2 or "basal"/"mid"/"apical"; for an input of ``n_slices`` > 1, a list of one per
  slice), else a one-slice input's name (`level_from_name`), else -1."""
  path = pathlib.Path(path)
  return _level(read_sidecar(path), path, slice_index, n_slices)


def _level(meta: dict[str, Any], path: pathlib.Path, slice_index: int | None,
           n_slices: int) -> int:
  """:func:`slice_level` from the sidecar's contents ``meta``, already read."""
  side = meta_path(path)
  level = meta.get("slice_level")
  if isinstance(level, list) and n_slices > 1:
    if len(level) != n_slices:
      raise InputError(side, f'"slice_level" lists {len(level)} levels, the input holds '
                             f"{n_slices} slices")
    level = level[slice_index or 0]
  if level is None:
    return level_from_name(input_name(path)) if n_slices == 1 else -1
  if isinstance(level, str) and level.lower() in LEVEL_NAMES:
    return LEVEL_NAMES.index(level.lower())
  if not (isinstance(level, int) and not isinstance(level, bool) and level in (0, 1, 2)):
    raise InputError(side, f'"slice_level" must be 0, 1, 2 or one of {list(LEVEL_NAMES)}, got '
                           f"{level!r}")
  return level


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
  meta = read_sidecar(path)
  side = meta_path(path)
  study = meta.get("study")
  if study is None and grid is not None:
    study = grid.get("study")
  if study is None:
    study = input_name(path) if n_slices > 1 else (path.resolve().parent.name or "study")
  level = _level(meta, path, slice_index, n_slices)
  sequence = meta.get("sequence")
  series = meta.get("aif_series")
  if series is not None and sequence is None:
    raise InputError(side, '"aif_series" needs the slice\'s own "sequence" too (the tissue '
                           "curves are converted with it)")
  sequence = None if sequence is None else parse_sequence(sequence, side)
  return dict(study=str(study), slice_level=int(level), sequence=sequence,
              aif_series=None if series is None else parse_aif_series(series, side, sequence))
