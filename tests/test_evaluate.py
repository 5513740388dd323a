"""End-to-end: a tiny trained model evaluated on the synthetic test split and used to predict."""
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from perfjax.configs import patch2
from perfjax.configs import patch3
from perfjax import evaluate
from perfjax import predict
from perfjax.data import phantom
from perfjax.data import writers

RESULT_KEYS = ["dice.whole", "dice.sector6", "dice.sector12", "ood.auc", "ood.threshold",
               "ood.sensitivity", "ood.specificity", "ood.labels", "ood.score", "ood.n_positive",
               "ood.n_negative", "ood.auc_ci", "mbf.r2",
               "mbf.bland_altman.mean", "mbf.bland_altman.loa_low", "mbf.bland_altman.loa_high"]
SLICE_KEYS = ["id", "dice", "U", "ood_flag", "uncertain_sector", "u_sectors_from", "mbf_auto",
              "mbf_gt_mask", "mbf_true", "motion"]


pytestmark = pytest.mark.slow  # A tiny training run, evaluated.


@pytest.fixture(scope="module")
def trained(tiny_run, small_data_env):
  """The session's tiny trained run (conftest `tiny_run`: patch3 tiny, trained and evaluated
  once, shared with the notebook tests); PERFJAX_DATA_DIR set for this module."""
  del small_data_env
  config, workdir, _ = tiny_run
  return config, workdir


def _get(tree, dotted):
  for part in dotted.split("."):
    tree = tree[part]
  return tree


@pytest.fixture(scope="module")
def evaluated(tiny_run):
  return tiny_run[2]  # evaluate.evaluate(config, workdir, n_panels=2) of the trained run


def test_results_json_has_the_contract_keys(trained, evaluated):
  config, workdir = trained
  results = evaluated
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)  # Strict JSON: NaN/Inf are written as null.
  for key in RESULT_KEYS:
    _get(on_disk, key)  # Present (null allowed for an untrained model).
  assert on_disk["ood"]["labels"] == "motion"
  o = on_disk["ood"]
  assert o["score"] == "U" and o["n_positive"] + o["n_negative"] == 6 and len(o["auc_ci"]) == 2
  assert o["auc"] is None or o["auc_ci"][0] <= o["auc"] <= o["auc_ci"][1]
  motion_all = on_disk["ood_all"]["motion"]
  for summary in [motion_all, *motion_all["baselines"].values()]:
    assert {"score", "n_positive", "n_negative", "auc_ci", "auc"} <= set(summary)
  assert set(motion_all["baselines"]) >= {"entropy", "tta"}
  assert len(on_disk["slices"]) == results["n_slices"] == 6
  for s in on_disk["slices"]:
    assert set(SLICE_KEYS) <= set(s)
    assert isinstance(s["motion"], bool)
    assert s["mbf_true"] is not None and 0.3 < s["mbf_true"] < 6.0
    assert s["dice"] is None or 0.0 <= s["dice"] <= 1.0
  # The ground-truth masks always give an MBF; sectors are placed on every slice.
  assert all(s["mbf_gt_mask"] is not None for s in on_disk["slices"])
  # Study-level AHA 16-segment MBF (a bullseye per study): 2 test studies of 3 slices.
  assert [len(st["aha16"]["true"]) for st in on_disk["studies"]] == [16, 16]
  assert all(v is not None and 0.3 < v < 6.0 for st in on_disk["studies"]
             for v in st["aha16"]["true"])
  assert os.path.isfile(os.path.join(workdir, "figures", "bullseyes.png"))  # one grid, 2 studies
  assert os.path.isfile(os.path.join(workdir, "figures", "dice_vs_confidence.png"))
  assert len(os.listdir(os.path.join(workdir, "figures", "slices"))) == 2


def test_report_links_only_figures_that_exist(trained, evaluated):
  _, workdir = trained
  report = open(os.path.join(workdir, "report.md")).read()
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
  assert {"figures/coverage.png", "figures/dice_vs_confidence.png", "training_curves.png"} <= set(
      links)
  assert all(os.path.isfile(os.path.join(workdir, rel)) for rel in links)
  assert report.count("\n| 3-") == 3  # One row per test slice of study 3 in the slice table.
  html = open(os.path.join(workdir, "report.html")).read()
  assert "<table>" in html and 'src="figures/coverage.png"' in html


def test_released_checkpoint_gives_the_same_results_with_any_config(trained, evaluated, tmp_path):
  """config.json + best/ alone (a released run) evaluate to the same numbers, even when the
  caller passes another family member's config: the trained model's fields win."""
  _, workdir = trained
  released = tmp_path / "released"
  shutil.copytree(os.path.join(workdir, "best"), released / "best")
  shutil.copy(os.path.join(workdir, "config.json"), released / "config.json")
  other = patch2.get_config("tiny")  # Another input kind: patch2 would not load these params.
  again = evaluate.evaluate(other, str(released), n_panels=0)
  assert again["config"]["input"] == "patch3"
  for path in ("dice.whole", "dice.sector6", "dice.sector12", "ood.auc", "ood.threshold",
               "mbf.r2", "mbf.bland_altman.mean"):
    np.testing.assert_equal(_get(again, path), _get(evaluated, path))
  assert [s["U"] for s in again["slices"]] == [s["U"] for s in evaluated["slices"]]


def test_relative_flow_is_never_set_against_the_true_mbf(trained, tmp_path):
  """eval.mbf_input="signal" (the paper's raw-signal fit) gives relative flow: no comparison
  with the true MBF in ml/g/min, in results.json, the bullseyes or the figures."""
  config, workdir = trained
  released = tmp_path / "released"
  shutil.copytree(os.path.join(workdir, "best"), released / "best")
  shutil.copy(os.path.join(workdir, "config.json"), released / "config.json")
  signal = config.copy_and_resolve_references()
  signal.eval.mbf_input = "signal"
  results = evaluate.evaluate(signal, str(released), n_panels=0)
  assert results["mbf"]["units"] == predict.RELATIVE_UNITS and "vs_true" not in results["mbf"]
  assert all(set(st["aha16"]) == {"auto", "gt_mask"} for st in results["studies"])
  assert all(s["mbf_true"] is not None for s in results["slices"])  # the truth is still listed
  assert not [f for f in os.listdir(released / "figures") if f.endswith("_vs_true.png")]


def test_predict_on_nifti_folder_reports_bad_file_and_writes_the_rest(trained, tmp_path):
  config, workdir = trained
  sim = phantom.simulate(7, 2, "bssfp")
  folder = tmp_path / "in"
  for i in range(2):
    writers.write_nifti(folder / f"slice{i}.nii.gz", sim["raw"][i], pixel_mm=(1.4, 1.4),
                        times=sim["times"][i])
  writers.write_nifti(folder / "slice0_mask.nii.gz", sim["mask"][0], pixel_mm=(1.4, 1.4))
  (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
  out = tmp_path / "out"
  rows = predict.predict(config, workdir, str(folder), str(out))
  by_id = {r["id"]: r for r in rows}
  assert set(by_id) == {"slice0", "slice1", "broken"}
  assert "broken.nii.gz" in by_id["broken"]["error"]
  assert by_id["slice0"]["dice"] is not None and by_id["slice1"]["dice"] is None
  for name in ("slice0", "slice1"):
    seg = np.asarray(nib.load(out / name / "segmentation.nii.gz").dataobj)
    assert seg.shape == (128, 128) and set(np.unique(seg)) <= {0, 1, 2, 3}
    assert (out / name / "um.nii.gz").is_file() and (out / name / f"{name}.png").is_file()
  with open(out / "slices.json") as f:
    assert len(json.load(f)["slices"]) == 3
  assert (out / "slices.csv").read_text().count("\n") == 4
  assert (out / "slices.csv").read_text().splitlines()[0].split(",")[-2:] == ["mbf", "error"]
  assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]


def test_predict_without_checkpoint_is_a_clear_error(tmp_path):
  from perfjax.errors import InputError
  with pytest.raises(InputError, match="train first"):
    predict.predict(patch3.get_config("tiny"), str(tmp_path / "empty"), "split:test",
                    str(tmp_path / "o"))
