"""Preprocessing: truncation, resampling, LV-centred crop, normalisation, LV and peak detection,
bad input."""
import numpy as np
import pytest

from perfjax.data import preprocess
from perfjax.errors import InputError

LV_CENTER = (50, 55)
RV_CENTER = (50, 30)


def _curve(n_t, onset, amp, rise=(0.3, 0.8, 1.0, 0.85, 0.6, 0.45), tail=0.35):
  """Hand-made blood curve: 0 before `onset`, then `rise * amp`, then a plateau `tail * amp`."""
  c = np.full(n_t, tail * amp, np.float32)
  c[:onset] = 0.0
  c[onset:onset + len(rise)] = amp * np.asarray(rise[:max(0, n_t - onset)], np.float32)
  return c


def toy_slice(n_t=40, size=96, lv_onset=10, rv_onset=8, noise=0.0, seed=0):
  """A disk LV (late, brightest) with a myocardial ring, a disk RV to its left (early)."""
  rows, cols = np.mgrid[:size, :size]
  r_lv = np.hypot(rows - LV_CENTER[0], cols - LV_CENTER[1])
  r_rv = np.hypot(rows - RV_CENTER[0], cols - RV_CENTER[1])
  mask = np.zeros((size, size), np.int32)
  mask[r_lv < 16] = 1
  mask[r_lv < 10] = 2
  mask[(r_rv < 8) & (mask == 0)] = 3
  lv, rv = _curve(n_t, lv_onset, 1.0), _curve(n_t, rv_onset, 0.9)
  myo = 0.25 * _curve(n_t, lv_onset + 2, 1.0, rise=(0.2, 0.5, 0.8, 1.0, 1.0, 0.9), tail=0.8)
  image = np.full((size, size, n_t), 0.2, np.float32)
  image[mask == 2] += lv
  image[mask == 3] += rv
  image[mask == 1] += myo
  if noise:
    image += np.random.default_rng(seed).normal(0, noise, image.shape).astype(np.float32)
  times = np.cumsum(np.full(n_t, 0.8)) - 0.8
  return image, times, mask, lv


# ----------------------------------------------------------------------------- validation


def test_validate_slice_passes_and_converts():
  image, times, mask, _ = toy_slice()
  img, t, m = preprocess.validate_slice(image.astype(np.float64), times, mask)
  assert img.dtype == np.float32 and m.dtype == np.int32 and t.shape == (40,)


@pytest.mark.parametrize("bad, match", [
    (lambda im: im[..., 0], "rank 2"),
    (lambda im: im[..., None], "rank 4"),
    (lambda im: im[..., :29], "29 time frames"),
    (lambda im: np.where(np.arange(im.size).reshape(im.shape) == 5, np.nan, im), "NaN/Inf"),
    (lambda im: np.where(np.arange(im.size).reshape(im.shape) == 7, np.inf, im), "NaN/Inf"),
    (lambda im: im[:8, :8], "too small"),
    (lambda im: im.astype(str), "real numbers"),
    (lambda im: im.astype(np.complex64), "real numbers"),
])
def test_bad_images(bad, match):
  image, times, _, _ = toy_slice()
  image = bad(image)
  t = times[:image.shape[-1]] if image.ndim == 3 else times
  with pytest.raises(InputError, match=match) as e:
    preprocess.validate_slice(image, t, source="slice_7.nii.gz")
  assert str(e.value).startswith("slice_7.nii.gz: ")


@pytest.mark.parametrize("times, match", [
    (lambda t: t[::-1], "not strictly increasing"),
    (lambda t: np.where(np.arange(t.size) == 12, t[11], t), "frame 11"),
    (lambda t: t[:-1], "shape"),
    (lambda t: np.where(np.arange(t.size) == 3, np.nan, t), "NaN/Inf"),
])
def test_bad_times(times, match):
  image, t, _, _ = toy_slice()
  with pytest.raises(InputError, match=match):
    preprocess.validate_slice(image, times(t), source="s")


@pytest.mark.parametrize("mask, match", [
    (lambda m: np.where(m == 3, 4, m), r"outside 0..3: \[4\]"),
    (lambda m: np.where(m == 3, -1, m), r"outside 0..3: \[-1\]"),
    (lambda m: np.where(m == 1, 0, m), "no myocardium"),
    (lambda m: m[:-1], "does not match"),
    (lambda m: m[..., None], "2D"),
    (lambda m: m + 0.5, "non-integer"),
])
def test_bad_masks(mask, match):
  image, times, m, _ = toy_slice()
  with pytest.raises(InputError, match=match):
    preprocess.validate_slice(image, times, mask(m), source="mask.nii")


def test_constant_image_cannot_be_normalised():
  with pytest.raises(InputError, match="constant"):
    preprocess.normalize(np.ones((4, 4, 3), np.float32))


# ----------------------------------------------------------------------------- geometry


def test_normalize_range_and_affine():
  image, _, _, _ = toy_slice()
  out = preprocess.normalize(3.0 * image + 7.0)
  assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
  np.testing.assert_allclose(out, preprocess.normalize(image), atol=1e-6)


def test_crop_center_puts_the_centre_at_64_and_pads_with_the_minimum():
  a = np.zeros((100, 90, 2), np.float32) + 5.0
  a[30, 70] = 9.0
  out = preprocess.crop_center(a, (30.2, 69.6), 128)
  assert out.shape == (128, 128, 2)
  assert out[64, 64, 0] == 9.0 and np.sum(out == 9.0) == 2
  # Rows 30-64 .. 30+63 of the input: rows above input row 0 are padding (the minimum).
  assert np.all(out[:34] == 5.0) and out.min() == 5.0
  m = preprocess.crop_center(np.ones((10, 10), np.int32), (0, 0), 8, fill=0)
  assert m[:4].sum() == 0 and m[:, :4].sum() == 0 and m[4:, 4:].sum() == 16


def test_resample_doubles_and_keeps_labels():
  image, _, mask, _ = toy_slice(n_t=3)
  img, m, zoom = preprocess.resample(image, (2.8, 2.8), 1.4, mask)
  assert img.shape == (192, 192, 3) and m.shape == (192, 192) and zoom == (2.0, 2.0)
  assert set(np.unique(m)) == {0, 1, 2, 3}
  cy, cx = preprocess.lv_center(m)
  # Pixel centres scale as (x + 0.5) * 2 - 0.5.
  assert abs(cy - (2 * LV_CENTER[0] + 0.5)) < 0.6 and abs(cx - (2 * LV_CENTER[1] + 0.5)) < 0.6
  # Areas scale with the zoom squared.
  assert abs((m == 2).sum() / (mask == 2).sum() - 4.0) < 0.15
  same, _, z = preprocess.resample(image, 1.4, 1.4)
  assert same is image and z == (1.0, 1.0)
  with pytest.raises(InputError, match="positive"):
    preprocess.resample(image, (0.0, 1.0))


def test_lv_center_from_mask():
  _, _, mask, _ = toy_slice()
  cy, cx = preprocess.lv_center(mask)
  assert abs(cy - LV_CENTER[0]) < 1e-6 and abs(cx - LV_CENTER[1]) < 1e-6


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_five_baseline_frames_before_arrival():
  image, times, _, _ = toy_slice(n_t=45, lv_onset=15, rv_onset=13)
  # The top 1 % of pixels are LV (amplitude 1.0): its curve passes 10 % at frame 15.
  assert preprocess.bolus_arrival(image) == 15
  img, t, start = preprocess.truncate_first_pass(image, times)
  assert start == 10 and img.shape[-1] == 30 and t[0] == 0.0
  np.testing.assert_allclose(t, times[10:40] - times[10], atol=1e-6)


@pytest.mark.parametrize("n_t", [30, 36, 49, 64, 93])
@pytest.mark.parametrize("onset", [2, 3, 6, 9, 14, 25])
def test_arrival_lands_inside_the_training_range_for_any_length(n_t, onset):
  """After truncation the bolus arrives at frame 5 (the wide phantom's arrivals span 1-13),
  earlier only when the series has fewer baseline frames, and the first pass is kept."""
  if onset + 8 > n_t:
    pytest.skip("the first pass would not fit the series")
  image, times, _, _ = toy_slice(n_t=n_t, size=64, lv_onset=onset, rv_onset=max(onset - 2, 0))
  img, t, start = preprocess.truncate_first_pass(image, times)
  arrival = preprocess.bolus_arrival(img)
  assert img.shape[-1] == 30 and t[0] == 0.0 and arrival == onset - start
  if onset - preprocess.N_PRE <= n_t - 30:  # room for the window: arrival at frame N_PRE
    assert arrival == min(onset, preprocess.N_PRE), (arrival, start)
  else:  # the series ends early: the window is moved back, the first pass still inside
    assert start == n_t - 30
  assert arrival + 6 <= 30  # the rise and peak are inside the kept window


def test_truncation_does_not_depend_on_the_frame_rate():
  """Frame times (one per beat at any heart rate) do not move the kept window."""
  image, _, _, _ = toy_slice(n_t=60, size=64, lv_onset=20, rv_onset=18)
  starts = {preprocess.truncate_first_pass(image, np.arange(60) * rr)[2] for rr in (0.4, 0.8, 1.5)}
  assert starts == {15}


def test_truncation_moves_back_when_the_series_ends():
  image, times, _, _ = toy_slice(n_t=32, lv_onset=20, rv_onset=18)
  assert preprocess.first_pass_start(image) == 2
  image, times, _, _ = toy_slice(n_t=40, lv_onset=2, rv_onset=1)
  assert preprocess.first_pass_start(image) == 0
  assert preprocess.first_pass_start(image[..., :30]) == 0


# ----------------------------------------------------------------------------- LV detection


def test_detect_lv_finds_the_late_blob_not_the_rv():
  image, _, mask, lv_curve = toy_slice(noise=0.03)
  out = preprocess.detect_lv(image)
  assert abs(out["center"][0] - LV_CENTER[0]) < 1.0 and abs(out["center"][1] - LV_CENTER[1]) < 1.0
  assert out["peak_frame"] == int(np.argmax(lv_curve)) == 12
  assert out["lv"][mask == 2].mean() > 0.9 and out["lv"][mask == 3].sum() == 0
  assert out["rv"][mask == 3].mean() > 0.8
  # The candidates: the LV first, then the RV (ruled out by the LV rule, so last).
  assert out["candidates"][0] == out["center"] and len(out["candidates"]) == 2
  rv_rows, rv_cols = np.nonzero(out["rv"])
  assert np.hypot(out["candidates"][1][0] - rv_rows.mean(), out["candidates"][1][1] - rv_cols.mean()) < 1.0


def test_detect_lv_splits_touching_pools_by_onset():
  image, _, mask, _ = toy_slice()
  # Paint the septum between the pools as blood so RV and LV form one connected blob.
  lv, rv = image[LV_CENTER].copy(), image[RV_CENTER].copy()
  image[44:57, 30:40], image[44:57, 40:50] = rv, lv
  out = preprocess.detect_lv(image)
  assert out["lv"][mask == 2].mean() > 0.8 and out["lv"][mask == 3].mean() < 0.1
  assert abs(out["center"][1] - LV_CENTER[1]) < 4.0


def test_no_enhancement_is_an_input_error():
  with pytest.raises(InputError, match="no contrast enhancement"):
    preprocess.detect_lv(np.ones((32, 32, 30), np.float32), source="flat.nii")


# ----------------------------------------------------------------------------- pipeline


def test_preprocess_slice_end_to_end_with_mask_and_without():
  image, times, mask, lv_curve = toy_slice(n_t=45, lv_onset=15, rv_onset=13, noise=0.01)
  raw = 100.0 * image + 20.0
  for m in (mask, None):
    out = preprocess.preprocess_slice(raw, times, m, pixel_mm=2.1, target_pixel_mm=1.4,
                                      source="toy")
    assert out["image"].shape == (128, 128, 30) and out["raw"].shape == (128, 128, 30)
    assert out["image"].min() == 0.0 and out["image"].max() == 1.0
    assert out["frame_start"] == 10 and out["times"][0] == 0.0 and out["times"].shape == (30,)
    assert out["peak_lv_frame"] == int(np.argmax(lv_curve)) - 10
    assert out["zoom"] == (1.5, 1.5)
    # The LV blood pool ends up at the crop centre (found from the mask or the images).
    lv = (out["mask"] == 2) if m is not None else None
    if lv is not None:
      rows, cols = np.nonzero(lv)
      assert abs(rows.mean() - 64) < 1.0 and abs(cols.mean() - 64) < 1.0
      assert set(np.unique(out["mask"])) == {0, 1, 2, 3}
      assert out["lv_candidates"] == []
    else:
      peak = out["raw"][..., out["peak_lv_frame"]]
      assert peak[64, 64] > 0.9 * peak.max()
      assert out["mask"] is None
      assert out["lv_candidates"][0] == out["center"]  # the LV first, the other pools after
  np.testing.assert_allclose(out["image"], preprocess.normalize(out["raw"]), atol=1e-6)


def test_preprocess_slice_crops_at_a_given_centre():
  image, times, mask, _ = toy_slice(n_t=45, lv_onset=15, rv_onset=13, noise=0.01)
  raw = 100.0 * image + 20.0
  by_mask = preprocess.preprocess_slice(raw, times, mask, pixel_mm=2.1, target_pixel_mm=1.4)
  row, col = by_mask["center"]
  moved = preprocess.preprocess_slice(raw, times, mask, pixel_mm=2.1, target_pixel_mm=1.4,
                                      center=(row - 10.0, col + 6.0))  # wins over the mask
  assert moved["center"] == (row - 10.0, col + 6.0)
  rows, cols = np.nonzero(moved["mask"] == 2)  # the LV sits 10 rows down, 6 columns left
  assert abs(rows.mean() - 74) < 1.0 and abs(cols.mean() - 58) < 1.0
  np.testing.assert_array_equal(moved["raw"][10:, :-6], by_mask["raw"][:-10, 6:])
  assert moved["peak_lv_frame"] == by_mask["peak_lv_frame"]


def test_preprocess_needs_times_and_valid_input():
  image, times, mask, _ = toy_slice()
  with pytest.raises(InputError, match="times are required"):
    preprocess.preprocess_slice(image, None)
  with pytest.raises(InputError, match="^bad.nii: .*outside 0..3"):
    preprocess.preprocess_slice(image, times, mask + 1, source="bad.nii")


# ----------------------------------------------------------------------------- on the phantom


@pytest.fixture(scope="module")
def flash():
  from perfjax.data import phantom  # pylint: disable=g-import-not-at-top
  # the detector's accuracy is pinned on the narrow phantom (benchmarks/RESULTS.md); on
  # real images it is measured by benchmarks/real_data.py score --centre=images
  return phantom.simulate(11, 12, "flash", 0.0, variability="narrow")


def test_lv_and_peak_detection_on_phantom_flash(flash):
  errors, dist = [], []
  for i in range(12):
    out = preprocess.detect_lv(flash["image"][i])
    cy, cx = preprocess.lv_center(flash["mask"][i])
    dist.append(np.hypot(out["center"][0] - cy, out["center"][1] - cx))
    assert out["lv"][flash["mask"][i] == 3].mean() < 0.05  # never the RV
    errors.append(out["peak_frame"] - int(flash["peak_lv_frame"][i]))
  assert np.max(dist) < 8.0 and np.mean(np.asarray(dist) < 3.0) >= 11 / 12, dist
  errors = np.abs(errors)
  # On 90 phantom FLASH slices (benchmarks/RESULTS.md): about 3/4 exact, ~all within 1.
  assert np.mean(errors <= 1) >= 0.9 and np.mean(errors == 0) >= 0.5, errors


def test_lv_detection_on_phantom_bssfp_with_motion():
  from perfjax.data import phantom  # pylint: disable=g-import-not-at-top
  d = phantom.simulate(12, 6, "bssfp", 0.5, variability="narrow")
  errors = []
  for i in range(6):
    out = preprocess.detect_lv(d["image"][i])
    cy, cx = preprocess.lv_center(d["mask"][i])
    if not d["motion"][i]:  # motion slices move the LV around the mask's reference frame
      assert np.hypot(out["center"][0] - cy, out["center"][1] - cx) < 3.0
    errors.append(out["peak_frame"] - int(d["peak_lv_frame"][i]))
  # Saturated bSSFP blood flattens the peak: judged within two frames.
  assert np.mean(np.abs(errors) <= 2) >= 0.8, errors


def test_truncation_on_phantom_with_padded_frames(flash):
  rng = np.random.default_rng(0)
  raw = flash["raw"][0]
  noise = 0.01 * raw.max()
  pre = raw[..., :1] + noise * rng.standard_normal(raw.shape[:2] + (8,)).astype(np.float32)
  post = raw[..., -1:] + noise * rng.standard_normal(raw.shape[:2] + (6,)).astype(np.float32)
  padded = np.concatenate([pre, raw, post], -1)
  arrival = preprocess.bolus_arrival(raw)
  assert 1 <= arrival <= 22  # the wide phantom's RV arrives 0-12 beats after the first frame
  assert preprocess.bolus_arrival(padded) == arrival + 8
  times = np.arange(44) * 0.8
  img, t, start = preprocess.truncate_first_pass(padded, times)
  assert start == arrival + 8 - preprocess.N_PRE and img.shape[-1] == 30
  assert start <= int(flash["peak_lv_frame"][0]) + 8 < start + 30


def test_to_original_inverts_the_crop_and_resampling():
  image, times, mask, _ = toy_slice(n_t=45, lv_onset=15, rv_onset=13, size=90)
  out = preprocess.preprocess_slice(image, times, mask, pixel_mm=2.1, target_pixel_mm=1.4)
  assert out["shape"] == (90, 90) and out["resampled_shape"] == (135, 135)
  back = preprocess.to_original(out["mask"], out, labels=True)
  assert back.shape == (90, 90) and back.dtype == np.int32
  assert np.mean(back == mask) > 0.98
  probs = preprocess.to_original(np.ones((128, 128, 4), np.float32), out)
  assert probs.shape == (90, 90, 4)
  # The crop (128 resampled pixels = 85 input pixels) covers the LV; the far border is 0.
  rows, cols = np.nonzero(probs[..., 0] > 0.5)
  assert probs[LV_CENTER[0], LV_CENTER[1], 0] == 1.0 and 80 <= np.ptp(rows) + 1 <= 90


def test_validate_slice_exact_shape():
  image = np.random.default_rng(0).random((128, 128, 30), dtype=np.float32)
  preprocess.validate_slice(image, shape=(128, 128, 30))
  with pytest.raises(InputError, match=r"must have shape \[128, 128, 30\]"):
    preprocess.validate_slice(image[:, :100], shape=(128, 128, 30), source="model input")
