"""Figures of the MBF analysis: AHA 16-segment bullseye, Bland-Altman and scatter plots.

Every function draws into a given Axes, or a new pyplot-free ``Figure`` (no global backend or
figure state, so it works headless and inside notebooks alike), and returns the Figure for the
caller to save (``fig.savefig(path)``), display or compose.
"""
from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Wedge
import numpy as np

from perfjax import stats
from perfjax.errors import InputError


def _axes(ax, figsize):
  if ax is None:
    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    return fig, ax
  return ax.figure, ax


def bullseye_geometry():
  """(segment 1..16, inner radius, outer radius, start deg, end deg) of the AHA bullseye.

  Rings: basal (1-6) outer, mid (7-12), apical (13-16) inner. As in the standard display
  (CONVENTIONS.md angles: 90 up/anterior, 180 left/septal), segment 1 (anterior) is centred
  at 90 deg and the numbering runs counter-clockwise in 60-degree wedges (2 anteroseptal at
  150, 3 inferoseptal 210, 4 inferior 270, 5 inferolateral 330, 6 anterolateral 30); apical
  segments are 90-degree wedges centred at 90 (13), 180 (14), 270 (15) and 0 (16).
  """
  out = []
  for ring, (r0, r1) in enumerate(((2.0, 3.0), (1.0, 2.0))):
    for k in range(6):
      start = 60.0 + 60.0 * k
      out.append((ring * 6 + k + 1, r0, r1, start, start + 60.0))
  for k in range(4):
    start = 45.0 + 90.0 * k
    out.append((13 + k, 0.0, 1.0, start, start + 90.0))
  return out


def _text_colour(rgba) -> str:
  """Black or white, whichever reads better on `rgba` (relative luminance)."""
  r, g, b = rgba[:3]
  return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def bullseye(values16, ax=None, cmap: str = "viridis", vmin=None, vmax=None,
             label: str = "MBF (ml/g/min)", annotate: bool = True, colorbar: bool = True):
  """AHA 16-segment bullseye of ``values16`` [16] (index 0 = segment 1); NaN drawn grey.

  Pass the same vmin/vmax to every bullseye that is to be compared; the segment text is black
  or white, whichever reads on its colour.
  """
  v = np.asarray(values16, np.float64)
  if v.shape != (16,):
    raise InputError("values16", f"expected 16 segment values, got shape {v.shape}")
  fig, ax = _axes(ax, (4.2, 3.6))
  finite = v[np.isfinite(v)]
  lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
  hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
  if hi <= lo:
    hi = lo + 1.0
  norm = matplotlib.colors.Normalize(lo, hi)
  cm = matplotlib.colormaps[cmap]
  for seg, r0, r1, a0, a1 in bullseye_geometry():
    val = v[seg - 1]
    color = cm(norm(val)) if np.isfinite(val) else (0.8, 0.8, 0.8, 1.0)
    ax.add_patch(Wedge((0, 0), r1, a0, a1, width=r1 - r0, facecolor=color, edgecolor="white",
                       linewidth=1.5))
    if annotate:
      mid = np.deg2rad(0.5 * (a0 + a1))
      rad = 0.5 * (r0 + r1) if r0 > 0 else 0.55
      txt = f"{val:.2f}" if np.isfinite(val) else "n/a"
      ax.text(rad * np.cos(mid), rad * np.sin(mid), f"{seg}\n{txt}", ha="center", va="center",
              fontsize=7, color=_text_colour(color))
  ax.set_xlim(-3.1, 3.1)
  ax.set_ylim(-3.1, 3.1)
  ax.set_aspect("equal")
  ax.axis("off")
  if colorbar:
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cm)
    fig.colorbar(sm, ax=ax, label=label, shrink=0.8)
  return fig


def bullseye_grid(studies: list[tuple[str, dict[str, np.ndarray]]], vmin=None, vmax=None,
                  label: str = "MBF (ml/g/min)", cmap: str = "viridis"):
  """Every study's bullseyes in one figure: a row per study, a column per source.

  `studies`: (title, {source: values16}) per study. One colour scale (vmin/vmax, default the
  range of all finite values) and one colour bar for the whole grid.
  """
  sources = list(dict.fromkeys(name for _, per in studies for name in per))
  values = [np.asarray(v, np.float64) for _, per in studies for v in per.values()]
  finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
  lo = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
  hi = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
  if hi <= lo:
    hi = lo + 1.0
  rows, cols = max(len(studies), 1), max(len(sources), 1)
  fig = Figure(figsize=(3.0 * cols + 1.0, 2.8 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for r, (title, per) in enumerate(studies):
    for c, source in enumerate(sources):
      ax = axes[r, c]
      if source in per:
        bullseye(per[source], ax=ax, vmin=lo, vmax=hi, cmap=cmap, colorbar=False)
        ax.set_title(f"{title}: {source.replace('_', ' ')}", fontsize=8)
      else:
        ax.axis("off")
  sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(lo, hi),
                                    cmap=matplotlib.colormaps[cmap])
  fig.colorbar(sm, ax=axes, label=label, shrink=0.5 if rows > 2 else 0.9)
  return fig


def bland_altman_plot(a, b, ax=None, label_a: str = "a", label_b: str = "b",
                      units: str = "ml/g/min"):
  """Bland-Altman plot: differences a - b against means, with bias and +-1.96 SD lines."""
  ba = stats.bland_altman(a, b)
  x, y, _ = stats.finite_pairs(a, b, "a", "b")
  fig, ax = _axes(ax, (4.5, 3.5))
  ax.scatter(0.5 * (x + y), x - y, s=12, alpha=0.7)
  for val, style, name in ((ba["mean"], "-", "mean"), (ba["loa_high"], "--", "+1.96 SD"),
                           (ba["loa_low"], "--", "-1.96 SD")):
    if np.isfinite(val):
      ax.axhline(val, color="k", linestyle=style, linewidth=1)
      ax.text(1.0, val, f" {name} {val:.3f}", transform=ax.get_yaxis_transform(), va="center",
              fontsize=7)
  ax.set_xlabel(f"mean of {label_a} and {label_b} ({units})")
  ax.set_ylabel(f"{label_a} - {label_b} ({units})")
  ax.set_title(f"Bland-Altman (n = {ba['n']})", fontsize=9)
  fig.tight_layout()
  return fig


def scatter_plot(x, y, ax=None, label_x: str = "x", label_y: str = "y",
                 units: str = "ml/g/min", marked=None, marked_label: str = "motion"):
  """Scatter of y against x with the identity line and R^2 (squared Pearson) in the title.

  `marked` (bool per point, e.g. the slices with a motion-correction failure) draws those
  points as red open circles, named `marked_label` in the legend.
  """
  xs, ys, dropped = stats.finite_pairs(x, y)
  fig, ax = _axes(ax, (3.8, 3.6))
  if marked is not None:
    x_all, y_all = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x_all) & np.isfinite(y_all)
    flag = np.asarray(marked, bool) & ok
    ax.scatter(x_all[ok & ~flag], y_all[ok & ~flag], s=12, alpha=0.7,
               label=f"no {marked_label}")
    ax.scatter(x_all[flag], y_all[flag], s=30, facecolors="none", edgecolors="r",
               label=f"{marked_label} ({int(flag.sum())})")
  else:
    ax.scatter(xs, ys, s=12, alpha=0.7)
  if xs.size:
    lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="identity")
    ax.legend(loc="upper left", fontsize=7)
  ax.set_xlabel(f"{label_x} ({units})")
  ax.set_ylabel(f"{label_y} ({units})")
  ax.set_title(f"R$^2$ = {stats.r2(xs, ys):.3f} (n = {xs.size}, dropped {dropped})", fontsize=9)
  ax.set_aspect("equal", adjustable="datalim")
  fig.tight_layout()
  return fig
