"""Figures of the OOD failure benchmark (`perfjax.ood.failure_benchmark`, issue 14).

What a reader looks at before the table: the ROC of every score for each group of failure
types and for all failures together (each curve with its AUC, 95 % CI and n+/n-), the
myocardium Dice of every slice against every score coloured by failure group, and one example
of each failure type beside the clean slice it was made from, with a time profile through the
heart (where motion and a shifted first pass show), the segmentation and an uncertainty map.
"""
from __future__ import annotations

import math
import os

from matplotlib.figure import Figure  # Not pyplot: no global backend or figure state.
from matplotlib.lines import Line2D
import numpy as np

from perfjax import panels
from perfjax import reporting
from perfjax import uncertainty
from perfjax.data import failures
from perfjax.errors import InputError

CLEAN_GROUP = "clean"
GROUP_COLOURS = {CLEAN_GROUP: "k", "motion": "tab:red", "window": "tab:orange",
                 "artefact": "tab:purple", "slice_level": "tab:green", "domain": "tab:blue"}
ROC_ALL = "all"  # roc_<group>.png per group of failure types, roc_all.png for all of them
DICE_FIGURE = "dice_vs_scores.png"
EXAMPLES_FIGURE = "examples.png"


def group_of(failure: str) -> str:
  """The group of `failures.FAILURE_GROUPS` a failure type belongs to (CLEAN_GROUP for none)."""
  if failure == failures.CLEAN:
    return CLEAN_GROUP
  for group, members in failures.FAILURE_GROUPS.items():
    if failure in members:
      return group
  raise InputError("failure", f"unknown failure type {failure!r}")


def roc_figures(fig_dir: str, out: dict) -> list[str]:
  """roc_<group>.png for each group of failure types in ``out`` (`ood.failure_evaluation`) and
  roc_all.png: every score's ROC against the clean slices, the recommended one
  (out["ood_score"]) in black. Returns the file names written."""
  failure = np.asarray(out["slices"]["failure"])
  clean = failure == failures.CLEAN
  rows = [(group, out["by_group"][group], clean | np.isin(failure, failures.FAILURE_GROUPS[group]))
          for group in out.get("by_group") or {}]
  rows.append((ROC_ALL, out["all"], np.ones_like(clean)))
  written = []
  for group, by_score, keep in rows:
    curves = uncertainty.roc_curves(
        {name: np.asarray(out["slices"][name], np.float64)[keep] for name in out["scores"]},
        ~clean[keep], by_score)
    if curves:
      name = f"roc_{group}.png"
      panels.roc_figure(os.path.join(fig_dir, name), curves,
                        recommended=out.get("ood_score"),
                        labels="all failures" if group == ROC_ALL else group,
                        n_total=int(keep.sum()))
      written.append(name)
  return written


def dice_figure(path: str, out: dict) -> None:
  """One panel per score: each slice's myocardium Dice against its score (higher = more
  reliable), coloured by failure group; the clean slices in black."""
  names = list(out["scores"])
  slices = out["slices"]
  groups = np.array([group_of(f) for f in slices["failure"]])
  dice = np.asarray(slices["dice"], np.float64)
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    values = np.asarray(slices[name], np.float64)
    finite = np.isfinite(values)
    for group, colour in GROUP_COLOURS.items():
      shown = (groups == group) & finite
      if shown.any():
        ax.scatter(values[shown], dice[shown], s=10, c=colour, alpha=0.7)
    hidden = int((~finite).sum())
    ax.set_xlabel("score" + (f" ({hidden} undefined not shown)" if hidden else ""), fontsize=8)
    ax.set_ylabel("myocardium Dice", fontsize=8)
    ax.set_title(reporting.score_label(name) + (" (recommended)"
                                                if name == out.get("ood_score") else ""),
                 fontsize=9)
  for ax in axes[len(names):]:
    ax.set_axis_off()
  fig.subplots_adjust(hspace=0.4)
  present = [g for g in GROUP_COLOURS if (groups == g).any()]
  fig.legend(handles=[Line2D([], [], ls="", marker="o", ms=4, color=GROUP_COLOURS[g],
                             label=f"{g} ({int((groups == g).sum())})") for g in present],
             loc="lower center", ncol=len(present), fontsize=7, frameon=False,
             bbox_to_anchor=(0.5, -0.02))
  fig.suptitle("Dice against each score (higher score = more reliable)", fontsize=10)
  reporting.save_figure(fig, path)


def example_indices(data: dict, source: int = 0) -> list[int]:
  """The clean slice ``source`` and, in order, the first slice of each failure type made from
  it (or of the same heart, for the simulated types)."""
  failure = np.asarray(data["failure"])
  from_source = np.flatnonzero(np.asarray(data["source"]) == source)
  return [int(from_source[np.argmax(failure[from_source] == kind)])
          for kind in dict.fromkeys(failure[from_source])]


def examples_figure(path: str, data: dict, pred: dict, scores: dict[str, np.ndarray],
                    recommended: str | None) -> None:
  """One row per failure type (the clean slice first, all made from the same heart): the
  frame of LV enhancement, the time profile of the row through the heart's centre, the
  segmentation (solid) over the truth (dashed), and the uncertainty map: UM (the stride-2 std
  of the windows) when computed, else the pixel entropy of the stride-32 probabilities."""
  picks = example_indices(data)
  # Each row zoomed on its own heart (another domain draws another heart), on the clean
  # one's where a failure has none (beyond the apex).
  boxes = [panels.heart_box([data["mask"][i] if np.any(data["mask"][i])
                             else data["mask"][picks[0]]], data["mask"][i].shape)
           for i in picks]
  with_um = pred.get("um") is not None
  maps = [pred["um"][i] if with_um else uncertainty.pixel_entropy(pred["probs"][i])
          for i in picks]
  map_label = panels.UM_LABEL if with_um else "pixel entropy of the stride-32 probabilities"
  vmax = max(float(np.max(m[rs, cs])) for m, (rs, cs) in zip(maps, boxes)) or 1.0
  fig = Figure(figsize=(12, 2.7 * len(picks)))
  axes = fig.subplots(len(picks), 4, squeeze=False)
  for ax_row, i, map_hw, (rs, cs) in zip(axes, picks, maps, boxes):
    row = int(round(0.5 * (rs.start + rs.stop - 1)))
    image = data["image"][i]
    peak = int(data["peak_lv_frame"][i])
    kind = str(data["failure"][i])
    ax_row[0].imshow(image[rs, cs, peak], cmap="gray", vmin=0, vmax=1)
    ax_row[0].axhline(row - rs.start, color="c", lw=0.6, ls=":")
    ax_row[0].set_title(f"{kind}: frame {peak} (LV peak)", fontsize=8)
    ax_row[1].imshow(image[row, cs, :].T, cmap="gray", vmin=0, vmax=1, aspect="auto")
    ax_row[1].set_title("dotted row over time (frames down)", fontsize=8)
    ax_row[2].imshow(image[rs, cs, peak], cmap="gray", vmin=0, vmax=1)
    panels.draw_contours(ax_row[2], pred["segmentation"][i][rs, cs], "-")
    panels.draw_contours(ax_row[2], data["mask"][i][rs, cs], "dashed", linewidth=1.0)
    score_text = ""
    if recommended in scores:
      value = float(scores[recommended][i])
      score_text = (f", {reporting.score_label(recommended)} "
                    + (f"{value:.3f}" if np.isfinite(value) else "undefined (flagged)"))
    ax_row[2].set_title(f"automatic (solid), truth (dashed){score_text}", fontsize=8)
    shown = ax_row[3].imshow(map_hw[rs, cs], cmap="inferno", vmin=0, vmax=vmax)
    fig.colorbar(shown, ax=ax_row[3], fraction=0.046)
    ax_row[3].set_title(map_label, fontsize=8)
    for ax in ax_row:
      ax.set_xticks([])
      ax.set_yticks([])
  reporting.save_figure(fig, path)


def write_figures(fig_dir: str, out: dict, data: dict, pred: dict,
                  scores: dict[str, np.ndarray]) -> list[str]:
  """Every figure of the failure benchmark into ``fig_dir``; returns their file names."""
  written = roc_figures(fig_dir, out)
  dice_figure(os.path.join(fig_dir, DICE_FIGURE), out)
  examples_figure(os.path.join(fig_dir, EXAMPLES_FIGURE), data, pred, scores,
                  out.get("ood_score"))
  return [*written, DICE_FIGURE, EXAMPLES_FIGURE]
