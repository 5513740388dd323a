"""reporting.py, panels.py, provenance.py, training_log.py and figures.py: file permissions, a
fresh figures folder per evaluation, the report's header and figure order, the figures' options,
the MBF block, report.html in a headless browser (fast: no training)."""
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from perfjax import figures, panels, provenance, reporting, training_log
from perfjax.data import writers


def test_outputs_get_the_umask_permissions_not_0600(tmp_path):
  old = os.umask(0o022)
  try:
    writers.write_json(str(tmp_path / "r.json"), {"a": 1})
    reporting.write_markdown(str(tmp_path / "report.md"), "# t\n")
    reporting.save_figure(figures.bullseye(np.arange(16.0)), str(tmp_path / "b.png"))
  finally:
    os.umask(old)
  for name in ("r.json", "report.md", "report.html", "b.png"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_a_metrics_line_cut_short_by_a_crash_is_skipped_and_resume_writes_clean_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n{"step": 3, "tr')
  assert [r["step"] for r in training_log.read_metrics(tmp_path)] == [1, 2]
  writer = training_log.MetricWriter(str(tmp_path), resume_step=1)  # resumed from step 1
  writer.write(2, **{"train/loss": 0.3})
  writer.close()
  assert path.read_text().splitlines() == ['{"step": 1, "train/loss": 0.5}',
                                           '{"step": 2, "train/loss": 0.3}']


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
  results["provenance"] = provenance.provenance(patch3.get_config("tiny"),
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


def test_the_console_summary_says_n_a_not_nan():
  from perfjax import evaluate  # pylint: disable=g-import-not-at-top
  nan = float("nan")
  results = _results()
  results["ood"] = dict(labels="motion", threshold=nan, sensitivity=nan, specificity=nan,
                        score="U", n_positive=0, n_negative=1, auc=nan, auc_ci=[nan, nan])
  text = evaluate.summary_text(results)
  assert "nan" not in text.lower() and "R2 n/a" in text and "Bland-Altman +0.100" in text


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
  rows, cols = panels.heart_box([seg], seg.shape)
  assert rows.stop - rows.start < 128 and cols.stop - cols.start < 128  # Zoomed on the heart.
  panels.panel(str(tmp_path / "p.png"), image, seg, um, seg,
               panels.panel_title("3-1", 0.9, 0.8, True, False), 2, um_vmax=0.1)
  fpr, tpr = np.array([0, 0.5, 1.0]), np.array([0, 0.8, 1.0])
  curves = {"U": dict(fpr=fpr, tpr=tpr, auc=0.7, auc_ci=[0.5, 0.9], n_positive=2, n_negative=4),
            "tta": dict(fpr=fpr, tpr=tpr, auc=0.6, auc_ci=[0.4, 0.8], n_positive=2,
                        n_negative=4)}
  panels.roc_figure(str(tmp_path / "roc.png"), curves, recommended="tta",
                    operating_point=(0.5, 0.8), labels="motion", n_total=6)
  panels.dice_vs_confidence(str(tmp_path / "dvc.png"), np.linspace(0.5, 0.9, 6),
                            -np.linspace(0.1, 1.0, 6), np.array([1, 1, 0, 0, 0, 0], bool),
                            -0.5, "motion", score="entropy")
  fig = figures.bullseye_grid([("study 1", {"auto": np.arange(16.0), "true": np.ones(16)}),
                               ("study 2", {"auto": np.full(16, np.nan)})])
  reporting.save_figure(fig, str(tmp_path / "grid.png"))
  reporting.save_figure(figures.scatter_plot(np.arange(5.0), np.arange(5.0) + 0.1,
                                             marked=[True, False, False, True, False]),
                        str(tmp_path / "s.png"))
  for name in ("p.png", "roc.png", "dvc.png", "grid.png", "s.png"):
    assert (tmp_path / name).stat().st_size > 1000
  assert panels.panel_title("3-1", 0.9, 0.8, True, False) == (
      "slice 3-1 | Dice 0.900 | 1 - U 0.800 | flagged OOD | no motion")


def _summary(name, auc, ci, n_pos, n_neg, threshold=0.5):
  return dict(score=name, auc=auc, auc_ci=ci, n_positive=n_pos, n_negative=n_neg, n_ood=n_pos,
              threshold=threshold, sensitivity=0.75, specificity=0.8, dice_reliable=0.9,
              dice_unreliable=0.7)


def test_roc_legend_gives_the_auc_its_ci_and_the_class_sizes():
  assert panels.roc_legend("U", _summary("U", 0.7241, [0.5712, 0.8588], 24, 36)) == (
      "U: AUC 0.72 [0.57, 0.86], 24+/36-")
  assert reporting.auc_ci_text(dict(auc=float("nan"), auc_ci=[None, None])) == "n/a [n/a, n/a]"
  assert reporting.counts_text(dict(n_ood=3)) == "3+/?-"  # a results.json from before the CI
  assert reporting.score_label("U") == "1 - U" and reporting.score_label("entropy") == "entropy"


@pytest.mark.parametrize("recommended", ["U", "entropy"])
def test_report_gives_every_auc_its_ci_and_counts_and_names_the_recommended_score(recommended):
  results = _results()
  scores = {"U": _summary("U", 0.65, [0.5, 0.79], 24, 36),
            "entropy": _summary("entropy", 0.95, [0.89, 0.98], 24, 36, threshold=-0.3)}
  results["ood"] = dict(scores[recommended], labels="motion")
  results["ood_all"] = {"motion": dict(scores["U"], baselines={"entropy": scores["entropy"]})}
  results["slices"][0]["ood_scores"] = {"U": 0.9, "entropy": -0.125}
  text = reporting.report_markdown(results, "/nonexistent", dict(mbf=[], bullseye=[], slices=[]))
  assert f"Recommended score (`ood.score`, config `eval.ood_score`): **{recommended}**" in text
  headline = {"U": "AUC 0.650 [0.500, 0.790], 24+/36-",
              "entropy": "AUC 0.950 [0.890, 0.980], 24+/36-"}
  assert f"With the labels 'motion': {headline[recommended]}" in text
  assert "| motion | U" + (" (recommended)" if recommended == "U" else "") + \
      " | 24+/36- | 0.650 [0.500, 0.790] | 0.500 |" in text
  assert "| motion | entropy" + (" (recommended)" if recommended == "entropy" else "") + \
      " | 24+/36- | 0.950 [0.890, 0.980] | -0.300 |" in text
  assert f"OOD flag ({recommended}) |" in text
  # The recommended score's value is in the slice table when it is not 1 - U (already there).
  assert ("| 3-1 | 0.500 | 0.900 | -0.125 |" in text) == (recommended == "entropy")


def test_report_without_ood_labels_says_so():
  text = reporting.report_markdown(_results(), "/nonexistent", dict(mbf=[], bullseye=[],
                                                                    slices=[]))
  assert "No OOD labels for this split" in text and "**U** (the paper's 1 - U)" in text


def test_panel_of_a_segmentation_outside_the_zoom(tmp_path):
  """Zoomed on the truth's heart, a segmented heart elsewhere leaves no sector in view: the
  panel is drawn without sector labels (it used to fail on an empty array)."""
  yy, xx = np.mgrid[:128, :128]
  def heart(cy, cx):
    r = np.hypot(yy - cy, xx - cx)
    m = np.zeros((128, 128), np.int32)
    m[r < 8] = 2
    m[(r >= 8) & (r < 12)] = 1
    m[(np.hypot(yy - cy, xx - cx - 18) < 6) & (m == 0)] = 3
    return m
  image = np.random.default_rng(1).random((128, 128, 30)).astype(np.float32)
  panels.panel(str(tmp_path / "p.png"), image, heart(20, 20), np.zeros((128, 128)),
               heart(100, 90), "off", 1)
  assert (tmp_path / "p.png").stat().st_size > 1000


def _mbf_set(slice_mbf, lo, hi, sources, units="mM"):
  return dict(slice=np.array(slice_mbf), flip_lo=np.array(lo), flip_hi=np.array(hi),
              aif_source=np.array(sources), units=units)


def test_evaluate_reports_the_aif_source_and_the_flip_sensitivity():
  """results.json's MBF block and the report say where each AIF came from and how much slice
  MBF moves when the flip angle is 10 % off; raw-signal flow is labelled relative."""
  from perfjax import evaluate  # pylint: disable=g-import-not-at-top
  from perfjax import predict  # pylint: disable=g-import-not-at-top
  sets = dict(
      auto=_mbf_set([1.0, 2.0, np.nan], [1.1, 2.4, np.nan], [0.9, 1.8, np.nan],
                    ["series", "study slice 0: largest clean pool (40 px)", ""]),
      gt_mask=_mbf_set([1.0, 2.0, 4.0], [1.2, 2.2, 4.4], [0.8, 1.6, 3.6],
                       ["series", "own: no slice of the study has a clean pool", "series"]))
  per_slice, summary = evaluate.mbf_details(sets)
  assert per_slice[1]["aif_source"] == {"auto": "study slice 0: largest clean pool (40 px)",
                                        "gt_mask": "own: no slice of the study has a clean pool"}
  assert per_slice[2]["mbf_flip"]["gt_mask"] == [4.4, 3.6]
  assert summary["units"] == "ml/g/min"
  assert summary["aif_sources"] == {"auto": {"series": 1, "study slice": 1, "none": 1},
                                    "gt_mask": {"series": 2, "own": 1}}
  gt = summary["flip_sensitivity"]["gt_mask"]
  assert gt["flip_scale"] == [0.9, 1.1]
  np.testing.assert_allclose(gt["median_change"], [10.0, -20.0])
  np.testing.assert_allclose(gt["max_abs_change"], 20.0)
  np.testing.assert_allclose(summary["flip_sensitivity"]["auto"]["median_change"], [15.0, -10.0])
  results = _results()
  results["mbf"].update(summary)
  text = reporting.report_markdown(results, "/nonexistent", dict(mbf=[], bullseye=[], slices=[]))
  assert "in ml/g/min." in text and "AIF: automatic masks: series 1, study slice 1, none 1;" in text
  assert ("Flip-angle sensitivity (ground-truth masks): slice MBF changes by +10.0 % at x0.9 and "
          "-20.0 % at x1.1") in text

  relative = {k: dict(v, units="signal") for k, v in sets.items()}
  per_slice, summary = evaluate.mbf_details(relative)
  assert summary["units"] == predict.RELATIVE_UNITS and "flip_sensitivity" not in summary
  assert per_slice[0]["mbf_flip"] == {"auto": None, "gt_mask": None}
  results = _results()
  results["mbf"].update(summary)
  text = reporting.report_markdown(results, "/nonexistent", dict(mbf=[], bullseye=[], slices=[]))
  assert f"bias ({predict.RELATIVE_UNITS})" in text and "Flip-angle" not in text


def test_step_announces_and_times_a_step(capsys):
  with reporting.step("MBF of 6 slices"):
    pass
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "MBF of 6 slices ..." and out[1].startswith("MBF of 6 slices: done in ")


def _browser():
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
    if shutil.which(name):
      return shutil.which(name)
  return None


_PROBE = """<script>window.addEventListener("load", () => {
  const seen = [...document.images].map(
      i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});</script></body>"""


def _images_in_browser(browser, page):
  """[(src, loaded)] of every <img> of `page` as headless Chromium loads it from disk."""
  probe = page.with_name("probe_" + page.name)
  probe.write_text(page.read_text().replace("</body>", _PROBE))
  proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                         "--allow-file-access-from-files", "--virtual-time-budget=10000",
                         "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                        timeout=180)
  found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
  assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
  return json.loads(html.unescape(found.group(1)))


def test_report_html_images_load_in_a_headless_browser(tmp_path):
  """report.html opened in a browser from its folder: every image it shows loads (skipped
  where no headless Chromium/Chrome is installed). A page with a missing image is caught."""
  browser = _browser()
  if browser is None:
    pytest.skip("no headless Chromium/Chrome on this machine")
  rng = np.random.default_rng(0)
  (tmp_path / "figures" / "slices").mkdir(parents=True)
  reporting.save_figure(figures.bullseye_grid([("study 3", {"auto": np.arange(16.0)})]),
                        str(tmp_path / "figures" / "bullseyes.png"))
  reporting.save_figure(figures.scatter_plot(rng.random(6), rng.random(6)),
                        str(tmp_path / "figures" / "mbf_scatter_auto_vs_gt_mask.png"))
  image = rng.random((128, 128, 30)).astype(np.float32)
  mask = np.zeros((128, 128), np.int32)
  mask[40:90, 40:90], mask[50:80, 50:80] = 1, 2
  panels.panel(str(tmp_path / "figures" / "slices" / "01_slice_3-1.png"), image, mask,
               rng.random((128, 128)) * 0.1, mask, "1. 3-1", 2)
  panels.coverage_figure(str(tmp_path / "figures" / "coverage.png"), np.ones((128, 128)), 2)
  shown = dict(mbf=["figures/mbf_scatter_auto_vs_gt_mask.png"],
               bullseye=["figures/bullseyes.png"], slices=["figures/slices/01_slice_3-1.png"])
  reporting.write_markdown(str(tmp_path / "report.md"),
                           reporting.report_markdown(_results(), str(tmp_path), shown))
  seen = _images_in_browser(browser, tmp_path / "report.html")
  assert sorted(src for src, _ in seen) == sorted(shown["mbf"] + shown["bullseye"] +
                                                  shown["slices"] + ["figures/coverage.png"])
  assert all(ok for _, ok in seen), seen
  broken = tmp_path / "broken.html"
  broken.write_text((tmp_path / "report.html").read_text().replace("figures/bullseyes.png",
                                                                   "figures/gone.png"))
  assert ("figures/gone.png", False) in [tuple(x) for x in _images_in_browser(browser, broken)]
