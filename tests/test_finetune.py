"""Partial labels (masks without an RV) and fine-tuning from a trained or released model."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perfjax import checkpoints, inputs, train
from perfjax.conventions import BACKGROUND_OR_RV
from perfjax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**train_fields):
  spec = importlib.util.spec_from_file_location("_cfg_patch3_ft", ROOT / "configs" / "patch3.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.augment.mode = "none"
  config.train.update(train_fields)
  return config


def _toy(n, seed, with_rv=True):
  """A myocardial ring (1) around an enhancing LV (2), an RV (3) to its left, or no RV label."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:128, :128]
  t = np.arange(30)
  images = np.zeros((n, 128, 128, 30), np.float32)
  masks = np.zeros((n, 128, 128), np.int32)
  for i in range(n):
    r = np.hypot(rows - 64, cols - 64 - rng.integers(-4, 5))
    m = np.zeros((128, 128), np.int32)
    m[np.hypot(rows - 64, cols - 36) < 12] = 3
    m[(r >= 12) & (r < 19)] = 1
    m[r < 12] = 2
    img = 0.1 + rng.normal(0, 0.02, (128, 128, 30))
    for label, peak in ((3, 8), (2, 12), (1, 16)):
      img[m == label] += 0.6 * np.exp(-0.5 * ((t - peak) / 3.0) ** 2)
    images[i] = (img - img.min()) / (img.max() - img.min())
    masks[i] = m if with_rv else np.where(m == 3, 0, m)
  return dict(image=images, mask=masks, peak_lv_frame=np.full(n, 12, np.int32))


def test_partial_label_loss_is_cross_entropy_or_the_merged_class():
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.array([0, 1, 2, 3, BACKGROUND_OR_RV])
  loss = train.partial_label_cross_entropy(logits, labels)
  full = optax.softmax_cross_entropy_with_integer_labels(logits[:4], labels[:4])
  np.testing.assert_array_equal(loss[:4], full)  # complete labels: exactly the usual loss
  p = jax.nn.softmax(logits[4])
  assert float(loss[4]) == pytest.approx(-np.log(float(p[0] + p[3])), rel=1e-5)
  # no gradient between background and RV for the merged label: their logits shift together
  grad = jax.grad(lambda z: train.partial_label_cross_entropy(z, labels[4:]).sum())(logits[4:])
  p0, p3 = float(p[0]), float(p[3])
  np.testing.assert_allclose(grad[0, [0, 3]], -np.array([p0, p3]) / (p0 + p3) + np.array([p0, p3]),
                             rtol=1e-5)


def test_masks_without_an_rv_become_partial():
  with_rv, without = _toy(1, 0)["mask"], _toy(1, 0, with_rv=False)["mask"]
  np.testing.assert_array_equal(inputs.partial_masks(with_rv), with_rv)
  out = inputs.partial_masks(without)
  assert set(np.unique(out)) == {1, 2, BACKGROUND_OR_RV}
  np.testing.assert_array_equal(out == BACKGROUND_OR_RV, without == 0)
  np.testing.assert_array_equal(inputs.partial_masks(without, "never"), without)
  with pytest.raises(InputError, match="rv_unlabelled"):
    inputs.partial_masks(without, "sometimes")


def test_slices_without_a_mask_are_left_out_of_training():
  """A manual dataset's unlabelled slice (has_mask False, its mask filled with -1) gives no
  windows: its -1 would otherwise be read as the last class (RV) by the loss."""
  split = _toy(2, 0)
  split["mask"][1] = -1
  split["has_mask"] = np.array([True, False])
  x, y = inputs.training_windows(split, "patch3")
  x_one, y_one = inputs.training_windows(_toy(1, 0), "patch3")
  np.testing.assert_array_equal(y, y_one)
  np.testing.assert_array_equal(x, x_one)
  assert y.min() >= 0
  split["has_mask"] = np.array([False, False])
  with pytest.raises(InputError, match="none of its 2 slices has a mask"):
    inputs.training_windows(split, "patch3")


def _params(workdir, config, which):
  return checkpoints.load_params(config, str(workdir), which)[1]["params"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_source_parameters(tmp_path, capsys):
  base = _config(num_steps=2, eval_every=2, checkpoint_every=2)
  train.train(base, tmp_path / "base", data={"train": _toy(2, 0), "validation": _toy(1, 1)})
  # Fine-tune on partial masks (no RV) with a vanishing learning rate: the first state is the
  # source's best parameters, so the result stays there.
  tuned = _config(num_steps=2, eval_every=2, checkpoint_every=2, learning_rate=1e-12,
                  warmup_steps=0, init_from=str(tmp_path / "base"))
  data = {"train": _toy(2, 2, with_rv=False), "validation": _toy(1, 3, with_rv=False)}
  capsys.readouterr()
  summary = train.train(tuned, tmp_path / "tuned", data=data)
  assert "Starting from the parameters of" in capsys.readouterr().out
  assert summary["step"] == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               _params(tmp_path / "base", base, "best"), _params(tmp_path / "tuned", tuned, "latest"))
  # A resumed fine-tuning run continues from its own checkpoint, not the source again, even
  # once the source is gone.
  (tmp_path / "base").rename(tmp_path / "moved")
  capsys.readouterr()
  train.train(tuned, tmp_path / "tuned", data=data)
  assert "Starting from" not in capsys.readouterr().out


def test_fine_tuning_takes_the_source_model_and_refuses_a_missing_source(tmp_path, capsys):
  with pytest.raises(InputError, match="no such workdir"):
    train.init_source(_config(init_from=str(tmp_path / "nowhere")))
  assert train.init_source(_config(init_from="released")).endswith("released/patch3")
  # The tiny config (width 4, depth 2) fine-tunes the released model as that model is built;
  # the training settings and the computation dtype stay the caller's.
  tiny = _config(init_from="released", num_steps=7)
  tiny.model.dtype = "bfloat16"
  tuned = train.with_source_model(tiny)
  released = checkpoints.load_workdir_config(train.init_source(tiny))
  assert (tuned.model.features, tuned.model.depth) == (released.model.features,
                                                        released.model.depth)
  assert tuned.model.dtype == "bfloat16" and tuned.train.num_steps == 7
  assert tuned.data.dataset == tiny.data.dataset and tuned.seed == tiny.seed
  out = capsys.readouterr().out  # one line naming what differs, not the whole model config
  assert "using the trained model's model from config.json: " in out and len(out.splitlines()) == 1
  assert f"model.features {released.model.features} (the config says 4)" in out
  assert "dtype" not in out  # a runtime field, the caller's
  assert train.with_source_model(_config()).model.features == 4  # no init_from: unchanged
  # The safety net behind it: parameters of another architecture are refused.
  wider = _config(init_from="released")
  with pytest.raises(InputError, match="set the same model"):
    train.init_params(wider, train.init_source(wider))
