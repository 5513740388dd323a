"""Contrast kinetics and MR signal physics of first-pass perfusion CMR at 3T (pure numpy).

Used by the phantom (forward model) and by the perfusion code (signal -> concentration).
Units: time in seconds, concentrations in mmol/l (mM), relaxation rates in 1/s, flow in
1/s unless a name says ``ml_g_min``.

Contrast agent: gadobutrol (Gadovist) at 3T and 37 C, blood relaxivities
``R1_RELAXIVITY = 4.5 /mM/s`` and ``R2_RELAXIVITY = 6.0 /mM/s`` (reported r1 4.5-5.0 in blood
at 3T; r2 a little above r1). Fast water exchange is assumed everywhere: ``R1 = R1_0 + r1 C``.

Kinetics (CONVENTIONS.md "Perfusion"):
  * AIF: a gamma variate (first pass) + a delayed, broader gamma variate (recirculation) +
    a smooth plateau (equilibrium), continuous in time (:func:`aif_concentration`).
  * Fermi impulse response ``h(t) = F / (1 + exp((t - tau_d - w) / k))`` for t >= tau_d,
    0 before; MBF = ``F / (1 + exp(-w / k))`` in 1/s, ``* 60 / 1.05`` in ml/g/min.
  * tissue = AIF (x) h, computed on a fine uniform grid (default 0.05 s) and sampled at the
    (non-uniform) frame times (:func:`tissue_concentration`).

Signal (magnitude of the k-space-centre echo, proton density M0 = 1):
  * SR-FLASH (:func:`flash_signal`): perfect saturation, recovery for ``ts`` seconds, then
    RF-spoiled pulses (flip, TR); the centre line is read at pulse ``n_pulses``.
  * SR-bSSFP (:func:`bssfp_signal`): perfect saturation, recovery for ``ts``, alpha/2
    preparation, then a bSSFP train whose transient approaches the steady state with rate
    ``lambda = E1 cos^2(a/2) + E2 sin^2(a/2)`` (Scheffler 2003); centre at pulse ``n_pulses``.
  The inverse (:func:`concentration_from_signal`) takes the per-pixel (or per-region)
  pre-contrast baseline to remove the unknown M0 x coil gain, then inverts the monotonic
  signal(C) relation with a dense lookup table.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.special import expit

from perfjax import conventions
from perfjax.errors import InputError

R1_RELAXIVITY = 4.5  # 1/(mM s), gadobutrol in blood at 3T
R2_RELAXIVITY = 6.0  # 1/(mM s)
TISSUE_DENSITY = conventions.MYOCARDIAL_DENSITY_G_PER_ML  # g/ml, myocardium
PROTOCOLS = ("flash", "bssfp")

# Native relaxation times at 3T (s) and relative proton density, literature-typical values.
TISSUES_3T = {
    #                 T1     T2     PD
    "blood_arterial": (1.85, 0.25, 0.95),
    "blood_venous": (1.85, 0.12, 0.95),  # deoxygenated blood: shorter T2 (darker in bSSFP)
    "myocardium": (1.20, 0.045, 0.80),
    "fat": (0.38, 0.09, 0.90),
    "liver": (0.81, 0.034, 0.75),
    "skeletal_muscle": (1.40, 0.032, 0.75),
    "lung": (1.30, 0.040, 0.15),
    "pericardium": (0.90, 0.030, 0.35),
}

# Parameter layout of :func:`aif_concentration` (last axis of ``params``).
AIF_PARAM_NAMES = ("t0", "alpha", "tmax", "peak", "rc_delay", "rc_alpha", "rc_tmax", "rc_peak",
                   "plateau", "plateau_width")


def per_s_to_ml_g_min(flow_per_s):
  """Flow in 1/s (ml blood per ml tissue per s) -> ml/g/min (``* 60 / 1.05``)."""
  return np.asarray(flow_per_s) * 60.0 / TISSUE_DENSITY


def ml_g_min_to_per_s(mbf_ml_g_min):
  """MBF in ml/g/min -> 1/s (``* 1.05 / 60``)."""
  return np.asarray(mbf_ml_g_min) * TISSUE_DENSITY / 60.0


def gamma_variate(t, t0, alpha, tmax, peak):
  """Gamma variate that is 0 before ``t0`` and reaches ``peak`` at ``t0 + tmax``.

  ``peak * (s / tmax)**alpha * exp(alpha * (1 - s / tmax))`` with ``s = max(t - t0, 0)``.
  Arguments broadcast; ``tmax`` is the time to peak after arrival (s).
  """
  s = np.clip(np.asarray(t, dtype=np.float64) - t0, 0.0, None) / tmax
  with np.errstate(divide="ignore", invalid="ignore"):
    out = peak * np.exp(alpha * (np.log(np.where(s > 0, s, 1.0)) + 1.0 - s))
  return np.where(s > 0, out, 0.0)


def aif_concentration(t, params):
  """Blood-pool Gd concentration (mM) at times ``t`` (s), continuous in time.

  first pass ``gamma_variate(t0, alpha, tmax, peak)`` + recirculation
  ``gamma_variate(t0 + rc_delay, rc_alpha, rc_tmax, rc_peak)`` + an equilibrium plateau
  ``plateau * smoothstep(u)``, ``u = (t - t0 - 0.3 rc_delay) / (0.7 rc_delay + 2 plateau_width)``
  clipped to [0, 1] (``smoothstep(u) = u^2 (3 - 2u)``). Exactly 0 before ``t0``.

  Args:
    t: times, any shape (s).
    params: [..., 10] in the order of ``AIF_PARAM_NAMES``; leading axes broadcast with
      ``t[..., None]``-style use: for ``params`` [P] any ``t`` works; for ``params`` [N, P]
      pass ``t`` [N, T] (or [T]) and get [N, T].
  """
  p = np.asarray(params, dtype=np.float64)
  if p.shape[-1] != len(AIF_PARAM_NAMES):
    raise InputError("params", f"expected last axis {len(AIF_PARAM_NAMES)}, got {p.shape}")
  t = np.asarray(t, dtype=np.float64)
  q = [p[..., i] for i in range(p.shape[-1])]
  if p.ndim > 1:
    q = [x[..., None] for x in q]
  t0, alpha, tmax, peak, rc_delay, rc_alpha, rc_tmax, rc_peak, plateau, width = q
  first = gamma_variate(t, t0, alpha, tmax, peak)
  recirc = gamma_variate(t, t0 + rc_delay, rc_alpha, rc_tmax, rc_peak)
  u = np.clip((t - t0 - 0.3 * rc_delay) / (0.7 * rc_delay + 2.0 * width), 0.0, 1.0)
  return first + recirc + plateau * u * u * (3.0 - 2.0 * u)


def fermi_amplitude(mbf_per_s, w, k):
  """Fermi F (1/s) that gives ``h(tau_d) = mbf_per_s``: ``F = MBF * (1 + exp(-w / k))``."""
  return np.asarray(mbf_per_s) * (1.0 + np.exp(-np.asarray(w) / np.asarray(k)))


def fermi_impulse(t, f_amp, w, k, tau_d, dt=None):
  """Fermi impulse response ``F / (1 + exp((t - tau_d - w) / k))`` for t >= tau_d, else 0.

  With ``dt`` (the bin width of a grid ``t``), the step at ``tau_d`` is integrated over each
  bin ``[t - dt/2, t + dt/2]`` so a convolution on that grid is continuous in ``tau_d``.
  """
  t = np.asarray(t, dtype=np.float64)
  h = f_amp * expit(-(t - tau_d - w) / k)
  if dt is None:
    return np.where(t >= tau_d, h, 0.0)
  return h * np.clip((t + 0.5 * dt - tau_d) / dt, 0.0, 1.0)


def fine_grid(t_end, dt=0.05):
  """Uniform grid 0, dt, ..., covering ``[0, t_end]`` (s)."""
  return np.arange(int(np.ceil(t_end / dt)) + 2) * dt


def convolve_fine(aif_fine, h_fine, dt):
  """Causal convolution ``dt * sum_j aif[j] h[i - j]`` on a uniform grid (same length)."""
  n = aif_fine.shape[-1]
  return dt * np.convolve(aif_fine, h_fine)[:n]


def tissue_concentration(times, aif_params, mbf_per_s, w, k, tau_d, dt=0.05):
  """Tissue Gd concentration (mM) at ``times`` for a Fermi response of given MBF (1/s).

  AIF (x) h is computed on the grid ``fine_grid(times[-1], dt)`` from the continuous AIF
  and linearly interpolated at the frame times. ``mbf_per_s`` may be an array: the result
  is ``mbf[..., None] * unit`` (the response is linear in F at fixed w, k, tau_d).

  Args:
    times: [T] frame times (s), ``times[0] == 0``.
    aif_params: [10] parameters of :func:`aif_concentration`.
    mbf_per_s: scalar or array of MBF (1/s).
    w, k, tau_d: Fermi shape (s).
    dt: fine grid step (s).

  Returns:
    ``mbf.shape + (T,)`` concentrations (mM).
  """
  times = np.asarray(times, dtype=np.float64)
  tf = fine_grid(times[-1], dt)
  aif_f = aif_concentration(tf, aif_params)
  h_f = fermi_impulse(tf, fermi_amplitude(1.0, w, k), w, k, tau_d, dt=dt)
  unit = np.interp(times, tf, convolve_fine(aif_f, h_f, dt))
  return np.asarray(mbf_per_s, dtype=np.float64)[..., None] * unit


def relaxation_rates(conc, t1_0, t2_0, r1=R1_RELAXIVITY, r2=R2_RELAXIVITY):
  """(R1, R2) in 1/s for concentration ``conc`` (mM) and native T1, T2 (s): fast exchange."""
  conc = np.asarray(conc, dtype=np.float64)
  return 1.0 / t1_0 + r1 * conc, 1.0 / t2_0 + r2 * conc


def _recovered(m0, ts, r1, sat_residual):
  """Mz after a saturation that leaves ``sat_residual`` x M0 (0: ideal) and ``ts`` s of
  recovery: ``M0 (1 - (1 - eta) exp(-ts R1))``. Imperfect saturation (B1 inhomogeneity,
  saturation-pulse design) raises the pre-contrast signal relative to the blood peak."""
  return m0 * (1.0 - (1.0 - sat_residual) * np.exp(-ts * r1))


def flash_signal(r1, r2, ts, tr, flip_deg, n_pulses, m0=1.0, sat_residual=0.0):
  """Saturation-recovery spoiled-gradient-echo (FLASH) signal at the k-space centre.

  After an ideal saturation, Mz recovers for ``ts`` s: ``Mz0 = M0 (1 - exp(-ts R1))``; each
  RF-spoiled pulse (flip a, repetition TR) gives ``Mz_n = Mss + (Mz0 - Mss) (cos a E1)^(n-1)``
  with ``E1 = exp(-TR R1)`` and ``Mss = M0 (1 - E1) / (1 - cos a E1)``; the centre echo is
  ``Mz_n sin a exp(-TE R2)`` with TE = TR / 2. T1 shortening saturates the blood signal at
  high concentration (Mz0 -> M0). Arguments broadcast; rates in 1/s, times in s.
  """
  a = np.deg2rad(flip_deg)
  e1 = np.exp(-tr * r1)
  c = np.cos(a) * e1
  mss = m0 * (1.0 - e1) / (1.0 - c)
  mz0 = _recovered(m0, ts, r1, sat_residual)
  mz = mss + (mz0 - mss) * c ** (np.asarray(n_pulses) - 1.0)
  return mz * np.sin(a) * np.exp(-0.5 * tr * r2)


def bssfp_signal(r1, r2, ts, tr, flip_deg, n_pulses, m0=1.0, sat_residual=0.0):
  """Saturation-recovery balanced SSFP signal at the k-space centre (on resonance).

  Mz recovers for ``ts`` after saturation (``Mz0 = M0 (1 - exp(-ts R1))``); an alpha/2
  preparation puts it on the transient path ``S_n = Mz0 sin(a/2) lam^n + Sss (1 - lam^n)``
  with ``lam = E1 cos^2(a/2) + E2 sin^2(a/2)`` and the exact steady state
  ``Sss = M0 (1 - E1) sin a / (1 - (E1 - E2) cos a - E1 E2)``, times ``exp(-TE R2)`` at
  TE = TR / 2. The steady state carries T2/T1 contrast (bright blood and fat).
  """
  a = np.deg2rad(flip_deg)
  e1 = np.exp(-tr * r1)
  e2 = np.exp(-tr * r2)
  lam = e1 * np.cos(0.5 * a) ** 2 + e2 * np.sin(0.5 * a) ** 2
  sss = m0 * (1.0 - e1) * np.sin(a) / (1.0 - (e1 - e2) * np.cos(a) - e1 * e2)
  mz0 = _recovered(m0, ts, r1, sat_residual)
  ln = lam ** np.asarray(n_pulses, dtype=np.float64)
  return (mz0 * np.sin(0.5 * a) * ln + sss * (1.0 - ln)) * np.exp(-0.5 * tr * r2)


def _check_protocol(protocol):
  if protocol not in PROTOCOLS:
    raise InputError("protocol", f"must be one of {PROTOCOLS}, got {protocol!r}")
  return protocol


def signal_from_concentration(conc, protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0,
                              m0=1.0, r1=R1_RELAXIVITY, r2=R2_RELAXIVITY, sat_residual=0.0):
  """Forward model: concentration (mM) -> magnitude signal (units of ``m0``).

  Args:
    conc: concentrations, any shape (mM).
    protocol: "flash" or "bssfp".
    ts: saturation delay, end of saturation to the first readout pulse (s).
    tr: repetition time (s).
    flip_deg: readout flip angle (degrees).
    n_pulses: number of the readout pulse that acquires the k-space centre.
    t1_0, t2_0: native relaxation times (s).
    m0: equilibrium magnetisation (proton density x receive gain); broadcasts.
    sat_residual: longitudinal magnetisation left by the saturation pulse, x M0 (0: ideal).
  """
  fn = flash_signal if _check_protocol(protocol) == "flash" else bssfp_signal
  rate1, rate2 = relaxation_rates(conc, t1_0, t2_0, r1, r2)
  return fn(rate1, rate2, ts, tr, flip_deg, n_pulses, m0, sat_residual)


def concentration_from_signal(signal, baseline, protocol, ts, tr, flip_deg, n_pulses, t1_0,
                              t2_0, r1=R1_RELAXIVITY, r2=R2_RELAXIVITY, c_max=40.0,
                              sat_residual=0.0):
  """Inverse of :func:`signal_from_concentration` with M0 taken from the baseline signal.

  ``M0 = baseline / S(C = 0)``, then ``C`` solves ``S(C) = signal`` on a dense table of
  the (monotonic increasing) relation over ``[0, c_max]`` (truncated where it would stop
  rising). Signals below the baseline give C = 0, above the table's top give ``c_max``.

  Args:
    signal: [..., T] signals (any units).
    baseline: [...] pre-contrast signal (same units; e.g. the mean of the frames before
      contrast arrival) broadcasting against ``signal[..., 0]``.
    protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0, sat_residual: as in
      :func:`signal_from_concentration`
      (scalars: one sequence and tissue per call).

  Returns:
    float64 concentrations (mM), the shape of ``signal``.
  """
  signal = np.asarray(signal, dtype=np.float64)
  baseline = np.asarray(baseline, dtype=np.float64)
  if not (np.all(np.isfinite(signal)) and np.all(np.isfinite(baseline))):
    raise InputError("signal", "contains NaN or Inf")
  if np.any(baseline <= 0):
    raise InputError("baseline", "must be positive (it sets M0)")
  s_tab, c_tab = inverse_table(protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0, r1, r2, c_max,
                               sat_residual)
  rel = signal / (baseline[..., None] if baseline.ndim else baseline) * s_tab[0]
  return np.interp(rel, s_tab, c_tab)


def inverse_table(protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0, r1=R1_RELAXIVITY,
                  r2=R2_RELAXIVITY, c_max=40.0, sat_residual=0.0):
  """(signal at M0 = 1, concentration) [L] that :func:`concentration_from_signal` interpolates:
  ``C = interp(signal / baseline x table_signal[0], table_signal, table_concentration)``."""
  return _inverse_table(_check_protocol(protocol), *(float(x) for x in (
      ts, tr, flip_deg, n_pulses, t1_0, t2_0, r1, r2, c_max, sat_residual)))


@functools.lru_cache(maxsize=256)
def _inverse_table(protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0, r1, r2, c_max,
                   sat_residual):
  """(signal, concentration) of :func:`concentration_from_signal`'s table, read-only: a
  sequence's table serves every curve converted with it (the slices of a study, their
  pixels, the flip-angle variants of `perfjax.perfusion`)."""
  # Dense near 0 where tissue lives, coarser towards blood peaks.
  c_tab = np.concatenate([np.linspace(0.0, 2.0, 2001), np.linspace(2.0, c_max, 4001)[1:]])
  s_tab = signal_from_concentration(c_tab, protocol, ts, tr, flip_deg, n_pulses, t1_0, t2_0,
                                    1.0, r1, r2, sat_residual)
  rising = np.diff(s_tab) > 0
  stop = len(s_tab) if rising.all() else int(np.argmin(rising)) + 1
  c_tab, s_tab = c_tab[:stop], s_tab[:stop]
  c_tab.flags.writeable = s_tab.flags.writeable = False
  return s_tab, c_tab
