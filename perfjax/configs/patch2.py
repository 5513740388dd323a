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
import ml_collections

from perfjax.configs import patch3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return patch3.make_config("patch2", arg)
