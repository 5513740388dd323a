"""Every notebook in notebooks/ runs top to bottom on a fresh kernel (small sizes, CPU), started
in notebooks/ as Jupyter starts it, with the installed package and no PYTHONPATH."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


# What a notebook's own settings cell would find on a user's machine, from the session's shared
# runs (conftest), so the suite trains and reproduces once instead of once more per notebook:
# reproduce_paper reads a finished tiny reproduction (`RUN_DIR`, its branch for a user's run;
# the run_all call of its other branch is the `tiny_reproduction` fixture itself), and
# your_data predicts with a trained and evaluated tiny run (`WORKDIR`, likewise; its other
# branch trains and evaluates as quickstart does).
_SHARED_RUNS = {"reproduce_paper": ('RUN_DIR = "../runs/paper"', "tiny_reproduction"),
                "your_data": ('WORKDIR = "../runs/patch3"', "tiny_run")}


def _use_shared_run(nb, name, request):
  line, fixture = _SHARED_RUNS[name]
  value = request.getfixturevalue(fixture)
  workdir = str(value[0] if fixture == "tiny_reproduction" else value[1])
  cells = [c for c in nb.cells if c.cell_type == "code" and line in c.source]
  assert len(cells) == 1, f"{name}: expected one cell with {line!r}"
  cells[0].source = cells[0].source.replace(line, f"{line.split(' = ')[0]} = {workdir!r}")


def _params():
  """One parameter a notebook; those that read a shared run go to that run's xdist group."""
  return [pytest.param(p, id=p.name, marks=[pytest.mark.xdist_group(_SHARED_RUNS[p.stem][1])]
                       if p.stem in _SHARED_RUNS else []) for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path, tmp_path, monkeypatch, request):
  home = tmp_path / "home"
  home.mkdir()
  for var, sub in (("HOME", ""), ("IPYTHONDIR", "ipython"), ("JUPYTER_CONFIG_DIR", "jcfg"),
                   ("JUPYTER_DATA_DIR", "jdata"), ("MPLCONFIGDIR", "mpl")):
    monkeypatch.setenv(var, str(home / sub))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # No path tricks: the kernel imports perfjax as installed (`pip install -e .`), as a user's
  # does, and starts in the notebook's own folder.
  monkeypatch.delenv("PYTHONPATH", raising=False)
  nb = nbformat.read(path, as_version=4)
  if "get_config(" in path.with_suffix(".py").read_text():
    # The tiny dataset, built once per session (conftest), not once more per notebook.
    monkeypatch.setenv("PERFJAX_DATA_DIR", str(request.getfixturevalue("small_data_dir")))
  else:
    monkeypatch.setenv("PERFJAX_DATA_DIR", str(tmp_path / "tfds"))  # none is needed
  if path.stem in _SHARED_RUNS:
    _use_shared_run(nb, path.stem, request)
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean_and_matches_its_source(path):
  """No outputs in git; the .ipynb holds the cells of its jupytext .py source."""
  import jupytext  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not any(c.get("outputs") or c.get("execution_count") for c in code)
  source = jupytext.read(path.with_suffix(".py"))
  assert [c.source for c in nb.cells] == [c.source for c in source.cells]


def test_perfjax_is_installed_for_the_notebooks():
  """The notebooks import the installed package (the README's `pip install ... -e .`)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", "import perfjax.configs.patch3, perfjax.cli"],
                        cwd=ROOT / "notebooks", env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, ("perfjax is not installed in this environment: run "
                                "`pip install -e .` in the repository root\n" + proc.stderr[-2000:])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_needs_no_path_tricks(path):
  """Opened from notebooks/, a notebook imports only the installed package (no sys.path edits,
  no top-level `configs` module) and has an install cell."""
  source = path.with_suffix(".py").read_text()
  assert "sys.path" not in source and "from configs import" not in source
  assert "pip\", \"install\"" in source and "requirements.txt" in source


def _install_cell_value(source: str, name: str, namespace: dict):
  """The value the notebook's install cell gives `name` (its one assignment), evaluated in
  `namespace`."""
  import ast  # pylint: disable=g-import-not-at-top
  assigns = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
  assert len(assigns) == 1, f"the install cell assigns `{name}` once"
  expression = compile(ast.Expression(assigns[0].value), "<install cell>", "eval")
  return eval(expression, namespace)  # pylint: disable=eval-used


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_install_cell_installs_the_accelerators_jax(path):
  """On Colab or a TPU VM the install cell keeps JAX on the accelerator: the pinned jax with the
  CUDA 12 plugin where an NVIDIA driver is, with libtpu on a TPU VM; the CPU build elsewhere.
  Each extra it names is declared in pyproject.toml."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  source = path.with_suffix(".py").read_text()
  declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  cases = [({"nvidia-smi"}, set(), "[cuda12]"), (set(), {"/dev/accel0"}, "[tpu]"),
           (set(), {"/dev/vfio/0", "/dev/vfio/vfio"}, "[tpu]"),
           (set(), {"/dev/vfio/vfio"}, ""), (set(), set(), "")]
  for commands, devices, expected in cases:
    machine = dict(
        shutil=types.SimpleNamespace(which=lambda n, c=commands: f"/usr/bin/{n}" if n in c
                                     else None),
        glob=types.SimpleNamespace(glob=lambda pat, d=devices: fnmatch.filter(sorted(d), pat)))
    extra = _install_cell_value(source, "_extra", machine)
    assert extra == expected, (commands, devices, extra)
    assert not extra or extra.strip("[]") in declared


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_install_cell_finds_the_clone(path, tmp_path, monkeypatch):
  """The clone the install cell installs from: the folder above notebooks/ (Jupyter), or a clone
  inside the working folder (Colab starts in /content); none elsewhere (the cell then stops with
  a message instead of a pip error)."""
  import pathlib as pl  # pylint: disable=g-import-not-at-top
  source = path.with_suffix(".py").read_text()
  clone = tmp_path / "content" / "perfjax"
  (clone / "perfjax").mkdir(parents=True)
  (clone / "notebooks").mkdir()
  (clone / "requirements.txt").write_text("jax\n")
  (tmp_path / "empty").mkdir()
  for cwd, expected in [(clone / "notebooks", clone), (clone, clone),
                        (tmp_path / "content", clone), (tmp_path / "empty", None)]:
    monkeypatch.chdir(cwd)
    assert _install_cell_value(source, "_root", {"pathlib": pl}) == expected, cwd
