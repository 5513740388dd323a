"""Files a reader looks at: report.md/.html, per-slice panels (paper Fig. 4/5), Dice vs 1-U
(Fig. 6), ROC, the window coverage map (Fig. 3b); training's metrics.jsonl, TensorBoard events
and training curves.

Every writer here is atomic: it writes to a temporary file in the target folder and renames it,
so an interrupted run never leaves a half-written PNG or JSON behind; the file gets the usual
permissions (0666 less the umask), not the temporary file's 0600.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Iterator, Sequence

import markdown
from matplotlib.figure import Figure  # Not pyplot: no global backend or figure state.
import numpy as np

from perfjax import sectors
from perfjax.conventions import LV_BLOOD_POOL, MYOCARDIUM, PAPER_OOD_SCORE, RV_BLOOD_POOL
# write_json: results.json and the other JSON outputs are written with it (reporting.write_json).
from perfjax.data.io import atomic_path, jsonable, write_json  # noqa: F401
from perfjax.errors import InputError

CLASS_COLOURS = {MYOCARDIUM: "#f5d300", LV_BLOOD_POOL: "#e8413c", RV_BLOOD_POOL: "#2f7fe0"}
FOREGROUND = (MYOCARDIUM, LV_BLOOD_POOL, RV_BLOOD_POOL)


def write_text(path: str, text: str) -> None:
  """`text` at `path`, written atomically."""
  suffix = os.path.splitext(path)[1] or ".tmp"
  with atomic_path(path, suffix) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def fresh_dir(workdir: str, name: str) -> str:
  """An empty folder `.{name}.new-<pid>` in `workdir` for an output folder to be built in.

  Leftovers of interrupted runs (`.{name}.new-*`, `.{name}.old-*`) are removed first.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  for leftover in glob.glob(os.path.join(workdir, f".{name}.new-*")) + glob.glob(
      os.path.join(workdir, f".{name}.old-*")):
    shutil.rmtree(leftover, ignore_errors=True)
  path = os.path.join(workdir, f".{name}.new-{os.getpid()}")
  os.makedirs(path)
  return path


def replace_dir(staged: str, final: str) -> None:
  """Puts the folder `staged` in the place of `final` (whose old contents are deleted)."""
  import shutil  # pylint: disable=g-import-not-at-top
  old = None
  if os.path.lexists(final):
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{os.getpid()}")
    os.rename(final, old)
  os.rename(staged, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- provenance


def config_fingerprint(config) -> str:
  """A short hash of a config's values (equal configs, equal fingerprints)."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  text = json.dumps(jsonable(values), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _git(*args: str) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return None
  try:
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> str:
  """The git commit of the perfjax source (`+ local changes` when the tree differs), or the
  installed package version when it is not a git checkout."""
  commit = _git("rev-parse", "--short=12", "HEAD")
  if commit is None:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    try:
      return f"perfjax {metadata.version('perfjax')} (not a git checkout)"
    except metadata.PackageNotFoundError:
      return "unknown"
  dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "perfjax")
  return commit + (" + local changes" if dirty else "")


VERSIONED = ("perfjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
             "tensorflow-datasets", "ml_collections")


def package_versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": sys.version.split()[0]}
  for name in VERSIONED:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  return out


def provenance(config, data: dict | None = None) -> dict:
  """When, by which code and packages, from which config and data a result was made."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    device = f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})"
  except Exception:  # pylint: disable=broad-except
    device = "unknown"
  argv = sys.argv
  command = (" ".join(argv) if argv and os.path.basename(argv[0]) in
             ("launch.py", "perfjax", "__main__.py", "cli.py") else None)
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              code=code_version(), versions=package_versions(), device=device, command=command,
              config_fingerprint=config_fingerprint(config),
              config=config.to_dict() if hasattr(config, "to_dict") else dict(config),
              data=data or {})


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
  with atomic_path(path, ".md") as tmp:
    with open(tmp, "w") as f:
      f.write(text)
  title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
               "perfjax report")
  body = markdown.markdown(text, extensions=["tables"])
  html_path = os.path.splitext(path)[0] + ".html"
  with atomic_path(html_path, ".html") as tmp:
    with open(tmp, "w") as f:
      f.write(HTML_PAGE.format(title=title, body=body))


@contextlib.contextmanager
def step(what: str, enabled: bool = True) -> Iterator[None]:
  """Announces a step of a long job before it starts and says how long it took, so no step
  runs in silence (the console between the progress bars)."""
  if not enabled:
    yield
    return
  print(f"{what} ...", flush=True)
  start = time.perf_counter()
  yield
  print(f"{what}: done in {time.perf_counter() - start:.0f} s", flush=True)


def save_figure(fig, path: str, dpi: int = 110) -> None:
  ext = os.path.splitext(path)[1]
  with atomic_path(path, ext) as tmp:
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext[1:])


def enhancement_frames(image_hwt: np.ndarray, mask: np.ndarray | None) -> dict[str, int]:
  """Frames of RV, LV and myocardial enhancement (peaks of the class mean curves)."""
  if mask is None or not all((mask == c).any() for c in FOREGROUND):
    centre = image_hwt[32:96, 32:96].reshape(-1, image_hwt.shape[-1]).mean(0)
    peak = int(np.argmax(centre))
    return {"RV": max(peak - 3, 0), "LV": peak, "myocardium": min(peak + 5, image_hwt.shape[-1] - 1)}
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
  parts = [f"slice {slice_id}", f"Dice {_num(dice)}", f"1 - U {_num(one_minus_u)}"]
  if flagged is not None:
    parts.append("flagged OOD" if flagged else "not flagged")
  if motion is not None:
    parts.append("motion-correction failure" if motion else "no motion")
  return " | ".join(parts)


PAPER_SCORE = PAPER_OOD_SCORE  # The paper's U, scored as 1 - U.


def score_label(name: str | None) -> str:
  """How an OOD score is named on axes and in tables: the paper's U is scored as 1 - U, every
  other score (perfjax.ood) by its name."""
  return "1 - U" if name in (None, PAPER_SCORE) else str(name)


def auc_ci_text(summary: dict | None) -> str:
  """'0.720 [0.570, 0.860]': the AUC of an OOD summary (perfjax.ood.score_summary) and its
  95 % CI ('n/a' for what is missing or NaN)."""
  if not summary:
    return "-"
  ci = summary.get("auc_ci") or [None, None]
  return f"{_num(summary.get('auc'))} [{_num(ci[0])}, {_num(ci[1])}]"


def counts_text(summary: dict | None) -> str:
  """'24+/36-': the positives (OOD) and negatives of an OOD summary."""
  summary = summary or {}
  pos = summary.get("n_positive", summary.get("n_ood"))
  neg = summary.get("n_negative")
  return f"{'?' if pos is None else pos}+/{'?' if neg is None else neg}-"


def roc_legend(name: str, summary: dict) -> str:
  """A ROC legend entry: 'U: AUC 0.72 [0.57, 0.86], 24+/36-'."""
  ci = summary.get("auc_ci") or [None, None]
  return (f"{name}: AUC {_num(summary.get('auc'), '.2f')} [{_num(ci[0], '.2f')}, "
          f"{_num(ci[1], '.2f')}], {counts_text(summary)}")


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


def _num(value, fmt: str = ".3f") -> str:
  return "n/a" if value is None or not math.isfinite(float(value)) else format(float(value), fmt)


def _images(workdir: str, folder: str) -> list[str]:
  root = os.path.join(workdir, folder)
  if not os.path.isdir(root):
    return []
  return [f"{folder}/{name}" for name in sorted(os.listdir(root)) if name.endswith(".png")]


def _header(results: dict) -> list[str]:
  """Date, code, packages, device, command, config and data of the run (results' provenance)."""
  prov = results.get("provenance")
  if not prov:
    return []
  versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
  data = prov.get("data") or {}
  data_text = ", ".join(f"{k} {v}" for k, v in data.items() if v is not None)
  lines = ["| | |", "|---|---|",
           f"| evaluated | {prov.get('date', '?')} |",
           f"| code | `{prov.get('code', '?')}` |",
           f"| packages | {versions} |",
           f"| device | {prov.get('device', '?')} |"]
  if prov.get("command"):
    lines.append(f"| command | `{prov['command']}` |")
  lines.append(f"| config | fingerprint `{prov.get('config_fingerprint', '?')}` (full config at "
               "the end) |")
  if data_text:
    lines.append(f"| data | {data_text} |")
  return lines + [""]


def _config_section(results: dict) -> list[str]:
  prov = results.get("provenance") or {}
  if not prov.get("config"):
    return []
  text = json.dumps(jsonable(prov["config"]), indent=1, sort_keys=True)
  return ["", "## Config", "", "```json", text, "```"]


_MASK_SETS = {"auto": "automatic masks", "gt_mask": "ground-truth masks"}


def _mbf_notes(m: dict) -> list[str]:
  """The AIF's sources, the frame gain and the flip-angle sensitivity of results.json's `mbf`
  (evaluate's `mbf_details`), as report lines."""
  lines = []
  sources = m.get("aif_sources") or {}
  if sources:
    lines += ["", "AIF: " + "; ".join(
        f"{_MASK_SETS.get(name, name)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        for name, counts in sources.items()) + " slices (series: the study's AIF series; study "
        "slice: the study's slice with the largest clean blood pool, never a motion slice; "
        "own: the slice's own pool)."]
  gains = m.get("frame_gain") or {}
  if gains:
    lines += ["", "Frame gain (perfjax.frame_gain): " + "; ".join(
        f"{_MASK_SETS.get(name, name)}: applied to {g['applied']} of {g['slices']} slices "
        f"(median sd {_num(g['median_sd_percent'], '.2f')} %)" for name, g in gains.items())
        + "; elsewhere the tissue outside the heart enhanced or was too small to measure it."]
  spills = m.get("spill_over") or {}
  if spills:
    lines += ["", "Spill-over term (the LV pool's signal in a sector's curve, fitted where it "
              "pays by BIC): " + "; ".join(
                  f"{_MASK_SETS.get(name, name)}: {s['sectors_with_term']} of "
                  f"{s['sectors_fitted']} sectors" for name, s in spills.items()) + "."]
  for name, f in (m.get("flip_sensitivity") or {}).items():
    lo, hi = f["flip_scale"]
    lines += ["", f"Flip-angle sensitivity ({_MASK_SETS.get(name, name)}): slice MBF changes by "
              f"{_num(f['median_change'][0], '+.1f')} % at x{lo:g} and "
              f"{_num(f['median_change'][1], '+.1f')} % at x{hi:g} of the nominal flip angle "
              f"(median over slices; at most {_num(f['max_abs_change'], '.1f')} %)."]
  return lines


def _ood_section(results: dict, recommended: str) -> list[str]:
  """The report's OOD block: which score is recommended (ood.score) and its headline, then
  every score against every label set (ood_all) with AUC [95 % CI] and n+/n-."""
  o = results.get("ood") or {}
  lines = ["", "## Uncertainty and out-of-distribution detection", "",
           "Every score is higher = more reliable (the paper's U is scored as 1 - U); a slice is "
           "flagged OOD when its score < t, t at the ROC's maximum Youden J. AUCs are given with "
           "their stratified bootstrap 95 % CI; n+/n-: OOD / in-distribution slices.", "",
           f"Recommended score (`ood.score`, config `eval.ood_score`): **{recommended}**"
           + (" (the paper's 1 - U)" if recommended == PAPER_SCORE else "") +
           "; it sets the OOD flags of this report and of `--mode=predict`."]
  if o.get("labels") not in (None, "none"):
    lines += ["", f"With the labels '{o['labels']}': AUC {auc_ci_text(o)}, "
              f"{counts_text(o)}; t {_num(o.get('threshold'))}, sensitivity "
              f"{_num(o.get('sensitivity'))}, specificity {_num(o.get('specificity'))}."]
  lines += ["", "| labels | score | n+/n- | AUC [95 % CI] | t | sensitivity | specificity | "
            "Dice reliable | Dice unreliable |", "|---|---|---|---|---|---|---|---|---|"]
  rows = 0
  for labels, summary in (results.get("ood_all") or {}).items():
    for name, s in [(PAPER_SCORE, summary), *(summary.get("baselines") or {}).items()]:
      name = s.get("score", name)
      mark = " (recommended)" if name == recommended else ""
      lines.append(f"| {labels} | {name}{mark} | {counts_text(s)} | {auc_ci_text(s)} | "
                   f"{_num(s.get('threshold'))} | {_num(s.get('sensitivity'))} | "
                   f"{_num(s.get('specificity'))} | {_num(s.get('dice_reliable'))} | "
                   f"{_num(s.get('dice_unreliable'))} |")
      rows += 1
  if not rows:
    lines += ["", "No OOD labels for this split: no AUC."]
  return lines + [""]


def report_markdown(results: dict, workdir: str, figures: dict[str, list[str]] | None = None
                    ) -> str:
  """report.md of an evaluation: a header (date, code, packages, config, data), the headline
  tables and the figures.

  `figures` (group -> paths relative to the workdir, in the order to show) lists the figures of
  this evaluation: `mbf`, `bullseye`, `slices` (most uncertain first), `ood`. Without it the
  figures folder is listed (older callers).
  """
  cfg, d, m = results["config"], results["dice"], results["mbf"]

  def exists(rel):
    return os.path.isfile(os.path.join(workdir, rel))

  if figures is None:
    figures = dict(
        mbf=[r for r in _images(workdir, "figures") if os.path.basename(r).startswith("mbf_")],
        bullseye=_images(workdir, "figures/bullseye"), slices=_images(workdir, "figures/slices"))
  lines = [f"# perfjax: {cfg['input']}-UNet ({cfg['augment']} augmentation) on "
           f"{cfg['dataset']}/{cfg['split']}", ""]
  lines += _header(results)
  lines += [f"{results['n_slices']} slices; width {cfg['features']}. Numbers are in "
            "`results.json`; the keys follow CONVENTIONS.md.", "",
            "## Segmentation: myocardium Dice", "",
           "| sectors from | whole slice | 6 sectors | 12 sectors |", "|---|---|---|---|"]
  for geometry, name in (("gt", "ground-truth RV insertion points"),
                         ("pred", "the network's own RV insertion points (paper)")):
    g = d.get("by_geometry", {}).get(geometry)
    if g:
      lines.append(f"| {name} | {_num(d['whole'])} | {_num(g['sector6'])} | "
                   f"{_num(g['sector12'])} |")
  recommended = (results.get("ood") or {}).get("score") or PAPER_SCORE
  lines += _ood_section(results, recommended)
  for rel, alt in (("figures/dice_vs_confidence.png", f"Dice vs {score_label(recommended)}"),
                   ("figures/roc.png", "ROC"), ("figures/coverage.png", "window coverage")):
    if exists(rel):
      lines.append(f"![{alt}]({rel})")
  ba = m["bland_altman"]
  units = m.get("units", "ml/g/min")
  lines += ["", "## Myocardial blood flow", "",
            f"Slice MBF (mean of the 48 sectors; Fermi deconvolution of {m.get('input', '?')}), "
            f"in {units}."]
  lines += _mbf_notes(m)
  lines += ["", f"| comparison | R2 | bias ({units}) | limits of agreement |",
            "|---|---|---|---|",
            f"| automatic vs ground-truth mask | {_num(m['r2'])} | {_num(ba['mean'], '+.3f')} | "
            f"[{_num(ba['loa_low'], '+.3f')}, {_num(ba['loa_high'], '+.3f')}] |"]
  for name, agreement in m.get("vs_true", {}).items():
    b = agreement["bland_altman"]
    lines.append(f"| {name.replace('_', ' ')} vs true MBF | {_num(agreement['r2'])} | "
                 f"{_num(b['mean'], '+.3f')} | [{_num(b['loa_low'], '+.3f')}, "
                 f"{_num(b['loa_high'], '+.3f')}] |")
  lines.append("")
  lines += [f"![{rel}]({rel})" for rel in figures.get("mbf", [])]
  if figures.get("bullseye"):
    lines += ["", "AHA 16-segment MBF per study (one colour scale for every study and source; "
              "grey: no value).", ""]
    lines += [f"![{rel}]({rel})" for rel in figures["bullseye"]]
  lines += ["", "## Example slices, most uncertain first", "",
            "Ordered by 1 - U, lowest (most uncertain) first; titled with the ids of the slice "
            "table below, the OOD flag and the motion status. Frames at RV, LV and myocardial "
            "enhancement, zoomed on the heart; automatic contours solid, ground truth dashed; UM "
            "on one colour scale for every panel, with the six AHA sectors and the uncertain "
            "sector circled.", ""]
  lines += [f"![{rel}]({rel})" for rel in figures.get("slices", [])]
  if exists("training_curves.png"):
    lines += ["", "## Training", "", "![training curves](training_curves.png)"]
  # The recommended score's value beside 1 - U when it is another score (it sets the flag).
  extra = recommended != PAPER_SCORE
  lines += ["", "## Slices", "",
            "| id | Dice | 1 - U | " + (f"{recommended} | " if extra else "") +
            f"OOD flag ({recommended}) | OOD label | uncertain sector | MBF auto "
            "| MBF GT mask | MBF true |", "|---|---|---|---|---|---|---|---|---|" +
            ("---|" if extra else "")]
  for s in results["slices"]:
    value = (s.get("ood_scores") or {}).get(recommended)
    lines.append(f"| {s['id']} | {_num(s['dice'])} | {_num(s['one_minus_U'])} | " +
                 (f"{_num(value)} | " if extra else "") +
                 f"{'yes' if s['ood_flag'] else ''} | {'yes' if s.get('ood_label') else ''} | "
                 f"{s['uncertain_sector'] or ''} | {_num(s['mbf_auto'], '.2f')} | "
                 f"{_num(s['mbf_gt_mask'], '.2f')} | {_num(s['mbf_true'], '.2f')} |")
  lines += _config_section(results)
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- training logs


class MetricWriter:
  """Scalars to `metrics.jsonl` (one JSON object per line) and TensorBoard event files.

  On resume from step N the records after N (written before the interruption) are dropped
  from both, so the files read as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      kept = [json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= resume_step]
      with atomic_path(self.path, ".jsonl") as tmp:
        with open(tmp, "w") as f:
          f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    # One whole line per append; a line cut short by a crash is skipped by `read_metrics`.
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=int(step), **{k: float(v) for k, v in scalars.items()})) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl (a last line cut short by a crash is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_curves(workdir: str) -> str | None:
  """Writes `training_curves.png` (loss, learning rate, validation Dice) from metrics.jsonl."""
  records = read_metrics(workdir)
  if not records:
    return None
  def series(name):
    pts = [(r["step"], r[name]) for r in records if name in r]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig = Figure(figsize=(11, 3.2), layout="constrained")
  ax_loss, ax_lr, ax_dice = fig.subplots(1, 3)
  ax_loss.plot(*series("train/loss"), lw=1)
  ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="training loss")
  ax_lr.plot(*series("train/learning_rate"), lw=1)
  ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
  ax_dice.plot(*series("val/dice_myo"), "o-", ms=3)
  ax_dice.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="validation myocardium Dice")
  for ax in (ax_loss, ax_lr, ax_dice):
    ax.grid(alpha=0.3)
  path = os.path.join(workdir, "training_curves.png")
  with atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return path
