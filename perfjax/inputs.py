"""Training inputs: model-input selection, the stride-32 training windows, and pure batching.

A training example is one 64x64 window of a 128x128 slice (paper II-B: the stride-32 windows, 9 per
slice, each an independent sample). The batch at step `s` is a pure function of (seed, s): the
examples are shuffled once per epoch with a permutation drawn from a key folded with the epoch, so a
resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from perfjax import windows
from perfjax.conventions import (BACKGROUND, BACKGROUND_OR_RV, NUM_FRAMES, PATCH, RV_BLOOD_POOL,
                                 TRAIN_STRIDE)
from perfjax.errors import InputError

INPUT_KINDS = ("patch3", "patch2")
# "rbg" (threefry key derivation, XLA RngBitGenerator bits): on XLA:CPU it compiles about 10x
# faster than the default threefry (which made compiling the UNet's init take ~25 s here), and its
# numbers are identical for every sharding (so 1 and N devices agree). Its streams may differ
# between backends and XLA versions, and under vmap a batch is drawn from the first key only
# (still independent per sample). philox4x32 would be exact under vmap but does not compile for
# sharded programs with Shardy in jax 0.10.2 ("Unable to convert MHLO to StableHLO": mulhi).
PRNG_IMPL = "rbg"


def prng_key(seed: int) -> jax.Array:
  """The typed root key of a run (all training randomness derives from it)."""
  return jax.random.key(int(seed), impl=PRNG_IMPL)


def input_channels(kind: str, num_frames: int = NUM_FRAMES) -> int:
  """Channels of the model input: all frames (patch3) or the peak-LV frame alone (patch2)."""
  _check_kind(kind)
  return num_frames if kind == "patch3" else 1


def _check_kind(kind: str) -> None:
  if kind not in INPUT_KINDS:
    raise InputError("input", f"expected one of {INPUT_KINDS}, got {kind!r}")


def model_inputs(images_nhwt, peak_lv_frame_n, kind: str) -> np.ndarray:
  """The network input of each slice: [N, H, W, T] (patch3) or [N, H, W, 1] (patch2).

  Args:
    images_nhwt: float [N, H, W, T] normalised slices (CONVENTIONS.md).
    peak_lv_frame_n: int [N], the peak-LV-enhancement frame of each slice (used by patch2 only;
      may be None for patch3).
    kind: "patch3" (all T frames as channels, the paper's proposal) or "patch2" (the baseline:
      the single frame `peak_lv_frame` of each slice).
  """
  _check_kind(kind)
  images_nhwt = np.asarray(images_nhwt, np.float32)
  if images_nhwt.ndim != 4:
    raise InputError("image", f"expected [N, H, W, T], got shape {images_nhwt.shape}")
  if kind == "patch3":
    return images_nhwt
  if peak_lv_frame_n is None:
    raise InputError("peak_lv_frame", "patch2 needs the peak-LV-enhancement frame of each slice")
  peak_n = np.asarray(peak_lv_frame_n)
  n, _, _, frames = images_nhwt.shape
  if peak_n.shape != (n,) or not np.issubdtype(peak_n.dtype, np.integer):
    raise InputError("peak_lv_frame", f"expected {n} integer frame indices, got "
                     f"{peak_n.dtype} shape {peak_n.shape}")
  if np.any(peak_n < 0) or np.any(peak_n >= frames):
    raise InputError("peak_lv_frame", f"frame indices must be in [0, {frames}), got "
                     f"{peak_n.min()}..{peak_n.max()}")
  return np.take_along_axis(images_nhwt, peak_n[:, None, None, None], axis=3)


RV_UNLABELLED_RULES = ("auto", "never")


def partial_masks(masks_nhw: np.ndarray, rv_unlabelled: str = "auto") -> np.ndarray:
  """Masks whose RV was not drawn get `BACKGROUND_OR_RV` on their background.

  "auto": a mask with no RV pixel at all is taken as one whose RV was not labelled (as in
  data sets that annotate only the myocardium and LV), so its background pixels may be RV and
  the loss does not call them either; "never": every mask is complete.
  """
  if rv_unlabelled not in RV_UNLABELLED_RULES:
    raise InputError("config.train.rv_unlabelled",
                     f"expected one of {RV_UNLABELLED_RULES}, got {rv_unlabelled!r}")
  masks = np.array(masks_nhw, np.int32, copy=True)
  if rv_unlabelled == "auto":
    partial = ~np.any(masks == RV_BLOOD_POOL, axis=(1, 2))
    masks[partial] = np.where(masks[partial] == BACKGROUND, BACKGROUND_OR_RV, masks[partial])
  return masks


def labelled_slices(split: dict, name: str = "training data") -> dict:
  """`split` without its slices that have no mask (`has_mask` False: a manual dataset's
  unlabelled slices, their mask filled with -1, which no loss or Dice can use)."""
  n = len(split["mask"])
  has = np.asarray(split.get("has_mask", np.ones(n, bool)), bool)
  if has.all():
    return split
  if not has.any():
    raise InputError(name, f"none of its {n} slices has a mask")
  return {k: np.asarray(v)[has] if np.shape(v)[:1] == (n,) else v for k, v in split.items()}


def training_windows(split: dict, kind: str, patch: int = PATCH, stride: int = TRAIN_STRIDE,
                     rv_unlabelled: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """The training examples of a split: windows [M, P, P, C] float32 and labels [M, P, P] int32.

  `split` is a dict of `load_split` (needs "image", "mask" and, for patch2, "peak_lv_frame");
  its slices without a mask are left out (`labelled_slices`). Window geometry comes from
  `perfjax.windows.extract` (CONVENTIONS.md). Masks without an RV are partial labels
  (`partial_masks`).
  """
  for name in ("image", "mask"):
    if name not in split:
      raise InputError("training data", f"missing {name!r}; keys: {sorted(split)}")
  split = labelled_slices(split)
  images = model_inputs(split["image"], split.get("peak_lv_frame"), kind)
  masks = np.asarray(split["mask"])
  if masks.shape != images.shape[:3]:
    raise InputError("mask", f"expected {images.shape[:3]}, got {masks.shape}")
  masks = partial_masks(masks, rv_unlabelled)
  image_windows, mask_windows = windows.extract(images, masks, patch=patch, stride=stride)
  return np.asarray(image_windows, np.float32), np.asarray(mask_windows, np.int32)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  key = jax.random.fold_in(jax.random.fold_in(prng_key(seed), 0), epoch)
  perm = np.asarray(jax.random.permutation(key, num_examples))  # Same on every backend.
  perm.setflags(write=False)
  return perm


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Example indices of the (global) batch at `step`: a pure function of its arguments.

  Epoch `e = step // (num_examples // batch_size)` visits a permutation of all examples drawn from
  `fold_in(key(seed), e)`; the last incomplete batch of each epoch is dropped.
  """
  if batch_size < 1 or num_examples < batch_size:
    raise InputError("train.batch_size", f"must be in [1, {num_examples}] (the number of training "
                     f"windows), got {batch_size}")
  steps_per_epoch = num_examples // batch_size
  epoch, index = divmod(int(step), steps_per_epoch)
  perm = _epoch_permutation(int(seed), epoch, int(num_examples))
  return perm[index * batch_size:(index + 1) * batch_size]
