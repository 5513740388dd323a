"""Sliding-window inference: window geometry, patch extraction and combination.

The geometry is CONVENTIONS.md's: per axis the starts 0, s, 2s, ... up to
size - P, plus size - P when the stride does not land on it; windows are the
row-major Cartesian product of row and column starts. `window_starts` is the
single source of that geometry (training's stride-32 windows come from
`extract_windows`).

`sliding_window` runs extraction, the model and the combination as ONE jitted
computation: the (slice, row, col) origins of all windows of several slices are
cut into chunks of `chunk_size` windows (the memory bound); `lax.scan` walks the
chunks, gathers each chunk's patches with `vmap(lax.dynamic_slice)`, calls the
model once per chunk and adds each window's terms into per-pixel sums in place
(`lax.dynamic_update_slice` in a loop). For a float32 standard deviation that
keeps its digits where it is tiny next to the mean, the sums are of deviations
from a reference prediction (the plain tiling windows, evaluated first), not of
raw p and p^2.

The windows are split over the local devices (`jax.shard_map` on a 1-D mesh, the
partial sums added with `psum`); on a CPU, launch.py makes one XLA host device per
core so that both cores stay busy through the serial parts (`window_plan`).

An apply_fn from `perfjax.model.make_apply_fn(..., fast=True)` also shares work
between the windows of a slice (`prepare` / `windows`: the first convolution is
computed on the whole image); results equal the plain path to float32 rounding.
On CPU set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce
--xla_force_host_platform_device_count=2 (launch.py's) before importing jax (see
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perfjax.errors import InputError

COMBINE_MODES = ("mean", "vote")


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise InputError(name, f"must be an integer >= {minimum}, got {value!r}")
  return int(value)


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
  """Window start offsets along one axis: 0, s, 2s, ... <= size - patch, plus size - patch.

  >>> window_starts(128, 64, 32)
  array([ 0, 32, 64], dtype=int32)
  """
  size = _check_int("size", size, 1)
  patch = _check_int("patch", patch, 1)
  stride = _check_int("stride", stride, 1)
  if patch > size:
    raise InputError("patch", f"window size {patch} is larger than the image size {size}")
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return np.asarray(starts, np.int32)


def window_grid(height: int, width: int, patch: int, stride: int) -> np.ndarray:
  """All window origins [n_windows, 2] (row, col), row-major over the starts."""
  rows = window_starts(height, patch, stride)
  cols = window_starts(width, patch, stride)
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def coverage_count(height: int, width: int, patch: int, stride: int,
                   weight_pp: np.ndarray | None = None) -> np.ndarray:
  """Number of windows covering each pixel [H, W] (or the sum of `weight_pp` over them)."""
  w = np.ones((patch, patch)) if weight_pp is None else np.asarray(weight_pp, np.float64)
  out = np.zeros((height, width))
  for r, c in window_grid(height, width, patch, stride):
    out[r:r + patch, c:c + patch] += w
  return out.astype(np.int32) if weight_pp is None else out


def gaussian_weights(patch: int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """nnU-Net importance map [P, P]: a Gaussian of sigma = patch / 8 with maximum 1."""
  centre = (patch - 1) / 2.0
  d2 = (np.arange(patch) - centre) ** 2
  sigma = patch * sigma_scale
  g = np.exp(-(d2[:, None] + d2[None, :]) / (2.0 * sigma ** 2))
  return (g / g.max()).astype(np.float32)


def extract_windows(images, masks=None, patch: int = 64, stride: int = 32):
  """Cuts every window of every slice: images [N,H,W,C] -> [N * n_windows, P, P, C].

  Slice-major, then row-major over windows (the `window_grid` order). With
  `masks` [N,H,W] also returns their windows [N * n_windows, P, P]. Works on
  numpy arrays (host data pipelines) and jax arrays (inside jit).
  """
  if np.ndim(images) != 4:
    raise InputError("images", f"expected [N, H, W, C], got shape {np.shape(images)}")
  n, h, w, _ = np.shape(images)
  xp = np if isinstance(images, np.ndarray) else jnp
  grid = window_grid(h, w, patch, stride)

  def cut(x):
    stacked = xp.stack([x[:, r:r + patch, c:c + patch] for r, c in grid], axis=1)
    return stacked.reshape((n * len(grid),) + stacked.shape[2:])

  if masks is None:
    return cut(images)
  if np.shape(masks) != (n, h, w):
    raise InputError("masks", f"expected shape {(n, h, w)} to match images, got {np.shape(masks)}")
  return cut(images), cut(masks)


def _split_apply(apply_fn):
  """(pure(params, patches), params): traced params for ModelApply, a closure otherwise."""
  pure = getattr(apply_fn, "pure", None)
  if pure is not None and hasattr(apply_fn, "params"):
    return pure, apply_fn.params
  return _Closure(apply_fn), None


class _Closure:
  """Wraps a plain apply_fn(patches) as pure(params, patches); hashed by the function."""

  def __init__(self, fn: Callable):
    self.fn = fn

  def __call__(self, params, patches):
    del params
    return self.fn(patches)

  def __hash__(self):
    return hash(self.fn)

  def __eq__(self, other):
    return isinstance(other, _Closure) and other.fn is self.fn


def gather_windows(images_nhwc, origins_b3, patch: int):
  """Patches [B, P, P, C] at (slice, row, col) origins [B, 3], by vmap of dynamic_slice."""
  c = images_nhwc.shape[-1]

  def one(o):
    return lax.dynamic_slice(images_nhwc, (o[0], o[1], o[2], 0), (1, patch, patch, c))[0]

  return jax.vmap(one)(origins_b3)


def _mirror_probs(pure, params, patches_bppc):
  """Mean of the probabilities over the 4 mirrorings (none, rows, cols, both), mapped back."""
  probs = pure(params, patches_bppc)
  for axes in ((1,), (2,), (1, 2)):
    probs = probs + jnp.flip(pure(params, jnp.flip(patches_bppc, axes)), axes)
  return probs / 4.0


def _with_slices(grid_m2: np.ndarray, n: int) -> np.ndarray:
  """(row, col) origins -> (slice, row, col) for every slice, slice-major."""
  m = len(grid_m2)
  return np.concatenate([np.repeat(np.arange(n), m)[:, None], np.tile(grid_m2, (n, 1))], 1)


WINDOW_AXIS = "windows"
MIN_WINDOWS_PER_DEVICE = 128


@functools.lru_cache(maxsize=None)
def window_mesh(devices: tuple) -> Mesh:
  """The 1-D mesh the windows of a sliding window are split over.

  On a CPU, several XLA host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, as
  launch.py sets) each run their share of the windows on their own thread: while one runs a
  gather or the accumulation loop, another's convolutions keep the cores busy.
  """
  return Mesh(np.array(devices), (WINDOW_AXIS,))


def window_plan(n: int, h: int, w: int, patch: int, stride: int, chunk_size: int,
                n_parts: int) -> dict:
  """Which windows each of `n_parts` devices evaluates, in chunks (numpy; static).

  Every part first evaluates the tiling windows (stride = patch, 4 per 128x128 slice, <0.5 %
  of a stride-2 map) to build the same reference prediction; the other windows are split
  evenly. Only part 0 adds the tiles' own terms, so the parts' sums add up to the sums over
  all windows exactly once. Returns org [D, C, B, 3], valid [D, C, B], tile_weight [D, C, B],
  is_tile [C, B] (D parts, C chunks of B windows) and n_tile_chunks.
  """
  grid = window_grid(h, w, patch, stride)
  tiles = window_grid(h, w, patch, patch)
  grid_set = {tuple(g) for g in grid}
  tile_set = {tuple(t) for t in tiles}
  # A tile that is not a window of this stride serves as reference only (weight 0).
  tile_in_grid = np.array([tuple(t) in grid_set for t in tiles], np.float32)
  rest = np.array([g for g in grid if tuple(g) not in tile_set], np.int32).reshape(-1, 2)
  tile_origins = _with_slices(tiles, n)
  rest_parts = np.array_split(_with_slices(rest, n), n_parts)
  n_tiles = len(tile_origins)
  chunk = min(chunk_size, n_tiles + max(len(r) for r in rest_parts))
  n_chunks = max(-(-(n_tiles + len(r)) // chunk) for r in rest_parts)
  org = np.zeros((n_parts, n_chunks * chunk, 3), np.int32)
  valid = np.zeros((n_parts, n_chunks * chunk), np.float32)
  for i, part in enumerate(rest_parts):
    order = np.concatenate([tile_origins, part])
    org[i, :len(order)] = order
    org[i, len(order):] = order[-1]  # Padding windows: evaluated, weighted 0.
    valid[i, :len(order)] = 1.0
  tile_weight = np.zeros_like(valid)
  tile_weight[0, :n_tiles] = np.tile(tile_in_grid, n)
  is_tile = (np.arange(n_chunks * chunk) < n_tiles).astype(np.float32)
  shape = (n_parts, n_chunks, chunk)
  return dict(org=org.reshape(shape + (3,)), valid=valid.reshape(shape),
              tile_weight=tile_weight.reshape(shape), is_tile=is_tile.reshape(shape[1:]),
              n_tile_chunks=-(-n_tiles // chunk))


@functools.partial(jax.jit, static_argnames=("pure", "patch", "stride", "chunk_size", "combine",
                                             "gaussian", "mirror", "mesh"))
def _sliding_window_jit(pure, params, images_nhwc, key, *, patch, stride, chunk_size, combine,
                        gaussian, mirror, mesh):
  """One compiled computation: all windows of all slices -> per-pixel statistics.

  The windows are split over the devices of `mesh` (`window_plan`); each device sums its
  windows' terms and the partial sums are added (psum) before the statistics are formed.

  Accuracy of the spread in float32: sums of (p - ref) and (p - ref)^2 are
  accumulated, where ref is the prediction of the plain tiling windows (stride =
  patch, a subset of the windows for the usual strides), computed first. Each
  deviation is then of the order of the spread itself, so the variance keeps its
  digits even where it is tiny next to the mean (sum / sum-of-squares would not).
  """
  n, h, w, c = images_nhwc.shape
  plan = window_plan(n, h, w, patch, stride, chunk_size, mesh.size)
  count = coverage_count(h, w, patch, stride).astype(np.float32)[None, :, :, None]
  chunk, n_tile_chunks = plan["org"].shape[2], plan["n_tile_chunks"]

  probe = jax.ShapeDtypeStruct((1, patch, patch, c), images_nhwc.dtype)
  k = jax.eval_shape(lambda x: pure(params, x), probe).shape[-1]
  weight_pp1 = jnp.asarray(gaussian_weights(patch))[:, :, None]
  shared = hasattr(pure, "windows") and not mirror  # e.g. the fast UNet's whole-image first layer
  n_windows = len(window_grid(h, w, patch, stride))
  n_channels = 2 * k + (k if gaussian else 0) + (k if combine == "vote" else 0)

  def window_terms(probs, ref_windows, weight_b):
    """Per-window summands [B, P, P, channels]: p - ref, (p - ref)^2, [w p], [one-hot vote]."""
    d = probs - ref_windows
    terms = [d, d * d]
    if gaussian:
      terms.append(weight_pp1 * probs)
    if combine == "vote":
      terms.append(jax.nn.one_hot(jnp.argmax(probs, -1), k, dtype=probs.dtype))
    return jnp.concatenate(terms, -1) * weight_b[:, None, None, None]

  def add_windows(acc, terms, org):
    """acc[slice, row:row+P, col:col+P] += terms[i] for every window i (in-place updates)."""
    def one(i, a):
      start = (org[i, 0], org[i, 1], org[i, 2], 0)
      region = lax.dynamic_slice(a, start, (1, patch, patch, a.shape[-1]))
      return lax.dynamic_update_slice(a, region + terms[i][None], start)
    return lax.fori_loop(0, terms.shape[0], one, acc)

  def part_sums(params, images, org_all, valid_all, tile_weight, is_tile):
    """This device's windows -> (ref, summed terms over all devices' windows)."""
    org_all, valid_all, tile_weight = org_all[0], valid_all[0], tile_weight[0]
    prepared = pure.prepare(params, images, n_windows, patch) if shared else None

    def probs_of(org_b3):
      if prepared is not None:
        probs = pure.windows(params, prepared, images, org_b3, patch)
      else:
        patches = gather_windows(images, org_b3, patch)
        probs = _mirror_probs(pure, params, patches) if mirror else pure(params, patches)
      return probs.astype(jnp.float32)

    # One scan over chunks of [tiling windows..., this part's other windows...], so the model
    # appears once in the program. The chunks holding tiles set the reference (later tiles
    # overwrite earlier ones where they overlap) and keep their probabilities, then add the
    # terms of their non-tile windows; the tiles' own terms are added at the end, once the
    # reference is complete.
    def body(carry, xs):
      ref, acc, tile_buf = carry
      index, org, val, tile = xs
      probs = probs_of(org)

      def with_tiles(ref, acc, tile_buf):
        def one(i, r):
          start = (org[i, 0], org[i, 1], org[i, 2], 0)
          old = lax.dynamic_slice(r, start, (1, patch, patch, k))[0]
          return lax.dynamic_update_slice(r, jnp.where(tile[i], probs[i], old)[None], start)
        ref = lax.fori_loop(0, chunk, one, ref)
        tile_buf = lax.dynamic_update_index_in_dim(tile_buf, probs, index, 0)
        terms = window_terms(probs, gather_windows(ref, org, patch), val * (1.0 - tile))
        return ref, add_windows(acc, terms, org), tile_buf

      def without_tiles(ref, acc, tile_buf):
        terms = window_terms(probs, gather_windows(ref, org, patch), val)
        return ref, add_windows(acc, terms, org), tile_buf

      return lax.cond(index < n_tile_chunks, with_tiles, without_tiles, ref, acc, tile_buf), None

    init = (jnp.zeros((n, h, w, k), jnp.float32), jnp.zeros((n, h, w, n_channels), jnp.float32),
            jnp.zeros((n_tile_chunks, chunk, patch, patch, k), jnp.float32))
    xs = (jnp.arange(org_all.shape[0]), org_all, valid_all, is_tile)
    (ref, acc, tile_buf), _ = lax.scan(body, init, xs)
    flat_org = org_all[:n_tile_chunks].reshape(-1, 3)
    flat_probs = tile_buf.reshape((-1, patch, patch, k))
    terms = window_terms(flat_probs, gather_windows(ref, flat_org, patch),
                         tile_weight[:n_tile_chunks].reshape(-1))
    acc = add_windows(acc, terms, flat_org)
    return ref, lax.psum(acc, WINDOW_AXIS)

  sharded, replicated = PartitionSpec(WINDOW_AXIS), PartitionSpec()
  ref, acc = jax.shard_map(
      part_sums, mesh=mesh, in_specs=(replicated, replicated, sharded, sharded, sharded,
                                      replicated),
      out_specs=(replicated, replicated), check_vma=False)(
          params, images_nhwc, plan["org"], plan["valid"], plan["tile_weight"], plan["is_tile"])

  s1, s2 = acc[..., :k], acc[..., k:2 * k]
  mean = ref + s1 / count
  var = jnp.maximum(s2 - s1 * s1 / count, 0.0) / jnp.maximum(count - 1.0, 1.0)
  std = jnp.where(count > 1, jnp.sqrt(var), 0.0)
  out = {"mean": mean, "std": std}
  if gaussian:
    wcount = coverage_count(h, w, patch, stride, gaussian_weights(patch))
    out["mean"] = acc[..., 2 * k:3 * k] / jnp.asarray(wcount, jnp.float32)[None, :, :, None]
  if combine == "vote":
    votes = acc[..., -k:]
    noise = jax.random.uniform(key, votes.shape, jnp.float32, 0.0, 0.5)
    out["votes"] = votes
    out["segmentation"] = jnp.argmax(votes + noise, -1).astype(jnp.int32)
  else:
    out["segmentation"] = jnp.argmax(out["mean"], -1).astype(jnp.int32)
  return out


def sliding_window(apply_fn, images, patch: int = 64, stride: int = 2, chunk_size: int = 32,
                   combine: str = "mean", key=None, gaussian_weighting: bool = False,
                   mirror_tta: bool = False, slices_per_call: int = 8,
                   devices=None) -> dict:
  """Dense sliding-window prediction of every slice, per CONVENTIONS.md.

  Args:
    apply_fn: patches [B,P,P,C] -> probabilities [B,P,P,K]. A
      `perfjax.model.make_apply_fn` result is traced with its params as an
      argument (compiled once per model and shape; with `fast=True` the first
      layer is shared by the windows of dense maps); any other callable is traced
      as a closure (compiled once per function object: reuse it).
    images: [N,H,W,C] float array.
    patch, stride: window size and step (pixels).
    chunk_size: windows per model call: bounds the memory of the activations.
    combine: "mean" (segmentation = argmax of the mean probabilities) or "vote"
      (majority of the per-window argmax, ties broken by a coin flip from `key`).
    key: jax PRNG key for vote ties; default `jax.random.key(0)`.
    gaussian_weighting: nnU-Net importance weighting of the mean (sigma = P/8);
      `std` stays the unweighted spread across windows (the UM).
    mirror_tta: each window's probabilities are the mean over its four
      mirrorings (4x the model cost).
    slices_per_call: slices per compiled call (the memory of the accumulators).
    devices: the devices the windows are split over (default: the local devices, as many
      as get at least MIN_WINDOWS_PER_DEVICE windows each, see `window_mesh`); results agree
      to float32 rounding whatever the split.

  Returns:
    dict of numpy arrays: mean [N,H,W,K], std [N,H,W,K] (ddof=1 across the
    windows covering a pixel, 0 where one window covers it), count [H,W] int32,
    segmentation [N,H,W] int32, and votes [N,H,W,K] in vote mode.
  """
  if combine not in COMBINE_MODES:
    raise InputError("combine", f"must be one of {COMBINE_MODES}, got {combine!r}")
  if np.ndim(images) != 4:
    raise InputError("images", f"expected [N, H, W, C], got shape {np.shape(images)}")
  n, h, w, _ = np.shape(images)
  if n == 0:
    raise InputError("images", "no slices")
  patch = _check_int("patch", patch, 1)
  stride = _check_int("stride", stride, 1)
  chunk_size = _check_int("chunk_size", chunk_size, 1)
  slices_per_call = _check_int("slices_per_call", slices_per_call, 1)
  count = coverage_count(h, w, patch, stride)  # also validates patch <= H, W
  images = np.asarray(images, np.float32) if not isinstance(images, jax.Array) else images
  if not bool(jnp.isfinite(images).all()):
    raise InputError("images", "contain NaN or Inf")
  if key is None and combine == "vote":
    key = jax.random.key(0)
  pure, params = _split_apply(apply_fn)
  if devices is None:
    devices = jax.local_devices()
    windows = min(n, slices_per_call) * len(window_grid(h, w, patch, stride))
    # Splitting pays only with many windows per device (measured: stride 2, 1089 windows per
    # slice, 1.3x faster on 2 devices; stride 32, 9 windows, slower).
    devices = devices[:max(1, min(len(devices), windows // MIN_WINDOWS_PER_DEVICE))]
  mesh = window_mesh(tuple(devices))
  on_mesh = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(params, on_mesh)
  parts = []
  for i, lo in enumerate(range(0, n, slices_per_call)):
    sub = jax.random.fold_in(key, i) if combine == "vote" else None
    parts.append(_sliding_window_jit(pure, params,
                                     jax.device_put(images[lo:lo + slices_per_call], on_mesh),
                                     sub, patch=patch, stride=stride, chunk_size=chunk_size,
                                     combine=combine, gaussian=gaussian_weighting,
                                     mirror=mirror_tta, mesh=mesh))
  out = {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}
  out["count"] = count
  return out
