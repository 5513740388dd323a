"""The vectorised frame gains and curves (perfjax.batched_curves) against the numpy rules."""
import warnings

import numpy as np
import pytest

from perfjax import batched_curves, extraction, perfusion
from perfjax.data import phantom


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_masked_quantiles_are_numpys_over_the_valid_entries(q):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 9)).astype(np.float32)
  x[:, 4] = x[:, 3]  # ties
  valid = rng.uniform(size=(6, 9)) < 0.6
  valid[0] = False  # none valid: NaN
  valid[1] = [True] + [False] * 8  # one
  valid[2, :2], valid[2, 2:] = True, False  # two
  want = [np.quantile(row[ok], q) for row, ok in zip(x[1:], valid[1:])]
  got = np.asarray(batched_curves.masked_quantile(x, valid, q))
  presorted = np.asarray(batched_curves.quantile_of_sorted(*batched_curves.sort_once(x), valid, q))
  for values in (got, presorted):
    assert np.isnan(values[0])
    np.testing.assert_allclose(values[1:], want, rtol=1e-6, atol=1e-6)


def _both(raw, masks, times, **kwargs):
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the numpy rules' means of empty pools
    return [perfusion.mbf_from_slices(raw, masks, times, vectorised=v, **kwargs)
            for v in (False, True)]


def test_vectorised_extraction_agrees_with_the_numpy_rules_and_keeps_errors_in_place():
  """Concentration with its flip-angle variants, a study AIF and frame gains; slice 1 has no
  LV blood pool and slice 2 a NaN in it: their errors are the numpy path's, the rest go on.
  Slice 3 has a NaN in one myocardium pixel: that sector's curve alone is NaN. Slices 6 and 7
  (the phantom's 20 and 17) have tissue around the heart that follows the uptake: the gain of
  6 is applied with that uptake regressed out, that of 7 refused."""
  rec = phantom.simulate(41, 21, "flash", 0.0, stress="mixed")
  keep = [0, 1, 2, 3, 4, 5, 20, 17]
  rec = {k: rec[k][keep] for k in ("raw", "mask", "times", "study_id")} | {
      "sequences": [perfusion.sequence_from_record(rec, i) for i in keep]}
  raw, masks = rec["raw"].copy(), rec["mask"].copy()
  masks[1][masks[1] == 2] = 1
  raw[2][tuple(np.argwhere(extraction.curve_geometry(masks[2])["lv"])[0])] = np.nan
  tissue_map = extraction.curve_geometry(masks[3])["tissue_map"]
  raw[3][tuple(np.argwhere(tissue_map == 7)[0]) + (5,)] = np.nan  # one frame of one pixel
  numpy_run, vectorised = _both(raw, masks, rec["times"], sequences=rec["sequences"],
                                study_ids=rec["study_id"])
  assert list(vectorised["error"]) == list(numpy_run["error"])
  assert numpy_run["error"][1].startswith("mask: no LV blood pool")
  assert numpy_run["error"][2] == "raw: NaN or Inf in the LV blood pool signal"
  assert list(vectorised["frame_gain_reason"]) == list(numpy_run["frame_gain_reason"])
  assert list(numpy_run["frame_gain_uptake_removed"]) == [False] * 6 + [True, False]
  assert "is not a gain" in numpy_run["frame_gain_reason"][7]
  np.testing.assert_array_equal(vectorised["frame_gain_uptake_removed"],
                                numpy_run["frame_gain_uptake_removed"])
  assert list(vectorised["aif_source"]) == list(numpy_run["aif_source"])
  for key in ("counts", "n_aif_pixels"):
    np.testing.assert_array_equal(vectorised[key], numpy_run[key], err_msg=key)
  np.testing.assert_allclose(vectorised["frame_gain"], numpy_run["frame_gain"], rtol=1e-5)
  for key in ("aif", "curves"):
    scale = np.nanmax(np.abs(numpy_run[key]))
    np.testing.assert_allclose(vectorised[key], numpy_run[key], atol=1e-5 * scale, err_msg=key)
  np.testing.assert_allclose(vectorised["aif_amplification"], numpy_run["aif_amplification"],
                             rtol=1e-4)
  # Curves within 1e-5 move a sector's Fermi fit by up to a few 0.1 % (slice 6's x1.1 variant:
  # 0.33 %), more where a fit is poorly determined.
  for key in ("slice_mbf", "slice_mbf_flip_lo", "slice_mbf_flip_hi"):
    np.testing.assert_allclose(vectorised[key], numpy_run[key], rtol=5e-3, err_msg=key)
  assert np.isfinite(vectorised["slice_mbf"][[0, 3, 4, 5]]).all()
  broken = np.isnan(vectorised["curves"][3]).any(-1)
  assert broken[6] and broken.sum() == 1 and np.isnan(numpy_run["curves"][3, 6]).any()


def test_vectorised_extraction_of_raw_signal_in_chunks_and_of_too_few_frames_for_a_gain(
    monkeypatch):
  rec = phantom.simulate(7, 3, "bssfp", 0.0, noise=0.0, variability="narrow")
  numpy_run, vectorised = _both(rec["raw"], rec["mask"], rec["times"])
  assert vectorised["units"] == "signal" and not any(vectorised["error"])
  for key in ("aif", "curves"):
    scale = np.nanmax(np.abs(numpy_run[key]))
    np.testing.assert_allclose(vectorised[key], numpy_run[key], atol=1e-5 * scale, err_msg=key)
  np.testing.assert_allclose(vectorised["slice_mbf"], numpy_run["slice_mbf"], rtol=2e-3)
  # Room for 2 slices a call: chunks of 2 and 1, the same curves as one call of 3 (padded to 4).
  monkeypatch.setattr(batched_curves, "CHUNK_ELEMENTS", 2 * rec["raw"][0].size + 1)
  chunked = _both(rec["raw"], rec["mask"], rec["times"])[1]
  for key in ("aif", "curves", "frame_gain"):  # float32 sums of other batch sizes
    scale = np.nanmax(np.abs(vectorised[key]))
    np.testing.assert_allclose(chunked[key], vectorised[key], atol=1e-6 * scale, err_msg=key)
  short = _both(rec["raw"][..., :7], rec["mask"], rec["times"][:, :7], spill_over=False)
  assert [list(r["frame_gain_reason"]) for r in short] == [["too few frames (7)"] * 3] * 2


def test_vectorised_extraction_gives_the_numpy_rules_errors_for_bad_pools_and_sequences():
  """A pool with no pre-contrast signal (no finite AIF) and a sequence without its T1s: each
  is its slice's error, word for word, and the other slice goes on."""
  rec = phantom.simulate(3, 2, "flash", 0.0, noise=0.0, variability="narrow")
  raw = rec["raw"].copy()
  raw[0][rec["mask"][0] == 2] = 0.0
  seqs = [perfusion.sequence_from_record(rec, i) for i in range(2)]
  for bad in (None, 1):
    use = [dict(s) for s in seqs]
    if bad is not None:
      del use[bad]["t1_blood"], use[bad]["t1_myo"]
    numpy_run, vectorised = _both(raw, rec["mask"], rec["times"], sequences=use)
    assert list(vectorised["error"]) == list(numpy_run["error"])
    assert numpy_run["error"][0] == "aif: contains NaN or Inf"
    if bad is not None:
      assert numpy_run["error"][1] == "sequence: missing keys ['t1_blood', 't1_myo']"
    else:
      assert not numpy_run["error"][1]
      np.testing.assert_allclose(vectorised["slice_mbf"], numpy_run["slice_mbf"], rtol=2e-3)


@pytest.mark.parametrize("backend,n,expect", [("cpu", 2, False), ("gpu", 2, True),
                                               ("tpu", 2, True), ("gpu", 1, False)])
def test_the_default_extraction_path_follows_the_backend_and_the_slice_count(
    monkeypatch, backend, n, expect):
  calls = []
  real = batched_curves.curves_of_slices
  monkeypatch.setattr(batched_curves, "curves_of_slices",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(perfusion.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(perfusion, "VECTORISE_MIN_SLICES", 2)
  rec = phantom.simulate(7, n, "bssfp", 0.0, noise=0.0, variability="narrow")
  with np.errstate(all="ignore"):
    perfusion.mbf_from_slices(rec["raw"], rec["mask"], rec["times"], flip_sensitivity=0.0,
                              spill_over=False)
  assert bool(calls) == expect


def test_vectorised_extraction_of_a_two_pixel_pool_and_of_masks_without_myocardium_or_rv():
  """A two-pixel pool (the purity rule keeps all pixels under 4) and masks the sectors cannot
  divide: the same AIF pixels, errors and MBF as the numpy rules."""
  rec = phantom.simulate(5, 4, "bssfp", 0.0)
  masks = rec["mask"].copy()
  pool = np.argwhere(masks[0] == 2)
  masks[0][masks[0] == 2] = 1
  for pixel in pool[len(pool) // 2:len(pool) // 2 + 2]:
    masks[0][tuple(pixel)] = 2
  masks[1][masks[1] == 1] = 0
  masks[2][masks[2] == 3] = 0
  numpy_run, vectorised = _both(rec["raw"], masks, rec["times"],
                                sequences=[perfusion.sequence_from_record(rec, i)
                                           for i in range(4)])
  assert list(vectorised["error"]) == list(numpy_run["error"])
  assert numpy_run["error"][1].startswith("mask: no myocardium")
  assert numpy_run["error"][2].startswith("mask: no RV blood pool")
  np.testing.assert_array_equal(vectorised["n_aif_pixels"], [2, 0, 0, numpy_run["n_aif_pixels"][3]])
  np.testing.assert_array_equal(numpy_run["n_aif_pixels"][:3], [2, 0, 0])
  np.testing.assert_allclose(vectorised["slice_mbf"], numpy_run["slice_mbf"], rtol=2e-3)
