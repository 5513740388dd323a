"""The configs shipped with perfjax: `patch3` (the paper's proposal), `patch2` (its baseline) and
`paper_experiments` (the four-network experiment).

Each module has ``get_config(variant)``. On the command line they are named by file,
``--config=configs/patch3.py:tiny`` (resolved to this package when no such file exists where the
command runs) or by name, ``--config=patch3:tiny``; in Python::

    from perfjax.configs import patch3
    config = patch3.get_config("tiny")
"""
import os

NAMES = ("patch3", "patch2", "paper_experiments")
DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """The file of the packaged config `name` (one of NAMES)."""
  return os.path.join(DIR, f"{name}.py")
