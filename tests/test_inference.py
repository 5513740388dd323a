"""Sliding-window geometry (perfjax.windows), combination (mean, std), options and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfjax import inference as inf
from perfjax import windows
from perfjax.errors import InputError


def test_window_starts():
  np.testing.assert_array_equal(windows.starts(128, 64, 32), [0, 32, 64])
  s2 = windows.starts(128, 64, 2)
  assert len(s2) == 33 and s2[0] == 0 and s2[-1] == 64 and np.all(np.diff(s2) == 2)
  np.testing.assert_array_equal(windows.starts(100, 64, 30), [0, 30, 36])  # 36 added
  np.testing.assert_array_equal(windows.starts(64, 64, 5), [0])
  np.testing.assert_array_equal(windows.starts(128, 64, 64), [0, 64])
  for bad in [(60, 64, 2), (128, 64, 0), (128, 64, 2.0), (128, 0, 2)]:
    with pytest.raises(InputError):
      windows.starts(*bad)


def test_coverage_counts_paper_fig3b():
  assert len(windows.grid(128, 128, 64, 32)) == 9
  assert len(windows.grid(128, 128, 64, 2)) == 1089
  c2 = windows.coverage(128, 128, 64, 2)
  assert c2[64, 64] == 1024 and c2[0, 0] == 1 and c2[127, 127] == 1 and c2.sum() == 1089 * 64 * 64
  # Row 1 is covered by windows starting at 0 only; row 2 by starts 0 and 2.
  assert c2[1, 0] == 1 and c2[2, 0] == 2 and c2[2, 2] == 4
  c32 = windows.coverage(128, 128, 64, 32)
  assert c32[64, 64] == 4 and c32[0, 0] == 1 and c32[40, 10] == 2 and c32[40, 40] == 4


def _position_image(n, h, w):
  """Channel 0 = row / h, channel 1 = column / w, channel 2 = slice index."""
  rows, cols = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
  img = np.zeros((n, h, w, 3), np.float32)
  img[..., 0], img[..., 1] = rows, cols
  img[..., 2] = np.arange(n)[:, None, None]
  return img


def _closed_form_apply(params, patches):
  """Probabilities that depend on the window origin and on the pixel: closed form.

  The window origin is read from the patch's top-left pixel; class 1's logit is
  sin(7 * origin_row + 3 * origin_col) + pixel_row + slice; class 0's logit is 0.
  """
  del params
  r0, c0 = patches[:, :1, :1, 0:1], patches[:, :1, :1, 1:2]
  z = jnp.sin(7.0 * r0 + 3.0 * c0) + patches[..., 0:1] + patches[..., 2:3]
  return jax.nn.softmax(jnp.concatenate([jnp.zeros_like(z), z], -1), -1)


def _reference(img, patch, stride, fn):
  """Brute force in float64: list every window's probabilities per pixel."""
  n, h, w, _ = img.shape
  grid = windows.grid(h, w, patch, stride)
  stack = np.full((len(grid), n, h, w, 2), np.nan)
  for i, (r, c) in enumerate(grid):
    stack[i, :, r:r + patch, c:c + patch] = np.asarray(fn(None, img[:, r:r + patch, c:c + patch]))
  mean = np.nanmean(stack, 0)
  cnt = np.sum(~np.isnan(stack[..., 0]), 0)[0]
  ss = np.nansum((stack - mean) ** 2, 0)
  std = np.sqrt(ss / np.maximum(cnt - 1, 1)[None, :, :, None]) * (cnt > 1)[None, :, :, None]
  return mean, std, cnt


@pytest.mark.parametrize("accumulate", inf.ACCUMULATIONS)
@pytest.mark.parametrize("h,w,patch,stride", [(24, 20, 8, 2), (24, 20, 8, 5), (16, 16, 8, 8)])
def test_mean_std_closed_form(h, w, patch, stride, accumulate):
  img = _position_image(2, h, w)
  out = inf.sliding_window(_closed_form_apply, None, img, patch=patch, stride=stride, chunk_size=16,
                           accumulate=accumulate)
  mean, std, cnt = _reference(img, patch, stride, _closed_form_apply)
  np.testing.assert_array_equal(out["count"], cnt)
  np.testing.assert_allclose(out["mean"], mean, atol=2e-6)
  np.testing.assert_allclose(out["std"], std, atol=2e-6)
  np.testing.assert_array_equal(out["segmentation"], np.argmax(mean, -1))
  assert out["segmentation"].dtype == np.int32 and out["count"].dtype == np.int32


@pytest.mark.parametrize("accumulate,gaussian", [("loop", True), ("matmul", False)])
def test_votes_count_each_windows_label(accumulate, gaussian):
  """votes = each class's share of the covering windows that label the pixel so (brute force:
  the argmax of every window), with the tiling windows counted once; the other outputs are
  unchanged by asking for them."""
  img = _position_image(2, 24, 20)
  out = inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=2, chunk_size=16,
                           accumulate=accumulate, gaussian_weighting=gaussian, votes=True)
  plain = inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=2, chunk_size=16,
                             accumulate=accumulate, gaussian_weighting=gaussian)
  grid = windows.grid(24, 20, 8, 2)
  ones = np.zeros((2, 24, 20, 2))
  for r, c in grid:
    label = np.argmax(np.asarray(_closed_form_apply(None, img[:, r:r + 8, c:c + 8])), -1)
    ones[:, r:r + 8, c:c + 8] += np.eye(2)[label]
  np.testing.assert_allclose(out["votes"], ones / out["count"][None, :, :, None], atol=1e-6)
  np.testing.assert_allclose(out["votes"].sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(out["mean"], plain["mean"], atol=1e-6)
  np.testing.assert_allclose(out["std"], plain["std"], atol=1e-6)
  np.testing.assert_array_equal(out["segmentation"], plain["segmentation"])
  assert "votes" not in plain
  disagreement = inf.vote_disagreement(out["votes"])
  np.testing.assert_allclose(disagreement, 1.0 - out["votes"].max(-1))
  assert disagreement.min() >= 0.0 and disagreement.max() <= 0.5 and disagreement.max() > 0.0


def test_vote_disagreement_hand():
  votes = np.array([[[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0]]]])  # [1, 1, 2, 4]
  np.testing.assert_allclose(inf.vote_disagreement(votes), [[[0.0, 0.5]]])


def test_chunked_equals_unchunked():
  """Any chunking, either accumulation: the same statistics (matmul chunks are whole window
  rows: 1 and 7 windows give one row of 5, 12 two rows, 10000 all five)."""
  img = _position_image(3, 20, 20)
  outs = [inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=3, chunk_size=c,
                             slices_per_call=s, accumulate=a)
          for a in inf.ACCUMULATIONS for c, s in ((1, 3), (7, 2), (12, 3), (10_000, 3))]
  for o in outs[1:]:  # Each within ~1e-6 of the float64 truth (test_mean_std_closed_form).
    np.testing.assert_allclose(o["mean"], outs[0]["mean"], atol=1e-6)
    np.testing.assert_allclose(o["std"], outs[0]["std"], atol=2e-6)


def test_row_plan_hand_computed():
  """20 x 20 image, patch 8, stride 3: row starts 0 3 6 9 12 (5 rows of 5 windows); 12 windows
  per chunk = 2 rows, so 3 chunks per slice, the last half padding; 2 slices over 2 devices."""
  plan = inf.row_plan(2, 20, 20, 8, 3, chunk_size=12, n_parts=2)
  assert plan["rows_per_chunk"] == 2
  np.testing.assert_array_equal(plan["row_origin"], [0, 3, 6, 9, 12, 12])
  np.testing.assert_array_equal(plan["row_valid"], [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(plan["item"], [[[0, 0], [0, 2], [0, 4]], [[1, 0], [1, 2], [1, 4]]])
  np.testing.assert_array_equal(plan["valid"], np.ones((2, 3)))
  uneven = inf.row_plan(1, 20, 20, 8, 3, chunk_size=1, n_parts=2)  # 5 one-row chunks, 2 devices
  assert uneven["rows_per_chunk"] == 1 and uneven["item"].shape == (2, 3, 2)
  np.testing.assert_array_equal(uneven["valid"], [[1, 1, 1], [1, 1, 0]])
  place = np.asarray(inf.placement(np.array([0, 3]), 2, 6))
  np.testing.assert_array_equal(place, [[[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]],
                                        [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]])


def test_window_plan_even_chunks():
  """9 windows (stride 32) in chunks of at most 8: two calls of 5 windows (one padding), the
  4 tiles first; 2 devices: tiles on both, the other 5 windows split 3 + 2."""
  plan = inf.window_plan(1, 128, 128, 64, 32, chunk_size=8, n_parts=1)
  assert plan["org"].shape == (1, 2, 5, 3) and plan["n_tile_chunks"] == 1
  assert plan["valid"].sum() == 9 and plan["tile_weight"].sum() == 4
  np.testing.assert_array_equal(plan["org"][0, 0, :4, 1:], windows.grid(128, 128, 64, 64))
  split = inf.window_plan(1, 128, 128, 64, 32, chunk_size=8, n_parts=2)
  assert split["org"].shape == (2, 1, 7, 3)
  np.testing.assert_array_equal(split["valid"].sum(-1), [[7], [6]])
  np.testing.assert_array_equal(split["tile_weight"].sum(-1), [[4], [0]])


def test_default_accumulation_and_chunk_per_platform():
  assert inf.default_accumulation("cpu") == "loop" and inf.default_chunk_size("cpu") == 8
  assert inf.default_accumulation("gpu") == "matmul" == inf.default_accumulation("tpu")
  assert inf.default_chunk_size("gpu") == 1089 == len(windows.grid(128, 128, 64, 2))


def test_stride_equal_patch_is_plain_tiling():
  img = np.random.default_rng(0).random((2, 16, 24, 3)).astype(np.float32)
  fn = lambda p, x: jax.nn.softmax(x * 5.0, -1)  # noqa: E731 (pixelwise: tiling reproduces it)
  out = inf.sliding_window(fn, None, img, patch=8, stride=8)
  np.testing.assert_allclose(out["mean"], np.asarray(fn(None, img)), atol=1e-6)
  assert np.all(out["std"] == 0) and np.all(out["count"] == 1)


def test_conventions_form_with_a_parameter_free_apply_fn():
  """CONVENTIONS.md: sliding_window(apply_fn, images, patch=..., stride=...)."""
  img = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)

  def apply_fn(patches):
    return jax.nn.softmax(jnp.stack([patches[..., 0], -patches[..., 1]], -1), axis=-1)

  contract = inf.sliding_window(apply_fn, img, patch=8, stride=2)
  with_params = inf.sliding_window(lambda _, p: apply_fn(p), None, img, patch=8, stride=2)
  for key in ("mean", "std", "count", "segmentation"):
    np.testing.assert_allclose(contract[key], with_params[key], atol=1e-6)
  with pytest.raises(InputError, match="missing"):
    inf.sliding_window(inf.FunctionPredictor(lambda _, p: p), img)


def test_std_accurate_when_tiny_next_to_mean():
  # Probabilities ~0.9999 that vary by ~1e-5 between windows: sum / sum-of-squares in
  # float32 would lose every digit of the variance; Welford keeps them.
  img = _position_image(1, 24, 24)

  def fn(params, x):
    del params
    eps = 1e-4 + 1e-5 * jnp.sin(11.0 * x[:, :1, :1, 0:1] + 5.0 * x[:, :1, :1, 1:2])
    eps = jnp.broadcast_to(eps, x[..., :1].shape)
    return jnp.concatenate([1.0 - eps, eps], -1)

  grid = windows.grid(24, 24, 8, 1)
  vals = 1e-4 + 1e-5 * np.sin(11.0 * grid[:, 0] / 24 + 5.0 * grid[:, 1] / 24)
  inside = (grid[:, 0] <= 12) & (grid[:, 0] > 4) & (grid[:, 1] <= 12) & (grid[:, 1] > 4)
  expected = np.std(vals[inside], ddof=1)  # pixel (12, 12) is covered by starts 5..12
  for accumulate in inf.ACCUMULATIONS:
    out = inf.sliding_window(fn, None, img, patch=8, stride=1, chunk_size=64,
                             accumulate=accumulate)
    assert out["count"][12, 12] == inside.sum() == 64
    np.testing.assert_allclose(out["std"][0, 12, 12, 1], expected, rtol=1e-3)
    np.testing.assert_allclose(out["std"][0, 12, 12, 0], expected, rtol=2e-2)


def test_gaussian_weighting():
  w = inf.gaussian_weights(8)
  assert w.shape == (8, 8) and w.max() == 1.0 and np.allclose(w, w.T) and np.allclose(w, w[::-1])
  img = _position_image(1, 16, 16)
  pixelwise = lambda p, x: jax.nn.softmax(jnp.concatenate([x[..., :1], -x[..., 1:2]], -1), -1)  # noqa
  out = inf.sliding_window(pixelwise, None, img, patch=8, stride=2, gaussian_weighting=True)
  np.testing.assert_allclose(out["mean"][0], np.asarray(pixelwise(None, img))[0], atol=1e-6)
  # Window-dependent outputs: the weighted mean stays within the per-pixel range of windows
  # and differs from the plain mean.
  wo = inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=2, gaussian_weighting=True)
  plain = inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=2)
  assert np.abs(wo["mean"] - plain["mean"]).max() > 1e-3
  np.testing.assert_allclose(wo["std"], plain["std"], atol=1e-6)
  np.testing.assert_allclose(wo["mean"].sum(-1), 1.0, atol=1e-5)


def test_mirror_tta():
  img = _position_image(1, 16, 16)
  pixelwise = lambda p, x: jax.nn.softmax(x[..., :2] * 3.0, -1)  # noqa: E731 (flip-equivariant)
  a = inf.sliding_window(pixelwise, None, img, patch=8, stride=4, mirror_tta=True)
  np.testing.assert_allclose(a["mean"], np.asarray(pixelwise(None, img)), atol=1e-6)
  # A window-position-dependent fn: each window's output becomes the mean of its 4 mirrorings.
  b = inf.sliding_window(_closed_form_apply, None, img, patch=8, stride=8, mirror_tta=True)
  tile = img[:, :8, :8]
  manual = sum(np.flip(np.asarray(_closed_form_apply(None, np.flip(tile, ax))), ax)
               for ax in ((), (1,), (2,), (1, 2))) / 4
  np.testing.assert_allclose(b["mean"][:, :8, :8], manual, atol=1e-6)


def test_extract_windows_order_and_masks():
  img = _position_image(2, 128, 128)
  masks = np.arange(2 * 128 * 128).reshape(2, 128, 128).astype(np.int32)
  patches, mpatches = windows.extract(img, masks, patch=64, stride=32)
  assert patches.shape == (18, 64, 64, 3) and mpatches.shape == (18, 64, 64)
  # Window 5 of slice 1: origin (32, 64).
  np.testing.assert_array_equal(patches[9 + 5], img[1, 32:96, 64:128])
  np.testing.assert_array_equal(mpatches[9 + 5], masks[1, 32:96, 64:128])
  jx = jax.jit(lambda x: windows.extract(x, patch=64, stride=32))(jnp.asarray(img))
  np.testing.assert_array_equal(np.asarray(jx), patches)
  with pytest.raises(InputError):
    windows.extract(img, masks[:1])


def test_bad_inputs():
  fn = lambda p, x: jax.nn.softmax(x[..., :2], -1)  # noqa: E731
  img = np.zeros((1, 16, 16, 2), np.float32)
  with pytest.raises(InputError):
    inf.sliding_window(fn, None, img[0], patch=8)
  with pytest.raises(InputError):
    inf.sliding_window(fn, None, img, patch=32)
  with pytest.raises(InputError):
    inf.sliding_window("not a function", None, img, patch=8)
  with pytest.raises(InputError):
    inf.sliding_window(fn, None, img, patch=8, chunk_size=0)
  with pytest.raises(InputError, match="accumulate"):
    inf.sliding_window(fn, None, img, patch=8, accumulate="scatter")
  bad = img.copy()
  bad[0, 3, 3, 0] = np.nan
  with pytest.raises(InputError, match="NaN"):
    inf.sliding_window(fn, None, bad, patch=8)
  bad[0, 3, 3, 0] = np.inf  # the same check on a device array
  with pytest.raises(InputError, match="Inf"):
    inf.sliding_window(fn, None, jnp.asarray(bad), patch=8)


def test_fast_path_equals_plain_path():
  from perfjax.fast_unet import UNetPredictor
  from perfjax.model import UNet, numpy_params
  model = UNet(features=4, depth=2)
  params = numpy_params(model, 3, seed=0, patch=16)
  img = np.random.default_rng(1).random((2, 28, 24, 3)).astype(np.float32)
  plain = inf.sliding_window(UNetPredictor(model), params, img, patch=16, stride=1, chunk_size=16)
  fast = inf.sliding_window(UNetPredictor(model, fast=True), params, img, patch=16, stride=1,
                            chunk_size=5)
  np.testing.assert_allclose(fast["mean"], plain["mean"], atol=1e-5)
  np.testing.assert_allclose(fast["std"], plain["std"], atol=1e-5)
  assert np.mean(fast["segmentation"] == plain["segmentation"]) > 0.999


_SPLIT_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from perfjax import inference as inf
from perfjax.fast_unet import UNetPredictor
from perfjax.model import UNet, numpy_params
assert len(jax.devices()) == 3
def closed(params, p):
  r0, c0 = p[:, :1, :1, 0:1], p[:, :1, :1, 1:2]
  z = jnp.sin(7.0 * r0 + 3.0 * c0) + p[..., 0:1]
  return jax.nn.softmax(jnp.concatenate([jnp.zeros_like(z), z], -1), -1)
rng = np.random.default_rng(0)
img = rng.random((2, 24, 20, 3), dtype=np.float32)
unet = UNetPredictor(UNet(features=4, depth=2), fast=True)
unet_params = numpy_params(UNet(features=4, depth=2), 3)
cases = ((closed, None, dict(stride=2, chunk_size=7)),
         (closed, None, dict(stride=3, mirror_tta=True)),
         (closed, None, dict(stride=2, gaussian_weighting=True)),
         (unet, unet_params, dict(stride=2, chunk_size=16)))
for accumulate in inf.ACCUMULATIONS:
  for fn, params, kw in cases:
    kw = dict(kw, accumulate=accumulate)
    one = inf.sliding_window(fn, params, img, patch=8, devices=jax.devices()[:1], **kw)
    three = inf.sliding_window(fn, params, img, patch=8, devices=jax.devices(), **kw)
    for name in one:
      np.testing.assert_allclose(three[name], one[name], atol=2e-6, err_msg=name)
print("ok")
"""


@pytest.mark.slow
def test_windows_split_over_devices_equal_one_device():
  """3 host devices, each summing a third of the windows, give the 1-device statistics."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=3")
  done = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_bfloat16_fast_and_plain_paths_agree_with_float32():
  """Mixed precision on every sliding-window path: dense maps (whole-image first layer), the
  per-window fast path and flax's, against float32 within bfloat16's tolerance."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,reimported
  from perfjax.fast_unet import UNetPredictor
  from perfjax.model import UNet, numpy_params
  f32, bf16 = UNet(features=4, depth=2), UNet(features=4, depth=2, dtype=jnp.bfloat16)
  params = numpy_params(f32, 3, seed=0, patch=16)
  img = np.random.default_rng(1).random((1, 24, 24, 3)).astype(np.float32)
  ref = inf.sliding_window(UNetPredictor(f32), params, img, patch=16, stride=1, chunk_size=16)
  for fast, stride in ((True, 1), (True, 8), (False, 1)):
    out = inf.sliding_window(UNetPredictor(bf16, fast=fast), params, img, patch=16,
                             stride=stride, chunk_size=16)
    want = ref if stride == 1 else inf.sliding_window(UNetPredictor(f32), params, img, patch=16,
                                                      stride=stride, chunk_size=16)
    assert out["mean"].dtype == np.float32 and out["std"].dtype == np.float32
    np.testing.assert_allclose(out["mean"], want["mean"], atol=0.02)
    np.testing.assert_allclose(out["std"], want["std"], atol=0.02)
