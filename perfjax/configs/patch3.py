r"""patch3-UNet: the paper's proposal, 64x64x30 (2D+time) patches, four-class UNet.

Variants (the text after ``:`` in ``--config``):

* default (``""``): CPU-sized main job on the ``synthetic_cpu`` dataset, width 16, advanced
  augmentation (timings: benchmarks/RESULTS.md)::

    python launch.py --config=configs/patch3.py --workdir=runs/patch3

* ``paper``: the paper's width (64) on the paper-sized ``synthetic`` dataset; long training,
  meant for a GPU or TPU::

    python launch.py --config=configs/patch3.py:paper --workdir=runs/patch3_paper

* ``release``: the released model's recipe (``released/patch3``): width 32, 4000 steps on
  ``synthetic_mixed_large`` (the wide phantom, each study FLASH or bSSFP, rest or stress; 720
  training slices), meant for a GPU (run times: benchmarks/RESULTS.md)::

    python launch.py --config=configs/patch3.py:release --workdir=runs/patch3_release

* ``release_cpu``: the same at width 16 (as good on the real development set, a quarter of the
  compute: benchmarks/RESULTS.md)::

    python launch.py --config=configs/patch3.py:release_cpu --workdir=runs/patch3_release_cpu

* ``tiny``: width 4, depth 2, ``synthetic_small``, a few steps (tests, seconds)::

    python launch.py --config=configs/patch3.py:tiny --workdir=/tmp/patch3_tiny

Any field can be overridden on the command line, e.g. the conventional-augmentation run::

  python launch.py --config=configs/patch3.py --config.augment.mode=conventional \
    --workdir=runs/patch3_conv

Unknown keys fail (the config is locked). ``configs/patch2.py`` is the same with
``input="patch2"`` (one channel: the peak-LV-enhancement frame).
"""
import dataclasses

import ml_collections

from perfjax import augment
from perfjax import conventions

VARIANTS = ("", "paper", "tiny", "release", "release_cpu")


def make_config(input_kind: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Builds the config of one input kind ("patch3" | "patch2") and variant (see VARIANTS)."""
  variant = (arg or "").strip()
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r}: unknown; expected one of {VARIANTS}")

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.input = input_kind  # "patch3": all 30 frames; "patch2": the peak-LV frame only.

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "synthetic_cpu"  # perfjax.data.datasets builder config.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # None: $PERFJAX_DATA_DIR.
  # dataset "manual": your own studies (layout: perfjax.data.datasets.MANUAL_LAYOUT).
  config.data.manual_dir = ml_collections.config_dict.placeholder(str)

  config.model = ml_collections.ConfigDict()
  config.model.features = 16
  config.model.depth = 4
  config.model.dropout_rate = 0.0
  config.model.patch = conventions.PATCH  # Window size P (paper: 64 x 64).
  config.model.dtype = "float32"  # Computation: "float32" | "bfloat16" (params/softmax float32).

  config.augment = ml_collections.ConfigDict()
  config.augment.mode = "advanced"  # "none" | "conventional" | "advanced".
  # Every probability and range of perfjax.augment.AugmentConfig (its docstring says what each
  # does), at the paper's defaults, e.g. --config.augment.p_affine=0.5.
  for field in dataclasses.fields(augment.AugmentConfig):
    config.augment[field.name] = field.default

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # Windows per step (global, over all devices).
  config.train.stride = conventions.TRAIN_STRIDE  # Step of the training windows (9 per slice).
  config.train.learning_rate = 2e-3
  config.train.schedule = "cosine"  # "constant" | "cosine" (to 1% of the peak at num_steps).
  config.train.warmup_steps = 50
  config.train.num_steps = 1200
  config.train.eval_every = 100  # Validation Dice (whole slices, stride-32 sliding window).
  config.train.log_every = 20
  config.train.checkpoint_every = 100
  config.train.max_to_keep = 2  # Latest checkpoints kept; the best one is kept separately.
  config.train.patience = 5  # Evaluations without a better validation Dice before stopping.
  # Fine-tuning: start from the best parameters of this workdir ("released": released/<input>).
  config.train.init_from = ml_collections.config_dict.placeholder(str)
  # Masks without any RV pixel: "auto" treats their background as background-or-RV (partial
  # labels, e.g. data sets that draw only the myocardium and LV); "never": complete masks.
  config.train.rv_unlabelled = "auto"

  config.eval = ml_collections.ConfigDict()
  config.eval.stride_seg = conventions.SEG_STRIDE  # Stride of the segmentation (paper: 32).
  config.eval.stride_um = conventions.UM_STRIDE  # Stride of UM (2: 1089 windows per slice).
  # Windows per model call and device (memory bound); None: per platform (CPU 8, measured best;
  # accelerators 1089, a whole stride-2 slice: perfjax.inference.default_chunk_size).
  config.eval.chunk_size = ml_collections.config_dict.placeholder(int)
  config.eval.gaussian_weighting = False  # nnU-Net Gaussian importance weighting of the mean.
  # Each window's probabilities averaged over its 4 mirrorings (which both augmentation modes
  # train for): in the segmentation pass (4x a cheap pass; Dice up on real images and the
  # phantom, benchmarks/RESULTS.md), and in the UM pass (4x its cost; off keeps UM the paper's).
  config.eval.mirror_tta = True
  config.eval.mirror_tta_um = False
  config.eval.um_dilation = 0  # Pixels the segmented myocardium is dilated by for U (eq. 1).
  # Also U of the windows' label disagreement (score "U_vote", same stride-2 pass) in the ROCs.
  config.eval.vote_map = False
  # theta_s of U's sectors where the segmentation has no RV insertion points (a network trained
  # without RV labels): conventions.STANDARD_SEPTAL_ANGLE; None flags such slices (the paper).
  config.eval.u_fallback_septal_angle = ml_collections.config_dict.placeholder(float)
  config.eval.ood_labels = "motion"  # "motion" | "mbf_patch2".
  config.eval.patch2_workdir = ml_collections.config_dict.placeholder(str)  # For mbf_patch2.
  config.eval.ood_tolerance = conventions.MBF_OOD_TOLERANCE  # mbf_patch2: > 5 % MBF difference.
  config.eval.keep_heart = True  # Segmentation: drop what is not connected to the LV's heart.
  config.eval.sectors_from = "gt"  # Sector geometry of the sector Dice: "gt" | "pred".
  config.eval.mbf_input = "auto"  # "concentration" | "signal" | "auto" (concentration if known).
  config.eval.ood_score = conventions.PAPER_OOD_SCORE  # Score behind ood.*: "U" (paper eq. 1-2), "entropy", "tta", ...
  config.eval.baselines = ("tta",)  # Other uncertainties scored by the same ROC: tta, mc_dropout.
  config.eval.baseline_samples = 8  # Samples per baseline uncertainty map.
  # Other trained workdirs (e.g. the other seeds of a reproduction) that form a deep ensemble with
  # the evaluated model: scores ensemble_entropy and ensemble_mi (perfjax.ood.ensemble_scores).
  config.eval.ensemble_workdirs = ()

  if variant == "paper":
    config.data.dataset = "synthetic"
    config.model.features = 64
    config.train.batch_size = 32
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 500
    config.train.num_steps = 30_000
    config.train.eval_every = 500
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    config.train.max_to_keep = 3
    config.train.patience = 10
  elif variant in ("release", "release_cpu"):
    config.data.dataset = "synthetic_mixed_large"
    config.model.features = 32 if variant == "release" else 16
    config.train.num_steps = 4000
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.train.patience = 8
  elif variant == "tiny":
    config.data.dataset = "synthetic_small"
    config.model.features = 4
    config.model.depth = 2
    config.train.batch_size = 4
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 0
    config.train.num_steps = 4
    config.train.eval_every = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.patience = 100
    config.eval.stride_um = 16
    config.eval.chunk_size = 16
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return make_config("patch3", arg)
