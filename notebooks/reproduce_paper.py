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
# # Reproducing the paper: four networks, several seeds
#
# patch2-UNet and patch3-UNet, each with conventional and advanced augmentation, trained on
# FLASH and tested on bSSFP with motion-correction failures, repeated over seeds
# (`perfjax/reproduce.py`, `configs/paper_experiments.py`). This notebook loads a finished
# reproduction from `RUN_DIR`, or runs one: the `tiny` variant takes about a minute and learns
# nothing (it shows the mechanics); the default variant is what the README's table comes from:
#
#     python launch.py --config=configs/paper_experiments.py --workdir=runs/paper --mode=reproduce
#
# On Colab or a TPU VM, clone the repository and open this notebook from it; the first cell
# installs the requirements.

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

from IPython.display import Markdown, display
import matplotlib.pyplot as plt

from perfjax.configs import paper_experiments
from perfjax import platform, reproduce

platform.configure_host_devices()  # As launch.py: one XLA host device per core, before any JAX work.

RUN_DIR = "../runs/paper"  # A finished `--mode=reproduce` workdir, if you have one.
VARIANT = "tiny"  # Used only when RUN_DIR holds no reproduce.json.

if os.path.isfile(os.path.join(RUN_DIR, "reproduce.json")):
  workdir = RUN_DIR
  with open(os.path.join(workdir, "reproduce.json")) as f:
    summary = json.load(f)
else:
  workdir = os.path.join(tempfile.mkdtemp(), "paper")
  summary = reproduce.run_all(paper_experiments.get_config(VARIANT), workdir)
print(f"{len(summary['networks'])} networks, seeds {summary['seeds']}, from {workdir}")

# %% [markdown]
# ## Table 1, MBF agreement, OOD detection and the verdicts on the paper's claims
# Mean ± sd over seeds, the paper's figures beside ours.

# %%
display(Markdown(reproduce.report_markdown(summary).replace("](figures/", f"]({workdir}/figures/")))

# %% [markdown]
# ## Figures: Table 1 as bars, Fig. 6 (Dice vs 1 - U) and the MBF Bland-Altman plots

# %%
for name in ("table1.png", "dice_vs_confidence.png", "mbf_bland_altman.png"):
  plt.figure(figsize=(10, 4))
  plt.imshow(plt.imread(os.path.join(workdir, "figures", name)))
  plt.axis("off")
  plt.show()
