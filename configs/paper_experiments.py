"""Compatibility shim: the config lives in the package, `perfjax/configs/paper_experiments.py` (read its
docstring). Kept so that `--config=configs/paper_experiments.py` and `from configs import paper_experiments` keep working in a
clone; installed, name it `--config=configs/paper_experiments.py` or `--config=paper_experiments` from any directory.
"""
from perfjax.configs.paper_experiments import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from perfjax.configs.paper_experiments import get_config  # noqa: F401
