"""perfjax as an installed package: `pip install` into a fresh venv, the `perfjax` command and
`python -m perfjax` from another directory, the packaged configs, the tiny main job.

The fresh venv reuses this environment's installed dependencies (a .pth file naming its
site-packages) and builds perfjax offline (`--no-deps --no-build-isolation`), so the test needs
no network; the package itself is built from a copy of the source, as `pip install .` does.
"""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _can_build() -> bool:
  return (importlib.util.find_spec("setuptools") is not None
          and (importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
               or importlib.util.find_spec("wheel") is not None)
          and importlib.util.find_spec("pip") is not None)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv bin folder, a scratch folder outside the repository) with perfjax pip-installed."""
  if not _can_build():
    pytest.skip("setuptools with bdist_wheel and pip are needed to build perfjax offline")
  tmp = tmp_path_factory.mktemp("pkg")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "perfjax", src / "perfjax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                 timeout=120)
  bin_dir = venv / "bin"
  site = subprocess.run([str(bin_dir / "python"), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  # This environment's packages (jax, flax, pip, setuptools, ...) without its own perfjax: a
  # path in a .pth file is added as is, its .pth files (the editable perfjax) are not read.
  parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
  pathlib.Path(site, "_parent_env.pth").write_text("\n".join(parents) + "\n")
  env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
  env.pop("PYTHONPATH", None)
  proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps",
                         "--no-build-isolation", str(src)], cwd=tmp, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  work = tmp / "elsewhere"
  work.mkdir()
  return bin_dir, work


def _env(tmp):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
             PERFJAX_DATA_DIR=str(tmp / "tfds"))
  env.pop("PYTHONPATH", None)
  return env


@pytest.mark.slow
def test_installed_package_imports_from_its_own_site_packages(installed):
  bin_dir, work = installed
  proc = subprocess.run(
      [str(bin_dir / "python"), "-c",
       "import perfjax, perfjax.configs.patch3 as p; print(perfjax.__file__); "
       "print(p.get_config('tiny').model.features)"],
      cwd=work, env=_env(work), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, features = proc.stdout.split()
  assert str(bin_dir.parent) in where and features == "4"


@pytest.mark.slow
def test_perfjax_help_and_python_m(installed):
  bin_dir, work = installed
  for cmd in ([str(bin_dir / "perfjax"), "--help"],
              [str(bin_dir / "python"), "-m", "perfjax", "--help"]):
    proc = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perfjax run --config=" in proc.stdout and "--workdir" in proc.stdout


@pytest.mark.slow
def test_one_line_errors_from_another_directory(installed):
  bin_dir, work = installed
  (work / "a_file").write_text("")
  for args, needle in (
      (["run", "--config=configs/nope.py", "--workdir=w"], "config file 'configs/nope.py' not"),
      (["run", "--config=configs/patch3.py:huge", "--workdir=w"], "variant 'huge'"),
      (["run", "--config=patch3:tiny", f"--workdir={work / 'a_file'}"], "is a file")):
    proc = subprocess.run([str(bin_dir / "perfjax"), *args], cwd=work, env=_env(work),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


@pytest.mark.slow
def test_tiny_main_job_from_another_directory(installed):
  """`perfjax run` with the packaged config, in a directory without configs/; a rerun skips
  the evaluation (results current)."""
  bin_dir, work = installed
  assert not (work / "configs").exists()
  args = [str(bin_dir / "perfjax"), "run", "--config=configs/patch3.py:tiny", "--workdir=runs/tiny"]
  proc = subprocess.run(args, cwd=work, env=_env(work), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  workdir = work / "runs" / "tiny"
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["input"] == "patch3" and results["n_slices"] == 6
  assert (workdir / "report.html").is_file()
  assert f"report:    {workdir / 'report.html'}" in proc.stdout
  assert "Traceback" not in proc.stderr and "libtpu" not in proc.stderr
  assert "Downloading and preparing" not in proc.stdout
  again = subprocess.run(args, cwd=work, env=_env(work), capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Evaluation skipped" in again.stdout


def test_accelerator_extras_follow_the_pinned_jax():
  """`pip install -r requirements.txt -e ".[cuda12]"` (or `[tpu]`) must give the accelerator
  plugin of the very jax CI tests: the extras name jax with the dependencies' own range."""
  import re  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  jax_range = next(d for d in project["dependencies"] if re.match(r"jax[<>=!~ ]", d))
  for extra in ("cuda12", "tpu"):
    assert project["optional-dependencies"][extra] == [
        jax_range.replace("jax", f"jax[{extra}]", 1)]
  # jax, jaxlib and the plugin the extra brings must be one version: requirements.txt pins
  # jax and jaxlib alike.
  pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#"))
  assert pins["jax"] == pins["jaxlib"]
