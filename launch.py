r"""Trains and evaluates a patch UNet: `python launch.py ...` is the `perfjax` command.

  python launch.py --config=configs/patch3.py --workdir=runs/patch3           # train + evaluate
  python launch.py --config=configs/patch2.py --workdir=runs/patch2
  python launch.py --config=configs/patch3.py:tiny --workdir=/tmp/t --mode=train
  python launch.py --config=configs/patch3.py --workdir=runs/patch3 --mode=evaluate
  python launch.py --config=configs/patch3.py --workdir=runs/patch3 --mode=predict \
    --input=study_dir --output=out_dir
  python launch.py --config=configs/paper_experiments.py --workdir=runs/paper --mode=reproduce

Installed (`pip install -e .`), the same runs from any directory as
`perfjax run|train|evaluate|predict|reproduce --config=... --workdir=...` or
`python -m perfjax ...`. Flags, messages and the process set-up are in perfjax/cli.py;
`perfjax --help` lists them. Nothing is set at import.
"""
import os
import sys

if __name__ == "__main__":
  # A clone that is not installed: the package is beside this file.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from perfjax import cli  # pylint: disable=g-import-not-at-top
  cli.main()
