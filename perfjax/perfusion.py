"""Myocardial blood flow of segmented slices (paper II-D, III-C): many slices, one solve.

Pipeline for one slice (CONVENTIONS.md, "Perfusion"):

1. :func:`extract_curves` (`perfjax.extraction`, re-exported here): the AIF and the 48
   sector tissue curves (24 angular x 2 radial) from the images, baseline-subtracted, in
   concentration when the sequence is known (:func:`signal_to_concentration`); the AIF from
   an AIF series where one was acquired (:func:`aif_from_series`).
2. :func:`fit_fermi` (`perfjax.fermi`, re-exported here): Fermi-constrained deconvolution of
   all curves of a data set in one jitted, vmapped solve; MBF in ml/g/min.
3. :func:`slice_mbf` (mean of the 48 sectors) and :func:`aha16_mbf` (16-segment bullseye).

:func:`mbf_from_slices` runs 1-3 for many slices (frame gains, the study's AIF, flip-angle
variants); :func:`mbf_of_masks` for several sets of masks of one split in one solve.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time

import jax
import numpy as np
import threadpoolctl

from perfjax import batched_curves
from perfjax import sectors as sectors_lib
from perfjax.bolus import check_curve
from perfjax.errors import InputError
from perfjax.extraction import AIF_PURITY, aif_from_series, curve_geometry, curves_per_sequence
from perfjax.fermi import fit_fermi
from perfjax.frame_gain import frame_gain as measure_frame_gain
# The curves' and fit_fermi's names, units and codes, part of the perfusion API
# (CONVENTIONS.md: perfusion.fit_fermi).
from perfjax.bolus import (  # noqa: F401  pylint: disable=unused-import
    baseline_frames, first_pass_window)
from perfjax.extraction import (  # noqa: F401  pylint: disable=unused-import
    AIF_MAX_AMPLIFICATION, SEQUENCE_KEYS, aif_amplification, blood_purity, extract_curves,
    signal_to_concentration)
from perfjax.fermi import (  # noqa: F401  pylint: disable=unused-import
    FLAT_AIF, IMPLAUSIBLE, LONG_SPAN, ML_G_MIN_PER_S, NO_ENHANCEMENT, NONFINITE, NOT_CONVERGED,
    OK, POOR_FIT, REASONS, SHORT_WINDOW, UNCERTAIN)


# ----------------------------------------------------------------------------- records
def sequence_from_record(record: dict, i: int) -> dict:
  """Sequence timing and native relaxation of slice ``i`` of a phantom/dataset record.

  Keys used: protocol, seq_ts, seq_tr, seq_flip_deg, seq_n_pulses, t1_blood_s, t2_blood_s,
  t1_myo_s, t2_myo_s and seq_sat_residual where present (else ideal saturation, 0; see
  perfjax.data.phantom.simulate); returns the dict that
  :func:`signal_to_concentration` and :func:`extract_curves` take.
  """
  try:
    return dict(protocol=str(record["protocol"][i]), ts=float(record["seq_ts"][i]),
                tr=float(record["seq_tr"][i]), flip_deg=float(record["seq_flip_deg"][i]),
                n_pulses=float(record["seq_n_pulses"][i]),
                t1_blood=float(record["t1_blood_s"][i]), t2_blood=float(record["t2_blood_s"][i]),
                t1_myo=float(record["t1_myo_s"][i]), t2_myo=float(record["t2_myo_s"][i]),
                sat_residual=float(record["seq_sat_residual"][i])
                if "seq_sat_residual" in record else 0.0)
  except KeyError as e:
    raise InputError("record", f"missing sequence key {e.args[0]!r}") from None


MIN_AIF_PIXELS = 12  # a study AIF never comes from a pool with fewer pure blood pixels
MAX_WORKERS = 8  # threads of mbf_from_slices' curve extraction
# mbf_from_slices' default extracts fewer slices with the numpy rules even on an accelerator:
# for a few slices they cost less than compiling the batched calls (benchmarks/RESULTS.md).
VECTORISE_MIN_SLICES = 16


# ----------------------------------------------------------------------------- slice/study
FLIP_SENSITIVITY = 0.1  # MBF is also reported at the flip angle x (1 -/+ this)


def _with_flip(sequence, scale):
  return None if sequence is None else dict(sequence, flip_deg=sequence["flip_deg"] * scale)


def series_lead(times) -> float:
  """Default lead (s) of an AIF series over a slice: one beat (the median frame interval).

  The series and the slices are read out in the same beats at offsets the records do not
  carry; a slice read out after the series sees the bolus "earlier" on the shared frame
  clock, which a Fermi delay tau_d >= 0 cannot fit (MBF too high). Placing the series'
  samples one beat earlier makes every within-beat offset a delay >= 0 that tau_d absorbs
  (the figures: benchmarks/RESULTS.md, issue 13).
  """
  return float(np.median(np.diff(np.asarray(times, np.float64))))


def mbf_from_slices(raw, masks, times, *, sector_maps=None, theta_s=None, centers=None,
                    sequences=None, erosion: int = 2, study_ids=None, exclude=None,
                    aif_series=None, min_aif_pixels: int = MIN_AIF_PIXELS,
                    flip_sensitivity: float = FLIP_SENSITIVITY, frame_gain: bool = True,
                    spill_over: bool = True, workers: int | None = None,
                    vectorised: bool | None = None, **fit_kwargs) -> dict:
  """48-sector and slice MBF of N slices with ONE batched fit_fermi call (N x 48 curves).

  Args:
    raw: [N, H, W, T] signal; masks: [N, H, W]; times: [N, T].
    sector_maps: optional [N, H, W] 48-sector maps; theta_s / centers: optional per-slice
      geometry (e.g. the ground truth's, to divide predicted masks the same way).
    sequences: None (MBF from raw signal: RELATIVE flow, not ml/g/min) or a list of N
      sequence dicts (:func:`sequence_from_record`) to fit concentration instead.
    study_ids: optional [N]; when given, the slices of a study share one AIF (see aif_source).
    exclude: optional bool [N]: slices whose own AIF must not serve their study (a
      motion-correction failure, an OOD flag).
    aif_series: optional list of N dicts (or None entries) with the study's AIF series
      (image [h, w, T], pd [h, w] or None, sequence, dose_ratio, pool or None, optional
      lead_s: how much earlier in each beat it was read out than the slice;
      :func:`aif_from_series`); used, with per-pixel conversion, whenever present and
      ``sequences`` is given.
    min_aif_pixels: a slice AIF from fewer pure blood pixels never serves its study.
    flip_sensitivity: with sequences, MBF is also fitted with the flip angle of every
      conversion scaled by (1 -/+ flip_sensitivity) in the same solve (0 turns it off).
    frame_gain: divide each slice's frames by its per-frame gain, measured on its
      non-enhancing tissue outside the heart (perfjax.frame_gain), before the curves are
      extracted (the AIF series, its own acquisition, is left as it is).
    spill_over: fit each sector as ``AIF (x) h + v * blood`` with v >= 0, ``blood`` the
      slice's own LV pool signal (fermi.fit_fermi's ``spill``): the pool signal that partial
      volume puts into endocardial pixels is not read as flow.
    workers: threads that extract slices' curves concurrently (default: the CPU count, at most
      MAX_WORKERS; the result does not depend on it).
    vectorised: measure the frame gains and extract the curves of all slices in batched jitted
      calls (`perfjax.batched_curves`, float32) instead of a numpy thread per slice (float64);
      the two agree to float32's precision. Default: on an accelerator (JAX's default backend
      is not the CPU), where the numpy loop would leave the device idle, for at least
      VECTORISE_MIN_SLICES slices.
    **fit_kwargs: passed to :func:`fit_fermi`; its ``se_groups`` defaults to the slices (each
      sector's standard error judged against its slice's median sector MBF), and without
      ``sequences`` its ``max_mbf`` to no limit (a ceiling in ml/g/min means nothing for
      relative flow, whose scale is the AIF signal's).

  AIF choice (``aif_source`` [N], a reason per slice): "series" (the AIF series, read out
  at another moment of each beat than the slice: its samples are placed ``lead_s`` earlier,
  the series dict's own value when the offset is known, else :func:`series_lead`), else with
  study_ids the study's slice AIF of the most pure blood pixels among those not excluded and
  with >= min_aif_pixels ("study slice <i>: largest clean pool"), else the slice's own AIF
  ("own: <why no study AIF>").

  Returns:
    dict: mbf48 [N, 48] (ml/g/min with sequences, else relative), ok48, reason48, mbf_se48,
    spill48 [N, 48] (the fitted fraction of the pool's signal enhancement in each sector's
    curve, in curve units per signal unit; NaN without spill_over),
    slice_mbf [N], slice_mbf_flip_lo / _hi [N] (NaN without sequences), aif [N, T], curves
    [N, 48, T], counts [N, 48], n_aif_pixels [N], aif_source [N] (str), aif_amplification [N]
    (of the AIF used, :func:`aif_amplification`; NaN without sequences), units ("mM" or
    "signal"), frame_gain [N, T] (ones where not measured or not asked for),
    frame_gain_reason [N] (str, "" when measured), frame_gain_uptake_removed [N] (bool: the
    applied gain is what is left once the uptake of the tissue it was measured on is regressed
    out, `perfjax.frame_gain`), error [N] (str, "" when the slice's
    curves could be extracted; a slice with a degenerate mask gets NaN and its message, never
    an exception), timing (extract_s: frame gains, geometry, curves and AIFs; fit_s: the
    Fermi solve; n_fits: curves x flip-angle variants x models, with and without spill-over).
  """
  t_start = time.perf_counter()
  raw = np.asarray(raw)
  masks = np.asarray(masks)
  times = np.asarray(times, np.float64)
  if raw.ndim != 4 or masks.shape != raw.shape[:3] or times.shape != (raw.shape[0], raw.shape[3]):
    raise InputError("raw", f"expected raw [N,H,W,T], masks [N,H,W], times [N,T]; got "
                     f"{raw.shape}, {masks.shape}, {times.shape}")
  n, t = raw.shape[0], raw.shape[3]
  scales = (1.0,) if sequences is None or not flip_sensitivity else (
      1.0, 1.0 - flip_sensitivity, 1.0 + flip_sensitivity)
  n_v = len(scales)
  aifs = np.full((n_v, n, t), np.nan)
  curves = np.full((n_v, n, 48, t), np.nan)
  blood = np.full((n, t), np.nan)
  counts = np.zeros((n, 48), np.int64)
  n_px = np.zeros(n, np.int64)
  errors = [""] * n
  source = [""] * n
  amp = np.full(n, np.nan)
  gains = np.ones((n, t))
  gain_reason = ["not asked for"] * n
  uptake_removed = np.zeros(n, bool)

  def variants_of(i):
    return [None] * n_v if sequences is None else [_with_flip(sequences[i], sc) for sc in scales]

  def geometry_of(i):
    check_curve(times[i], "times")
    return curve_geometry(masks[i], None if sector_maps is None else sector_maps[i],
                          theta_s=None if theta_s is None else theta_s[i],
                          center=None if centers is None else centers[i], erosion=erosion)

  def one_slice(i):
    """Frame gain and curves of slice i, or the InputError that stops them."""
    try:
      raw_i, fg = raw[i], None
      if frame_gain:
        fg = measure_frame_gain(raw_i, masks[i], times[i])
        raw_i = raw_i / fg["gain"]
      variants = curves_per_sequence(np.asarray(raw_i, np.float64), geometry_of(i),
                                     variants_of(i), foot_frac=0.1, blood_frac=AIF_PURITY,
                                     rician=None)
      return fg, variants, ""
    except InputError as e:
      return fg, None, str(e)

  def geometry_or_error(i):
    try:
      return geometry_of(i)
    except InputError as e:
      return str(e)

  def series_variants(a):
    """The AIF of series ``a`` (one of ``aif_series``) at each flip-angle variant."""
    return [aif_from_series(a["image"], a.get("pd"), _with_flip(a["sequence"], sc), a.get("pool"),
                            dose_ratio=a.get("dose_ratio", 1.0)) for sc in scales]

  # Slices are independent; numpy releases the GIL in most of their work. Their BLAS calls
  # run one thread each meanwhile: BLAS's own threads would contend with the slices' threads.
  n_workers = max(1, min(os.cpu_count() or 1, MAX_WORKERS, n) if workers is None else workers)
  blas_limit = threadpoolctl.threadpool_limits(1, user_api="blas") if n_workers > 1 else (
      contextlib.nullcontext())
  if vectorised is None:
    vectorised = jax.default_backend() != "cpu" and n >= VECTORISE_MIN_SLICES
  with blas_limit, concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
    per_slice = batched_curves.curves_of_slices(
        raw, masks, times, list(pool.map(geometry_or_error, range(n))),
        [variants_of(i) for i in range(n)], frame_gain=frame_gain) if vectorised else \
        pool.map(one_slice, range(n))
    for i, (fg, variants, error) in enumerate(per_slice):
      if fg is not None:
        gains[i], gain_reason[i], uptake_removed[i] = fg["gain"], fg["reason"], \
            fg["uptake_removed"]
      if error:
        errors[i] = error
        continue
      for v, ex in enumerate(variants):
        aifs[v, i], curves[v, i] = ex["aif"], ex["curves"]
      ex = variants[0]
      amp[i], blood[i] = ex["aif_amplification"], ex["blood_signal"]
      counts[i], n_px[i] = ex["counts"], ex["n_aif_pixels"]
      source[i] = "own"
    # Each AIF series that a slice with curves uses, once (slices of a study share theirs).
    use_series = aif_series is not None and sequences is not None
    needed = {id(aif_series[i]): aif_series[i] for i in range(n)
              if use_series and aif_series[i] is not None and not errors[i]}
    from_series = dict(zip(needed, pool.map(series_variants, needed.values())))
  bad = np.zeros(n, bool) if exclude is None else np.asarray(exclude, bool)
  if study_ids is not None:
    study_ids = np.asarray(study_ids)
    for sid in np.unique(study_ids):
      rows = np.nonzero(study_ids == sid)[0]
      idx = rows[(n_px[rows] >= min_aif_pixels) & ~bad[rows]]
      if idx.size:
        tied = idx[n_px[idx] == n_px[idx].max()]
        # A tie on the pixel count is decided by the AIFs (the higher peak: less partial
        # volume), never by the slices' order in the call.
        j = tied[np.argmax(np.nan_to_num(aifs[0, tied], nan=-np.inf).max(axis=1))]
        aifs[:, rows] = aifs[:, j][:, None]
        amp[rows] = amp[j]
        for i in rows:
          source[i] = f"study slice {j}: largest clean pool ({n_px[j]} px)"
      else:
        for i in rows:
          if source[i]:
            source[i] = "own: no slice of the study has a clean pool of >= " \
                        f"{min_aif_pixels} px" + (" outside excluded slices" if bad[rows].any()
                                                  else "")
  lead = np.zeros(n)
  for i in range(n):
    a = aif_series[i] if use_series else None
    if a is None or errors[i]:
      continue
    for v in range(n_v):
      aifs[v, i] = from_series[id(a)][v]["aif"]
    amp[i] = from_series[id(a)][0]["amplification"]
    source[i] = "series"
    lead[i] = a.get("lead_s", series_lead(times[i]))
  t_fit = time.perf_counter()
  fit = fit_fermi(np.repeat(aifs.reshape(n_v * n, t), 48, axis=0),
                  curves.reshape(n_v * n * 48, t),
                  np.repeat(np.tile(times, (n_v, 1)), 48, axis=0),
                  aif_lead=np.repeat(np.tile(lead, n_v), 48),
                  spill=np.repeat(np.tile(blood, (n_v, 1)), 48, axis=0) if spill_over else None,
                  **{"se_groups": np.repeat(np.arange(n_v * n), 48),
                     **({} if sequences is not None else {"max_mbf": np.inf}), **fit_kwargs})
  mbf_all = fit["mbf"].reshape(n_v, n, 48)
  mbf48 = mbf_all[0]
  nan = np.full(n, np.nan)
  return dict(mbf48=mbf48, ok48=fit["ok"].reshape(n_v, n, 48)[0],
              reason48=fit["reason"].reshape(n_v, n, 48)[0],
              mbf_se48=fit["mbf_se"].reshape(n_v, n, 48)[0], slice_mbf=slice_mbf(mbf48),
              slice_mbf_flip_lo=slice_mbf(mbf_all[1]) if n_v > 1 else nan,
              slice_mbf_flip_hi=slice_mbf(mbf_all[2]) if n_v > 1 else nan,
              spill48=fit["spill"].reshape(n_v, n, 48)[0],
              aif=aifs[0], curves=curves[0], counts=counts, n_aif_pixels=n_px,
              aif_source=np.array(source), aif_amplification=amp,
              units="signal" if sequences is None else "mM",
              frame_gain=gains, frame_gain_reason=np.array(gain_reason),
              frame_gain_uptake_removed=uptake_removed, error=np.array(errors),
              timing=dict(extract_s=t_fit - t_start, fit_s=time.perf_counter() - t_fit,
                          n_fits=int(fit["mbf"].size * (2 if spill_over else 1))))


def slice_mbf(mbf48, min_valid: int = 1) -> np.ndarray:
  """Slice MBF: the mean of the valid (finite) sector values, [..., 48] -> [...].

  NaN where fewer than ``min_valid`` sectors have a value.
  """
  m = np.asarray(mbf48, np.float64)
  if m.ndim == 0 or m.shape[-1] == 0:
    raise InputError("mbf48", f"expected [..., K] sector values, got shape {m.shape}")
  valid = np.isfinite(m)
  n_valid = valid.sum(axis=-1)
  total = np.where(valid, m, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_valid >= max(min_valid, 1), total / n_valid, np.nan)


def aha6_from_48(values48, counts48=None) -> np.ndarray:
  """[..., 48] sector values -> [..., 6] AHA sectors (mean of each sector's 4 x 2 parts).

  48-sector index is ``(angular - 1) * 2 + radial`` with angular 1..24, so AHA sector k holds
  angular sub-sectors 4(k-1)+1..4k. Weighted by pixel ``counts48`` when given; NaN parts are
  skipped; NaN when none is left.
  """
  v = np.asarray(values48, np.float64)
  if v.shape[-1] != 48:
    raise InputError("values48", f"expected [..., 48], got shape {v.shape}")
  w = np.ones_like(v) if counts48 is None else np.broadcast_to(np.asarray(counts48, np.float64),
                                                               v.shape)
  ok = np.isfinite(v) & (w > 0)
  v6 = np.where(ok, v * w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  w6 = np.where(ok, w, 0.0).reshape(v.shape[:-1] + (6, 8)).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(w6 > 0, v6 / w6, np.nan)


def aha16_mbf(mbf48_by_level: dict, counts48_by_level: dict | None = None) -> np.ndarray:
  """Study MBF per AHA segment [16] (index 0 = segment 1) from {level: [48] sector MBF}.

  Levels are 0/1/2 or "basal"/"mid"/"apical"; apical segments follow
  perfjax.sectors.aha16 (13 <- 1, 14 <- 2+3, 15 <- 4, 16 <- 5+6, weighted by pixel counts).
  """
  six, w6 = {}, {}
  for level, v48 in mbf48_by_level.items():
    c48 = None if counts48_by_level is None else counts48_by_level.get(level)
    six[level] = aha6_from_48(v48, c48)
    w6[level] = np.ones(6) if c48 is None else np.asarray(c48, np.float64).reshape(6, 8).sum(1)
  return sectors_lib.bullseye16(six, w6)


# ------------------------------------------------------------------ slices and masks -> MBF


def mbf_input_kind(config, split: dict) -> str:
  """eval.mbf_input: "concentration" (the paper's remedy for blood-signal saturation; needs the
  sequence timing, which the phantom records) or "signal" (raw signal, as the paper did).
  "auto" picks concentration when every slice carries its sequence parameters."""
  kind = config.eval.mbf_input
  if kind not in ("auto", "concentration", "signal"):
    raise InputError("eval.mbf_input", f"expected auto/concentration/signal, got {kind!r}")
  if kind != "auto":
    return kind
  known = all(k in split and np.isfinite(np.asarray(split[k], np.float64)).all()
              for k in ("seq_ts", "seq_tr", "seq_flip_deg", "seq_n_pulses", "t1_blood_s"))
  return "concentration" if known else "signal"


def aif_series_from_record(record: dict, i: int) -> dict | None:
  """Slice ``i``'s AIF series (perfjax.data.phantom fields aif_image, aif_pd, aif_seq_*,
  aif_dose_ratio, has_aif_series) as :func:`mbf_from_slices` takes it; None without one.

  A dual-sequence series (aif_dose_ratio 1) is SR-FLASH; a dual-bolus pre-bolus is imaged
  with the slice's own protocol. Blood T1/T2 are the slice's (nominal) ones.
  """
  if "aif_image" not in record or not bool(np.asarray(record.get("has_aif_series",
                                                                  [True] * (i + 1)))[i]):
    return None
  img = np.asarray(record["aif_image"][i], np.float64)
  if not np.all(np.isfinite(img)):
    return None
  seq = sequence_from_record(record, i)
  ratio = float(record["aif_dose_ratio"][i])
  seq.update(protocol="flash" if ratio == 1.0 else seq["protocol"],
             ts=float(record["aif_seq_ts"][i]), tr=float(record["aif_seq_tr"][i]),
             flip_deg=float(record["aif_seq_flip_deg"][i]),
             n_pulses=float(record["aif_seq_n_pulses"][i]), sat_residual=0.0)
  pd = record.get("aif_pd")
  return dict(image=img, pd=None if pd is None else np.asarray(pd[i], np.float64),
              sequence=seq, dose_ratio=ratio)


def mbf_of_masks(split: dict, mask_sets: list[np.ndarray], kind: str = "signal",
                 use_aif_series: bool = True, frame_gain: bool = True, spill_over: bool = True,
                 vectorised: bool | None = None) -> list[dict[str, np.ndarray]]:
  """Slice MBF of the split's slices for each set of masks, all in ONE batched Fermi solve.

  Each mask is divided into 48 sectors by its own RV insertion points (for predicted masks,
  the fully automatic pipeline). AIF (see :func:`mbf_from_slices`): the study's AIF series
  when the split has one (concentration only), else the study slice with the largest clean
  pool of pure blood, never a slice flagged for motion. ``vectorised``: see
  :func:`mbf_from_slices`. Returns per mask set dict(slice [N],
  sector48 [N, 48], error [N], aif_source [N], aif_amplification [N], flip_lo [N], flip_hi [N],
  reason48 [N, 48],
  frame_gain [N, T], frame_gain_reason [N], frame_gain_uptake_removed [N], spill48 [N, 48],
  units, timing: the whole call's,
  see :func:`mbf_from_slices`).
  """
  n, m = len(split["raw"]), len(mask_sets)
  sequences = series = None
  if kind == "concentration":
    sequences = [sequence_from_record(split, i) for i in range(n)] * m
    if use_aif_series and "aif_image" in split:
      by_study = {}
      series = []
      for i in range(n):
        sid = int(np.asarray(split.get("study_id", np.arange(n)))[i])
        if sid not in by_study:
          by_study[sid] = aif_series_from_record(split, i)
        series.append(by_study[sid])
      series = series * m
  study = np.asarray(split.get("study_id", np.arange(n)), np.int64)
  offset = study.max() + 1  # Mask sets never share an AIF.
  exclude = np.asarray(split["motion"], bool) if "motion" in split else None
  stacked = lambda parts: parts[0] if m == 1 else np.concatenate(parts)  # noqa: E731  (no copy)
  res = mbf_from_slices(stacked([split["raw"]] * m), stacked(mask_sets),
                        stacked([split["times"]] * m), sequences=sequences,
                        study_ids=np.concatenate([study + j * offset for j in range(m)]),
                        exclude=None if exclude is None else np.concatenate([exclude] * m),
                        aif_series=series, frame_gain=frame_gain, spill_over=spill_over,
                        vectorised=vectorised)
  sl = lambda key, j: res[key][j * n:(j + 1) * n]  # noqa: E731
  return [dict(slice=sl("slice_mbf", j), sector48=sl("mbf48", j), error=sl("error", j),
               aif_source=sl("aif_source", j), aif_amplification=sl("aif_amplification", j),
               flip_lo=sl("slice_mbf_flip_lo", j),
               flip_hi=sl("slice_mbf_flip_hi", j), reason48=sl("reason48", j),
               frame_gain=sl("frame_gain", j), frame_gain_reason=sl("frame_gain_reason", j),
               frame_gain_uptake_removed=sl("frame_gain_uptake_removed", j),
               spill48=sl("spill48", j), units=res["units"], timing=res["timing"])
          for j in range(m)]
