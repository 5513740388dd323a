"""Fermi-constrained deconvolution of tissue curves, batched in JAX (paper II-D, III-C).

`fit_fermi(aif, curves, times)` fits tissue = AIF (x) h with the Fermi impulse response
``h(t) = F / (1 + exp((t - tau_d - w) / k))`` (t >= tau_d) over the first pass
(`perfjax.bolus.first_pass_window`) for all curves of a data set in one jitted, vmapped
solve; MBF = ``F / (1 + exp(-w / k))`` 1/s, reported in ml/g/min (``* 60 / 1.05``). The AIF
between frames is a gamma variate fitted to its first pass plus a cubic spline through the
residuals (`perfjax.bolus.aif_on_grid`): the peers found that a linearly interpolated AIF limits
accuracy to about 6 % (noise-free); this one passes exactly through every sample and follows
the bolus shape between them. Curve extraction, signal conversion and sector aggregation are
`perfjax.perfusion`.

The core below works on one curve at a time in *normalised* units (AIF divided by its peak,
curve divided by its peak, times in seconds from the group's origin) and is batched with
``jax.vmap``; `fit_fermi` handles units, grouping of curves that share an AIF, windows and
failure codes.

Forward model (CONVENTIONS.md, Perfusion): tissue(t) = (AIF * h)(t) with the Fermi impulse
response ``h(t) = F / (1 + exp((t - tau_d - w) / k))`` for t >= tau_d, 0 before. Writing
``R(v) = 1 / (1 + exp((v - w) / k))`` (smooth, no step) gives

    tissue(t) = F * G(t - tau_d),   G(s) = int_0^s AIF(s - v) R(v) dv   (G = 0 for s <= 0),

so the step of h at tau_d becomes a shift of a smooth function. G is integrated by Simpson's
rule on a fine grid (step dv; the AIF is evaluated there from its continuous model) at the
points of a coarse grid (step 2 dv), one matrix product ``conv @ R`` per evaluation (a GEMM
for all curves that share the AIF), then read at the real, non-uniform ``t_i - tau_d`` by a
Catmull-Rom cubic: continuous and smooth in tau_d, within 0.15 % of the peak of a 1 ms
brute-force convolution at the default dv = 0.2 s (0.05 % at 0.1 s; noise-free MBF error
median 0.07 %, p95 0.7 %: benchmarks/RESULTS.md).

Solver: Levenberg-Marquardt with a fixed iteration count from the best points of a start
grid, an analytic Jacobian (3 matrix columns), parameters mapped into their valid ranges by
softplus / sigmoid (see params_from_raw).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from perfjax.bolus import aif_on_grid, first_pass_window, fit_aif_gamma, foot_and_peak
from perfjax.conventions import PER_S_TO_ML_G_MIN
from perfjax.errors import InputError
from perfjax.least_squares import SOLVER_COMPILER_OPTIONS, lm_solve, softplus_inv

ML_G_MIN_PER_S = PER_S_TO_ML_G_MIN  # 1/s -> ml/g/min (myocardial density 1.05 g/ml)

# Reason codes of fit_fermi (``reason`` output); REASONS maps each code to its meaning.
(OK, NONFINITE, FLAT_AIF, NO_ENHANCEMENT, SHORT_WINDOW, NOT_CONVERGED, POOR_FIT,
 IMPLAUSIBLE, UNCERTAIN) = range(9)
REASONS = {
    OK: "ok",
    NONFINITE: "NaN/Inf in the AIF, curve or times",
    FLAT_AIF: "AIF shows no enhancement",
    NO_ENHANCEMENT: "curve shows no enhancement above its baseline noise (flat, zeros)",
    SHORT_WINDOW: "fewer than 6 frames in the fitting window",
    NOT_CONVERGED: "solver did not converge (cost and MBF still moving after the retry pass)",
    POOR_FIT: "fit explains too little of the curve (r2 < min_r2)",
    IMPLAUSIBLE: "MBF above max_mbf: not physiological (e.g. a curve corrupted by motion)",
    UNCERTAIN: "MBF standard error above max_rel_se of the MBF: the curve does not determine it",
}
MIN_WINDOW = 6

DV = 0.2  # s, fit_fermi's default step of the convolution integral (see the module docstring)
K_MIN = 0.05  # s, smallest Fermi k (k = K_MIN + softplus(raw)); below it h is a step on the grid.
N_PARAMS = 4  # raw parameters: F, w, k, tau_d (a fifth, the spill-over v, with `spill`)


def params_from_raw(raw, tau_max: float):
  """Raw R^4 -> (F_norm, w, k, tau_d), inside the valid ranges by construction.

  F_norm = softplus(raw0) >= 0 (F in normalised units), w = softplus(raw1) >= 0 s,
  k = K_MIN + softplus(raw2) > 0 s, tau_d = tau_max * sigmoid(raw3) in [0, tau_max] s.
  """
  f = jax.nn.softplus(raw[..., 0])
  w = jax.nn.softplus(raw[..., 1])
  k = K_MIN + jax.nn.softplus(raw[..., 2])
  tau = tau_max * jax.nn.sigmoid(raw[..., 3])
  return f, w, k, tau


def raw_from_params(f, w, k, tau, tau_max: float):
  """Inverse of params_from_raw (values are clipped into the open ranges first)."""
  f = jnp.maximum(f, 1e-6)
  w = jnp.maximum(w, 1e-4)
  k = jnp.maximum(k - K_MIN, 1e-4)
  p = jnp.clip(tau / tau_max, 0.02, 0.98)
  return jnp.stack([softplus_inv(f), softplus_inv(w), softplus_inv(k),
                    jnp.log(p) - jnp.log1p(-p)], axis=-1)


def spill_from_raw(raw):
  """The spill-over fraction v = softplus(raw[4]) >= 0 (normalised units, see model_norm)."""
  return jax.nn.softplus(raw[..., 4])


def simpson_conv_matrix(aif_v, n_coarse: int, ratio: int, dv: float):
  """A [Nc, Nv] such that (A @ R)[m] = int_0^{s_m} AIF(s_m - v) R(v) dv by Simpson's rule.

  aif_v [Nv]: the AIF at v_j = j * dv (j = 0..Nv-1); the coarse grid is s_m = (m - 2) * h with
  h = ratio * dv (ratio even, so every s_m > 0 spans an even number of fine steps); rows with
  s_m <= 0 are zero (no contrast has arrived). Works on numpy or jax arrays (jnp is used).
  """
  nv = aif_v.shape[-1]
  m = jnp.arange(n_coarse)[:, None]
  j = jnp.arange(nv)[None, :]
  n = (m - 2) * ratio  # number of fine steps in [0, s_m]
  q = n - j  # AIF index at s_m - v_j
  inside = (j <= n) & (n > 0)
  wts = jnp.where((j == 0) | (j == n), 1.0, jnp.where(j % 2 == 1, 4.0, 2.0)) * (dv / 3.0)
  vals = aif_v[..., jnp.clip(q, 0, nv - 1)]
  return jnp.where(inside, wts * vals, 0.0)


def _catmull_rom(g, s):
  """Value and d/ds of the Catmull-Rom cubic through g [Nc, ...] at grid positions s [T]."""
  nc = g.shape[0]
  m = jnp.clip(jnp.floor(s).astype(jnp.int32), 1, nc - 3)
  a = jnp.clip(s - m, 0.0, 1.0)
  g0, g1, g2, g3 = g[m - 1], g[m], g[m + 1], g[m + 2]
  if g.ndim > 1:
    a = a[:, None]
  c1 = 0.5 * (g2 - g0)
  c2 = 0.5 * (2.0 * g0 - 5.0 * g1 + 4.0 * g2 - g3)
  c3 = 0.5 * (3.0 * (g1 - g2) + g3 - g0)
  val = g1 + a * (c1 + a * (c2 + a * c3))
  der = c1 + a * (2.0 * c2 + 3.0 * a * c3)
  return val, der


def unit_response(w, k, tau, conv, t, dv: float, ratio: int):
  """G(t - tau) [T] for F = 1: the tissue curve of a unit-F Fermi response at the frame times.

  conv [Nc, Nv] from simpson_conv_matrix; G on the coarse grid is conv @ R, and G at the
  non-uniform t_i - tau is a Catmull-Rom cubic (C1, continuous and smooth in tau_d).
  """
  nv = conv.shape[1]
  h = ratio * dv
  v = jnp.arange(nv, dtype=conv.dtype) * dv
  r = jax.nn.sigmoid((w - v) / k)  # R(v) = h(v + tau_d) / F
  s = (t - tau) / h + 2.0  # position on the coarse grid
  val, _ = _catmull_rom(conv @ r, s)
  return jnp.where(s > 2.0, val, 0.0)


def model_norm(raw, conv, t, dv: float, ratio: int, tau_max: float, spill=None):
  """Normalised tissue curve [T] for raw parameters [4], or [5] with a spill-over curve.

  spill [T] (normalised): a curve that enters the tissue curve unconvolved, ``+ v * spill``:
  the blood signal a sector's partial-volume pixels carry (see fit_fermi).
  """
  f, w, k, tau = params_from_raw(raw, tau_max)
  out = f * unit_response(w, k, tau, conv, t, dv, ratio)
  return out if spill is None else out + spill_from_raw(raw) * spill


def model_and_jac(raw, conv, t, dv: float, ratio: int, tau_max: float, spill=None):
  """model_norm [T] and its Jacobian [T, 4] (or [T, 5] with spill) w.r.t. the raw parameters.

  One GEMM-friendly product conv @ [R, dR/dw, dR/dk] per evaluation (jax.jacfwd would carry
  five columns, two of them zero); d/dtau_d comes from the Catmull-Rom derivative.
  """
  nv = conv.shape[1]
  h = ratio * dv
  f, w, k, tau = params_from_raw(raw, tau_max)
  v = jnp.arange(nv, dtype=conv.dtype) * dv
  z = (w - v) / k
  r = jax.nn.sigmoid(z)
  dr = r * (1.0 - r)
  cols = jnp.stack([r, dr / k, -dr * z / k], axis=1)  # R, dR/dw, dR/dk  [Nv, 3]
  s = (t - tau) / h + 2.0
  val, der = _catmull_rom(conv @ cols, s)  # [T, 3]
  pos = (s > 2.0)[:, None]
  val = jnp.where(pos, val, 0.0)
  der = jnp.where(pos, der, 0.0)
  sig = jax.nn.sigmoid(raw)
  dtau = tau_max * sig[3] * (1.0 - sig[3])
  cols = [sig[0] * val[:, 0], f * sig[1] * val[:, 1], f * sig[2] * val[:, 2],
          -f * der[:, 0] * dtau / h]
  m = f * val[:, 0]
  if spill is not None:
    cols.append(sig[4] * spill)
    m = m + spill_from_raw(raw) * spill
  return m, jnp.stack(cols, axis=1)


def _residual_and_jac(raw, conv, t, c, wts, dv, ratio, tau_max, spill=None):
  m, jac = model_and_jac(raw, conv, t, dv, ratio, tau_max, spill)
  return wts * (m - c), wts[:, None] * jac


def _start_grid(tau_max: float):
  """Starting (w, k, tau_d) grid: covers slow/fast washout, sharp/smooth roll-off, delays."""
  ws = jnp.array([1.0, 3.0, 6.0])
  ks = jnp.array([0.3, 1.0])
  taus = jnp.array([0.05, 0.2, 0.4, 0.6]) * tau_max
  w, k, tau = jnp.meshgrid(ws, ks, taus, indexing="ij")
  return w.ravel(), k.ravel(), tau.ravel()


def _nonneg_pair(u, b, c):
  """Least squares of c ~ f u + v b with f, v >= 0 (u, b, c weighted [T] vectors)."""
  uu, bb, ub = u @ u, jnp.maximum(b @ b, 1e-12), u @ b
  uc, bc = u @ c, b @ c
  det = jnp.maximum(uu * bb - ub * ub, 1e-12 * uu * bb)
  f2, v2 = (bb * uc - ub * bc) / det, (uu * bc - ub * uc) / det
  f_only = jnp.maximum(uc / jnp.maximum(uu, 1e-12), 0.0)
  both = (f2 >= 0) & (v2 >= 0)
  f = jnp.where(both, f2, f_only)
  v = jnp.where(both, v2, 0.0)
  return f, v


def fit_one(conv, t, c, wts, x_init=None, spill=None, *, dv: float, ratio: int, tau_max: float,
            n_iter: int, n_starts: int):
  """Fit one normalised curve; returns a dict of scalars (raw params, cost, diagnostics).

  Starts: the best ``n_starts`` points of the (w, k, tau_d) grid (F, and the spill-over v when
  ``spill`` [T] is given, by non-negative linear least squares at each) and, when given,
  ``x_init`` (raw parameters, e.g. an earlier pass's solution); the solution is the start
  whose LM run ends lowest. ``n_starts`` = 0 with ``x_init``: that start alone, no grid.
  """
  x0s = None if x_init is None else x_init[None].astype(c.dtype)
  if n_starts > 0 or x_init is None:
    gw, gk, gt = _start_grid(tau_max)
    b = jnp.zeros_like(c) if spill is None else wts * spill

    def grid_cost(w, k, tau):
      u = wts * unit_response(w, k, tau, conv, t, dv, ratio)
      f, v = _nonneg_pair(u, b, wts * c)
      f = jnp.maximum(f, 1e-4)
      res = u * f + v * b - wts * c
      return 0.5 * res @ res, f, v

    costs, fs, vs = jax.vmap(grid_cost)(gw, gk, gt)
    costs = jnp.where(jnp.isfinite(costs), costs, jnp.inf)
    order = jnp.argsort(costs)[:max(n_starts, 1)]
    grid = raw_from_params(fs[order], gw[order], gk[order], gt[order], tau_max)
    if spill is not None:
      grid = jnp.concatenate([grid, softplus_inv(jnp.maximum(vs[order], 1e-3))[:, None]], axis=1)
    x0s = grid if x0s is None else jnp.concatenate([x0s, grid], axis=0)
  lin = functools.partial(_residual_and_jac, conv=conv, t=t, c=c, wts=wts, dv=dv, ratio=ratio,
                          tau_max=tau_max, spill=spill)
  xs, cs, chs, nits, xhs = jax.vmap(lambda x0: lm_solve(lin, x0, n_iter))(x0s)
  best = jnp.argmin(jnp.where(jnp.isfinite(cs), cs, jnp.inf))
  x, cost, cost_hist, nit, x_hist = xs[best], cs[best], chs[best], nits[best], xhs[best]
  r, jac = _residual_and_jac(x, conv, t, c, wts, dv, ratio, tau_max, spill)

  def mbf_norm(raw):
    f, w, k, _ = params_from_raw(raw, tau_max)
    return f * jax.nn.sigmoid(w / k)

  grad = jax.grad(mbf_norm)(x)
  n = jnp.sum(wts > 0)
  n_par = N_PARAMS if spill is None else N_PARAMS + jnp.any(spill != 0).astype(jnp.int32)
  s2 = (r @ r) / jnp.maximum(n - n_par, 1)
  # pseudo-inverse of J^T J after diagonal scaling (robust to parameters that a sigmoid/softplus
  # has pinned at a bound: their direction carries ~0 gradient and is cut off).
  jtj = jac.T @ jac
  d = jnp.sqrt(jnp.maximum(jnp.diag(jtj), 1e-30))
  evals, evecs = jnp.linalg.eigh(jtj / jnp.outer(d, d))
  inv = jnp.where(evals > 1e-6 * jnp.max(evals), 1.0 / evals, 0.0)
  cov = (evecs * inv) @ evecs.T / jnp.outer(d, d) * s2
  mbf_var = grad @ cov @ grad
  cw = wts * c
  mean_c = jnp.sum(cw) / jnp.maximum(n, 1)
  ss_tot = jnp.sum(wts * (c - mean_c) ** 2)
  return dict(raw=x, cost=cost, cost_hist=cost_hist, n_iter=nit,
              spill=jnp.zeros(()) if spill is None else spill_from_raw(x),
              mbf_norm=mbf_norm(x), mbf_norm_hist=mbf_norm(x_hist),
              mbf_se_norm=jnp.sqrt(jnp.maximum(mbf_var, 0.0)),
              r2=1.0 - (r @ r) / jnp.maximum(ss_tot, 1e-30),
              rmse_norm=jnp.sqrt((r @ r) / jnp.maximum(n, 1)))


@functools.partial(jax.jit, static_argnames=("n_coarse", "dv", "ratio", "tau_max", "n_iter",
                                             "n_starts"),
                   compiler_options=SOLVER_COMPILER_OPTIONS)
def fit_groups(aif_v, t_g, curves, wts, x_init=None, spill=None, *, n_coarse: int, dv: float,
               ratio: int, tau_max: float, n_iter: int, n_starts: int):
  """All curves in one jitted, vmapped solve, in groups that share an AIF.

  aif_v [G, Nv] normalised AIFs on the fine grid, t_g [G, T] frame times, curves [G, B, T]
  normalised, wts [G, B, T] window weights (0/1; padding curves are all 0), x_init None or
  [G, B, 4 or 5] raw warm starts (see :func:`fit_one`), spill None or [G, B, T] normalised
  spill-over curves (a fifth parameter). The per-group convolution matrix is shared by the B
  curves, so the model's matrix products are GEMMs.
  """
  def group(a, t, cs, ws, xi, sp):
    conv = simpson_conv_matrix(a, n_coarse, ratio, dv)
    return jax.vmap(lambda c, wt, x0, s: fit_one(conv, t, c, wt, x0, s, dv=dv, ratio=ratio,
                                                 tau_max=tau_max, n_iter=n_iter,
                                                 n_starts=n_starts),
                    in_axes=(0, 0, None if xi is None else 0, None if sp is None else 0))(
                        cs, ws, xi, sp)
  return jax.vmap(group, in_axes=(0, 0, 0, 0, None if x_init is None else 0,
                                  None if spill is None else 0))(
      aif_v, t_g, curves, wts, x_init, spill)


# ----------------------------------------------------------------------------- fitting
def _as_2d(x, n, t, name):
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    if x.shape[0] != t:
      raise InputError(name, f"expected {t} frames, got shape {x.shape}")
    return np.broadcast_to(x, (n, t))
  if x.shape != (n, t):
    raise InputError(name, f"expected shape [{t}] or [{n}, {t}], got {x.shape}")
  return x


def _window_2d(window, n, t):
  if window is None:
    return None
  if isinstance(window, tuple) and len(window) == 2:
    w = np.zeros(t, bool)
    w[int(window[0]):int(window[1])] = True
    return np.broadcast_to(w, (n, t))
  w = np.asarray(window)
  if w.dtype != bool:
    raise InputError("window", "must be None, (start, stop) or a bool mask [T] / [N, T]")
  return _as_2d(w, n, t, "window").astype(bool)


def _aif_groups(aifs, tms, leads, foot_frac, snr_min):
  """Unique (AIF, times, lead) rows and, per unique AIF, its checks, window and baseline
  length."""
  key = np.concatenate([aifs, tms, leads[:, None]], axis=1)
  key = np.where(np.isfinite(key), key, np.inf)  # NaN rows compare equal to each other
  _, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
  inv = inv.ravel()
  u_aif, u_t, u_lead = aifs[first], tms[first], leads[first]
  u_n, t = u_aif.shape
  reason = np.zeros(u_n, np.int32)
  win = np.zeros((u_n, t), bool)
  base = np.ones(u_n, np.int32)
  for u in range(u_n):
    a, tt = u_aif[u], u_t[u]
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(tt))) or np.any(np.diff(tt) <= 0):
      reason[u] = NONFINITE
      continue
    foot, peak, enh = foot_and_peak(a, foot_frac)
    b = max(foot, 1)
    noise = np.std(a[:b]) if b >= 3 else 0.0
    if enh[peak] <= 0 or enh[peak] <= snr_min * noise:
      reason[u] = FLAT_AIF
      continue
    base[u] = b
    win[u] = first_pass_window(a, foot_frac=foot_frac)
  return dict(inv=inv, aif=u_aif, t=u_t, lead=u_lead, reason=reason, window=win,
              n_baseline=base)


def _curve_checks(curves, win, n_base, reason, snr_min):
  """Reasons after the per-curve checks, and each curve's peak in its window."""
  t = curves.shape[1]
  finite = np.all(np.isfinite(np.where(win, curves, 0.0)), axis=1)
  reason = np.where((reason == 0) & ~finite, NONFINITE, reason)
  peak = np.max(np.where(win & np.isfinite(curves), curves, -np.inf), axis=1)
  base = np.where((np.arange(t)[None, :] < n_base[:, None]) & np.isfinite(curves), curves, np.nan)
  with _quiet():
    level = np.nan_to_num(np.nanmean(base, axis=1))
    sd = np.where(n_base >= 3, np.nan_to_num(np.nanstd(base, axis=1)), 0.0)
  no_enh = ~(peak - level > snr_min * sd) | ~(peak > 0)
  reason = np.where((reason == 0) & no_enh, NO_ENHANCEMENT, reason)
  reason = np.where((reason == 0) & (win.sum(1) < MIN_WINDOW), SHORT_WINDOW, reason)
  return reason.astype(np.int32), peak


def _aifs_on_grid(g, v, origin, aif_model, foot_frac):
  """Normalised (peak 1) AIFs of the valid groups at origin + v (v >= 0), and their peaks.

  A group's AIF samples belong to its times minus its lead (`fit_fermi`'s aif_lead)."""
  u_n = len(g["aif"])
  t_aif = g["t"] - g["lead"][:, None]
  ok = g["reason"] == 0
  scale = np.ones(u_n)
  out = np.zeros((u_n, v.size))
  gq = {}
  if aif_model == "gamma" and ok.any():
    idx = np.nonzero(ok)[0]
    q, q_ok = fit_aif_gamma(g["aif"][idx], t_aif[idx], foot_frac=foot_frac)
    gq = {int(i): q[j] for j, i in enumerate(idx) if q_ok[j]}
  for u in np.nonzero(ok)[0]:
    scale[u] = np.max(g["aif"][u])
    if aif_model == "gamma":
      model = "gamma" if int(u) in gq else "cubic"
      av = aif_on_grid(g["aif"][u], t_aif[u], origin[u] + v, model, gamma_params=gq.get(int(u)))
    else:
      av = aif_on_grid(g["aif"][u], t_aif[u], origin[u] + v, aif_model)
    out[u] = av / scale[u]
  return out, scale


def _pack(inv, values, fill):
  """values [N, ...] -> [U, B, ...] by group (padding = fill) and each curve's slot."""
  u_n = int(inv.max()) + 1
  counts = np.bincount(inv, minlength=u_n)
  slot = np.zeros(len(inv), np.int64)
  order = np.argsort(inv, kind="stable")
  slot[order] = np.arange(len(inv)) - np.repeat(np.cumsum(counts) - counts, counts)
  out = np.full((u_n, int(counts.max())) + values.shape[1:], fill, np.float32)
  out[inv, slot] = values
  return out, slot


def _blocks(groups, size: int):
  """Rows sorted by group -> (block, slot) of each row and each block's group: a group's rows
  fill blocks of ``size`` in order, a new block starts with each group."""
  m = groups.size
  first = np.r_[True, groups[1:] != groups[:-1]]
  pos = np.arange(m) - np.maximum.accumulate(np.where(first, np.arange(m), 0))
  starts = first | (pos % size == 0)
  return np.cumsum(starts) - 1, pos % size, groups[starts]


def fit_fermi(aif, curves, times, window=None, *, aif_model: str = "gamma", dv: float = DV,
              tau_max: float = 4.0, n_iter: int = 30, n_starts: int = 1,
              min_r2: float = 0.5, snr_min: float = 3.0, foot_frac: float = 0.1,
              max_mbf: float = 10.0, max_rel_se: float = 0.5, retry_iter: int = 3,
              aif_lead=0.0, spill=None) -> dict:
  """Fermi-constrained deconvolution of many tissue curves in one jitted, vmapped solve.

  Args:
    aif: [T] or [N, T] baseline-subtracted AIF (concentration or signal enhancement).
    curves: [N, T] baseline-subtracted tissue curves, same units as the AIF.
    times: [T] or [N, T] frame times (s), strictly increasing (non-uniform allowed).
    window: None (first pass of each AIF, :func:`first_pass_window`), (start, stop), or a
      bool mask [T] / [N, T] of the frames to fit.
    aif_model: AIF between frames, see :func:`aif_on_grid`.
    dv: fine step (s) of the convolution integral (Simpson's rule); G(s) is kept on a
      2 * dv grid and read at t - tau_d by a Catmull-Rom cubic. The solve's cost grows about
      as 1 / dv (its matrix products as 1 / dv^2); 0.1 s gives the same thirty-seed MBF
      figures (benchmarks/RESULTS.md, issue 13).
    tau_max: upper bound of the fitted delay tau_d (s).
    n_iter, n_starts: Levenberg-Marquardt iterations per start; the starts are the best
      n_starts points of a 24-point (w, k, tau_d) grid, F by linear least squares at each
      (1 start: same accuracy on the phantom as 2, 1.8x faster; see bench_fermi results).
    min_r2: fits with a lower coefficient of determination fail with POOR_FIT.
    snr_min: a curve whose peak in the window is below snr_min x the std of its baseline
      frames (or <= 0) fails with NO_ENHANCEMENT; same for the AIF (FLAT_AIF).
    max_mbf: fits above this MBF (ml/g/min; hyperaemic MBF rarely exceeds 6) fail with
      IMPLAUSIBLE rather than dominate a slice mean.
    max_rel_se: fits whose MBF standard error (``mbf_se``) exceeds this fraction of the MBF
      fail with UNCERTAIN: small, noisy sectors (a few pixels of a thin wall at low
      contrast) give MBF errors skewed upwards, by +24-45 % in the median once the standard
      error passes 40 % (benchmarks/RESULTS.md, issue 13), which a slice mean would carry.
      None turns the rule off.
    retry_iter: curves that have not converged after ``n_iter`` iterations (see the rule at
      ``COST_RTOL``; typically a slow crawl of w towards 0 or along the w-k valley) are
      fitted again from where they stopped, with ``retry_iter * n_iter`` iterations, in
      blocks of ``RETRY_BLOCK`` curves that share an AIF (as the first pass, one convolution
      matrix a block); the lower cost wins (a second start from the grid, tried, changed 4 of
      17280 curves by more than 0.1 %: benchmarks/RESULTS.md). Only curves that still move
      after that are NOT_CONVERGED (0 turns the second pass off).
    aif_lead: scalar or [N] (s): the AIF was sampled this much earlier in each beat than the
      curve (an AIF from a separate acquisition, e.g. a dual-sequence AIF series read out
      before the slices); its samples are placed at ``times - aif_lead``. The fitted delay
      tau_d >= 0 then absorbs ``aif_lead`` minus the true offset, so a lead at least as long
      as the true offset keeps a tissue curve that seems to lead its AIF fittable.
    spill: None or [N, T] baseline-subtracted curves that reach each tissue curve without
      passing through the tissue: the model becomes ``AIF (x) h + v * spill`` with v >= 0
      fitted (a fifth parameter). Given the slice's own LV blood curve, v is the blood signal
      of a sector's partial-volume pixels (endocardial pixels of a thin wall, blurred by a
      low acquired resolution), which the Fermi response would otherwise read as flow. Each
      curve is fitted with and without the term, and keeps the term only where it lowers the
      Bayesian information criterion (``spill_used``): the term trades off against the
      Fermi shape, so on a curve it does not explain it only adds variance. Rows that are
      NaN or never rise above 0 in the window are fitted without it.

  Returns:
    dict of numpy arrays, one value per curve: ``mbf`` (ml/g/min, NaN unless ok), ``ok``,
    ``reason`` (int, see ``REASONS``), ``F`` (1/s), ``w``, ``k``, ``tau_d`` (s), ``mbf_se``
    (ml/g/min, standard error by the delta method: gradient of MBF times
    s^2 (J^T J)^+ with s^2 = RSS / (n - p), J the Jacobian at the solution, p the number of
    parameters), ``spill`` (v in curve units per spill unit; 0 where the term was not kept,
    NaN without ``spill``), ``spill_used`` (bool), ``r2``,
    ``rmse`` (curve units), ``window`` [N, T], ``reasons`` (the code table), ``n_retried``
    (curves that needed the second pass) and ``timing``
    (total_s, solve_s: wall time of the whole call and of the jitted solve, compile included
    on a first call with new shapes).
    Never raises for bad curves in the batch; only malformed shapes raise InputError.
  """
  t_start = time.perf_counter()
  curves = np.asarray(curves, np.float64)
  if curves.ndim != 2 or curves.shape[0] == 0:
    raise InputError("curves", f"expected [N, T] with N >= 1, got shape {curves.shape}")
  n, t = curves.shape
  aifs = _as_2d(aif, n, t, "aif")
  tms = _as_2d(times, n, t, "times")
  if aif_model not in ("linear", "cubic", "gamma"):
    raise InputError("aif_model", f"must be 'linear', 'cubic' or 'gamma', got {aif_model!r}")
  win_user = _window_2d(window, n, t)

  # Curves that share (AIF, times) form a group with one convolution matrix (GEMMs).
  leads = np.asarray(aif_lead, np.float64)
  leads = np.full(n, float(leads)) if leads.ndim == 0 else leads
  if leads.shape != (n,) or not np.all(np.isfinite(leads)):
    raise InputError("aif_lead", f"expected finite seconds, a scalar or [{n}]; got shape "
                     f"{leads.shape}")
  g = _aif_groups(aifs, tms, leads, foot_frac, snr_min)
  inv = g["inv"]
  win = g["window"][inv] if win_user is None else win_user
  reason, peak_c = _curve_checks(curves, win, g["n_baseline"][inv], g["reason"][inv], snr_min)

  # The continuous AIFs on the fine grid. Each group's clock starts at its earliest fitted
  # frame (the AIF is at baseline, ~0, before it), so the grid spans the fitted frames only.
  ratio = 2
  h = ratio * dv
  t_first = np.where(win, tms, np.inf).min(axis=1)
  origin = np.full(len(g["aif"]), np.inf)
  np.minimum.at(origin, inv, np.where(np.isfinite(t_first), t_first, np.inf))
  origin = np.where(np.isfinite(origin), origin, 0.0)
  span = np.where(win, tms - origin[inv][:, None], 0.0)
  t_end = max(float(np.max(span)), h)
  n_coarse = int(np.ceil(t_end / h)) + 5
  v = np.arange((n_coarse - 3) * ratio + 1) * dv
  aif_v, a_scale = _aifs_on_grid(g, v, origin, aif_model, foot_frac)

  good = reason == 0
  c_scale = np.where(good, peak_c, 1.0)
  fitted = good[:, None] & win
  c_norm = np.where(fitted, curves / c_scale[:, None], 0.0)
  g_t = np.where(np.isfinite(g["t"]), g["t"] - origin[:, None], 0.0)
  # With spill, every curve is fitted twice in ONE batched solve: rows [0, n) with an all-zero
  # spill curve (v stays inert: the Fermi model), rows [n, 2n) with the spill curve.
  sp_scale, sp_norm, usable = np.ones(n), None, np.zeros(n, bool)
  if spill is not None:
    sp = _as_2d(spill, n, t, "spill")
    with _quiet():
      sp_peak = np.nanmax(np.where(win, sp, np.nan), axis=1)
    usable = np.isfinite(sp_peak) & (sp_peak > 0) & np.all(np.isfinite(sp) | ~win, axis=1)
    sp_scale = np.where(usable, sp_peak, 1.0)
    sp_norm = np.where(usable[:, None] & fitted, np.nan_to_num(sp) / sp_scale[:, None], 0.0)
  copies = 1 if spill is None else 2
  rows = np.tile(np.arange(n), copies)  # the curve of each solved row
  r_inv = inv[rows]
  r_spill = None if spill is None else np.concatenate([np.zeros((n, t)), sp_norm])
  g_curves, slot = _pack(r_inv, c_norm[rows], 0.0)
  g_wts, _ = _pack(r_inv, fitted[rows].astype(np.float32), 0.0)
  t_solve = time.perf_counter()
  out = fit_groups(jnp.asarray(aif_v, jnp.float32), jnp.asarray(g_t, jnp.float32),
                   jnp.asarray(g_curves), jnp.asarray(g_wts), None,
                   None if r_spill is None else jnp.asarray(_pack(r_inv, r_spill, 0.0)[0]),
                   n_coarse=n_coarse, dv=dv, ratio=ratio, tau_max=float(tau_max),
                   n_iter=int(n_iter), n_starts=int(n_starts))
  out = {k: np.array(x)[r_inv, slot] for k, x in jax.block_until_ready(out).items()}
  converged = _converged(out, win[rows])
  retry = np.nonzero((reason[rows] == 0) & ~converged)[0]
  n_retried = int(np.unique(rows[retry]).size)
  if retry.size and retry_iter > 0:
    # Second pass for the curves still moving: from where the first pass stopped, with
    # retry_iter x the iterations; in blocks of RETRY_BLOCK rows that share a group's AIF (one
    # convolution matrix and GEMMs a block, as in the first pass).
    retry = retry[np.argsort(r_inv[retry], kind="stable")]
    block, slot, block_group = _blocks(r_inv[retry], RETRY_BLOCK)
    n_blocks = max(8, 1 << int(np.ceil(np.log2(block_group.size))))  # few shapes, compiles
    block_group = np.concatenate([block_group,
                                  np.full(n_blocks - block_group.size, block_group[0])])

    def blocked(values, fill=0.0):
      packed = np.full((n_blocks, RETRY_BLOCK) + values.shape[1:], fill, np.float32)
      packed[block, slot] = values
      return jnp.asarray(packed)

    r_out = fit_groups(jnp.asarray(aif_v[block_group], jnp.float32),
                       jnp.asarray(g_t[block_group], jnp.float32),
                       blocked(np.where(fitted[rows[retry]], c_norm[rows[retry]], 0.0)),
                       blocked(fitted[rows[retry]]),
                       blocked(out["raw"][retry]),
                       None if r_spill is None else blocked(r_spill[retry]),
                       n_coarse=n_coarse, dv=dv, ratio=ratio, tau_max=float(tau_max),
                       n_iter=int(retry_iter) * int(n_iter), n_starts=0)
    r_out = {k: np.array(x)[block, slot] for k, x in jax.block_until_ready(r_out).items()}
    better = np.isfinite(r_out["cost"]) & ~(r_out["cost"] > out["cost"][retry])
    for k in out:
      out[k][retry[better]] = r_out[k][better]
    converged[retry[better]] = _converged(r_out, win[rows[retry]])[better]

  spill_used = np.zeros(n, bool)
  if spill is not None:
    # The model with the spill-over term where it explains the curve better than its extra
    # parameter costs (Bayesian information criterion, per curve); elsewhere the Fermi model.
    out_s = {k: x[n:] for k, x in out.items()}
    out = {k: x[:n] for k, x in out.items()}
    conv_s, converged = converged[n:], converged[:n]
    n_fit = np.maximum(fitted.sum(axis=1), 1)
    floor = n_fit * SPILL_RSS_FLOOR
    with np.errstate(invalid="ignore", divide="ignore"):
      bic_gain = (n_fit * np.log((2.0 * out_s["cost"] + floor) / (2.0 * out["cost"] + floor))
                  + np.log(n_fit))
    spill_used = usable & (reason == 0) & conv_s & (bic_gain < 0)
    out["spill"] = np.zeros(n, np.float32)
    for k in out:
      out[k][spill_used] = out_s[k][spill_used]
    converged = np.where(spill_used, conv_s, converged)
  t_solve = time.perf_counter() - t_solve

  f_n, w, k, tau = (np.asarray(p, np.float64) for p in params_from_raw(out["raw"], tau_max))
  unit = c_scale / a_scale[inv]  # normalised F -> F in 1/s (curve units / AIF units)
  big_f = f_n * unit
  mbf = big_f / (1.0 + np.exp(-w / k)) * ML_G_MIN_PER_S
  mbf_se = out["mbf_se_norm"].astype(np.float64) * unit * ML_G_MIN_PER_S
  r2 = out["r2"].astype(np.float64)
  reason = np.where((reason == 0) & ~(converged & np.isfinite(mbf)), NOT_CONVERGED, reason)
  reason = np.where((reason == 0) & ~(r2 >= min_r2), POOR_FIT, reason)
  reason = np.where((reason == 0) & ~(mbf <= max_mbf), IMPLAUSIBLE, reason)
  if max_rel_se is not None:
    reason = np.where((reason == 0) & ~(mbf_se <= max_rel_se * mbf), UNCERTAIN, reason)
  ok = reason == 0
  pick = lambda x: np.where(ok, x, np.nan)  # noqa: E731
  v = out["spill"].astype(np.float64) * c_scale / sp_scale if spill is not None else np.nan
  return dict(mbf=pick(mbf), ok=ok, reason=reason.astype(np.int32), F=pick(big_f), w=pick(w),
              k=pick(k), tau_d=pick(tau), mbf_se=pick(mbf_se), r2=pick(r2),
              spill=pick(np.broadcast_to(v, (n,))), spill_used=spill_used & ok,
              rmse=pick(out["rmse_norm"] * c_scale), window=win, reasons=dict(REASONS),
              n_retried=n_retried,
              timing=dict(total_s=time.perf_counter() - t_start, solve_s=t_solve))


RETRY_BLOCK = 8  # rows of one group per block of the retry pass
SPILL_RSS_FLOOR = 1e-6  # per fitted frame (normalised units): keeps noise-free fits' ratio finite

# Convergence rule (judged over the last 5 LM iterations of a curve's best start):
COST_RTOL = 1e-3  # the cost fell by at most 0.1 % (plus a float32 floor per fitted frame), or
MBF_RTOL = 1e-3   # the MBF moved by at most 0.1 % while the cost fell by at most COST_RTOL_SLOW:
COST_RTOL_SLOW = 1e-2  # a crawl along a bound (w -> 0, k or tau_d at an edge) that no longer
# changes the answer.


def _converged(out, win) -> np.ndarray:
  """bool [N]: the convergence rule above, on fit_groups outputs (numpy, per curve)."""
  cost = out["cost"].astype(np.float64)
  fall = out["cost_hist"].astype(np.float64) - cost
  floor = 1e-9 * np.asarray(win).sum(1)
  m, m_hist = out["mbf_norm"].astype(np.float64), out["mbf_norm_hist"].astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    moved = np.abs(m - m_hist) / np.abs(m)
  return np.isfinite(cost) & ((fall <= COST_RTOL * cost + floor)
                              | ((moved <= MBF_RTOL) & (fall <= COST_RTOL_SLOW * cost + floor)))


class _quiet:
  """Silence numpy's 'mean of empty slice' warnings inside a block."""

  def __enter__(self):
    import warnings
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *exc):
    self._w.__exit__(*exc)
