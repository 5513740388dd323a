"""Agreement statistics between two MBF measurements (paper III-C): R^2 and Bland-Altman.

Pairs where either value is NaN/Inf are dropped and counted (``n_dropped``), so a failed
fit never poisons the statistics of a whole test set.
"""
from __future__ import annotations

import numpy as np

from perfjax.errors import InputError

LOA_Z = 1.96  # limits of agreement at +-1.96 SD (paper III-C)


def finite_pairs(x, y, name_x: str = "x", name_y: str = "y"):
  """Finite pairs of two equally shaped arrays (flattened) and how many were dropped."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise InputError(name_y, f"has {y.size} values but {name_x} has {x.size}")
  keep = np.isfinite(x) & np.isfinite(y)
  return x[keep], y[keep], int(x.size - keep.sum())


def r2(x, y, kind: str = "pearson") -> float:
  """R^2 between two measurements of the same quantity.

  kind="pearson" (default, the paper's usage: "very strong correlation (R^2 > 0.95)"):
    the squared Pearson correlation coefficient; invariant to offset and scale, so it
    measures how well a straight line (any slope) relates y to x.
  kind="identity": the coefficient of determination of y against the identity line,
    ``1 - sum((y - x)^2) / sum((y - mean(y))^2)``; penalises bias and slope != 1 as well
    (can be negative).
  NaN pairs are dropped; NaN with fewer than 2 pairs or a constant measurement.
  """
  x, y, _ = finite_pairs(x, y)
  if kind not in ("pearson", "identity"):
    raise InputError("kind", f"must be 'pearson' or 'identity', got {kind!r}")
  if x.size < 2:
    return float("nan")
  dy = y - y.mean()
  ss_y = float(dy @ dy)
  if kind == "identity":
    return float("nan") if ss_y == 0 else float(1.0 - np.sum((y - x) ** 2) / ss_y)
  dx = x - x.mean()
  ss_x = float(dx @ dx)
  if ss_x == 0 or ss_y == 0:
    return float("nan")
  return float((dx @ dy) ** 2 / (ss_x * ss_y))


def bland_altman(a, b, z: float = LOA_Z) -> dict:
  """Bland-Altman agreement of ``a`` against ``b`` (differences ``a - b``).

  Returns dict(mean, sd, loa_low, loa_high, n, n_dropped): the mean difference (bias), its
  sample standard deviation (ddof = 1), the limits of agreement ``mean -+ z * sd``, the
  number of pairs used and the number dropped for NaN/Inf. With one pair only the mean is a
  number (sd and limits NaN); with none, all four are NaN.
  """
  a, b, dropped = finite_pairs(a, b, "a", "b")
  d = a - b
  if d.size < 2:
    nan = float("nan")
    return dict(mean=float(d.mean()) if d.size else nan, sd=nan, loa_low=nan, loa_high=nan,
                n=int(d.size), n_dropped=dropped)
  mean = float(d.mean())
  sd = float(d.std(ddof=1))
  return dict(mean=mean, sd=sd, loa_low=mean - z * sd, loa_high=mean + z * sd, n=int(d.size),
              n_dropped=dropped)


def relative_error(estimate, truth) -> np.ndarray:
  """|estimate / truth - 1| elementwise (NaN where either is NaN or truth is 0)."""
  e = np.asarray(estimate, np.float64)
  t = np.asarray(truth, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(t != 0, np.abs(e / t - 1.0), np.nan)
