"""Each augmentation transform does what it says: geometry, labels, maps, noises, determinism."""
import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from perfjax import augment
from perfjax.errors import InputError

# Everything off except what a test switches on: isolates one transform inside augment_batch.
QUIET = augment.AugmentConfig(
    p_flip_horizontal=0.0, p_flip_vertical=0.0, p_affine=0.0, noise_std=(0.0, 0.0),
    p_modulation=0.0, p_contrast=0.0, temporal_noise_std=(0.0, 0.0), p_perlin=0.0)

# One jitted entry point for all pipeline tests: eager op-by-op dispatch is far slower here.
run = jax.jit(augment.augment_batch, static_argnames=("mode", "config"))


def _batch(b=3, h=16, w=16, t=4, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((b, h, w, t), dtype=np.float32)
  masks = rng.integers(0, 4, (b, h, w)).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(masks)


# ------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("horizontal,vertical", [(True, False), (False, True), (True, True)])
def test_flip_twice_is_identity_and_flip_once_mirrors(horizontal, vertical):
  images, masks = _batch(b=1)
  image, mask = images[0], masks[0]
  once_i, once_m = augment.flip(image, mask, horizontal, vertical)
  axes = tuple(a for a, on in ((1, horizontal), (0, vertical)) if on)
  np.testing.assert_array_equal(once_i, np.flip(np.asarray(image), axes))
  np.testing.assert_array_equal(once_m, np.flip(np.asarray(mask), axes))
  twice_i, twice_m = augment.flip(once_i, once_m, horizontal, vertical)
  np.testing.assert_array_equal(twice_i, image)
  np.testing.assert_array_equal(twice_m, mask)


def test_flip_matrix_in_affine_equals_flip():
  images, masks = _batch(b=1, h=12, w=10)
  matrix = augment.affine_matrix(0.0, 0.0, 0.0, flip_horizontal=True, flip_vertical=True)
  got_i, got_m = augment.affine(images[0], masks[0], matrix)
  np.testing.assert_array_equal(got_i, np.asarray(images[0])[::-1, ::-1])
  np.testing.assert_array_equal(got_m, np.asarray(masks[0])[::-1, ::-1])


def test_identity_affine_leaves_image_and_mask_unchanged():
  images, masks = _batch(b=1, h=16, w=20, t=3)
  got_i, got_m = augment.affine(images[0], masks[0], augment.affine_matrix(0.0, 0.0, 0.0))
  np.testing.assert_array_equal(got_i, images[0])
  np.testing.assert_array_equal(got_m, masks[0])


def test_rotation_by_90_degrees_moves_a_known_pixel_counter_clockwise():
  # 8x8, centre (3.5, 3.5). Pixel (row 1, col 6) is at display (x, y) = (2.5, 2.5): up-right.
  # +90 deg (counter-clockwise as displayed) takes it to (-2.5, 2.5): up-left = (row 1, col 1).
  image = np.zeros((8, 8, 2), np.float32)
  mask = np.zeros((8, 8), np.int32)
  image[1, 6] = [1.0, 0.5]
  mask[1, 6] = 3
  got_i, got_m = augment.affine(jnp.asarray(image), jnp.asarray(mask),
                                augment.affine_matrix(90.0))
  np.testing.assert_allclose(got_i[1, 1], [1.0, 0.5], atol=1e-5)
  assert float(jnp.abs(got_i).sum()) == pytest.approx(1.5, abs=1e-4)
  assert int(got_m[1, 1]) == 3 and int((got_m != 0).sum()) == 1
  # The whole picture: +90 deg equals numpy's counter-clockwise rot90.
  images, masks = _batch(b=1, h=10, w=10)
  got_i, got_m = augment.affine(images[0], masks[0], augment.affine_matrix(90.0))
  np.testing.assert_allclose(got_i, np.rot90(np.asarray(images[0])), atol=1e-5)
  np.testing.assert_array_equal(got_m, np.rot90(np.asarray(masks[0])))


def test_translation_moves_content_down_and_right_by_whole_pixels():
  images, masks = _batch(b=1, h=12, w=12)
  got_i, got_m = augment.affine(images[0], masks[0], augment.affine_matrix(0.0), (2.0, 3.0))
  np.testing.assert_allclose(got_i[2:, 3:], images[0][:-2, :-3], atol=1e-6)
  np.testing.assert_array_equal(got_m[2:, 3:], masks[0][:-2, :-3])
  assert float(jnp.abs(got_i[:2]).max()) == 0.0 and int(got_m[:, :3].max()) == 0  # filled with 0


def test_affine_bilinear_matches_map_coordinates_order1_constant():
  images, masks = _batch(b=1, h=14, w=14, t=3)
  matrix = augment.affine_matrix(23.0, 0.3, 0.15)
  translation = jnp.array([1.3, -2.2])
  got, _ = augment.affine(images[0], masks[0], matrix, translation)
  rows, cols = augment._source_coords(matrix, translation, 14, 14)
  for t in range(3):
    want = ndimage.map_coordinates(images[0][:, :, t], [rows, cols], order=1, mode="constant")
    np.testing.assert_allclose(got[:, :, t], want, atol=1e-5)


def test_scaling_zooms_about_the_centre():
  # A zoom of 2x about the centre (7.5, 7.5): output pixel (r, c) samples input (r/2 + 3.75, ...).
  image = np.zeros((16, 16, 1), np.float32)
  image[5:11, 5:11] = 1.0  # 6x6 square centred on the centre
  got, _ = augment.affine(jnp.asarray(image), jnp.zeros((16, 16), jnp.int32),
                          augment.affine_matrix(0.0, log2_scale=1.0))
  # Output col c samples input col c / 2 + 3.75: the square's edges 4|5 and 10|11 ramp bilinearly.
  want = [0.0, 0.25, 0.75] + [1.0] * 10 + [0.75, 0.25, 0.0]
  np.testing.assert_allclose(got[7, :, 0], want, atol=1e-6)
  np.testing.assert_allclose(got[:, 7, 0], want, atol=1e-6)


def test_labels_stay_in_input_label_set():
  images, masks = _batch(b=4, h=16, w=16, t=2)
  masks = jnp.where(masks == 2, 1, masks)  # labels {0, 1, 3}: 2 must never appear
  cfg = augment.AugmentConfig(p_affine=1.0, rotation_deg=(-45.0, 45.0), shear=(-0.3, 0.3))
  for seed in range(3):
    _, out = run(jax.random.key(seed), images, masks, "advanced", cfg)
    assert out.dtype == jnp.int32 and out.shape == masks.shape
    assert set(np.unique(out).tolist()) <= {0, 1, 3}


# --------------------------------------------------------------------------- intensity maps


def _max_neighbour_step(m):
  m = np.asarray(m)
  return max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())


def test_linear_ramp_spans_its_bounds_and_points_at_its_angle():
  m = np.asarray(augment.linear_ramp_map(32, 32, 0.0, 0.4))  # angle 0: bright on the right
  assert m.min() == pytest.approx(0.6, abs=1e-6) and m.max() == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(m[:, 0], 0.6, atol=1e-6)
  np.testing.assert_allclose(m[:, -1], 1.0, atol=1e-6)
  assert _max_neighbour_step(m) == pytest.approx(0.4 / 31, rel=1e-4)  # linear: equal steps
  up = np.asarray(augment.linear_ramp_map(32, 32, 90.0, 0.4))  # 90: bright at the top
  assert up[0].mean() > up[-1].mean()


def test_radial_and_dropoff_maps_are_bounded_and_shaped():
  r = np.asarray(augment.radial_map(33, 33, (0.0, 0.0), 0.3, 0.5))
  assert r[16, 16] == pytest.approx(1.0) and r.min() >= 0.5 and r.max() <= 1.0
  assert r[16, 0] < r[16, 8] < r[16, 16]  # falls off from the centre
  d = np.asarray(augment.dropoff_map(32, 32, 0.0, 0.2, 0.08, 0.6))  # lateral (right) drop-off
  assert d.min() >= 0.4 and d.max() <= 1.0
  assert d[:, -1].mean() < 0.6 and d[:, 0].mean() > 0.98  # dark right, untouched left
  # Angle 0: a function of the column only.
  np.testing.assert_allclose(d, np.broadcast_to(d[:1], d.shape), atol=1e-6)


def test_random_gradient_maps_are_smooth_and_within_bounds():
  cfg = augment.AugmentConfig(p_modulation=1.0)
  maps = jax.jit(jax.vmap(lambda k: augment.gradient_map(k, 64, 64, cfg)))(
      jax.random.split(jax.random.key(3), 24))
  maps = np.asarray(maps)
  assert maps.min() >= 1.0 - cfg.modulation_depth[1] - 1e-6 and maps.max() <= 1.0 + 1e-6
  assert np.ptp(maps, axis=(1, 2)).min() > 0.05  # each one modulates
  # Smooth: steepest possible is the drop-off, depth / (4 * width * 64) per pixel.
  bound = cfg.modulation_depth[1] / (4 * cfg.dropoff_width[0] * 64)
  assert max(_max_neighbour_step(m) for m in maps) <= bound * 1.01
  off = jax.jit(augment.gradient_map, static_argnums=(1, 2, 3))(
      jax.random.key(0), 16, 16, dataclasses.replace(cfg, p_modulation=0))
  np.testing.assert_array_equal(off, 1.0)


# ---------------------------------------------------------------------------------- noises


def test_perlin_octave_golden_values():
  # All gradients pointing along +col: the value is f - fade(f) of the column fraction f.
  angles = jnp.zeros((4, 4))
  octave = np.asarray(augment._perlin_octave(angles, jnp.zeros(2), 16, 16, 2))  # 8 px cells
  np.testing.assert_allclose(octave[:, 2], 0.25 - 0.103515625, atol=1e-6)  # f = 2/8
  np.testing.assert_allclose(octave[:, 0], 0.0, atol=1e-7)  # lattice points are zeros
  np.testing.assert_allclose(octave[:, 8], 0.0, atol=1e-7)
  np.testing.assert_allclose(octave[:, 4], 0.0, atol=1e-7)  # f = 0.5: fade(0.5) = 0.5
  rand = augment._perlin_octave(jax.random.uniform(jax.random.key(1), (4, 4)) * 6.3,
                                jnp.zeros(2), 16, 16, 2)
  np.testing.assert_allclose(np.asarray(rand)[::8, ::8], 0.0, atol=1e-6)


def test_perlin_noise_zero_mean_bounded_smooth_and_keyed():
  keys = jax.random.split(jax.random.key(7), 16)
  perlin = jax.jit(jax.vmap(lambda k: augment.perlin_noise(k, 64, 64)))
  noise = np.asarray(perlin(keys))
  assert np.abs(noise).max() <= 1.0
  assert abs(noise.mean()) < 0.03
  assert 0.08 < noise.std() < 0.5
  steps = [_max_neighbour_step(n) for n in noise]
  assert max(steps) < 0.2 * np.ptp(noise, axis=(1, 2)).min()  # smooth versus its amplitude
  assert np.abs(noise[0] - noise[1]).max() > 0.1  # differs by key
  np.testing.assert_array_equal(perlin(keys[:1])[0], noise[0])  # same key, same noise


def test_fast_gaussian_noise_statistics():
  z = np.asarray(augment.gaussian_noise(jax.random.key(0), (64, 64, 30)))
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
  assert np.abs(z).max() <= 1530 / 256.0
  kurtosis = np.mean(z**4) / np.mean(z**2) ** 2
  assert 2.8 < kurtosis < 3.0  # Irwin-Hall(12): 2.9 (a Gaussian is 3)
  flat = z.reshape(-1)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01
  other = np.asarray(augment.gaussian_noise(jax.random.key(1), (64, 64, 30)))
  assert abs(np.corrcoef(flat, other.reshape(-1))[0, 1]) < 0.01
  slow = augment.gaussian_noise(jax.random.key(0), (4, 5), fast=False)
  np.testing.assert_array_equal(slow, jax.random.normal(jax.random.key(0), (4, 5)))


def test_per_frame_noise_std_varies_in_advanced_mode_only():
  images = jnp.full((2, 64, 64, 8), 0.5, jnp.float32)
  masks = jnp.zeros((2, 64, 64), jnp.int32)
  cfg = dataclasses.replace(QUIET, temporal_noise_std=(0.0, 0.05))
  out, _ = run(jax.random.key(0), images, masks, "advanced", cfg)
  std_t = np.asarray(out - 0.5).std(axis=(1, 2))  # [B, T]
  assert std_t.max() <= 0.05 * 1.05
  assert (std_t.max(axis=1) / std_t.min(axis=1)).min() > 1.5  # varies across frames
  cfg = dataclasses.replace(QUIET, noise_std=(0.02, 0.05), fast_noise=False)  # threefry path
  out, _ = run(jax.random.key(0), images, masks, "conventional", cfg)
  std_t = np.asarray(out - 0.5).std(axis=(1, 2))
  assert (std_t.max(axis=1) / std_t.min(axis=1)).max() < 1.1  # white: one sigma per sample
  assert np.all((std_t > 0.02 * 0.95) & (std_t < 0.05 * 1.05))


def test_contrast_window_and_gamma():
  x = jnp.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
  np.testing.assert_allclose(augment.contrast(x, 0.0, 1.0, 2.0), x**2, atol=1e-6)
  np.testing.assert_allclose(augment.contrast(x, 0.1, 0.9, 1.0), [0, 0, 0.25, 0.5, 1, 1],
                             atol=1e-6)


def test_contrast_and_modulation_in_pipeline():
  images, masks = _batch(b=2, h=16, w=16, t=3)
  cfg = dataclasses.replace(QUIET, p_contrast=1.0, window_low=(0.0, 0.0), window_high=(1.0, 1.0),
                            log2_gamma=(1.0, 1.0))
  out, _ = run(jax.random.key(0), images, masks, "advanced", cfg)
  np.testing.assert_allclose(out, images**2, atol=1e-6)  # gamma 2 on every sample
  cfg = dataclasses.replace(QUIET, p_modulation=1.0)
  out, out_m = run(jax.random.key(0), images, masks, "advanced", cfg)
  ratio = np.asarray(out / images)  # one map for all frames of a sample
  np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones_like(ratio), rtol=1e-5)
  assert ratio.min() >= 1.0 - cfg.modulation_depth[1] - 1e-5 and ratio.max() <= 1.0 + 1e-5
  np.testing.assert_array_equal(out_m, masks)  # intensity transforms leave labels alone


# --------------------------------------------------------------------------------- pipeline


def test_mode_none_is_identity():
  images, masks = _batch()
  out_i, out_m = augment.augment_batch(jax.random.key(0), images, masks, "none")
  np.testing.assert_array_equal(out_i, images)
  np.testing.assert_array_equal(out_m, masks)


def test_everything_switched_off_is_identity():
  images, masks = _batch(t=1)
  out_i, out_m = run(jax.random.key(0), images, masks, "advanced", QUIET)
  np.testing.assert_array_equal(out_i, images)
  np.testing.assert_array_equal(out_m, masks)


def test_jit_deterministic_per_key_and_shapes_for_patch2_and_patch3():
  for t in (30, 1):  # patch3 and patch2 inputs
    images, masks = _batch(b=3, h=16, w=16, t=t)
    a_i, a_m = run(jax.random.key(1, impl="rbg"), images, masks, "advanced")
    b_i, b_m = run(jax.random.key(1, impl="rbg"), images, masks, "advanced")
    c_i, _ = run(jax.random.key(2, impl="rbg"), images, masks, "advanced")
    assert a_i.shape == images.shape and a_i.dtype == jnp.float32
    assert a_m.shape == masks.shape and a_m.dtype == jnp.int32
    assert np.all(np.isfinite(a_i))
    np.testing.assert_array_equal(a_i, b_i)
    np.testing.assert_array_equal(a_m, b_m)
    assert np.abs(np.asarray(a_i - c_i)).max() > 0.01


def test_sample_depends_only_on_key_and_index_even_for_rbg_keys():
  # The training step uses "rbg" keys, whose vmapped draws would all come from the first key.
  key = jax.random.key(5, impl="rbg")
  images, masks = _batch(b=3, h=16, w=16, t=30)
  three_i, three_m = run(key, images, masks, "advanced")
  two_i, two_m = run(key, images[:2], masks[:2], "advanced")
  np.testing.assert_allclose(two_i, three_i[:2], atol=1e-6)
  np.testing.assert_array_equal(two_m, three_m[:2])
  # Same data in every sample: each still gets its own transform.
  same_i, _ = run(key, jnp.repeat(images[:1], 3, 0), jnp.repeat(masks[:1], 3, 0), "advanced")
  assert np.abs(np.asarray(same_i[0] - same_i[1])).max() > 0.01


def test_config_from_mapping():
  cfg = augment.AugmentConfig.from_mapping({"p_contrast": 0.25, "rotation_deg": [-5.0, 5.0]})
  assert cfg.p_contrast == 0.25 and cfg.rotation_deg == (-5.0, 5.0)
  hash(cfg)  # usable as a static jit argument
  assert augment._as_config({"p_affine": 0.0}) == augment.AugmentConfig(p_affine=0.0)
  assert augment._as_config(None) == augment.AugmentConfig()


def test_bad_inputs_raise_input_error():
  images, masks = _batch()
  key = jax.random.key(0)
  with pytest.raises(InputError, match="mode"):
    augment.augment_batch(key, images, masks, "fancy")
  with pytest.raises(InputError, match="images"):
    augment.augment_batch(key, images[0], masks, "conventional")
  with pytest.raises(InputError, match="masks"):
    augment.augment_batch(key, images, masks[:, :8], "conventional")
  with pytest.raises(InputError, match="masks"):
    augment.augment_batch(key, images, masks.astype(jnp.float32), "conventional")
  with pytest.raises(InputError, match="unknown keys"):
    augment.augment_batch(key, images, masks, "conventional", {"p_rotate": 1.0})
  with pytest.raises(InputError, match="p_contrast"):
    augment.AugmentConfig(p_contrast=1.5)
  with pytest.raises(InputError, match="rotation_deg"):
    augment.AugmentConfig(rotation_deg=(10.0, -10.0))
  with pytest.raises(InputError, match="modulation_weights"):
    augment.AugmentConfig(modulation_weights=(0.0, 0.0, 0.0))


@pytest.mark.slow
def test_same_result_with_the_batch_sharded_over_4_devices():
  # A fresh process, since the device count is fixed when JAX starts.
  script = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from perfjax import augment
rng = np.random.default_rng(0)
x = rng.random((4, 16, 16, 3), dtype=np.float32)
m = rng.integers(0, 4, (4, 16, 16)).astype(np.int32)
f = jax.jit(augment.augment_batch, static_argnames=("mode", "config"))
key = jax.random.key(3, impl="rbg")
ref_i, ref_m = f(key, x, m, "advanced")
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
out_i, out_m = f(key, jax.device_put(x, sharding), jax.device_put(m, sharding), "advanced")
assert len(out_i.sharding.device_set) == 4
np.testing.assert_allclose(out_i, ref_i, atol=1e-5)
np.testing.assert_array_equal(out_m, ref_m)
"""
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
