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
# # perfjax quickstart: train, evaluate, look
#
# The whole method of the paper in a few cells: build the synthetic dataset, train a
# patch3-UNet on stride-32 patches, segment the bSSFP test split with the stride-32 sliding
# window, compute the stride-2 uncertainty map UM, the slice uncertainty U, OOD detection and
# MBF. On Colab or a TPU VM, clone the repository and open this notebook from it; the first cell
# installs the requirements. JAX uses whatever accelerator it finds.
#
# `VARIANT = "tiny"` runs in about a minute on a CPU and learns little; set `VARIANT = ""` (the
# default, about 7 minutes on a 2-core CPU) or `"paper"` (GPU/TPU) for real results.
# Source: `notebooks/quickstart.py` (jupytext).

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
import json
import os
import tempfile

import matplotlib.pyplot as plt

from perfjax.configs import patch3
from perfjax import evaluate, platform, train

platform.configure_host_devices()  # As launch.py: one XLA host device per core, before any JAX work.

VARIANT = "tiny"
config = patch3.get_config(VARIANT)
workdir = os.path.join(tempfile.mkdtemp(), "patch3") if VARIANT == "tiny" else "../runs/patch3"
print(config.model, config.augment, config.train.num_steps)

# %% [markdown]
# ## Train
# Resumable: running this cell again with the same `workdir` continues from the last checkpoint.

# %%
summary = train.train(config, workdir)
summary

# %% [markdown]
# ## Evaluate on the test split
# Writes `results.json` (the keys of CONVENTIONS.md), `report.md`/`report.html` and figures into
# the workdir: Dice, U and OOD detection, and MBF (Fermi deconvolution on the AHA 48 sectors)
# from the automatic and the ground-truth masks, against each other and against the phantom's
# true MBF. (The tiny model's masks are empty, so its automatic MBF is NaN.)

# %%
results = evaluate.evaluate(config, workdir, n_panels=2)
print(json.dumps({k: results[k] for k in ("dice", "ood", "mbf")}, indent=1, default=str))

# %% [markdown]
# ## Look: the most uncertain slice (frames, contours, UM with the AHA sectors) and Dice vs 1 - U

# %%
slices_dir = os.path.join(workdir, "figures", "slices")
for name in sorted(os.listdir(slices_dir))[:1] + ["../dice_vs_confidence.png"]:
  plt.figure(figsize=(14, 3.5))
  plt.imshow(plt.imread(os.path.join(slices_dir, name)))
  plt.axis("off")
  plt.show()
