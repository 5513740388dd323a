"""The bolus in time: the pre-contrast baseline, the first pass, and the AIF between frames.

`baseline_frames` and `first_pass_window` turn an AIF's frames into the rules the Fermi fit
and the curve extraction use (which frames are pre-contrast, which are fitted);
`aif_on_grid` evaluates the AIF between its frames from a gamma variate fitted to the first
pass (`fit_aif_gamma`, one vmapped solve for many AIFs) plus a cubic spline of the residuals.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.interpolate import CubicSpline

from perfjax.errors import InputError
from perfjax.least_squares import SOLVER_COMPILER_OPTIONS, lm_solve, softplus_inv


def _smooth3(x: np.ndarray) -> np.ndarray:
  """3-frame moving average (edges use the available neighbours)."""
  pad = np.concatenate([x[:1], x, x[-1:]])
  return (pad[:-2] + pad[1:-1] + pad[2:]) / 3.0


def foot_and_peak(aif: np.ndarray, foot_frac: float) -> tuple[int, int, np.ndarray]:
  """(foot, peak, enhancement) of an AIF: see :func:`baseline_frames`."""
  enh = aif - np.median(aif[:3])
  peak = int(np.argmax(enh))
  below = np.nonzero(enh[:peak + 1] <= foot_frac * enh[peak])[0]
  foot = int(below[-1]) if below.size else 0
  return foot, peak, enh


def baseline_frames(aif, foot_frac: float = 0.1) -> int:
  """Number of pre-contrast frames ``b``: frames ``[0, b)`` are the baseline.

  Rule: enhancement ``e = aif - median(aif[:3])``; the peak is ``argmax(e)``; the foot is
  the last frame before the peak with ``e <= foot_frac * e[peak]`` (contrast arrives after
  it). The baseline is every frame before the foot, at least frame 0: ``b = max(foot, 1)``
  (the foot frame itself may already hold the first few percent of the bolus).
  """
  aif = check_curve(aif, "aif")
  foot, _, _ = foot_and_peak(aif, foot_frac)
  return max(foot, 1)


def first_pass_window(aif, foot_frac: float = 0.1, pre_frames: int = 2,
                      trough_frac: float = 0.5) -> np.ndarray:
  """bool [T]: the frames fitted by the Fermi model (the first pass).

  Rule (``aif`` baseline-subtracted or not):
  * start: ``pre_frames`` frames before the foot of the bolus (:func:`baseline_frames`), so
    the fit sees the flat pre-contrast level that pins the delay tau_d;
  * end: the end of the AIF's first pass, i.e. the first local minimum after the peak of the
    3-frame moving average of the AIF once it has fallen below ``trough_frac`` of the peak
    enhancement (the trough before recirculation rises; later frames are dominated by
    recirculation, which the Fermi model describes poorly in real tissue); the last frame
    when the AIF never turns up again.
  """
  aif = check_curve(aif, "aif")
  foot, peak, enh = foot_and_peak(aif, foot_frac)
  sm = _smooth3(enh)
  end = aif.size - 1
  for i in range(peak + 1, aif.size - 1):
    if sm[i] < trough_frac * enh[peak] and sm[i] <= sm[i + 1]:
      end = i
      break
  win = np.zeros(aif.size, bool)
  win[max(foot - pre_frames, 0):end + 1] = True
  return win


def check_curve(x, name):
  """`x` as a float64 1-D curve of >= 4 finite frames; InputError(name, ...) otherwise."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1 or x.size < 4:
    raise InputError(name, f"expected a 1-D curve of >= 4 frames, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise InputError(name, "contains NaN or Inf")
  return x


# ----------------------------------------------------------------------------- AIF model
def _gamma_jnp(t, q):
  """Gamma variate in (t0, tp, alpha, amp): amp at tp, 0 before t0."""
  t0, tp, alpha, amp = q[0], q[1], q[2], q[3]
  x = jnp.maximum((t - t0) / (tp - t0), 1e-12)
  return jnp.where(t > t0, amp * jnp.exp(alpha * (jnp.log(x) + 1.0 - x)), 0.0)


def _gamma_from_raw(raw, t_peak):
  t0 = t_peak - jax.nn.softplus(raw[0])
  tp = t0 + 0.05 + jax.nn.softplus(raw[1])
  alpha = 1.0 + jax.nn.softplus(raw[2])
  amp = jax.nn.softplus(raw[3])
  return jnp.stack([t0, tp, alpha, amp])


@functools.partial(jax.jit, static_argnames=("n_iter",),
                   compiler_options=SOLVER_COMPILER_OPTIONS)
def _fit_gamma_batch(aif_n, t, wts, t_peak, t_foot, n_iter: int = 40):
  """Gamma variates for a batch of normalised AIFs [U, T] (peak 1) in one vmapped LM solve."""
  def one(a, tt, wt, tpk, tft):
    def fun(raw):
      return wt * (_gamma_jnp(tt, _gamma_from_raw(raw, tpk)) - a)

    def lin(raw):
      jac, r = jax.jacfwd(lambda y: (fun(y), fun(y)), has_aux=True)(raw)
      return r, jac

    starts = []
    for alpha in (1.5, 3.0, 6.0):
      d0 = jnp.maximum(tpk - tft, 0.3)
      starts.append(jnp.stack([softplus_inv(d0),
                               softplus_inv(jnp.maximum(d0 - 0.05, 0.05)),
                               softplus_inv(alpha - 1.0), softplus_inv(1.0)]))
    x0s = jnp.stack(starts)
    xs, cs, _, _, _ = jax.vmap(lambda x0: lm_solve(lin, x0, n_iter))(x0s)
    best = jnp.argmin(cs)
    return _gamma_from_raw(xs[best], tpk), cs[best]
  return jax.vmap(one)(aif_n, t, wts, t_peak, t_foot)


def fit_aif_gamma(aif, times, foot_frac: float = 0.1, end_frac: float = 0.3,
                  tol: float = 0.01):
  """Fit gamma variates to AIFs [U, T] (baseline-subtracted) at times [U, T].

  Fitted frames: from the start up to the first frame after the peak where the AIF has
  fallen below ``end_frac`` of its peak (recirculation is still small there).
  Returns (params [U, 4] = (t0, t_peak, alpha, amplitude) in the AIF's units, ok [U]):
  ok where the fit is finite and its RMS residual over the fitted frames is at most ``tol``
  of the AIF's peak (a bolus that is not gamma-shaped is better served by a plain spline).
  """
  aif = np.atleast_2d(np.asarray(aif, np.float64))
  times = np.broadcast_to(np.asarray(times, np.float64), aif.shape)
  peak_val = np.max(aif, axis=1)
  scale = np.where(peak_val > 0, peak_val, 1.0)
  aif_n = aif / scale[:, None]
  wts = np.zeros_like(aif_n)
  t_peak = np.zeros(len(aif))
  t_foot = np.zeros(len(aif))
  for u, a in enumerate(aif_n):
    foot, peak, _ = foot_and_peak(a, foot_frac)
    after = np.nonzero(a[peak:] < end_frac)[0]
    end = peak + int(after[0]) if after.size else a.size - 1
    wts[u, :end + 1] = 1.0
    t_peak[u], t_foot[u] = times[u, peak], times[u, foot]
  q, cost = _fit_gamma_batch(jnp.asarray(aif_n, jnp.float32), jnp.asarray(times, jnp.float32),
                             jnp.asarray(wts, jnp.float32), jnp.asarray(t_peak, jnp.float32),
                             jnp.asarray(t_foot, jnp.float32))
  q = np.asarray(q, np.float64)
  q[:, 3] *= scale
  rel_rms = np.sqrt(2.0 * np.asarray(cost, np.float64) / np.maximum(wts.sum(1), 1.0))
  ok = np.isfinite(q).all(1) & (rel_rms <= tol) & (peak_val > 0)
  return q, ok


def _gamma_np(t, q):
  t0, tp, alpha, amp = q
  x = np.maximum((t - t0) / (tp - t0), 1e-12)
  return np.where(t > t0, amp * np.exp(alpha * (np.log(x) + 1.0 - x)), 0.0)


def aif_on_grid(aif, times, v, model: str = "gamma", gamma_params=None) -> np.ndarray:
  """Continuous AIF evaluated at times ``v`` (s, within [0, times[-1]]), from frame samples.

  model: "linear" (interpolation), "cubic" (not-a-knot cubic spline) or "gamma" (fitted
  gamma variate + cubic spline of the residuals; passes through every sample; falls back to
  "cubic" when the gamma variate fits the first pass worse than 1 % RMS of the peak, see
  :func:`fit_aif_gamma`). Values before 0 are 0 and after the last frame hold the last sample.
  """
  aif = np.asarray(aif, np.float64)
  times = np.asarray(times, np.float64)
  v = np.asarray(v, np.float64)
  vc = np.clip(v, times[0], times[-1])
  if model == "linear":
    out = np.interp(vc, times, aif)
  elif model == "cubic":
    out = CubicSpline(times, aif)(vc)
  elif model == "gamma":
    if gamma_params is None:
      gamma_params, ok = fit_aif_gamma(aif[None], times[None])
      gamma_params = gamma_params[0] if ok[0] else None
    if gamma_params is None:
      out = CubicSpline(times, aif)(vc)
    else:
      res = aif - _gamma_np(times, gamma_params)
      out = _gamma_np(vc, gamma_params) + CubicSpline(times, res)(vc)
  else:
    raise InputError("aif_model", f"must be 'linear', 'cubic' or 'gamma', got {model!r}")
  return np.where(v < 0, 0.0, out)
