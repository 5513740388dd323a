"""perfjax.postprocess.keep_heart on hand-drawn label maps."""

import numpy as np

from perfjax import postprocess
from perfjax.conventions import BACKGROUND, LV_BLOOD_POOL, MYOCARDIUM, RV_BLOOD_POOL


def _disc(h, w, cy, cx, r):
  y, x = np.mgrid[:h, :w]
  return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _heart(h=64, w=64, cy=32, cx=32):
  """LV pool radius 6 inside a myocardial ring to radius 10, an RV pool to its left."""
  seg = np.zeros((h, w), np.int32)
  seg[_disc(h, w, cy, cx, 10)] = MYOCARDIUM
  seg[_disc(h, w, cy, cx, 6)] = LV_BLOOD_POOL
  seg[_disc(h, w, cy, cx - 16, 5) & (seg == BACKGROUND)] = RV_BLOOD_POOL
  return seg


def test_a_clean_heart_is_unchanged():
  seg = _heart()
  np.testing.assert_array_equal(postprocess.keep_heart(seg), seg)


def test_islands_in_the_surroundings_are_removed():
  heart = _heart()
  seg = heart.copy()
  seg[2:6, 2:6] = LV_BLOOD_POOL  # a bright vessel far away, smaller than the LV pool
  seg[55:60, 50:62] = MYOCARDIUM  # chest wall
  seg[2:5, 55:60] = RV_BLOOD_POOL  # far from the myocardium
  out = postprocess.keep_heart(seg)
  np.testing.assert_array_equal(out, heart)


def test_a_vessel_larger_than_the_lv_at_the_crops_edge_is_not_the_heart():
  """An apical LV (pool radius 6: 113 px) at the centre of a 128 crop, and a larger pool
  island (an aorta, radius 10: 317 px) at its edge: the centred heart wins."""
  heart = _heart(128, 128, 64, 64)
  seg = heart.copy()
  seg[_disc(128, 128, 64, 118, 10)] = LV_BLOOD_POOL
  np.testing.assert_array_equal(postprocess.keep_heart(seg), heart)
  # Largest alone would have kept the island and dropped the heart.
  assert (seg == LV_BLOOD_POOL).sum() - (heart == LV_BLOOD_POOL).sum() > (
      heart == LV_BLOOD_POOL).sum()


def test_myocardium_within_two_pixels_of_the_pool_is_kept():
  assert postprocess.MYO_REACH_PX == 2
  seg = np.zeros((40, 40), np.int32)
  seg[10:20, 10:20] = LV_BLOOD_POOL  # columns 10-19
  seg[10:20, 21:25] = MYOCARDIUM  # starts 2 px from column 19 (one background column)
  seg[10:20, 27:30] = MYOCARDIUM  # 8 px away: not the heart's
  out = postprocess.keep_heart(seg)
  assert (out[10:20, 21:25] == MYOCARDIUM).all()
  assert (out[10:20, 27:30] == BACKGROUND).all()


def test_without_a_pool_the_largest_myocardium_is_the_heart():
  seg = np.zeros((40, 40), np.int32)
  seg[5:15, 5:15] = MYOCARDIUM  # 100 px
  seg[30:33, 30:33] = MYOCARDIUM  # 9 px
  seg[5:15, 16:20] = RV_BLOOD_POOL  # next to the kept myocardium
  out = postprocess.keep_heart(seg)
  assert (out[5:15, 5:15] == MYOCARDIUM).all() and (out[30:33, 30:33] == BACKGROUND).all()
  assert (out[5:15, 16:20] == RV_BLOOD_POOL).all()


def test_empty_and_batch():
  empty = np.zeros((3, 16, 16), np.int32)
  empty[1, 3, 3] = RV_BLOOD_POOL  # no pool, no myocardium: left as predicted
  np.testing.assert_array_equal(postprocess.keep_heart_batch(empty), empty)
  assert postprocess.keep_heart_batch(np.zeros((0, 16, 16), np.int32)).shape == (0, 16, 16)
