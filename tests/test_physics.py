"""perfjax.physics: kinetics (gamma variate, Fermi, convolution) and 3T signal equations."""
import numpy as np
import pytest

from perfjax import physics
from perfjax.errors import InputError

SEQ = {
    "flash": dict(ts=0.07, tr=2.5e-3, flip_deg=12.0, n_pulses=24),
    "bssfp": dict(ts=0.08, tr=2.8e-3, flip_deg=60.0, n_pulses=45),
}


def _tissue(name):
  t1, t2, pd = physics.TISSUES_3T[name]
  return dict(t1_0=t1, t2_0=t2, m0=pd)


def test_unit_conversion_golden():
  assert physics.ml_g_min_to_per_s(1.0) == pytest.approx(1.05 / 60.0)
  assert physics.per_s_to_ml_g_min(0.0525) == pytest.approx(3.0)


def test_gamma_variate_peak_and_onset():
  t = np.array([0.0, 2.0, 5.0, 10.0])
  y = physics.gamma_variate(t, t0=2.0, alpha=3.0, tmax=3.0, peak=6.0)
  assert y[0] == 0.0 and y[1] == 0.0
  assert y[2] == pytest.approx(6.0)  # t0 + tmax
  fine = np.linspace(0, 20, 4001)
  assert fine[np.argmax(physics.gamma_variate(fine, 2.0, 3.0, 3.0, 6.0))] == pytest.approx(5.0)


def test_fermi_mbf_is_h_at_onset():
  w, k, tau = 3.0, 0.7, 0.4
  f_amp = physics.fermi_amplitude(0.05, w, k)
  h = physics.fermi_impulse(np.array([0.0, tau, tau + w, 30.0]), f_amp, w, k, tau)
  assert h[0] == 0.0
  assert h[1] == pytest.approx(0.05)  # CONVENTIONS: MBF = F / (1 + exp(-w / k))
  assert h[2] == pytest.approx(f_amp / 2)
  assert h[3] < 1e-10


def test_tissue_concentration_linear_and_plateau_integral():
  times = np.cumsum(np.r_[0.0, np.full(29, 0.8)])
  params = np.array([3.0, 3.0, 3.0, 6.0, 9.0, 3.0, 4.0, 0.8, 0.6, 2.0])
  one = physics.tissue_concentration(times, params, 1.0, 4.0, 0.5, 0.0)
  two = physics.tissue_concentration(times, params, np.array([0.02, 0.04]), 4.0, 0.5, 0.0)
  np.testing.assert_allclose(two, np.outer([0.02, 0.04], one), rtol=1e-12)
  assert np.all(one[times < 3.0] == 0.0)
  # With w >> the bolus and a sharp edge, h is a box of height MBF: tissue = MBF * cumulative AIF.
  tf = np.arange(0, 12.0, 1e-3)
  box = physics.tissue_concentration(times[:8], params, 0.03, 50.0, 0.05, 0.0, dt=0.01)
  cum = np.interp(times[:8], tf, np.cumsum(physics.aif_concentration(tf, params)) * 1e-3)
  np.testing.assert_allclose(box, 0.03 * cum, rtol=0.01, atol=1e-4)


def test_aif_params_batch_and_bad_shape():
  params = np.array([[3.0, 3.0, 3.0, 6.0, 9.0, 3.0, 4.0, 0.8, 0.6, 2.0]] * 2)
  t = np.linspace(0, 20, 30)
  out = physics.aif_concentration(t, params)
  assert out.shape == (2, 30)
  np.testing.assert_allclose(out[0], physics.aif_concentration(t, params[0]))
  with pytest.raises(InputError):
    physics.aif_concentration(t, params[:, :5])


def test_flash_golden_single_pulse():
  # n_pulses = 1: S = (1 - exp(-ts R1)) sin(a) exp(-TR/2 R2), by hand.
  r1, r2 = 1 / 1.2, 1 / 0.045
  s = physics.flash_signal(r1, r2, ts=0.1, tr=2.5e-3, flip_deg=10.0, n_pulses=1)
  expected = (1 - np.exp(-0.1 * r1)) * np.sin(np.deg2rad(10.0)) * np.exp(-1.25e-3 * r2)
  assert s == pytest.approx(expected, rel=1e-12)


def test_bssfp_limits():
  r1, r2 = 1 / 1.2, 1 / 0.045
  a = np.deg2rad(60.0)
  s0 = physics.bssfp_signal(r1, r2, ts=0.1, tr=3e-3, flip_deg=60.0, n_pulses=0)
  assert s0 == pytest.approx((1 - np.exp(-0.1 * r1)) * np.sin(a / 2) * np.exp(-1.5e-3 * r2))
  e1, e2 = np.exp(-3e-3 * r1), np.exp(-3e-3 * r2)
  sss = (1 - e1) * np.sin(a) / (1 - (e1 - e2) * np.cos(a) - e1 * e2) * np.exp(-1.5e-3 * r2)
  assert physics.bssfp_signal(r1, r2, 0.1, 3e-3, 60.0, 20000) == pytest.approx(sss)


@pytest.mark.parametrize("protocol", physics.PROTOCOLS)
def test_signal_rises_and_blood_saturates(protocol):
  c = np.array([0.0, 0.5, 1.0, 5.0, 5.5])
  s = physics.signal_from_concentration(c, protocol, **SEQ[protocol], **_tissue("blood_arterial"))
  assert np.all(np.diff(s) > 0)
  # Saturation at the bolus peak: 0.5 mM adds far less at 5 mM than at 0 mM.
  assert (s[4] - s[3]) < 0.25 * (s[1] - s[0])


def test_baselines_flash_vs_bssfp():
  """bSSFP (T2/T1) has brighter baseline blood and fat relative to myocardium than FLASH."""
  ratio = {}
  for protocol in physics.PROTOCOLS:
    base = {n: float(physics.signal_from_concentration(0.0, protocol, **SEQ[protocol],
                                                       **_tissue(n)))
            for n in ("blood_arterial", "myocardium", "fat")}
    myo = base["myocardium"]
    ratio[protocol] = (base["blood_arterial"] / myo, base["fat"] / myo)
  assert ratio["flash"][0] < 1.0 < ratio["bssfp"][0]
  assert ratio["bssfp"][1] > ratio["flash"][1] > 1.0


@pytest.mark.parametrize("protocol", physics.PROTOCOLS)
@pytest.mark.parametrize("tissue", ["blood_arterial", "myocardium"])
def test_concentration_from_signal_round_trip(protocol, tissue):
  c = np.array([[0.0, 0.01, 0.2, 0.9, 3.0, 7.5, 12.0]])
  t = _tissue(tissue)
  m0 = 1234.5  # unknown gain x coil x proton density: removed through the baseline
  s = physics.signal_from_concentration(c, protocol, **SEQ[protocol], t1_0=t["t1_0"],
                                        t2_0=t["t2_0"], m0=m0)
  back = physics.concentration_from_signal(s, s[:, 0], protocol, **SEQ[protocol],
                                           t1_0=t["t1_0"], t2_0=t["t2_0"])
  np.testing.assert_allclose(back, c, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("protocol", physics.PROTOCOLS)
def test_imperfect_saturation(protocol):
  """A saturation leaving eta x M0 starts the recovery there: eta = 0 is the ideal pulse, eta = 1
  no saturation at all (the delay then no longer matters); the inverse undoes it."""
  t = _tissue("myocardium")
  c = np.array([[0.0, 0.3, 1.5, 6.0]])
  seq = SEQ[protocol]
  ideal = physics.signal_from_concentration(c, protocol, **seq, **t)
  np.testing.assert_array_equal(
      physics.signal_from_concentration(c, protocol, **seq, **t, sat_residual=0.0), ideal)
  none = [physics.signal_from_concentration(c, protocol, **{**seq, "ts": ts}, **t,
                                            sat_residual=1.0) for ts in (0.05, 0.5)]
  np.testing.assert_allclose(none[0], none[1], rtol=1e-12)
  half = physics.signal_from_concentration(c, protocol, **seq, **t, sat_residual=0.3)
  assert half[0, 0] > ideal[0, 0] and half[0, 0] / half[0, -1] > ideal[0, 0] / ideal[0, -1]
  back = physics.concentration_from_signal(half, half[:, 0], protocol, **seq, t1_0=t["t1_0"],
                                           t2_0=t["t2_0"], sat_residual=0.3)
  np.testing.assert_allclose(back, c, rtol=2e-3, atol=2e-4)


def test_inverse_bad_inputs():
  kw = dict(protocol="flash", **SEQ["flash"], t1_0=1.2, t2_0=0.045)
  with pytest.raises(InputError, match="protocol"):
    physics.concentration_from_signal(np.ones((1, 3)), np.ones(1), **{**kw, "protocol": "x"})
  with pytest.raises(InputError, match="baseline"):
    physics.concentration_from_signal(np.ones((1, 3)), np.zeros(1), **kw)
  with pytest.raises(InputError, match="NaN"):
    physics.concentration_from_signal(np.array([[1.0, np.nan]]), np.ones(1), **kw)
