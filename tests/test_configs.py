"""Configs: every variant of both files loads with the fields others read; bad keys fail."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = ["seed", "input", "data.dataset", "data.data_dir", "model.features", "model.depth",
          "model.dropout_rate", "augment.mode", "train.batch_size", "train.learning_rate",
          "train.num_steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
          "train.max_to_keep", "train.patience", "eval.stride_seg", "eval.stride_um",
          "eval.chunk_size", "eval.um_dilation", "eval.ood_labels", "eval.patch2_workdir",
          "eval.sectors_from", "model.patch", "train.stride", "eval.ood_tolerance",
          "eval.gaussian_weighting", "eval.mirror_tta", "eval.mirror_tta_um",
          "augment.p_affine", "augment.perlin_cells",
          "eval.vote_map"]


def load(name):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get(config, path):
  for part in path.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("name", ["patch3", "patch2"])
@pytest.mark.parametrize("variant", [None, "", "paper", "tiny", "release", "release_cpu"])
def test_every_variant_has_every_field(name, variant):
  config = load(name).get_config() if variant is None else load(name).get_config(variant)
  for path in FIELDS:
    get(config, path)  # KeyError if missing
  assert config.input == name
  # The knobs the config owns reach their consumers: every AugmentConfig field, whose defaults
  # are the paper's.
  from perfjax import augment, train  # pylint: disable=g-import-not-at-top
  assert train.augment_config(config) == augment.AugmentConfig()


def test_patch2_differs_from_patch3_only_in_input():
  for variant in ("", "paper", "tiny", "release", "release_cpu"):
    p3, p2 = load("patch3").get_config(variant), load("patch2").get_config(variant)
    p2.input = "patch3"
    assert p2.to_dict() == p3.to_dict()


def test_unknown_variant_fails():
  with pytest.raises(ValueError, match="variant"):
    load("patch3").get_config("huge")


@pytest.mark.parametrize("override", ["--config.model.width=32", "--config.trian.num_steps=3"])
def test_launch_fails_clearly_on_an_unknown_key(override, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "launch.py"), "--config=configs/patch3.py:tiny", override,
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  key = override.split("--config.")[1].split("=")[0]
  assert f"unknown config field(s) {key} in configs/patch3.py:tiny" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not any(tmp_path.iterdir())  # nothing ran
