"""On-device data augmentation for perfusion patches (paper II-C, Fig. 2).

Everything here is a pure, jit-able function of explicit inputs and a `jax.random` key, written
with `jax.numpy` only, so it runs inside the jitted training step on whatever device the step runs
on. `augment_batch` is the entry point; the single transforms are public so that tests and
notebooks can look at each one.

Modes (static):
  * ``"none"``: identity.
  * ``"conventional"``: one random affine transform per sample (horizontal / vertical flips,
    rotation, scaling, shear, small translation), the same for every time frame and for the mask
    (bilinear for images, nearest for labels, zero = background outside the field of view), then
    additive white Gaussian noise.
  * ``"advanced"`` (the paper's proposal): the same geometric transform and white noise, plus
    intensity modulation with a smooth gradient map (linear ramp at a random angle, radial fall-off
    from a random centre, or a one-sided lateral-wall-like drop-off) multiplying all frames,
    contrast augmentation (window and gamma) with probability 0.5 per time series, temporally
    varying Gaussian noise (a different sigma per frame) and Perlin noise added as a static texture.
    The additive noises come last so that modulation and contrast do not reshape them; white and
    per-frame noise are drawn as one Gaussian of standard deviation sqrt(s_white^2 + s_t^2) per
    frame, which has the same distribution as their sum at half the random-number cost.

Cost: the [B, H, W, T] noise is the only large random draw. By default it comes from a keyed
counter hash (`gaussian_noise`, near-Gaussian Irwin-Hall sum), about ten times cheaper on CPU than
`jax.random.normal`; ``AugmentConfig(fast_noise=False)`` uses threefry instead. All other
parameters of a sample come from one `jax.random.bits` draw (each threefry call costs compile
time). `benchmarks/bench_augment.py` measures it alone and inside the training step.

Flips mirror the standard short-axis orientation (RV on the left), as in the paper; the model then
learns both, and everything downstream works from the segmentation, not from the orientation.

Geometry follows CONVENTIONS.md: arrays are indexed ``[row, col]`` with row 0 at the top, and a
positive angle rotates the content counter-clockwise as displayed (the same sense as the sector
angles). Transforms are about the image centre ``((H - 1) / 2, (W - 1) / 2)``, so a flip is the
exact mirror ``col -> W - 1 - col`` and a 90 degree rotation equals ``np.rot90``.

Outputs are not clipped: additive noise can take intensities a little outside [0, 1], as it does in
real images.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from perfjax.errors import InputError

MODES = ("none", "conventional", "advanced")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the augmentation; hashable, so it can be a static jit argument.

  Lengths (translation, modulation widths, Perlin cell counts) are relative to the patch size so
  one config serves 64x64 patches and 128x128 slices alike. Ranges are ``(low, high)`` and are
  sampled uniformly per sample (per frame for `temporal_noise_std`).
  """

  # Geometry (conventional and advanced).
  p_flip_horizontal: float = 0.5  # mirror left-right (col -> W - 1 - col)
  p_flip_vertical: float = 0.5  # mirror top-bottom (row -> H - 1 - row)
  p_affine: float = 0.8  # probability of rotation/scale/shear/translation (flips are separate)
  rotation_deg: tuple[float, float] = (-20.0, 20.0)
  log2_scale: tuple[float, float] = (-0.2, 0.2)  # isotropic zoom 2**u, about 0.87x to 1.15x
  shear: tuple[float, float] = (-0.1, 0.1)  # x' = x + shear * y
  translation: tuple[float, float] = (-0.05, 0.05)  # fraction of the size, each axis
  # Additive white noise (conventional and advanced): one sigma per sample.
  noise_std: tuple[float, float] = (0.0, 0.02)
  fast_noise: bool = True  # hash-based near-Gaussian noise; False: jax.random.normal (threefry)
  # Intensity modulation (advanced): one of ramp / radial / drop-off per sample.
  p_modulation: float = 0.8
  modulation_depth: tuple[float, float] = (0.2, 0.6)  # map goes down to 1 - depth
  modulation_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # ramp, radial, drop-off
  radial_sigma: tuple[float, float] = (0.3, 0.8)  # Gaussian fall-off width, fraction of size
  dropoff_angle_deg: tuple[float, float] = (-60.0, 60.0)  # about 0 = lateral (right)
  dropoff_offset: tuple[float, float] = (0.0, 0.35)  # edge position from centre, fraction of size
  dropoff_width: tuple[float, float] = (0.06, 0.15)  # sigmoid width, fraction of size
  # Contrast (advanced): window [lo, hi] -> [0, 1] then gamma, for whole time series.
  p_contrast: float = 0.5
  window_low: tuple[float, float] = (0.0, 0.1)
  window_high: tuple[float, float] = (0.75, 1.0)
  log2_gamma: tuple[float, float] = (-0.6, 0.6)  # gamma 2**u, about 0.66 to 1.52
  # Temporally varying Gaussian noise (advanced): sigma drawn per frame.
  temporal_noise_std: tuple[float, float] = (0.0, 0.04)
  # Perlin texture (advanced).
  p_perlin: float = 0.8
  perlin_amplitude: tuple[float, float] = (0.0, 0.05)
  perlin_cells: int = 2  # lattice cells across the image at the coarsest octave
  perlin_octaves: int = 3
  perlin_persistence: float = 0.5

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):  # keep the config hashable
        value = tuple(value)
        object.__setattr__(self, f.name, value)
      if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
        raise InputError("augment config", f"{f.name} must be in [0, 1], got {value}")
      if isinstance(value, tuple) and f.name != "modulation_weights":
        if len(value) != 2 or value[0] > value[1]:
          raise InputError("augment config", f"{f.name} must be (low, high), got {value}")
    weights = self.modulation_weights
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
      raise InputError("augment config", f"modulation_weights must be 3 non-negative numbers "
                       f"(ramp, radial, drop-off), not all 0; got {weights}")
    if self.perlin_cells < 1 or self.perlin_octaves < 1:
      raise InputError("augment config", "perlin_cells and perlin_octaves must be >= 1")
    if self.dropoff_width[0] <= 0 or self.radial_sigma[0] <= 0:
      raise InputError("augment config", "dropoff_width and radial_sigma must be > 0")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "AugmentConfig":
    """Builds a config from a dict or ml_collections.ConfigDict; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise InputError("augment config", f"unknown keys {unknown}; known: {sorted(names)}")
    return cls(**values)


def _as_config(config: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
  if config is None:
    return AugmentConfig()
  if isinstance(config, AugmentConfig):
    return config
  if isinstance(config, Mapping) or hasattr(config, "items"):
    return AugmentConfig.from_mapping(dict(config.items()))
  raise InputError("augment config", f"expected AugmentConfig or mapping, got {type(config)}")


def _in_range(u: jax.Array, bounds: tuple[float, float]) -> jax.Array:
  """Maps uniform [0, 1) draws to [low, high)."""
  low, high = bounds
  return low + (high - low) * u


# Each random transform has a core that takes its uniform [0, 1) draws and a public wrapper that
# takes a key. `augment_sample` makes ONE draw per sample and slices it: every threefry call adds
# about 0.1 s to the compile of the training step, and there would be a dozen otherwise.
GEOMETRY_DRAWS = 8
MODULATION_DRAWS = 10


# ----------------------------------------------------------------------------------- geometry


def affine_matrix(angle_deg, log2_scale=0.0, shear=0.0, flip_horizontal=False,
                  flip_vertical=False) -> jax.Array:
  """2x2 forward matrix in display coordinates ``(x, y) = (col - cx, cy - row)``.

  Applied to a point: first the flips, then scaling, shear, and the counter-clockwise rotation.
  """
  a = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  cos, sin = jnp.cos(a), jnp.sin(a)
  rotation = jnp.array([[cos, -sin], [sin, cos]])
  shear_m = jnp.array([[1.0, shear], [0.0, 1.0]], jnp.float32)
  scale = jnp.exp2(jnp.asarray(log2_scale, jnp.float32))
  flips = jnp.stack([jnp.where(flip_horizontal, -1.0, 1.0), jnp.where(flip_vertical, -1.0, 1.0)])
  return (rotation @ shear_m) * scale * flips[None, :]


def _source_coords(matrix_2x2, translation_yx, height: int, width: int):
  """Rows/cols [H, W] of the input sampled by each output pixel (the inverse mapping)."""
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  # Output display coordinates minus the translation (translation_yx is in rows/cols).
  x = cols - cx - translation_yx[1]
  y = cy - rows + translation_yx[0]
  (a, b), (c, d) = matrix_2x2[0], matrix_2x2[1]
  det = a * d - b * c  # closed-form inverse: exact for identity, flips and their products
  xs = (d * x - b * y) / det
  ys = (a * y - c * x) / det
  return cy - ys, xs + cx


def _bilinear(image_hwc: jax.Array, rows_hw: jax.Array, cols_hw: jax.Array) -> jax.Array:
  """Bilinear sampling of all channels at once; 0 outside (map_coordinates order=1, cval=0)."""
  height, width, channels = image_hwc.shape
  flat = image_hwc.reshape(height * width, channels)
  r0, c0 = jnp.floor(rows_hw), jnp.floor(cols_hw)
  dr, dc = rows_hw - r0, cols_hw - c0
  out = jnp.zeros((height * width, channels), image_hwc.dtype)  # output has the input's H, W
  for r, wr in ((r0, 1.0 - dr), (r0 + 1.0, dr)):
    for c, wc in ((c0, 1.0 - dc), (c0 + 1.0, dc)):
      inside = (r >= 0) & (r <= height - 1) & (c >= 0) & (c <= width - 1)
      index = (jnp.clip(r, 0, height - 1).astype(jnp.int32) * width
               + jnp.clip(c, 0, width - 1).astype(jnp.int32))
      weight = jnp.where(inside, wr * wc, 0.0).reshape(-1, 1).astype(image_hwc.dtype)
      out = out + flat[index.reshape(-1)] * weight
  return out.reshape(height, width, channels)


def _nearest(mask_hw: jax.Array, rows_hw: jax.Array, cols_hw: jax.Array) -> jax.Array:
  """Nearest-neighbour label sampling; 0 (background) outside the input."""
  height, width = mask_hw.shape
  r, c = jnp.floor(rows_hw + 0.5), jnp.floor(cols_hw + 0.5)
  inside = (r >= 0) & (r <= height - 1) & (c >= 0) & (c <= width - 1)
  values = mask_hw[jnp.clip(r, 0, height - 1).astype(jnp.int32),
                   jnp.clip(c, 0, width - 1).astype(jnp.int32)]
  return jnp.where(inside, values, jnp.zeros_like(values))


def affine(image_hwt: jax.Array, mask_hw: jax.Array, matrix_2x2: jax.Array,
           translation_yx=(0.0, 0.0)) -> tuple[jax.Array, jax.Array]:
  """Warps every frame and the mask by ``p_out = M (p_in - centre) + centre + t``.

  `matrix_2x2` is the forward map in display coordinates (see `affine_matrix`); `translation_yx`
  is in pixels (rows down, cols right). Images are bilinear, labels nearest; outside is 0.
  """
  height, width = mask_hw.shape
  rows, cols = _source_coords(jnp.asarray(matrix_2x2, jnp.float32),
                              jnp.asarray(translation_yx, jnp.float32), height, width)
  return _bilinear(image_hwt, rows, cols), _nearest(mask_hw, rows, cols)


def flip(image_hwt: jax.Array, mask_hw: jax.Array, horizontal, vertical):
  """Mirrors image and mask left-right and/or top-bottom (flags may be traced booleans)."""
  image_hwt = jnp.where(horizontal, image_hwt[:, ::-1], image_hwt)
  mask_hw = jnp.where(horizontal, mask_hw[:, ::-1], mask_hw)
  image_hwt = jnp.where(vertical, image_hwt[::-1], image_hwt)
  mask_hw = jnp.where(vertical, mask_hw[::-1], mask_hw)
  return image_hwt, mask_hw


def random_geometry(key: jax.Array, height: int, width: int, config: AugmentConfig):
  """Samples one (matrix_2x2, translation_yx) from the config's probabilities and ranges."""
  u = jax.random.uniform(key, (GEOMETRY_DRAWS,), jnp.float32)
  return _geometry_from_uniform(u, height, width, config)


def _geometry_from_uniform(u: jax.Array, height: int, width: int, config: AugmentConfig):
  on = u[0] < config.p_affine
  angle = jnp.where(on, _in_range(u[1], config.rotation_deg), 0.0)
  log2_scale = jnp.where(on, _in_range(u[2], config.log2_scale), 0.0)
  shear = jnp.where(on, _in_range(u[3], config.shear), 0.0)
  size = jnp.array([height, width], jnp.float32)
  translation = jnp.where(on, _in_range(u[4:6], config.translation) * size, 0.0)
  matrix = affine_matrix(angle, log2_scale, shear, u[6] < config.p_flip_horizontal,
                         u[7] < config.p_flip_vertical)
  return matrix, translation


# ------------------------------------------------------------------------ intensity modulation


def _display_grid(height: int, width: int):
  """Display coordinates (x right, y up) in units of the larger side, centred on the image."""
  size = float(max(height, width))
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  return (cols - (width - 1) / 2.0) / size, ((height - 1) / 2.0 - rows) / size


def linear_ramp_map(height: int, width: int, angle_deg, depth) -> jax.Array:
  """[H, W] ramp from 1 (on the side the angle points to) down to 1 - depth on the opposite side."""
  x, y = _display_grid(height, width)
  a = jnp.deg2rad(angle_deg)
  proj = x * jnp.cos(a) + y * jnp.sin(a)
  u = (proj - proj.min()) / jnp.maximum(proj.max() - proj.min(), 1e-6)
  return 1.0 - depth * (1.0 - u)


def radial_map(height: int, width: int, centre_xy, sigma, depth) -> jax.Array:
  """[H, W] Gaussian fall-off: 1 at `centre_xy` (display units of the size), 1 - depth far off."""
  x, y = _display_grid(height, width)
  r2 = (x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2
  return 1.0 - depth * (1.0 - jnp.exp(-0.5 * r2 / sigma**2))


def dropoff_map(height: int, width: int, angle_deg, offset, edge_width, depth) -> jax.Array:
  """[H, W] one-sided drop-off: 1 near the centre, smoothly down to 1 - depth beyond a line.

  The line is perpendicular to `angle_deg` (0 = lateral, right) at distance `offset` from the
  centre; the sigmoid edge is `edge_width` wide (fractions of the size). Mimics the lateral-wall
  signal drop-off of surface-coil perfusion images.
  """
  x, y = _display_grid(height, width)
  a = jnp.deg2rad(angle_deg)
  proj = x * jnp.cos(a) + y * jnp.sin(a)
  return 1.0 - depth * jax.nn.sigmoid((proj - offset) / edge_width)


def gradient_map(key: jax.Array, height: int, width: int,
                 config: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Random smooth modulation map [H, W] in [1 - max depth, 1]; all ones with prob 1 - p."""
  u = jax.random.uniform(key, (MODULATION_DRAWS,), jnp.float32)
  return _gradient_map_from_uniform(u, height, width, config)


def _gradient_map_from_uniform(u: jax.Array, height: int, width: int, config: AugmentConfig):
  depth = _in_range(u[0], config.modulation_depth)
  ramp = linear_ramp_map(height, width, _in_range(u[1], (0.0, 360.0)), depth)
  radial = radial_map(height, width, _in_range(u[2:4], (-0.5, 0.5)),
                      _in_range(u[4], config.radial_sigma), depth)
  drop = dropoff_map(height, width, _in_range(u[5], config.dropoff_angle_deg),
                     _in_range(u[6], config.dropoff_offset),
                     _in_range(u[7], config.dropoff_width), depth)
  cdf = jnp.cumsum(jnp.asarray(config.modulation_weights, jnp.float32))
  kind = jnp.sum(u[8] * cdf[-1] >= cdf[:-1])  # 0 ramp, 1 radial, 2 drop-off, by weight
  chosen = jnp.stack([ramp, radial, drop])[kind]
  return jnp.where(u[9] < config.p_modulation, chosen, 1.0)


# ---------------------------------------------------------------------------------- noise


def _fade(t):
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # 6t^5 - 15t^4 + 10t^3


def _lattice_shape(height: int, width: int, cells: int) -> tuple[int, int]:
  size = float(max(height, width))
  return int(math.ceil(cells * height / size)) + 2, int(math.ceil(cells * width / size)) + 2


def _perlin_octave(angles: jax.Array, shift_yx: jax.Array, height: int, width: int,
                   cells: int) -> jax.Array:
  """One octave of 2D gradient noise with `cells` lattice cells across the larger side.

  Unit gradients at `angles` [n_rows, n_cols] on the lattice, a sub-cell shift, dot products
  with the offsets to the four corners, blended with the quintic fade. Values lie within
  [-sqrt(2)/2, sqrt(2)/2].
  The pixel grid is regular, so a pixel's lattice row depends on its row only and its lattice
  column on its column only: the corner gradients are one-hot [H, n_rows] x lattice x [n_cols, W]
  products (exact, and much faster than a per-pixel gather on CPU).
  """
  size = float(max(height, width))
  grad_row, grad_col = jnp.sin(angles), jnp.cos(angles)  # unit gradients on the lattice
  v = jnp.arange(height, dtype=jnp.float32) * (cells / size) + shift_yx[0]  # lattice units, [H]
  u = jnp.arange(width, dtype=jnp.float32) * (cells / size) + shift_yx[1]  # [W]
  i0, j0 = jnp.floor(v).astype(jnp.int32), jnp.floor(u).astype(jnp.int32)
  fv, fu = (v - i0)[:, None], (u - j0)[None, :]
  n_rows, n_cols = angles.shape
  pick_r = jax.nn.one_hot(jnp.stack([i0, i0 + 1]), n_rows, dtype=jnp.float32)  # [2, H, n_rows]
  pick_c = jax.nn.one_hot(jnp.stack([j0, j0 + 1]), n_cols, dtype=jnp.float32)  # [2, W, n_cols]
  grads = jnp.stack([grad_row, grad_col])  # [2, n_rows, n_cols]
  # g[k, di, dj] = component k of the gradient at corner (di, dj) of each pixel's cell: [2,2,2,H,W]
  g = jnp.einsum("ahr,krc,bwc->kabhw", pick_r, grads, pick_c, precision="highest")

  def corner(di, dj):
    return g[0, di, dj] * (fv - di) + g[1, di, dj] * (fu - dj)

  sv, su = _fade(fv), _fade(fu)
  top = corner(0, 0) * (1.0 - su) + corner(0, 1) * su
  bottom = corner(1, 0) * (1.0 - su) + corner(1, 1) * su
  return top * (1.0 - sv) + bottom * sv


def perlin_noise(key: jax.Array, height: int, width: int, cells: int = 2, octaves: int = 3,
                 persistence: float = 0.5) -> jax.Array:
  """Fractal Perlin noise [H, W] in [-1, 1]: octaves of doubling frequency, weights persistence**o.

  Normalised by sqrt(2) / sum of weights, so |noise| <= 1 exactly (the bound of 2D Perlin noise
  with unit gradients is sqrt(2)/2); typical values are a few tenths.
  """
  u = jax.random.uniform(key, (perlin_draws(height, width, cells, octaves),), jnp.float32)
  return _perlin_from_uniform(u, height, width, cells, octaves, persistence)


def perlin_draws(height: int, width: int, cells: int, octaves: int) -> int:
  """Uniform draws Perlin noise needs: lattice angles and a sub-cell shift per octave."""
  return sum(r * c + 2 for r, c in (_lattice_shape(height, width, cells * 2**o)
                                    for o in range(octaves)))


def _perlin_from_uniform(u, height, width, cells, octaves, persistence):
  shapes = [_lattice_shape(height, width, cells * 2**o) for o in range(octaves)]
  sizes = [r * c + 2 for r, c in shapes]
  total = jnp.zeros((height, width), jnp.float32)
  weight_sum, start = 0.0, 0
  for o, ((n_rows, n_cols), n) in enumerate(zip(shapes, sizes)):
    angles = (2.0 * math.pi) * u[start:start + n - 2].reshape(n_rows, n_cols)
    weight = persistence**o
    total = total + weight * _perlin_octave(angles, u[start + n - 2:start + n], height, width,
                                            cells * 2**o)
    weight_sum += weight
    start += n
  return total * (math.sqrt(2.0) / weight_sum)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def gaussian_noise(key: jax.Array, shape: tuple[int, ...], fast: bool = True) -> jax.Array:
  """Standard normal noise of `shape` (float32), a deterministic function of `key`.

  ``fast=False`` is `jax.random.normal` (threefry). ``fast=True`` seeds a counter-based hash
  (murmur3 finaliser, twice, keyed by two words drawn from `key`) and sums the 12 bytes of three
  hashed words (Irwin-Hall, mean 1530, variance 12 * (256**2 - 1) / 12 = 65535): near-Gaussian
  (kurtosis 2.9, |z| <= 5.98) with only integer work, about ten times cheaper than threefry +
  erf_inv on CPU, where the noise otherwise dominates the cost of augmentation.
  """
  if not fast:
    return jax.random.normal(key, shape, jnp.float32)
  return _hash_normal(jax.random.bits(key, (2,), jnp.uint32), shape)


def _hash_normal(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The fast path of `gaussian_noise`, keyed by two uint32 words."""
  n = math.prod(shape)
  counter = jnp.arange(3 * n, dtype=jnp.uint32).reshape(3, n)
  words = _fmix32(_fmix32(counter ^ seed[0]) + seed[1])
  lanes = (words & jnp.uint32(0x00FF00FF)) + ((words >> 8) & jnp.uint32(0x00FF00FF))
  lanes = lanes.sum(axis=0)  # two 16-bit lanes, each a sum of six bytes (<= 1530)
  total = (lanes & jnp.uint32(0xFFFF)) + (lanes >> 16)
  z = (total.astype(jnp.float32) - 1530.0) * (1.0 / math.sqrt(65535.0))
  return z.reshape(shape)


def contrast(image_hwt: jax.Array, low, high, gamma) -> jax.Array:
  """Window [low, high] -> [0, 1] (clipped), then gamma; one curve for all frames."""
  scaled = jnp.clip((image_hwt - low) / jnp.maximum(high - low, 1e-3), 0.0, 1.0)
  return jnp.exp2(gamma * jnp.log2(scaled))  # scaled**gamma (0 -> 0), vectorises better


# ---------------------------------------------------------------------------------- pipeline


def augment_sample(key: jax.Array, image_hwt: jax.Array, mask_hw: jax.Array, mode: str,
                   config: AugmentConfig = AugmentConfig()) -> tuple[jax.Array, jax.Array]:
  """Augments one time series [H, W, T] and its mask [H, W]; see the module docstring."""
  if mode not in MODES:
    raise InputError("mode", f"expected one of {MODES}, got {mode!r}")
  if mode == "none":
    return image_hwt, mask_hw
  height, width, frames = image_hwt.shape
  n_perlin = perlin_draws(height, width, config.perlin_cells, config.perlin_octaves)
  sizes = (2, GEOMETRY_DRAWS, 7 + frames, MODULATION_DRAWS, n_perlin)  # one draw, sliced
  bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
  noise_seed, u_geo, u, u_mod, u_perlin = jnp.split(bits, np.cumsum(sizes)[:-1])
  u_geo, u, u_mod, u_perlin = (
      (b >> 8).astype(jnp.float32) * (1.0 / 2**24) for b in (u_geo, u, u_mod, u_perlin))
  dtype = image_hwt.dtype
  image = image_hwt.astype(jnp.float32)
  matrix, translation = _geometry_from_uniform(u_geo, height, width, config)
  image, mask = affine(image, mask_hw, matrix, translation)
  sigma_t = jnp.full((frames,), _in_range(u[0], config.noise_std))
  if mode == "advanced":
    image = image * _gradient_map_from_uniform(u_mod, height, width, config)[:, :, None]
    adjusted = contrast(image, _in_range(u[1], config.window_low),
                        _in_range(u[2], config.window_high),
                        jnp.exp2(_in_range(u[3], config.log2_gamma)))
    image = jnp.where(u[4] < config.p_contrast, adjusted, image)
    temporal = _in_range(u[7:], config.temporal_noise_std)  # one sigma per frame
    sigma_t = jnp.sqrt(sigma_t**2 + temporal**2)
    amplitude = jnp.where(u[5] < config.p_perlin, _in_range(u[6], config.perlin_amplitude), 0.0)
    texture = _perlin_from_uniform(u_perlin, height, width, config.perlin_cells,
                                   config.perlin_octaves, config.perlin_persistence)
    image = image + amplitude * texture[:, :, None]
  noise = (_hash_normal(noise_seed, image.shape) if config.fast_noise
           else jax.random.normal(jax.random.fold_in(key, 1), image.shape, jnp.float32))
  image = image + sigma_t * noise
  return image.astype(dtype), mask


def augment_batch(key: jax.Array, images_bhwt: jax.Array, masks_bhw: jax.Array, mode: str,
                  config: AugmentConfig | Mapping[str, Any] | None = None):
  """Augments a batch: images [B, H, W, T] float, masks [B, H, W] int -> same shapes and dtypes.

  `mode` ("none" | "conventional" | "advanced") and `config` are static; every sample gets its own
  parameters from its own key (split from a threefry key drawn from `key`, any key impl), so the
  output is a deterministic function of the key (fold the training step into it before calling),
  and sample i's augmentation does not depend on the batch size or the number of devices. Jit with
  ``jax.jit(augment_batch, static_argnames=("mode", "config"))`` or call inside a jitted step.
  """
  if mode not in MODES:
    raise InputError("mode", f"expected one of {MODES}, got {mode!r}")
  if images_bhwt.ndim != 4:
    raise InputError("images", f"expected [B, H, W, T], got shape {tuple(images_bhwt.shape)}")
  if masks_bhw.ndim != 3 or tuple(masks_bhw.shape) != tuple(images_bhwt.shape[:3]):
    raise InputError("masks", f"expected [B, H, W] = {tuple(images_bhwt.shape[:3])}, "
                     f"got shape {tuple(masks_bhw.shape)}")
  if not jnp.issubdtype(masks_bhw.dtype, jnp.integer):
    raise InputError("masks", f"expected integer labels, got dtype {masks_bhw.dtype}")
  if not jnp.issubdtype(images_bhwt.dtype, jnp.floating):
    raise InputError("images", f"expected floating point, got dtype {images_bhwt.dtype}")
  config = _as_config(config)
  if mode == "none":
    return images_bhwt, masks_bhw
  # Per-sample keys are threefry whatever the caller's key: vmapped draws from a batch of "rbg"
  # keys all come from its first key, while threefry splits are prefix-consistent and the same
  # on any number of devices, so sample i depends only on (key, i) and its own data.
  key = jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32), impl="threefry2x32")
  keys = jax.random.split(key, images_bhwt.shape[0])
  return jax.vmap(lambda k, x, m: augment_sample(k, x, m, mode, config))(
      keys, images_bhwt, masks_bhw)
