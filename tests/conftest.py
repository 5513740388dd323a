"""Test-wide settings (CPU only, no display, a temporary home for matplotlib and IPython), the
`slow` marker and the fixtures several test files share.

The expensive things are made once per session and shared: the `synthetic_small` dataset
(`small_data_dir`), a tiny trained and evaluated patch3 run (`tiny_run`) and a tiny four-network
reproduction (`tiny_reproduction`). Tests only read them; a test that changes a run works on a
copy.

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
# One persistent XLA compilation cache for the session: pytest-xdist's workers and every
# subprocess (the CLI, notebook kernels, the two-process runs) inherit this environment from
# the first process, so the same tiny programs are compiled once, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_HOME, "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

SMALL_DATASET = "synthetic_small"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: trains a model, builds a dataset, runs a notebook or a subprocess "
      "(deselect with -m \"not slow\")")


# The expensive session runs below, and the tests that use them. With pytest-xdist
# (`-n 2`, and `--dist loadgroup` from pyproject.toml) each group runs on one worker, so a
# run is made once per suite, not once per worker.
SHARED_RUNS = ("tiny_run", "tiny_reproduction")


@pytest.hookimpl(tryfirst=True)  # Before pytest-xdist's own, which reads the group marks.
def pytest_collection_modifyitems(items):
  for item in items:
    shared = [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]
    if shared and not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(shared[0]))


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_data_dir):
  """(config, workdir, results): `configs/patch3.py:tiny` trained on `synthetic_small` and
  evaluated on its test split (2 slice panels), once per session. Read only."""
  from perfjax import evaluate, train  # pylint: disable=g-import-not-at-top
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  config = patch3.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("PERFJAX_DATA_DIR", str(small_data_dir))
    train.train(config, workdir)
    results = evaluate.evaluate(config, workdir, n_panels=2)
  return config, workdir, results


@pytest.fixture(scope="session")
def tiny_reproduction(tmp_path_factory, small_data_dir):
  """(workdir, summary): `configs/paper_experiments.py:tiny` reproduced (`reproduce.run_all`:
  four networks x 2 seeds) on `synthetic_small`, once per session. Read only."""
  from perfjax import reproduce  # pylint: disable=g-import-not-at-top
  from perfjax.configs import paper_experiments  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("reproduce") / "paper"
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("PERFJAX_DATA_DIR", str(small_data_dir))
    summary = reproduce.run_all(paper_experiments.get_config("tiny"), str(workdir))
  return workdir, summary
