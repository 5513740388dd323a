"""Dice metrics on hand cases and on the ring phantom of test_sectors."""
import numpy as np
import pytest

from perfjax import metrics, sectors
from perfjax.errors import InputError
from test_sectors import ring_mask


def test_dice_hand_cases():
  pred = np.array([1, 1, 0, 0, 2])
  gt = np.array([1, 0, 1, 0, 2])
  assert metrics.dice(pred, gt) == pytest.approx(0.5)           # 2*1 / (2 + 2)
  assert metrics.dice(pred, gt, label=2) == pytest.approx(1.0)
  assert metrics.dice(pred, gt, label=3) == 1.0                 # both empty -> 1 by default
  assert np.isnan(metrics.dice(pred, gt, label=3, empty=np.nan))
  assert metrics.dice(np.zeros(4, int), np.array([0, 1, 1, 0])) == 0.0
  pred2 = np.array([[1, 1, 1], [0, 0, 0]])
  gt2 = np.array([[1, 0, 0], [0, 0, 0]])
  assert metrics.dice(pred2, gt2) == pytest.approx(2 * 1 / (3 + 1))
  with pytest.raises(InputError):
    metrics.dice(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("n_angular,n_radial", [(6, 1), (6, 2), (24, 2)])
def test_sector_dice_perfect(n_angular, n_radial):
  gt = ring_mask()
  for geometry in ("gt", "pred"):
    r = metrics.sector_dice(gt, gt, n_angular, n_radial, geometry)
    assert r["ok"] and r["problem"] is None
    assert r["mean"] == 1.0 and r["per_sector"].shape == (n_angular * n_radial,)
    assert np.all(r["per_sector"] == 1.0)


def test_sector_dice_missing_and_half_sector():
  gt = ring_mask()
  smap = sectors.sector_map(gt, 6, 1)
  pred = gt.copy()
  pred[smap == 1] = 0  # anterior sector missing
  r = metrics.sector_dice(pred, gt)
  np.testing.assert_allclose(r["per_sector"], [0, 1, 1, 1, 1, 1])
  assert r["mean"] == pytest.approx(5 / 6)
  # Half of sector 4's m pixels removed: Dice = 2 (m - h) / (m + m - h) with h = m // 2.
  pred = gt.copy()
  rows, cols = np.nonzero(smap == 4)
  m, h = rows.size, rows.size // 2
  pred[rows[:h], cols[:h]] = 0
  assert m > 20
  assert metrics.sector_dice(pred, gt)["per_sector"][3] == pytest.approx(2 * (m - h) / (2 * m - h))


def test_geometry_gt_vs_pred():
  gt = ring_mask(a0=120, a1=240)
  pred = ring_mask(a0=60, a1=180)  # same myocardium, RV moved: theta_s 180 -> 120
  assert metrics.sector_dice(pred, gt, geometry="gt")["mean"] == 1.0
  r = metrics.sector_dice(pred, gt, geometry="pred")
  assert r["ok"] and r["mean"] < 0.2  # wedges shifted by a full 60-degree sector
  with pytest.raises(InputError):
    metrics.sector_dice(pred, gt, geometry="both")


def test_degenerate_prediction_is_flagged_not_raised():
  gt = ring_mask()
  no_rv = np.where(gt == 3, 0, gt)
  r = metrics.sector_dice(no_rv, gt, geometry="pred")
  assert not r["ok"] and np.isnan(r["mean"]) and np.all(np.isnan(r["per_sector"]))
  assert "RV" in r["problem"]
  assert metrics.sector_dice(no_rv, gt, geometry="gt")["mean"] == 1.0  # GT geometry needs no RV
  no_lv = np.where(gt == 2, 0, gt)
  r = metrics.sector_dice(no_lv, gt, 6, 2)  # radial layers need the prediction's LV
  assert not r["ok"] and np.isnan(r["mean"])
  assert metrics.sector_dice(no_lv, gt, 6, 1)["mean"] == 1.0
  empty = np.zeros_like(gt)
  r = metrics.sector_dice(empty, gt, 6, 2, geometry="pred")
  assert r["ok"] and r["mean"] == 0.0
  with pytest.raises(InputError):  # a degenerate ground truth is bad input
    metrics.sector_dice(gt, no_rv)


def test_dice_table():
  gt = ring_mask()
  smap = sectors.sector_map(gt, 6, 1)
  minus1 = np.where(smap == 1, 0, gt)
  no_rv = np.where(gt == 3, 0, gt)
  preds = np.stack([gt, minus1, np.zeros_like(gt), no_rv])
  gts = np.stack([gt, gt, gt, no_rv])
  t = metrics.dice_table(preds, gts)
  assert t["whole"][0] == 1.0 and t["whole"][2] == 0.0 and t["whole"][3] == 1.0
  n1, n = (smap == 1).sum(), (gt == 1).sum()
  assert t["whole"][1] == pytest.approx(2 * (n - n1) / (2 * n - n1))
  assert t["sector6"][1] == pytest.approx(5 / 6)
  r12 = metrics.sector_dice(minus1, gt, 6, 2)
  assert t["sector12"][1] == r12["mean"]
  # Radial layers come from each mask: the cut wall changes the layers next to the cut only.
  np.testing.assert_array_equal(r12["per_sector"][[0, 1, 4, 5, 6, 7]], [0, 0, 1, 1, 1, 1])
  assert t["sector6"][2] == 0.0 and t["ok"][2]
  assert not t["ok"][3] and np.isnan(t["sector6"][3]) and "gt" in t["problems"][3]
  assert list(t["ok"]) == [True, True, True, False]
  assert t["mean"]["sector6"] == pytest.approx((1 + 5 / 6 + 0) / 3)
  assert t["mean"]["whole"] == pytest.approx(np.mean(t["whole"]))
  with pytest.raises(InputError):
    metrics.dice_table(gt, gt)
