"""Myocardial blood flow by Fermi-constrained deconvolution, batched in JAX (paper II-D, III-C).

Pipeline for one slice (CONVENTIONS.md, "Perfusion"):

1. :func:`extract_curves`: the AIF is the mean signal of the eroded LV blood pool, tissue
   curves are the mean myocardium signal of each of the 48 sectors (24 angular x 2 radial);
   both are baseline-subtracted over the pre-contrast frames (:func:`baseline_frames`).
   Optionally (:func:`signal_to_concentration`) saturation-recovery signal is converted to
   contrast-agent concentration first, which removes the bias of a saturated blood signal.
2. :func:`fit_fermi`: tissue = AIF (x) h with the Fermi impulse response
   ``h(t) = F / (1 + exp((t - tau_d - w) / k))`` (t >= tau_d), fitted over the first pass
   (:func:`first_pass_window`) for all curves of a data set in one jitted, vmapped solve.
   MBF = ``F / (1 + exp(-w / k))`` 1/s, reported in ml/g/min (``* 60 / 1.05``).
3. :func:`slice_mbf` (mean of the 48 sectors) and :func:`aha16_mbf` (16-segment bullseye).

The AIF between frames. The peers found that a linearly interpolated AIF limits accuracy to
about 6 % (noise-free). The default ``aif_model="gamma"`` represents the AIF as a gamma
variate fitted to its first pass *plus* a cubic spline through the residuals at the frames:
it passes exactly through every sample, follows the physiological bolus shape between
them, and reduces to a plain cubic spline where the gamma variate fits poorly.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from perfjax import _fermi_core as core
from perfjax import sectors as sectors_lib
from perfjax.errors import InputError

ML_G_MIN_PER_S = 60.0 / 1.05  # 1/s -> ml/g/min (myocardial density 1.05 g/ml)

# Reason codes of fit_fermi (``reason`` output); REASONS maps each code to its meaning.
(OK, NONFINITE, FLAT_AIF, NO_ENHANCEMENT, SHORT_WINDOW, NOT_CONVERGED, POOR_FIT,
 IMPLAUSIBLE) = range(8)
REASONS = {
    OK: "ok",
    NONFINITE: "NaN/Inf in the AIF, curve or times",
    FLAT_AIF: "AIF shows no enhancement",
    NO_ENHANCEMENT: "curve shows no enhancement above its baseline noise (flat, zeros)",
    SHORT_WINDOW: "fewer than 6 frames in the fitting window",
    NOT_CONVERGED: "solver did not converge (cost still falling at the last iterations)",
    POOR_FIT: "fit explains too little of the curve (r2 < min_r2)",
    IMPLAUSIBLE: "MBF above max_mbf: not physiological (e.g. a curve corrupted by motion)",
}
MIN_WINDOW = 6


# ----------------------------------------------------------------------------- curve timing
def _smooth3(x: np.ndarray) -> np.ndarray:
  """3-frame moving average (edges use the available neighbours)."""
  pad = np.concatenate([x[:1], x, x[-1:]])
  return (pad[:-2] + pad[1:-1] + pad[2:]) / 3.0


def _foot_and_peak(aif: np.ndarray, foot_frac: float) -> tuple[int, int, np.ndarray]:
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
  aif = _check_1d(aif, "aif")
  foot, _, _ = _foot_and_peak(aif, foot_frac)
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
  aif = _check_1d(aif, "aif")
  foot, peak, enh = _foot_and_peak(aif, foot_frac)
  sm = _smooth3(enh)
  end = aif.size - 1
  for i in range(peak + 1, aif.size - 1):
    if sm[i] < trough_frac * enh[peak] and sm[i] <= sm[i + 1]:
      end = i
      break
  win = np.zeros(aif.size, bool)
  win[max(foot - pre_frames, 0):end + 1] = True
  return win


def _check_1d(x, name):
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
                   compiler_options=core.SOLVER_COMPILER_OPTIONS)
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
      starts.append(jnp.stack([core.softplus_inv(d0),
                               core.softplus_inv(jnp.maximum(d0 - 0.05, 0.05)),
                               core.softplus_inv(alpha - 1.0), core.softplus_inv(1.0)]))
    x0s = jnp.stack(starts)
    xs, cs, _, _ = jax.vmap(lambda x0: core.lm_solve(lin, x0, n_iter))(x0s)
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
    foot, peak, _ = _foot_and_peak(a, foot_frac)
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


def _aif_groups(aifs, tms, foot_frac, snr_min):
  """Unique (AIF, times) rows and, per unique AIF, its checks, window and baseline length."""
  key = np.concatenate([aifs, tms], axis=1)
  key = np.where(np.isfinite(key), key, np.inf)  # NaN rows compare equal to each other
  _, first, inv = np.unique(key, axis=0, return_index=True, return_inverse=True)
  inv = inv.ravel()
  u_aif, u_t = aifs[first], tms[first]
  u_n, t = u_aif.shape
  reason = np.zeros(u_n, np.int32)
  win = np.zeros((u_n, t), bool)
  base = np.ones(u_n, np.int32)
  for u in range(u_n):
    a, tt = u_aif[u], u_t[u]
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(tt))) or np.any(np.diff(tt) <= 0):
      reason[u] = NONFINITE
      continue
    foot, peak, enh = _foot_and_peak(a, foot_frac)
    b = max(foot, 1)
    noise = np.std(a[:b]) if b >= 3 else 0.0
    if enh[peak] <= 0 or enh[peak] <= snr_min * noise:
      reason[u] = FLAT_AIF
      continue
    base[u] = b
    win[u] = first_pass_window(a, foot_frac=foot_frac)
  return dict(inv=inv, aif=u_aif, t=u_t, reason=reason, window=win, n_baseline=base)


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
  """Normalised (peak 1) AIFs of the valid groups at origin + v (v >= 0), and their peaks."""
  u_n = len(g["aif"])
  ok = g["reason"] == 0
  scale = np.ones(u_n)
  out = np.zeros((u_n, v.size))
  gq = {}
  if aif_model == "gamma" and ok.any():
    idx = np.nonzero(ok)[0]
    q, q_ok = fit_aif_gamma(g["aif"][idx], g["t"][idx], foot_frac=foot_frac)
    gq = {int(i): q[j] for j, i in enumerate(idx) if q_ok[j]}
  for u in np.nonzero(ok)[0]:
    scale[u] = np.max(g["aif"][u])
    if aif_model == "gamma":
      model = "gamma" if int(u) in gq else "cubic"
      av = aif_on_grid(g["aif"][u], g["t"][u], origin[u] + v, model, gamma_params=gq.get(int(u)))
    else:
      av = aif_on_grid(g["aif"][u], g["t"][u], origin[u] + v, aif_model)
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


def fit_fermi(aif, curves, times, window=None, *, aif_model: str = "gamma", dv: float = 0.1,
              tau_max: float = 4.0, n_iter: int = 30, n_starts: int = 1, solver: str = "lm",
              min_r2: float = 0.5, snr_min: float = 3.0, foot_frac: float = 0.1,
              max_mbf: float = 10.0) -> dict:
  """Fermi-constrained deconvolution of many tissue curves in one jitted, vmapped solve.

  Args:
    aif: [T] or [N, T] baseline-subtracted AIF (concentration or signal enhancement).
    curves: [N, T] baseline-subtracted tissue curves, same units as the AIF.
    times: [T] or [N, T] frame times (s), strictly increasing (non-uniform allowed).
    window: None (first pass of each AIF, :func:`first_pass_window`), (start, stop), or a
      bool mask [T] / [N, T] of the frames to fit.
    aif_model: AIF between frames, see :func:`aif_on_grid`.
    dv: fine step (s) of the convolution integral (Simpson's rule); G(s) is kept on a
      2 * dv grid and read at t - tau_d by a Catmull-Rom cubic.
    tau_max: upper bound of the fitted delay tau_d (s).
    n_iter, n_starts: Levenberg-Marquardt iterations per start; the starts are the best
      n_starts points of a 24-point (w, k, tau_d) grid, F by linear least squares at each
      (1 start: same accuracy on the phantom as 2, 1.8x faster; see bench_fermi results).
    solver: "lm" (default) or "bfgs" (jax.scipy.optimize.minimize, for comparison).
    min_r2: fits with a lower coefficient of determination fail with POOR_FIT.
    snr_min: a curve whose peak in the window is below snr_min x the std of its baseline
      frames (or <= 0) fails with NO_ENHANCEMENT; same for the AIF (FLAT_AIF).
    max_mbf: fits above this MBF (ml/g/min; hyperaemic MBF rarely exceeds 6) fail with
      IMPLAUSIBLE rather than dominate a slice mean.

  Returns:
    dict of numpy arrays, one value per curve: ``mbf`` (ml/g/min, NaN unless ok), ``ok``,
    ``reason`` (int, see ``REASONS``), ``F`` (1/s), ``w``, ``k``, ``tau_d`` (s), ``mbf_se``
    (ml/g/min, standard error by the delta method: gradient of MBF times
    s^2 (J^T J)^+ with s^2 = RSS / (n - 4), J the Jacobian at the solution), ``r2``,
    ``rmse`` (curve units), ``window`` [N, T], ``reasons`` (the code table) and ``timing``
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
  if solver not in ("lm", "bfgs"):
    raise InputError("solver", f"must be 'lm' or 'bfgs', got {solver!r}")
  if aif_model not in ("linear", "cubic", "gamma"):
    raise InputError("aif_model", f"must be 'linear', 'cubic' or 'gamma', got {aif_model!r}")
  win_user = _window_2d(window, n, t)

  # Curves that share (AIF, times) form a group with one convolution matrix (GEMMs).
  g = _aif_groups(aifs, tms, foot_frac, snr_min)
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
  g_curves, slot = _pack(inv, np.where(fitted, curves / c_scale[:, None], 0.0), 0.0)
  g_wts, _ = _pack(inv, fitted.astype(np.float32), 0.0)
  g_t = np.where(np.isfinite(g["t"]), g["t"] - origin[:, None], 0.0)
  t_solve = time.perf_counter()
  out = core.fit_groups(jnp.asarray(aif_v, jnp.float32), jnp.asarray(g_t, jnp.float32),
                        jnp.asarray(g_curves), jnp.asarray(g_wts), n_coarse=n_coarse, dv=dv,
                        ratio=ratio, tau_max=float(tau_max), n_iter=int(n_iter),
                        n_starts=int(n_starts), solver=solver)
  out = jax.block_until_ready(out)
  t_solve = time.perf_counter() - t_solve
  out = jax.tree.map(lambda x: np.asarray(x)[inv, slot], out)

  f_n, w, k, tau = (np.asarray(p, np.float64) for p in core.params_from_raw(out["raw"], tau_max))
  unit = c_scale / a_scale[inv]  # normalised F -> F in 1/s (curve units / AIF units)
  big_f = f_n * unit
  mbf = big_f / (1.0 + np.exp(-w / k)) * ML_G_MIN_PER_S
  mbf_se = out["mbf_se_norm"].astype(np.float64) * unit * ML_G_MIN_PER_S
  r2 = out["r2"].astype(np.float64)
  cost, cost_hist = out["cost"].astype(np.float64), out["cost_hist"].astype(np.float64)
  # converged: the cost fell by at most 0.1 % (or a float32 floor) over the last 5 iterations
  converged = np.isfinite(cost) & ((cost_hist - cost) <= 1e-3 * cost + 1e-9 * win.sum(1))
  reason = np.where((reason == 0) & ~(converged & np.isfinite(mbf)), NOT_CONVERGED, reason)
  reason = np.where((reason == 0) & ~(r2 >= min_r2), POOR_FIT, reason)
  reason = np.where((reason == 0) & ~(mbf <= max_mbf), IMPLAUSIBLE, reason)
  ok = reason == 0
  pick = lambda x: np.where(ok, x, np.nan)  # noqa: E731
  return dict(mbf=pick(mbf), ok=ok, reason=reason.astype(np.int32), F=pick(big_f), w=pick(w),
              k=pick(k), tau_d=pick(tau), mbf_se=pick(mbf_se), r2=pick(r2),
              rmse=pick(out["rmse_norm"] * c_scale), window=win, reasons=dict(REASONS),
              timing=dict(total_s=time.perf_counter() - t_start, solve_s=t_solve))


class _quiet:
  """Silence numpy's 'mean of empty slice' warnings inside a block."""

  def __enter__(self):
    import warnings
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *exc):
    self._w.__exit__(*exc)


# ----------------------------------------------------------------------------- curves
SEQUENCE_KEYS = ("protocol", "ts", "tr", "flip_deg", "n_pulses", "t1_blood", "t2_blood",
                 "t1_myo", "t2_myo")


def sequence_from_record(record: dict, i: int) -> dict:
  """Sequence timing and native relaxation of slice ``i`` of a phantom/dataset record.

  Keys used: protocol, seq_ts, seq_tr, seq_flip_deg, seq_n_pulses, t1_blood_s, t2_blood_s,
  t1_myo_s, t2_myo_s (see perfjax.data.phantom.simulate); returns the dict that
  :func:`signal_to_concentration` and :func:`extract_curves` take.
  """
  try:
    return dict(protocol=str(record["protocol"][i]), ts=float(record["seq_ts"][i]),
                tr=float(record["seq_tr"][i]), flip_deg=float(record["seq_flip_deg"][i]),
                n_pulses=float(record["seq_n_pulses"][i]),
                t1_blood=float(record["t1_blood_s"][i]), t2_blood=float(record["t2_blood_s"][i]),
                t1_myo=float(record["t1_myo_s"][i]), t2_myo=float(record["t2_myo_s"][i]))
  except KeyError as e:
    raise InputError("record", f"missing sequence key {e.args[0]!r}") from None


def signal_to_concentration(signal, n_baseline: int, sequence: dict, tissue: str) -> np.ndarray:
  """Saturation-recovery signal curves [..., T] -> contrast-agent concentration (mM).

  M0 (times coil gain) comes from the mean of the first ``n_baseline`` frames, then the
  signal equation of perfjax.physics (SR-FLASH or SR-bSSFP, with the sequence's timing) is
  inverted. ``tissue`` is "blood" or "myo" (native T1/T2 from ``sequence``). Signal below
  the baseline (noise) maps to negative concentration by odd reflection about the baseline,
  so baseline noise stays zero-mean instead of being clipped to 0. Curves with NaN/Inf or a
  non-positive baseline give NaN rows (never raises for them).
  """
  from perfjax import physics  # local: physics is numpy-only and cheap, but optional here

  if tissue not in ("blood", "myo"):
    raise InputError("tissue", f"must be 'blood' or 'myo', got {tissue!r}")
  missing = [k for k in SEQUENCE_KEYS if k not in sequence]
  if missing:
    raise InputError("sequence", f"missing keys {missing}")
  sig = np.asarray(signal, np.float64)
  if sig.ndim == 0 or sig.shape[-1] < 2:
    raise InputError("signal", f"expected [..., T] curves, got shape {sig.shape}")
  b = int(n_baseline)
  if not 1 <= b <= sig.shape[-1]:
    raise InputError("n_baseline", f"must be in [1, {sig.shape[-1]}], got {n_baseline}")
  flat = sig.reshape(-1, sig.shape[-1])
  base = flat[:, :b].mean(axis=1)
  good = np.all(np.isfinite(flat), axis=1) & (base > 0)
  out = np.full(flat.shape, np.nan)
  if good.any():
    s, s0 = flat[good], base[good][:, None]
    mirrored = np.where(s >= s0, s, 2.0 * s0 - s)
    t1, t2 = (sequence["t1_blood"], sequence["t2_blood"]) if tissue == "blood" else \
        (sequence["t1_myo"], sequence["t2_myo"])
    conc = physics.concentration_from_signal(
        mirrored, base[good], sequence["protocol"], sequence["ts"], sequence["tr"],
        sequence["flip_deg"], sequence["n_pulses"], t1, t2)
    out[good] = np.where(s >= s0, conc, -conc)
  return out.reshape(sig.shape)


def _eroded_lv(mask: np.ndarray, erosion: int) -> np.ndarray:
  lv = mask == sectors_lib.LV
  for it in range(int(erosion), 0, -1):
    er = ndimage.binary_erosion(lv, iterations=it)
    if er.sum() >= 4:
      return er
  return lv


def _interior_sectors(sector_map, mask, n_sec):
  """sector_map without myocardium pixels whose 3 x 3 neighbourhood holds another label."""
  myo = mask == sectors_lib.MYO
  inner = ndimage.binary_erosion(myo, structure=np.ones((3, 3), bool))
  out = np.where(inner, sector_map, 0)
  have = np.bincount(out.ravel(), minlength=n_sec + 1)
  empty = have == 0
  empty[0] = False
  keep_all = empty[np.clip(sector_map, 0, n_sec)]
  return np.where(keep_all, sector_map, out).astype(np.int32)


def _blood_pixels(raw, pool, blood_frac, foot_frac):
  """The blood pixels of ``pool`` (bool [H, W]): those that enhance like blood at the peak."""
  curve = raw[pool].mean(axis=0)
  if not np.all(np.isfinite(curve)):
    return pool
  foot, peak, _ = _foot_and_peak(curve, foot_frac)
  b = max(foot, 1)
  enh = raw[..., peak] - raw[..., :b].mean(axis=-1)
  ref = np.percentile(enh[pool], 90)
  keep = pool & (enh >= blood_frac * ref)
  return keep if keep.sum() >= 4 and ref > 0 else pool


def extract_curves(raw, mask, times, sector_map=None, *, theta_s: float | None = None,
                   center=None, erosion: int = 2, n_angular: int = 24, n_radial: int = 2,
                   sequence: dict | None = None, foot_frac: float = 0.1,
                   blood_frac: float = 0.8, myo_border: bool = True,
                   rician: bool | None = None) -> dict:
  """AIF and sector tissue curves of one slice, baseline-subtracted, ready for fit_fermi.

  Args:
    raw: [H, W, T] signal (not min-max normalised: the ratio tissue/AIF carries the units).
    mask: int [H, W] (0 bg, 1 myo, 2 LV, 3 RV): ground truth or predicted.
    times: [T] frame times (s).
    sector_map: int [H, W] 1..K sectors; default perfjax.sectors.sector_map(mask, n_angular,
      n_radial, theta_s, center) (pass the ground truth's theta_s/center to divide a
      predicted mask with the same geometry).
    erosion: iterations of binary erosion of the LV blood pool for the AIF (keeps partial
      volume with the myocardium out; reduced automatically if the pool would vanish).
    blood_frac: papillary muscles and trabeculae belong to the LV label but enhance like
      myocardium; pixels of the eroded pool whose enhancement at the pool's peak frame is
      below ``blood_frac`` x the pool's 90th percentile are left out of the AIF.
    myo_border: leave out of the tissue curves the myocardium pixels that touch another
      label (3 x 3 neighbourhood): their partial volume with the bright blood pool biases
      endocardial MBF upwards. A sector without interior pixels keeps all of its pixels.
    rician: correct the magnitude-noise floor (default: when converting to concentration).
      Magnitude noise lifts the low pre-contrast SR signal (E[M] ~ sqrt(A^2 + sigma^2) at
      SNR > 2) and so M0; near blood saturation a 2-3 % larger M0 lowers the AIF peak
      concentration by 10-15 %. A region's mean curve m becomes sqrt(m^2 - sigma^2), with
      sigma^2 the median over the AIF's blood pixels of their variance over the baseline.
    sequence: if given (see :func:`sequence_from_record`), signals are converted to
      concentration (mM) by :func:`signal_to_concentration` before baseline subtraction.

  Returns:
    dict: aif [T], curves [K, T] (NaN rows for empty sectors), counts [K] (pixels),
    n_baseline (pre-contrast frames, :func:`baseline_frames` on the AIF), window [T]
    (:func:`first_pass_window`), sector_map [H, W], units ("mM" or "signal"), n_aif_pixels.
  """
  raw = np.asarray(raw, np.float64)
  mask = np.asarray(mask)
  if raw.ndim != 3:
    raise InputError("raw", f"expected [H, W, T], got shape {raw.shape}")
  if mask.shape != raw.shape[:2]:
    raise InputError("mask", f"shape {mask.shape} does not match raw {raw.shape[:2]}")
  times = _check_1d(times, "times")
  if times.size != raw.shape[2]:
    raise InputError("times", f"{times.size} times for {raw.shape[2]} frames")
  if sector_map is None:
    sector_map = sectors_lib.sector_map(mask, n_angular, n_radial, theta_s=theta_s,
                                        center=center)
  sector_map = np.asarray(sector_map)
  n_sec = n_angular * n_radial
  lv = _eroded_lv(mask, erosion)
  if not lv.any():
    raise InputError("mask", "no LV blood pool (label 2): no AIF")
  lv = _blood_pixels(raw, lv, blood_frac, foot_frac)
  if rician is None:
    rician = sequence is not None
  aif = raw[lv].mean(axis=0)
  if not np.all(np.isfinite(aif)):
    raise InputError("raw", "NaN or Inf in the LV blood pool signal")
  b = baseline_frames(aif, foot_frac)
  sigma2 = 0.0
  if rician and b >= 2:
    # median over the blood pixels, which are flat before the LV bolus (myocardium pixels
    # can already pick up the RV bolus through partial volume)
    sigma2 = float(np.median(np.var(raw[lv][:, :b], axis=1, ddof=1)))
    aif = np.sqrt(np.maximum(aif ** 2 - sigma2, 0.0))
  tissue_map = _interior_sectors(sector_map, mask, n_sec) if myo_border else sector_map
  curves = sectors_lib.sector_means(raw, tissue_map, n_sec)
  if sigma2 > 0:
    curves = np.sqrt(np.maximum(curves ** 2 - sigma2, 0.0))
  counts = np.bincount(tissue_map.ravel(), minlength=n_sec + 1)[1:n_sec + 1]
  units = "signal"
  if sequence is not None:
    aif = signal_to_concentration(aif, b, sequence, "blood")
    curves = signal_to_concentration(curves, b, sequence, "myo")
    units = "mM"
  aif = aif - aif[:b].mean()
  curves = curves - curves[:, :b].mean(axis=1, keepdims=True)
  return dict(aif=aif, curves=curves, counts=counts, n_baseline=b, n_aif_pixels=int(lv.sum()),
              window=first_pass_window(aif, foot_frac), sector_map=sector_map, units=units)


# ----------------------------------------------------------------------------- slice/study
def mbf_from_slices(raw, masks, times, *, sector_maps=None, theta_s=None, centers=None,
                    sequences=None, erosion: int = 2, study_ids=None, **fit_kwargs) -> dict:
  """48-sector and slice MBF of N slices with ONE batched fit_fermi call (N x 48 curves).

  Args:
    raw: [N, H, W, T] signal; masks: [N, H, W]; times: [N, T].
    sector_maps: optional [N, H, W] 48-sector maps; theta_s / centers: optional per-slice
      geometry (e.g. the ground truth's, to divide predicted masks the same way).
    sequences: None (MBF from raw signal, as the paper) or a list of N sequence dicts
      (:func:`sequence_from_record`) to fit concentration instead.
    study_ids: optional [N]; when given, every slice of a study uses the AIF of the study's
      slice with the most AIF pixels (small end-systolic apical cavities give AIFs diluted
      by partial volume; the fitted delay absorbs the slices' timing offsets).
    **fit_kwargs: passed to :func:`fit_fermi`.

  Returns:
    dict: mbf48 [N, 48] (ml/g/min), ok48, reason48, mbf_se48, slice_mbf [N], aif [N, T],
    curves [N, 48, T], counts [N, 48], error [N] (str, "" when the slice's curves could be
    extracted; a slice with a degenerate mask gets NaN and its message, never an exception).
  """
  raw = np.asarray(raw)
  masks = np.asarray(masks)
  times = np.asarray(times, np.float64)
  if raw.ndim != 4 or masks.shape != raw.shape[:3] or times.shape != (raw.shape[0], raw.shape[3]):
    raise InputError("raw", f"expected raw [N,H,W,T], masks [N,H,W], times [N,T]; got "
                     f"{raw.shape}, {masks.shape}, {times.shape}")
  n, t = raw.shape[0], raw.shape[3]
  aifs = np.full((n, t), np.nan)
  curves = np.full((n, 48, t), np.nan)
  counts = np.zeros((n, 48), np.int64)
  n_px = np.zeros(n, np.int64)
  errors = [""] * n
  for i in range(n):
    try:
      ex = extract_curves(raw[i], masks[i], times[i],
                          None if sector_maps is None else sector_maps[i],
                          theta_s=None if theta_s is None else theta_s[i],
                          center=None if centers is None else centers[i], erosion=erosion,
                          sequence=None if sequences is None else sequences[i])
    except InputError as e:
      errors[i] = str(e)
      continue
    aifs[i], curves[i], counts[i] = ex["aif"], ex["curves"], ex["counts"]
    n_px[i] = ex["n_aif_pixels"]
  if study_ids is not None:
    study_ids = np.asarray(study_ids)
    for sid in np.unique(study_ids):
      idx = np.nonzero((study_ids == sid) & (n_px > 0))[0]
      if idx.size:
        aifs[study_ids == sid] = aifs[idx[np.argmax(n_px[idx])]]
  fit = fit_fermi(np.repeat(aifs, 48, axis=0), curves.reshape(n * 48, t),
                  np.repeat(times, 48, axis=0), **fit_kwargs)
  mbf48 = fit["mbf"].reshape(n, 48)
  return dict(mbf48=mbf48, ok48=fit["ok"].reshape(n, 48), reason48=fit["reason"].reshape(n, 48),
              mbf_se48=fit["mbf_se"].reshape(n, 48), slice_mbf=slice_mbf(mbf48), aif=aifs,
              curves=curves, counts=counts, error=np.array(errors))


def slice_mbf(mbf48, min_valid: int = 1) -> np.ndarray:
  """Slice MBF: the mean of the valid (finite) sector values, [..., 48] -> [...].

  NaN where fewer than ``min_valid`` sectors have a value.
  """
  m = np.asarray(mbf48, np.float64)
  if m.ndim == 0 or m.shape[-1] == 0:
    raise InputError("mbf48", f"expected [..., K] sector values, got shape {m.shape}")
  valid = np.isfinite(m)
  n_valid = valid.sum(axis=-1)
  total = np.where(valid, m, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_valid >= max(min_valid, 1), total / n_valid, np.nan)


def aha6_from_48(values48, counts48=None) -> np.ndarray:
  """[..., 48] sector values -> [..., 6] AHA sectors (mean of each sector's 4 x 2 parts).

  48-sector index is ``(angular - 1) * 2 + radial`` with angular 1..24, so AHA sector k holds
  angular sub-sectors 4(k-1)+1..4k. Weighted by pixel ``counts48`` when given; NaN parts are
  skipped; NaN when none is left.
  """
  v = np.asarray(values48, np.float64)
  if v.shape[-1] != 48:
    raise InputError("values48", f"expected [..., 48], got shape {v.shape}")
  w = np.ones_like(v) if counts48 is None else np.broadcast_to(np.asarray(counts48, np.float64),
                                                               v.shape)
  ok = np.isfinite(v) & (w > 0)
  v6 = np.where(ok, v * w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  w6 = np.where(ok, w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(w6 > 0, v6 / w6, np.nan)


def aha16_mbf(mbf48_by_level: dict, counts48_by_level: dict | None = None) -> np.ndarray:
  """Study MBF per AHA segment [16] (index 0 = segment 1) from {level: [48] sector MBF}.

  Levels are 0/1/2 or "basal"/"mid"/"apical"; apical segments follow
  perfjax.sectors.aha16 (13 <- 1, 14 <- 2+3, 15 <- 4, 16 <- 5+6, weighted by pixel counts).
  """
  six, w6 = {}, {}
  for level, v48 in mbf48_by_level.items():
    c48 = None if counts48_by_level is None else counts48_by_level.get(level)
    six[level] = aha6_from_48(v48, c48)
    w6[level] = np.ones(6) if c48 is None else np.asarray(c48, np.float64).reshape(6, 8).sum(1)
  return sectors_lib.bullseye16(six, w6)
