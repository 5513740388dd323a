"""Failure types made from clean slices (perfjax.data.failures) on hand cases, the failure set,
and every score evaluated per failure type (a tiny untrained model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfjax.configs import patch3
from perfjax import failure_figures
from perfjax import ood
from perfjax.data import failures
from perfjax.errors import InputError
from perfjax.model import make_model
from test_sectors import ring_mask


def _frames_image(values, size=4):
  """[size, size, T] whose frame t is the constant values[t]."""
  return np.broadcast_to(np.asarray(values, np.float32), (size, size, len(values))).copy()


def test_normalise_hand():
  np.testing.assert_allclose(failures.normalise([[[1.0, 3.0]]]), [[[0.0, 1.0]]])
  np.testing.assert_array_equal(failures.normalise(np.full((2, 2, 3), 7.0)), 0.0)


def test_shifted_window_late_and_early():
  image = _frames_image(np.arange(8.0))
  late = failures.shifted_window(image, 3)  # frames 3, 4, 5, 6, 7, 7, 7, 7
  np.testing.assert_allclose(late[0, 0], (np.array([3, 4, 5, 6, 7, 7, 7, 7]) - 3) / 4)
  early = failures.shifted_window(image, -2)  # frames 0, 0, 0, 1, 2, 3, 4, 5
  np.testing.assert_allclose(early[0, 0], np.array([0, 0, 0, 1, 2, 3, 4, 5]) / 5)
  assert [failures.shifted_peak(5, 3, 8), failures.shifted_peak(6, -2, 8),
          failures.shifted_peak(1, 3, 8)] == [2, 7, 0]


def _blob_series(frames=30):
  rows, cols = np.indices((64, 64))
  blob = np.exp(-((rows - 32.0) ** 2 + (cols - 32.0) ** 2) / (2 * 3.0 ** 2))
  return np.repeat(blob[..., None], frames, axis=-1).astype(np.float32)


def _centroid(frame):
  rows, cols = np.indices(frame.shape)
  return np.array([(rows * frame).sum(), (cols * frame).sum()]) / frame.sum()


def test_residual_motion_keeps_the_peak_frame_and_moves_the_others_by_about_the_amplitude():
  image = _blob_series()
  still = failures.residual_motion(image, 12, 0.0, np.random.default_rng(0))
  np.testing.assert_allclose(still, image, atol=1e-6)
  moved = failures.residual_motion(image, 12, 6.0, np.random.default_rng(0))
  np.testing.assert_allclose(moved[..., 12], image[..., 12], atol=1e-6)
  offsets = np.array([np.linalg.norm(_centroid(moved[..., t]) - 32.0) for t in range(30)])
  assert offsets[12] < 1e-6 and 3.0 < offsets.max() < 6.0 * 1.5


def test_dark_rim_darkens_only_the_endocardial_band_during_the_first_pass():
  seg = ring_mask()
  enhancement = np.array([0.0, 0.5, 1.0, 1.0])
  image = np.where(seg[..., None] == 2, enhancement, np.where(seg[..., None] == 1, 0.5, 0.2))
  out = failures.dark_rim(image, seg, depth=0.6, width_px=2)
  lv_rows, lv_cols = np.nonzero(seg == 2)  # brute force: within 2 px of an LV pixel
  grid_r, grid_c = np.indices(seg.shape)
  d2 = np.min((grid_r[..., None] - lv_rows) ** 2 + (grid_c[..., None] - lv_cols) ** 2, axis=-1)
  band = (seg == 1) & (d2 <= 4)
  assert 0 < band.sum() < (seg == 1).sum()
  rest = ~band
  np.testing.assert_allclose(out[rest], image[rest], atol=1e-6)  # min 0, max 1 unchanged
  np.testing.assert_allclose(out[band], np.broadcast_to(0.5 * (1 - 0.6 * enhancement),
                                                       out[band].shape), atol=1e-6)


def test_ghosting_adds_a_half_field_of_view_copy():
  image = np.random.default_rng(1).uniform(size=(6, 6, 3)).astype(np.float32)
  out = failures.ghosting(image, np.random.default_rng(0), strength=0.5)
  candidates = [failures.normalise(image + 0.5 * np.roll(image, 3, axis=a)) for a in (0, 1)]
  assert any(np.allclose(out, c, atol=1e-6) for c in candidates)


def test_banding_is_a_dark_line_of_the_given_depth():
  seg = ring_mask()
  image = np.ones(seg.shape + (3,), np.float32)
  image[..., 0] = 0.0  # keeps min 0 and max 1: the output is the band profile itself
  out = failures.banding(image, seg, np.random.default_rng(0), depth=0.8, width_px=2.0)
  frame = out[..., 1]
  assert 0.2 <= frame.min() < 0.25 and frame.max() > 0.99
  np.testing.assert_allclose(out[..., 2], frame) and np.testing.assert_array_equal(out[..., 0], 0)


def test_beyond_apex_leaves_no_heart():
  seg = ring_mask()
  rows, cols = np.indices(seg.shape)
  # Heart values inside the background's range: the normalisation is the same before and after.
  image = np.where(seg[..., None] > 0, 0.1 * seg[..., None], (rows + cols)[..., None] / 200.0)
  image = image * np.array([1.0, 2.0])  # two frames
  out, mask = failures.beyond_apex(image, seg)
  assert not mask.any() and mask.shape == seg.shape
  outside = failures.normalise(image)[seg == 0]
  heart = out[seg > 0]
  nearest = np.abs(heart[:, None, :] - outside[None, :, :]).max(axis=-1).min(axis=1)
  assert nearest.max() < 1e-6  # every heart pixel took the time curve of an outside pixel


def test_failure_set_layout_and_determinism():
  kept = ("motion_2px", "window_late", "other_domain")
  data = failures.failure_set(3, 1, "bssfp", kept)
  assert list(data["failure"]) == ["none", *kept]
  np.testing.assert_array_equal(data["ood"], [False, True, True, True])
  np.testing.assert_array_equal(data["source"], [0, 0, 0, 0])
  assert data["image"].shape == (4, 128, 128, 30) and data["mask"].shape == (4, 128, 128)
  assert 0.0 == data["image"].min() and data["image"].max() == 1.0
  assert data["peak_lv_frame"][2] == max(data["peak_lv_frame"][0] - 10, 0)
  again = failures.failure_set(3, 1, "bssfp", kept)
  np.testing.assert_array_equal(again["image"], data["image"])
  with pytest.raises(InputError):
    failures.failure_set(3, 1, "bssfp", ("earthquake",))
  with pytest.raises(InputError):
    failures.corrupt("other_domain", data["image"][0], data["mask"][0], 5, None)


@pytest.mark.slow  # Compiles and runs a (tiny, untrained) UNet at two strides and under TTA.
def test_failure_evaluation_scores_every_type_and_group(tmp_path):
  config = patch3.get_config("tiny")
  model = make_model(config)
  variables = {"params": model.init(jax.random.key(0),
                                    jnp.zeros((1, 64, 64, 30), jnp.float32))["params"]}
  data = failures.failure_set(3, 1, "bssfp", ("motion_8px", "ghosting"))
  res = ood.failure_evaluation(model, variables, config, data, figure_dir=str(tmp_path))
  assert res["ood_score"] == "U"
  assert res["figures"] == ["roc_motion.png", "roc_artefact.png", "roc_all.png",
                            "dice_vs_scores.png", "examples.png"]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(res["figures"])
  page = ood.failure_markdown(dict(seed=3, n_slices=1, protocol="bssfp", **res))
  assert "](ood_failures_figures/roc_motion.png)" in page and "## Figures" in page
  assert res["n_clean"] == 1 and res["scores"] == ["U", "entropy", "frame_motion", "tta"]
  assert set(res["by_type"]) == {"motion_8px", "ghosting"}
  assert set(res["by_group"]) == {"motion", "artefact"}
  for by_score in [res["all"], *res["by_type"].values(), *res["by_group"].values()]:
    for name, summary in by_score.items():
      assert summary["score"] == name and summary["n_negative"] == 1
      assert len(summary["auc_ci"]) == 2
  assert res["all"]["U"]["n_positive"] == 2 and res["by_type"]["ghosting"]["tta"]["n_positive"] == 1
  assert len(res["slices"]["entropy"]) == len(res["slices"]["failure"]) == 3
  # 8 px of breathing moves the heart between frames; the clean phantom slice stands still.
  assert res["by_type"]["motion_8px"]["frame_motion"]["auc"] == 1.0


def test_example_indices_pick_the_same_heart_once_per_type():
  data = dict(failure=np.array(["none", "none", "motion_2px", "motion_2px", "banding",
                                "banding"]),
              source=np.array([0, 1, 0, 1, 1, 0]))
  assert failure_figures.example_indices(data) == [0, 2, 5]
  assert failure_figures.example_indices(data, source=1) == [1, 3, 4]


def test_group_of_every_failure_type():
  assert failure_figures.group_of(failures.CLEAN) == failure_figures.CLEAN_GROUP
  assert failure_figures.group_of("motion_phantom") == "motion"
  assert failure_figures.group_of("beyond_apex") == "slice_level"
  assert set(map(failure_figures.group_of, failures.FAILURE_TYPES)) == set(
      failures.FAILURE_GROUPS)
  with pytest.raises(InputError):
    failure_figures.group_of("earthquake")
