"""Every notebook in notebooks/ runs top to bottom on a fresh kernel (small sizes, CPU)."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  for var, sub in (("HOME", ""), ("IPYTHONDIR", "ipython"), ("JUPYTER_CONFIG_DIR", "jcfg"),
                   ("JUPYTER_DATA_DIR", "jdata"), ("MPLCONFIGDIR", "mpl")):
    monkeypatch.setenv(var, str(home / sub))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("PERFJAX_DATA_DIR", str(tmp_path / "tfds"))
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(tmp_path)}})
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
