"""Physics-based synthetic first-pass perfusion CMR phantom (short axis, 3T, FLASH or bSSFP).

:func:`simulate` draws hearts (studies of basal, mid and apical slices), their contrast
kinetics (gamma-variate AIF with recirculation, Fermi impulse response per CONVENTIONS.md,
per-pixel true MBF with coronary-territory defects), and turns them into the magnitude
images a 3T scanner would give, with the true values beside them. Anatomy: see
:mod:`perfjax.data._anatomy`; physics: see :mod:`perfjax.physics`.

Image formation per slice: tissue classes are labelled at the 128 x 128 output pixel
centres (that is the mask, of the reference peak-LV frame); where tissues meet, 3 x 3
sub-points per pixel (a 384 x 384 grid there) give partial-volume fractions. Each class
contributes its signal curve and the myocardium the signal of its pixel's mean MBF; a 3 x 3
binomial blur stands for the interpolation of a coarser acquisition. Then: tissue texture,
bSSFP off-resonance banding, dark-rim artefact, residual respiratory motion (a
motion-correction failure), surface-coil sensitivity, receiver gain, complex Gaussian noise
and the magnitude (Rician).
"""
from __future__ import annotations

import concurrent.futures

import numpy as np
from scipy import ndimage

from perfjax import physics, sectors
from perfjax.data import _anatomy as anat
from perfjax.data import _imaging as img
from perfjax.data import schema
from perfjax.errors import InputError

SIZE, FRAMES = img.SIZE, img.FRAMES
DT_FINE = 0.05  # s, kinetics grid

# (anatomy class, tissue of physics.TISSUES_3T) in class order; the kinetics are in _class_curves.
_CLASS_TISSUE = (
    ("air", None), ("lung", "lung"), ("pulmonary_artery", "blood_venous"),
    ("pulmonary_vein", "blood_arterial"), ("chest_muscle", "skeletal_muscle"),
    ("subcutaneous_fat", "fat"), ("liver", "liver"), ("aorta", "blood_arterial"),
    ("soft_tissue", "skeletal_muscle"), ("fluid", "fluid"), ("fatty_marrow", "fat"),
    ("pericardium", "pericardium"), ("epicardial_fat", "fat"), ("rv_wall", "myocardium"),
    ("rv_blood", "blood_venous"), ("lv_blood", "blood_arterial"),
    ("papillary_trabeculae", "myocardium"), ("myocardium", "myocardium"))
assert tuple(c for c, _ in _CLASS_TISSUE) == anat.CLASS_NAMES


def _check(seed, n_slices, protocol, motion_fraction, options):
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
  if not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
    raise InputError("n_slices", f"must be a positive integer, got {n_slices!r}")
  if protocol not in physics.PROTOCOLS:
    raise InputError("protocol", f"must be one of {physics.PROTOCOLS}, got {protocol!r}")
  for name, value in (("motion_fraction", motion_fraction),
                      ("defect_fraction", options["defect_fraction"]),
                      ("dark_rim", options["dark_rim"]), ("banding", options["banding"])):
    if not 0.0 <= float(value) <= 1.0:
      raise InputError(name, f"must be a probability in [0, 1], got {value!r}")
  if options["noise"] < 0 or not np.isfinite(options["noise"]):
    raise InputError("noise", f"must be a finite scale >= 0, got {options['noise']!r}")
  if not 0.0 <= options["rotation_deg"] <= 180.0:
    raise InputError("rotation_deg", f"must be in [0, 180], got {options['rotation_deg']!r}")
  if not 0.0 <= options["translation_mm"] <= 20.0:  # keeps the heart inside the 128 x 128 crop
    raise InputError("translation_mm", f"must be in [0, 20], got {options['translation_mm']!r}")
  if int(options["slices_per_study"]) < 1:
    raise InputError("slices_per_study", f"must be >= 1, got {options['slices_per_study']!r}")


def _level(j: int, per_study: int) -> int:
  """Slice level (0 basal, 1 mid, 2 apical) of the j-th slice of a study."""
  return 1 if per_study == 1 else int(round(2.0 * j / (per_study - 1)))


def _study(seed: int, index: int, protocol: str, stress: bool, defect_fraction: float,
           wide: bool = False) -> dict:
  """Study-level draws: timing, bolus, sequence, gain, coil, anatomy and perfusion.

  ``wide`` widens them from a separate stream (the narrow draws stay the same): heart rate,
  the first pass anywhere in the first 12 frames with a pulmonary transit of 0.8-1.8x, bolus width and dose, heart size in the
  crop (through the pixel size), wall thickness, SNR and coil geometry.
  """
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
  rr = rng.uniform(0.58, 0.85) if stress else rng.uniform(0.75, 1.05)
  rr_k = np.clip(rr * (1.0 + 0.035 * rng.standard_normal(FRAMES - 1)), 0.55, 1.1)
  times = np.concatenate([[0.0], np.cumsum(rr_k)])
  t_rv = rr * rng.uniform(3.0, 6.0)  # RV arrival after the first frame
  ptt = rng.uniform(2.5, 4.0) if stress else rng.uniform(3.0, 5.0)  # pulmonary transit
  peak = rng.uniform(4.0, 9.0)
  tmax = rng.uniform(2.0, 4.0)
  rc_delay, rc_tmax = rng.uniform(7.0, 11.0), rng.uniform(3.0, 5.0)
  rc_peak, plateau = peak * rng.uniform(0.08, 0.16), peak * rng.uniform(0.05, 0.1)
  width = rng.uniform(1.5, 3.0)
  lv = np.array([t_rv + ptt, rng.uniform(2.0, 4.0), tmax, peak, rc_delay, 3.0, rc_tmax,
                 rc_peak, plateau, width])
  rv = np.array([t_rv, rng.uniform(1.5, 3.0), tmax * rng.uniform(0.55, 0.8),
                 peak * rng.uniform(1.2, 1.6), rc_delay + ptt, 3.0, rc_tmax, rc_peak, plateau,
                 width])
  if protocol == "flash":
    seq = dict(ts=rng.uniform(0.05, 0.09), tr=rng.uniform(2.3e-3, 2.8e-3),
               flip=rng.uniform(10.0, 15.0), n=float(rng.integers(18, 31)))
  else:
    seq = dict(ts=rng.uniform(0.06, 0.10), tr=rng.uniform(2.6e-3, 3.0e-3),
               flip=rng.uniform(50.0, 70.0), n=float(rng.integers(35, 56)))
  study = dict(times=times, aif_lv=lv, aif_rv=rv, slice_delay=rng.uniform(0.12, 0.2),
               seq=seq, t1_blood=rng.uniform(1.7, 2.0), gain=rng.uniform(200.0, 2000.0),
               snr=rng.uniform(0.7, 1.5),
               pixel_mm=rng.uniform(1.2, 1.6),
               coil=(rng.uniform(100, 170), rng.uniform(90, 140), rng.uniform(70, 110),
                     rng.uniform(0.3, 0.7)),
               anatomy=anat.sample_study(rng, stress, defect_fraction), wide=None,
               sat_residual=0.0)
  if wide:
    _widen_study(study, np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(index, WIDE_STREAM))), stress)
  return study


VARIABILITIES = ("wide", "narrow")
WIDE_STREAM = 101  # spawn-key element of the wide phantom's extra draws
SATURATION_DELAY_MAX_S = 0.2  # wide: saturation delay log-uniform in [0.05, this] s
SATURATION_RESIDUAL_MAX = 0.35  # wide: Mz left by the saturation pulse, uniform [0, this]
EPI_DIAMETER_PX = (30.0, 80.0)  # wide: mid-slice epicardial diameter drawn in the 128 crop


def _widen_study(study: dict, rng, stress: bool) -> None:
  """The wide phantom's study draws (see :func:`_study`), in place."""
  rr = rng.uniform(0.5, 0.9) if stress else rng.uniform(0.7, 1.3)
  rr_k = np.clip(rr * (1.0 + 0.04 * rng.standard_normal(FRAMES - 1)), 0.4, 1.5)
  study["times"] = np.concatenate([[0.0], np.cumsum(rr_k)])
  t_rv = rr * rng.uniform(0.3, 12.0)  # RV arrival: frame 0 to 12
  transit = (study["aif_lv"][0] - study["aif_rv"][0]) * rng.uniform(0.8, 1.8)  # pulmonary
  dose, spread = rng.uniform(0.4, 1.6), rng.uniform(0.7, 1.6)
  for key, t0 in (("aif_rv", t_rv), ("aif_lv", t_rv + transit)):
    p = study[key].copy()
    p[0] = t0
    p[2] *= spread  # bolus width (time to peak)
    p[3] *= dose
    p[7:9] *= dose
    study[key] = p
  anatomy = study["anatomy"]
  anatomy["wall_scale"] = rng.uniform(0.65, 1.5)
  epi_mm = 2.0 * (anatomy["radius"] + anatomy["thick"] * anatomy["wall_scale"])
  study["pixel_mm"] = epi_mm / rng.uniform(*EPI_DIAMETER_PX)
  study["snr"] = float(np.exp(rng.uniform(np.log(0.35), np.log(3.0))))
  study["coil"] = (rng.uniform(0, 360), rng.uniform(70, 200), rng.uniform(45, 140),
                   rng.uniform(0.1, 0.9))
  # Saturation recovery: delays of multi-slice schemes (later slices wait longer) and
  # imperfect saturation (B1 inhomogeneity at 3 T) raise the pre-contrast level relative to
  # the blood peak (real stress series: baseline 0.15-0.45 of the LV peak).
  study["seq"]["ts"] = float(np.exp(rng.uniform(np.log(0.05), np.log(SATURATION_DELAY_MAX_S))))
  study["sat_residual"] = rng.uniform(0.0, SATURATION_RESIDUAL_MAX)
  study["wide"] = dict(seed=int(rng.integers(2 ** 62)))


def _lowpass(y_fine, tau, delay=0.0):
  """Unit-area exponential dispersion (time constant tau, s) after ``delay`` on the fine grid."""
  n = y_fine.shape[-1]
  t = np.arange(n) * DT_FINE
  kern = np.where(t >= delay, np.exp(-(t - delay) / tau), 0.0)
  kern /= kern.sum()
  return np.convolve(y_fine, kern)[:n]


def _class_curves(study, level, fermi, mbf_normal):
  """Concentration (mM) of every tissue class at the frame times, plus AIF and unit response."""
  times = study["times"]
  shift = np.zeros(len(physics.AIF_PARAM_NAMES))
  shift[0] = level * study["slice_delay"]  # later slices start later in the beat
  lv_p, rv_p = study["aif_lv"] - shift, study["aif_rv"] - shift
  tf = physics.fine_grid(times[-1], DT_FINE)
  lv_f = physics.aif_concentration(tf, lv_p)
  rv_f = physics.aif_concentration(tf, rv_p)
  w, k, tau_d = fermi
  h_f = physics.fermi_impulse(tf, physics.fermi_amplitude(1.0, w, k), w, k, tau_d, dt=DT_FINE)
  unit_f = physics.convolve_fine(lv_f, h_f, DT_FINE)  # tissue at MBF = 1 /s
  slow = _lowpass(lv_f, 8.0, 1.0)

  def at(y):
    return np.interp(times, tf, y)

  unit = at(unit_f)
  mbf_s = physics.ml_g_min_to_per_s(mbf_normal)
  conc = np.zeros((anat.N_CLASSES, FRAMES))
  conc[anat.LUNG] = 0.3 * at(0.5 * (lv_f + rv_f))
  conc[anat.PULM_ART] = physics.aif_concentration(times - 0.3, rv_p)
  conc[anat.PULM_VEIN] = physics.aif_concentration(times + 0.5, lv_p)
  conc[anat.MUSCLE] = 0.12 * at(slow)
  conc[anat.SUBFAT] = conc[anat.EPIFAT] = 0.04 * at(slow)
  conc[anat.LIVER] = 0.25 * at(_lowpass(lv_f, 6.0, 2.0))
  conc[anat.AORTA] = physics.aif_concentration(times - 0.15, lv_p)
  conc[anat.PERI] = 0.1 * at(slow)
  conc[anat.RVWALL] = 0.7 * mbf_s * unit
  conc[anat.RVBLOOD] = physics.aif_concentration(times, rv_p)
  conc[anat.LVBLOOD] = physics.aif_concentration(times, lv_p)
  conc[anat.PAP] = conc[anat.MYO] = mbf_s * unit
  return conc, unit, lv_p


def _signal_params(study, protocol):
  """The TRUE sequence of the images: the nominal flip angle times the study's B1 scale."""
  s = study["seq"]
  return dict(protocol=protocol, ts=s["ts"], tr=s["tr"], flip_deg=s["flip"] * study["b1"],
              n_pulses=s["n"], sat_residual=study["sat_residual"])


_EXTRA_TISSUES = {"fluid": (3.0, 0.8, 1.0)}  # stomach or bowel content, effusion: T1, T2, PD


def _tissue(name, study):
  t1, t2, pd = _EXTRA_TISSUES[name] if name in _EXTRA_TISSUES else physics.TISSUES_3T[name]
  if name.startswith("blood"):
    t1 = study["t1_blood"]
  return t1, t2, pd


_TEXTURED = (anat.LUNG, anat.MUSCLE, anat.SUBFAT, anat.LIVER, anat.PERI, anat.EPIFAT, anat.BODY,
             anat.FLUID, anat.MARROW)
_HEART_CLASSES = (anat.RVWALL, anat.RVBLOOD, anat.LVBLOOD, anat.PAP, anat.MYO)
_SURROUNDING = tuple(c for c in range(1, anat.N_CLASSES)
                     if c not in _HEART_CLASSES + (anat.AORTA, anat.PULM_ART, anat.PULM_VEIN))


def _wide_slice_draws(rng) -> dict:
  """The wide phantom's per-slice contrast and acquisition draws (SynthSeg-style contrast
  randomisation within physical bounds)."""
  enhance = np.ones(anat.N_CLASSES)
  enhance[list(_SURROUNDING)] = rng.uniform(0.1, 2.0, len(_SURROUNDING))
  m0 = np.exp(rng.uniform(np.log(0.5), np.log(6.0), anat.N_CLASSES))  # surroundings
  blood_like = _HEART_CLASSES + (anat.AORTA, anat.PULM_ART, anat.PULM_VEIN)
  m0[list(blood_like)] = rng.uniform(0.8, 1.25, len(blood_like))
  m0[anat.PAP] = m0[anat.MYO]
  return dict(enhance=enhance, m0=m0, brightest=rng.uniform(0.45, 0.9),
              texture=rng.uniform(0.04, 0.35),
              texture_sigma=rng.uniform(1.0, 4.0),
              kspace=rng.uniform(0.4, 1.0, 2),  # acquired fraction of k-space (rows, cols)
              frame_jitter=rng.uniform(0.0, 0.04) * rng.standard_normal(FRAMES),
              cutoff=(rng.uniform() < 0.3, rng.uniform(0, 2 * np.pi), rng.uniform(35.0, 62.0)),
              rng=np.random.default_rng(rng.integers(2 ** 63)))


def _myo_signal_table(unit, sp, study, mbf_max):
  """Myocardial signal [M, T] on an MBF grid [M] (ml/g/min), for linear interpolation."""
  grid = np.linspace(0.0, mbf_max, 129)
  t1, t2, pd = _tissue("myocardium", study)
  conc = physics.ml_g_min_to_per_s(grid)[:, None] * unit[None, :]
  return grid, physics.signal_from_concentration(conc, t1_0=t1, t2_0=t2, m0=pd, **sp)


def _slice(seed, study, study_index, level, protocol, motion_p, opts, out, n):
  """Simulate one slice into row ``n`` of the preallocated ``out`` arrays."""
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(study_index, level, 7)))
  wide_rng = None if study["wide"] is None else np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(study_index, level, 7, WIDE_STREAM)))
  heart = anat.sample_heart(rng, study["anatomy"], level, wide_rng)
  wide = None if wide_rng is None else _wide_slice_draws(wide_rng)
  stress = study["anatomy"]["stress"]
  w = rng.uniform(2.5, 5.0) if stress else rng.uniform(6.0, 12.0)
  fermi = (w, rng.uniform(0.3, 1.5), rng.uniform(0.0, 1.0))
  theta = rng.uniform(-1.0, 1.0) * opts["rotation_deg"]
  shift = rng.uniform(-1.0, 1.0, 2) * opts["translation_mm"]
  is_motion = rng.uniform() < motion_p
  rim_on = rng.uniform() < opts["dark_rim"]
  rim_depth, rim_angle = rng.uniform(0.15, 0.4), rng.uniform(0, 360)
  band_on = rng.uniform() < opts["banding"] and protocol == "bssfp"  # same draws for both
  band_strength = rng.uniform(0.5, 0.9)
  motion_rng = np.random.default_rng(rng.integers(2 ** 63))
  band_rng = np.random.default_rng(rng.integers(2 ** 63))
  noise_rng = np.random.default_rng(rng.integers(2 ** 63))
  tex_rng = np.random.default_rng(rng.integers(2 ** 63))
  px = study["pixel_mm"]

  conc, unit, lv_p = _class_curves(study, level, fermi, heart.mbf_normal)
  sp = _signal_params(study, protocol)
  curves = np.zeros((anat.N_CLASSES, FRAMES))
  for c, (_, tissue) in enumerate(_CLASS_TISSUE):
    if tissue is not None:
      t1, t2, pd = _tissue(tissue, study)
      if wide is not None:
        pd *= wide["m0"][c]
        conc_c = conc[c] * wide["enhance"][c]
      else:
        conc_c = conc[c]
      curves[c] = physics.signal_from_concentration(conc_c, t1_0=t1, t2_0=t2, m0=pd, **sp)
  if wide is not None:  # bounds of the contrast randomisation: no surrounding tissue enhances
    # more than half as much as the LV blood, nor is brighter than its peak
    lv_rise, lv_peak = np.ptp(curves[anat.LVBLOOD]), curves[anat.LVBLOOD].max()
    for c in _SURROUNDING:
      rise = curves[c] - curves[c][0]
      peak = np.abs(rise).max()
      if peak > 0.5 * lv_rise:
        curves[c] = curves[c][0] + rise * (0.5 * lv_rise / peak)
      if curves[c].max() > wide["brightest"] * lv_peak:
        curves[c] *= wide["brightest"] * lv_peak / curves[c].max()

  # Labels at the output pixel centres give the mask; where the 3 x 3 neighbourhood holds
  # more than one tissue, OS x OS sub-points per pixel give the partial-volume fractions.
  xc, yc, rot = img.centres(theta, shift, px)
  cls_c, mbf_c, rim_c = anat.evaluate(heart, xc, yc)
  mask = anat.MASK_OF_CLASS[cls_c]
  cls_flat, mbf_flat = cls_c.ravel(), mbf_c.ravel()
  mixed = np.nonzero((ndimage.maximum_filter(cls_c, 3) != ndimage.minimum_filter(cls_c, 3))
                     .ravel())[0]
  ox, oy = img.subpoints(rot, px)
  cls_s, mbf_s, _ = anat.evaluate(heart, xc.ravel()[mixed, None] + ox,
                                   yc.ravel()[mixed, None] + oy)
  local = np.repeat(np.arange(mixed.size), img.OS * img.OS)
  frac = np.bincount(local * anat.N_CLASSES + cls_s.ravel(),
                     minlength=mixed.size * anat.N_CLASSES).reshape(mixed.size, anat.N_CLASSES)
  frac = frac / float(img.OS * img.OS)
  n_myo = frac[:, anat.MYO] * (img.OS * img.OS)
  mbf_mix = np.bincount(local, weights=mbf_s.ravel(), minlength=mixed.size) / np.maximum(n_myo, 1)

  # Class fractions of every pixel (one-hot where pure), blurred by a 3 x 3 binomial kernel:
  # the images are interpolated from a coarser acquisition (paper II-A: spatial upsampling).
  # Blurring is linear, so it acts on the fractions and the MBF-weighted myocardium fraction.
  n_px = SIZE * SIZE
  frac_all = np.zeros((n_px, anat.N_CLASSES + 1), np.float32)
  frac_all[np.arange(n_px), cls_flat] = 1.0
  frac_all[mixed, :anat.N_CLASSES] = frac
  frac_all[:, -1] = frac_all[:, anat.MYO] * mbf_flat
  frac_all[mixed, -1] = frac[:, anat.MYO] * mbf_mix
  if opts["blur"]:
    frac_all = img.binomial3(frac_all.reshape(SIZE, SIZE, -1)).reshape(n_px, -1)
  myo_frac = frac_all[:, anat.MYO]
  mbf_px = frac_all[:, -1] / np.maximum(myo_frac, 1e-12)
  grid, table = _myo_signal_table(unit, sp, study, 1.05 * max(mbf_px.max(), 0.1))
  if wide is not None:
    table = table * wide["m0"][anat.MYO]
  mixed = np.nonzero(frac_all[:, :anat.N_CLASSES].max(axis=1) < 1.0 - 1e-9)[0]

  # Static per-pixel factors: tissue texture (a smooth +-12 % proton-density field in the
  # body, +-3 % in the heart and blood) and bSSFP banding move with the anatomy; the receive
  # coil and gain stay in the image frame (applied after any residual motion).
  tex = ndimage.gaussian_filter(tex_rng.standard_normal((SIZE, SIZE)),
                                2.0 if wide is None else wide["texture_sigma"]).ravel()
  tex *= 1.0 / max(tex.std(), 1e-12)
  amp = 0.03 + (0.09 if wide is None else wide["texture"]) * frac_all[:, list(_TEXTURED)].sum(
      axis=1)
  factor = 1.0 + np.clip(amp * tex, -0.5, 0.5)
  if band_on:
    factor *= img.banding(heart, band_rng, (xc, yc), study["seq"]["tr"],
                          band_strength).ravel()
  coil = img.coil_sensitivity(study["coil"], shift, px) * study["gain"]
  if not is_motion:
    factor *= coil.ravel()

  curves32 = curves.astype(np.float32)
  sig = curves32[cls_flat]  # [P, T], right for pure pixels but the myocardium
  pure_myo = np.nonzero((cls_flat == anat.MYO) & (myo_frac >= 1.0 - 1e-9))[0]
  sig[pure_myo] = img.interp_rows(mbf_px[pure_myo], grid, table)
  fm = frac_all[mixed]
  # einsum, not BLAS: OpenBLAS threads spin after a call and steal the other core.
  sig[mixed] = np.einsum("pk,kt->pt", fm[:, :anat.MYO], curves[:anat.MYO]) + (
      fm[:, anat.MYO, None] * img.interp_rows(mbf_px[mixed], grid, table))
  sig *= factor.astype(np.float32)[:, None]
  lv_curve = curves[anat.LVBLOOD]
  if rim_on:  # dark rim at the endocardial border while the LV blood is bright
    lv_rel = (lv_curve - lv_curve[0]) / max(lv_curve.max() - lv_curve[0], 1e-12)
    arc = np.clip(0.2 + np.cos(np.arctan2(yc, xc) - np.deg2rad(rim_angle)), 0.0, 1.0)
    weight = (rim_c * arc).ravel()
    on = np.nonzero(weight > 0)[0]
    sig[on] *= 1.0 - rim_depth * weight[on, None] * lv_rel[None, :]
  sig = sig.reshape(SIZE, SIZE, FRAMES)

  # Peak LV enhancement: the noise-free mean over the LV label (papillary muscles included)
  # as the receive coil sees it, before any residual motion.
  lv = mask == 2
  lv_sig = sig[lv] * coil[lv][:, None] if is_motion else sig[lv]
  peak = int(np.argmax(lv_sig.mean(axis=0)))
  shifts = np.zeros((FRAMES, 2))
  if is_motion:
    centre_rc = img.to_pixel(np.zeros(2), theta, shift, px)
    sig, shifts = img.motion_warp(sig, study["times"], peak, motion_rng, centre_rc,
                               opts["include_motion_deformation"])
    sig *= coil[..., None]
  frame_gain = np.ones(FRAMES, np.float32)
  if wide is not None:  # a coarser acquisition, zero-filled (blur and Gibbs ringing)
    frame_gain = (1.0 + wide["frame_jitter"]).astype(np.float32)
    sig = img.lowres(sig, wide["kspace"]) * frame_gain
  sigma = opts["noise"] * 0.0016 * study["gain"] / study["snr"]
  img.magnitude(sig, sigma, noise_rng, out["raw"][n], out["image"][n])
  if wide is not None and wide["cutoff"][0]:  # the edge of the field of view, zero-filled
    img.cut_off(out["raw"][n], out["image"][n], *wide["cutoff"][1:])

  out["mask"][n] = mask
  out["mbf"][n] = np.where(mask == 1, mbf_c, 0.0)
  rec = dict(
      times=study["times"], motion=is_motion, peak_lv_frame=peak,
      rvip=img.to_pixel(heart.rvip_xy(), theta, shift, px), aif=conc[anat.LVBLOOD],
      aif_params=lv_p, fermi=fermi, defect=heart.defect is not None, motion_shift_px=shifts,
      rotation_deg=theta, pixel_mm=px, frame_gain_true=frame_gain,
      seq_ts=sp["ts"], seq_tr=sp["tr"], seq_flip_deg=study["seq"]["flip"],
      seq_n_pulses=sp["n_pulses"], seq_sat_residual=sp["sat_residual"],
      t1_blood_s=study["t1_blood_nominal"], b1=study["b1"], t1_blood_true_s=study["t1_blood"],
      t2_blood_s=physics.TISSUES_3T["blood_arterial"][1],
      t1_myo_s=physics.TISSUES_3T["myocardium"][0], t2_myo_s=physics.TISSUES_3T["myocardium"][1])
  for k, v in rec.items():
    out[k][n] = v


AIF_SIZE = schema.AIF_SIZE  # dual-sequence AIF image: 32 x 32 pixels
AIF_STREAM = 202  # spawn-key element of the AIF series' draws (leaves every other draw alone)
AIF_PROTOCOLS = ("dual_sequence", "dual_bolus")
PARAM_STREAM = 303  # spawn-key element of the parameter-uncertainty draws
NOMINAL_T1_BLOOD_S = 1.85  # what a user assumes (the truth is drawn per study, 1.7-2.0 s)


def _aif_series(seed, study, index, protocol, aif_protocol, noise, b1):
  """The study's AIF series: a separate low-resolution image of the LV blood pool per beat.

  ``dual_sequence``: SR-FLASH at 32 x 32 pixels of 3.2-4 mm, acquired 60-120 ms before the
  first slice of each beat with a short saturation delay (ts 8-15 ms, 6-10 pulses to the
  k-space centre), so the blood signal stays far from saturation at the peak (below half of
  its maximum); a proton-density frame (no saturation, same readout) gives M0 per pixel.
  ``dual_bolus``: the main sequence (``protocol``) at the imaging resolution's timing images a
  pre-bolus at 1/10 of the dose (the AIF record scales it back by ``aif_dose_ratio``).
  The LV blood pool is a disk (cavity radius of the study) in a ring of myocardium, outside
  it low-enhancing tissue; 4 x 4 sub-points per pixel give partial volume; Rician noise.
  Returns dict(image [32, 32, T], pd [32, 32], mask [32, 32] (2 on blood-pixel centres, 1 on
  myocardium), seq (true), seq_nominal, dose_ratio).
  """
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, AIF_STREAM)))
  times = study["times"]
  offset = rng.uniform(0.06, 0.12)
  lv_p = study["aif_lv"].copy()
  lv_p[0] += offset  # acquired earlier in the beat than the slices
  anatomy = study["anatomy"]
  px = rng.uniform(3.2, 4.0)
  radius = anatomy["radius"] * rng.uniform(0.9, 1.1)
  thick = anatomy["thick"] * anatomy.get("wall_scale", 1.0)
  cy, cx = (AIF_SIZE - 1) / 2.0 + rng.uniform(-2, 2, 2)
  sub = (np.arange(4) + 0.5) / 4.0 - 0.5
  yy = (np.arange(AIF_SIZE)[:, None, None, None] + sub[None, None, :, None] - cy) * px
  xx = (np.arange(AIF_SIZE)[None, :, None, None] + sub[None, None, None, :] - cx) * px
  r = np.hypot(yy, xx)
  f_blood = (r < radius).mean(axis=(2, 3))
  f_myo = ((r >= radius) & (r < radius + thick)).mean(axis=(2, 3))
  f_out = 1.0 - f_blood - f_myo
  rc = np.hypot((np.arange(AIF_SIZE)[:, None] - cy) * px, (np.arange(AIF_SIZE)[None] - cx) * px)
  mask = np.where(rc < radius, 2, np.where(rc < radius + thick, 1, 0)).astype(np.int32)
  dose_ratio = 1.0
  if aif_protocol == "dual_sequence":
    seq = dict(protocol="flash", ts=rng.uniform(0.008, 0.015), tr=rng.uniform(2.0e-3, 2.5e-3),
               flip=rng.uniform(8.0, 12.0), n=float(rng.integers(6, 11)))
  else:
    seq = dict(study["seq"], protocol=protocol)
    dose_ratio = 10.0
  conc_b = physics.aif_concentration(times, lv_p) / dose_ratio
  tf = physics.fine_grid(times[-1], DT_FINE)
  unit_f = physics.convolve_fine(physics.aif_concentration(tf, lv_p), physics.fermi_impulse(
      tf, physics.fermi_amplitude(1.0, 1.5, 0.5), 1.5, 0.5, 0.3, dt=DT_FINE), DT_FINE)
  conc_m = physics.ml_g_min_to_per_s(anatomy["mbf"]) * np.interp(times, tf, unit_f) / dose_ratio
  true = dict(protocol=seq["protocol"], ts=seq["ts"], tr=seq["tr"], flip_deg=seq["flip"] * b1,
              n_pulses=seq["n"])

  def sig(conc, tissue, ts=None):
    t1, t2, pd = _tissue(tissue, study)
    kw = dict(true, ts=true["ts"] if ts is None else ts)
    return physics.signal_from_concentration(conc, t1_0=t1, t2_0=t2, m0=pd, **kw)

  s_b, s_m = sig(conc_b, "blood_arterial"), sig(conc_m, "myocardium")
  s_o = sig(0.1 * conc_m, "skeletal_muscle")
  gain = study["gain"] * rng.uniform(0.8, 1.2)
  image = gain * (f_blood[..., None] * s_b + f_myo[..., None] * s_m + f_out[..., None] * s_o)
  pd_img = gain * (f_blood * sig(0.0, "blood_arterial", np.inf)
                   + f_myo * sig(0.0, "myocardium", np.inf)
                   + f_out * sig(0.0, "skeletal_muscle", np.inf))
  sigma = noise * 0.0016 * study["gain"] / study["snr"] * 0.5  # larger voxels: 2x the SNR
  noisy = lambda a: np.abs(a + sigma * (rng.standard_normal(a.shape)  # noqa: E731
                                        + 1j * rng.standard_normal(a.shape)))
  return dict(image=noisy(image), pd=noisy(pd_img), mask=mask, dose_ratio=dose_ratio,
              seq=dict(ts=seq["ts"], tr=seq["tr"], flip=seq["flip"], n=seq["n"]),
              protocol=seq["protocol"])


def _sector_means(mask, mbf):
  """Mean true MBF per 6 and 48 sectors (perfjax.sectors geometry); NaN for an empty sector.

  The 6-sector map is the 48-sector map's angular wedges merged four by four (24 angular
  sub-sectors split each AHA sector in four), so both come from one sector_map call.
  """
  s48 = sectors.sector_map(mask, 24, 2)
  s6 = np.where(s48 > 0, (s48 - 1) // 8 + 1, 0)
  return sectors.sector_means(mbf, s6, 6), sectors.sector_means(mbf, s48, 48)


def simulate(seed, n_slices, protocol, motion_fraction=0.0, *, stress=True, defect_fraction=None,
             noise=1.0, dark_rim=None, banding=0.7, study_offset=0, slices_per_study=3,
             include_motion_deformation=True, rotation_deg=30.0, translation_mm=6.0, blur=True,
             variability="wide", aif_series="dual_sequence", parameter_error=False, workers=2):
  """Simulate ``n_slices`` perfusion slices, deterministic from ``seed``.

  Slice i belongs to study ``i // slices_per_study`` (basal, mid, apical for 3 per study);
  its draws depend only on (seed, study, level), never on ``n_slices``. The same seed with
  the other protocol images the same hearts and kinetics with the other pulse sequence.

  Args:
    seed: non-negative int.
    n_slices: number of slices N (>= 1).
    protocol: "flash" (SR-FLASH, T1-weighted), "bssfp" (SR-bSSFP, T2/T1-weighted) or "mixed"
      (each study one of the two at random, e.g. to train a model for real images of either).
    motion_fraction: probability that a slice keeps residual respiratory motion.
    stress: stress (normal MBF 2.5-4.5 ml/g/min), rest (0.8-1.3), or "mixed": studies with an
      even index (before study_offset) at stress, odd ones at rest (a test set that spans
      about 0.3-4.5 ml/g/min).
    defect_fraction: probability that a study has a perfusion defect (LAD, RCA or LCx
      territory, subendocardial, partly transmural), present in all its slices: ischaemia at
      stress, an infarct (a fixed defect) at rest (default 0.4 at stress, 0 at rest, 0.4 for
      both in "mixed").
    noise: noise scale (1 = default SNR, 0 = noise-free magnitude).
    dark_rim: probability of a subendocardial dark-rim artefact per slice (default 0.15 for
      FLASH, 0.35 for bSSFP, where it is more common).
    banding: probability of a bSSFP off-resonance band near the lateral wall (bSSFP only).
    study_offset: added to the study ids (the draws do not depend on it).
    slices_per_study: slices per heart (levels spread from basal to apical).
    include_motion_deformation: motion slices also scale by up to 4 % per frame.
    rotation_deg: rotations are U(-rotation_deg, rotation_deg) (0: standard orientation).
    translation_mm: crop-centre jitter U(-t, t) mm per axis.
    blur: soften the image with a 3 x 3 binomial kernel (the interpolation of a coarser
      acquisition); the mask stays sharp.
    variability: "wide" (default) spans real images: epicardial diameter 30-80 px in the
      crop (mid slices), RV arrival at frame 0-12, pulmonary transit, bolus width and dose
      varied (the LV peaks at frames 9-29, as in real series truncated by preprocess), heart
      rate 67-120 (stress) or 46-86 bpm (rest), eccentric cavities, thin to thick walls,
      small to large RVs and papillary muscles, a body of soft tissue with a lung field on
      one side and 4-14 random organ blobs, random proton density (0.5-6x) and enhancement
      (0.1-2x, never more than half the LV blood's) of every surrounding tissue
      (never brighter than 45-90 % of the LV blood's peak), textures of random strength and grain, an
      acquisition at 40-100 % of the k-space extent (blur, Gibbs ringing), frame-to-frame
      intensity jitter, SNR 0.35-3x, coil geometry, zero-filled field-of-view edges, and
      saturation recovery as scanners do it: delays of 50-200 ms and imperfect saturation
      (0-35 % of M0 left; seq_sat_residual), so the pre-contrast blood is 0.1-0.45 of its
      peak. "narrow" is the earlier phantom (its draws are unchanged by the wide ones).
    aif_series: "dual_sequence" (default), "dual_bolus" or None: the study's separate AIF
      acquisition (see _aif_series), in the aif_* fields; its draws are their own stream.
    parameter_error: False (default: the recorded sequence is the truth) or True: the true
      flip angle is the nominal one times a B1 scale drawn per study (0.88-1.12, field b1) and
      the recorded blood T1 is the nominal 1.85 s while the truth (t1_blood_true_s) is drawn
      1.7-2.0 s: what a user of a real scanner knows. Its draws are their own stream.
    workers: threads that simulate slices concurrently (the result does not depend on it).

  Returns:
    dict of numpy arrays, one row per slice: the fields of `perfjax.data.schema.PHANTOM`
    (name, shape after N, dtype and meaning there; T = 30 frames), among them the
    CONVENTIONS.md ones: image float32 [N,128,128,T] (min-max normalised per slice), raw,
    mask int32 [N,128,128], times float32 [N,T], mbf float32 [N,128,128] (ml/g/min, 0 off the
    myocardium), motion bool [N], peak_lv_frame int32 [N]; then the other truths, the
    sequence as recorded (with parameter_error the true flip is b1 x seq_flip_deg and the
    true blood T1 t1_blood_true_s) and the study's AIF series, repeated on its slices
    (aif_series None: has_aif_series False, aif_image, aif_pd, aif_seq_* and aif_dose_ratio
    NaN, aif_mask 0, aif_seq_n_pulses -1); and protocol <U5 [N] ("flash" or "bssfp").
  """
  mixed = isinstance(stress, str)
  if mixed and stress != "mixed":
    raise InputError("stress", f"must be True, False or 'mixed', got {stress!r}")
  if defect_fraction is None:  # stress-induced ischaemia; at rest flow is autoregulated
    defect_fraction = 0.4 if (mixed or stress) else 0.0
  if dark_rim is None:
    dark_rim = {"bssfp": 0.35, "flash": 0.15}.get(protocol, 0.25)
  if aif_series not in (None,) + AIF_PROTOCOLS:
    raise InputError("aif_series", f"must be None or one of {AIF_PROTOCOLS}, got {aif_series!r}")
  opts = dict(defect_fraction=defect_fraction, noise=noise, dark_rim=dark_rim, banding=banding,
              blur=bool(blur), slices_per_study=slices_per_study,
              include_motion_deformation=bool(include_motion_deformation),
              rotation_deg=float(rotation_deg), translation_mm=float(translation_mm))
  _check(seed, n_slices, "flash" if protocol == MIXED else protocol, motion_fraction, opts)
  if variability not in VARIABILITIES:
    raise InputError("variability", f"must be one of {VARIABILITIES}, got {variability!r}")
  n_slices, per = int(n_slices), int(slices_per_study)
  out = {f.name: np.empty((n_slices,) + f.shape, f.dtype) for f in schema.PHANTOM
         if f.kind != "text"}
  n_studies = (n_slices + per - 1) // per
  study_stress = [(index % 2 == 0) if mixed else bool(stress) for index in range(n_studies)]
  study_protocol = [_study_protocol(int(seed), index) if protocol == MIXED else protocol
                    for index in range(n_studies)]
  studies = [_study(int(seed), index, study_protocol[index], study_stress[index],
                    float(defect_fraction),
                    wide=variability == "wide")
             for index in range(n_studies)]
  for index, st in enumerate(studies):
    st["t1_blood_nominal"], st["b1"] = st["t1_blood"], 1.0
    if parameter_error:
      prng = np.random.default_rng(np.random.SeedSequence(int(seed),
                                                          spawn_key=(index, PARAM_STREAM)))
      st["b1"], st["t1_blood_nominal"] = float(prng.uniform(0.88, 1.12)), NOMINAL_T1_BLOOD_S
  aif_rec = [None if aif_series is None else
             _aif_series(int(seed), st, index, study_protocol[index], aif_series, float(noise),
                         st["b1"])
             for index, st in enumerate(studies)]

  def one(i):
    index, j = divmod(i, per)
    level = _level(j, per)
    _slice(int(seed), studies[index], index, level, study_protocol[index], float(motion_fraction),
           opts, out, i)
    out["mbf_sector6"][i], out["mbf_sector48"][i] = _sector_means(out["mask"][i], out["mbf"][i])
    out["slice_level"][i], out["study_id"][i] = level, int(study_offset) + index
    out["stress"][i] = study_stress[index]
    a = aif_rec[index]
    out["has_aif_series"][i] = a is not None
    if a is None:
      for k in ("aif_image", "aif_pd", "aif_seq_ts", "aif_seq_tr", "aif_seq_flip_deg",
                "aif_dose_ratio"):
        out[k][i] = np.nan
      out["aif_mask"][i], out["aif_seq_n_pulses"][i] = 0, -1
    else:
      out["aif_image"][i], out["aif_pd"][i], out["aif_mask"][i] = a["image"], a["pd"], a["mask"]
      out["aif_seq_ts"][i], out["aif_seq_tr"][i] = a["seq"]["ts"], a["seq"]["tr"]
      out["aif_seq_flip_deg"][i], out["aif_seq_n_pulses"][i] = a["seq"]["flip"], a["seq"]["n"]
      out["aif_dose_ratio"][i] = a["dose_ratio"]

  workers = max(1, min(int(workers), n_slices))
  if workers == 1:
    for i in range(n_slices):
      one(i)
  else:  # slices are independent and numpy releases the GIL in the heavy loops
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(one, range(n_slices)))
  out["protocol"] = np.array([study_protocol[i // per] for i in range(n_slices)])
  return out


MIXED = "mixed"  # protocol: each study FLASH or bSSFP at random (its own stream)


def _study_protocol(seed: int, index: int) -> str:
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, WIDE_STREAM, 2)))
  return "flash" if rng.uniform() < 0.5 else "bssfp"
