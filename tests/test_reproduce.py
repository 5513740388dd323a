"""The four-network reproduction: verdicts on hand-made differences, then a tiny real run."""
import json
import os
import shutil

import pytest

from perfjax.configs import paper_experiments
from perfjax import reproduce
from perfjax.errors import InputError


@pytest.mark.parametrize("diffs, sign, expected", [
    ([0.05, 0.06, 0.04], 1, "agrees"),
    ([-0.05, -0.06, -0.04], 1, "contradicted"),
    ([-0.05, -0.06, -0.04], -1, "agrees"),
    ([0.01, -0.02, 0.015], 1, "not a finding (within the seed spread)"),
    ([0.05], 1, "not a finding (fewer than 2 seeds)"),
    ([0.05, float("nan")], 1, "not a finding (fewer than 2 seeds)"),
])
def test_verdict(diffs, sign, expected):
  assert reproduce.verdict(diffs, sign)["verdict"] == expected


def _fake_results(whole, s12, loa_width):
  return {"n_slices": 36, "config": {"dataset": "synthetic_cpu"},
          "dice": {"whole": whole, "by_geometry": {"pred": {"sector6": whole, "sector12": s12},
                                                   "gt": {"sector6": whole, "sector12": s12}}},
          "mbf": {"r2": 0.9, "bland_altman": {"mean": 0.0, "loa_low": -loa_width / 2,
                                              "loa_high": loa_width / 2}},
          "ood_all": {}, "slices": []}


def test_claims_and_spread_on_known_runs():
  # patch3 beats patch2 by 0.05 (whole) and 0.10 (12 sectors) in every seed; augmentation
  # changes nothing beyond noise; patch3's MBF limits are tighter.
  noise = {0: 0.002, 1: -0.001, 2: 0.0}
  runs = {}
  for seed, e in noise.items():
    for aug in reproduce.AUGMENTATIONS:
      runs[("patch2", aug, seed)] = _fake_results(0.80 + e, 0.60 + e, 0.6)
      runs[("patch3", aug, seed)] = _fake_results(0.85 + e, 0.70 - e * (aug == "advanced"), 0.3)
  summary = reproduce.summarize(runs)
  verdicts = {c["claim"]: c for c in summary["claims"]}
  c = verdicts["patch3 > patch2 (advanced augmentation), Dice whole"]
  assert c["verdict"] == "agrees" and c["mean"] == pytest.approx(0.05) and c["n"] == 3
  assert verdicts["advanced > conventional (patch2), Dice whole"]["verdict"].startswith(
      "not a finding")
  widen = verdicts["the gap of patch3 advanced over patch2 advanced widens from whole slice to "
                   "12 sectors"]
  assert widen["verdict"] == "agrees" and widen["mean"] == pytest.approx(0.05, abs=1e-3)
  assert verdicts["patch3 has tighter MBF limits of agreement vs ground-truth masks than patch2 "
                  "(advanced)"]["verdict"] == "agrees"
  whole = summary["networks"]["patch3_advanced"]["dice.whole"]
  assert whole["mean"] == pytest.approx(0.85 + 0.001 / 3)
  assert whole["sd"] == pytest.approx(0.0015275, rel=1e-3) and whole["n"] == 3
  text = reproduce.report_markdown(summary)
  assert "| patch3-UNet | advanced | 0.850 ± 0.002 |" in text
  assert "0.86 / 0.83 / 0.71" in text  # The paper's row beside ours.


@pytest.mark.slow
def test_tiny_reproduction_runs_resumes_and_reports(tmp_path, monkeypatch, capsys, small_data_dir,
                                                     tiny_reproduction):
  monkeypatch.setenv("PERFJAX_DATA_DIR", str(small_data_dir))
  config = paper_experiments.get_config("tiny")
  shared, summary = tiny_reproduction  # reproduce.run_all of this config, made once (conftest)
  workdir = tmp_path / "paper"
  shutil.copytree(shared, workdir)  # the shared run stays read-only
  assert summary["seeds"] == [0, 1] and len(summary["networks"]) == 4
  for name in ("reproduce.md", "reproduce.html", "reproduce.json", "figures/table1.png",
               "figures/mbf_bland_altman.png", "figures/dice_vs_confidence.png"):
    assert (workdir / name).is_file(), name
  run = json.loads((workdir / "patch3_advanced_seed1" / "results.json").read_text())
  assert run["config"]["input"] == "patch3" and run["config"]["augment"] == "advanced"
  assert set(run["ood_all"]) == {"motion", "mbf_patch2"}  # patch2 advanced seed 1's labels.
  assert run["ood"]["labels"] == "mbf_patch2"
  p2 = json.loads((workdir / "patch2_conventional_seed0" / "config.json").read_text())
  assert p2["input"] == "patch2" and p2["seed"] == 0
  text = (workdir / "reproduce.md").read_text()
  assert text.count("-UNet | conventional |") >= 2 and "verdict" in text
  stamp = os.stat(workdir / "patch3_advanced_seed0" / "results.json").st_mtime_ns
  capsys.readouterr()
  reproduce.run_all(config, str(workdir))  # Everything is done: nothing is trained again.
  assert "== " not in capsys.readouterr().out
  assert os.stat(workdir / "patch3_advanced_seed0" / "results.json").st_mtime_ns == stamp
  config.base.train.num_steps += 1  # finished runs made otherwise are refused, not reported
  with pytest.raises(InputError, match=r"holds a run started with other settings.*"
                                       r"train.num_steps"):
    reproduce.run_all(config, str(workdir))
