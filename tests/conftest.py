"""Test-wide settings (CPU only, no display, a temporary home for matplotlib and IPython), the
`slow` marker and the fixtures several test files share.

`pytest -m "not slow" tests` is the fast subset: it leaves out the tiny training runs, dataset
builds, notebooks and subprocess runs that dominate the suite's time.
"""
import os
import tempfile

import pytest

# Set before jax is imported by any test module (the environment of the test process itself).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
_HOME = tempfile.mkdtemp(prefix="perfjax-test-home-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_HOME, "matplotlib"))
os.environ.setdefault("IPYTHONDIR", os.path.join(_HOME, "ipython"))

SMALL_DATASET = "synthetic_small"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: trains a model, builds a dataset, runs a notebook or a subprocess "
      "(deselect with -m \"not slow\")")


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the `synthetic_small` dataset, built once per session."""
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  path = tmp_path_factory.mktemp("tfds")
  datasets.prepare(SMALL_DATASET, path)
  return path


@pytest.fixture(scope="module")
def small_data_env(small_data_dir):
  """PERFJAX_DATA_DIR pointing at `small_data_dir` for one test module (restored after it)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("PERFJAX_DATA_DIR", str(small_data_dir))
    yield small_data_dir
