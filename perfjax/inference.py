"""Sliding-window inference: one jitted computation from slices to per-pixel statistics.

The window geometry is `perfjax.windows` (CONVENTIONS.md). `sliding_window` runs extraction,
the model and the combination as ONE jitted computation: the (slice, row, col) origins of all
windows of several slices are cut into chunks of `chunk_size` windows (the memory bound);
`lax.scan` walks the chunks, gathers each chunk's patches with `vmap(lax.dynamic_slice)`, calls
the model once per chunk and adds each window's terms into per-pixel sums in place
(`lax.dynamic_update_slice` in a loop; on an accelerator, where every iteration of such a loop
is a kernel launch and a round trip to the host, chunks are whole rows of windows of one slice
and their terms are added with two products by 0/1 placement matrices instead, `accumulate=
"matmul"`, as PyTorch's `fold` does). For a float32 standard deviation that keeps its digits
where it is tiny next to the mean, the sums are of deviations from a reference prediction (the
plain tiling windows, evaluated first), not of raw p and p^2.

The windows are split over the local devices (`jax.shard_map` on a 1-D mesh, the partial sums
added with `psum`); on a CPU, `perfjax.platform.configure_host_devices()` (launch.py calls it)
makes one XLA host device per core so that both cores stay busy through the serial parts
(`window_plan`). On a CPU the program is compiled with the YNN fusion options of
`perfjax.platform.UNET_CPU_OPTIONS`.

The model comes in as a `WindowPredictor`: `predict_fn(params, patches) -> probabilities`, with
`params` a traced argument (one compilation per predictor and shapes, whatever the parameter
values). A predictor may share work between the windows of a slice by overriding `prepare` and
`windows` (`perfjax.fast_unet.UNetPredictor(fast=True)` computes the first convolution on the
whole image); results equal the per-window path to float32 rounding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perfjax import platform
from perfjax import windows
from perfjax.conventions import PATCH, UM_STRIDE
from perfjax.errors import InputError


class WindowPredictor:
  """The model protocol of `sliding_window`: `predictor(params, patches) -> probabilities`.

  Subclasses are hashable, immutable descriptions of a model (frozen dataclasses): equal
  predictors share one compiled program; `params` is traced. `__call__` maps patches
  [B, P, P, C] to probabilities [B, P, P, K]. `prepare` / `windows` may share work between the
  windows of a slice (dense maps); the defaults evaluate each window on its own.
  """

  def __call__(self, params, patches_bppc):
    raise NotImplementedError

  def prepare(self, params, images_nhwc, windows_per_slice: int, patch: int) -> Any:
    """Work shared by all windows of `images` (once per compiled call); None: nothing shared."""
    del params, images_nhwc, windows_per_slice, patch
    return None

  def windows(self, params, prepared, images_nhwc, origins_b3, patch: int):
    """Probabilities [B, P, P, K] of the windows at (slice, row, col) `origins_b3`."""
    del prepared
    return self(params, windows.gather(images_nhwc, origins_b3, patch))


@dataclasses.dataclass(frozen=True)
class FunctionPredictor(WindowPredictor):
  """A plain `fn(params, patches) -> probabilities` as a `WindowPredictor` (hashed by `fn`:
  reuse the function object to reuse the compilation)."""
  fn: Callable

  def __call__(self, params, patches_bppc):
    return self.fn(params, patches_bppc)


@dataclasses.dataclass(frozen=True)
class ApplyFnPredictor(WindowPredictor):
  """CONVENTIONS.md's `apply_fn(patches) -> probabilities`, without parameters, as a
  `WindowPredictor` (hashed by `apply_fn`)."""
  apply_fn: Callable

  def __call__(self, params, patches_bppc):
    del params
    return self.apply_fn(patches_bppc)


def as_predictor(predict_fn) -> WindowPredictor:
  """`predict_fn` itself when it is a `WindowPredictor`, else wrapped in `FunctionPredictor`."""
  if isinstance(predict_fn, WindowPredictor):
    return predict_fn
  if not callable(predict_fn):
    raise InputError("predict_fn", f"expected fn(params, patches) -> probabilities, got "
                     f"{type(predict_fn).__name__}")
  return FunctionPredictor(predict_fn)


def gaussian_weights(patch: int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """nnU-Net importance map [P, P]: a Gaussian of sigma = patch / 8 with maximum 1."""
  centre = (patch - 1) / 2.0
  d2 = (np.arange(patch) - centre) ** 2
  sigma = patch * sigma_scale
  g = np.exp(-(d2[:, None] + d2[None, :]) / (2.0 * sigma ** 2))
  return (g / g.max()).astype(np.float32)


def _mirror_probs(predictor, params, patches_bppc):
  """Mean of the probabilities over the 4 mirrorings (none, rows, cols, both), mapped back."""
  probs = predictor(params, patches_bppc)
  for axes in ((1,), (2,), (1, 2)):
    probs = probs + jnp.flip(predictor(params, jnp.flip(patches_bppc, axes)), axes)
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

  On a CPU, several XLA host devices (`perfjax.platform.configure_host_devices()`, which
  launch.py calls) each run their share of the windows on their own thread: while one runs a
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
  grid = windows.grid(h, w, patch, stride)
  tiles = windows.grid(h, w, patch, patch)
  grid_set = {tuple(g) for g in grid}
  tile_set = {tuple(t) for t in tiles}
  # A tile that is not a window of this stride serves as reference only (weight 0).
  tile_in_grid = np.array([tuple(t) in grid_set for t in tiles], np.float32)
  rest = np.array([g for g in grid if tuple(g) not in tile_set], np.int32).reshape(-1, 2)
  tile_origins = _with_slices(tiles, n)
  rest_parts = np.array_split(_with_slices(rest, n), n_parts)
  n_tiles = len(tile_origins)
  longest = n_tiles + max(len(r) for r in rest_parts)
  n_chunks = -(-longest // min(chunk_size, longest))
  # As many calls as chunk_size asks for, each as small as they can be (9 windows in chunks of
  # at most 8: 2 calls of 5, not 2 of 8 with 7 padding windows).
  chunk = -(-longest // n_chunks)
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


ACCUMULATIONS = ("loop", "matmul")
# Windows per model call where none is asked for: on a CPU few (measured best: the activations
# stay in cache); on an accelerator all windows of a stride-2 slice (1089 for 128 x 128).
CPU_CHUNK_SIZE = 8
ACCELERATOR_CHUNK_SIZE = 1089


def default_accumulation(platform_name: str) -> str:
  """"loop" on a CPU (in-place updates are cheap there), "matmul" on accelerators."""
  return "loop" if platform_name == "cpu" else "matmul"


def default_chunk_size(platform_name: str) -> int:
  return CPU_CHUNK_SIZE if platform_name == "cpu" else ACCELERATOR_CHUNK_SIZE


def row_plan(n: int, h: int, w: int, patch: int, stride: int, chunk_size: int,
             n_parts: int) -> dict:
  """Chunks of whole window rows for `accumulate="matmul"` (numpy; static).

  A chunk is `rows_per_chunk` consecutive rows of the window grid of one slice (at least one
  row: `chunk_size` is rounded down to whole rows); the chunks of all slices are dealt evenly
  to `n_parts` devices. Returns item [D, C, 2] (slice, index of the chunk's first row), valid
  [D, C] (0 for padding chunks), row_origin [R_pad] and row_valid [R_pad] (the grid's row
  starts, padded with weight-0 rows to whole chunks) and rows_per_chunk.
  """
  rows = windows.starts(h, patch, stride)
  cols = windows.starts(w, patch, stride)
  per_chunk = max(1, min(len(rows), chunk_size // len(cols)))
  n_blocks = -(-len(rows) // per_chunk)
  items = np.array([(s, b * per_chunk) for s in range(n) for b in range(n_blocks)], np.int32)
  parts = np.array_split(items, n_parts)
  n_chunks = max(len(part) for part in parts)
  item = np.zeros((n_parts, n_chunks, 2), np.int32)
  valid = np.zeros((n_parts, n_chunks), np.float32)
  for i, part in enumerate(parts):
    item[i, :len(part)] = part
    valid[i, :len(part)] = 1.0
  pad = n_blocks * per_chunk - len(rows)
  return dict(item=item, valid=valid,
              row_origin=np.concatenate([rows, np.full(pad, rows[-1], np.int32)]),
              row_valid=np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)]),
              rows_per_chunk=per_chunk)


def placement(origins: np.ndarray, patch: int, size: int):
  """0/1 matrix [G, P, size]: entry (g, u, x) is 1 where offset u of window g lands on x."""
  x = jnp.arange(size)
  u = jnp.arange(patch)
  return (x[None, None, :] == jnp.asarray(origins)[:, None, None] + u[None, :, None]
          ).astype(jnp.float32)


def _sliding_window_impl(predictor, params, images_nhwc, *, patch, stride, chunk_size, gaussian,
                         mirror, votes, accumulate, mesh):
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
  count = windows.coverage(h, w, patch, stride).astype(np.float32)[None, :, :, None]

  probe = jax.ShapeDtypeStruct((1, patch, patch, c), images_nhwc.dtype)
  k = jax.eval_shape(lambda x: predictor(params, x), probe).shape[-1]
  weight_pp1 = jnp.asarray(gaussian_weights(patch))[:, :, None]
  n_windows = len(windows.grid(h, w, patch, stride))
  n_channels = 2 * k + (k if gaussian else 0) + (k if votes else 0)

  def window_terms(probs, ref_windows, weight_b):
    """Per-window summands [B, P, P, channels]: p - ref, (p - ref)^2, [w p], [one-hot of the
    window's class]."""
    d = probs - ref_windows
    terms = [d, d * d]
    if gaussian:
      terms.append(weight_pp1 * probs)
    if votes:
      terms.append(jax.nn.one_hot(jnp.argmax(probs, -1), k, dtype=probs.dtype))
    return jnp.concatenate(terms, -1) * weight_b[:, None, None, None]

  def add_windows(acc, terms, org):
    """acc[slice, row:row+P, col:col+P] += terms[i] for every window i (in-place updates)."""
    def one(i, a):
      start = (org[i, 0], org[i, 1], org[i, 2], 0)
      region = lax.dynamic_slice(a, start, (1, patch, patch, a.shape[-1]))
      return lax.dynamic_update_slice(a, region + terms[i][None], start)
    return lax.fori_loop(0, terms.shape[0], one, acc)

  def probabilities(params, images):
    """probs_of(origins [B, 3]) -> [B, P, P, K] float32, with the work shared per call."""
    # Shared work (e.g. the fast UNet's whole-image first layer) does not apply to mirrored
    # windows.
    prepared = None if mirror else predictor.prepare(params, images, n_windows, patch)

    def probs_of(org_b3):
      if mirror:
        probs = _mirror_probs(predictor, params, windows.gather(images, org_b3, patch))
      else:
        probs = predictor.windows(params, prepared, images, org_b3, patch)
      return probs.astype(jnp.float32)
    return probs_of

  def loop_sums(params, images, org_all, valid_all, tile_weight, is_tile):
    """This device's windows -> (ref, summed terms over all devices' windows)."""
    org_all, valid_all, tile_weight = org_all[0], valid_all[0], tile_weight[0]
    probs_of = probabilities(params, images)

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
        terms = window_terms(probs, windows.gather(ref, org, patch), val * (1.0 - tile))
        return ref, add_windows(acc, terms, org), tile_buf

      def without_tiles(ref, acc, tile_buf):
        terms = window_terms(probs, windows.gather(ref, org, patch), val)
        return ref, add_windows(acc, terms, org), tile_buf

      return lax.cond(index < n_tile_chunks, with_tiles, without_tiles, ref, acc, tile_buf), None

    init = (jnp.zeros((n, h, w, k), jnp.float32), jnp.zeros((n, h, w, n_channels), jnp.float32),
            jnp.zeros((n_tile_chunks, chunk, patch, patch, k), jnp.float32))
    xs = (jnp.arange(org_all.shape[0]), org_all, valid_all, is_tile)
    (ref, acc, tile_buf), _ = lax.scan(body, init, xs)
    flat_org = org_all[:n_tile_chunks].reshape(-1, 3)
    flat_probs = tile_buf.reshape((-1, patch, patch, k))
    terms = window_terms(flat_probs, windows.gather(ref, flat_org, patch),
                         tile_weight[:n_tile_chunks].reshape(-1))
    acc = add_windows(acc, terms, flat_org)
    return ref, lax.psum(acc, WINDOW_AXIS)

  def matmul_sums(params, images, item_all, valid_all, row_origin, row_valid, rows_per_chunk):
    """This device's chunks of window rows -> (ref, summed terms over all devices' windows).

    Every device first predicts the tiling windows (the reference; later tiles overwrite
    earlier ones where they overlap). A chunk's terms [R, G, P, P, ch] are placed into its
    slice's [H, W, ch] sums by two exact 0/1 matrix products (columns, then rows).
    """
    item_all, valid_all = item_all[0], valid_all[0]
    probs_of = probabilities(params, images)
    tiles = windows.grid(h, w, patch, patch)
    tile_probs = probs_of(jnp.asarray(_with_slices(tiles, n))).reshape(
        (n, len(tiles), patch, patch, k))
    ref = jnp.zeros((n, h, w, k), jnp.float32)
    for t, (r, c0) in enumerate(tiles):
      ref = ref.at[:, r:r + patch, c0:c0 + patch].set(tile_probs[:, t])
    cols = windows.starts(w, patch, stride)
    col_place = placement(cols, patch, w)  # [G, P, W]
    highest = lax.Precision.HIGHEST

    def body(acc, xs):
      (slice_index, first_row), val = xs
      row_org = lax.dynamic_slice(row_origin, (first_row,), (rows_per_chunk,))
      weight = lax.dynamic_slice(row_valid, (first_row,), (rows_per_chunk,)) * val
      org = jnp.stack([jnp.full((rows_per_chunk, len(cols)), slice_index),
                       jnp.broadcast_to(row_org[:, None], (rows_per_chunk, len(cols))),
                       jnp.broadcast_to(jnp.asarray(cols)[None], (rows_per_chunk, len(cols)))],
                      -1).reshape(-1, 3)
      terms = window_terms(probs_of(org), windows.gather(ref, org, patch),
                           jnp.repeat(weight, len(cols)))
      terms = terms.reshape((rows_per_chunk, len(cols)) + terms.shape[1:])
      by_col = jnp.einsum("rgvuc,gux->rvxc", terms, col_place, precision=highest)
      row_place = placement(row_org, patch, h)  # [R, P, H]
      sums = jnp.einsum("rvxc,rvy->yxc", by_col, row_place, precision=highest)
      start = (slice_index, 0, 0, 0)
      old = lax.dynamic_slice(acc, start, (1, h, w, n_channels))
      return lax.dynamic_update_slice(acc, old + sums[None], start), None

    acc, _ = lax.scan(body, jnp.zeros((n, h, w, n_channels), jnp.float32),
                      ((item_all[:, 0], item_all[:, 1]), valid_all))
    return ref, lax.psum(acc, WINDOW_AXIS)

  sharded, replicated = PartitionSpec(WINDOW_AXIS), PartitionSpec()
  if accumulate == "loop":
    plan = window_plan(n, h, w, patch, stride, chunk_size, mesh.size)
    chunk, n_tile_chunks = plan["org"].shape[2], plan["n_tile_chunks"]  # read by loop_sums
    ref, acc = jax.shard_map(
        loop_sums, mesh=mesh, in_specs=(replicated, replicated, sharded, sharded, sharded,
                                        replicated),
        out_specs=(replicated, replicated), check_vma=False)(
            params, images_nhwc, plan["org"], plan["valid"], plan["tile_weight"],
            plan["is_tile"])
  else:  # "matmul" (sliding_window checked the name)
    plan = row_plan(n, h, w, patch, stride, chunk_size, mesh.size)
    ref, acc = jax.shard_map(
        functools.partial(matmul_sums, rows_per_chunk=plan["rows_per_chunk"]), mesh=mesh,
        in_specs=(replicated, replicated, sharded, sharded, replicated, replicated),
        out_specs=(replicated, replicated), check_vma=False)(
            params, images_nhwc, plan["item"], plan["valid"], plan["row_origin"],
            plan["row_valid"])

  s1, s2 = acc[..., :k], acc[..., k:2 * k]
  mean = ref + s1 / count
  var = jnp.maximum(s2 - s1 * s1 / count, 0.0) / jnp.maximum(count - 1.0, 1.0)
  std = jnp.where(count > 1, jnp.sqrt(var), 0.0)
  out = {"mean": mean, "std": std}
  if gaussian:
    wcount = windows.coverage(h, w, patch, stride, gaussian_weights(patch))
    out["mean"] = acc[..., 2 * k:3 * k] / jnp.asarray(wcount, jnp.float32)[None, :, :, None]
  if votes:
    out["votes"] = acc[..., n_channels - k:] / count
  out["segmentation"] = jnp.argmax(out["mean"], -1).astype(jnp.int32)
  return out


@functools.lru_cache(maxsize=None)
def _compiled(platform_name: str):
  """`_sliding_window_impl` jitted, with the CPU fusion options on a CPU."""
  return jax.jit(_sliding_window_impl,
                 static_argnames=("predictor", "patch", "stride", "chunk_size", "gaussian",
                                  "mirror", "votes", "accumulate", "mesh"),
                 compiler_options=platform.compiler_options_for(platform_name,
                                                                platform.UNET_CPU_OPTIONS))




def sliding_window(predict_fn, params, images=None, patch: int = PATCH, stride: int = UM_STRIDE,
                   chunk_size: int | None = None, gaussian_weighting: bool = False,
                   mirror_tta: bool = False, slices_per_call: int = 8, devices=None,
                   accumulate: str | None = None, votes: bool = False) -> dict:
  """Dense sliding-window prediction of every slice, per CONVENTIONS.md.

  Called as ``sliding_window(predict_fn, params, images, ...)``, or in CONVENTIONS.md's form
  ``sliding_window(apply_fn, images, patch=..., stride=..., ...)`` (images second, the rest by
  keyword) with a parameter-free ``apply_fn(patches) -> probabilities``.

  Args:
    predict_fn: a `WindowPredictor` (e.g. `perfjax.fast_unet.UNetPredictor(model)`) or any
      hashable `fn(params, patches [B,P,P,C]) -> probabilities [B,P,P,K]`; compiled once per
      predictor and shapes (reuse the function object).
    params: the pytree passed to `predict_fn` as its traced first argument (model variables;
      None for a function without parameters).
    images: [N,H,W,C] float array.
    patch, stride: window size and step (pixels).
    chunk_size: windows per model call: bounds the memory of the activations (None: the
      platform's `default_chunk_size`; with "matmul" rounded down to whole rows of windows,
      at least one).
    gaussian_weighting: nnU-Net importance weighting of the mean (sigma = P/8);
      `std` stays the unweighted spread across windows (the UM).
    mirror_tta: each window's probabilities are the mean over its four
      mirrorings (4x the model cost).
    slices_per_call: slices per compiled call (the memory of the accumulators).
    devices: the devices the windows are split over (default: the local devices, as many
      as get at least MIN_WINDOWS_PER_DEVICE windows each, see `window_mesh`); results agree
      to float32 rounding whatever the split.
    accumulate: how the windows' terms are added up, "loop" (in-place updates window by
      window) or "matmul" (0/1 placement products per chunk of window rows); None: the
      platform's `default_accumulation`. Results agree to float32 rounding.
    votes: also return each class's share of the windows covering a pixel that label it so
    (their argmax): the hard-label agreement behind `vote_disagreement`.

  Returns:
    dict of numpy arrays: mean [N,H,W,K] (segmentation = its argmax), std [N,H,W,K] (ddof=1
    across the windows covering a pixel, 0 where one window covers it), count [H,W] int32,
    segmentation [N,H,W] int32 and, with `votes`, votes [N,H,W,K] (sums to 1 over K).
  """
  if images is None:  # CONVENTIONS.md's sliding_window(apply_fn, images, ...)
    if isinstance(predict_fn, WindowPredictor) or not callable(predict_fn):
      raise InputError("images", "missing: sliding_window(predict_fn, params, images) or "
                       "sliding_window(apply_fn, images)")
    predict_fn, params, images = ApplyFnPredictor(predict_fn), None, params
  predictor = as_predictor(predict_fn)
  if np.ndim(images) != 4:
    raise InputError("images", f"expected [N, H, W, C], got shape {np.shape(images)}")
  n, h, w, _ = np.shape(images)
  if n == 0:
    raise InputError("images", "no slices")
  patch = windows.check_int("patch", patch, 1)
  stride = windows.check_int("stride", stride, 1)
  slices_per_call = windows.check_int("slices_per_call", slices_per_call, 1)
  count = windows.coverage(h, w, patch, stride)  # also validates patch <= H, W
  if isinstance(images, jax.Array):
    finite = bool(jnp.isfinite(images).all())
  else:  # numpy's check, without a device round trip (a sizeable share of a stride-32 call)
    images = np.asarray(images, np.float32)
    finite = bool(np.isfinite(images).all())
  if not finite:
    raise InputError("images", "contain NaN or Inf")
  if devices is None:
    devices = jax.local_devices()
    n_windows = min(n, slices_per_call) * len(windows.grid(h, w, patch, stride))
    # Splitting pays only with many windows per device (measured: stride 2, 1089 windows per
    # slice, 1.3x faster on 2 devices; stride 32, 9 windows, slower).
    devices = devices[:max(1, min(len(devices), n_windows // MIN_WINDOWS_PER_DEVICE))]
  mesh = window_mesh(tuple(devices))
  platform_name = mesh.devices.flat[0].platform
  chunk_size = windows.check_int("chunk_size", default_chunk_size(platform_name)
                                 if chunk_size is None else chunk_size, 1)
  accumulate = default_accumulation(platform_name) if accumulate is None else accumulate
  if accumulate not in ACCUMULATIONS:
    raise InputError("accumulate", f"expected one of {ACCUMULATIONS}, got {accumulate!r}")
  on_mesh = NamedSharding(mesh, PartitionSpec())
  if not all(getattr(leaf, "sharding", None) == on_mesh for leaf in jax.tree.leaves(params)):
    params = jax.device_put(params, on_mesh)
  run = _compiled(platform_name)
  parts = []
  for lo in range(0, n, slices_per_call):
    parts.append(run(predictor, params, jax.device_put(images[lo:lo + slices_per_call], on_mesh),
                     patch=patch, stride=stride, chunk_size=chunk_size,
                     gaussian=bool(gaussian_weighting), mirror=bool(mirror_tta),
                     votes=bool(votes), accumulate=accumulate, mesh=mesh))
  out = {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}
  out["count"] = count
  return out


def vote_disagreement(votes_nhwk) -> np.ndarray:
  """[N, H, W] share of the covering windows that disagree with the pixel's majority label
  (1 - the largest class share of `sliding_window(..., votes=True)`): 0 where every window
  labels the pixel alike, up to 1 - 1/K."""
  return 1.0 - np.max(np.asarray(votes_nhwk), axis=-1)
