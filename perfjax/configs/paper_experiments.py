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

* ``crossval``: Table 1 on real images, ``--mode=cross_validate`` (perfjax/crossval.py): 5 folds
  by patient of a ``manual`` dataset x the four networks (default training config) and the
  released model fine-tuned (400 steps)::

    PERFJAX_DATA_DIR=~/real_tfds python launch.py --config=configs/paper_experiments.py:crossval \
      --config.base.data.manual_dir=$HOME/perfusion_real --workdir=runs/crossval \
      --mode=cross_validate

* ``crossval_tiny``: the same on the tiny config, 2 folds, the four networks (tests).

Fields of the shared config are overridden as ``--config.base.train.num_steps=600``, those of
the cross-validation as ``--config.crossval.folds=10``.
"""
import ml_collections

from perfjax.configs import patch3

CROSSVAL_VARIANTS = {"crossval": "", "crossval_tiny": "tiny"}  # -> the variant of `base`


def crossval_config(tiny: bool) -> ml_collections.ConfigDict:
  """The fields of `--mode=cross_validate` (perfjax/crossval.py)."""
  cv = ml_collections.ConfigDict()
  cv.folds = 2 if tiny else 5  # Folds by patient; each fold is once the test set.
  cv.validation_patients = 1 if tiny else 4  # Of the training folds: choose the checkpoint.
  cv.seed = 0  # The draw of the folds and of the validation patients.
  cv.networks = ("patch2_conventional", "patch2_advanced", "patch3_conventional",
                 "patch3_advanced") + (() if tiny else ("patch3_finetuned",))
  cv.fine_tune_from = "released"  # patch3_finetuned starts from this workdir's best parameters.
  cv.fine_tune_steps = 400
  cv.fine_tune_learning_rate = 5e-4
  cv.poor_dice = 0.7  # OOD: a slice with myocardium Dice below this is a poor segmentation.
  cv.bootstrap = 200 if tiny else 2000  # Resamplings of patients for the AUC's interval.
  # A reproduce.json of --mode=reproduce: its whole-slice Dice shown beside the real figures.
  cv.synthetic_reproduce = ml_collections.config_dict.placeholder(str)
  return cv


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = (arg or "").strip()
  config = ml_collections.ConfigDict()
  config.base = patch3.get_config(CROSSVAL_VARIANTS.get(variant, variant))  # Raises if unknown.
  tiny = variant in ("tiny", "crossval_tiny")
  if variant in CROSSVAL_VARIANTS:
    config.base.data.dataset = "manual"
    config.crossval = crossval_config(tiny)
  else:
    config.seeds = (0, 1) if tiny else (0, 1, 2)
  config.n_panels = 2 if tiny else 4  # Slice panels per run (most uncertain first).
  return config
