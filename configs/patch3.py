"""Compatibility shim: the config lives in the package, `perfjax/configs/patch3.py` (read its
docstring). Kept so that `--config=configs/patch3.py` and `from configs import patch3` keep working in a
clone; installed, name it `--config=configs/patch3.py` or `--config=patch3` from any directory.
"""
from perfjax.configs.patch3 import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from perfjax.configs.patch3 import get_config  # noqa: F401
from perfjax.configs.patch3 import VARIANTS, make_config  # noqa: F401
