"""The patch UNet (Ronneberger et al. 2015) in flax.linen, and helpers to apply it.

Architecture (paper II-B, identical to the peers in ../shared/peers): `depth`
resolutions (default 4: 64-32-16-8 for a 64x64 patch), widths f, 2f, 4f, 8f, two
3x3 SAME convolutions with bias and ReLU per block, 2x2 max-pooling down, 2x2
stride-2 transposed convolutions up, concatenated skips and a 1x1 convolution to
`num_classes` logits. No normalisation layers. Inputs are NHWC with the time
frames as channels (C = 30 for patch3, 1 for patch2).

`make_apply_fn(model, params)` gives the softmax `apply_fn` that
`perfjax.inference.sliding_window` expects; with `fast=True` it evaluates the
same function with a faster formulation (see `perfjax.inference`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perfjax.errors import InputError
from perfjax.inference import gather_windows


class ConvBlock(nn.Module):
  """Two 3x3 SAME convolutions, each followed by a ReLU."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    for name in ("conv1", "conv2"):
      x_bhwc = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype, name=name)(x_bhwc)
      x_bhwc = nn.relu(x_bhwc)
    return x_bhwc


class UNet(nn.Module):
  """Vanilla 2D UNet returning per-pixel class logits.

  Attributes:
    features: width f of the first level; level l has f * 2**l channels.
    depth: number of resolutions (levels); the input size must be divisible by
      2**(depth - 1).
    num_classes: number of output logits per pixel.
    dropout_rate: dropout after the bottleneck and after every decoder block,
      active only with `train=True` (rng stream "dropout"); used by the
      Monte-Carlo-dropout uncertainty baseline.
    dtype: computation dtype of the convolutions (parameters stay float32);
      logits are returned as float32.
  """
  features: int = 16
  depth: int = 4
  num_classes: int = 4
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, train: bool = False):
    if x_bhwc.ndim != 4:
      raise InputError("UNet input", f"expected [B, H, W, C], got shape {tuple(x_bhwc.shape)}")
    factor = 2 ** (self.depth - 1)
    if x_bhwc.shape[1] % factor or x_bhwc.shape[2] % factor:
      raise InputError("UNet input", f"H and W must be divisible by {factor} for depth "
                       f"{self.depth}, got {tuple(x_bhwc.shape[1:3])}")
    use_dropout = train and self.dropout_rate > 0.0

    def dropout(y):
      return nn.Dropout(self.dropout_rate, deterministic=not use_dropout)(y) if use_dropout else y

    x = x_bhwc.astype(self.dtype)
    skips = []
    for level in range(self.depth - 1):
      x = ConvBlock(self.features * 2 ** level, self.dtype, name=f"down{level}")(x)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(self.features * 2 ** (self.depth - 1), self.dtype, name="bottleneck")(x)
    x = dropout(x)
    for level in reversed(range(self.depth - 1)):
      width = self.features * 2 ** level
      x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                           name=f"upconv{level}")(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = ConvBlock(width, self.dtype, name=f"up{level}")(x)
      x = dropout(x)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def unet_param_count(features: int, depth: int = 4, in_channels: int = 30, num_classes: int = 4) -> int:
  """Closed-form parameter count of `UNet` (weights + biases)."""
  def conv(ci, co, k):
    return k * k * ci * co + co

  total, ci = 0, in_channels
  for level in range(depth):
    co = features * 2 ** level
    total += conv(ci, co, 3) + conv(co, co, 3)
    ci = co
  for level in reversed(range(depth - 1)):
    co = features * 2 ** level
    total += conv(ci, co, 2) + conv(2 * co, co, 3) + conv(co, co, 3)
    ci = co
  return total + conv(ci, num_classes, 1)


def flops_per_patch(features: int, depth: int = 4, in_channels: int = 30, num_classes: int = 4,
                    patch: int = 64) -> int:
  """Analytic FLOPs (2 x multiply-accumulates of convolutions) of one forward pass.

  Matches the peers' count: 0.322 GFLOP for f=16, 30 channels, 64x64.
  """
  macs, ci, size = 0, in_channels, patch
  for level in range(depth):
    co = features * 2 ** level
    macs += size * size * 9 * (ci * co + co * co)
    ci = co
    if level < depth - 1:
      size //= 2
  for level in reversed(range(depth - 1)):
    co = features * 2 ** level
    size *= 2
    macs += size * size * ci * co  # 2x2 stride-2 transposed conv: one tap per output pixel
    macs += size * size * 9 * (2 * co * co + co * co)
    ci = co
  macs += size * size * ci * num_classes
  return 2 * macs


@dataclasses.dataclass(frozen=True)
class SoftmaxApply:
  """Hashable pure function (params, patches [B,P,P,C]) -> softmax probs [B,P,P,K].

  Being hashable and equal for equal models lets `sliding_window` cache one
  compilation per (model, formulation, shapes) and pass params as a traced
  argument instead of baking them into the program as constants.
  """
  model: UNet
  fast: bool = False

  def __call__(self, params, patches_bhwc):
    if self.fast:
      logits = fast_unet_apply(self.model, params, patches_bhwc)
    else:
      logits = self.model.apply(params, patches_bhwc)
    return jax.nn.softmax(logits, axis=-1)

  def prepare(self, params, images_nhwc, windows_per_slice: int, patch: int):
    """Work shared by all windows of `images` (sliding_window calls it once per call).

    The fast formulation convolves whole images with the first layer's 9 border
    variants and gathers each window's first-layer output (exact: see
    `first_conv_maps`). That costs about 36 first-layer patch passes per
    patch-sized area of the image, so it is used only for dense maps (stride 2:
    1089 windows per slice); otherwise None (per-patch evaluation).
    """
    _, h, w, _ = images_nhwc.shape
    if not self.fast or windows_per_slice < 12 * h * w / patch ** 2:
      return None
    kernel = params["params"]["down0"]["conv1"]["kernel"].astype(self.model.dtype)
    return first_conv_maps(kernel, images_nhwc)

  def windows(self, params, prepared, images_nhwc, origins_b3, patch: int):
    """Probabilities of the windows at (slice, row, col) `origins_b3`: [B, P, P, K]."""
    if prepared is None:
      return self(params, gather_windows(images_nhwc, origins_b3, patch))
    pre = first_conv_windows(prepared, origins_b3, patch)
    return jax.nn.softmax(fast_unet_apply(self.model, params, None, pre), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelApply:
  """The `apply_fn` of `sliding_window` for a UNet: patches -> softmax probabilities.

  Callable as `fn(patches)`; `sliding_window` recognises it and uses `fn.pure`
  with `fn.params` so that compiled code is shared between parameter values.
  """
  pure: SoftmaxApply
  params: Any

  def __call__(self, patches_bhwc):
    return self.pure(self.params, patches_bhwc)


def make_apply_fn(model: UNet, params, fast: bool = False) -> ModelApply:
  """Returns fn(patches [B,P,P,C]) -> softmax probs [B,P,P,K] of `model` with `params`.

  `fast=True` computes the same function (to float32 rounding) with the
  formulation of `fast_unet_apply`, faster on CPU.
  """
  return ModelApply(SoftmaxApply(model, fast), params)


def init_params(model: UNet, key, patch: int = 64, in_channels: int = 30):
  """Initialises `model` for [1, patch, patch, in_channels] inputs (Flax initialisers)."""
  return jax.jit(model.init)(key, jnp.zeros((1, patch, patch, in_channels), jnp.float32))


def numpy_params(model: UNet, in_channels: int, seed: int = 0, patch: int = 64):
  """Random parameters of `model` drawn with numpy (LeCun-normal kernels, small biases).

  Same tree as `init_params`, without compiling JAX's random-number kernels (which
  takes tens of seconds on a busy CPU): for tests and benchmarks.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, patch, patch, in_channels), jnp.float32))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
    std = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
    return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

  return jax.tree.map(draw, shapes)


# ---------------------------------------------------------------------------
# Fast formulation (same function as UNet.apply, to float32 rounding).


# XLA's CPU YNNPACK fusion (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...) leaves
# convolutions with in_channels * out_channels <= 256 to the slower Eigen kernel; one zero
# output channel lifts a 16->16 convolution over that threshold (measured ~15% faster).
_YNN_MIN_KERNEL = 257


def _conv3x3(x_bhwc, kernel, bias=None):
  ci, co = kernel.shape[2], kernel.shape[3]
  extra = max(0, -(-_YNN_MIN_KERNEL // ci) - co)
  k = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else kernel
  y = jax.lax.conv_general_dilated(x_bhwc, k, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y[..., :co] if extra else y
  return y if bias is None else y + bias


def _upconv2x2(x_bhwc, kernel, bias):
  """2x2 stride-2 transposed conv as one matmul + depth-to-space (Flax's flipped kernel)."""
  b, h, w, c = x_bhwc.shape
  co = kernel.shape[-1]
  k = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, 4 * co)  # [c, (a, b, co)]
  y = jnp.dot(x_bhwc.reshape(-1, c), k).reshape(b, h, w, 2, 2, co)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, co) + bias


def _maxpool2x2(x_bhwc):
  b, h, w, c = x_bhwc.shape
  return x_bhwc.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def fast_unet_apply(model: UNet, params, x_bhwc, first_preact_bhwc=None):
  """`model.apply(params, x)` (inference) written with explicit jnp/lax ops.

  With `first_preact_bhwc` (the first convolution's output before bias and ReLU,
  e.g. assembled from whole-image maps by `first_conv_windows`), `x_bhwc` is
  not used and the first convolution is skipped.
  """
  p = params["params"]
  dt = model.dtype
  cast = lambda a: a.astype(dt)  # noqa: E731
  h = None if x_bhwc is None else cast(x_bhwc)
  skips = []
  for level in range(model.depth):
    name = f"down{level}" if level < model.depth - 1 else "bottleneck"
    blk = p[name]
    if level == 0 and first_preact_bhwc is not None:
      h = jax.nn.relu(cast(first_preact_bhwc) + cast(blk["conv1"]["bias"]))
    else:
      h = jax.nn.relu(_conv3x3(h, cast(blk["conv1"]["kernel"]), cast(blk["conv1"]["bias"])))
    h = jax.nn.relu(_conv3x3(h, cast(blk["conv2"]["kernel"]), cast(blk["conv2"]["bias"])))
    if level < model.depth - 1:
      skips.append(h)
      h = _maxpool2x2(h)
  for level in reversed(range(model.depth - 1)):
    up = p[f"upconv{level}"]
    h = _upconv2x2(h, cast(up["kernel"]), cast(up["bias"]))
    h = jnp.concatenate([h, skips[level]], axis=-1)
    blk = p[f"up{level}"]
    h = jax.nn.relu(_conv3x3(h, cast(blk["conv1"]["kernel"]), cast(blk["conv1"]["bias"])))
    h = jax.nn.relu(_conv3x3(h, cast(blk["conv2"]["kernel"]), cast(blk["conv2"]["bias"])))
  head = p["head"]
  logits = jnp.dot(h, cast(head["kernel"][0, 0])) + cast(head["bias"])
  return logits.astype(jnp.float32)


_EDGE_MASKS = np.array([[0, 1, 1], [1, 1, 1], [1, 1, 0]], np.float32)  # first / inner / last


def first_conv_maps(kernel, images_nhwc):
  """Whole-image first-layer maps for all windows: [N, 3, 3, H, W, F].

  A window pixel's 3x3 neighbourhood is cut by the window's zero padding only on
  the window's first/last row and column. Map (a, b) is the image convolved with
  the kernel whose taps outside the window are zeroed for a pixel in row class a
  and column class b (0 first, 1 inner, 2 last), so every window's first-layer
  output is a gather from these 9 maps: about 36 patch-convolutions per slice
  instead of one per window (1089 at stride 2).
  """
  ci, f = kernel.shape[2], kernel.shape[3]
  masks = _EDGE_MASKS[:, None, :, None] * _EDGE_MASKS[None, :, None, :]  # [a, b, dy, dx]
  k9 = jnp.einsum("yxio,abyx->yxiabo", kernel, jnp.asarray(masks)).reshape(3, 3, ci, 9 * f)
  maps = _conv3x3(images_nhwc.astype(kernel.dtype), k9)
  n, h, w, _ = maps.shape
  return maps.reshape(n, h, w, 3, 3, f).transpose(0, 3, 4, 1, 2, 5)


def first_conv_windows(maps, origins_b3, patch: int):
  """Gathers the first-layer pre-activations of windows at (slice, row, col) origins."""
  f = maps.shape[-1]
  spans = ((0, 1), (1, patch - 2), (patch - 1, 1))  # (offset, length) per row/col class

  def one(o):
    rows = []
    for a, (ro, rl) in enumerate(spans):
      cols = [jax.lax.dynamic_slice(maps, (o[0], a, b, o[1] + ro, o[2] + co, 0),
                                    (1, 1, 1, rl, cl, f)).reshape(rl, cl, f)
              for b, (co, cl) in enumerate(spans)]
      rows.append(jnp.concatenate(cols, axis=1))
    return jnp.concatenate(rows, axis=0)

  return jax.vmap(one)(origins_b3)

