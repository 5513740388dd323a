"""`predict` flags slices by the configured OOD score (eval.ood_score) against that score's
threshold from results.json, and says which score and threshold flagged each slice; the default
(the paper's U) flags exactly as before (1 - U < ood.threshold)."""
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from perfjax import checkpoints
from perfjax import predict
from perfjax import predict_files
from perfjax import uncertainty
from perfjax.data import phantom
from perfjax.data import preprocess
from perfjax.data import writers


def _write_results(workdir, payload):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(payload, f)


def test_threshold_of_each_score_comes_from_results_json(tmp_path):
  assert predict.ood_threshold(str(tmp_path)) == (None, None)  # not evaluated yet
  results = dict(ood=dict(score="entropy", labels="motion", threshold=0.8),
                 ood_all=dict(motion=dict(score="U", threshold=0.9, baselines=dict(
                     entropy=dict(score="entropy", threshold=0.8),
                     tta=dict(score="tta", threshold=None)))))
  _write_results(tmp_path, results)
  t, where = predict.ood_threshold(str(tmp_path), "entropy")
  assert t == 0.8 and where.endswith("ood.threshold (labels 'motion')")
  t, where = predict.ood_threshold(str(tmp_path), "U")
  assert t == 0.9 and "ood_all.motion.threshold" in where
  assert predict.ood_threshold(str(tmp_path), "tta") == (None, None)  # no threshold (NaN)
  assert predict.ood_threshold(str(tmp_path), "mc_dropout") == (None, None)  # not evaluated
  # A results.json from before ood.score: its threshold is the paper's U's.
  _write_results(tmp_path, dict(ood=dict(labels="motion", threshold=0.7)))
  assert predict.ood_threshold(str(tmp_path))[0] == 0.7
  assert predict.ood_threshold(str(tmp_path), "entropy") == (None, None)


def test_site_warning_only_when_most_of_a_batch_is_flagged_beyond_chance(tmp_path):
  # 6 of 8 flagged where 10 % of in-distribution slices were: binomial p = 2e-5.
  text = predict.site_warning(6, 8, 0.1)
  assert text.startswith("6 of 8 slices (75%) are flagged OOD, against 10% of in-distribution "
                         "slices of the labelled data (binomial p = 2e-05): the input as a whole")
  assert predict.site_warning(3, 8, 0.1) is None  # under half: slices to check, not a site
  assert predict.site_warning(4, 4, 0.1) is None  # too few slices to say
  assert predict.site_warning(5, 8, 0.6) is None  # as often as in-distribution slices
  assert predict.site_warning(5, 8, None).startswith("5 of 8 slices (62%) are flagged OOD: ")
  assert predict.site_warning(8, 8, 0.0) is not None  # a rate of 0 is floored, not divided by
  # The in-distribution rate: 1 - specificity of the score's ROC in results.json.
  assert predict.in_distribution_flag_rate(str(tmp_path)) is None
  _write_results(tmp_path, dict(ood=dict(score="U", labels="motion", threshold=0.8,
                                         specificity=0.9),
                                ood_all=dict(motion=dict(baselines=dict(
                                    entropy=dict(threshold=0.5, specificity=0.75))))))
  assert predict.in_distribution_flag_rate(str(tmp_path)) == pytest.approx(0.1)
  assert predict.in_distribution_flag_rate(str(tmp_path), "entropy") == pytest.approx(0.25)
  assert predict.in_distribution_flag_rate(str(tmp_path), "tta") is None


@pytest.mark.slow  # The session's tiny trained run; 2 slices predicted twice.
def test_predict_flags_by_the_configured_score(tiny_run, tmp_path):
  config, trained, _ = tiny_run
  # A copy of the run (the shared one is read only) whose results.json has finite thresholds
  # (the tiny run's own are infinite: it segments little), one per score.
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(trained, "best"), os.path.join(workdir, "best"))
  shutil.copy(os.path.join(trained, "config.json"), os.path.join(workdir, "config.json"))
  results = dict(ood=dict(score="U", labels="motion", threshold=0.5),
                 ood_all=dict(motion=dict(score="U", threshold=0.5, baselines=dict(
                     entropy=dict(score="entropy", threshold=0.25)))))
  _write_results(workdir, results)
  sim = phantom.simulate(7, 2, "bssfp")
  folder = tmp_path / "in"
  for i in range(2):
    writers.write_nifti(folder / f"slice{i}.nii.gz", sim["raw"][i], pixel_mm=(1.4, 1.4),
                        times=sim["times"][i])

  rows = predict.predict(config, workdir, str(folder), str(tmp_path / "u"))
  t_u = 0.5
  for r in rows:  # The default: 1 - U against ood.threshold, as before.
    assert r["status"] in ("ok", "warning") and r["ood_score"] == "U"
    assert r["ood_score_value"] == r["one_minus_U"] and r["ood_threshold"] == t_u
    assert r["ood_flag"] == bool(r["one_minus_U"] < t_u)
  on_disk = json.loads((tmp_path / "u" / "slices.json").read_text())
  assert on_disk["ood_score"] == "U" and on_disk["ood_threshold"] == t_u
  assert on_disk["batch_warning"] is None  # 2 slices: too few for a batch-level warning
  header = (tmp_path / "u" / "slices.csv").read_text().splitlines()[0].split(",")
  assert header[header.index("ood_flag") + 1:header.index("ood_flag") + 4] == [
      "ood_score", "ood_score_value", "ood_threshold"]

  entropy_config = ml_collections.ConfigDict(config.to_dict())
  entropy_config.eval.ood_score = "entropy"
  again = predict.predict(entropy_config, workdir, str(folder), str(tmp_path / "entropy"))
  t_e = 0.25
  model, variables = checkpoints.load_params(config, workdir, "best")
  slices, _ = predict_files.read_inputs(str(folder))
  for r, u_row, s in zip(again, rows, slices):
    assert r["ood_score"] == "entropy" and r["ood_threshold"] == t_e
    assert r["one_minus_U"] == u_row["one_minus_U"]  # U is still reported
    pred = predict.predict_arrays(model, variables, s["image"][None],
                                  np.array([s["peak_lv_frame"]]), config, with_um=False,
                                  progress=False)
    expected = uncertainty.batch_entropy_score(pred["probs"], pred["segmentation"])[0]
    np.testing.assert_allclose(r["ood_score_value"], expected, rtol=1e-6)
    assert r["ood_flag"] == bool(r["ood_score_value"] < t_e)
  on_disk = json.loads((tmp_path / "entropy" / "slices.json").read_text())
  assert on_disk["ood_score"] == "entropy" and on_disk["ood_threshold"] == t_e
  assert on_disk["ood_threshold_source"].endswith(
      "ood_all.motion.baselines.entropy.threshold (labels 'motion')")


def test_orientation_warning_only_when_the_rv_is_not_on_the_left():
  masks = phantom.simulate(3, 6, "bssfp", rotation_deg=30.0, workers=1)["mask"]
  assert all(predict.orientation_warning(m) is None for m in masks)  # +-30 deg rotations
  for turned in (np.fliplr(masks[0]), np.rot90(masks[0], 2)):  # mirrored; rotated 180 deg
    text = predict.orientation_warning(turned)
    assert text.startswith("the segmented RV is not on the image's left (septal centre at ")
    assert "from the standard display's 180): the file's orientation may be off" in text
  no_rv = np.where(masks[0] == 3, 0, masks[0])
  assert predict.orientation_warning(no_rv) is None  # no RV insertion points: nothing to say


def test_segmented_lv_offset_from_the_crop_centre(monkeypatch):
  seg = np.zeros((128, 128), np.int32)
  # LV centroid (74.5, 44.5): 10.5 rows down, 19.5 columns left of the crop's centre pixel
  # (64, 64), where preprocess.crop_center puts the centre it is given.
  seg[70:80, 40:50] = 2
  monkeypatch.setattr(predict, "predict_arrays", lambda *a, **k: dict(segmentation=seg[None]))
  s = dict(image=np.zeros((128, 128, 30), np.float32), peak_lv_frame=10)
  offset, seg_pass = predict.segmented_lv_offset(None, None, s, None)
  assert offset == pytest.approx((10.5, -19.5))
  marked = np.zeros((200, 200))
  marked[120, 77] = 1  # a crop centred there puts that pixel at the centre the offset is from
  assert np.argwhere(preprocess.crop_center(marked, (120, 77)) == 1).tolist() == [[64, 64]]
  np.testing.assert_array_equal(seg_pass["segmentation"][0], seg)
  seg[:] = 0
  seg[10:14, 10:14] = 2  # 16 pixels: too little to be an LV
  assert predict.segmented_lv_offset(None, None, s, None)[0] is None


def _slice_at(center, candidates=()):
  return dict(mask=None, info=dict(center=center, lv_candidates=list(candidates)))


def test_recentred_moves_the_crop_to_the_model_lv_or_to_the_next_blood_pool(monkeypatch):
  offsets = {}  # the model's LV offset in the crop at each centre (None: no LV there)
  monkeypatch.setattr(predict, "segmented_lv_offset",  # the pass: here, the crop's centre
                      lambda m, v, s, c: (offsets.get(s["info"]["center"]), s["info"]["center"]))
  reread = _slice_at
  first = _slice_at((100.0, 120.0), [(100.0, 120.0), (10.0, 10.0), (150.0, 60.0)])
  offsets[(100.0, 120.0)] = (3.0, 4.0)  # 5 px from the centre: the crop stays
  kept = predict.recentred(first, None, None, None, lambda c: 1 / 0)  # not read again
  assert kept["info"] is first["info"] and kept["crop_centre"] == "LV found from the images"
  assert kept["segmentation_pass"] == (100.0, 120.0)  # not made again for this crop
  offsets[(100.0, 120.0)] = (6.0, 8.0)  # 10 px: cut again there
  moved = predict.recentred(first, None, None, None, reread)
  assert moved["info"]["center"] == (106.0, 128.0) and moved["segmentation_pass"] is None
  assert moved["crop_centre"] == "LV segmented by the model (10 px from the LV found from the images)"
  offsets[(100.0, 120.0)] = None  # no LV: blood pool 2 holds none either, pool 3 does
  offsets[(150.0, 60.0)] = (0.0, 0.0)
  other = predict.recentred(first, None, None, None, reread)
  assert other["info"]["center"] == other["segmentation_pass"] == (150.0, 60.0)
  assert other["crop_centre"] == ("LV segmented by the model (78 px from the LV found from the "
                                  "images; the first crop held none, the one at blood pool 3 did)")
  offsets[(150.0, 60.0)] = None
  none = predict.recentred(first, None, None, None, reread)
  assert none["info"]["center"] == none["segmentation_pass"] == (100.0, 120.0)
  assert none["crop_centre"] == "LV found from the images (the model segments none there)"
  with_mask = predict.recentred(dict(first, mask=np.ones((2, 2))), None, None, None, None)
  assert with_mask["crop_centre"] == "LV of the mask"


def test_each_pass_has_its_own_mirror_tta_switch(tiny_run, small_data_dir):
  """eval.mirror_tta mirrors the segmentation pass only, eval.mirror_tta_um the UM pass only:
  with one on, that pass equals the pass with both on, and the other the pass with both off."""
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  config, workdir, _ = tiny_run
  model, variables = checkpoints.load_params(config, workdir, "best")
  split = datasets.load_split(config.data.dataset, "test", str(small_data_dir))
  images, peak = np.asarray(split["image"])[:1], np.asarray(split["peak_lv_frame"])[:1]

  def run(seg, um):
    c = ml_collections.ConfigDict(config.to_dict())
    c.eval.mirror_tta, c.eval.mirror_tta_um = seg, um
    return predict.predict_arrays(model, variables, images, peak, c, progress=False)

  off, both = run(False, False), run(True, True)
  seg_only, um_only = run(True, False), run(False, True)
  assert not np.allclose(off["probs"], both["probs"]) and not np.allclose(off["um"], both["um"])
  np.testing.assert_array_equal(seg_only["probs"], both["probs"])
  np.testing.assert_array_equal(seg_only["um"], off["um"])
  np.testing.assert_array_equal(um_only["probs"], off["probs"])
  np.testing.assert_array_equal(um_only["um"], both["um"])
  # predict's re-centring hands its segmentation pass on; the same outputs, not made again.
  c = ml_collections.ConfigDict(config.to_dict())
  c.eval.mirror_tta, c.eval.mirror_tta_um = True, False
  given = predict.predict_arrays(model, variables, images, peak, c, progress=False,
                                 segmentation_pass={k: seg_only[k] for k in ("probs",
                                                                              "segmentation")})
  for k in ("probs", "segmentation", "um"):
    np.testing.assert_array_equal(given[k], seg_only[k])
