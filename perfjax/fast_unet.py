"""The UNet as a sliding-window predictor, and its fast inference formulation.

`UNetPredictor(model, fast)` is what `perfjax.inference.sliding_window` takes for a
`perfjax.model.UNet`. With `fast=True` it evaluates the same function (to float32 rounding) with
explicit jnp/lax ops chosen per layer for XLA:CPU (`benchmarks/bench_layers.py`), in the model's
computation dtype (float32 or bfloat16, softmax in float32), and for dense
maps convolves whole images with the first layer's 9 border variants once instead of once per
window (`first_conv_maps`). `perfjax.model` holds the architecture only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from perfjax import windows
from perfjax.inference import WindowPredictor
from perfjax.model import UNet


@dataclasses.dataclass(frozen=True)
class UNetPredictor(WindowPredictor):
  """The softmax of a UNet as a `perfjax.inference.WindowPredictor`.

  `predictor(variables, patches [B,P,P,C]) -> probabilities [B,P,P,K]`, with `variables` as
  `model.init` returns them ({"params": ...}). Hashable and equal for equal models, so
  `sliding_window` compiles once per (model, formulation, shapes). `fast=True` computes the
  same function (to float32 rounding) with `fast_unet_apply`, faster on CPU, and shares the
  first convolution between the windows of dense maps.
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
      return self(params, windows.gather(images_nhwc, origins_b3, patch))
    pre = first_conv_windows(prepared, origins_b3, patch)
    return jax.nn.softmax(fast_unet_apply(self.model, params, None, pre), axis=-1)



# XLA's CPU YNNPACK fusion (`perfjax.platform.UNET_CPU_OPTIONS`) leaves
# convolutions with in_channels * out_channels <= 256 to the slower Eigen kernel; one zero
# output channel lifts a 16->16 convolution over that threshold (measured ~15% faster).
_YNN_MIN_KERNEL = 257


def _conv3x3(x_bhwc, kernel, bias=None):
  ci, co = kernel.shape[2], kernel.shape[3]
  # Only for XLA:CPU: on a GPU an odd channel count would leave the tensor cores' tiles.
  extra = max(0, -(-_YNN_MIN_KERNEL // ci) - co) if jax.default_backend() == "cpu" else 0
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
  # Products with 0/1 masks only (no sum): exact in the kernel's dtype (float32 or bfloat16).
  k9 = jnp.einsum("yxio,abyx->yxiabo", kernel, jnp.asarray(masks, kernel.dtype))
  k9 = k9.reshape(3, 3, ci, 9 * f)
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

