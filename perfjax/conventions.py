"""The data contract's numbers, written once (CONVENTIONS.md in ../shared is their prose).

Sizes of the preprocessed input, the class labels of a mask, the sliding-window geometry of the
paper (II-B, III-A) and the units of MBF (II-D). Modules import these names instead of repeating
the literals; the config's defaults (`configs/patch3.py`) are these values too.
"""
from __future__ import annotations

# Arrays: a preprocessed slice is image [IMAGE_SIZE, IMAGE_SIZE, NUM_FRAMES], time frames last.
IMAGE_SIZE = 128
NUM_FRAMES = 30

# Mask labels and the class channels of the model's softmax.
BACKGROUND, MYOCARDIUM, LV_BLOOD_POOL, RV_BLOOD_POOL = 0, 1, 2, 3
NUM_CLASSES = 4
# Training-only label of partial masks (no RV drawn): background or RV, unknown which. The loss
# scores it by the probability of the two together (nnU-Net's ignore label, for one merge).
BACKGROUND_OR_RV = 4

# Orientation: the septal centre theta_s (degrees) of the standard short-axis display (RV on the
# image's left). U's sectors fall back to it when a segmentation has no RV insertion points.
STANDARD_SEPTAL_ANGLE = 180.0

# Sliding window (paper II-B, III-A): 64 x 64 patches; training windows and the segmentation at
# stride 32 (3 x 3 = 9 windows of a 128 x 128 slice), the uncertainty map UM at stride 2 (1089).
PATCH = 64
TRAIN_STRIDE = 32
SEG_STRIDE = 32
UM_STRIDE = 2

# Units: MBF is the Fermi impulse response at onset in 1/s (ml blood per ml tissue per s);
# reported in ml/g/min with the myocardial density.
MYOCARDIAL_DENSITY_G_PER_ML = 1.05
PER_S_TO_ML_G_MIN = 60.0 / MYOCARDIAL_DENSITY_G_PER_ML

# OOD labels `mbf_patch2` (paper III-D): a slice whose patch2-UNet MBF differs from the
# ground-truth-mask MBF by more than this relative tolerance is out of distribution.
MBF_OOD_TOLERANCE = 0.05

# The paper's slice uncertainty U (eq. 1-2), the default OOD score; a slice's score is 1 - U.
PAPER_OOD_SCORE = "U"
