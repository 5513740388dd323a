"""Cross-validation by patient on a manual dataset: folds, sector Dice without a ground-truth
RV, aggregation and verdicts over folds, then a tiny real run that resumes."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from perfjax.configs import paper_experiments
from perfjax import crossval
from perfjax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_folds_keep_every_patient_in_one_fold():
  patients = [f"p{i:02d}" for i in range(40)]
  folds = crossval.patient_folds(patients * 4, 5, seed=0)  # 4 slices per patient
  assert sorted(folds) == patients
  assert sorted(np.bincount(list(folds.values()))) == [8] * 5
  assert folds == crossval.patient_folds(patients[::-1], 5, seed=0)  # order does not matter
  assert folds != crossval.patient_folds(patients, 5, seed=1)
  tests = []
  for k in range(5):
    split = crossval.fold_patients(folds, k, 4, seed=0)
    assert len(split["validation"]) == 4 and len(split["test"]) == 8
    assert sorted(sum(split.values(), [])) == patients  # disjoint, and every patient
    tests += split["test"]
  assert sorted(tests) == patients  # each patient is tested exactly once
  with pytest.raises(InputError, match="at least 2 folds"):
    crossval.patient_folds(patients[:3], 5, seed=0)
  with pytest.raises(InputError, match="must leave patients"):
    crossval.fold_patients(folds, 0, 32, seed=0)


def test_subset_takes_all_slices_of_a_patient():
  data = {"study_name": np.array(["a", "b", "a", "c"]), "image": np.arange(4)}
  out = crossval.subset(data, ["a", "c"])
  assert out["image"].tolist() == [0, 2, 3]


def _ring(rv: bool, shift: int = 0):
  rows, cols = np.mgrid[:128, :128]
  r = np.hypot(rows - 64, cols - 64 - shift)
  m = np.zeros((128, 128), np.int32)
  if rv:
    m[(np.hypot(rows - 64, cols - 36) < 12) & (r >= 19)] = 3
  m[(r >= 12) & (r < 19)] = 1
  m[r < 12] = 2
  return m


def test_sector_dice_from_the_prediction_rvips():
  value, problem = crossval.prediction_sector_dice(_ring(True), _ring(False), 1)
  assert value == pytest.approx(1.0) and problem is None
  value, _ = crossval.prediction_sector_dice(_ring(True, shift=3), _ring(False), 2)
  assert 0.3 < value < 0.95
  value, problem = crossval.prediction_sector_dice(_ring(False), _ring(False), 1)
  assert np.isnan(value) and "no RV" in problem


def test_network_configs():
  config = paper_experiments.get_config("crossval")
  assert config.base.data.dataset == "manual" and config.crossval.folds == 5
  assert "patch3_finetuned" in config.crossval.networks
  p2 = crossval.network_config(config, "patch2_conventional")
  assert (p2.input, p2.augment.mode, p2.train.init_from) == ("patch2", "conventional", None)
  ft = crossval.network_config(config, "patch3_finetuned")
  assert (ft.input, ft.augment.mode, ft.train.init_from) == ("patch3", "advanced", "released")
  assert ft.train.num_steps == 400 and ft.train.learning_rate == 5e-4
  assert ft.train.eval_every == 50
  from perfjax import train  # pylint: disable=g-import-not-at-top
  # train() builds the released model's architecture (train.with_source_model) and loads it.
  params = train.init_params(train.with_source_model(ft), train.init_source(ft))
  assert params
  with pytest.raises(InputError, match="unknown network"):
    crossval.network_config(config, "patch4_advanced")


def _fake_run(network, fold, dice, scores_good=True):
  rows = []
  for i, d in enumerate(dice):
    rows.append(dict(id=f"{fold}p{i}/rest_base", patient=f"{fold}p{i}", dice_myo=d,
                     dice_lv=d + 0.05, sector6=d - 0.1 if i else None,
                     sector12=d - 0.2 if i else None,
                     sector_problem=None if i else "no RV blood pool",
                     u_sectors_from="fallback" if i == 0 else "rv_insertion_points",
                     scores={"U": d if scores_good else -d, "tta": 0.5}))
  return dict(network=network, slices=rows, seconds=10.0)


def test_summary_over_folds_and_verdicts():
  runs = {}
  for k, noise in enumerate((0.01, -0.01, 0.0)):
    fold = f"fold{k}"
    base = np.array([0.5, 0.6, 0.8, 0.9]) + noise
    runs[(fold, "patch2_advanced")] = _fake_run("patch2_advanced", fold, base)
    runs[(fold, "patch3_advanced")] = _fake_run("patch3_advanced", fold, base + 0.05)
    runs[(fold, "patch2_conventional")] = _fake_run("patch2_conventional", fold,
                                                    base + noise * 3)
    runs[(fold, "patch3_finetuned")] = _fake_run("patch3_finetuned", fold, base + 0.1 + noise)
  summary = crossval.summarize(runs, poor_dice=0.7, n_boot=100)
  p3 = summary["networks"]["patch3_advanced"]
  assert p3["dice_myo"]["mean"] == pytest.approx(0.75) and p3["dice_myo"]["n"] == 3
  assert p3["dice_myo"]["sd"] == pytest.approx(0.01)
  assert p3["sector6"]["mean"] == pytest.approx((0.6 + 0.8 + 0.9) / 3 + 0.05 - 0.1)  # measurable
  assert p3["n_sectors"] == 9 and p3["n_slices"] == 12  # the first slice of each fold has none
  assert p3["n_u_fallback"] == 3  # ... so U's sectors fell back to the standard orientation
  assert set(p3) >= {"dice_myo", "dice_lv", "sector6", "sector12", "ood", "paper", "folds"}
  assert p3["paper"]["whole"] == 0.86
  ood = p3["ood"]
  assert ood["U"]["auc"] == pytest.approx(1.0) and ood["U"]["n"] == 12
  assert ood["U"]["n_poor"] == 6 and ood["U"]["ci95"] == pytest.approx([1.0, 1.0])
  assert ood["tta"]["auc"] == pytest.approx(0.5)  # a constant score knows nothing
  # A crossval.json read back: -inf (no sectors for U) was written as null.
  runs[("fold0", "patch3_advanced")]["slices"][0]["scores"]["U"] = None
  again = crossval.summarize(runs, poor_dice=0.7, n_boot=100)["networks"]["patch3_advanced"]
  assert again["ood"]["U"]["auc"] == pytest.approx(1.0)  # that slice (Dice 0.5) is poor anyway
  verdicts = {c["claim"]: c for c in summary["claims"]}
  c = verdicts["patch3 > patch2 (advanced augmentation), dice_myo"]
  assert c["verdict"] == "agrees" and c["mean"] == pytest.approx(0.05) and c["n"] == 3
  assert verdicts["advanced > conventional (patch2), dice_myo"]["verdict"] == (
      "not a finding (within the fold spread)")
  assert verdicts["advanced > conventional (patch3), dice_myo"]["verdict"] == (
      "not a finding (fewer than 2 folds)")  # patch3 conventional was not run
  c = verdicts["fine-tuned released > patch3 advanced from scratch, dice_myo"]
  assert c["verdict"] == "agrees" and c["mean"] == pytest.approx(0.05)
  text = crossval.report_markdown(summary)
  assert "| patch3_advanced | 0.750 ± 0.010 | 0.800 ± 0.010 |" in text
  assert "| 9 of 12 | 0.86 / 0.83 / 0.71 |" in text
  assert "| patch3_advanced | 1 - U (paper) | 12 | 6 | 1.000 [1.000, 1.000] |" in text
  assert "standard display orientation (septum at 180 deg" in text
  assert "patch3_advanced 3 of 12" in text


def test_bootstrap_interval_contains_the_auc():
  rng = np.random.default_rng(0)
  dice = rng.uniform(0.4, 1.0, 60)
  score = dice + rng.normal(0, 0.15, 60)
  patients = np.repeat(np.arange(20), 3)
  lo, hi = crossval.bootstrap_auc(score, dice < 0.7, patients, 300, seed=0)
  from perfjax import uncertainty  # pylint: disable=g-import-not-at-top
  auc = uncertainty.auc(score, dice < 0.7)
  assert lo < auc < hi and hi - lo > 0.05


def test_cross_validate_mode_needs_the_crossval_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "launch.py"), "--config=configs/paper_experiments.py:tiny",
       f"--workdir={tmp_path}", "--mode=cross_validate"], capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120, cwd=ROOT)
  assert proc.returncode != 0 and "--mode=cross_validate its :crossval" in proc.stderr
  assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ a tiny real run


def _manual_dir(root: pathlib.Path, n_patients: int = 4) -> None:
  """Patients of two slices each (stress and rest), masks without an RV, as real data."""
  from perfjax.data import phantom, writers  # pylint: disable=g-import-not-at-top
  d = phantom.simulate(11, 2 * n_patients, "flash", 0.0, noise=0.5, variability="narrow")
  for p in range(n_patients):
    for j, state in enumerate(("stress", "rest")):
      i = 2 * p + j
      path = root / f"patient{p}" / f"{state}_base.nii.gz"
      path.parent.mkdir(parents=True, exist_ok=True)
      writers.write_nifti(path, d["raw"][i], pixel_mm=(1.4, 1.4), times=d["times"][i])
      writers.write_nifti(path.with_name(f"{state}_base_mask.nii.gz"),
                          np.where(d["mask"][i] == 3, 0, d["mask"][i]), pixel_mm=(1.4, 1.4))


@pytest.mark.slow
def test_tiny_cross_validation_runs_resumes_and_reports(tmp_path, capsys):
  _manual_dir(tmp_path / "manual")
  config = paper_experiments.get_config("crossval_tiny")
  config.crossval.networks = ("patch2_advanced", "patch3_advanced")  # two of four: test time
  config.base.data.manual_dir = str(tmp_path / "manual")
  config.base.data.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "cv"
  summary = crossval.run_all(config, str(workdir))
  folds = json.loads((workdir / "folds.json").read_text())
  assert sorted(folds) == ["fold0", "fold1"]
  tested = [p for f in folds.values() for p in f["test"]]
  assert sorted(tested) == [f"patient{p}" for p in range(4)]  # each patient in one fold
  for name, split in folds.items():
    assert not set(split["test"]) & set(split["train"] + split["validation"])
    run = json.loads((workdir / name / "patch3_advanced" / "crossval.json").read_text())
    assert sorted({s["patient"] for s in run["slices"]}) == split["test"]
    assert len(run["slices"]) == 2 * len(split["test"])  # stress and rest together
    assert set(run["slices"][0]["scores"]) == {"U", "entropy", "frame_motion", "tta"}
    # Masks without RV: U's sectors come from the fallback orientation where none is predicted.
    assert {s["u_sectors_from"] for s in run["slices"]} <= {
        "rv_insertion_points", "fallback", None}
  assert set(summary["networks"]) == set(config.crossval.networks)
  for n in summary["networks"].values():
    assert n["dice_myo"]["n"] == 2 and n["n_slices"] == 8
    assert set(n["ood"]) == {"U", "entropy", "frame_motion", "tta"} and n["ood"]["U"]["n"] == 8
  assert len(summary["claims"]) == 20  # every claim listed, unrun pairs "not a finding"
  assert summary["setup"]["patients"] == 4 and summary["setup"]["slices"] == 8
  text = (workdir / "crossval.md").read_text()
  assert text.count("| patch") >= 4 and "verdict" in text
  assert (workdir / "crossval.html").is_file()
  stamp = os.stat(workdir / "fold1" / "patch2_advanced" / "crossval.json").st_mtime_ns
  capsys.readouterr()
  again = crossval.run_all(config, str(workdir))  # everything is done: nothing runs again
  assert "== " not in capsys.readouterr().out
  assert os.stat(workdir / "fold1" / "patch2_advanced" / "crossval.json").st_mtime_ns == stamp
  assert (again["networks"]["patch3_advanced"]["dice_myo"]["mean"]
          == pytest.approx(summary["networks"]["patch3_advanced"]["dice_myo"]["mean"]))
  # An interrupted run (trained and evaluated, not scored) is finished without training or
  # evaluating again.
  run_dir = workdir / "fold1" / "patch2_advanced"
  (run_dir / "crossval.json").unlink()
  evaluated = os.stat(run_dir / "results.json").st_mtime_ns
  capsys.readouterr()
  crossval.run_all(config, str(workdir))
  out = capsys.readouterr().out
  assert out.count("== ") == 1 and "== fold1 patch2_advanced" in out
  assert "Training already finished" in out
  assert os.stat(run_dir / "results.json").st_mtime_ns == evaluated
  assert (run_dir / "crossval.json").is_file()
  wider = config.copy_and_resolve_references()
  wider.base.model.features *= 2  # finished runs made otherwise are refused, not reported
  with pytest.raises(InputError, match=r"holds a run started with other settings.*model.features"):
    crossval.run_all(wider, str(workdir))
  config.crossval.seed = 1  # other folds: refused in this workdir
  with pytest.raises(InputError, match="holds other folds"):
    crossval.run_all(config, str(workdir))
