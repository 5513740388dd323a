"""Files a reader looks at: report.md/.html, per-slice panels (paper Fig. 4/5), Dice vs 1-U
(Fig. 6), ROC, the window coverage map (Fig. 3b).

Every writer here is atomic: it writes to a temporary file in the target folder and renames it,
so an interrupted run never leaves a half-written PNG or JSON behind.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import markdown
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


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
{body}
</body></html>
"""


def write_markdown(path: str, text: str) -> None:
  """`text` as Markdown at `path` and as a stand-alone HTML page beside it (same name, .html).

  Images are referenced by relative paths, so the page opens in a browser from the folder.
  """
  with data_io.atomic_path(path, ".md") as tmp, open(tmp, "w") as f:
    f.write(text)
  title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
               "perfjax report")
  body = markdown.markdown(text, extensions=["tables"])
  html_path = os.path.splitext(path)[0] + ".html"
  with data_io.atomic_path(html_path, ".html") as tmp, open(tmp, "w") as f:
    f.write(HTML_PAGE.format(title=title, body=body))


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


def _num(value, fmt: str = ".3f") -> str:
  return "n/a" if value is None or not math.isfinite(float(value)) else format(float(value), fmt)


def _images(workdir: str, folder: str) -> list[str]:
  root = os.path.join(workdir, folder)
  if not os.path.isdir(root):
    return []
  return [f"{folder}/{name}" for name in sorted(os.listdir(root)) if name.endswith(".png")]


def report_markdown(results: dict, workdir: str) -> str:
  """report.md of an evaluation: the headline tables and every figure in the workdir."""
  cfg, d, m = results["config"], results["dice"], results["mbf"]

  def exists(rel):
    return os.path.isfile(os.path.join(workdir, rel))

  lines = [f"# perfjax: {cfg['input']}-UNet ({cfg['augment']} augmentation) on "
           f"{cfg['dataset']}/{cfg['split']}", "",
           f"{results['n_slices']} slices; width {cfg['features']}. Numbers are in "
           "`results.json`; the keys follow CONVENTIONS.md.", "",
           "## Segmentation: myocardium Dice", "",
           "| sectors from | whole slice | 6 sectors | 12 sectors |", "|---|---|---|---|"]
  for geometry, name in (("gt", "ground-truth RV insertion points"),
                         ("pred", "the network's own RV insertion points (paper)")):
    g = d.get("by_geometry", {}).get(geometry)
    if g:
      lines.append(f"| {name} | {_num(d['whole'])} | {_num(g['sector6'])} | "
                   f"{_num(g['sector12'])} |")
  lines += ["", "## Uncertainty and out-of-distribution detection", "",
            "A slice is flagged OOD when 1 - U < t, t at the ROC's maximum Youden J.", "",
            "| labels | OOD slices | AUC | t | sensitivity | specificity | Dice reliable | "
            "Dice unreliable | baseline AUCs |", "|---|---|---|---|---|---|---|---|---|"]
  for labels, o in results.get("ood_all", {}).items():
    base = ", ".join(f"{k} {_num(v['auc'])}" for k, v in o.get("baselines", {}).items()) or "-"
    lines.append(f"| {labels} | {o['n_ood']} | {_num(o['auc'])} | {_num(o['threshold'])} | "
                 f"{_num(o['sensitivity'])} | {_num(o['specificity'])} | "
                 f"{_num(o['dice_reliable'])} | {_num(o['dice_unreliable'])} | {base} |")
  lines.append("")
  for rel, alt in (("figures/dice_vs_confidence.png", "Dice vs 1 - U"),
                   ("figures/roc.png", "ROC"), ("figures/coverage.png", "window coverage")):
    if exists(rel):
      lines.append(f"![{alt}]({rel})")
  ba = m["bland_altman"]
  lines += ["", "## Myocardial blood flow", "",
            f"Slice MBF (mean of the 48 sectors; Fermi deconvolution of {m.get('input', '?')}).",
            "",
            "| comparison | R2 | bias (ml/g/min) | limits of agreement |", "|---|---|---|---|",
            f"| automatic vs ground-truth mask | {_num(m['r2'])} | {_num(ba['mean'], '+.3f')} | "
            f"[{_num(ba['loa_low'], '+.3f')}, {_num(ba['loa_high'], '+.3f')}] |"]
  for name, agreement in m.get("vs_true", {}).items():
    b = agreement["bland_altman"]
    lines.append(f"| {name.replace('_', ' ')} vs true MBF | {_num(agreement['r2'])} | "
                 f"{_num(b['mean'], '+.3f')} | [{_num(b['loa_low'], '+.3f')}, "
                 f"{_num(b['loa_high'], '+.3f')}] |")
  lines.append("")
  lines += [f"![{rel}]({rel})" for rel in _images(workdir, "figures")
            if os.path.basename(rel).startswith("mbf_")]
  lines += [f"![{rel}]({rel})" for rel in _images(workdir, "figures/bullseye")[:2]]
  lines += ["", "## Example slices, most uncertain first", "",
            "Frames at RV, LV and myocardial enhancement; automatic contours solid, ground truth "
            "dashed; UM with the six AHA sectors, the uncertain sector marked.", ""]
  lines += [f"![{rel}]({rel})" for rel in _images(workdir, "figures/slices")]
  if exists("training_curves.png"):
    lines += ["", "## Training", "", "![training curves](training_curves.png)"]
  lines += ["", "## Slices", "",
            "| id | Dice | 1 - U | OOD flag | OOD label | uncertain sector | MBF auto "
            "| MBF GT mask | MBF true |", "|---|---|---|---|---|---|---|---|---|"]
  for s in results["slices"]:
    lines.append(f"| {s['id']} | {_num(s['dice'])} | {_num(s['one_minus_U'])} | "
                 f"{'yes' if s['ood_flag'] else ''} | {'yes' if s.get('ood_label') else ''} | "
                 f"{s['uncertain_sector'] or ''} | {_num(s['mbf_auto'], '.2f')} | "
                 f"{_num(s['mbf_gt_mask'], '.2f')} | {_num(s['mbf_true'], '.2f')} |")
  return "\n".join(lines) + "\n"
