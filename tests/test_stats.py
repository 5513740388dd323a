"""Agreement statistics against hand-computed examples; figures render without a display."""
import numpy as np
import pytest

from perfjax import figures, stats
from perfjax.errors import InputError

X = np.array([1.0, 2.0, 3.0, 4.0])
Y = np.array([2.0, 4.0, 5.0, 4.0])


def test_r2_pearson_hand_computed():
  # dx = [-1.5,-.5,.5,1.5], dy = [-1.75,.25,1.25,.25]: Sxy = 3.5, Sxx = 5, Syy = 4.75
  assert stats.r2(X, Y) == pytest.approx(3.5 ** 2 / (5.0 * 4.75), abs=1e-12)
  assert stats.r2(X, 3.0 * X + 7.0) == pytest.approx(1.0)  # any straight line: R2 = 1


def test_r2_identity_hand_computed():
  # y - x = [1, 2, 2, 0]: SSE = 9; Syy = 4.75
  assert stats.r2(X, Y, kind="identity") == pytest.approx(1.0 - 9.0 / 4.75, abs=1e-12)
  assert stats.r2(X, X, kind="identity") == pytest.approx(1.0)
  assert stats.r2(X, 2.0 * X, kind="identity") < 1.0  # slope != 1 is penalised


def test_r2_drops_nan_and_degenerate():
  x = np.r_[X, np.nan, 5.0]
  y = np.r_[Y, 1.0, np.inf]
  assert stats.r2(x, y) == pytest.approx(stats.r2(X, Y))
  assert np.isnan(stats.r2([1.0], [2.0]))
  assert np.isnan(stats.r2(X, np.ones(4)))
  with pytest.raises(InputError):
    stats.r2(X, Y[:3])
  with pytest.raises(InputError):
    stats.r2(X, Y, kind="spearman")


def test_bland_altman_hand_computed_with_nan_pairs():
  a = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 1.0])
  b = np.array([1.1, 1.8, 3.3, 3.6, 2.0, np.nan])
  ba = stats.bland_altman(a, b)
  # d = [-0.1, 0.2, -0.3, 0.4]: mean 0.05, sum of squared deviations 0.29, sd = sqrt(0.29/3)
  sd = np.sqrt(0.29 / 3.0)
  assert ba["n"] == 4 and ba["n_dropped"] == 2
  assert ba["mean"] == pytest.approx(0.05, abs=1e-12)
  assert ba["sd"] == pytest.approx(sd, abs=1e-12)
  assert ba["loa_low"] == pytest.approx(0.05 - 1.96 * sd, abs=1e-12)
  assert ba["loa_high"] == pytest.approx(0.05 + 1.96 * sd, abs=1e-12)


def test_bland_altman_too_few_pairs_is_nan():
  ba = stats.bland_altman([1.0, np.nan], [2.0, 3.0])
  assert ba["n"] == 1 and ba["n_dropped"] == 1
  assert ba["mean"] == pytest.approx(-1.0) and np.isnan(ba["sd"]) and np.isnan(ba["loa_low"])


def test_relative_error():
  e = stats.relative_error([1.1, 2.0, 1.0], [1.0, 0.0, np.nan])
  assert e[0] == pytest.approx(0.1) and np.isnan(e[1]) and np.isnan(e[2])


def test_figures_render(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.uniform(1, 4, 30)
  b = a + rng.normal(0, 0.1, 30)
  b[3] = np.nan
  values = np.linspace(1.0, 4.0, 16)
  values[5] = np.nan
  for name, fig in (("bullseye", figures.bullseye(values)),
                    ("ba", figures.bland_altman_plot(a, b, label_a="auto", label_b="gt")),
                    ("scatter", figures.scatter_plot(a, b, label_x="gt", label_y="auto"))):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
  with pytest.raises(InputError):
    figures.bullseye(np.ones(15))


def test_bullseye_geometry_is_standard():
  geo = {seg: (r0, r1, a0, a1) for seg, r0, r1, a0, a1 in figures.bullseye_geometry()}
  assert sorted(geo) == list(range(1, 17))
  centre = lambda s: 0.5 * (geo[s][2] + geo[s][3]) % 360  # noqa: E731
  assert centre(1) == 90 and centre(2) == 150 and centre(4) == 270  # anterior up, septum left
  assert centre(7) == 90 and centre(13) == 90 and centre(14) == 180 and centre(16) == 0
  assert geo[1][:2] == (2.0, 3.0) and geo[7][:2] == (1.0, 2.0) and geo[13][:2] == (0.0, 1.0)
