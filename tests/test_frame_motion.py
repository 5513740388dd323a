"""Frame-to-frame motion score (perfjax.frame_motion): shifts recovered, still series at zero."""
import numpy as np
import pytest
from scipy import ndimage

from perfjax import frame_motion
from perfjax.errors import InputError


def _textured(seed, size=128):
  return ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size)), 3)


def test_known_translation_is_recovered_with_its_sign():
  """Frame t+1 is frame t moved by (+0.8, -1.5) px: every consecutive pair reports that."""
  base = _textured(0)
  series = np.stack([ndimage.shift(base, (0.8 * t, -1.5 * t), order=3, mode="nearest")
                     for t in range(4)], -1)
  shifts = frame_motion.frame_shifts(series)
  assert shifts.shape == (3, 2)
  np.testing.assert_allclose(shifts, [[0.8, -1.5]] * 3, atol=0.15)


def test_still_series_scores_near_zero_even_as_contrast_changes():
  """Contrast arriving (a brightening disc, frame-wise gain) without motion: under 0.15 px on
  average (the disc's change against the texture biases the sub-pixel peak a little)."""
  base = _textured(1)
  rows, cols = np.mgrid[:128, :128]
  disc = ((rows - 64) ** 2 + (cols - 64) ** 2 < 15 ** 2).astype(float)
  series = np.stack([(1 + 0.1 * t) * base + 0.05 * t * disc for t in range(6)], -1)
  score = frame_motion.frame_motion_score(series[None])
  assert score.shape == (1,) and -0.15 < score[0] <= 0.0


def test_more_motion_scores_lower():
  base = _textured(2)
  still, small, large = (np.stack([ndimage.shift(base, (a * np.sin(t), 0.0), order=3,
                                                 mode="nearest") for t in range(8)], -1)
                         for a in (0.0, 1.0, 4.0))
  s = frame_motion.frame_motion_score(np.stack([still, small, large]))
  assert s[0] > s[1] > s[2]


def test_bad_inputs():
  with pytest.raises(InputError, match=r"\[N, H, W, T\]"):
    frame_motion.frame_motion_score(np.zeros((8, 8, 3)))
  with pytest.raises(InputError, match="T >= 2"):
    frame_motion.frame_shifts(np.zeros((8, 8, 1)))
  bad = np.zeros((16, 16, 3))
  bad[2, 2, 1] = np.nan
  with pytest.raises(InputError, match="NaN"):
    frame_motion.frame_shifts(bad)
