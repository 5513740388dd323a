"""What `--mode=predict` reads and where it writes: inputs, their ids, the output folder.

The inputs (a NIfTI file, a folder of NIfTI files and DICOM series folders, or a dataset split)
are listed in name order (`input_entries`; a multi-slice file or series is one entry per
slice, `<name>_slice<k>`), given file-name-safe, distinct ids (`unique_ids`) and read one at a
time (`read_one`: read, sidecar metadata, preprocessing), so that a bad file
is one line (`error_message`: the file, the step, the problem) and the batch goes on. The
output folder is checked before any compute (`check_output`) and an earlier run's outputs in
it are removed (`clear_previous`).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile

import numpy as np

from perfjax import perfusion
from perfjax.data import io as data_io
from perfjax.data import nifti
from perfjax.data import preprocess
from perfjax.data import sidecar
from perfjax.errors import InputError

RESERVED_NAMES = ("slices.json", "slices.csv", "predict.log", "studies.json", "bullseyes.png",
                  "bullseyes_relative.png")
# A slice folder's files (and `ID.png`): on the 128 x 128 crop, and on the input's own voxels.
CROP_FILES = ("segmentation.nii.gz", "probabilities.nii.gz", "um.nii.gz")
INPUT_GRID_FILES = ("segmentation_input.nii.gz", "probabilities_input.nii.gz", "um_input.nii.gz")
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_LENGTH = 100


def display_name(path: str | os.PathLike) -> str:
  """A printable, JSON-safe name of a path (undecodable bytes as \\xNN escapes)."""
  text = os.fsdecode(os.fspath(path))
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_id(name: str) -> str:
  """A file-name-safe id from an input's name: letters, digits, '.', '_' and '-' only, no
  leading dot, never empty ('slice'), at most MAX_ID_LENGTH characters; never a path."""
  text = _ID_CHARS.sub("_", display_name(name).replace("\\x", "x")).lstrip("._-")
  return text[:MAX_ID_LENGTH].rstrip(".") or "slice"


def unique_ids(names: list[str], occupied: list[str] = ()) -> list[str]:
  """`safe_id` of each name, collisions resolved deterministically: in the order given (the
  inputs' name order) the first keeps its id, the next get ``-2``, ``-3``, ...; case-insensitive
  (so ids are distinct folders on every file system), never an output's reserved name and
  never one of ``occupied`` (`foreign_entries`: what the output folder holds that no earlier
  predict run wrote, so that a run neither writes into nor, rerun, removes it)."""
  taken = {n.lower() for n in RESERVED_NAMES} | {n.lower() for n in occupied}
  out = []
  for name in names:
    base = safe_id(name)
    candidate, k = base, 1
    while candidate.lower() in taken:
      k += 1
      candidate = f"{base}-{k}"
    taken.add(candidate.lower())
    out.append(candidate)
  return out


def check_output(output: str, input_path: str | None = None) -> None:
  """The output folder can be created and written (checked before any compute), and is not
  the input folder itself."""
  out = pathlib.Path(output)
  if input_path and not input_path.startswith("split:"):
    if out.resolve() == pathlib.Path(input_path).resolve():
      raise InputError(output, "the output folder is the input folder; choose another --output")
  for parent in [out] + list(out.parents):
    if parent.exists():
      if not parent.is_dir():
        raise InputError(output, f"cannot create the output folder: {display_name(parent)} is "
                                 "a file, not a folder")
      break
  try:
    out.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out, prefix=".perfjax-write-test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise InputError(output, f"the output folder is not writable ({e.strerror or e})") from None


def input_entries(input_path: str, output: str) -> tuple[list[tuple], list[str]]:
  """(name, image path, mask path, slice index) of the inputs' slices (`data_io.per_slice`),
  and notes on what was skipped."""
  root = pathlib.Path(input_path)
  if not root.exists():
    raise InputError(display_name(root), "no such file or folder")
  if root.is_file():
    mask = next((m for _, p, m in data_io.slice_entries(root.parent, npz=False) if p == root),
                None)
    name = nifti.nifti_stem(root)
    return data_io.per_slice([(name, root, mask)]), []
  out = pathlib.Path(output).resolve()
  entries, notes = [], []
  listed = data_io.slice_entries(root, npz=False)
  series = _aif_series_files([path for _, path, _ in listed])
  for name, path, mask in listed:
    resolved = path.resolve()
    if resolved == out or out in resolved.parents or resolved in out.parents:
      notes.append(f"skipped {display_name(path)}: it holds the output folder")
      continue
    if resolved in series:
      notes.append(f"skipped {display_name(path.name)}: the AIF series of "
                   f"{display_name(series[resolved].name)}")
      continue
    entries.append((name, path, mask))
  entries = data_io.per_slice(entries)
  hidden = sorted(display_name(p.name) for p in root.iterdir()
                  if p.name.startswith(".") and (nifti.is_nifti(p) or p.is_dir()))
  if hidden:
    notes.append(f"skipped hidden entries (names starting with '.'): {', '.join(hidden)}")
  others = [display_name(n) for n in data_io.not_slices(root, listed)]
  if others:
    notes.append(f"skipped {len(others)} file(s) that are not inputs: {', '.join(others[:10])}" +
                 (" ..." if len(others) > 10 else "") + " (a DICOM series is read from its own "
                 "sub-folder, a mask beside its image; predict reads NIfTI files and such "
                 "folders)")
  if not entries:
    raise InputError(display_name(root), "holds no NIfTI file (.nii/.nii.gz) and no DICOM "
                                         "series folder" + (f" ({notes[-1]})" if others else ""))
  return entries, notes


def _aif_series_files(paths: list[pathlib.Path]) -> dict[pathlib.Path, pathlib.Path]:
  """The files that the sidecars of `paths` name as their AIF series ("aif_series": "file",
  "pd_file"), resolved, each with the slice that names it: series, not slices."""
  named = {}
  for path in paths:
    try:
      value = sidecar.read_sidecar(path).get("aif_series")
    except InputError:
      continue  # reading the slice reports it
    for key in ("file", "pd_file"):
      name = value.get(key) if isinstance(value, dict) else None
      if isinstance(name, str) and name:
        named[(sidecar.meta_path(path).parent / name).resolve()] = path
  return named


def read_inputs(input_path: str, output: str = "") -> tuple[list[dict], list[dict]]:
  """Preprocessed slices from a NIfTI file, a folder of them, or DICOM series folders.

  A folder's NIfTI files (``X.nii.gz``, with an optional mask ``X_mask.nii.gz`` beside it)
  and sub-folders (one DICOM series each) are read in name order
  (`perfjax.data.io.slice_entries`, the reading rule of the manual dataset too). Returns
  (slices, failures): each slice a dict(id, file, image, raw, times, mask, peak_lv_frame,
  info, grid), each failure dict(id, file, error); any exception of one file is its failure.
  """
  entries, _ = input_entries(input_path, output or os.devnull)
  ids = unique_ids([name for name, _, _, _ in entries])
  slices, failures = [], []
  for slice_id, (_, path, mask_path, index) in zip(ids, entries):
    try:
      slices.append(read_one(slice_id, path, mask_path, slice_index=index))
    except Exception as e:  # pylint: disable=broad-except  (one bad file never costs the batch)
      failures.append(dict(id=slice_id, file=file_name(path, index),
                           error=error_message(path, "read", e)))
  return slices, failures


def file_name(path, slice_index: int | None = None) -> str:
  """How a slice's input is named in rows and messages: the path, and which of its slices."""
  return display_name(path) + ("" if slice_index is None else f" (slice {slice_index + 1})")


def read_one(slice_id: str, path: pathlib.Path, mask_path, center=None,
             slice_index: int | None = None) -> dict:
  """One input slice, read and preprocessed for `predict` (``center``: the crop's centre in
  the resampled frame, instead of the mask's or the images' LV; ``slice_index``: which slice
  of a multi-slice input)."""
  return prepared(slice_id, path, read_input(path, mask_path, slice_index), center)


def read_input(path: pathlib.Path, mask_path, slice_index: int | None = None) -> dict:
  """One input slice as read, before preprocessing: dict(rec: `data_io.read_slice`'s, meta:
  `sidecar.slice_metadata`'s, slice_index), for `prepared` (once per crop centre tried)."""
  rec = data_io.read_slice(path, mask_path, slice_index=slice_index)
  meta = sidecar.slice_metadata(path, rec.get("grid"), slice_index, rec.get("n_slices", 1))
  return dict(rec=rec, meta=meta, slice_index=slice_index)


def prepared(slice_id: str, path: pathlib.Path, read: dict, center=None) -> dict:
  """`read_one`'s slice from what `read_input` read (``center`` as in `read_one`)."""
  rec, meta, slice_index = read["rec"], dict(read["meta"]), read["slice_index"]
  pre = preprocess.preprocess_slice(rec["image"], rec["times"], rec.get("mask"),
                                    rec.get("pixel_mm"), source=display_name(path),
                                    center=center)
  series = meta["aif_series"]
  if series is not None:  # the slice's frames, kept as preprocessing kept them
    n_in, n_kept = rec["image"].shape[-1], pre["times"].shape[0]
    if series["image"].shape[-1] != n_in:
      raise InputError(display_name(path), f"its AIF series has {series['image'].shape[-1]} "
                                           f"frames, the slice {n_in}")
    start = pre["frame_start"]
    meta["aif_series"] = dict(series, image=series["image"][..., start:start + n_kept])
  return dict(id=slice_id, file=file_name(path, slice_index), info=pre,
              pixel_mm=rec.get("pixel_mm"),
              grid=rec.get("grid"), **meta, **{k: pre[k] for k in ("image", "raw", "times",
                                                                  "mask", "peak_lv_frame")})


def error_message(path, stage: str, err: BaseException) -> str:
  """One line: the file, the step and the problem (an InputError already names its source)."""
  text = display_name(str(err)) or type(err).__name__
  name = display_name(path)
  if isinstance(err, InputError):
    return text if name in text else f"{name}: {text}"
  return f"{name}: {stage} failed: {type(err).__name__}: {text}"


def split_slices(config, split_name: str) -> list[dict]:
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  split = datasets.load_split(config.data.dataset, split_name, config.data.data_dir)
  n = len(split["image"])
  has_mask = split.get("has_mask", np.ones(n, bool))
  # The dataset records the sequence (and the AIF series) where it knows them: flow in ml/g/min.
  known = perfusion.mbf_input_kind(config, split) == "concentration"
  study = split.get("study_name", split.get("study_id", np.zeros(n, int)))
  level = split.get("slice_level", np.full(n, -1))
  return [dict(id=f"{split_name}_{i:03d}", file=f"split:{split_name}[{i}]", image=split["image"][i],
               raw=split["raw"][i], times=split["times"][i],
               mask=split["mask"][i] if has_mask[i] else None, info=None, grid=None,
               pixel_mm=None, peak_lv_frame=int(split["peak_lv_frame"][i]), study=str(study[i]),
               slice_level=int(level[i]),
               sequence=perfusion.sequence_from_record(split, i) if known else None,
               aif_series=perfusion.aif_series_from_record(split, i) if known else None)
          for i in range(n)]


def _previous_ids(output: str) -> list[str]:
  """The ids of the slices an earlier run in `output` wrote (its slices.json; not the failed)."""
  path = os.path.join(output, "slices.json")
  try:
    with open(path) as f:
      return [str(r["id"]) for r in json.load(f).get("slices", [])
              if r.get("id") and r.get("status") != "failed"]
  except (OSError, ValueError, AttributeError, TypeError, KeyError):
    return []


def _previous_folders(output: str) -> list[str]:
  """The slice folders of an earlier predict run in `output` (those its slices.json lists)."""
  return [i for i in _previous_ids(output) if safe_id(i) == i and
          os.path.isdir(os.path.join(output, i)) and not os.path.islink(os.path.join(output, i))]


def slice_files(slice_id: str) -> tuple[str, ...]:
  """The names predict writes in a slice's folder."""
  return CROP_FILES + INPUT_GRID_FILES + (f"{slice_id}.png",)


def foreign_entries(output: str) -> list[str]:
  """The names in `output` that no earlier predict run wrote (hidden ones aside), sorted."""
  if not os.path.isdir(output):
    return []
  ours = set(_previous_folders(output)) | set(RESERVED_NAMES)
  return sorted(n for n in os.listdir(output) if not n.startswith(".") and n not in ours)


def clear_previous(output: str) -> None:
  """Removes the slice folders and tables of an earlier predict run in `output`, so the folder
  ends with exactly the new run's files and the `foreign_entries` it held. Only predict's own
  files go: a slice folder that holds anything else keeps it (and stays)."""
  for slice_id in _previous_folders(output):
    folder = os.path.join(output, slice_id)
    for name in slice_files(slice_id):
      if os.path.isfile(os.path.join(folder, name)):
        os.unlink(os.path.join(folder, name))
    if not os.listdir(folder):
      os.rmdir(folder)
  for name in RESERVED_NAMES:
    if os.path.isfile(os.path.join(output, name)):
      os.unlink(os.path.join(output, name))
