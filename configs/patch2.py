"""Compatibility shim: the config lives in the package, `perfjax/configs/patch2.py` (read its
docstring). Kept so that `--config=configs/patch2.py` and `from configs import patch2` keep working in a
clone; installed, name it `--config=configs/patch2.py` or `--config=patch2` from any directory.
"""
from perfjax.configs.patch2 import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from perfjax.configs.patch2 import get_config  # noqa: F401
