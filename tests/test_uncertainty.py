"""U per slice, the uncertain sector, ROC/AUC/Youden on hand cases, TTA and MC-dropout baselines."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfjax import sectors, uncertainty
from perfjax.errors import InputError
from test_sectors import ring_mask


def test_total_variation_hand():
  um = np.array([[0.0, 1.0], [3.0, 3.0]])
  assert uncertainty.total_variation(um, np.ones((2, 2), bool)) == pytest.approx(3 + 2 + 1 + 0)
  region = np.array([[True, False], [True, True]])
  assert uncertainty.total_variation(um, region) == pytest.approx(3 + 0)


@pytest.mark.parametrize("dilation", [0, 2])
def test_constant_um_inside_myocardium_gives_c(dilation):
  seg = ring_mask()
  um = np.where(seg == 1, 0.3, 0.0)
  r = uncertainty.slice_uncertainty(um, seg, dilation=dilation)
  assert r["ok"] and r["problem"] is None
  assert r["U"] == pytest.approx(0.3) and r["one_minus_U"] == pytest.approx(0.7)
  np.testing.assert_allclose(r["per_sector"], 0.3)
  assert r["area"].sum() == (seg == 1).sum()
  np.testing.assert_array_equal(r["area"], np.bincount(sectors.sector_map(seg, 6, 1)[seg == 1])[1:])


def test_dilated_region_counts_pixels_outside_myocardium():
  seg = ring_mask()
  um = np.full(seg.shape, 0.1)
  r0 = uncertainty.slice_uncertainty(um, seg, dilation=0)
  assert r0["U"] == pytest.approx(0.1)
  r2 = uncertainty.slice_uncertainty(um, seg, dilation=2)
  # Brute force M_k: pixels within Euclidean distance 2 of a myocardium pixel, in wedge k.
  rows, cols = np.nonzero(seg == 1)
  grid_r, grid_c = np.indices(seg.shape)
  d2 = np.min((grid_r[..., None] - rows) ** 2 + (grid_c[..., None] - cols) ** 2, axis=-1)
  wedge = sectors.angular_index(seg.shape, sectors.lv_centroid(seg), sectors.septal_angle(seg))
  m = np.array([np.sum((d2 <= 4) & (wedge == k)) for k in range(1, 7)])
  np.testing.assert_allclose(r2["per_sector"], 0.1 * m / r0["area"])
  assert r2["U"] > r0["U"]


@pytest.mark.parametrize("sector,angle", [(4, 270.0), (1, 90.0), (6, 30.0)])
def test_uncertain_sector_where_the_bump_is(sector, angle):
  seg = ring_mask()
  rows, cols = np.indices(seg.shape)
  br, bc = 32 - 13 * np.sin(np.radians(angle)), 32 + 13 * np.cos(np.radians(angle))
  bump = 0.4 * np.exp(-((rows - br) ** 2 + (cols - bc) ** 2) / (2 * 2.0 ** 2))
  um = 0.02 + bump
  r = uncertainty.slice_uncertainty(um, seg)
  assert r["uncertain_sector"] == sector
  assert int(np.argmax(r["per_sector"])) + 1 == sector


def test_empty_sector_and_degenerate_segmentation_are_uncertain():
  seg = ring_mask()
  um = np.where(seg == 1, 0.1, 0.0)
  smap = sectors.sector_map(seg, 6, 1)
  cut = np.where(smap == 2, 0, seg)
  r = uncertainty.slice_uncertainty(um, cut, theta_s=180.0, center=(32.0, 32.0))
  assert not r["ok"] and r["U"] == np.inf and r["one_minus_U"] == -np.inf
  assert "[2]" in r["problem"] and np.isnan(r["per_sector"][1]) and r["area"][1] == 0
  np.testing.assert_allclose(np.delete(r["per_sector"], 1), 0.1)
  no_rv = np.where(seg == 3, 0, seg)
  r = uncertainty.slice_uncertainty(um, no_rv)
  assert not r["ok"] and r["U"] == np.inf and r["uncertain_sector"] == 0 and "RV" in r["problem"]
  r = uncertainty.slice_uncertainty(um, no_rv, theta_s=180.0, center=(32.0, 32.0))
  assert r["ok"] and r["U"] == pytest.approx(0.1)
  r = uncertainty.slice_uncertainty(um, np.zeros_like(seg))
  assert not r["ok"] and r["one_minus_U"] == -np.inf
  with pytest.raises(InputError):
    uncertainty.slice_uncertainty(um[:10], seg)
  with pytest.raises(InputError):
    uncertainty.slice_uncertainty(np.full(seg.shape, np.nan), seg)
  with pytest.raises(InputError):
    uncertainty.slice_uncertainty(um, seg, dilation=-1)


def test_fallback_orientation_only_where_the_segmentation_has_no_rv_insertion_points():
  seg = ring_mask()
  rng = np.random.default_rng(0)
  um = rng.uniform(0.0, 0.3, seg.shape)
  with_rv = uncertainty.slice_uncertainty(um, seg, fallback_theta_s=0.0)
  assert with_rv["sectors_from"] == "rv_insertion_points"  # the fallback is not used
  assert with_rv["U"] == uncertainty.slice_uncertainty(um, seg)["U"]
  theta_s = sectors.septal_angle(seg)
  no_rv = np.where(seg == 3, 0, seg)
  r = uncertainty.slice_uncertainty(um, no_rv, fallback_theta_s=theta_s)
  assert r["ok"] and r["sectors_from"] == "fallback" and r["problem"] is None
  # Same myocardium, same wedges: the U of the slice with its RV.
  assert r["U"] == pytest.approx(with_rv["U"])
  np.testing.assert_allclose(r["per_sector"], with_rv["per_sector"])
  no_lv = np.where(seg == 2, 0, seg)  # no LV centre: flagged with or without a fallback
  r = uncertainty.slice_uncertainty(um, no_lv, fallback_theta_s=180.0)
  assert not r["ok"] and r["sectors_from"] is None
  b = uncertainty.batch_uncertainty(np.stack([um, um]), np.stack([seg, no_rv]),
                                    fallback_theta_s=180.0)
  assert b["sectors_from"] == ["rv_insertion_points", "fallback"] and b["ok"].all()


def test_batch_uncertainty():
  seg = ring_mask()
  segs = np.stack([seg, np.where(seg == 3, 0, seg)])
  ums = np.stack([np.where(seg == 1, 0.2, 0.0)] * 2)
  b = uncertainty.batch_uncertainty(ums, segs)
  np.testing.assert_allclose(b["U"], [0.2, np.inf])
  assert list(b["ok"]) == [True, False] and b["problems"][0] is None
  assert b["per_sector"].shape == (2, 6) and b["uncertain_sector"].dtype == np.int32


def test_roc_hand_case_without_ties():
  # Positives (OOD) have low scores. P(pos < neg) = (4 + 4 + 4 + 2) / 16 = 0.875.
  scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
  labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  roc = uncertainty.roc_curve(scores, labels)
  np.testing.assert_allclose(roc["thresholds"], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, np.inf])
  np.testing.assert_allclose(roc["tpr"], [0, .25, .5, .75, .75, .75, 1, 1, 1])
  np.testing.assert_allclose(roc["fpr"], [0, 0, 0, 0, .25, .5, .5, .75, 1])
  assert roc["auc"] == pytest.approx(0.875)
  assert uncertainty.auc(scores, labels) == pytest.approx(0.875)
  dice = np.array([0.5, 0.6, 0.7, 0.9, 0.8, 0.9, 1.0, 0.9])
  o = uncertainty.ood_analysis(scores, labels, dice)
  assert o["ok"] and o["auc"] == pytest.approx(0.875)
  assert o["threshold"] == pytest.approx(0.4)  # J = 0.75 - 0 at t = 0.4
  assert o["sensitivity"] == pytest.approx(0.75) and o["specificity"] == 1.0
  assert o["youden"] == pytest.approx(0.75) and o["n_ood"] == 4 and o["n"] == 8
  np.testing.assert_array_equal(o["flagged"], scores < 0.4)
  assert o["dice_unreliable"] == pytest.approx(0.6)
  assert o["dice_reliable"] == pytest.approx((0.9 + 0.8 + 0.9 + 1.0 + 0.9) / 5)


def test_roc_ties_use_the_trapezoid():
  # Pos 0.1 beats 4 negatives; each pos 0.5 beats 3 and ties 1 (half); 0.9 beats none.
  scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.6, 0.7, 0.8])
  labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  roc = uncertainty.roc_curve(scores, labels)
  assert roc["auc"] == pytest.approx((4 + 3.5 + 3.5 + 0) / 16)
  np.testing.assert_allclose(roc["tpr"], [0, .25, .75, .75, .75, .75, 1])
  np.testing.assert_allclose(roc["fpr"], [0, 0, .25, .5, .75, 1, 1])
  # All tied: the diagonal, AUC one half.
  assert uncertainty.auc(np.ones(4), [1, 0, 1, 0]) == pytest.approx(0.5)
  # Perfectly reversed: AUC 0.
  assert uncertainty.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == pytest.approx(0.0)


def test_roc_uncertain_by_definition_and_bad_input():
  scores = np.array([-np.inf, 0.2, 0.9, 0.8])
  labels = np.array([1, 1, 0, 0])
  o = uncertainty.ood_analysis(scores, labels)
  assert o["auc"] == 1.0 and o["threshold"] == pytest.approx(0.8)
  assert list(o["flagged"]) == [True, True, False, False]
  assert np.isnan(o["dice_reliable"])
  one = uncertainty.ood_analysis([0.5, 0.6], [0, 0], [0.8, 0.9])
  assert not one["ok"] and np.isnan(one["auc"]) and not one["flagged"].any()
  assert one["dice_reliable"] == pytest.approx(0.85) and np.isnan(one["dice_unreliable"])
  with pytest.raises(InputError):
    uncertainty.roc_curve([0.5, 0.6], [1, 1])
  with pytest.raises(InputError):
    uncertainty.roc_curve([0.5, np.nan], [1, 0])
  with pytest.raises(InputError):
    uncertainty.roc_curve([0.5, 0.6, 0.7], [1, 0])
  with pytest.raises(InputError):
    uncertainty.roc_curve([0.5, 0.6], [2, 0])
  with pytest.raises(InputError):
    uncertainty.ood_analysis([0.5, 0.6], [1, 0], dice=[0.9])


def _pointwise_apply(params, patches_bhwc):
  """Closed-form per-pixel model: p_myo = sigmoid(4 x - 2) of channel 0, rest background."""
  del params
  a = jax.nn.sigmoid(4.0 * patches_bhwc[..., :1] - 2.0)
  return jnp.concatenate([1.0 - a, a, jnp.zeros_like(a), jnp.zeros_like(a)], axis=-1)


def test_tta_inverts_flips_and_shifts():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 16, 16, 2)).astype(np.float32)
  key = jax.random.key(3)
  ts = uncertainty.tta_transforms(key, 6, max_shift=3, noise_std=0.0)
  assert ts[0]["shift"] == (0, 0) and not ts[0]["flip_rows"]
  assert any(t["flip_rows"] or t["flip_cols"] or t["shift"] != (0, 0) for t in ts[1:])
  out = uncertainty.tta_uncertainty(_pointwise_apply, None, images, key, n_samples=6, max_shift=3,
                                    noise_std=0.0, patch=8, stride=4)
  expected = 1.0 / (1.0 + np.exp(-(4.0 * images[..., 0] - 2.0)))
  np.testing.assert_allclose(out["mean"][..., 1], expected, atol=1e-5)
  np.testing.assert_allclose(out["um"], 0.0, atol=1e-5)
  noisy = uncertainty.tta_uncertainty(_pointwise_apply, None, images, key, n_samples=6, max_shift=3,
                                      noise_std=0.1, patch=8, stride=4)
  assert noisy["um"].shape == (2, 16, 16) and noisy["um"].min() > 0.0
  # p' = 4 p (1 - p): the std is about 0.1 * 4 p (1 - p), within sampling error of 5 draws.
  ratio = noisy["um"] / (0.4 * expected * (1 - expected))
  assert 0.5 < np.median(ratio) < 1.5
  with pytest.raises(InputError):
    uncertainty.tta_transforms(key, 1)


def test_mc_dropout_uncertainty():
  from perfjax.model import UNet
  images = np.random.default_rng(1).uniform(size=(1, 16, 16, 2)).astype(np.float32)
  model = UNet(features=2, depth=2, dropout_rate=0.5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
  out = uncertainty.mc_dropout_uncertainty(model, variables, images, jax.random.key(1),
                                           n_samples=3, patch=8, stride=8)
  assert out["um"].shape == (1, 16, 16) and out["segmentation"].shape == (1, 16, 16)
  assert out["um"].max() > 0.0
  np.testing.assert_allclose(out["mean"].sum(-1), 1.0, atol=1e-5)
  again = uncertainty.mc_dropout_uncertainty(model, variables, images, jax.random.key(1),
                                             n_samples=3, patch=8, stride=8)
  np.testing.assert_array_equal(out["um"], again["um"])  # deterministic from the key
  # A slice's masks come from its windows' places in it: alone, or beside others, the same.
  others = np.random.default_rng(2).uniform(size=(2, 16, 16, 2)).astype(np.float32)
  batch = uncertainty.mc_dropout_uncertainty(model, variables, np.concatenate([others, images]),
                                             jax.random.key(1), n_samples=3, patch=8, stride=4,
                                             chunk_size=5)
  alone = uncertainty.mc_dropout_uncertainty(model, variables, images, jax.random.key(1),
                                             n_samples=3, patch=8, stride=4)
  np.testing.assert_allclose(batch["um"][2], alone["um"][0], atol=1e-6)
  with pytest.raises(InputError):
    uncertainty.mc_dropout_uncertainty(UNet(features=2, depth=2), variables, images,
                                       jax.random.key(1), n_samples=3, patch=8, stride=8)


def test_pixel_entropy_hand():
  probs = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
  np.testing.assert_allclose(uncertainty.pixel_entropy(probs), [1.0, 0.0, 0.5])


@pytest.mark.parametrize("dilation", [0, 1, 3])
def test_entropy_score_is_the_mean_over_the_dilated_myocardium(dilation):
  seg = ring_mask()
  myo = seg == 1
  probs = np.zeros(seg.shape + (4,))
  probs[..., 0] = 1.0
  probs[myo] = [0.5, 0.5, 0.0, 0.0]  # normalised entropy 0.5 in the myocardium, 0 elsewhere
  region = uncertainty.dilate(myo, dilation)
  expected = 1.0 - 0.5 * myo.sum() / region.sum()
  assert uncertainty.entropy_score(probs, seg, dilation) == pytest.approx(expected)
  assert (dilation == 0) == (expected == 0.5)


def test_entropy_score_extremes_and_bad_input():
  seg = ring_mask()
  uniform = np.full(seg.shape + (4,), 0.25)
  assert uncertainty.entropy_score(uniform, seg) == pytest.approx(0.0)
  one_hot = np.eye(4)[seg]
  assert uncertainty.entropy_score(one_hot, seg) == pytest.approx(1.0)
  assert uncertainty.entropy_score(one_hot, np.zeros_like(seg)) == -np.inf  # no myocardium
  b = uncertainty.batch_entropy_score(np.stack([uniform, one_hot]), np.stack([seg, seg]))
  np.testing.assert_allclose(b, [0.0, 1.0], atol=1e-12)
  with pytest.raises(InputError):
    uncertainty.entropy_score(uniform[:10], seg)
  with pytest.raises(InputError):
    uncertainty.entropy_score(uniform, seg, dilation=-1)


def test_ensemble_scores_golden_values():
  seg = ring_mask()
  n_classes = 4
  agree = np.zeros(seg.shape + (n_classes,))
  agree[..., 0] = 0.9
  agree[..., 1] = 0.1
  swapped = agree[..., [1, 0, 2, 3]]
  h_member = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(4)  # 0.2345
  same = uncertainty.ensemble_scores(np.stack([agree, agree])[:, None], seg[None], dilation=0)
  assert same["ensemble_mi"][0] == pytest.approx(1.0)  # soft but unanimous: no disagreement
  assert same["ensemble_entropy"][0] == pytest.approx(1.0 - h_member)
  split = uncertainty.ensemble_scores(np.stack([agree, swapped])[:, None], seg[None], dilation=0)
  # The mean is (0.5, 0.5): entropy log 2 / log 4 = 0.5; MI = 0.5 - h_member.
  assert split["ensemble_entropy"][0] == pytest.approx(0.5)
  assert split["ensemble_mi"][0] == pytest.approx(1.0 - (0.5 - h_member))
  empty = uncertainty.ensemble_scores(np.stack([agree, agree])[:, None],
                                      np.zeros_like(seg)[None])
  assert empty["ensemble_mi"][0] == -np.inf and empty["ensemble_entropy"][0] == -np.inf
  with pytest.raises(InputError, match="M >= 2"):
    uncertainty.ensemble_scores(agree[None, None], seg[None])
