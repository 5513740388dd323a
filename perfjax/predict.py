"""Segmentation, probabilities and the uncertainty map of slices with a trained patch UNet.

`predict_arrays` is the sliding-window step shared by the test-set analysis
(`perfjax.evaluate`), the OOD labels of a second model (`perfjax.ood`) and `predict`.

`predict` (``--mode=predict``) segments unlabelled data (a NIfTI file or folder, DICOM series
folders, or a dataset split) and writes per slice the segmentation, probabilities and UM as
NIfTI (in the 128 x 128 crop and on the input's own grid with its affine), a table of U / 1-U /
OOD flag / uncertain sector / flow, one PNG per slice, and per study (slices of known level) the
AHA 16-segment flow (`studies.json`, `bullseyes.png`). A file given without a mask has its
crop centred on the LV the model segments (`recentred`), not only on the one found from the
images.

OOD flag: the slice's value of the score named by eval.ood_score (`perfjax.ood.primary_score`;
the paper's 1 - U by default) below that score's threshold t chosen by `evaluate` on labelled
data (`ood_threshold`: results.json's ood.threshold, or the score's in ood_all); every row names
the score (`ood_score`), its value (`ood_score_value`) and t (`ood_threshold`). When most of a
batch is flagged, far more often than in-distribution slices were (`site_warning`), predict
warns that the input as a whole looks unlike the training data (slices.json `batch_warning`).

Flow: with the acquisition's sequence parameters (the sidecar's `"sequence"`,
`perfjax.data.sidecar.slice_metadata`) the curves are converted to concentration and MBF is in
ml/g/min (`mbf`, `mbf_sector48`, with `mbf_flip_lo/_hi` at the flip angle -/+ 10 %; the AIF
from the sidecar's `"aif_series"` when given, else from the slice's blood pool;
`aif_amplification` and, for a saturated or near-saturated AIF, `aif_note` and status
"warning"); without them the Fermi fit of the raw signal is a relative flow
(`flow_relative`, `flow_relative_sector48`, `flow_units` = `RELATIVE_UNITS`), never reported
as MBF.

Real inputs are untrusted: every per-file step (read and preprocess, `perfjax.predict_files`;
model, uncertainty, MBF, write) runs under a guard that turns any exception into that file's
row in slices.csv / slices.json (`status` "failed", `error` naming the file and the problem;
the traceback goes to ``predict.log``) and goes on with the next file. Problems after the
model that leave the outputs usable (no segmented myocardium, a failed Fermi fit, a segmented
RV that is not on the image's left: `orientation_warning`) are `status` "warning" with the
outputs written; a failed file has no outputs. `launch.py` exits with
`EXIT_SOME_FAILED` (3) when any file failed, after a summary line.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import traceback

import ml_collections
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from perfjax import checkpoints
from perfjax import conventions
from perfjax import figures
from perfjax import frame_gain
from perfjax import inference
from perfjax import metrics
from perfjax import panels
from perfjax import perfusion
from perfjax import postprocess
from perfjax import reporting
from perfjax import sectors
from perfjax import uncertainty
from perfjax.conventions import MYOCARDIUM, PATCH
from perfjax.data import grid as data_grid
from perfjax.data import preprocess
from perfjax.data import sidecar
from perfjax.data import writers
from perfjax.errors import InputError
from perfjax.fast_unet import UNetPredictor
from perfjax.inputs import model_inputs
from perfjax.predict_files import (CROP_FILES, INPUT_GRID_FILES, check_output, clear_previous,
                                   display_name, error_message, file_name, foreign_entries,
                                   input_entries, prepared, read_input, split_slices, unique_ids)

SLICES_PER_STEP = 4  # Slices per sliding-window call between progress-bar updates.


def window_options(config: ml_collections.ConfigDict, um: bool = False) -> dict:
  """`sliding_window` options of `config.eval` (and the model's patch size) for the
  segmentation pass, or with ``um`` for the UM pass: each has its own mirror-TTA switch
  (``eval.mirror_tta``, ``eval.mirror_tta_um``)."""
  mirror = config.eval.get("mirror_tta_um" if um else "mirror_tta", False)
  return dict(patch=int(config.model.get("patch", PATCH)), chunk_size=config.eval.chunk_size,
              gaussian_weighting=bool(config.eval.get("gaussian_weighting", False)),
              mirror_tta=bool(mirror))


def predict_arrays(model, variables, images_nhwt: np.ndarray, peak_lv_frame, config,
                   with_um: bool = True, desc: str = "predict", progress: bool = True,
                   segmentation_pass: dict | None = None) -> dict[str, np.ndarray]:
  """Segmentation (stride eval.stride_seg) and UM (stride eval.stride_um) of N slices.

  ``segmentation_pass``: this function's own output without UM for the same slices and
  config (probs, segmentation), already made: that pass is not made again.

  Returns probs [N,H,W,4] (mean softmax), segmentation [N,H,W] int32 (one heart per slice
  when config.eval.keep_heart: `perfjax.postprocess.keep_heart`) and, with `with_um`,
  um [N,H,W] (std of the myocardium probability across the stride-2 windows) and, when
  config.eval.vote_map, um_vote [N,H,W] (the share of those windows whose label disagrees
  with the pixel's majority: `inference.vote_disagreement`), from the same pass.
  """
  inputs = model_inputs(images_nhwt, peak_lv_frame, config.input)
  predictor = UNetPredictor(model, fast=True)
  parts: dict[str, list] = {"probs": [], "segmentation": [], "um": []}
  progress = tqdm(total=len(inputs), desc=desc, unit="slice", disable=not progress)
  for lo in range(0, len(inputs), SLICES_PER_STEP):
    batch = inputs[lo:lo + SLICES_PER_STEP]
    if segmentation_pass is not None:
      for key in ("probs", "segmentation"):
        parts[key].append(segmentation_pass[key][lo:lo + SLICES_PER_STEP])
    else:
      seg = inference.sliding_window(predictor, variables, batch, stride=config.eval.stride_seg,
                                     **window_options(config))
      parts["probs"].append(seg["mean"])
      labels = np.asarray(seg["segmentation"])
      parts["segmentation"].append(postprocess.keep_heart_batch(labels)
                                   if config.eval.get("keep_heart", False) else labels)
    if with_um:
      with_votes = bool(config.eval.get("vote_map", False))
      dense = inference.sliding_window(predictor, variables, batch, stride=config.eval.stride_um,
                                       votes=with_votes, **window_options(config, um=True))
      parts["um"].append(dense["std"][..., MYOCARDIUM])
      if with_votes:
        parts.setdefault("um_vote", []).append(inference.vote_disagreement(dense["votes"]))
    progress.update(len(batch))
  progress.close()
  return {k: np.concatenate(v) for k, v in parts.items() if v}


# ------------------------------------------------------------------------------------------
# Prediction on new data.

EXIT_SOME_FAILED = 3  # launch.py's exit status when some files failed (the others are written)
ABSOLUTE_UNITS = "ml/g/min"
# Flow fitted to the raw signal (no sequence parameters): proportional to MBF at best, with a
# bias that depends on the sequence and the blood signal's saturation; never in an MBF field.
RELATIVE_UNITS = "relative (uncalibrated signal; not ml/g/min)"
# sector_failures text of a sector without segmented myocardium (no curve to fit).
EMPTY_SECTOR = "no myocardium pixels in the sector"
# Study bullseyes, one file (and one colour scale) per unit: (units, file, colour-bar label).
BULLSEYE_FILES = ((ABSOLUTE_UNITS, "bullseyes.png", "MBF (ml/g/min)"),
                  (RELATIVE_UNITS, "bullseyes_relative.png", "relative flow (uncalibrated)"))


PAPER_SCORE = conventions.PAPER_OOD_SCORE


def _ood_summary(workdir: str, score: str) -> tuple[dict, str, str | None]:
  """The ROC summary of ``score`` in the workdir's results.json, where it sits, the labels."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return {}, "", None
  with open(path) as f:
    results = json.load(f)
  o = results.get("ood") or {}
  if (o.get("score") or PAPER_SCORE) == score:
    return o, f"{path}: ood", o.get("labels")
  labels = o.get("labels")
  summary = (results.get("ood_all") or {}).get(labels) or {}
  if score != PAPER_SCORE:
    summary = (summary.get("baselines") or {}).get(score) or {}
  where = f"ood_all.{labels}" + ("" if score == PAPER_SCORE else f".baselines.{score}")
  return summary, f"{path}: {where}", labels


def ood_threshold(workdir: str, score: str = PAPER_SCORE) -> tuple[float | None, str | None]:
  """The threshold t of the OOD score ``score`` chosen on labelled data by `evaluate`
  (results.json), and where in results.json it was read; (None, None) without one.

  ``ood.threshold`` when ``ood.score`` is ``score`` (a results.json without ``ood.score`` is
  the paper's U), else the threshold of ``score`` against the same labels in ``ood_all``.
  """
  summary, where, labels = _ood_summary(workdir, score)
  t = summary.get("threshold")
  if t is None:
    return None, None
  return float(t), f"{where}.threshold (labels '{labels}')"


def in_distribution_flag_rate(workdir: str, score: str = PAPER_SCORE) -> float | None:
  """The share of in-distribution slices of the labelled data that the threshold flagged:
  1 - specificity of ``score``'s ROC in results.json (None when unknown)."""
  spec = _ood_summary(workdir, score)[0].get("specificity")
  return None if spec is None or not np.isfinite(spec) else float(1.0 - spec)


RECENTRE_MIN_PX = 8.0  # a crop is cut again when the model's LV lies this far from its centre
RECENTRE_MIN_LV_PIXELS = 20  # the least segmented LV that counts as one
RECENTRE_CANDIDATES = 3  # the detector's next blood pools tried when a crop holds no LV


def segmented_lv_offset(model, variables, s: dict, config: ml_collections.ConfigDict
                        ) -> tuple[tuple[float, float] | None, dict]:
  """(rows, cols) from the centre of a slice's crop to the LV its stride-32 segmentation
  finds there, None when the model finds fewer than ``RECENTRE_MIN_LV_PIXELS`` of it; and
  that segmentation pass (`predict_arrays` without UM)."""
  peak = np.array([s["peak_lv_frame"]], np.int32)
  seg_pass = predict_arrays(model, variables, s["image"][None], peak, config, with_um=False,
                            progress=False)
  rows, cols = np.nonzero(seg_pass["segmentation"][0] == conventions.LV_BLOOD_POOL)
  if rows.size < RECENTRE_MIN_LV_PIXELS:
    return None, seg_pass
  mid = conventions.IMAGE_SIZE // 2  # where `preprocess.crop_center` puts the centre pixel
  return (float(rows.mean()) - mid, float(cols.mean()) - mid), seg_pass


def recentred(s: dict, model, variables, config: ml_collections.ConfigDict, reread) -> dict:
  """A file's slice with its crop centred on the LV the model segments.

  Without a mask, preprocessing centres the crop on the LV found from the images alone
  (`preprocess.detect_lv`). On real images that misses by more than 20 mm on about a third
  of the slices (benchmarks/RESULTS.md), and the network finds the LV better:
  - when the crop's segmented LV lies ``RECENTRE_MIN_PX`` or more from its centre, the crop
    is cut again on it;
  - when the crop holds no LV, the detector's next ``RECENTRE_CANDIDATES`` blood pools are
    tried as centres, in its order, and the first whose crop does hold one is taken.

  ``reread(center)`` gives the slice again with that crop centre (resampled frame).
  slices.json's ``geometry.crop_centre`` says how the centre was found. A slice with a mask
  keeps the mask's LV. Where the returned crop is one whose segmentation pass was made here,
  that pass comes with it (``segmentation_pass``, for `predict_arrays`)."""
  if s["mask"] is not None:
    return dict(s, crop_centre="LV of the mask")
  first, how = s["info"]["center"], ""
  offset, seg_pass = segmented_lv_offset(model, variables, s, config)
  if offset is None:
    for k, candidate in enumerate(s["info"]["lv_candidates"][1:1 + RECENTRE_CANDIDATES], 2):
      other = reread(candidate)
      offset, other_pass = segmented_lv_offset(model, variables, other, config)
      if offset is not None:
        s, seg_pass, how = other, other_pass, (f"; the first crop held none, the one at blood "
                                               f"pool {k} did")
        break
  if offset is None:
    return dict(s, segmentation_pass=seg_pass,
                crop_centre="LV found from the images (the model segments none there)")
  if np.hypot(*offset) >= RECENTRE_MIN_PX:
    s, seg_pass = reread((s["info"]["center"][0] + offset[0],
                          s["info"]["center"][1] + offset[1])), None
  elif not how:
    return dict(s, segmentation_pass=seg_pass, crop_centre="LV found from the images")
  moved = float(np.hypot(*np.subtract(s["info"]["center"], first)))
  return dict(s, segmentation_pass=seg_pass,
              crop_centre=f"LV segmented by the model ({moved:.0f} px from the LV found "
                          f"from the images{how})")


ORIENTATION_TOLERANCE_DEG = 90.0  # how far the septal centre may lie from the standard display's


def orientation_warning(seg) -> str | None:
  """A warning when the segmented RV is not on the image's left, where the standard display
  (CONVENTIONS.md) puts it, i.e. the septal centre theta_s lies more than
  ``ORIENTATION_TOLERANCE_DEG`` from `conventions.STANDARD_SEPTAL_ANGLE`; else None, and None
  without RV insertion points. The file's orientation is then probably off. The AHA sectors
  follow the RV insertion points counter-clockwise, so a rotated image still gets the right
  numbers, but a mirrored one gets them the wrong way round (anterior <-> inferior), and no
  check of the image alone can tell a mirror from a rotation."""
  try:
    theta_s = sectors.septal_angle(seg, source="segmentation")
  except InputError:
    return None
  off = abs((theta_s - conventions.STANDARD_SEPTAL_ANGLE + 180.0) % 360.0 - 180.0)
  if off <= ORIENTATION_TOLERANCE_DEG:
    return None
  return (f"the segmented RV is not on the image's left (septal centre at {theta_s:.0f} deg, "
          f"{off:.0f} deg from the standard display's {conventions.STANDARD_SEPTAL_ANGLE:.0f}): "
          "the file's orientation may be off. A rotation leaves the AHA sector numbers right; "
          "a mirrored image numbers them the wrong way round (README, orientation)")


SITE_MIN_SLICES = 5  # A batch-level warning needs at least this many predicted slices,
SITE_MIN_SHARE = 0.5  # at least this share of them flagged, and
SITE_P_VALUE = 0.01  # a binomial p-value below this against the in-distribution flag rate.


def site_warning(n_flagged: int, n: int, flag_rate: float | None) -> str | None:
  """A plain warning when a batch as a whole looks unlike the training data, else None.

  Rule: at least SITE_MIN_SLICES predicted slices, at least SITE_MIN_SHARE of them flagged,
  and (when the labelled data's in-distribution flag rate is known) so many that
  in-distribution slices would be flagged this often with probability < SITE_P_VALUE
  (binomial). One flagged slice is a slice to check; most of a batch flagged means another
  scanner, sequence or site (the paper's U works best as such a warning, README).
  """
  if n < SITE_MIN_SLICES or n_flagged < SITE_MIN_SHARE * n:
    return None
  against = ""
  if flag_rate is not None:
    p_value = float(stats.binom.sf(n_flagged - 1, n, min(max(flag_rate, 1e-3), 1.0)))
    if p_value >= SITE_P_VALUE:
      return None
    against = (f", against {flag_rate:.0%} of in-distribution slices of the labelled data "
               f"(binomial p = {p_value:.1g})")
  return (f"{n_flagged} of {n} slices ({n_flagged / n:.0%}) are flagged OOD{against}: the input "
          "as a whole looks unlike the training data (another scanner, sequence or site?). "
          "Check the segmentations before using their numbers; fine-tuning on a few labelled "
          "slices of this site helps (README, 'Real images').")


def crop_transform(info: dict) -> np.ndarray:
  """3 x 3 homogeneous map of a crop pixel (row, col, 1) to the input array's (row, col, 1)
  (pixel centres; the resampling is `ndimage.zoom(grid_mode=True)`)."""
  size = conventions.IMAGE_SIZE
  r0 = int(round(info["center"][0])) - size // 2
  c0 = int(round(info["center"][1])) - size // 2
  fr, fc = info["zoom"]
  return np.array([[1 / fr, 0, (r0 + 0.5) / fr - 0.5], [0, 1 / fc, (c0 + 0.5) / fc - 0.5],
                   [0, 0, 1]], np.float64)


def geometry(s: dict) -> dict | None:
  """Where the crop lies in the input (for slices.json): crop box, spacing, transform, grid."""
  info = s.get("info")
  if info is None:
    return None
  size = conventions.IMAGE_SIZE
  transform = crop_transform(info)
  out = dict(input_shape=list(info["shape"]), input_pixel_mm=None if s["pixel_mm"] is None
             else [float(v) for v in s["pixel_mm"]],
             crop_pixel_mm=None if s["pixel_mm"] is None else [
                 float(s["pixel_mm"][0]) / info["zoom"][0], float(s["pixel_mm"][1]) / info["zoom"][1]],
             resampled_shape=list(info["resampled_shape"]), zoom=[float(z) for z in info["zoom"]],
             crop_box=dict(row0=int(round(info["center"][0])) - size // 2,
                           col0=int(round(info["center"][1])) - size // 2, size=size,
                           frame="resampled"),
             crop_centre=s.get("crop_centre"),
             frame_start=int(info["frame_start"]), n_frames=conventions.NUM_FRAMES,
             crop_to_input=transform.round(9).tolist())
  if s.get("grid") is not None:
    out["input_grid"] = data_grid.grid_summary(s["grid"])
    out["crop_affine"] = data_grid.array_affine(s["grid"], transform,
                                                (size, size)).round(6).tolist()
  return out


def _row(s: dict, **values) -> dict:
  level = s.get("slice_level", -1)
  row = dict(id=s["id"], file=s.get("file"), status="failed", study=s.get("study"),
             slice_level=None if level is None or level < 0 else int(level), U=None,
             one_minus_U=None, ood_flag=None, ood_score=None, ood_score_value=None,
             ood_threshold=None, uncertain_sector=None, dice=None, flow_units=None,
             flow_relative=None, flow_relative_sector48=None, mbf=None, mbf_sector48=None,
             mbf_flip_lo=None, mbf_flip_hi=None, aif_source=None, aif_amplification=None,
             aif_note=None, sector_failures=None,
             frame_gain_sd_percent=None, frame_gain_uptake_removed=None, frame_gain_note=None,
             spill_sectors=None, error=None,
             geometry=None)
  row.update(values)
  return row


def _floats(values) -> list[float | None]:
  return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


def _finite(value) -> float | None:
  return float(value) if np.isfinite(value) else None


def slice_flow(s: dict, seg: np.ndarray) -> dict:
  """Flow of one slice from its raw signal and segmentation (one batched Fermi solve).

  With the acquisition's sequence (`s["sequence"]`: the sidecar's `"sequence"`, or a dataset's
  record) the curves are converted to concentration and the result is MBF in ml/g/min, with
  MBF at the flip angle -/+ 10 % beside it, and the AIF series when one is given; without it
  the fit of the raw signal is a RELATIVE flow (`RELATIVE_UNITS`), which is never put in an
  MBF field. The frames are first divided by their gain measured on non-enhancing tissue
  (`perfjax.frame_gain`): its sd in % or, when it was not applied, why; ``spill_sectors``
  counts the sectors whose fit kept the spill-over term (the LV pool's signal, partial
  volume). Returns the row's flow fields and, under "_study", what the study bullseye needs.
  """
  sequence = s.get("sequence")
  series = s.get("aif_series")
  res = perfusion.mbf_from_slices(
      s["raw"][None], seg[None], s["times"][None],
      sequences=None if sequence is None else [sequence],
      aif_series=None if sequence is None or series is None else [series])
  v48 = np.asarray(res["mbf48"][0], np.float64)
  ok48 = np.asarray(res["ok48"][0], bool) & np.isfinite(v48)
  reasons = np.asarray(res["reason48"][0])
  counts = np.asarray(res["counts"][0])
  failures = {} if str(res["error"][0]) else {
      str(k + 1): EMPTY_SECTOR if counts[k] == 0
      else perfusion.REASONS.get(int(reasons[k]), f"fit failed (code {int(reasons[k])})")
      for k in np.nonzero(~ok48)[0]}
  absolute = sequence is not None
  amplification = float(res["aif_amplification"][0])
  out = dict(flow_units=ABSOLUTE_UNITS if absolute else RELATIVE_UNITS,
             aif_source=str(res["aif_source"][0]) or None,
             aif_amplification=_finite(round(amplification, 2)),
             aif_note=aif_note(amplification, str(res["aif_source"][0])),
             sector_failures=failures or None, _error=str(res["error"][0]),
             **frame_gain_fields(res["frame_gain"][0], str(res["frame_gain_reason"][0]),
                                 bool(res["frame_gain_uptake_removed"][0])),
             spill_sectors=int(np.sum(np.asarray(res["spill48"][0], np.float64) > 0)),
             _study=dict(values48=v48, counts48=counts, absolute=absolute))
  if absolute:
    out.update(mbf=_finite(res["slice_mbf"][0]), mbf_sector48=_floats(v48),
               mbf_flip_lo=_finite(res["slice_mbf_flip_lo"][0]),
               mbf_flip_hi=_finite(res["slice_mbf_flip_hi"][0]))
  else:
    out.update(flow_relative=_finite(res["slice_mbf"][0]), flow_relative_sector48=_floats(v48))
  return out


def aif_note(amplification: float, source: str) -> str | None:
  """slices.json's aif_note: why the AIF's peak concentration, and so the MBF, is uncertain
  (its conversion from signal amplifies errors more than `perfusion.AIF_MAX_AMPLIFICATION`
  times, or is saturated); None otherwise and for relative flow (NaN amplification)."""
  what = "the AIF series" if source == "series" else "a slice's blood pool"
  remedy = ("check the series' sequence parameters" if source == "series" else
            "give an AIF series (dual sequence or dual bolus, README) for absolute MBF")
  if amplification == float("inf"):
    return (f"AIF from {what} at or beyond the saturation of the sequence's signal: its peak "
            f"concentration, and the MBF, are not determined by the images; {remedy}")
  if amplification > perfusion.AIF_MAX_AMPLIFICATION:
    return (f"AIF from {what} near saturation: 1 % of blood-signal error is "
            f"{amplification:.0f} % of its peak concentration, so MBF is approximate; {remedy}")
  return None


def frame_gain_fields(gain, reason: str, uptake_removed: bool = False) -> dict:
  """slices.json's frame_gain_sd_percent (the sd of the applied per-frame gain, in %),
  frame_gain_uptake_removed (whether the tissue it was measured on enhanced, so that its uptake
  was regressed out of it; None without a gain) and frame_gain_note (why no gain was applied;
  None when one was)."""
  if reason:
    return dict(frame_gain_sd_percent=None, frame_gain_uptake_removed=None,
                frame_gain_note=reason)
  return dict(frame_gain_sd_percent=round(float(frame_gain.sd_percent(gain)), 3),
              frame_gain_uptake_removed=bool(uptake_removed), frame_gain_note=None)


def _predict_one(s: dict, model, variables, config, threshold, output: str,
                 score: str = PAPER_SCORE) -> dict:
  """Model, U, MBF and the outputs of one slice; raises on failure (the caller's guard).

  The slice is flagged OOD when its OOD score ``score`` (eval.ood_score; 1 - U for the paper's
  U) is below ``threshold``."""
  peak = np.array([s["peak_lv_frame"]], np.int32)
  pred = predict_arrays(model, variables, s["image"][None], peak, config, progress=False,
                        segmentation_pass=s.get("segmentation_pass"))
  unc = uncertainty.configured_uncertainty(pred["um"], pred["segmentation"], config.eval)
  flow = slice_flow(s, pred["segmentation"][0])
  seg, um, probs = pred["segmentation"][0].astype(np.int32), pred["um"][0], pred["probs"][0]
  one_minus_u = float(unc["one_minus_U"][0])
  if score == PAPER_SCORE:
    value = one_minus_u
  else:
    from perfjax import ood  # pylint: disable=g-import-not-at-top  (ood imports this module)
    value = float(ood.slice_scores(score, model, variables,
                                   dict(image=s["image"][None], peak_lv_frame=peak), pred,
                                   config)[0])
  dice = None if s["mask"] is None else float(metrics.dice(seg, s["mask"]))
  sector = int(unc["uncertain_sector"][0]) or None
  folder = os.path.join(output, s["id"])
  shown_score = None if score == PAPER_SCORE else (score, value)
  try:
    png_warnings = _write_slice(folder, s, seg, um, probs, one_minus_u, dice, sector,
                                shown_score)
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)  # a failed slice leaves no outputs
    raise
  error = flow.pop("_error") or flow["aif_note"]
  fallback = (f"U's sectors placed at theta_s = {config.eval.u_fallback_septal_angle:g} deg (no RV "
              "insertion points in the segmentation)" if unc["sectors_from"][0] == "fallback"
              else None)
  warnings = [w for w in (unc["problems"][0], fallback, orientation_warning(seg), error)
              if w] + png_warnings
  failures = flow["sector_failures"] or {}
  if not warnings and failures:
    why = sorted(set(failures.values()))
    warnings.append(f"Fermi fit failed in {len(failures)} of 48 sectors ({'; '.join(why[:3])}; "
                    "per sector in slices.json)")
  return _row(s, status="warning" if warnings else "ok", U=float(unc["U"][0]),
              one_minus_U=one_minus_u,
              ood_flag=None if threshold is None else bool(value < threshold),
              ood_score=score, ood_score_value=value, ood_threshold=threshold,
              uncertain_sector=sector, dice=dice, **flow,
              error="; ".join(f"{s['file']}: {w}" for w in warnings) or None, geometry=geometry(s))


def _write_slice(folder, s, seg, um, probs, one_minus_u, dice, sector, shown_score=None) -> None:
  info, grid = s.get("info"), s.get("grid")
  affine = None
  if grid is not None and info is not None:
    affine = data_grid.array_affine(grid, crop_transform(info), seg.shape)
  pixel_mm = (1.0, 1.0)
  if s.get("pixel_mm") is not None and info is not None:
    pixel_mm = (s["pixel_mm"][0] / info["zoom"][0], s["pixel_mm"][1] / info["zoom"][1])
  outputs = ((seg, False, True), (probs, True, False), (um, False, False))  # channels, labels
  for name, (array, channels, _) in zip(CROP_FILES, outputs):
    writers.write_nifti(os.path.join(folder, name), array, pixel_mm, affine=affine,
                        channels=channels)
  if grid is not None and info is not None:  # the same on the input's own voxels and affine
    for name, (array, channels, labels) in zip(INPUT_GRID_FILES, outputs):
      writers.write_on_grid(os.path.join(folder, name),
                            preprocess.to_original(array, info, labels=labels), grid,
                            channels=channels)
  try:  # the picture is a convenience: a plotting problem is a warning, not a lost slice
    panels.panel(os.path.join(folder, f"{s['id']}.png"), s["image"], seg, um, s["mask"],
                 f"{s['id']}: 1-U {one_minus_u:.3f}" +
                 (f", {shown_score[0]} {shown_score[1]:.3f}" if shown_score else "") +
                 (f", Dice {dice:.3f}" if dice is not None else ""), sector)
  except Exception as e:  # pylint: disable=broad-except
    return [f"PNG not drawn ({type(e).__name__}: {display_name(str(e))})"]
  return []


def predict(config: ml_collections.ConfigDict, workdir: str, input: str | None,  # pylint: disable=redefined-builtin
            output: str | None) -> list[dict]:
  """Segments new data with the best checkpoint of `workdir`; see the module docstring.

  `input`: a NIfTI file, a folder (NIfTI files and/or DICOM series folders), or
  ``split:NAME`` for a split of the config's dataset (default ``split:test``). Outputs go to
  `output` (default WORKDIR/predictions), checked writable before anything is computed; an
  earlier run's outputs there are removed first (`clear_previous`). Per slice ``ID/``:
  ``segmentation.nii.gz``, ``probabilities.nii.gz`` (``[X, Y, 1, 1, 4]``, classes on the 5th
  dimension) and ``um.nii.gz`` on the 128 x 128 crop (their affine places the crop in the
  input's patient space), the same three as ``*_input.nii.gz`` on the input's own voxels with
  its affine (0 outside the crop), and ``ID.png``. For all slices ``slices.csv`` and
  ``slices.json`` (file, status ok/warning/failed, study and slice level, U, 1-U, OOD flag with
  the score, its value and the threshold that set it, uncertain sector, the flow
  (`slice_flow`: ``mbf`` in ml/g/min when the sequence is known, else ``flow_relative``;
  ``flow_units`` says which; 48 sectors, the AIF's source and each failed sector's reason in
  the JSON), Dice when a mask is given, the error or warning, and
  in the JSON the crop's geometry: box, spacing, frame start, crop-to-input transform, input
  affine), ``studies.json`` and ``bullseyes.png`` / ``bullseyes_relative.png`` when a study
  has slices of known level (`study_outputs`), and ``predict.log`` with the tracebacks of
  failed files. Ids are the input names made safe and unique (`unique_ids`), never the name of
  something already in `output` that predict did not write. Returns the rows.
  """
  workdir = os.path.abspath(workdir)
  output = os.path.abspath(output or os.path.join(workdir, "predictions"))
  input = input or "split:test"
  check_output(output, input)
  config = checkpoints.trained_config(config, workdir)
  from perfjax import ood  # pylint: disable=g-import-not-at-top  (ood imports this module)
  score = ood.primary_score(config)
  ood.check_score_available(config, score)
  model, variables = checkpoints.load_params(config, workdir, "best")
  threshold, threshold_source = ood_threshold(workdir, score)
  notes, log = [], []
  others = foreign_entries(output)
  if input.startswith("split:"):
    split = split_slices(config, input.partition(":")[2])
    items = [("split", dict(s, id=slice_id))
             for slice_id, s in zip(unique_ids([s["id"] for s in split], others), split)]
  else:
    entries, notes = input_entries(input, output)
    items = [("file", (slice_id, path, mask, index)) for slice_id, (_, path, mask, index) in
             zip(unique_ids([n for n, _, _, _ in entries], others), entries)]
  clear_previous(output)
  if others:
    notes.append(f"{output} also holds {', '.join(display_name(n) for n in others[:10])}" +
                 (" ..." if len(others) > 10 else "") +
                 " (not from predict: left alone, and no slice takes these names)")
  rows, flows = [], {}
  for kind, item in tqdm(items, desc="predict", unit="slice"):
    if kind == "split":
      s = item
    else:
      slice_id, path, mask, index = item
      s = dict(id=slice_id, file=file_name(path, index))
    stage = "read"
    try:
      if kind == "file":
        read = read_input(path, mask, index)  # once: each crop centre tried reuses it
        s = prepared(slice_id, path, read)
        stage = "re-centre"
        s = recentred(s, model, variables, config,
                      lambda c: prepared(slice_id, path, read, c))
      stage = "predict"
      rows.append(_predict_one(s, model, variables, config, threshold, output, score))
      flows[rows[-1]["id"]] = rows[-1].pop("_study")
    except Exception as e:  # pylint: disable=broad-except  (one bad file never costs the batch)
      message = error_message(s["file"], stage, e)
      rows.append(_row(s, error=message))
      log.append(f"{s['file']} ({s['id']}), {stage}:\n" + display_name(traceback.format_exc()))
  rows.sort(key=lambda r: r["id"])
  studies, study_notes = study_outputs(rows, flows, output)
  notes += study_notes
  n_failed = sum(r["status"] == "failed" for r in rows)
  n_flagged = sum(bool(r["ood_flag"]) for r in rows)
  batch_warning = None if threshold is None else site_warning(
      n_flagged, len(rows) - n_failed, in_distribution_flag_rate(workdir, score))
  writers.write_json(os.path.join(output, "slices.json"),
                     dict(ood_threshold=threshold, ood_score=score,
                          ood_threshold_source=threshold_source, batch_warning=batch_warning,
                          input=display_name(input), slices=rows))
  _write_csv(os.path.join(output, "slices.csv"), rows)
  if log:
    reporting.write_text(os.path.join(output, "predict.log"), "\n".join(log))
  for note in notes:
    print(f"note: {note}")
  n_warn = sum(r["status"] == "warning" for r in rows)
  label = reporting.score_label(score)
  print(f"predicted {len(rows) - n_failed} of {len(rows)} slices into {output}" +
        (f"; {n_failed} failed (errors in slices.csv, tracebacks in predict.log)" if n_failed else "") +
        (f"; {n_warn} with warnings" if n_warn else "") +
        (f"; {len(studies)} study bullseye(s) in studies.json" if studies else "") +
        (f"; {n_flagged} of {len(rows) - n_failed} flagged OOD ({label} < {threshold:.3f})"
         if threshold is not None else
         "; no OOD threshold " + ("" if score == PAPER_SCORE else f"of {score} ") +
         "yet (run --mode=evaluate on labelled data first), ood_flag left empty"), flush=True)
  if batch_warning:
    print(f"warning: {batch_warning}", flush=True)
  return rows


def study_outputs(rows: list[dict], flows: dict[str, dict], output: str
                  ) -> tuple[list[dict], list[str]]:
  """The AHA 16-segment flow of each study given with slices of known level.

  A slice's study is its sidecar's "study", else its DICOM StudyInstanceUID, else the folder
  holding the file (a dataset split: its study); its level its sidecar's "slice_level", else
  basal/base, mid, apical/apex in its name. A study with at least one such slice that was
  predicted (status ok or warning) gets a row in ``studies.json`` (study, the slice id at each
  level, units, aha16: 16 values from segment 1, null where no slice covers it) and a bullseye
  in ``bullseyes.png`` (one grid, one colour scale per unit); calibrated (ml/g/min) and
  relative flow are never mixed in one study. Returns (studies, notes on studies left out).
  """
  groups: dict[str, list[dict]] = {}
  for r in rows:
    if r["id"] in flows and r.get("slice_level") is not None:
      groups.setdefault(str(r["study"]), []).append(r)
  studies, notes = [], []
  for study, members in sorted(groups.items()):
    levels = [r["slice_level"] for r in members]
    dupes = sorted({sidecar.LEVEL_NAMES[lv] for lv in levels if levels.count(lv) > 1})
    if dupes:
      notes.append(f"study {study}: no bullseye, more than one {'/'.join(dupes)} slice "
                   f"({', '.join(r['id'] for r in members)}); give each level once (sidecar "
                   "\"slice_level\")")
      continue
    absolute = {flows[r["id"]]["absolute"] for r in members}
    if len(absolute) > 1:
      notes.append(f"study {study}: no bullseye, its slices mix MBF in ml/g/min and relative "
                   "flow (give every slice's sequence, or none)")
      continue
    aha16 = perfusion.aha16_mbf({r["slice_level"]: flows[r["id"]]["values48"] for r in members},
                                {r["slice_level"]: flows[r["id"]]["counts48"] for r in members})
    studies.append(dict(study=study, units=ABSOLUTE_UNITS if absolute.pop() else RELATIVE_UNITS,
                        slices={sidecar.LEVEL_NAMES[r["slice_level"]]: r["id"] for r in members},
                        aha16=_floats(aha16)))
  if studies:
    writers.write_json(os.path.join(output, "studies.json"), dict(studies=studies))
    for units, name, label in BULLSEYE_FILES:
      of = [(f"study {st['study']}", {"flow": np.array(st["aha16"], np.float64)})
            for st in studies if st["units"] == units]
      if not of:
        continue
      try:  # the table is the result; the picture a convenience
        reporting.save_figure(figures.bullseye_grid(of, label=label),
                              os.path.join(output, name))
      except Exception as e:  # pylint: disable=broad-except
        notes.append(f"{name} not drawn ({type(e).__name__}: {display_name(str(e))})")
  return studies, notes


def n_failed(rows: list[dict]) -> int:
  """How many of `predict`'s rows failed (no outputs)."""
  return sum(r.get("status") == "failed" for r in rows)


CSV_FIELDS = ["id", "file", "status", "study", "slice_level", "U", "one_minus_U", "ood_flag",
              "ood_score", "ood_score_value", "ood_threshold", "uncertain_sector", "dice",
              "flow_units", "flow_relative", "mbf", "error"]


def _write_csv(path: str, rows: list[dict]) -> None:
  with writers.atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if r[k] is None or (isinstance(r[k], float) and not np.isfinite(r[k]))
                           else r[k]) for k in CSV_FIELDS})
