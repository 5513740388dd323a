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
# # On-device augmentation (paper II-C, Fig. 2)
#
# `perfjax.augment.augment_batch(key, images, masks, mode)` runs inside the jitted training
# step. `"conventional"`: flips, rotation, scaling, shear and a small translation, the same for
# every time frame and for the labels (nearest), plus white noise. `"advanced"` (the paper's):
# the same, then a smooth intensity-modulation map (linear ramp, radial fall-off or a
# lateral-wall-like one-sided drop-off) multiplying all frames, contrast (window and gamma) with
# probability 0.5, Gaussian noise whose sigma differs per frame, and Perlin noise as texture.
# Probabilities and ranges are the fields of `perfjax.augment.AugmentConfig`.
#
# Below: a phantom FLASH slice (`perfjax.data.phantom.simulate`) and augmented copies, with
# the label contours (myocardium yellow, LV cyan, RV magenta); then the modulation maps and the
# Perlin noise alone. Source: `notebooks/augmentation.py` (jupytext); rebuild with
# `jupytext --to ipynb notebooks/augmentation.py && jupyter execute --inplace
# notebooks/augmentation.ipynb` (with perfjax installed: `pip install -e .`).

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
import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

plt.rcParams["figure.dpi"] = 72  # keeps the stored notebook small

from perfjax import augment
from perfjax.data import phantom

t0 = time.perf_counter()
data = phantom.simulate(3, 1, "flash")
image, mask = data["image"][0], data["mask"][0]  # [128, 128, 30], [128, 128]
peak = int(data["peak_lv_frame"][0])
frames = [max(peak - 4, 0), peak, min(peak + 8, image.shape[-1] - 1)]
print(f"slice {image.shape}, peak LV frame {peak}, shown frames {frames}")

# %%
run = jax.jit(augment.augment_batch, static_argnames=("mode", "config"))
n = 3
images = jnp.repeat(jnp.asarray(image)[None], n, 0)
masks = jnp.repeat(jnp.asarray(mask)[None], n, 0)
conv_i, conv_m = run(jax.random.key(0), images, masks, "conventional")
adv_i, adv_m = run(jax.random.key(1), images, masks, "advanced")
rows = [("original", image, mask)]
rows += [(f"conventional {i + 1}", conv_i[i], conv_m[i]) for i in range(2)]
rows += [(f"advanced {i + 1}", adv_i[i], adv_m[i]) for i in range(n)]


def show(ax, img, lab, title=None):
  ax.imshow(np.asarray(img), cmap="gray", vmin=0.0, vmax=1.0)
  lab = np.asarray(lab)
  for cls, colour in ((1, "yellow"), (2, "cyan"), (3, "magenta")):
    if (lab == cls).any():
      ax.contour(lab == cls, levels=[0.5], colors=colour, linewidths=0.6)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=8)


fig, axes = plt.subplots(len(rows), len(frames), figsize=(2.2 * len(frames), 2.2 * len(rows)))
for r, (name, img, lab) in enumerate(rows):
  for c, f in enumerate(frames):
    show(axes[r, c], np.asarray(img)[:, :, f], lab, f"{name}, frame {f}" if r == 0 or c == 0
         else f"frame {f}")
fig.tight_layout()
plt.show()

# %% [markdown]
# The advanced copies differ in brightness across the heart (modulation), in contrast, and in
# texture and noise level; the contours move with the image because labels get the same
# geometric transform. The same on the 64 x 64 training patches (here the centre window):

# %%
patch = slice(32, 96)
p_images, p_masks = images[:, patch, patch], masks[:, patch, patch]
pa_i, pa_m = run(jax.random.key(2), p_images, p_masks, "advanced")
fig, axes = plt.subplots(1, n + 1, figsize=(2.2 * (n + 1), 2.4))
show(axes[0], p_images[0, :, :, peak], p_masks[0], "patch, peak LV frame")
for i in range(n):
  show(axes[i + 1], pa_i[i, :, :, peak], pa_m[i], f"advanced {i + 1}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Modulation maps and Perlin noise
# Top: the three map families at fixed parameters, then random maps from `gradient_map` (all in
# [1 - depth, 1]). Bottom: one Perlin octave and three-octave Perlin noise for three keys
# (in [-1, 1]; the pipeline scales it by an amplitude up to 0.05).

# %%
size = 128
cfg = dataclasses.replace(augment.AugmentConfig(), p_modulation=1.0)
fixed = [("linear ramp, 30 deg", augment.linear_ramp_map(size, size, 30.0, 0.5)),
         ("radial fall-off", augment.radial_map(size, size, (0.15, -0.1), 0.35, 0.5)),
         ("lateral drop-off", augment.dropoff_map(size, size, 0.0, 0.15, 0.08, 0.5))]


@jax.jit
def random_fields(key):
  """Three random modulation maps, three Perlin fields and one single-octave Perlin field."""
  k_map, k_perlin, k_octave = jax.random.split(key, 3)
  maps = jax.vmap(lambda k: augment.gradient_map(k, size, size, cfg))(jax.random.split(k_map, 3))
  fields = jax.vmap(lambda k: augment.perlin_noise(k, size, size))(jax.random.split(k_perlin, 3))
  return maps, fields, augment.perlin_noise(k_octave, size, size, cells=4, octaves=1)


random_maps, perlin, one_octave = random_fields(jax.random.key(4))

fig, axes = plt.subplots(2, 6, figsize=(15, 5.4))
for ax, (name, m) in zip(axes[0], fixed + [(f"random map {i + 1}", m)
                                           for i, m in enumerate(random_maps)]):
  im = ax.imshow(np.asarray(m), cmap="viridis", vmin=0.4, vmax=1.0)
  ax.set_title(name, fontsize=9)
fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
for ax, (name, m) in zip(axes[1], [("Perlin, 1 octave", one_octave)]
                         + [(f"Perlin, 3 octaves, key {i}", m) for i, m in enumerate(perlin)]):
  im = ax.imshow(np.asarray(m), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
  ax.set_title(name, fontsize=9)
axes[1, 4].hist(np.asarray(perlin).ravel(), bins=60, color="grey")
axes[1, 4].set_title("Perlin values (3 keys)", fontsize=9)
axes[1, 5].axis("off")
fig.colorbar(im, ax=axes[1, :4].tolist(), shrink=0.8)
for ax in axes.ravel()[:10]:
  if ax is not axes[1, 4]:
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
print("maps in", float(np.min(random_maps)), float(np.max(random_maps)),
      "| perlin mean %.3f std %.3f max |p| %.3f" % (float(perlin.mean()), float(perlin.std()),
                                                   float(jnp.abs(perlin).max())))

# %% [markdown]
# ## Temporally varying noise
# The per-frame noise sigma of advanced mode (all other transforms off): each sample draws its
# own sigma for every frame, so the noise level changes through the first pass.

# %%
quiet = augment.AugmentConfig(p_flip_horizontal=0.0, p_flip_vertical=0.0, p_affine=0.0,
                              p_modulation=0.0, p_contrast=0.0, p_perlin=0.0)
flat = jnp.full((3, 64, 64, 30), 0.5, jnp.float32)
noisy, _ = run(jax.random.key(7), flat, jnp.zeros((3, 64, 64), jnp.int32), "advanced", quiet)
sigma = np.asarray(noisy - 0.5).std(axis=(1, 2))
fig, ax = plt.subplots(figsize=(6, 2.5))
for i, s in enumerate(sigma):
  ax.plot(s, marker=".", label=f"sample {i + 1}")
ax.set_xlabel("frame")
ax.set_ylabel("noise std")
ax.legend(fontsize=8)
plt.show()
print(f"notebook ran in {time.perf_counter() - t0:.1f} s")
