r"""The paper's four-network experiment (Table 1, MBF agreement, OOD) over several seeds.

Trains patch2-UNet and patch3-UNet with conventional and advanced augmentation for every seed
(`base` is the shared training/evaluation config; input, augmentation and seed are set per
run) and writes WORKDIR/reproduce.md (+ .html, .json, figures/). See perfjax/reproduce.py.

Variants (the text after ``:``):

* default (``""``): the CPU-sized default config, 3 seeds, 12 runs (resumable, each finished
  run is kept; timings in benchmarks/RESULTS.md)::

    python launch.py --config=configs/paper_experiments.py --workdir=runs/paper --mode=reproduce

* ``paper``: the paper's width and data size (GPU/TPU)::

    python launch.py --config=configs/paper_experiments.py:paper --workdir=runs/paper_full \
      --mode=reproduce

* ``tiny``: the tiny config, 2 seeds (tests and the notebook).

Fields of the shared config are overridden as ``--config.base.train.num_steps=600``.
"""
import ml_collections

from perfjax.configs import patch3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = (arg or "").strip()
  config = ml_collections.ConfigDict()
  config.base = patch3.get_config(variant)  # Raises for an unknown variant.
  config.seeds = (0, 1) if variant == "tiny" else (0, 1, 2)
  config.n_panels = 2 if variant == "tiny" else 4  # Slice panels per run (most uncertain first).
  return config
