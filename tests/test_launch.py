"""launch.py and perfjax.platform: no state at import, host devices, the tiny config end to
end, resume, usage errors."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


_NO_IMPORT_STATE = r"""
import os, sys
sys.path.insert(0, os.getcwd())
before = os.environ.get("XLA_FLAGS")
import launch  # noqa: F401
import jax
assert os.environ.get("XLA_FLAGS") == before, os.environ.get("XLA_FLAGS")
assert jax.config.values["jax_num_cpu_devices"] == -1
print("ok")
"""


def test_importing_launch_sets_no_global_state():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _NO_IMPORT_STATE], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_HOST_DEVICES = r"""
import sys
from perfjax import platform
n = platform.configure_host_devices(int(sys.argv[1]))
import jax
print(n, jax.device_count())
print(platform.configure_host_devices(2) is None)  # too late now: a warning, nothing changed
"""


@pytest.mark.parametrize("xla_flags, expected", [("", "3 3"),
                                                 ("--xla_force_host_platform_device_count=2",
                                                  "None 2")])
def test_configure_host_devices_sets_the_count_unless_the_user_did(xla_flags, expected):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _HOST_DEVICES, "3"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:2] == [expected, "True"]


@pytest.mark.parametrize("cores, devices", [(1, 1), (2, 2), (3, 2), (4, 4), (16, 4)])
def test_cpu_device_count(cores, devices):
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  assert platform.cpu_device_count(cores) == devices


def test_cpu_fusion_options():
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  assert platform.cpu_fusion_options("dot", "reduce") == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  assert platform.compiler_options_for("gpu", platform.UNET_CPU_OPTIONS) is None
  with pytest.raises(ValueError):
    platform.cpu_fusion_options("conv")


def test_compilation_cache_folder_unless_the_user_chose(tmp_path, monkeypatch):
  """The persistent compilation cache goes to $XDG_CACHE_HOME/perfjax/xla; a user's own
  JAX_COMPILATION_CACHE_DIR, PERFJAX_COMPILATION_CACHE=0 or a folder that cannot be made leave
  JAX as it was."""
  import jax  # pylint: disable=g-import-not-at-top
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: jax.config.values[k] for k in keys}
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
  assert platform.configure_compilation_cache() is None
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("PERFJAX_COMPILATION_CACHE", "0")
  assert platform.configure_compilation_cache() is None
  monkeypatch.delenv("PERFJAX_COMPILATION_CACHE")
  (tmp_path / "a_file").write_text("")
  assert platform.configure_compilation_cache(str(tmp_path / "a_file" / "xla")) is None
  assert {k: jax.config.values[k] for k in keys} == before
  try:
    folder = str(tmp_path / "perfjax" / "xla")
    assert platform.default_compilation_cache_dir() == folder
    assert platform.configure_compilation_cache() == folder and os.path.isdir(folder)
    assert jax.config.values["jax_compilation_cache_dir"] == folder
  finally:
    for k, v in before.items():
      jax.config.update(k, v)


def _run(args, env, timeout=600):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_config_trains_end_to_end_and_resumes(tmp_path, small_data_dir):
  # The session's synthetic_small build (conftest); test_packaging's main job builds its own.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PERFJAX_DATA_DIR=str(small_data_dir),
             MPLBACKEND="Agg")
  workdir = tmp_path / "run"
  args = ["--config=configs/patch2.py:tiny", "--config.augment.mode=none",
          f"--workdir={workdir}", "--mode=train"]
  proc = _run(args, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "train_summary.json").read_text())
  assert summary["step"] == 4 and summary["num_train_windows"] == 2 * 3 * 9
  assert 0.0 <= summary["best_val_dice"] <= 1.0
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["input"] == "patch2" and saved["augment"]["mode"] == "none"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert len(list((workdir / "best").iterdir())) == 1
  assert (workdir / "training_curves.png").stat().st_size > 0

  again = _run(args, env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from step 4" in again.stdout
  assert "Training already finished at step 4" in again.stdout

  # Evaluation through launch.py (host devices and compiler options as in the main job).
  evaluated = _run(args[:-1] + ["--mode=evaluate"], env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["input"] == "patch2" and len(results["slices"]) == 6


def test_predict_without_a_trained_model_is_one_clear_error(tmp_path):
  proc = _run(["--config=configs/patch3.py:tiny", f"--workdir={tmp_path}", "--mode=predict",
               f"--input={tmp_path}"], dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}")
  assert "train first" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_workdir_is_a_usage_error():
  proc = _run(["--config=configs/patch3.py:tiny"], dict(os.environ, JAX_PLATFORMS="cpu"),
              timeout=120)
  assert proc.returncode != 0 and "workdir" in proc.stderr


@pytest.mark.parametrize("config, mode", [("configs/patch3.py:tiny", "reproduce"),
                                          ("configs/paper_experiments.py:tiny", "train")])
def test_reproduce_mode_and_experiment_config_go_together(tmp_path, config, mode):
  proc = _run([f"--config={config}", f"--workdir={tmp_path}", f"--mode={mode}"],
              dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode != 0
  assert "--mode=reproduce takes an experiment config" in proc.stderr
  assert not list(tmp_path.iterdir())  # Nothing written.


# ------------------------------------------------------------------ the perfjax command (cli.py)


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/nope.py:tiny"], "config file 'configs/nope.py' not found"),
    (["--config=configs/patch3.py:huge"], "config variant 'huge': unknown"),
    (["--config=configs/patch3.py:tiny", "--workdir=FILE"], "is a file"),
    (["--config=configs/patch3.py:tiny", "--workdir=FILE/sub"], "which is a file"),
    (["bogus", "--config=configs/patch3.py:tiny"], "unknown command 'bogus'"),
    (["--config=configs/patch3.py:tiny", "--config", "configs/patch2.py"],
     "--config is given twice (configs/patch3.py:tiny and configs/patch2.py); give one"),
    (["train", "--config=configs/patch3.py:tiny", "--distributed"], "--distributed: "),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, needle):
  (tmp_path / "file").write_text("")
  args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'w'}")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
  proc = _run(args, dict(env, JAX_PLATFORMS="cpu"), timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
  assert not (tmp_path / "w").exists()


def test_help_needs_no_config():
  proc = subprocess.run([sys.executable, "-m", "perfjax", "--help"], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "perfjax run --config=" in proc.stdout and "--workdir" in proc.stdout


def test_config_paths_resolve_to_the_package_from_anywhere(tmp_path, monkeypatch):
  from perfjax import cli, configs  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  for spec in ("configs/patch3.py", "patch3.py", "patch3"):
    assert cli.resolve_config_path(spec) == configs.path("patch3")
  argv, user = cli.rewrite_argv(["perfjax", "train", "--config", "configs/patch2.py:tiny"])
  assert argv == ["perfjax", "--mode=train", "--config", configs.path("patch2") + ":tiny"]
  assert user == "configs/patch2.py:tiny"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "patch3.py").write_text("")  # A local file of that name wins.
  assert cli.resolve_config_path("configs/patch3.py") == "configs/patch3.py"
  with pytest.raises(cli.UsageProblem, match="disagree"):
    cli.rewrite_argv(["perfjax", "train", "--mode=evaluate", "--config=patch3"])


def test_packaged_and_compatibility_configs_agree():
  from configs import patch2 as old2, paper_experiments as old_exp  # pylint: disable=g-import-not-at-top
  from perfjax.configs import patch2, paper_experiments  # pylint: disable=g-import-not-at-top
  assert old2.get_config("tiny").to_dict() == patch2.get_config("tiny").to_dict()
  assert (old_exp.get_config("tiny").base.to_dict()
          == paper_experiments.get_config("tiny").base.to_dict())


def test_ctrl_c_prints_a_resume_hint_not_a_traceback(tmp_path, monkeypatch, capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from perfjax import cli, platform, train  # pylint: disable=g-import-not-at-top

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(train, "train", interrupted)
  monkeypatch.setattr(cli, "_quiet_tfds", lambda: None)
  # In-process: leave this pytest worker's JAX devices as they are (tests that run after this
  # one in the same worker count on one host device).
  monkeypatch.setattr(platform, "configure_host_devices", lambda *a, **k: None)
  monkeypatch.setattr(sys, "argv", ["perfjax", "train", "--config=patch3:tiny"])
  argv, _ = cli.rewrite_argv(["perfjax", "--mode=train", "--config=patch3:tiny",
                              f"--workdir={tmp_path}"])
  try:
    flags.FLAGS(argv)
    with pytest.raises(SystemExit) as exit_info:
      cli.main_after_flags(["perfjax"])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_info.value.code == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["interrupted during train; the same command resumes from the last complete "
                 "checkpoint: perfjax train --config=patch3:tiny"]


def test_results_are_current_only_for_the_same_config_and_checkpoint(tmp_path):
  from perfjax import cli, provenance  # pylint: disable=g-import-not-at-top
  from perfjax.data import writers  # pylint: disable=g-import-not-at-top
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  config = patch3.get_config("tiny")
  (tmp_path / "best" / "2").mkdir(parents=True)
  (tmp_path / "best" / "2" / "params").write_text("x")
  assert cli.results_are_current(config, str(tmp_path)) is None  # No results.json.
  writers.write_json(str(tmp_path / "results.json"),
                     {"provenance": provenance.provenance(config)})
  assert cli.results_are_current(config, str(tmp_path))
  other = patch3.get_config("tiny")
  other.eval.stride_um = 8
  assert cli.results_are_current(other, str(tmp_path)) is None
  later = os.path.getmtime(tmp_path / "results.json") + 10
  os.utime(tmp_path / "best" / "2" / "params", (later, later))  # A newer best checkpoint.
  assert cli.results_are_current(config, str(tmp_path)) is None
