"""NIfTI files: loading with the checks every reader needs, and the axes convention.

`load_nifti` refuses what cannot be a perfusion slice (colour, complex, too large, too many
frames, unreadable or truncated files) with one `InputError(path, problem)` before or while
the data are read. `from_nifti_axes` / `to_nifti_axes`: NIfTI `[i, j, ...]` <-> CONVENTIONS.md
`[row, col, ...]` (`array[row, col] = data[col, Y - 1 - row]`, the layout of dcm2niix and NIfTI
viewers); the readers (`perfjax.data.io`) and writers (`perfjax.data.writers`) share it, so
files round-trip.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from perfjax.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def is_nifti(path: str | os.PathLike) -> bool:
  """A NIfTI file's name: `.nii.gz` or `.nii`, in any case (`B.NII.GZ` too)."""
  return str(path).lower().endswith(NIFTI_SUFFIXES)



def must_exist(path: pathlib.Path) -> None:
  if not path.exists():
    raise InputError(path, "file not found")



# Bounds of what a NIfTI slice can be, checked before its data are read.
MAX_PIXELS = 2048  # rows or columns of an input slice
MAX_FRAMES = 2000


def load_nifti(path: pathlib.Path) -> tuple[np.ndarray, Any]:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  must_exist(path)
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


def from_nifti_axes(data: np.ndarray) -> np.ndarray:
  """NIfTI [i, j, ...] -> [row, col, ...]: `out[r, c] = data[c, Y - 1 - r]`."""
  return np.ascontiguousarray(np.flip(np.swapaxes(data, 0, 1), 0))


def to_nifti_axes(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.swapaxes(np.flip(array, 0), 0, 1))
