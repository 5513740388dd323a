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
# # The perfjax perfusion phantom
#
# `perfjax.data.phantom.simulate` draws short-axis first-pass perfusion slices at 3T with
# their ground truth: labels, true myocardial blood flow (MBF), the arterial input function
# (AIF), RV insertion points and the pulse-sequence parameters. This notebook shows one
# stress study (basal, mid, apical) with a perfusion defect, imaged with the training
# sequence (SR-FLASH, T1-weighted) and the external-test sequence (SR-bSSFP, T2/T1), and
# a slice whose motion correction failed.
#
# Source: `notebooks/phantom.py` (jupytext); rebuild with
# `jupytext --to ipynb --execute notebooks/phantom.py`.

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
import time

import matplotlib.pyplot as plt
import numpy as np

from perfjax import physics, sectors
from perfjax.data import phantom

plt.rcParams["figure.dpi"] = 60
SEED = 21
t0 = time.perf_counter()
flash = phantom.simulate(SEED, 3, "flash", defect_fraction=1.0, dark_rim=0.0)
bssfp = phantom.simulate(SEED, 3, "bssfp", defect_fraction=1.0, dark_rim=1.0, banding=1.0)
moving = phantom.simulate(SEED, 3, "flash", motion_fraction=1.0, defect_fraction=1.0,
                          dark_rim=0.0)
print(f"9 slices in {time.perf_counter() - t0:.2f} s")
print({k: (v.shape, str(v.dtype)) for k, v in flash.items() if k in (
    "image", "raw", "mask", "times", "mbf", "aif", "rvip", "mbf_sector48")})
print("protocol", flash["protocol"], "levels", flash["slice_level"], "study", flash["study_id"])
print("defect", flash["defect"], "true slice MBF (mean of 48 sectors, ml/g/min):",
      np.round(np.nanmean(flash["mbf_sector48"], axis=1), 2))

# %% [markdown]
# ## Frames at RV, LV and myocardial enhancement
# The frames are chosen from the ground truth: the peak of the mean signal in the RV, the
# LV (`peak_lv_frame`) and the myocardium. A single frame is ambiguous (at peak LV the
# myocardium is dark next to bright blood, fat and the RV wall; later it is as bright as its
# surroundings); the time course is not.

# %%
LEVELS = ("basal", "mid", "apical")


def class_curves(d, i, key="raw"):
  m = d["mask"][i]
  return {name: d[key][i][m == c].mean(axis=0) for c, name in ((3, "RV"), (2, "LV"), (1, "myo"))}


def frames_figure(d, title):
  fig, axes = plt.subplots(3, 4, figsize=(11, 8.5))
  for i in range(3):
    c = class_curves(d, i)
    picks = {"baseline": 0, "RV peak": int(np.argmax(c["RV"])),
             "LV peak": int(d["peak_lv_frame"][i]), "myo peak": int(np.argmax(c["myo"]))}
    for j, (name, f) in enumerate(picks.items()):
      ax = axes[i, j]
      ax.imshow(d["image"][i, 16:112, 16:112, f], cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{LEVELS[i]}: {name} (frame {f}, {d['times'][i, f]:.1f} s)", fontsize=8)
      ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  plt.show()


frames_figure(flash, "SR-FLASH (T1-weighted), stress, with a perfusion defect")
frames_figure(bssfp, "SR-bSSFP (T2/T1): same hearts; dark rim and off-resonance band on")

# %% [markdown]
# ## Time curves per class, and the true AIF
# RV enhances before the LV, the LV before the myocardium. The FLASH blood signal saturates
# at the bolus peak (compare the signal with the concentration); bSSFP starts from a
# brighter blood baseline.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, (d, name) in zip(axes[:2], ((flash, "FLASH"), (bssfp, "bSSFP"))):
  c = class_curves(d, 1)
  for k, v in c.items():
    ax.plot(d["times"][1], v / c["myo"][0], "o-", ms=3, label=k)
  ax.set_title(f"{name}, mid slice: signal / myocardial baseline")
  ax.set_xlabel("time (s)")
  ax.legend()
ax = axes[2]
tf = np.linspace(0, flash["times"][1, -1], 600)
ax.plot(tf, physics.aif_concentration(tf, flash["aif_params"][1]), label="AIF (continuous)")
ax.plot(flash["times"][1], flash["aif"][1], "o", ms=3, label="AIF at the frames")
w, k, tau = flash["fermi"][1]
mean_mbf = flash["mbf"][1][flash["mask"][1] == 1].mean()
myo_true = physics.tissue_concentration(flash["times"][1], flash["aif_params"][1],
                                        physics.ml_g_min_to_per_s(mean_mbf), w, k, tau)
ax.plot(flash["times"][1], myo_true, "s-", ms=3, label="myocardium (mean MBF)")
ax.set_title(f"concentration (mM); Fermi w={w:.1f} s k={k:.2f} s tau_d={tau:.2f} s")
ax.set_xlabel("time (s)")
ax.legend()
fig.tight_layout()
plt.show()

base = {}
for d, name in ((flash, "FLASH"), (bssfp, "bSSFP")):
  c = class_curves(d, 1)
  base[name] = round(float(c["LV"][0] / c["myo"][0]), 2)
print("baseline LV blood / myocardium:", base)

# %% [markdown]
# ## Masks, true MBF and the AHA sectors
# Labels: 1 myocardium, 2 LV blood pool (papillary muscles and trabeculae included), 3 RV.
# Crosses: the RV insertion points returned by the phantom; circles: those found on the mask
# by `perfjax.sectors.rv_insertion_points`. The defect is subendocardial-predominant and
# follows a coronary territory.

# %%
fig, axes = plt.subplots(3, 4, figsize=(12, 9))
for i in range(3):
  m = flash["mask"][i]
  axes[i, 0].imshow(m[16:112, 16:112], cmap="viridis", vmin=0, vmax=3)
  rv = flash["rvip"][i] - 16
  axes[i, 0].plot(rv[:, 1], rv[:, 0], "r+", ms=12)
  found = sectors.rv_insertion_points(m)
  for name in ("anterior", "inferior"):
    axes[i, 0].plot(found[name][1] - 16, found[name][0] - 16, "wo", mfc="none")
  axes[i, 0].set_title(f"{LEVELS[i]} mask + RVIPs")
  im = axes[i, 1].imshow(np.where(m == 1, flash["mbf"][i], np.nan)[16:112, 16:112],
                         cmap="magma", vmin=0, vmax=4.5)
  plt.colorbar(im, ax=axes[i, 1], fraction=0.046)
  axes[i, 1].set_title("true MBF (ml/g/min)")
  s6 = sectors.sector_map(m, 6, 1)
  axes[i, 2].imshow(np.where(s6 > 0, s6, np.nan)[16:112, 16:112], cmap="tab10", vmin=1, vmax=10)
  axes[i, 2].set_title("AHA 6 sectors")
  axes[i, 3].bar(np.arange(1, 7), flash["mbf_sector6"][i])
  axes[i, 3].set_ylim(0, 4.5)
  axes[i, 3].set_title("true MBF per sector")
  for ax in axes[i, :3]:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A motion-correction failure
# With `motion_fraction=1` every slice keeps residual respiratory motion: a breathing
# pattern of in-plane shifts (several pixels) and a mild scaling, zero at the reference
# (peak-LV) frame, whose anatomy the mask describes. The coil sensitivity and the noise do
# not move with the heart.

# %%
i = 1
shift = moving["motion_shift_px"][i]
fig, axes = plt.subplots(1, 5, figsize=(15, 3.3))
ref = int(moving["peak_lv_frame"][i])
for ax, f in zip(axes[:4], (0, ref, ref + 4, 29)):
  ax.imshow(moving["image"][i, 16:112, 16:112, f], cmap="gray")
  ax.contour(moving["mask"][i, 16:112, 16:112] == 1, levels=[0.5], colors="r", linewidths=0.6)
  ax.set_title(f"frame {f}: shift ({shift[f, 0]:.1f}, {shift[f, 1]:.1f}) px", fontsize=8)
  ax.axis("off")
axes[4].plot(moving["times"][i], shift[:, 0], label="rows")
axes[4].plot(moving["times"][i], shift[:, 1], label="cols")
axes[4].set_xlabel("time (s)")
axes[4].set_title("residual motion (px)")
axes[4].legend()
fig.tight_layout()
plt.show()
print("motion", moving["motion"], "max |shift| per slice (px):",
      np.round(np.abs(moving["motion_shift_px"]).max(axis=(1, 2)), 1))
print(f"notebook ran in {time.perf_counter() - t0:.1f} s")
