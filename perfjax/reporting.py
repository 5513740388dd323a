"""Files a reader looks at: report.md and its HTML page, and the atomic writers behind every
output folder (text, figures, whole folders swapped in at once); the OOD summaries' wording
shared by the report and the figures (`perfjax.panels`).

Every writer here is atomic: it writes to a temporary file in the target folder and renames it,
so an interrupted run never leaves a half-written PNG or JSON behind; the file gets the usual
permissions (0666 less the umask), not the temporary file's 0600.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Iterator

import markdown

from perfjax.conventions import PAPER_OOD_SCORE
from perfjax.data.writers import atomic_path, jsonable


def write_text(path: str, text: str) -> None:
  """`text` at `path`, written atomically."""
  suffix = os.path.splitext(path)[1] or ".tmp"
  with atomic_path(path, suffix) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def fresh_dir(workdir: str, name: str) -> str:
  """An empty folder `.{name}.new-<pid>` in `workdir` for an output folder to be built in.

  Leftovers of interrupted runs (`.{name}.new-*`, `.{name}.old-*`) are removed first.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  for leftover in glob.glob(os.path.join(workdir, f".{name}.new-*")) + glob.glob(
      os.path.join(workdir, f".{name}.old-*")):
    shutil.rmtree(leftover, ignore_errors=True)
  path = os.path.join(workdir, f".{name}.new-{os.getpid()}")
  os.makedirs(path)
  return path


def replace_dir(staged: str, final: str) -> None:
  """Puts the folder `staged` in the place of `final` (whose old contents are deleted)."""
  import shutil  # pylint: disable=g-import-not-at-top
  old = None
  if os.path.lexists(final):
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{os.getpid()}")
    os.rename(final, old)
  os.rename(staged, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
{body}
</body></html>
"""


def write_markdown(path: str, text: str) -> None:
  """`text` as Markdown at `path` and as a stand-alone HTML page beside it (same name, .html).

  Images are referenced by relative paths, so the page opens in a browser from the folder.
  """
  with atomic_path(path, ".md") as tmp:
    with open(tmp, "w") as f:
      f.write(text)
  title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")),
               "perfjax report")
  body = markdown.markdown(text, extensions=["tables"])
  html_path = os.path.splitext(path)[0] + ".html"
  with atomic_path(html_path, ".html") as tmp:
    with open(tmp, "w") as f:
      f.write(HTML_PAGE.format(title=title, body=body))


@contextlib.contextmanager
def step(what: str, enabled: bool = True) -> Iterator[None]:
  """Announces a step of a long job before it starts and says how long it took, so no step
  runs in silence (the console between the progress bars)."""
  if not enabled:
    yield
    return
  print(f"{what} ...", flush=True)
  start = time.perf_counter()
  yield
  print(f"{what}: done in {time.perf_counter() - start:.0f} s", flush=True)


def save_figure(fig, path: str, dpi: int = 110) -> None:
  ext = os.path.splitext(path)[1]
  with atomic_path(path, ext) as tmp:
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext[1:])


PAPER_SCORE = PAPER_OOD_SCORE  # The paper's U, scored as 1 - U.


def score_label(name: str | None) -> str:
  """How an OOD score is named on axes and in tables: the paper's U is scored as 1 - U, every
  other score (perfjax.ood) by its name."""
  return "1 - U" if name in (None, PAPER_SCORE) else str(name)


def auc_ci_text(summary: dict | None) -> str:
  """'0.720 [0.570, 0.860]': the AUC of an OOD summary (perfjax.ood.score_summary) and its
  95 % CI ('n/a' for what is missing or NaN)."""
  if not summary:
    return "-"
  ci = summary.get("auc_ci") or [None, None]
  return f"{number_text(summary.get('auc'))} [{number_text(ci[0])}, {number_text(ci[1])}]"


def counts_text(summary: dict | None) -> str:
  """'24+/36-': the positives (OOD) and negatives of an OOD summary."""
  summary = summary or {}
  pos = summary.get("n_positive", summary.get("n_ood"))
  neg = summary.get("n_negative")
  return f"{'?' if pos is None else pos}+/{'?' if neg is None else neg}-"


def number_text(value, fmt: str = ".3f") -> str:
  return "n/a" if value is None or not math.isfinite(float(value)) else format(float(value), fmt)


def _images(workdir: str, folder: str) -> list[str]:
  root = os.path.join(workdir, folder)
  if not os.path.isdir(root):
    return []
  return [f"{folder}/{name}" for name in sorted(os.listdir(root)) if name.endswith(".png")]


def _header(results: dict) -> list[str]:
  """Date, code, packages, device, command, config and data of the run (results' provenance)."""
  prov = results.get("provenance")
  if not prov:
    return []
  versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
  data = prov.get("data") or {}
  data_text = ", ".join(f"{k} {v}" for k, v in data.items() if v is not None)
  lines = ["| | |", "|---|---|",
           f"| evaluated | {prov.get('date', '?')} |",
           f"| code | `{prov.get('code', '?')}` |",
           f"| packages | {versions} |",
           f"| device | {prov.get('device', '?')} |"]
  if prov.get("command"):
    lines.append(f"| command | `{prov['command']}` |")
  lines.append(f"| config | fingerprint `{prov.get('config_fingerprint', '?')}` (full config at "
               "the end) |")
  if data_text:
    lines.append(f"| data | {data_text} |")
  return lines + [""]


def _config_section(results: dict) -> list[str]:
  prov = results.get("provenance") or {}
  if not prov.get("config"):
    return []
  text = json.dumps(jsonable(prov["config"]), indent=1, sort_keys=True)
  return ["", "## Config", "", "```json", text, "```"]


_MASK_SETS = {"auto": "automatic masks", "gt_mask": "ground-truth masks"}


def _mbf_notes(m: dict) -> list[str]:
  """The AIF's sources, the frame gain and the flip-angle sensitivity of results.json's `mbf`
  (evaluate's `mbf_details`), as report lines."""
  lines = []
  sources = m.get("aif_sources") or {}
  if sources:
    lines += ["", "AIF: " + "; ".join(
        f"{_MASK_SETS.get(name, name)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        for name, counts in sources.items()) + " slices (series: the study's AIF series; study "
        "slice: the study's slice with the largest clean blood pool, never a motion slice; "
        "own: the slice's own pool)."]
  gains = m.get("frame_gain") or {}
  if gains:
    lines += ["", "Frame gain (perfjax.frame_gain): " + "; ".join(
        f"{_MASK_SETS.get(name, name)}: applied to {g['applied']} of {g['slices']} slices "
        f"({g.get('uptake_removed', 0)} with the uptake of the tissue it was measured on "
        f"regressed out; median sd {number_text(g['median_sd_percent'], '.2f')} %)"
        for name, g in gains.items())
        + "; elsewhere the tissue outside the heart was too small to measure it, what its uptake "
          "left was no gain, or the myocardium did not share it."]
  spills = m.get("spill_over") or {}
  if spills:
    lines += ["", "Spill-over term (the LV pool's signal in a sector's curve, fitted where it "
              "pays by BIC): " + "; ".join(
                  f"{_MASK_SETS.get(name, name)}: {s['sectors_with_term']} of "
                  f"{s['sectors_fitted']} sectors" for name, s in spills.items()) + "."]
  for name, f in (m.get("flip_sensitivity") or {}).items():
    lo, hi = f["flip_scale"]
    lines += ["", f"Flip-angle sensitivity ({_MASK_SETS.get(name, name)}): slice MBF changes by "
              f"{number_text(f['median_change'][0], '+.1f')} % at x{lo:g} and "
              f"{number_text(f['median_change'][1], '+.1f')} % at x{hi:g} of the nominal flip "
              f"angle (median over slices; at most {number_text(f['max_abs_change'], '.1f')} %)."]
  return lines


def _ood_section(results: dict, recommended: str) -> list[str]:
  """The report's OOD block: which score is recommended (ood.score) and its headline, then
  every score against every label set (ood_all) with AUC [95 % CI] and n+/n-."""
  o = results.get("ood") or {}
  lines = ["", "## Uncertainty and out-of-distribution detection", "",
           "Every score is higher = more reliable (the paper's U is scored as 1 - U); a slice is "
           "flagged OOD when its score < t, t at the ROC's maximum Youden J. AUCs are given with "
           "their stratified bootstrap 95 % CI; n+/n-: OOD / in-distribution slices.", "",
           f"Recommended score (`ood.score`, config `eval.ood_score`): **{recommended}**"
           + (" (the paper's 1 - U)" if recommended == PAPER_SCORE else "") +
           "; it sets the OOD flags of this report and of `--mode=predict`."]
  if o.get("labels") not in (None, "none"):
    lines += ["", f"With the labels '{o['labels']}': AUC {auc_ci_text(o)}, "
              f"{counts_text(o)}; t {number_text(o.get('threshold'))}, sensitivity "
              f"{number_text(o.get('sensitivity'))}, specificity "
              f"{number_text(o.get('specificity'))}."]
  lines += ["", "| labels | score | n+/n- | AUC [95 % CI] | t | sensitivity | specificity | "
            "Dice reliable | Dice unreliable |", "|---|---|---|---|---|---|---|---|---|"]
  rows = 0
  for labels, summary in (results.get("ood_all") or {}).items():
    for name, s in [(PAPER_SCORE, summary), *(summary.get("baselines") or {}).items()]:
      name = s.get("score", name)
      mark = " (recommended)" if name == recommended else ""
      lines.append(f"| {labels} | {name}{mark} | {counts_text(s)} | {auc_ci_text(s)} | "
                   f"{number_text(s.get('threshold'))} | {number_text(s.get('sensitivity'))} | "
                   f"{number_text(s.get('specificity'))} | {number_text(s.get('dice_reliable'))} | "
                   f"{number_text(s.get('dice_unreliable'))} |")
      rows += 1
  if not rows:
    lines += ["", "No OOD labels for this split: no AUC."]
  return lines + [""]


def report_markdown(results: dict, workdir: str, figures: dict[str, list[str]] | None = None
                    ) -> str:
  """report.md of an evaluation: a header (date, code, packages, config, data), the headline
  tables and the figures.

  `figures` (group -> paths relative to the workdir, in the order to show) lists the figures of
  this evaluation: `mbf`, `bullseye`, `slices` (most uncertain first), `ood`. Without it the
  figures folder is listed (older callers).
  """
  cfg, d, m = results["config"], results["dice"], results["mbf"]

  def exists(rel):
    return os.path.isfile(os.path.join(workdir, rel))

  if figures is None:
    figures = dict(
        mbf=[r for r in _images(workdir, "figures") if os.path.basename(r).startswith("mbf_")],
        bullseye=_images(workdir, "figures/bullseye"), slices=_images(workdir, "figures/slices"))
  lines = [f"# perfjax: {cfg['input']}-UNet ({cfg['augment']} augmentation) on "
           f"{cfg['dataset']}/{cfg['split']}", ""]
  lines += _header(results)
  lines += [f"{results['n_slices']} slices; width {cfg['features']}. Numbers are in "
            "`results.json`; the keys follow CONVENTIONS.md.", "",
            "## Segmentation: myocardium Dice", "",
           "| sectors from | whole slice | 6 sectors | 12 sectors |", "|---|---|---|---|"]
  for geometry, name in (("gt", "ground-truth RV insertion points"),
                         ("pred", "the network's own RV insertion points (paper)")):
    g = d.get("by_geometry", {}).get(geometry)
    if g:
      lines.append(f"| {name} | {number_text(d['whole'])} | {number_text(g['sector6'])} | "
                   f"{number_text(g['sector12'])} |")
  recommended = (results.get("ood") or {}).get("score") or PAPER_SCORE
  lines += _ood_section(results, recommended)
  for rel, alt in (("figures/dice_vs_confidence.png", f"Dice vs {score_label(recommended)}"),
                   ("figures/roc.png", "ROC"), ("figures/coverage.png", "window coverage")):
    if exists(rel):
      lines.append(f"![{alt}]({rel})")
  ba = m["bland_altman"]
  units = m.get("units", "ml/g/min")
  lines += ["", "## Myocardial blood flow", "",
            f"Slice MBF (mean of the 48 sectors; Fermi deconvolution of {m.get('input', '?')}), "
            f"in {units}."]
  lines += _mbf_notes(m)
  lines += ["", f"| comparison | R2 | bias ({units}) | limits of agreement |",
            "|---|---|---|---|",
            f"| automatic vs ground-truth mask | {number_text(m['r2'])} | "
            f"{number_text(ba['mean'], '+.3f')} | "
            f"[{number_text(ba['loa_low'], '+.3f')}, {number_text(ba['loa_high'], '+.3f')}] |"]
  for name, agreement in m.get("vs_true", {}).items():
    b = agreement["bland_altman"]
    lines.append(f"| {name.replace('_', ' ')} vs true MBF | {number_text(agreement['r2'])} | "
                 f"{number_text(b['mean'], '+.3f')} | [{number_text(b['loa_low'], '+.3f')}, "
                 f"{number_text(b['loa_high'], '+.3f')}] |")
  lines.append("")
  lines += [f"![{rel}]({rel})" for rel in figures.get("mbf", [])]
  if figures.get("bullseye"):
    lines += ["", "AHA 16-segment MBF per study (one colour scale for every study and source; "
              "grey: no value).", ""]
    lines += [f"![{rel}]({rel})" for rel in figures["bullseye"]]
  lines += ["", "## Example slices, most uncertain first", "",
            "Ordered by 1 - U, lowest (most uncertain) first; titled with the ids of the slice "
            "table below, the OOD flag and the motion status. Frames at RV, LV and myocardial "
            "enhancement, zoomed on the heart; automatic contours solid, ground truth dashed; UM "
            "on one colour scale for every panel, with the six AHA sectors and the uncertain "
            "sector circled.", ""]
  lines += [f"![{rel}]({rel})" for rel in figures.get("slices", [])]
  if exists("training_curves.png"):
    lines += ["", "## Training", "", "![training curves](training_curves.png)"]
  # The recommended score's value beside 1 - U when it is another score (it sets the flag).
  extra = recommended != PAPER_SCORE
  lines += ["", "## Slices", "",
            "| id | Dice | 1 - U | " + (f"{recommended} | " if extra else "") +
            f"OOD flag ({recommended}) | OOD label | uncertain sector | MBF auto "
            "| MBF GT mask | MBF true |", "|---|---|---|---|---|---|---|---|---|" +
            ("---|" if extra else "")]
  for s in results["slices"]:
    value = (s.get("ood_scores") or {}).get(recommended)
    lines.append(f"| {s['id']} | {number_text(s['dice'])} | {number_text(s['one_minus_U'])} | " +
                 (f"{number_text(value)} | " if extra else "") +
                 f"{'yes' if s['ood_flag'] else ''} | {'yes' if s.get('ood_label') else ''} | "
                 f"{s['uncertain_sector'] or ''} | {number_text(s['mbf_auto'], '.2f')} | "
                 f"{number_text(s['mbf_gt_mask'], '.2f')} | {number_text(s['mbf_true'], '.2f')} |")
  lines += _config_section(results)
  return "\n".join(lines) + "\n"
