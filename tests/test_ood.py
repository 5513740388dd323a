"""OOD figures of every score: the stratified bootstrap CI of the AUC, the score summaries and
the score named by eval.ood_score, on hand cases."""
import ml_collections
import numpy as np
import pytest

from perfjax import ood, uncertainty
from perfjax.errors import InputError

# Positives (OOD) score low. P(pos < neg) = (4 + 4 + 4 + 2) / 16 = 0.875 (test_uncertainty).
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)


def test_bootstrap_ci_of_perfect_separation_and_of_ties_is_a_point():
  assert ood.auc_bootstrap_ci([0.1, 0.2, 0.3, 0.7, 0.9], [1, 1, 1, 0, 0]) == [1.0, 1.0]
  assert ood.auc_bootstrap_ci([0.9, 0.7, 0.3, 0.2], [1, 1, 0, 0]) == [0.0, 0.0]
  assert ood.auc_bootstrap_ci(np.full(6, 0.5), [1, 1, 1, 0, 0, 0]) == [0.5, 0.5]
  # -inf (uncertain by definition) is the lowest score: a sure positive.
  assert ood.auc_bootstrap_ci([-np.inf, -np.inf, 0.4, 0.5], [1, 1, 0, 0]) == [1.0, 1.0]


def test_bootstrap_ci_is_the_percentile_interval_of_stratified_resamples():
  low, high = ood.auc_bootstrap_ci(SCORES, LABELS, n_samples=500, seed=3)
  # The same resamples drawn by hand: positives from positives, negatives from negatives.
  rng = np.random.default_rng(3)
  pos, neg = SCORES[LABELS], SCORES[~LABELS]
  counts_pos = rng.multinomial(4, np.full(4, 0.25), size=500)
  counts_neg = rng.multinomial(4, np.full(4, 0.25), size=500)
  aucs = [uncertainty.auc(np.concatenate([np.repeat(pos, cp), np.repeat(neg, cn)]),
                          np.repeat([True, False], 4)) for cp, cn in zip(counts_pos, counts_neg)]
  np.testing.assert_allclose([low, high], np.quantile(aucs, [0.025, 0.975]), rtol=0, atol=1e-12)
  assert low < 0.875 < high and high <= 1.0


def test_bootstrap_ci_is_deterministic_and_needs_both_classes():
  assert ood.auc_bootstrap_ci(SCORES, LABELS) == ood.auc_bootstrap_ci(SCORES, LABELS)
  assert np.isnan(ood.auc_bootstrap_ci([0.1, 0.2], [0, 0])).all()
  with pytest.raises(InputError):
    ood.auc_bootstrap_ci(SCORES, LABELS, level=1.0)
  with pytest.raises(InputError):
    ood.auc_bootstrap_ci([0.1, np.nan], [0, 1])


def test_every_score_gets_the_same_figures():
  dice = np.linspace(0.5, 0.9, 8)
  out = ood.ood_summary(SCORES, LABELS, dice, {"entropy": -SCORES})
  for summary, name, auc in ((out, "U", 0.875), (out["baselines"]["entropy"], "entropy", 0.125)):
    assert set(ood.ROC_KEYS) | {"score", "n_positive", "n_negative", "auc_ci"} <= set(summary)
    assert summary["score"] == name and summary["auc"] == pytest.approx(auc)
    assert (summary["n_positive"], summary["n_negative"]) == (4, 4)
    low, high = summary["auc_ci"]
    assert low <= auc <= high


def _config(**eval_fields):
  return ml_collections.ConfigDict(dict(eval=dict(baselines=("tta",), **eval_fields)))


def test_primary_score_is_u_unless_configured():
  assert ood.primary_score(_config()) == "U"
  assert ood.primary_score(_config(ood_score="entropy")) == "entropy"
  assert ood.primary_score(_config(ood_score="tta")) == "tta"
  with pytest.raises(InputError, match="ood_score"):
    ood.primary_score(_config(ood_score="mc_dropout"))  # not among eval.baselines
  assert ood.primary_score(_config(ood_score="U_vote", vote_map=True)) == "U_vote"
  with pytest.raises(InputError, match="ood_score"):
    ood.primary_score(_config(ood_score="U_vote"))  # the vote map is not computed


def test_primary_result_scores_the_named_score():
  scores = {"U": SCORES, "entropy": SCORES[::-1]}
  res = ood.primary_result(scores, LABELS, np.ones(8), "U")
  assert res["score"] == "U" and res["auc"] == pytest.approx(0.875)
  assert (res["n_positive"], res["n_negative"]) == (4, 4)
  assert res["auc_ci"] == ood.auc_bootstrap_ci(SCORES, LABELS)
  np.testing.assert_array_equal(res["flagged"], SCORES < res["threshold"])
  res = ood.primary_result(scores, None, np.ones(8), "entropy")
  assert res["score"] == "entropy" and np.isnan(res["auc"]) and res["n_positive"] == 0
  assert not res["flagged"].any() and len(res["flagged"]) == 8
  with pytest.raises(InputError, match="not computed"):
    ood.primary_result(scores, LABELS, np.ones(8), "tta")


def test_failure_table_gives_each_type_its_counts_and_auc_ci():
  def by_score(n_pos, auc):
    return {"U": dict(score="U", auc=auc, auc_ci=[auc - 0.1, auc + 0.05], n_positive=n_pos,
                      n_negative=12),
            "entropy": dict(score="entropy", auc=float("nan"), auc_ci=[float("nan")] * 2,
                            n_positive=n_pos, n_negative=12)}
  out = dict(seed=0, n_slices=12, protocol="bssfp", ood_score="entropy", n_clean=12,
             scores=["U", "entropy"], by_type={"motion_8px": by_score(12, 0.9)},
             by_group={"motion": by_score(12, 0.9)}, all=by_score(12, 0.9))
  table = ood.failure_table(out).splitlines()
  assert table[0] == "| failures | n+/n- | U | entropy (recommended) |"
  assert table[2:] == ["| motion_8px | 12+/12- | 0.900 [0.800, 0.950] | n/a [n/a, n/a] |",
                       "| group: motion | 12+/12- | 0.900 [0.800, 0.950] | n/a [n/a, n/a] |",
                       "| all failures | 12+/12- | 0.900 [0.800, 0.950] | n/a [n/a, n/a] |"]
  text = ood.failure_markdown(out, "runs/x")
  assert text.startswith("# OOD failure benchmark: runs/x")
  assert "(`eval.ood_score`): entropy" in text


def test_tta_in_chunks_equals_one_call(monkeypatch):
  """The baselines run over chunks of slices (bounded memory, a progress bar); a TTA sample's
  noise is the same for every slice, so a slice's map is the same alone (as predict scores it),
  in chunks or in one call on every slice."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def pointwise(params, patches_bhwc):  # p_myo = sigmoid(4 x - 2) of channel 0
    del params
    a = jax.nn.sigmoid(4.0 * patches_bhwc[..., :1] - 2.0)
    return jnp.concatenate([1.0 - a, a, jnp.zeros_like(a), jnp.zeros_like(a)], axis=-1)

  images = np.random.default_rng(0).uniform(size=(5, 16, 16, 2)).astype(np.float32)
  key = jax.random.key(3)

  def run(chunk):
    return uncertainty.tta_uncertainty(pointwise, None, chunk, key, n_samples=4, noise_std=0.1,
                                       patch=8, stride=4)

  whole = run(images)
  monkeypatch.setattr(ood, "BASELINE_CHUNK", 2)
  chunked = ood._in_chunks(run, images, "tta")  # pylint: disable=protected-access
  assert whole["um"].shape == (5, 16, 16) and whole["um"].min() > 0.0  # the noise is on
  np.testing.assert_allclose(chunked["um"], whole["um"], rtol=1e-6)
  np.testing.assert_array_equal(chunked["segmentation"], whole["segmentation"])
  np.testing.assert_allclose(run(images[2:3])["um"][0], whole["um"][2], rtol=1e-6)  # alone


def test_a_missing_ensemble_member_is_one_clear_error(tmp_path):
  config = _config(ensemble_workdirs=(str(tmp_path),))
  with pytest.raises(InputError, match="no trained model there"):
    ood.check_ensemble(config)
  assert ood.primary_score(_config(ood_score="ensemble_mi", ensemble_workdirs=("w",))) == (
      "ensemble_mi")
  with pytest.raises(InputError, match="unknown score"):
    ood.primary_score(_config(ood_score="ensemble_mi"))  # no ensemble configured


@pytest.mark.slow
def test_an_ensemble_of_a_model_with_itself_has_no_disagreement(tiny_run, small_data_dir):
  from perfjax import checkpoints, predict  # pylint: disable=g-import-not-at-top
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top
  config, workdir, _ = tiny_run
  trained = checkpoints.trained_config(config, workdir)
  trained.eval.baselines = ()
  split = datasets.load_split(trained.data.dataset, "test", str(small_data_dir))
  three = {k: np.asarray(split[k])[:3] for k in ("image", "peak_lv_frame")}
  model, variables = checkpoints.load_params(trained, workdir, "best")
  pred = predict.predict_arrays(model, variables, three["image"], three["peak_lv_frame"],
                                trained, with_um=False, progress=False)
  assert set(ood.other_scores(model, variables, three, pred, trained)) == {"entropy", "frame_motion"}
  trained.eval.ensemble_workdirs = (workdir,)
  scores = ood.other_scores(model, variables, three, pred, trained)
  assert set(scores) == {"entropy", "frame_motion", "ensemble_entropy", "ensemble_mi"}
  np.testing.assert_allclose(scores["ensemble_entropy"], scores["entropy"])
  finite = np.isfinite(scores["entropy"])
  np.testing.assert_allclose(scores["ensemble_mi"][finite], 1.0, atol=1e-12)


def test_u_of_the_vote_map_comes_from_the_same_pass(tiny_run, small_data_dir):
  """eval.vote_map: predict_arrays adds um_vote (the windows' label disagreement) beside UM,
  and U_vote joins the scores, computed as U is from its map."""
  from perfjax import checkpoints, predict  # pylint: disable=g-import-not-at-top
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top
  config, workdir, _ = tiny_run
  trained = checkpoints.trained_config(config, workdir)
  trained.eval.baselines = ()
  trained.eval.vote_map = True
  split = datasets.load_split(trained.data.dataset, "test", str(small_data_dir))
  two = {k: np.asarray(split[k])[:2] for k in ("image", "peak_lv_frame")}
  model, variables = checkpoints.load_params(trained, workdir, "best")
  pred = predict.predict_arrays(model, variables, two["image"], two["peak_lv_frame"], trained,
                                progress=False)
  assert pred["um_vote"].shape == pred["um"].shape == (2, 128, 128)
  assert 0.0 <= pred["um_vote"].min() and pred["um_vote"].max() <= 0.75
  scores = ood.other_scores(model, variables, two, pred, trained)
  assert set(scores) == {"entropy", "frame_motion", "U_vote"}
  expected = uncertainty.configured_uncertainty(pred["um_vote"], pred["segmentation"],
                                                trained.eval)["one_minus_U"]
  np.testing.assert_array_equal(scores["U_vote"], expected)
  np.testing.assert_array_equal(
      ood.slice_scores("U_vote", model, variables, two, pred, trained), expected)
