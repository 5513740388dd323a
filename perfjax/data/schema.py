"""The slice record, written once: every field of a phantom slice and of a `perfusion_cmr` record.

`FIELDS` gives each field's name, per-slice shape, dtype, fill value and meaning.
`phantom.simulate` returns the `PHANTOM` fields stacked over slices (`[N, *shape]`); the TFDS
dataset (`perfjax.data.datasets`) stores the `RECORD` fields, one record per slice, and fills a
field the data does not know (the truths of manual data) with its `fill`. The arrays follow
CONVENTIONS.md (Arrays; its Public API names the fields `simulate` returns at least).

This module imports nothing from perfjax but `perfjax.conventions`: the phantom and the dataset
import it, never the other way.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from perfjax import conventions

H = W = conventions.IMAGE_SIZE
T = conventions.NUM_FRAMES
AIF_SIZE = 32  # pixels a side of the study's separate AIF series (phantom._aif_series)
N_AIF_PARAMS = 10  # len(physics.AIF_PARAM_NAMES): the AIF's continuous form

BOTH, PHANTOM_ONLY, RECORD_ONLY = "both", "phantom", "record"


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of the slice record.

  shape: per slice (`simulate` prepends N); `()` for scalars and text.
  dtype: numpy scalar type (also the cast a record applies), or `str` for text.
  fill: a record's value where the data does not know the field (manual data); None where
    every record has it (and for phantom-only fields, which no record holds).
  where: BOTH, PHANTOM_ONLY (`simulate` only) or RECORD_ONLY (the dataset only).
  """
  name: str
  shape: tuple[int, ...]
  dtype: Any
  fill: Any
  meaning: str
  where: str = BOTH

  @property
  def kind(self) -> str:
    """How the dataset stores it: "text", "scalar" or "array"."""
    return "text" if self.dtype is str else "scalar" if self.shape == () else "array"


_F32, _I32, _BOOL, NAN = np.float32, np.int32, np.bool_, np.nan

# Order: the dataset's arrays, then scalars, then texts keep their TFDS order within each kind.
FIELDS = tuple(Field(*row) for row in (
    # Images and labels of the 128 x 128 crop.
    ("image", (H, W, T), _F32, None, "magnitude images min-max normalised per slice to [0, 1]"),
    ("raw", (H, W, T), _F32, None, "magnitude signal (a.u.); phantom: gain x coil x M0 x "
     "signal + Rician noise"),
    ("mask", (H, W), _I32, -1, "0 background, 1 myocardium, 2 LV blood pool (papillary "
     "muscles, trabeculae), 3 RV blood pool; -1 everywhere when the slice has none"),
    ("times", (T,), _F32, None, "s since the first frame, one frame per heartbeat"),
    # The phantom's truths.
    ("mbf", (H, W), _F32, NAN, "true MBF (ml/g/min) on mask == 1, else 0"),
    ("aif", (T,), _F32, NAN, "true LV blood Gd concentration (mM) at the frame times"),
    ("aif_params", (N_AIF_PARAMS,), _F32, NAN, "the AIF's continuous form "
     "(physics.AIF_PARAM_NAMES of physics.aif_concentration)"),
    ("mbf_sector6", (6,), _F32, NAN, "mean true MBF per AHA sector of sectors.sector_map on "
     "the mask (NaN: empty sector)"),
    ("mbf_sector48", (48,), _F32, NAN, "mean true MBF per 48-sector (24 angular x 2 radial; "
     "NaN: empty sector)"),
    ("rvip", (2, 2), _F32, NAN, "(row, col) of the anterior, then the inferior RV insertion "
     "point"),
    ("fermi", (3,), _F32, NAN, "(w, k, tau_d) in s of the Fermi impulse response; tissue = "
     "aif (x) h, F from the MBF"),
    ("motion_shift_px", (T, 2), _F32, None, "(row, col) shift of the heart per frame "
     "(residual motion; 0 without)", PHANTOM_ONLY),
    ("frame_gain_true", (T,), _F32, None, "the factor every pixel of each frame was "
     "multiplied by (the wide phantom's frame-to-frame gain jitter; ones on the narrow one)",
     PHANTOM_ONLY),
    # The study's separate AIF series (repeated on its slices; dual-sequence by default).
    ("aif_image", (AIF_SIZE, AIF_SIZE, T), _F32, NAN, "AIF series: magnitude images"),
    ("aif_pd", (AIF_SIZE, AIF_SIZE), _F32, NAN, "AIF series: proton-density frame (M0)"),
    ("aif_mask", (AIF_SIZE, AIF_SIZE), _I32, -1, "AIF series truth: 2 blood, 1 myocardium "
     "at pixel centres, 0 else"),
    # Slice and study.
    ("motion", (), _BOOL, False, "residual respiratory motion (a motion-correction failure); "
     "False where unknown"),
    ("peak_lv_frame", (), _I32, None, "frame of peak LV enhancement, the mask's reference "
     "(phantom: argmax of the noise-free LV mean; manual: detected)"),
    ("slice_level", (), _I32, -1, "0 basal, 1 mid, 2 apical; -1 unknown"),
    ("study_id", (), _I32, None, "study number, unique across the splits of a config"),
    ("stress", (), _BOOL, False, "stress study (False: rest, or unknown)"),
    ("defect", (), _BOOL, False, "the study has a perfusion defect (ischaemia or infarct)"),
    ("has_truth", (), _BOOL, False, "the truths above are known (phantom records)",
     RECORD_ONLY),
    ("has_mask", (), _BOOL, None, "the slice has a mask", RECORD_ONLY),
    ("pixel_mm", (), _F32, None, "pixel size (mm) of the crop (NaN: unknown)"),
    ("rotation_deg", (), _F32, None, "in-plane rotation of the heart (degrees)", PHANTOM_ONLY),
    ("b1", (), _F32, None, "B1 scale: true flip angle / recorded flip angle", PHANTOM_ONLY),
    ("t1_blood_true_s", (), _F32, None, "true pre-contrast blood T1 (s); t1_blood_s is the "
     "recorded one", PHANTOM_ONLY),
    # Sequence for signal -> concentration (physics.concentration_from_signal), as recorded.
    ("seq_ts", (), _F32, NAN, "saturation to the first readout pulse (s)"),
    ("seq_tr", (), _F32, NAN, "readout repetition time (s)"),
    ("seq_flip_deg", (), _F32, NAN, "readout flip angle (degrees)"),
    ("seq_n_pulses", (), _I32, -1, "index of the k-space-centre readout pulse"),
    ("t1_blood_s", (), _F32, NAN, "pre-contrast blood T1 (s)"),
    ("t2_blood_s", (), _F32, NAN, "blood T2 (s)"),
    ("t1_myo_s", (), _F32, NAN, "pre-contrast myocardial T1 (s)"),
    ("t2_myo_s", (), _F32, NAN, "myocardial T2 (s)"),
    ("seq_sat_residual", (), _F32, 0.0, "Mz left by the saturation pulse, x M0 (0 in the "
     "narrow phantom)"),
    # The AIF series' sequence (perfusion.aif_series_from_record), nominal.
    ("has_aif_series", (), _BOOL, False, "the study has a separate AIF series"),
    ("aif_seq_ts", (), _F32, NAN, "AIF series: saturation to the first readout pulse (s)"),
    ("aif_seq_tr", (), _F32, NAN, "AIF series: readout repetition time (s)"),
    ("aif_seq_flip_deg", (), _F32, NAN, "AIF series: readout flip angle (degrees)"),
    ("aif_seq_n_pulses", (), _I32, -1, "AIF series: index of the k-space-centre pulse"),
    ("aif_dose_ratio", (), _F32, NAN, "main dose / AIF-series dose (1: dual sequence, FLASH; "
     "else dual bolus, the slice's protocol)"),
    # Text.
    ("study_name", (), str, None, "study name (phantom: <split protocol>-<study_id:04d>; manual: "
     "its folder)",
     RECORD_ONLY),
    ("slice_id", (), str, None, "unique slice name, <study_name>/<slice>", RECORD_ONLY),
    ("protocol", (), str, None, '"flash" or "bssfp" (phantom), "unknown" (manual data)'),
))

BY_NAME = {f.name: f for f in FIELDS}
PHANTOM = tuple(f for f in FIELDS if f.where != RECORD_ONLY)  # what phantom.simulate returns
RECORD = tuple(f for f in FIELDS if f.where != PHANTOM_ONLY)  # what a dataset record holds
