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

The model and its jitted solve in normalised units are `perfjax.fermi_model`; this module
holds what the caller sees: units, grouping of curves that share an AIF, windows, checks,
the retry pass, the spill-over term's choice and the failure codes.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from perfjax.bolus import aif_on_grid, first_pass_window, fit_aif_gamma, foot_and_peak
from perfjax.conventions import PER_S_TO_ML_G_MIN
from perfjax.errors import InputError
from perfjax.fermi_model import fit_groups, params_from_raw

ML_G_MIN_PER_S = PER_S_TO_ML_G_MIN  # 1/s -> ml/g/min (myocardial density 1.05 g/ml)

# Reason codes of fit_fermi (``reason`` output); REASONS maps each code to its meaning.
(OK, NONFINITE, FLAT_AIF, NO_ENHANCEMENT, SHORT_WINDOW, NOT_CONVERGED, POOR_FIT,
 IMPLAUSIBLE, UNCERTAIN, LONG_SPAN) = range(10)
# Longest fitted span (s) from a group's first fitted frame: a first pass lasts about a minute;
# far longer spans are times in ms (or a stray frame), and the convolution grid would grow with
# them (its memory with their square).
MAX_FIT_SPAN_S = 600.0
REASONS = {
    OK: "ok",
    NONFINITE: "NaN/Inf in the AIF, curve or times",
    FLAT_AIF: "AIF shows no enhancement",
    NO_ENHANCEMENT: "curve shows no enhancement above its baseline noise (flat, zeros)",
    SHORT_WINDOW: "fewer than 6 frames in the fitting window",
    NOT_CONVERGED: "solver did not converge (cost and MBF still moving after the retry pass)",
    POOR_FIT: "fit explains too little of the curve (r2 < min_r2)",
    IMPLAUSIBLE: "MBF above max_mbf: not physiological (e.g. a curve corrupted by motion)",
    UNCERTAIN: "MBF standard error above max_rel_se of the MBF (of its slice's median sector MBF "
               "in a slice's fit): the curve does not determine it",
    LONG_SPAN: f"fitted frames span more than {MAX_FIT_SPAN_S:g} s: frame times not in seconds",
}
MIN_WINDOW = 6

DV = 0.2  # s, fit_fermi's default step of the convolution integral (see `perfjax.fermi_model`)
# The coarse grid's length is rounded up to a multiple of this, so that calls whose frames span
# slightly different times (predict fits one slice at a time) share a compiled solve; the
# response at a time depends only on the AIF before it, so the extra points change no fit.
COARSE_BUCKET = 8


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


def _group_spans(win, tms, inv, n_groups):
  """Each group's clock origin (its earliest fitted frame; 0 without one) and each curve's
  fitted frame times from it [N, T] (0 outside its window)."""
  t_first = np.where(win, tms, np.inf).min(axis=1)
  origin = np.full(n_groups, np.inf)
  np.minimum.at(origin, inv, t_first)
  origin = np.where(np.isfinite(origin), origin, 0.0)
  return origin, np.where(win, tms - origin[inv][:, None], 0.0)


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
              aif_lead=0.0, spill=None, se_groups=None) -> dict:
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
    se_groups: None or int [N]: curves with the same value (the sectors of one slice) judge
      their standard error against their group's median MBF over the curves that passed every
      other check, not against their own. Judged against its own noisy value, a low estimate
      (a perfusion defect's, or a low draw of noise) was dropped and a high one of the same
      error kept, and the slice mean went up with it (benchmarks/RESULTS.md).
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
  if se_groups is not None:
    se_groups = np.asarray(se_groups)
    if se_groups.shape != (n,) or not np.issubdtype(se_groups.dtype, np.integer):
      raise InputError("se_groups", f"expected integers of shape ({n},), got "
                       f"{se_groups.dtype} {se_groups.shape}")
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
  # frame (the AIF is at baseline, ~0, before it), so the grid spans the fitted frames only;
  # a group whose frames span more than MAX_FIT_SPAN_S fails (LONG_SPAN) and is left out of it.
  ratio = 2
  h = ratio * dv
  origin, span = _group_spans(win, tms, inv, len(g["aif"]))
  long_group = np.zeros(len(g["aif"]), bool)
  np.logical_or.at(long_group, inv, span.max(axis=1) > MAX_FIT_SPAN_S)
  if long_group.any():
    reason = np.where((reason == 0) & long_group[inv], LONG_SPAN, reason).astype(np.int32)
    win = win & ~long_group[inv][:, None]
    origin, span = _group_spans(win, tms, inv, len(g["aif"]))
  t_end = max(float(np.max(span)), h)
  n_coarse = -(-(int(np.ceil(t_end / h)) + 5) // COARSE_BUCKET) * COARSE_BUCKET
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
    n_blocks = _retry_blocks(block_group.size)
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
    reference = mbf if se_groups is None else _group_median(mbf, reason == 0, se_groups)
    reason = np.where((reason == 0) & ~(mbf_se <= max_rel_se * reference), UNCERTAIN, reason)
  ok = reason == 0
  pick = lambda x: np.where(ok, x, np.nan)  # noqa: E731
  v = out["spill"].astype(np.float64) * c_scale / sp_scale if spill is not None else np.nan
  return dict(mbf=pick(mbf), ok=ok, reason=reason.astype(np.int32), F=pick(big_f), w=pick(w),
              k=pick(k), tau_d=pick(tau), mbf_se=pick(mbf_se), r2=pick(r2),
              spill=pick(np.broadcast_to(v, (n,))), spill_used=spill_used & ok,
              rmse=pick(out["rmse_norm"] * c_scale), window=win, reasons=dict(REASONS),
              n_retried=n_retried,
              timing=dict(total_s=time.perf_counter() - t_start, solve_s=t_solve))


def _group_median(values, valid, groups) -> np.ndarray:
  """[N] the median of ``values`` over the ``valid`` members of each curve's group (NaN for a
  group without one)."""
  labels, inv = np.unique(groups, return_inverse=True)
  medians = np.full(labels.size, np.nan)
  order = np.argsort(inv, kind="stable")
  starts = np.searchsorted(inv[order], np.arange(labels.size + 1))
  for j in range(labels.size):
    rows = order[starts[j]:starts[j + 1]]
    kept = values[rows][valid[rows]]
    if kept.size:
      medians[j] = np.median(kept)
  return medians[inv]


RETRY_BLOCK = 8  # rows of one group per block of the retry pass
RETRY_BUCKET = 64  # the retry pass's block count: a power of two up to this, then a multiple
SPILL_RSS_FLOOR = 1e-6  # per fitted frame (normalised units): keeps noise-free fits' ratio finite

# Convergence rule (judged over the last 5 LM iterations of a curve's best start):
COST_RTOL = 1e-3  # the cost fell by at most 0.1 % (plus a float32 floor per fitted frame), or
MBF_RTOL = 1e-3   # the MBF moved by at most 0.1 % while the cost fell by at most COST_RTOL_SLOW:
COST_RTOL_SLOW = 1e-2  # a crawl along a bound (w -> 0, k or tau_d at an edge) that no longer
# changes the answer.


def _retry_blocks(n: int) -> int:
  """The retry pass's padded block count for ``n`` blocks: few distinct shapes (compiles), and
  beyond ``RETRY_BUCKET`` less padding than the next power of two."""
  if n <= RETRY_BUCKET:
    return max(8, 1 << int(np.ceil(np.log2(max(n, 1)))))
  return -(-n // RETRY_BUCKET) * RETRY_BUCKET


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
