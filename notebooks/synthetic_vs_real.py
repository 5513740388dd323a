# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The wide phantom beside real perfusion images
#
# perfjax trains on its own physics-based phantom. The `wide` phantom (the default) spans
# what real first-pass perfusion looks like: heart sizes of 30-80 px in the 128 x 128 crop,
# the first pass anywhere in the first 12 frames with varied bolus width, dose and heart
# rate, eccentric cavities, thin and thick walls, small and large RVs, a body of soft tissue
# around the heart with a lung field on one side and random organ blobs, random contrast
# and texture of every surrounding tissue, a coarser acquisition (blur, Gibbs ringing),
# frame-to-frame jitter, a wide SNR range and cut-off fields of view. The `narrow` phantom
# is the earlier one. Below: random slices of each at three phases (RV, LV and myocardial
# enhancement), and, when you point `REAL_DATA` at a folder of your own (for instance the
# output of `benchmarks/real_data.py convert`), the same layout for real slices. Real
# images are rendered only on your machine: the notebook is kept without outputs.
#
# Source: `notebooks/synthetic_vs_real.py` (jupytext).

# %%
# Install cell: where perfjax is not installed yet (Colab, a TPU VM, a fresh venv), it installs the
# pinned requirements and perfjax itself from the clone, `pip install -r requirements.txt -e .`
# (the README's install step), with JAX for the machine's accelerator. The clone is the folder
# above this notebook (Jupyter starts in notebooks/) or one in the working folder (Colab starts in
# /content: run `!git clone <the repository's URL>` there first).
import importlib
import importlib.util
import site
import subprocess
import sys

if importlib.util.find_spec("perfjax") is None:
  import glob
  import pathlib
  import shutil
  _root = next((p.resolve() for p in [pathlib.Path(".."), pathlib.Path(".")]
                + sorted(pathlib.Path(".").glob("*/"))
                if (p / "requirements.txt").is_file() and (p / "perfjax").is_dir()), None)
  if _root is None:
    raise RuntimeError("perfjax is not installed and there is no clone of it above this notebook "
                       "or in the working folder: clone the repository first")
  # JAX at the pinned version for the accelerator: jax[cuda12] where an NVIDIA driver is (Colab
  # GPU), jax[tpu] on a TPU VM (its /dev/accel* or /dev/vfio devices), else the CPU build.
  _extra = ("[cuda12]" if shutil.which("nvidia-smi") else
            "[tpu]" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else "")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                  str(_root / "requirements.txt"), "-e", f"{_root}{_extra}"], check=True)
  for _path in site.getsitepackages():  # Reads the new install's .pth: no kernel restart needed.
    site.addsitedir(_path)
  importlib.invalidate_caches()

# %%
# %matplotlib inline
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from perfjax.data import io as data_io
from perfjax.data import phantom, preprocess

plt.rcParams["figure.dpi"] = 50
N_SHOW = int(os.environ.get("N_SHOW", "50"))  # slices per grid
REAL_DATA = os.environ.get("REAL_DATA")  # a folder of <study>/<slice>.nii.gz + _mask.nii.gz


def phases(image, mask):
  """Frames of RV, LV and myocardial peak enhancement (from the mask's mean curves)."""
  def peak(label, default):
    return int(np.argmax(image[mask == label].mean(0))) if np.any(mask == label) else default
  lv = peak(2, image.shape[-1] // 2)
  return peak(3, max(lv - 3, 0)), lv, peak(1, min(lv + 4, image.shape[-1] - 1))


def grid(images, masks, title):
  n = len(images)
  cols = 10
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows * 3, cols, figsize=(cols * 1.6, rows * 3 * 1.6))
  for ax in axes.flat:
    ax.axis("off")
  for i in range(n):
    for j, t in enumerate(phases(images[i], masks[i])):
      ax = axes[(i // cols) * 3 + j, i % cols]
      ax.imshow(images[i][..., t], cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{i} {'RV LV MY'.split()[j]} t={t}", fontsize=7)
  fig.suptitle(title)
  plt.tight_layout()
  plt.show()


def epi_diameter_px(mask):
  return 2.0 * np.sqrt(np.sum((mask == 1) | (mask == 2)) / np.pi)


# %%
wide = phantom.simulate(7, N_SHOW, "flash", slices_per_study=1)
narrow = phantom.simulate(7, N_SHOW, "flash", slices_per_study=1, variability="narrow")
grid(wide["image"], wide["mask"], "wide phantom (default), FLASH")

# %%
grid(narrow["image"][:20], narrow["mask"][:20], "narrow phantom (before), FLASH")

# %% [markdown]
# ## Real slices, when you have them
#
# Each slice goes through perfjax's own reader and preprocessing (truncation to 30 frames
# with the bolus arriving at frame 5, resampling to 1.4 mm pixels, the crop at the LV
# centre of the mask), exactly as `--mode=predict` and the `manual` dataset read them.

# %%
real = None
if REAL_DATA and pathlib.Path(REAL_DATA).is_dir():
  images, masks = [], []
  for path in sorted(pathlib.Path(REAL_DATA).glob("*/*.nii.gz")):
    mask_path = path.with_name(path.name.replace(".nii.gz", "_mask.nii.gz"))
    if path.name.endswith("_mask.nii.gz") or not mask_path.is_file():
      continue
    rec = data_io.read_slice(path, mask_path)
    pre = preprocess.preprocess_slice(rec["image"], rec["times"], rec["mask"], rec["pixel_mm"],
                                      source=str(path))
    images.append(pre["image"])
    masks.append(pre["mask"])
  pick = np.random.default_rng(0).permutation(len(images))[:N_SHOW]
  real = dict(image=np.asarray(images)[pick], mask=np.asarray(masks)[pick])
  grid(real["image"], real["mask"], f"real slices from {REAL_DATA}")
else:
  print("Set REAL_DATA to a folder of your own slices to see them here "
        "(e.g. the output of benchmarks/real_data.py convert).")

# %% [markdown]
# ## Heart size and bolus arrival
#
# The area-equivalent epicardial diameter in the crop, and the frame at which the blood
# pool passes 10 % of its enhancement (perfjax's arrival rule), for each set.

# %%
sets = {"wide": wide, "narrow": narrow} | ({"real": real} if real is not None else {})
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, d in sets.items():
  ax1.hist([epi_diameter_px(m) for m in d["mask"]], bins=np.arange(10, 100, 4), alpha=0.5,
           label=name)
  ax2.hist([preprocess.bolus_arrival(x) for x in d["image"]], bins=np.arange(0, 25), alpha=0.5,
           label=name)
ax1.set_xlabel("epicardial diameter in the crop (px)")
ax2.set_xlabel("bolus arrival frame")
ax1.legend()
plt.show()
