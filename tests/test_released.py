"""The released checkpoint (released/patch3: config.json + best/ of `configs/patch3.py:release`)
evaluates with one call and still segments: a golden check of the saved format, the loader and
the model."""
import pathlib
import shutil

import pytest

from perfjax.configs import patch3
from perfjax import checkpoints, evaluate

RELEASED = pathlib.Path(__file__).resolve().parents[1] / "released" / "patch3"


@pytest.mark.slow
def test_released_checkpoint_evaluates_and_segments(tmp_path, monkeypatch, small_data_dir):
  monkeypatch.setenv("PERFJAX_DATA_DIR", str(small_data_dir))
  workdir = tmp_path / "released"
  shutil.copytree(RELEASED, workdir)
  config = patch3.get_config("tiny")  # Data and eval settings only: the small test split, fast.
  results = evaluate.evaluate(config, str(workdir), n_panels=0)
  assert results["config"]["features"] == 32 and results["config"]["input"] == "patch3"
  assert results["n_slices"] == 6
  # 0.871 when released (6 wide-phantom bSSFP slices, half of them with motion); untrained: 0.
  assert results["dice"]["whole"] > 0.75, results["dice"]
  assert (workdir / "results.json").is_file() and (workdir / "report.html").is_file()


def test_trained_config_takes_the_model_from_the_workdir_but_the_dtype_from_the_caller():
  config = patch3.get_config("tiny")
  config.model.dtype = "bfloat16"
  merged = checkpoints.trained_config(config, str(RELEASED))
  assert merged.model.features == 32 and merged.model.depth == 4  # the released model's
  assert merged.model.dtype == "bfloat16"  # how to compute it: the caller's
  assert merged.data.dataset == config.data.dataset  # data and eval: the caller's


def test_released_model_is_the_release_recipe():
  """released/patch3 was trained by `configs/patch3.py:release` (its seed aside)."""
  saved, recipe = checkpoints.load_workdir_config(str(RELEASED)), patch3.get_config("release")
  for field in ("input", "model", "augment", "train"):
    assert checkpoints.plain(saved[field]) == checkpoints.plain(recipe[field]), field
  assert saved.data.dataset == recipe.data.dataset == "synthetic_mixed_large"
