"""Window geometry of the sliding window and of the training patches (CONVENTIONS.md).

Per axis the starts are 0, s, 2s, ... up to size - P, plus size - P when the stride does not land
on it; windows are the row-major Cartesian product of row and column starts. Every user of that
geometry (the training windows of `perfjax.inputs`, `perfjax.inference.sliding_window`, the fast
UNet formulation of `perfjax.fast_unet`, the coverage figure) takes it from here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from perfjax.conventions import PATCH, TRAIN_STRIDE
from perfjax.errors import InputError


def check_int(name: str, value, minimum: int) -> int:
  """`value` as an int, or InputError naming `name` when it is not an integer >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise InputError(name, f"must be an integer >= {minimum}, got {value!r}")
  return int(value)


def starts(size: int, patch: int, stride: int) -> np.ndarray:
  """Window start offsets along one axis: 0, s, 2s, ... <= size - patch, plus size - patch.

  >>> starts(128, 64, 32)
  array([ 0, 32, 64], dtype=int32)
  """
  size = check_int("size", size, 1)
  patch = check_int("patch", patch, 1)
  stride = check_int("stride", stride, 1)
  if patch > size:
    raise InputError("patch", f"window size {patch} is larger than the image size {size}")
  out = list(range(0, size - patch + 1, stride))
  if out[-1] != size - patch:
    out.append(size - patch)
  return np.asarray(out, np.int32)


def grid(height: int, width: int, patch: int, stride: int) -> np.ndarray:
  """All window origins [n_windows, 2] (row, col), row-major over the starts."""
  rows = starts(height, patch, stride)
  cols = starts(width, patch, stride)
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def coverage(height: int, width: int, patch: int, stride: int,
             weight_pp: np.ndarray | None = None) -> np.ndarray:
  """Number of windows covering each pixel [H, W] (or the sum of `weight_pp` over them)."""
  w = np.ones((patch, patch)) if weight_pp is None else np.asarray(weight_pp, np.float64)
  out = np.zeros((height, width))
  for r, c in grid(height, width, patch, stride):
    out[r:r + patch, c:c + patch] += w
  return out.astype(np.int32) if weight_pp is None else out


def extract(images, masks=None, patch: int = PATCH, stride: int = TRAIN_STRIDE):
  """Cuts every window of every slice: images [N,H,W,C] -> [N * n_windows, P, P, C].

  Slice-major, then row-major over windows (the `grid` order). With `masks` [N,H,W] also
  returns their windows [N * n_windows, P, P]. Works on numpy arrays (host data pipelines) and
  jax arrays (inside jit).
  """
  if np.ndim(images) != 4:
    raise InputError("images", f"expected [N, H, W, C], got shape {np.shape(images)}")
  n, h, w, _ = np.shape(images)
  xp = np if isinstance(images, np.ndarray) else jnp
  origins = grid(h, w, patch, stride)

  def cut(x):
    stacked = xp.stack([x[:, r:r + patch, c:c + patch] for r, c in origins], axis=1)
    return stacked.reshape((n * len(origins),) + stacked.shape[2:])

  if masks is None:
    return cut(images)
  if np.shape(masks) != (n, h, w):
    raise InputError("masks", f"expected shape {(n, h, w)} to match images, got {np.shape(masks)}")
  return cut(images), cut(masks)


def gather(images_nhwc, origins_b3, patch: int):
  """Patches [B, P, P, C] at (slice, row, col) origins [B, 3], by vmap of dynamic_slice (jit)."""
  c = images_nhwc.shape[-1]

  def one(o):
    return lax.dynamic_slice(images_nhwc, (o[0], o[1], o[2], 0), (1, patch, patch, c))[0]

  return jax.vmap(one)(origins_b3)
