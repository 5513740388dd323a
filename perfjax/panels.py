"""The evaluation's figures: per-slice panels (paper Fig. 4/5), Dice against 1 - U (Fig. 6),
the ROC of the OOD scores, and the sliding window's coverage map (Fig. 3b).

Each draws a pyplot-free ``Figure`` and saves it atomically (`perfjax.reporting.save_figure`).
"""
from __future__ import annotations

import math
from typing import Sequence

from matplotlib.figure import Figure  # Not pyplot: no global backend or figure state.
import numpy as np

from perfjax import sectors
from perfjax.conventions import LV_BLOOD_POOL, MYOCARDIUM, RV_BLOOD_POOL
from perfjax.errors import InputError
from perfjax.reporting import PAPER_SCORE, counts_text, number_text, save_figure, score_label

CLASS_COLOURS = {MYOCARDIUM: "#f5d300", LV_BLOOD_POOL: "#e8413c", RV_BLOOD_POOL: "#2f7fe0"}
FOREGROUND = (MYOCARDIUM, LV_BLOOD_POOL, RV_BLOOD_POOL)


def enhancement_frames(image_hwt: np.ndarray, mask: np.ndarray | None) -> dict[str, int]:
  """Frames of RV, LV and myocardial enhancement (peaks of the class mean curves)."""
  if mask is None or not all((mask == c).any() for c in FOREGROUND):
    h, w = image_hwt.shape[:2]  # the centre half of each side: where the crop puts the heart
    centre = image_hwt[h // 4:3 * h // 4, w // 4:3 * w // 4].reshape(-1, image_hwt.shape[-1]).mean(0)
    peak = int(np.argmax(centre))
    return {"RV": max(peak - 3, 0), "LV": peak,
            "myocardium": min(peak + 5, image_hwt.shape[-1] - 1)}
  curve = {c: image_hwt[mask == c].mean(0) for c in FOREGROUND}
  return {"RV": int(np.argmax(curve[RV_BLOOD_POOL])), "LV": int(np.argmax(curve[LV_BLOOD_POOL])),
          "myocardium": int(np.argmax(curve[MYOCARDIUM]))}


def draw_contours(ax, mask: np.ndarray, style: str = "-", classes: Sequence[int] = FOREGROUND,
                  linewidth: float = 1.6):
  """The outline of each class of ``mask`` in ``classes``, in its colour (CLASS_COLOURS)."""
  for c in classes:
    if (mask == c).any():
      ax.contour(mask == c, levels=[0.5], colors=CLASS_COLOURS[c], linewidths=linewidth,
                 linestyles=style)


def heart_box(masks: Sequence[np.ndarray | None], shape: tuple[int, int],
              margin: float = 0.35, min_size: int = 48) -> tuple[slice, slice]:
  """Rows and columns of a square crop around the foreground of `masks` (with a margin).

  The whole image when no mask has foreground.
  """
  h, w = shape
  fg = np.zeros(shape, bool)
  for m in masks:
    if m is not None:
      fg |= np.asarray(m) > 0
  if not fg.any():
    return slice(0, h), slice(0, w)
  rows, cols = np.nonzero(fg)
  centre = (0.5 * (rows.min() + rows.max()), 0.5 * (cols.min() + cols.max()))
  size = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
  size = int(min(max(size * (1 + 2 * margin), min_size), min(h, w)))
  r0 = int(np.clip(round(centre[0] - size / 2), 0, h - size))
  c0 = int(np.clip(round(centre[1] - size / 2), 0, w - size))
  return slice(r0, r0 + size), slice(c0, c0 + size)


UM_LABEL = "UM: std of the window probabilities"


def _sector_labels(ax, sectors6: np.ndarray, uncertain_sector: int | None) -> None:
  """Sector numbers just outside the myocardium (not on the contours)."""
  inside = sectors6 > 0
  rows, cols = np.nonzero(inside)
  cy, cx = rows.mean(), cols.mean()
  radius = np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2).max()
  for k in range(1, 7):
    r, c = np.nonzero(sectors6 == k)
    if not r.size:
      continue
    angle = np.arctan2(r.mean() - cy, c.mean() - cx)
    y, x = cy + 1.3 * radius * np.sin(angle), cx + 1.3 * radius * np.cos(angle)
    marked = k == uncertain_sector
    ax.text(x, y, str(k), color="cyan" if marked else "w", fontsize=9 if marked else 8,
            ha="center", va="center", fontweight="bold" if marked else "normal",
            bbox=dict(boxstyle="circle,pad=0.15", fc="none", ec="cyan") if marked else None)


def slice_panel(path: str, image_hwt: np.ndarray, seg: np.ndarray, um: np.ndarray,
                gt_mask: np.ndarray | None = None, sectors6: np.ndarray | None = None,
                title: str = "", uncertain_sector: int | None = None,
                um_vmax: float | None = None, zoom: bool = True) -> None:
  """One row per slice: three enhancement frames, the contours, and UM with the AHA sectors.

  Every panel is zoomed on the heart (the foreground of the segmentation and the ground truth).
  Predicted contours are solid; ground-truth contours (when known) are dashed; a legend names
  the classes and line styles. UM is drawn on the scale [0, um_vmax] (pass the same um_vmax for
  every slice of a report so that colours compare; default 0.5, the largest possible std of a
  probability) with a labelled colour bar; sector numbers sit outside the myocardium, the
  uncertain sector circled.
  """
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  frames = enhancement_frames(image_hwt, gt_mask if gt_mask is not None else seg)
  # Zoomed on the ground truth's heart when it is known (a poor segmentation can cover the
  # whole image), else on the segmentation's.
  around = [gt_mask] if gt_mask is not None and np.any(gt_mask) else [seg]
  rs, cs = heart_box(around, seg.shape) if zoom else (slice(None), slice(None))
  fig = Figure(figsize=(16, 3.6))
  axes = fig.subplots(1, 5)
  for ax, (name, t) in zip(axes[:3], frames.items()):
    ax.imshow(image_hwt[rs, cs, t], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{name} enhancement (frame {t})", fontsize=8)
  axes[3].imshow(image_hwt[rs, cs, frames["myocardium"]], cmap="gray", vmin=0, vmax=1)
  draw_contours(axes[3], seg[rs, cs], "-")
  if gt_mask is not None:
    draw_contours(axes[3], gt_mask[rs, cs], "dashed", linewidth=1.2)
  axes[3].set_title("automatic (solid)" + (", truth (dashed)" if gt_mask is not None else ""),
                    fontsize=8)
  names = {MYOCARDIUM: "myocardium", LV_BLOOD_POOL: "LV blood pool", RV_BLOOD_POOL: "RV blood pool"}
  handles = [Line2D([], [], color=CLASS_COLOURS[c], lw=2, label=names[c]) for c in FOREGROUND]
  handles.append(Line2D([], [], color="0.3", lw=1.6, label="automatic"))
  if gt_mask is not None:
    handles.append(Line2D([], [], color="0.3", lw=1.2, ls="--", label="ground truth"))
  axes[3].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.02),
                 ncol=2, frameon=False)
  vmax = 0.5 if um_vmax is None or not np.isfinite(um_vmax) or um_vmax <= 0 else float(um_vmax)
  shown = axes[4].imshow(um[rs, cs], cmap="inferno", vmin=0, vmax=vmax)
  fig.colorbar(shown, ax=axes[4], fraction=0.046, label=UM_LABEL)
  shown_sectors = None if sectors6 is None else sectors6[rs, cs]
  if shown_sectors is not None and shown_sectors.any():  # (the zoom may leave them out)
    axes[4].contour(shown_sectors, levels=np.arange(0.5, 7), colors="w", linewidths=0.4)
    _sector_labels(axes[4], shown_sectors, uncertain_sector)
  axes[4].set_title("UM and AHA sectors" + (f"; uncertain sector {uncertain_sector} (circled)"
                                             if uncertain_sector else ""), fontsize=8)
  for ax in axes:
    ax.set_axis_off()
  fig.suptitle(title, fontsize=10)
  save_figure(fig, path)


def panel(path, image, seg, um, gt_mask, title, uncertain_sector, um_vmax=None):
  """`slice_panel` with the 6 AHA sectors of the segmentation (none when they cannot be placed)."""
  try:
    smap = sectors.sector_map(seg, 6, 1)
  except InputError:
    smap = None
  slice_panel(path, image, seg, um, gt_mask, smap, title, uncertain_sector or None,
              um_vmax=um_vmax)


def panel_title(slice_id: str, dice: float, one_minus_u: float, flagged: bool | None,
                motion: bool | None) -> str:
  """The title of a slice panel: the results table's id, Dice, 1 - U, OOD flag, motion."""
  parts = [f"slice {slice_id}", f"Dice {number_text(dice)}", f"1 - U {number_text(one_minus_u)}"]
  if flagged is not None:
    parts.append("flagged OOD" if flagged else "not flagged")
  if motion is not None:
    parts.append("motion-correction failure" if motion else "no motion")
  return " | ".join(parts)


def roc_legend(name: str, summary: dict) -> str:
  """A ROC legend entry: 'U: AUC 0.72 [0.57, 0.86], 24+/36-'."""
  ci = summary.get("auc_ci") or [None, None]
  return (f"{name}: AUC {number_text(summary.get('auc'), '.2f')} [{number_text(ci[0], '.2f')}, "
          f"{number_text(ci[1], '.2f')}], {counts_text(summary)}")


def dice_vs_confidence(path: str, dice: np.ndarray, one_minus_u: np.ndarray,
                       ood: np.ndarray | None, threshold: float | None, label_name: str,
                       score: str = PAPER_SCORE) -> None:
  """Paper Fig. 6: Dice against the OOD score `score` (1 - U, the paper's, unless another is
  named; the values are given as `one_minus_u`), OOD slices in red, its threshold t as a line."""
  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  values = np.asarray(one_minus_u, np.float64)
  ood = np.zeros(len(dice), bool) if ood is None else np.asarray(ood, bool)
  ax.scatter(values[~ood], dice[~ood], s=14, c="k", label="in distribution")
  ax.scatter(values[ood], dice[ood], s=26, facecolors="none", edgecolors="r",
             label=f"OOD ({label_name})")
  if threshold is not None and math.isfinite(threshold):
    ax.axvline(threshold, color="r", ls=":", label=f"t = {threshold:.3f}")
  ax.set_xlabel(score_label(score) if score == PAPER_SCORE
                else f"{score_label(score)} score (higher = more reliable)")
  ax.set_ylabel("myocardium Dice")
  ax.legend(fontsize=8)
  save_figure(fig, path)


def roc_figure(path: str, curves: dict[str, dict], recommended: str | None = None,
               operating_point: tuple[float, float] | None = None,
               labels: str | None = None, n_total: int | None = None) -> None:
  """ROC of every OOD score in `curves` (name -> dict(fpr, tpr, auc, auc_ci, n_positive,
  n_negative)) against the OOD label set `labels`, each in the legend with its AUC, 95 % CI and
  class sizes ('U: AUC 0.72 [0.57, 0.86], 24+/36-'); the `recommended` score (ood.score) drawn
  first in black, with its operating point t (max Youden J)."""
  fig = Figure(figsize=(4.8, 4.4))
  ax = fig.subplots()
  styles = ["-", "--", "-.", ":"]
  order = sorted(curves, key=lambda n: n != recommended)  # the recommended first, else as given
  k = 0
  for name in order:
    c = curves[name]
    if not len(c["fpr"]):
      continue
    text = roc_legend(name, c) + (" (recommended)" if name == recommended else "")
    if name == recommended:
      ax.plot(c["fpr"], c["tpr"], "k-", lw=1.8, label=text)
    else:
      ax.plot(c["fpr"], c["tpr"], ls=styles[k % len(styles)], lw=1.3, label=text)
      k += 1
  ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
  if operating_point is not None:
    ax.plot(*operating_point, "ro", label=f"t of {score_label(recommended)} (max Youden J)")
  ax.set_xlabel("1 - specificity")
  ax.set_ylabel("sensitivity")
  if labels:
    first = curves.get(recommended) or next(iter(curves.values()), {})
    n_pos = first.get("n_positive")
    count = f": {n_pos} of {n_total} slices OOD" if n_pos is not None and n_total else ""
    ax.set_title(f"OOD labels '{labels}'{count}", fontsize=9)
  ax.legend(fontsize=6.5, loc="lower right")
  save_figure(fig, path)


def coverage_figure(path: str, count_hw: np.ndarray, stride: int) -> None:
  """Paper Fig. 3b: how many sliding windows cover each pixel."""
  fig = Figure(figsize=(4.4, 3.6))
  ax = fig.subplots()
  im = ax.imshow(count_hw, cmap="magma")
  fig.colorbar(im, ax=ax, label="windows covering the pixel")
  ax.set_title(f"stride {stride}: {int(count_hw.max())} windows at the centre, "
               f"{int(count_hw[0, 0])} at the corner", fontsize=8)
  ax.set_axis_off()
  save_figure(fig, path)
