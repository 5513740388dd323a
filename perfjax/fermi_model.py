"""The Fermi model and its batched solve, in normalised units (the core of `perfjax.fermi`).

One curve at a time in *normalised* units (AIF divided by its peak, curve divided by its peak,
times in seconds from the group's origin), batched with ``jax.vmap`` over the curves that share
an AIF and over the groups (`fit_groups`); `perfjax.fermi.fit_fermi` handles units, grouping,
windows, the retry pass and failure codes.

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

import jax
import jax.numpy as jnp

from perfjax.least_squares import SOLVER_COMPILER_OPTIONS, lm_solve, softplus_inv

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
