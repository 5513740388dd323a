"""launch.py: XLA flags set before jax, the tiny config end to end, resume, usage errors."""
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)  # absl flags can be defined once per process.
def _launch_module():
  spec = importlib.util.spec_from_file_location("_perfjax_launch", ROOT / "launch.py")
  module = importlib.util.module_from_spec(spec)
  saved = os.environ.get("XLA_FLAGS")
  try:
    spec.loader.exec_module(module)  # sets XLA_FLAGS at import, as it must before jax
  finally:
    if saved is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = saved
  return module


def test_xla_flags_appended_once_and_user_choice_kept():
  launch = _launch_module()
  xla_flags, n = launch.xla_flags, launch.cpu_device_count()
  ynn = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
  devices = f"--xla_force_host_platform_device_count={n}"
  assert xla_flags("") == f"{ynn} {devices}"
  assert xla_flags("--xla_force_host_platform_device_count=3") == (
      "--xla_force_host_platform_device_count=3 " + ynn)
  assert xla_flags(f"{ynn} {devices}") == f"{ynn} {devices}"
  assert xla_flags("--xla_cpu_experimental_ynn_fusion_type=reduce") == (
      f"--xla_cpu_experimental_ynn_fusion_type=reduce {devices}")


@pytest.mark.parametrize("cores, devices", [(1, 1), (2, 2), (3, 2), (4, 4), (16, 4)])
def test_cpu_device_count(cores, devices):
  assert _launch_module().cpu_device_count(cores) == devices


def _run(args, env, timeout=600):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_tiny_config_trains_end_to_end_and_resumes(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PERFJAX_DATA_DIR=str(tmp_path / "tfds"),
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

  # Evaluation under launch.py's XLA flags too (they once broke the Fermi solve).
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
