"""The patch UNet (Ronneberger et al. 2015) in flax.linen, and helpers to apply it.

Architecture (paper II-B, identical to the peers in ../shared/peers): `depth`
resolutions (default 4: 64-32-16-8 for a 64x64 patch), widths f, 2f, 4f, 8f, two
3x3 SAME convolutions with bias and ReLU per block, 2x2 max-pooling down, 2x2
stride-2 transposed convolutions up, concatenated skips and a 1x1 convolution to
`num_classes` logits. No normalisation layers. Inputs are NHWC with the time
frames as channels (C = 30 for patch3, 1 for patch2).

`perfjax.fast_unet.UNetPredictor(model)` is the softmax predictor that
`perfjax.inference.sliding_window` takes, with a faster inference formulation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perfjax import conventions
from perfjax.errors import InputError


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
  num_classes: int = conventions.NUM_CLASSES
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


def flops_per_patch(features: int, depth: int = 4, in_channels: int = conventions.NUM_FRAMES,
                    num_classes: int = conventions.NUM_CLASSES,
                    patch: int = conventions.PATCH) -> int:
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


def init_params(model: UNet, key, patch: int = conventions.PATCH,
                in_channels: int = conventions.NUM_FRAMES):
  """Initialises `model` for [1, patch, patch, in_channels] inputs (Flax initialisers)."""
  return jax.jit(model.init)(key, jnp.zeros((1, patch, patch, in_channels), jnp.float32))


def numpy_params(model: UNet, in_channels: int, seed: int = 0, patch: int = conventions.PATCH):
  """Random parameters of `model` drawn with numpy (LeCun-normal kernels, small biases).

  Same tree as `init_params`, without compiling JAX's random-number kernels (which
  takes tens of seconds on a busy CPU): for tests and benchmarks.
  """
  shapes = variable_shapes(model, in_channels, patch)
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
    std = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
    return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

  return jax.tree.map(draw, shapes)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str | None):
  """The computation dtype that `config.model.dtype` names ("float32" | "bfloat16")."""
  key = "float32" if name is None else str(name)
  if key not in COMPUTE_DTYPES:
    raise InputError("config.model.dtype", f"expected one of {tuple(COMPUTE_DTYPES)}, "
                     f"got {name!r}")
  return COMPUTE_DTYPES[key]


def make_model(config) -> UNet:
  """The UNet of a training config (`config.model`: features, depth, dropout_rate, dtype).

  `config.model.dtype` (float32 default; older configs lack it) is the computation dtype:
  with "bfloat16" the convolutions run in bfloat16 while parameters, logits, softmax, loss and
  optimiser stay float32 (mixed precision).
  """
  return UNet(features=config.model.features, depth=config.model.depth,
              num_classes=conventions.NUM_CLASSES, dropout_rate=config.model.dropout_rate,
              dtype=compute_dtype(config.model.get("dtype")))


def variable_shapes(model: UNet, in_channels: int, patch: int = conventions.PATCH):
  """`jax.eval_shape(model.init)`: the variables' tree of ShapeDtypeStructs, nothing computed."""
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, patch, patch, in_channels), jnp.float32))
