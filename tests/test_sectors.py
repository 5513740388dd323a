"""AHA sector geometry on hand-built masks: a ring myocardium, an RV crescent at known angles."""
import numpy as np
import pytest
from scipy import ndimage

from perfjax import sectors
from perfjax.errors import InputError


def ring_mask(h=64, cy=32.0, cx=32.0, r_in=10.0, r_out=16.0, rv_out=24.0, a0=120.0, a1=240.0):
  """LV disc r < r_in, myocardium ring, RV crescent outside it spanning angles a0 -> a1 (CCW)."""
  rows, cols = np.indices((h, h))
  r = np.hypot(rows - cy, cols - cx)
  theta = np.mod(np.degrees(np.arctan2(-(rows - cy), cols - cx)), 360.0)
  mask = np.zeros((h, h), np.int32)
  mask[r < r_in] = 2
  mask[(r >= r_in) & (r < r_out)] = 1
  in_arc = np.mod(theta - a0, 360.0) <= np.mod(a1 - a0, 360.0)
  mask[(r >= r_out) & (r < rv_out) & in_arc] = 3
  return mask


def ang_diff(a, b):
  return abs((a - b + 180.0) % 360.0 - 180.0)


def test_angle_map_convention():
  theta = sectors.angle_map((5, 5), 2.0, 2.0)
  assert theta[0, 2] == pytest.approx(90.0)   # up = anterior
  assert theta[2, 0] == pytest.approx(180.0)  # left = septal
  assert theta[4, 2] == pytest.approx(270.0)  # down = inferior
  assert theta[2, 4] == pytest.approx(0.0)    # right = lateral
  assert theta[0, 4] == pytest.approx(45.0)   # counter-clockwise as displayed


def test_lv_centroid():
  mask = np.zeros((8, 8), np.int32)
  mask[2:4, 3:6] = 2
  assert sectors.lv_centroid(mask) == pytest.approx((2.5, 4.0))


@pytest.mark.parametrize("a0,a1", [(120, 240), (100, 220), (300, 60), (330, 80), (150, 200)])
def test_rvips_at_known_angles(a0, a1):
  mask = ring_mask(cy=31.3, cx=32.6, r_in=12, r_out=19, rv_out=27, a0=a0, a1=a1)
  rvip = sectors.rv_insertion_points(mask)
  assert ang_diff(rvip["theta_anterior"], a0) <= 3.0
  assert ang_diff(rvip["theta_inferior"], a1) <= 3.0
  mid = (a0 + ((a1 - a0) % 360) / 2.0) % 360
  assert ang_diff(rvip["theta_s"], mid) <= 3.0
  assert ang_diff(sectors.septal_angle(mask), mid) <= 3.0
  cy, cx = sectors.lv_centroid(mask)
  for key, a in (("anterior", a0), ("inferior", a1)):
    r, c = rvip[key]
    assert mask[r, c] == 1  # on the myocardium ...
    assert (mask[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] == 3).any()  # ... touching the RV
    true_r, true_c = cy - 19 * np.sin(np.radians(a)), cx + 19 * np.cos(np.radians(a))
    assert np.hypot(r - true_r, c - true_c) <= 2.0  # within 2 px of the true insertion point


def test_stray_rv_island_is_ignored():
  mask = ring_mask()
  mask[30:33, 48:50] = 3  # a small RV island touching the lateral wall
  rvip = sectors.rv_insertion_points(mask)
  assert ang_diff(rvip["theta_s"], 180.0) <= 3.0


def test_thin_gap_between_rv_and_myocardium():
  mask = ring_mask(r_in=12, r_out=19, rv_out=27)
  gap = mask.copy()
  gap[(gap == 3) & ndimage.binary_dilation(gap == 1, np.ones((3, 3)))] = 0  # 1 px background gap
  assert not ((gap == 3) & ndimage.binary_dilation(gap == 1, np.ones((3, 3)))).any()
  with pytest.raises(InputError, match="within 0 px"):
    sectors.rv_insertion_points(gap, max_gap=0)
  rvip = sectors.rv_insertion_points(gap)  # default max_gap=2 closes it
  assert ang_diff(rvip["theta_s"], 180.0) <= 3.0
  assert ang_diff(rvip["theta_anterior"], 120.0) <= 6.0
  assert ang_diff(rvip["theta_inferior"], 240.0) <= 6.0


def test_six_sectors_standard_orientation():
  mask = ring_mask()  # RV on the left: theta_s = 180
  smap = sectors.sector_map(mask, 6, 1)
  assert smap.dtype == np.int32
  assert set(np.unique(smap)) == set(range(7))
  assert np.array_equal(smap == 0, mask != 1)
  assert smap[32 - 13, 32] == 1   # 90 deg: anterior
  assert smap[32 + 13, 32] == 4   # 270 deg: inferior
  assert smap[32, 32 + 13] == 6   # 0 deg: start of anterolateral
  assert smap[32, 32 - 13] == 3   # 180 deg = theta_s: start of inferoseptal


@pytest.mark.parametrize("theta_s", [180.0, 150.0, 10.0])
def test_sector_boundaries_either_side(theta_s):
  mask = ring_mask()
  center = (32.0, 32.0)
  smap = sectors.sector_map(mask, 6, 1, theta_s=theta_s, center=center)
  theta = sectors.angle_map(mask.shape, *center)
  myo = mask == 1
  for k in range(1, 7):
    b = theta_s + (k - 3) * 60.0  # start of sector k
    rel = (theta - b + 180.0) % 360.0 - 180.0
    after = myo & (rel > 0.5) & (rel < 4.0)
    before = myo & (rel < -0.5) & (rel > -4.0)
    assert after.any() and before.any()
    assert np.all(smap[after] == k)
    assert np.all(smap[before] == (k - 2) % 6 + 1)


def test_24_and_48_numbering():
  mask = ring_mask(r_in=10, r_out=18, rv_out=26)
  s6 = sectors.sector_map(mask, 6, 1)
  s24 = sectors.sector_map(mask, 24, 1)
  s12 = sectors.sector_map(mask, 6, 2)
  s48 = sectors.sector_map(mask, 24, 2)
  myo = mask == 1
  assert set(np.unique(s24[myo])) == set(range(1, 25))
  assert set(np.unique(s48[myo])) == set(range(1, 49))
  assert np.array_equal((s24[myo] - 1) // 4 + 1, s6[myo])  # four 15-degree parts per sector
  layer = sectors.radial_layer(mask)
  assert np.array_equal(s48[myo], (s24[myo] - 1) * 2 + layer[myo])
  assert np.array_equal(s12[myo], (s6[myo] - 1) * 2 + layer[myo])
  # Sub-sector 1 starts at theta_s - 120 = 60 deg and numbering runs counter-clockwise.
  theta = sectors.angle_map(mask.shape, *sectors.lv_centroid(mask))
  assert np.all(s24[myo & (theta > 61) & (theta < 74)] == 1)
  assert np.all(s24[myo & (theta > 76) & (theta < 89)] == 2)
  assert np.all(s24[myo & (theta > 46) & (theta < 59)] == 24)


def test_radial_layers_hand_geometry():
  mask = ring_mask(r_in=10, r_out=16)
  layer = sectors.radial_layer(mask)
  # Row 32 through the centre: myocardium at cols 42..47 (r = 10..15).
  assert list(mask[32, 42:48]) == [1] * 6 and mask[32, 48] == 0 and mask[32, 41] == 2
  assert list(layer[32, 42:48]) == [1, 1, 1, 2, 2, 2]
  assert np.all(layer[mask != 1] == 0)


def test_rot90_rotates_sectors():
  mask = ring_mask(cy=31.3, cx=32.6, a0=110, a1=235)
  rot = np.rot90(mask)  # counter-clockwise by 90 degrees as displayed
  t0 = sectors.rv_insertion_points(mask)
  t1 = sectors.rv_insertion_points(rot)
  assert ang_diff(t1["theta_s"], t0["theta_s"] + 90.0) < 1e-6
  s0 = sectors.sector_map(mask, 24, 2)
  s1 = sectors.sector_map(rot, 24, 2)
  assert np.mean(np.rot90(s0) == s1) > 0.999


def test_scipy_rotate_rotates_theta_s():
  mask = ring_mask(h=80, cy=40, cx=40, r_in=12, r_out=19, rv_out=28)
  rot = ndimage.rotate(mask, 30.0, reshape=False, order=0)  # counter-clockwise as displayed
  t0 = sectors.septal_angle(mask)
  t1 = sectors.septal_angle(rot)
  assert ang_diff(t1, t0 + 30.0) <= 3.0
  smap = sectors.sector_map(rot, 6, 1)
  cy, cx = sectors.lv_centroid(rot)
  a = np.radians(120.0)
  r = int(round(cy - 15 * np.sin(a))), int(round(cx + 15 * np.cos(a)))
  assert smap[r] == 1  # 90 + 30 deg is the middle of sector 1 after rotation


def test_degenerate_masks_raise():
  good = ring_mask()
  no_lv = np.where(good == 2, 1, good)
  no_myo = np.where(good == 1, 0, good)
  no_rv = np.where(good == 3, 0, good)
  apart = ring_mask(r_out=16, rv_out=24)
  apart[(apart == 3) & (ndimage.binary_dilation(apart == 1, np.ones((9, 9))))] = 0  # 4 px gap
  for bad in (no_lv, no_myo, no_rv, apart, np.zeros((64, 64), np.int32)):
    with pytest.raises(InputError):
      sectors.sector_map(bad, 6, 1)
  with pytest.raises(InputError, match="RV"):
    sectors.rv_insertion_points(apart)
  with pytest.raises(InputError):
    sectors.sector_map(good, 7, 1)
  with pytest.raises(InputError):
    sectors.sector_map(good, 6, 3)
  with pytest.raises(InputError):
    sectors.sector_map(good[None], 6, 1)
  with pytest.raises(InputError):
    sectors.sector_map(good.astype(np.float32), 6, 1)
  with pytest.raises(InputError):
    sectors.sector_map(good, 6, 1, theta_s=np.nan, center=(32.0, 32.0))
  with pytest.raises(InputError):
    sectors.sector_map(good, 6, 1, theta_s=180.0, center=(np.nan, 32.0))
  # Given geometry needs no RV and no LV for the angular map.
  smap = sectors.sector_map(no_rv, 6, 1, theta_s=180.0, center=(32.0, 32.0))
  assert np.array_equal(smap, sectors.sector_map(good, 6, 1))


def test_sector_means():
  smap = np.array([[0, 1, 1], [2, 2, 0]], np.int32)
  values = np.array([[9.0, 1.0, 3.0], [4.0, 6.0, 9.0]])
  np.testing.assert_allclose(sectors.sector_means(values, smap, 3), [2.0, 5.0, np.nan])


def test_aha16_mapping():
  v = np.arange(1.0, 7.0)
  assert sectors.aha16("basal", v) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0}
  assert sectors.aha16(1, v)[7] == 1.0 and sectors.aha16(1, v)[12] == 6.0
  assert sectors.aha16("apical", v) == {13: 1.0, 14: 2.5, 15: 4.0, 16: 5.5}
  w = np.array([1, 1, 3, 1, 1, 0])
  assert sectors.aha16(2, v, w)[14] == pytest.approx((2 + 9) / 4)
  assert sectors.aha16(2, v, w)[16] == 5.0
  eye = sectors.bullseye16({0: v, 2: v})
  assert np.array_equal(eye[:6], v) and np.all(np.isnan(eye[6:12]))
  np.testing.assert_allclose(eye[12:], [1.0, 2.5, 4.0, 5.5])
  with pytest.raises(InputError):
    sectors.aha16(3, v)
  with pytest.raises(InputError):
    sectors.aha16(0, v[:4])
