"""reporting.py and figures.py: file permissions, a fresh figures folder per evaluation, the
report's header and figure order, the figures' options (fast: no training)."""
import os

import numpy as np

from perfjax import figures, reporting


def test_outputs_get_the_umask_permissions_not_0600(tmp_path):
  old = os.umask(0o022)
  try:
    reporting.write_json(str(tmp_path / "r.json"), {"a": 1})
    reporting.write_markdown(str(tmp_path / "report.md"), "# t\n")
    reporting.save_figure(figures.bullseye(np.arange(16.0)), str(tmp_path / "b.png"))
  finally:
    os.umask(old)
  for name in ("r.json", "report.md", "report.html", "b.png"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_a_fresh_figures_folder_replaces_the_old_one(tmp_path):
  (tmp_path / "figures" / "slices").mkdir(parents=True)
  (tmp_path / "figures" / "slices" / "stale.png").write_text("old")
  staged = reporting.fresh_dir(str(tmp_path), "figures")
  open(os.path.join(staged, "new.png"), "w").close()
  reporting.replace_dir(staged, str(tmp_path / "figures"))
  assert sorted(os.listdir(tmp_path / "figures")) == ["new.png"]
  assert sorted(os.listdir(tmp_path)) == ["figures"]  # No staging or old folder left.


def _results():
  nan = float("nan")
  ba = dict(mean=0.1, loa_low=-0.2, loa_high=0.4)
  return dict(
      config=dict(input="patch3", augment="advanced", dataset="synthetic_small", split="test",
                  features=4), n_slices=1,
      dice=dict(whole=0.5, sector6=0.4, sector12=0.3, by_geometry={}),
      ood_all={}, mbf=dict(r2=nan, bland_altman=ba, input="concentration"),
      slices=[dict(id="3-1", dice=0.5, one_minus_U=0.9, ood_flag=False, ood_label=None,
                   uncertain_sector=2, mbf_auto=nan, mbf_gt_mask=nan, mbf_true=None)])


def test_report_has_a_header_and_shows_the_given_figures_in_order(tmp_path):
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  results = _results()
  results["provenance"] = reporting.provenance(patch3.get_config("tiny"),
                                               data=dict(dataset="synthetic_small"))
  (tmp_path / "figures" / "bullseye").mkdir(parents=True)
  (tmp_path / "figures" / "bullseye" / "stale.png").write_text("")  # Not listed: not given.
  shown = dict(mbf=[], bullseye=["figures/bullseyes.png"],
               slices=["figures/slices/01_slice_9-0.png", "figures/slices/02_slice_1-2.png"])
  text = reporting.report_markdown(results, str(tmp_path), shown)
  for needle in ("| evaluated |", "| code |", "| packages |", "jax ", "| config |",
                 "| data | dataset synthetic_small", "## Config"):
    assert needle in text, needle
  assert "stale" not in text
  assert text.index("01_slice_9-0") < text.index("02_slice_1-2")


def test_figures_take_their_options(tmp_path):
  rng = np.random.default_rng(0)
  seg = np.zeros((128, 128), np.int32)
  yy, xx = np.mgrid[:128, :128]
  r = np.hypot(yy - 64, xx - 60)
  seg[r < 14] = 2
  seg[(r >= 14) & (r < 20)] = 1
  seg[(np.hypot(yy - 64, xx - 85) < 10) & (seg == 0)] = 3
  image = rng.random((128, 128, 30)).astype(np.float32)
  um = rng.random((128, 128)).astype(np.float32) * 0.1
  rows, cols = reporting.heart_box([seg], seg.shape)
  assert rows.stop - rows.start < 128 and cols.stop - cols.start < 128  # Zoomed on the heart.
  reporting.panel(str(tmp_path / "p.png"), image, seg, um, seg,
                  reporting.panel_title("3-1", 0.9, 0.8, True, False), 2, um_vmax=0.1)
  fpr, tpr = np.array([0, 0.5, 1.0]), np.array([0, 0.8, 1.0])
  reporting.roc_figure(str(tmp_path / "roc.png"), fpr, tpr, 0.7, (0.5, 0.8),
                       others={"tta": (fpr, tpr, 0.6)}, labels="motion", n_ood=2, n_total=6)
  fig = figures.bullseye_grid([("study 1", {"auto": np.arange(16.0), "true": np.ones(16)}),
                               ("study 2", {"auto": np.full(16, np.nan)})])
  reporting.save_figure(fig, str(tmp_path / "grid.png"))
  reporting.save_figure(figures.scatter_plot(np.arange(5.0), np.arange(5.0) + 0.1,
                                             marked=[True, False, False, True, False]),
                        str(tmp_path / "s.png"))
  for name in ("p.png", "roc.png", "grid.png", "s.png"):
    assert (tmp_path / name).stat().st_size > 1000
  assert reporting.panel_title("3-1", 0.9, 0.8, True, False) == (
      "slice 3-1 | Dice 0.900 | 1 - U 0.800 | flagged OOD | no motion")
