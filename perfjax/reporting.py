"""Figures and files a reader looks at: per-slice panels (paper Fig. 4/5), Dice vs 1-U (Fig. 6), ROC.

Every writer here is atomic: it writes to a temporary file in the target folder and renames it,
so an interrupted run never leaves a half-written PNG or JSON behind.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from matplotlib.figure import Figure  # Not pyplot: no global backend or figure state.
import numpy as np

from perfjax.data import io as data_io

CLASS_COLOURS = {1: "#f5d300", 2: "#e8413c", 3: "#2f7fe0"}  # myocardium, LV, RV


def _jsonable(value: Any) -> Any:
  """Numpy scalars/arrays to Python; NaN and Inf to None (JSON has neither)."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def write_json(path: str, payload: dict) -> None:
  """Strict JSON (NaN and Inf as null), written atomically."""
  with data_io.atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
    json.dump(_jsonable(payload), f, indent=1)


def save_figure(fig, path: str, dpi: int = 110) -> None:
  ext = os.path.splitext(path)[1]
  with data_io.atomic_path(path, ext) as tmp:
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext[1:])


def enhancement_frames(image_hwt: np.ndarray, mask: np.ndarray | None) -> dict[str, int]:
  """Frames of RV, LV and myocardial enhancement (peaks of the class mean curves)."""
  if mask is None or not all((mask == c).any() for c in (1, 2, 3)):
    centre = image_hwt[32:96, 32:96].reshape(-1, image_hwt.shape[-1]).mean(0)
    peak = int(np.argmax(centre))
    return {"RV": max(peak - 3, 0), "LV": peak, "myocardium": min(peak + 5, image_hwt.shape[-1] - 1)}
  curve = {c: image_hwt[mask == c].mean(0) for c in (1, 2, 3)}
  return {"RV": int(np.argmax(curve[3])), "LV": int(np.argmax(curve[2])),
          "myocardium": int(np.argmax(curve[1]))}


def _contours(ax, mask: np.ndarray, style: str = "-", classes: Sequence[int] = (1, 2, 3)):
  for c in classes:
    if (mask == c).any():
      ax.contour(mask == c, levels=[0.5], colors=CLASS_COLOURS[c], linewidths=0.9,
                 linestyles=style)


def slice_panel(path: str, image_hwt: np.ndarray, seg: np.ndarray, um: np.ndarray,
                gt_mask: np.ndarray | None = None, sectors6: np.ndarray | None = None,
                title: str = "", uncertain_sector: int | None = None) -> None:
  """One row per slice: three enhancement frames, the contours, and UM with the AHA sectors.

  Predicted contours are solid; ground-truth contours (when known) are dashed.
  """
  frames = enhancement_frames(image_hwt, gt_mask if gt_mask is not None else seg)
  fig = Figure(figsize=(15, 3.3))
  axes = fig.subplots(1, 5)
  for ax, (name, t) in zip(axes[:3], frames.items()):
    ax.imshow(image_hwt[..., t], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{name} enhancement (frame {t})", fontsize=8)
  axes[3].imshow(image_hwt[..., frames["myocardium"]], cmap="gray", vmin=0, vmax=1)
  _contours(axes[3], seg, "-")
  if gt_mask is not None:
    _contours(axes[3], gt_mask, "--")
  axes[3].set_title("predicted" + (" (solid), truth (dashed)" if gt_mask is not None else ""),
                    fontsize=8)
  shown = axes[4].imshow(um, cmap="inferno", vmin=0)
  fig.colorbar(shown, ax=axes[4], fraction=0.046)
  if sectors6 is not None and sectors6.any():
    axes[4].contour(sectors6, levels=np.arange(0.5, 7), colors="w", linewidths=0.4)
    for k in range(1, 7):
      rows, cols = np.nonzero(sectors6 == k)
      if rows.size:
        weight = "bold" if k == uncertain_sector else "normal"
        colour = "cyan" if k == uncertain_sector else "w"
        axes[4].text(cols.mean(), rows.mean(), str(k), color=colour, fontsize=8,
                     ha="center", va="center", fontweight=weight)
  axes[4].set_title("UM" + (f", uncertain sector {uncertain_sector}" if uncertain_sector else ""),
                    fontsize=8)
  for ax in axes:
    ax.set_axis_off()
  fig.suptitle(title, fontsize=10)
  save_figure(fig, path)


def dice_vs_confidence(path: str, dice: np.ndarray, one_minus_u: np.ndarray,
                       ood: np.ndarray | None, threshold: float | None, label_name: str) -> None:
  """Paper Fig. 6: Dice against 1 - U, OOD slices in red, the threshold t as a line."""
  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  ood = np.zeros(len(dice), bool) if ood is None else np.asarray(ood, bool)
  ax.scatter(one_minus_u[~ood], dice[~ood], s=14, c="k", label="in distribution")
  ax.scatter(one_minus_u[ood], dice[ood], s=26, facecolors="none", edgecolors="r",
             label=f"OOD ({label_name})")
  if threshold is not None and math.isfinite(threshold):
    ax.axvline(threshold, color="r", ls=":", label=f"t = {threshold:.3f}")
  ax.set_xlabel("1 - U")
  ax.set_ylabel("myocardium Dice")
  ax.legend(fontsize=8)
  save_figure(fig, path)


def roc_figure(path: str, fpr: np.ndarray, tpr: np.ndarray, auc: float,
               operating_point: tuple[float, float] | None = None) -> None:
  fig = Figure(figsize=(4, 4))
  ax = fig.subplots()
  ax.plot(fpr, tpr, "k-", label=f"1 - U (AUC {auc:.3f})")
  ax.plot([0, 1], [0, 1], color="0.7", ls="--")
  if operating_point is not None:
    ax.plot(*operating_point, "ro", label="max Youden J")
  ax.set_xlabel("1 - specificity")
  ax.set_ylabel("sensitivity")
  ax.legend(fontsize=8, loc="lower right")
  save_figure(fig, path)
