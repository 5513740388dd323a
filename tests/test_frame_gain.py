"""perfjax.frame_gain: the per-frame gain from non-enhancing tissue, and its use in MBF."""
import numpy as np
import pytest

from perfjax import frame_gain as fg
from perfjax import perfusion
from perfjax.data import phantom
from perfjax.errors import InputError

T = 30
TIMES = np.arange(T, dtype=np.float64)


def _uptake(delay: float, tau: float) -> np.ndarray:
  """A smooth contrast uptake, 0 before ``delay`` and rising with time constant ``tau``."""
  return np.where(TIMES > delay, 1.0 - np.exp(-(TIMES - delay) / tau), 0.0)


def _slice(rng, enhance_body: bool = False):
  """64 x 64 slice: heart (LV pool + ring of myocardium) in the centre, a non-enhancing body
  (left half) and an enhancing organ (right half); [H, W, T], mask, LV curve."""
  rows, cols = np.indices((64, 64)) - 31.5
  r = np.hypot(rows, cols)
  mask = np.where(r < 8, 2, np.where(r < 12, 1, 0))
  lv = 1.0 + 3.0 * np.exp(-0.5 * ((TIMES - 10.0) / 2.0) ** 2) + 0.8 * _uptake(12, 6)
  raw = np.empty((64, 64, T))
  body = 1.0 + (0.3 * _uptake(9, 8) if enhance_body else 0.0)
  raw[:] = body * rng.uniform(0.5, 2.0, (64, 64, 1))  # tissue of many proton densities
  raw[:, 40:] *= 1.0 + 0.6 * _uptake(9, 5)  # an organ that enhances
  raw[mask == 2] = lv
  raw[mask == 1] = 0.8 * (1.0 + 0.4 * _uptake(10, 3))
  return raw, mask


def test_recovers_a_frame_gain_from_the_tissue_that_does_not_enhance():
  rng = np.random.default_rng(0)
  raw, mask = _slice(rng)
  gain = np.exp(0.03 * rng.standard_normal(T))
  noisy = raw * gain + 0.005 * rng.standard_normal(raw.shape)
  out = fg.frame_gain(noisy, mask, TIMES)
  assert out["reason"] == "" and out["n_pixels"] >= fg.MIN_BODY_PIXELS
  truth = gain / np.exp(np.log(gain).mean())
  np.testing.assert_allclose(out["gain"], truth, rtol=2e-3)
  # Without a gain change it stays at 1: the enhancing organ does not leak into it.
  flat = fg.frame_gain(raw + 0.005 * rng.standard_normal(raw.shape), mask, TIMES)
  assert flat["reason"] == "" and np.abs(np.log(flat["gain"])).max() < 2e-3


def test_a_slow_gain_under_noisy_tissue_is_not_shrunk_towards_the_first_estimate():
  """Chosen by their own noisy curves, the flattest pixels would be those whose noise follows
  the starting estimate (no slow part), and a slow drift of the gain would come out smaller;
  chosen by their neighbours, it comes out whole."""
  rng = np.random.default_rng(3)
  raw, mask = _slice(rng)
  drift = 0.04 * np.sin(np.pi * TIMES / TIMES[-1])  # a slow part
  gain = np.exp(drift + 0.01 * rng.standard_normal(T))
  out = fg.frame_gain(raw * gain * (1.0 + 0.04 * rng.standard_normal(raw.shape)), mask, TIMES)
  assert out["reason"] == ""
  err = np.log(out["gain"]) - np.log(gain)
  err -= err.mean()
  slow = fg.trend_projection(TIMES)
  true_slow = slow @ (np.log(gain) - np.log(gain).mean())
  assert abs((slow @ err) @ true_slow / (true_slow @ true_slow)) < 0.12  # own choice: -0.2
  assert np.std(err) < 0.003


def test_a_change_of_the_tissue_outside_the_heart_alone_is_not_taken_for_gain():
  rng = np.random.default_rng(0)
  raw, mask = _slice(rng)
  change = np.exp(0.03 * rng.standard_normal(T))  # as breathing would move that tissue
  outside = np.where((mask == 0)[..., None], raw * change, raw)
  noise = 0.005 * rng.standard_normal(raw.shape)
  out = fg.frame_gain(outside + noise, mask, TIMES)
  assert out["reason"].startswith("the myocardium does not share the gain measured outside")
  np.testing.assert_array_equal(out["gain"], np.ones(T))
  assert fg.frame_gain(raw * change + noise, mask, TIMES)["reason"] == ""  # shared: a gain
  no_myo = np.where(mask == 1, 2, mask)  # an LV pool without myocardium around it
  assert fg.frame_gain(raw * change + noise, no_myo, TIMES)["reason"] == \
      "no myocardium curve to check the gain against"


def test_heart_slope_by_hand():
  log_g = 0.03 * np.random.default_rng(6).standard_normal(T)
  g = fg.rough_part(log_g)
  assert fg.heart_slope(log_g, g) == pytest.approx(1.0)
  assert fg.heart_slope(log_g, 0.3 * g) == pytest.approx(0.3)
  assert fg.heart_slope(log_g, np.zeros(T)) == 0.0
  assert np.isnan(fg.heart_slope(np.zeros(T), g))  # no gain to compare with
  # A curve a local quadratic follows has no frame-to-frame part.
  np.testing.assert_allclose(fg.rough_part(1.0 + 0.2 * TIMES - 0.01 * TIMES ** 2), 0.0,
                             atol=1e-12)
  pixels = np.exp(np.stack([log_g + 0.1 * k for k in range(5)]))
  np.testing.assert_allclose(fg.heart_rough(pixels), g, atol=1e-12)
  assert np.isnan(fg.heart_rough(np.zeros((0, T)))).all()
  with_nan = np.concatenate([pixels, np.full((1, T), np.nan)])  # a pixel that is not finite
  np.testing.assert_allclose(fg.heart_rough(with_nan), g, atol=1e-12)


def test_tissue_that_follows_the_uptake_is_not_taken_for_gain():
  rng = np.random.default_rng(1)
  raw, mask = _slice(rng, enhance_body=True)
  out = fg.frame_gain(raw + 0.005 * rng.standard_normal(raw.shape), mask, TIMES)
  assert "follows the contrast uptake" in out["reason"] and "is not a gain" in out["reason"]
  assert not out["uptake_removed"]
  np.testing.assert_array_equal(out["gain"], np.ones(T))


def test_a_gain_under_tissue_that_follows_the_uptake_is_applied_without_that_uptake():
  rng = np.random.default_rng(1)
  raw, mask = _slice(rng)
  # The body takes up contrast as tissue does: the LV blood's enhancement, low-passed.
  uptake = fg.uptake_templates(raw[mask == 2][0], TIMES) @ np.array([0.05, 0.1])
  body = (mask == 0)[..., None] & (np.arange(64) < 40)[None, :, None]
  raw = np.where(body, raw * (1.0 + uptake), raw)
  gain = np.exp(0.03 * rng.standard_normal(T))
  noisy = raw * gain + 0.005 * rng.standard_normal(raw.shape)
  out = fg.frame_gain(noisy, mask, TIMES)
  assert out["reason"] == "" and out["uptake_removed"]  # the uptake test's z was above its limit
  # Refused, the error would be the gain itself; what is lost is the gain's part along the
  # two templates (2 of 30 degrees of freedom: about a quarter of its sd).
  assert fg.sd_percent(out["gain"] / gain) < fg.sd_percent(gain) / 2


def test_without_uptake_keeps_what_the_templates_cannot_explain():
  lv = 1.0 + 3.0 * np.exp(-0.5 * ((TIMES - 10.0) / 2.0) ** 2)
  templates = fg.uptake_templates(lv, TIMES)
  # Hand check of a template: the frames step from 0 (t = 9 s) to 1 (t = 10 s), a linear ramp
  # between them; low-passed with tau, at t: 1 - tau exp(-t / tau) (exp(10 / tau) - exp(9 / tau)).
  step = fg.uptake_templates(np.where(TIMES >= 10.0, 1.0, 0.0), TIMES)
  for k, tau in enumerate(fg.UPTAKE_TAUS_S):
    hand = 1.0 - tau * np.exp(-20.0 / tau) * (np.exp(10.0 / tau) - np.exp(9.0 / tau))
    assert step[20, k] == pytest.approx(hand, abs=1e-3)
  assert np.all(step[:10] == 0.0)
  jitter = 0.02 * np.random.default_rng(4).standard_normal(T)
  log_g = 0.1 + templates @ np.array([0.04, -0.02]) + jitter
  estimate, sd, whiteness = fg.without_uptake(log_g, lv, TIMES)
  basis = np.column_stack([np.ones(T), templates])
  own = jitter - basis @ np.linalg.lstsq(basis, jitter, rcond=None)[0]
  # (the templates come from the LV curve divided by the estimate, so they move a little)
  np.testing.assert_allclose(estimate - estimate.mean(), own - own.mean(), atol=2e-3)
  assert sd == pytest.approx(np.sqrt(np.sum(own ** 2) / (T - 3)), rel=1e-2)
  assert 0.7 < whiteness < 1.3  # frame-to-frame: about 1
  smooth = 0.05 * ((TIMES - 15.0) / 15.0) ** 2  # a misfit of the uptake, not a gain
  assert fg.without_uptake(smooth, lv, TIMES)[2] < 0.3


def test_no_gain_without_tissue_outside_the_heart_and_bad_shapes_raise():
  rng = np.random.default_rng(2)
  raw, _ = _slice(rng)
  out = fg.frame_gain(raw, np.ones((64, 64), int), TIMES)
  assert out["reason"] == "too little image outside the heart"
  np.testing.assert_array_equal(out["gain"], np.ones(T))
  assert fg.frame_gain(raw[..., :6], np.zeros((64, 64), int), TIMES[:6])["reason"] == \
      "too few frames (6)"
  no_lv = np.zeros((64, 64), int)  # a heart without an LV blood pool
  no_lv[28:36, 28:36] = 1
  assert fg.frame_gain(raw, no_lv, TIMES)["reason"] == \
      "no LV blood pool curve to tell gain from enhancement"
  with pytest.raises(InputError, match="expected raw"):
    fg.frame_gain(raw, np.zeros((32, 32), int), TIMES)


def test_mbf_of_a_slice_with_a_frame_gain_equals_that_of_the_same_slice_without():
  rec = phantom.simulate(3, 3, "bssfp", noise=0.0, stress="mixed", variability="narrow")
  i = 1
  raw, mask, times = rec["raw"][i].astype(np.float64), rec["mask"][i], rec["times"][i]
  outside = ~np.isin(np.arange(128), np.arange(20, 108))
  raw[outside, :, :] = 1.5 * raw[..., :2].mean()  # non-enhancing tissue at the top and bottom
  gain = np.exp(0.03 * np.random.default_rng(3).standard_normal(raw.shape[-1]))
  seq = perfusion.sequence_from_record(rec, i)
  series = perfusion.aif_series_from_record(rec, i)

  def slice_mbf(frame_gain):
    return perfusion.mbf_from_slices(np.stack([raw, raw * gain]), np.stack([mask, mask]),
                                     np.stack([times, times]), sequences=[seq, seq],
                                     aif_series=[series, series], flip_sensitivity=0,
                                     frame_gain=frame_gain)
  on, off = slice_mbf(True), slice_mbf(False)
  assert list(on["frame_gain_reason"]) == ["", ""]
  np.testing.assert_allclose(on["frame_gain"][1] / on["frame_gain"][0],
                             gain / np.exp(np.log(gain).mean()), rtol=1e-4)
  assert on["slice_mbf"][1] == pytest.approx(on["slice_mbf"][0], rel=1e-3)
  assert abs(off["slice_mbf"][1] / off["slice_mbf"][0] - 1.0) > 0.01
  assert list(off["frame_gain_reason"]) == ["not asked for"] * 2


def test_what_the_outputs_say_about_a_gain_applied_and_one_not_measured():
  from perfjax import evaluate, predict
  gain = np.exp(0.02 * np.random.default_rng(5).standard_normal(T))
  why = "too little image outside the heart"
  summary = evaluate.frame_gain_summary(dict(frame_gain=np.stack([gain, np.ones(T)]),
                                             frame_gain_reason=np.array(["", why]),
                                             frame_gain_uptake_removed=np.array([True, False])))
  assert summary == dict(applied=1, uptake_removed=1, slices=2,
                         median_sd_percent=pytest.approx(fg.sd_percent(gain)))
  assert predict.frame_gain_fields(gain, "") == dict(
      frame_gain_sd_percent=round(float(fg.sd_percent(gain)), 3), frame_gain_uptake_removed=False,
      frame_gain_note=None)
  assert predict.frame_gain_fields(gain, "", uptake_removed=True)["frame_gain_uptake_removed"]
  assert predict.frame_gain_fields(np.ones(T), why) == dict(
      frame_gain_sd_percent=None, frame_gain_uptake_removed=None, frame_gain_note=why)


def test_the_gain_measured_on_the_wide_phantom_is_the_one_it_applied():
  assert np.all(phantom.simulate(5, 3, "flash", variability="narrow")["frame_gain_true"] == 1)
  rec = phantom.simulate(5, 6, "flash", stress="mixed", variability="wide")
  errors, moved = [], []  # sd (%) of the measured log gain's error, and of the true one
  for raw, mask, times, truth in zip(rec["raw"], rec["mask"], rec["times"],
                                     rec["frame_gain_true"]):
    out = fg.frame_gain(raw, mask, times)
    if out["reason"]:
      continue
    errors.append(fg.sd_percent(out["gain"] / truth))  # the sd ignores the gains' scales
    moved.append(fg.sd_percent(truth))
  # seed 5: errors 0.1-0.7 % where the gain moved by 0.6-4 %
  assert len(errors) >= 3 and max(errors) < 1.0 and np.median(errors) < np.median(moved) / 3
