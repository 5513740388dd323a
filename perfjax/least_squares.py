"""Levenberg-Marquardt for small, vmapped least-squares problems (the Fermi and AIF fits).

`lm_solve` runs a fixed number of damped Gauss-Newton steps, so a batch of fits is one
`jax.vmap` under one `jax.jit`; `softplus_inv` maps bounded starting values to the solvers' raw,
unconstrained parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from perfjax import platform

# The solvers are compiled with XLA:CPU's YNN dot and reduce fusions (the numbers of
# benchmarks/RESULTS.md); not eltwise, which rejects a layout of this solver ("Instruction with
# unsupported layout in YNN fusion"). CPU compilers only read the option.
SOLVER_COMPILER_OPTIONS = platform.cpu_fusion_options("dot", "reduce")


def softplus_inv(x):
  """Inverse of softplus for x > 0 (stable for large x)."""
  x = jnp.asarray(x)
  return jnp.where(x > 20.0, x, jnp.log(jnp.expm1(jnp.minimum(x, 20.0))))


def spd_solve(a, b):
  """x with a @ x = b for a small symmetric positive-definite a [P, P] (P static): Cholesky
  unrolled into elementwise operations, which vmap turns into vector code across the batch
  instead of one LAPACK call per tiny matrix (benchmarks/RESULTS.md, issue 13)."""
  p = a.shape[-1]
  low = [[None] * p for _ in range(p)]
  for i in range(p):
    for j in range(i + 1):
      acc = a[i, j] - sum(low[i][m] * low[j][m] for m in range(j))
      low[i][j] = jnp.sqrt(jnp.maximum(acc, 1e-30)) if i == j else acc / low[j][j]
  y = []
  for i in range(p):
    y.append((b[i] - sum(low[i][m] * y[m] for m in range(i))) / low[i][i])
  x = [None] * p
  for i in reversed(range(p)):
    x[i] = (y[i] - sum(low[m][i] * x[m] for m in range(i + 1, p))) / low[i][i]
  return jnp.stack(x)


def lm_solve(lin, x0, n_iter: int, lam0: float = 1e-2):
  """Levenberg-Marquardt with a fixed number of iterations (vmappable, jittable).

  lin: x [P] -> (residual [M], Jacobian [M, P]). Marquardt scaling (lambda * diag(J^T J))
  plus a tiny absolute damping; a step is kept only when it lowers the cost, so the cost never
  rises and non-finite trial points are rejected. Returns (x, cost, cost_before_last_5,
  n_accepted, x_before_last_5): the history lets the caller judge convergence.
  """
  r0, j0 = lin(x0)
  cost0 = jnp.where(jnp.all(jnp.isfinite(r0)), 0.5 * r0 @ r0, jnp.inf)
  eye = jnp.eye(x0.shape[0], dtype=x0.dtype)
  i_hist = max(n_iter - 6, 0)

  def body(i, state):
    x, r, jac, cost, lam, cost_hist, x_hist, n_acc = state
    jtj = jac.T @ jac
    g = jac.T @ r
    a = jtj + lam * jnp.diag(jnp.diag(jtj)) + 1e-9 * eye
    step = -spd_solve(a, g)
    x_new = x + step
    r_new, j_new = lin(x_new)
    cost_new = 0.5 * r_new @ r_new
    ok = jnp.isfinite(cost_new) & (cost_new < cost) & jnp.all(jnp.isfinite(j_new))
    x = jnp.where(ok, x_new, x)
    r = jnp.where(ok, r_new, r)
    jac = jnp.where(ok, j_new, jac)
    cost = jnp.where(ok, cost_new, cost)
    lam = jnp.clip(jnp.where(ok, lam * 0.3, lam * 4.0), 1e-9, 1e9)
    cost_hist = jnp.where(i == i_hist, cost, cost_hist)
    x_hist = jnp.where(i == i_hist, x, x_hist)
    return x, r, jac, cost, lam, cost_hist, x_hist, n_acc + ok.astype(jnp.int32)

  state = (x0, r0, j0, cost0, jnp.asarray(lam0, x0.dtype), cost0, x0, jnp.int32(0))
  x, r, jac, cost, lam, cost_hist, x_hist, n_acc = jax.lax.fori_loop(0, n_iter, body, state)
  return x, cost, cost_hist, n_acc, x_hist
