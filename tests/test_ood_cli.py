"""`perfjax ood-failures` (`--mode=ood_failures`): the failure benchmark of a trained workdir
through the command's code path, on the session's tiny run (two failure types, 2 clean
slices), writing ood_failures.json and the per-type AUC [CI] table."""
import json
import os
import shutil

import pytest


@pytest.mark.slow  # The session's tiny trained run; 6 slices through every score.
def test_ood_failures_command_writes_the_json_and_the_table(tiny_run, tmp_path, monkeypatch,
                                                            capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from perfjax import cli  # pylint: disable=g-import-not-at-top
  _, trained, _ = tiny_run
  workdir = tmp_path / "run"  # A copy: the shared run is read only.
  shutil.copytree(os.path.join(trained, "best"), workdir / "best")
  shutil.copy(os.path.join(trained, "config.json"), workdir / "config.json")
  monkeypatch.setattr(cli, "_quiet_tfds", lambda: None)
  argv, _ = cli.rewrite_argv(["perfjax", "ood-failures", "--config=patch3:tiny",
                              f"--workdir={workdir}", "--failure_slices=2",
                              "--failure_types=motion_8px,ghosting"])
  assert argv[1] == "--mode=ood_failures"
  try:
    flags.FLAGS(argv)
    cli.main_after_flags(["perfjax"])
  finally:
    flags.FLAGS.unparse_flags()
  out = json.loads((workdir / "ood_failures.json").read_text())
  assert out["ood_score"] == "U" and out["n_clean"] == 2 and out["n_slices"] == 2
  assert set(out["by_type"]) == {"motion_8px", "ghosting"}
  assert out["scores"] == ["U", "entropy", "frame_motion", "tta"]
  for summary in out["by_type"]["ghosting"].values():
    assert (summary["n_positive"], summary["n_negative"]) == (2, 2)
    assert len(summary["auc_ci"]) == 2
  table = (workdir / "ood_failures.md").read_text()
  assert "| failures | n+/n- | U (recommended) | entropy | frame_motion | tta |" in table
  assert "| motion_8px | 2+/2- |" in table and "| all failures | 4+/2- |" in table
  assert (workdir / "ood_failures.html").is_file()
  for name in out["figures"]:
    assert (workdir / "ood_failures_figures" / name).is_file()
    assert f"(ood_failures_figures/{name})" in table
  assert not list(workdir.glob(".ood_failures_figures.*"))  # nothing half-written left behind
  printed = capsys.readouterr().out
  assert str(workdir / "ood_failures_figures") in printed
  assert "| ghosting | 2+/2- |" in printed and str(workdir / "ood_failures.md") in printed
