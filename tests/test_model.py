"""UNet shapes, exact parameter counts, FLOP count, dropout and the fast formulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfjax.errors import InputError
from perfjax.fast_unet import UNetPredictor
from perfjax.model import UNet, count_params, flops_per_patch, init_params, numpy_params


def _hand_count(f, depth, cin, k):
  """Parameter count written out level by level (3x3 kernels + biases)."""
  if depth == 4:
    enc = (9 * cin * f + f + 9 * f * f + f                      # 64x64
           + 9 * f * 2 * f + 2 * f + 9 * 2 * f * 2 * f + 2 * f    # 32x32
           + 9 * 2 * f * 4 * f + 4 * f + 9 * 4 * f * 4 * f + 4 * f)  # 16x16
    bott = 9 * 4 * f * 8 * f + 8 * f + 9 * 8 * f * 8 * f + 8 * f
    dec = (4 * 8 * f * 4 * f + 4 * f + 9 * 8 * f * 4 * f + 4 * f + 9 * 4 * f * 4 * f + 4 * f
           + 4 * 4 * f * 2 * f + 2 * f + 9 * 4 * f * 2 * f + 2 * f + 9 * 2 * f * 2 * f + 2 * f
           + 4 * 2 * f * f + f + 9 * 2 * f * f + f + 9 * f * f + f)
  else:  # depth 3
    enc = 9 * cin * f + f + 9 * f * f + f + 9 * f * 2 * f + 2 * f + 9 * 2 * f * 2 * f + 2 * f
    bott = 9 * 2 * f * 4 * f + 4 * f + 9 * 4 * f * 4 * f + 4 * f
    dec = (4 * 4 * f * 2 * f + 2 * f + 9 * 4 * f * 2 * f + 2 * f + 9 * 2 * f * 2 * f + 2 * f
           + 4 * 2 * f * f + f + 9 * 2 * f * f + f + 9 * f * f + f)
  return enc + bott + dec + f * k + k


@pytest.mark.parametrize("features,depth,cin", [(16, 4, 30), (4, 3, 1)])
def test_param_count_exact(features, depth, cin):
  model = UNet(features=features, depth=depth)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), 16, cin))
  expected = _hand_count(features, depth, cin, 4)
  assert count_params(params) == expected
  if (features, depth, cin) == (16, 4, 30):
    assert expected == 485972


@pytest.mark.parametrize("cin,depth", [(1, 4), (3, 3)])
def test_output_shape(cin, depth):
  model = UNet(features=4, depth=depth, num_classes=4)
  params = numpy_params(model, cin, seed=0, patch=16)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, cin))
  logits = jax.jit(model.apply)(params, x)
  assert logits.shape == (2, 16, 16, 4) and logits.dtype == jnp.float32
  probs = jax.jit(UNetPredictor(model))(params, x)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)


def test_flops_match_peer_count():
  # Peers: 161 M multiply-accumulates per 64x64x30 patch at f = 16 (0.322 GFLOP).
  assert flops_per_patch(16) == 322174976
  # Doubling the width quadruples the convolutions except the 30-channel input and 4-class head.
  first = 2 * 64 * 64 * 9 * 30 * 16
  head = 2 * 64 * 64 * 16 * 4
  assert flops_per_patch(32) == 4 * (flops_per_patch(16) - first - head) + 2 * first + 2 * head


def test_dropout_only_when_training():
  model = UNet(features=4, depth=3, dropout_rate=0.5)
  params = numpy_params(model, 2, seed=0, patch=16)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 2))
  plain = jax.jit(UNet(features=4, depth=3).apply)(params, x)
  np.testing.assert_array_equal(jax.jit(model.apply)(params, x), plain)
  train = jax.jit(lambda p, x, k: model.apply(p, x, train=True, rngs={"dropout": k}))
  a, b = train(params, x, jax.random.key(2)), train(params, x, jax.random.key(3))
  assert not np.allclose(a, b) and not np.allclose(a, plain)


def test_bfloat16_compute_close_to_float32():
  model = UNet(features=4, depth=3)
  params = numpy_params(model, 2, seed=0, patch=16)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 2))
  out = jax.jit(UNet(features=4, depth=3, dtype=jnp.bfloat16).apply)(params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jax.jit(model.apply)(params, x), atol=0.05)


def test_bad_input_shapes():
  model = UNet(features=4, depth=3)
  params = numpy_params(model, 2, seed=0, patch=16)
  with pytest.raises(InputError):
    model.apply(params, jnp.zeros((16, 16, 2)))
  with pytest.raises(InputError):
    model.apply(params, jnp.zeros((1, 18, 16, 2)))


def test_fast_formulation_equals_flax():
  from perfjax.fast_unet import fast_unet_apply
  model = UNet(features=4, depth=4)
  params = numpy_params(model, 30, seed=4, patch=16)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 30))
  fast_logits = jax.jit(lambda p, x: fast_unet_apply(model, p, x))(params, x)
  np.testing.assert_allclose(fast_logits, jax.jit(model.apply)(params, x), atol=1e-5)
  fast = jax.jit(UNetPredictor(model, fast=True))(params, x)
  np.testing.assert_allclose(fast, jax.nn.softmax(fast_logits, -1), atol=1e-6)


def test_first_conv_from_whole_image_maps():
  # A window's first-layer output (zero padding at the WINDOW border) gathered from the 9
  # whole-image maps equals the convolution of the cut-out patch, at edges and corners too.
  from perfjax.fast_unet import first_conv_maps, first_conv_windows
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, 5))
  images = jax.random.normal(jax.random.key(1), (2, 20, 24, 3))
  origins = jnp.asarray([[0, 0, 0], [1, 12, 16], [1, 3, 7], [0, 12, 0], [0, 0, 16]], jnp.int32)
  got = jax.jit(lambda x: first_conv_windows(first_conv_maps(kernel, x), origins, 8))(images)
  patches = jnp.stack([images[o[0], o[1]:o[1] + 8, o[2]:o[2] + 8] for o in np.asarray(origins)])
  ref = jax.jit(lambda p: jax.lax.conv_general_dilated(
      p, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(patches)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  # Whole-image convolution alone is wrong on the window border (the image continues there).
  whole = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert np.abs(np.asarray(whole[1, 12:20, 16:24]) - np.asarray(ref[1])).max() > 1e-2


def test_make_model_reads_the_config_dtype():
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from perfjax.model import make_model
  config = ConfigDict({"model": {"features": 4, "depth": 2, "dropout_rate": 0.0}})
  assert make_model(config).dtype == jnp.float32  # older configs lack the field
  config.model.dtype = "bfloat16"
  assert make_model(config).dtype == jnp.bfloat16
  config.model.dtype = "float16"
  with pytest.raises(InputError, match="model.dtype"):
    make_model(config)


@pytest.mark.parametrize("depth", [2, 4])
def test_bfloat16_fast_formulation_close_to_float32(depth):
  # The fast path in bfloat16 (per-window and whole-image first layer): float32 parameters,
  # bfloat16 convolutions, float32 logits and softmax.
  from perfjax.fast_unet import first_conv_maps, first_conv_windows, fast_unet_apply
  f32, bf16 = UNet(features=4, depth=depth), UNet(features=4, depth=depth, dtype=jnp.bfloat16)
  params = numpy_params(f32, 30, seed=4, patch=16)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 30))
  ref = jax.jit(f32.apply)(params, x)
  fast = jax.jit(lambda p, x: fast_unet_apply(bf16, p, x))(params, x)
  assert fast.dtype == jnp.float32
  np.testing.assert_allclose(fast, ref, atol=0.05)
  probs = jax.jit(UNetPredictor(bf16, fast=True))(params, x)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs, jax.nn.softmax(ref, -1), atol=0.02)
  kernel = params["params"]["down0"]["conv1"]["kernel"].astype(jnp.bfloat16)
  origins = jnp.asarray([[0, 0, 0], [1, 0, 0]], jnp.int32)
  pre = jax.jit(lambda x: first_conv_windows(first_conv_maps(kernel, x), origins, 16))(x)
  assert pre.dtype == jnp.bfloat16
  from_maps = jax.jit(lambda p, pre: fast_unet_apply(bf16, p, None, pre))(params, pre)
  np.testing.assert_allclose(from_maps, ref, atol=0.05)
