r"""patch2-UNet: the paper's baseline, 64x64x1 patches of the peak-LV-enhancement frame.

The same fields, variants and defaults as ``configs/patch3.py`` (read its docstring) with
``input="patch2"``: each slice is reduced to its ``peak_lv_frame`` before the windows are cut.

  python launch.py --config=configs/patch2.py --workdir=runs/patch2
  python launch.py --config=configs/patch2.py --config.augment.mode=conventional \
    --workdir=runs/patch2_conv
  python launch.py --config=configs/patch2.py:paper --workdir=runs/patch2_paper
  python launch.py --config=configs/patch2.py:tiny --workdir=/tmp/patch2_tiny

For the paper's OOD labels, point the patch3 evaluation at this run:
``--config.eval.ood_labels=mbf_patch2 --config.eval.patch2_workdir=runs/patch2``.
"""
import importlib.util
import os

import ml_collections


def _patch3_module():
  # Config files are loaded by path (ml_collections.config_flags), not as a package, so the
  # sibling is loaded by path too.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "patch3.py")
  spec = importlib.util.spec_from_file_location("_perfjax_config_patch3", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return _patch3_module().make_config("patch2", arg)
