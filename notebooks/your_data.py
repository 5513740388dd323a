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
# # Your data: a NIfTI folder in; segmentation, uncertainty, OOD flags and MBF out
#
# Point `INPUT_DIR` at a folder of perfusion slices: one NIfTI per slice (`[X, Y, T]` or
# `[X, Y, 1, T]`) with its frame times in seconds in a JSON sidecar (`slice.json` holding
# `{"times": [...]}`) or in `pixdim[4]`, and optionally a mask `slice_mask.nii.gz` (0 background,
# 1 myocardium, 2 LV blood pool, 3 RV blood pool) to get a Dice. DICOM series work too (one
# folder per series), and so do multi-slice files `[X, Y, Z, T]` and series of several slice
# positions, predicted slice by slice. `WORKDIR` is a trained run (`launch.py ... --workdir=runs/patch3`); its
# `results.json` supplies the OOD threshold t.
#
# Without either, this notebook writes three phantom slices as NIfTI files and trains the tiny
# model for a minute, so every cell runs (the tiny model learns nothing: its masks are empty,
# so its MBF is NaN with the reason given). The same as one command:
#
#     python launch.py --config=configs/patch3.py --workdir=runs/patch3 --mode=predict \
#         --input=my_slices/ --output=my_predictions/

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
from perfjax import evaluate, platform, predict, train
from perfjax.data import phantom
from perfjax.data import writers

platform.configure_host_devices()  # As launch.py: one XLA host device per core, before any JAX work.

INPUT_DIR = "my_slices"
WORKDIR = "../runs/patch3"
scratch = tempfile.mkdtemp()

if not os.path.isdir(INPUT_DIR):  # A stand-in for your data: raw phantom signal as NIfTI.
  INPUT_DIR = os.path.join(scratch, "my_slices")
  sim = phantom.simulate(seed=11, n_slices=3, protocol="bssfp", motion_fraction=0.34)
  for i in range(3):
    writers.write_nifti(os.path.join(INPUT_DIR, f"slice{i}.nii.gz"), sim["raw"][i],
                        pixel_mm=(1.4, 1.4), times=sim["times"][i])
  writers.write_nifti(os.path.join(INPUT_DIR, "slice0_mask.nii.gz"), sim["mask"][0],
                      pixel_mm=(1.4, 1.4))
print(sorted(os.listdir(INPUT_DIR)))

config = patch3.get_config("" if os.path.isdir(WORKDIR) else "tiny")
if not os.path.isdir(WORKDIR):
  WORKDIR = os.path.join(scratch, "patch3_tiny")
  train.train(config, WORKDIR)
  evaluate.evaluate(config, WORKDIR, n_panels=0)  # Chooses the OOD threshold t.

# %% [markdown]
# ## Predict
# Per slice: `segmentation.nii.gz`, `probabilities.nii.gz`, `um.nii.gz` and a PNG; for all
# slices `slices.csv` / `slices.json` (U, 1 - U, OOD flag, uncertain AHA sector, slice MBF from
# the signal, Dice where a mask was given). A slice that fails is listed with its error.

# %%
output = os.path.join(scratch, "predictions")
rows = predict.predict(config, WORKDIR, input=INPUT_DIR, output=output)
with open(os.path.join(output, "slices.csv")) as f:
  print(f.read())

# %% [markdown]
# ## Look: frames, contours, the uncertainty map UM with the AHA sectors

# %%
for row in rows:
  if row["U"] is None:
    continue
  plt.figure(figsize=(14, 3.5))
  plt.imshow(plt.imread(os.path.join(output, row["id"], f"{row['id']}.png")))
  plt.axis("off")
  plt.show()

# %% [markdown]
# ## The 48-sector MBF of the first slice (ml/g/min), from `slices.json`

# %%
with open(os.path.join(output, "slices.json")) as f:
  first = json.load(f)["slices"][0]
print(first["id"], "slice MBF", first["mbf"], "error:", first["error"])
print(first["mbf_sector48"])
