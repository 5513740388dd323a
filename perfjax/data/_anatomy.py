"""Short-axis anatomy of the phantom: random hearts, tissue labels of points, true MBF field.

Private to :mod:`perfjax.data.phantom`. Geometry lives in a *heart frame* in millimetres:
origin at the LV centre, x to the lateral wall (image right), y anterior (image up), angles
``phi = atan2(y, x)`` in degrees as in CONVENTIONS.md (90 anterior, 180 septal). The heart is
described in polar form around the LV centre by radius tables over ``N_ANG`` angle bins:

  LV blood (r < endo) with trabeculae (endo - trab < r) and two papillary muscles (labelled
  LV), myocardium (endo <= r < epi), RV blood as a crescent ``epi <= r < epi + rv_h`` over
  the arc ``|phi - phi_rv| < beta`` (it meets the myocardium exactly at the two RV insertion
  points ``phi_rv -/+ beta``), RV free wall, epicardial fat, pericardium; outside: chest
  wall (muscle, subcutaneous fat, air), liver under a diaphragm dome, descending aorta, lung
  with pulmonary arteries and veins.
"""
from __future__ import annotations

import dataclasses

import numpy as np

N_ANG = 720  # 0.5 degree bins
_PHI = np.arange(N_ANG) * (360.0 / N_ANG)
_PHI_RAD = np.deg2rad(_PHI)

# Tissue classes (index into the per-class signal curves of the phantom).
(AIR, LUNG, PULM_ART, PULM_VEIN, MUSCLE, SUBFAT, LIVER, AORTA, BODY, FLUID, MARROW, PERI, EPIFAT,
 RVWALL, RVBLOOD, LVBLOOD, PAP, MYO) = range(18)
N_CLASSES = 18
CLASS_NAMES = ("air", "lung", "pulmonary_artery", "pulmonary_vein", "chest_muscle",
               "subcutaneous_fat", "liver", "aorta", "soft_tissue", "fluid", "fatty_marrow",
               "pericardium", "epicardial_fat", "rv_wall", "rv_blood", "lv_blood",
               "papillary_trabeculae", "myocardium")
# Mask label (0 bg, 1 myo, 2 LV incl. papillary/trabeculae, 3 RV) of every class.
MASK_OF_CLASS = np.array([0] * 14 + [3, 2, 2, 1], dtype=np.int32)
# Classes the wide surroundings draw their random blobs from (stomach, bowel, spine, fat, ...).
BLOB_CLASSES = (MUSCLE, SUBFAT, LIVER, BODY, FLUID, MARROW, AORTA)
# Coronary territories: centre of the defect relative to the septal centre theta_s (degrees,
# counter-clockwise): LAD anterior/anteroseptal, RCA inferior/inferoseptal, LCx lateral.
TERRITORIES = {"LAD": -60.0, "RCA": 60.0, "LCx": 180.0}


def _wrap180(deg):
  return np.mod(np.asarray(deg) + 180.0, 360.0) - 180.0


def _harmonics(rng, orders, amp):
  """Random smooth periodic table sum_n a_n cos(n phi + p_n), a_n ~ U(0, amp)."""
  out = np.zeros(N_ANG)
  for n in orders:
    out += rng.uniform(0.0, amp) * np.cos(n * _PHI_RAD + rng.uniform(0, 2 * np.pi))
  return out


def _bump(center_deg, width_deg):
  """Periodic Gaussian bump over the angle table."""
  return np.exp(-0.5 * (_wrap180(_PHI - center_deg) / width_deg) ** 2)


@dataclasses.dataclass
class Heart:
  """One slice's anatomy (heart frame, mm) and perfusion field."""
  tables: np.ndarray  # [6, N_ANG] radii (mm): endo, epi, trabecular depth, RV crescent
  #   thickness, RV wall thickness, outside of the pericardium
  peri_t: float  # pericardium thickness (mm)
  fat: np.ndarray  # [N_ANG] epicardial fat thickness (mm)
  phi_rv: float
  beta: float
  papillary: np.ndarray  # [2, 3]: x, y, radius (mm)
  chest: tuple  # (nx, ny, d, muscle_t, fat_t)
  liver: tuple  # (cx, cy, radius)
  aorta: tuple  # (cx, cy, radius)
  vessels: np.ndarray  # [V, 4]: x, y, radius (mm), 1 artery / 0 vein (lung vessels)
  mbf_normal: float  # ml/g/min of normal myocardium (slice mean before modulation)
  mbf_mod: tuple  # (a1, p1, a2, p2, transmural gradient)
  defect: tuple | None  # (centre_deg, half_width_deg, transmurality, residual_ratio)
  # Wide surroundings (None: the narrow phantom, lung everywhere outside the heart):
  # (lung direction deg, lung half-width deg, gap mm) and blobs [B, 6]: x, y, semi-axes a, b
  # (mm), angle (rad), class.
  lung_zone: tuple | None = None
  blobs: np.ndarray | None = None

  @property
  def endo(self):
    return self.tables[0]

  @property
  def epi(self):
    return self.tables[1]

  def rvip_xy(self) -> np.ndarray:
    """[2, 2] (x, y) in mm of the anterior then inferior RV insertion point (on the epicardium)."""
    out = []
    for phi in (self.phi_rv - self.beta, self.phi_rv + self.beta):
      r = np.interp(np.mod(phi, 360.0), np.append(_PHI, 360.0), np.append(self.epi, self.epi[0]))
      out.append((r * np.cos(np.deg2rad(phi)), r * np.sin(np.deg2rad(phi))))
    return np.array(out)

  def outer_radius(self) -> np.ndarray:
    """[N_ANG] radius of the pericardium's outside."""
    rv_h, rv_wall = self.tables[3], self.tables[4]
    return self.epi + np.where(rv_h > 0, rv_h + rv_wall, 0.0) + self.fat + self.peri_t


def sample_study(rng, stress: bool, defect_fraction: float) -> dict:
  """Study-level anatomy: heart size and phase, RV orientation, perfusion and defect."""
  systole = rng.uniform() < 0.25
  radius = rng.uniform(18.0, 25.0)
  thick = rng.uniform(7.0, 11.0)
  if systole:  # small end-systolic cavity, thick wall
    radius *= rng.uniform(0.5, 0.7)
    thick *= rng.uniform(1.35, 1.6)
  else:
    rng.uniform(), rng.uniform()
  mbf = rng.uniform(2.5, 4.5) if stress else rng.uniform(0.8, 1.3)
  has_defect = rng.uniform() < defect_fraction
  territory = ("LAD", "RCA", "LCx")[int(rng.integers(3))]
  defect = (TERRITORIES[territory] + rng.uniform(-20, 20), rng.uniform(30.0, 60.0),
            rng.uniform(0.4, 1.0), rng.uniform(0.25, 0.6))
  return dict(systole=systole, radius=radius, thick=thick, phi_rv=180.0 + rng.uniform(-12, 12),
              rv_h=rng.uniform(0.8, 1.25) * (0.8 if systole else 1.0), mbf=mbf,
              defect=defect if has_defect else None,
              territory=territory if has_defect else "", stress=stress,
              transmural=rng.uniform(-0.05, 0.1) if stress else rng.uniform(0.05, 0.2))


def sample_heart(rng, study: dict, level: int, wide_rng=None) -> Heart:
  """Slice anatomy at ``level`` (0 basal, 1 mid, 2 apical) of ``study``.

  With ``wide_rng`` (the wide phantom) the shape is randomised further from that separate
  stream (ellipticity, wall thickness, RV size, trabeculation) and the surroundings become
  a body of soft tissue with a lung field on one side and random organ blobs; the draws of
  ``rng`` are the same either way.
  """
  size = (rng.uniform(1.05, 1.18), 1.0, rng.uniform(0.55, 0.75))[level]
  wall = (rng.uniform(0.85, 1.0), 1.0, rng.uniform(0.7, 0.9))[level]
  radius = study["radius"] * size * rng.uniform(0.95, 1.05)
  thick = study["thick"] * wall * rng.uniform(0.93, 1.07)
  phi_rv = study["phi_rv"] + rng.uniform(-5, 5)
  rel = _wrap180(_PHI - phi_rv)
  # Endocardium: elliptic and irregular, the septum a little flattened by the RV.
  endo = radius * (1.0 + _harmonics(rng, (2,), 0.1) + _harmonics(rng, (3, 4), 0.035)
                   - rng.uniform(0.0, 0.07) * np.exp(-0.5 * (rel / 35.0) ** 2))
  thick_tab = thick * (1.0 + _harmonics(rng, (1, 2), 0.12) + _harmonics(rng, (3,), 0.05))
  if wide_rng is not None:  # eccentric cavities, thin and thick walls, local hypertrophy
    endo = endo * (1.0 + _harmonics(wide_rng, (2,), 0.12))
    thick_tab = thick_tab * (study["wall_scale"] * wide_rng.uniform(0.9, 1.1)
                             + _harmonics(wide_rng, (1, 2, 3), 0.15))
  epi = endo + np.maximum(thick_tab, 0.35 * thick)
  trab = np.maximum(_harmonics(rng, range(7, 16), 1.0), 0.0)
  trab *= rng.uniform(0.3, 2.2) / max(trab.max(), 1e-6)
  if wide_rng is not None:
    trab *= wide_rng.uniform(0.2, 2.0)
  trab *= np.where(np.abs(rel) > 90.0, 1.0, 0.4)  # trabeculae mostly on the free wall
  # RV crescent: thickness h0 (1 - u^2)^p over |u| = |rel / beta| < 1, zero at the RVIPs.
  beta = (rng.uniform(60, 80), rng.uniform(55, 75), rng.uniform(40, 60))[level]
  h0 = (rng.uniform(16, 28), rng.uniform(12, 22), rng.uniform(5, 12))[level] * study["rv_h"]
  u = rel / beta
  inside = np.abs(u) < 1.0
  shape = np.clip(1.0 - u ** 2, 0.0, None) ** rng.uniform(0.6, 1.1)
  rv_h = np.where(inside, h0 * shape * (1.0 + rng.uniform(-0.3, 0.3) * u), 0.0)
  if wide_rng is not None:  # small to large RVs
    rv_h *= wide_rng.uniform(0.35, 1.3)
  rv_wall = np.where(inside, rng.uniform(2.0, 4.0), 0.0)
  # Epicardial fat: a thin base layer, fat in the grooves at both RVIPs, sometimes a thin
  # lateral layer (a classic pitfall for the lateral wall).
  fat = rng.uniform(0.0, 1.0) + rng.uniform(2.0, 7.0) * _bump(phi_rv - beta, rng.uniform(12, 25))
  fat += rng.uniform(1.0, 5.0) * _bump(phi_rv + beta, rng.uniform(10, 20))
  lateral = rng.uniform() < 0.5
  fat += lateral * rng.uniform(1.0, 3.0) * _bump(rng.uniform(-50, 50), rng.uniform(15, 35))
  fat += (level == 0) * rng.uniform(1.0, 4.0) * _bump(rng.uniform(240, 320), 25.0)  # AV groove
  fat = fat * (1.0 + _harmonics(rng, (3, 5), 0.25))
  fat = np.maximum(fat, 0.0)
  peri_t = rng.uniform(1.0, 2.0)
  # Papillary muscles: anterolateral and posteromedial, touching the endocardium.
  pap = []
  for centre in (rng.uniform(20, 60), rng.uniform(250, 300)):
    rp = (rng.uniform(2.5, 4.5) * (1.3 if study["systole"] else 1.0)
          * (0.6 if level == 2 else 1.0))
    r_endo = np.interp(centre, _PHI, endo)
    rc = max(r_endo - rp * rng.uniform(0.7, 1.0), 0.3 * r_endo)
    if wide_rng is not None:
      rp *= wide_rng.uniform(0.5, 1.6)
    pap.append((rc * np.cos(np.deg2rad(centre)), rc * np.sin(np.deg2rad(centre)), rp))
  heart = Heart(tables=np.stack([endo, epi, trab, rv_h, rv_wall, np.zeros(N_ANG)]),
                peri_t=peri_t, fat=fat, phi_rv=phi_rv, beta=beta, papillary=np.array(pap),
                chest=(), liver=(), aorta=(), vessels=np.zeros((0, 4)),
                mbf_normal=study["mbf"] * rng.uniform(0.95, 1.05),
                mbf_mod=(rng.uniform(0, 0.06), rng.uniform(0, 360), rng.uniform(0, 0.04),
                         rng.uniform(0, 360), study["transmural"]),
                defect=study["defect"])
  outer = heart.outer_radius()
  heart.tables[5] = outer
  xs, ys = outer * np.cos(_PHI_RAD), outer * np.sin(_PHI_RAD)
  # Chest wall: beyond a line facing anterior-septal, muscle then subcutaneous fat then air.
  psi = np.deg2rad(rng.uniform(95, 145))
  nx, ny = np.cos(psi), np.sin(psi)
  d = (xs * nx + ys * ny).max() + rng.uniform(3, 15)
  heart.chest = (nx, ny, d, rng.uniform(8, 15), rng.uniform(5, 20))
  # Liver under a dome-shaped diaphragm, inferior (and septal) to the heart.
  psi = np.deg2rad(rng.uniform(215, 265))
  lx, ly = np.cos(psi), np.sin(psi)
  dl = (xs * lx + ys * ly).max() + rng.uniform(3, 12)
  rl = rng.uniform(90, 140)
  heart.liver = ((dl + rl) * lx, (dl + rl) * ly, rl)
  # Descending aorta, inferolateral-posterior.
  pa = rng.uniform(285, 330)
  ra = rng.uniform(9, 13)
  da = np.interp(pa, _PHI, outer) + ra + rng.uniform(4, 15)
  heart.aorta = (da * np.cos(np.deg2rad(pa)), da * np.sin(np.deg2rad(pa)), ra)
  # Pulmonary vessels in the lung fields (only shown where the lung is): arteries enhance
  # with the RV, veins with the LV.
  pv = rng.uniform(0, 360, 16)
  dv = np.interp(pv, _PHI, outer) + rng.uniform(4, 60, 16)
  heart.vessels = np.stack([dv * np.cos(np.deg2rad(pv)), dv * np.sin(np.deg2rad(pv)),
                            rng.uniform(1.0, 3.5, 16), rng.uniform(size=16) < 0.5], axis=1)
  if wide_rng is not None:
    _wide_surroundings(heart, wide_rng, outer)
  return heart


def _wide_surroundings(heart: Heart, rng, outer: np.ndarray) -> None:
  """A body of soft tissue around the heart: a lung field on the lateral/anterior side
  (it starts a few mm from the pericardium) and 4-14 random organ blobs (fat, muscle,
  liver, stomach or bowel fluid, marrow, vessels) beyond the pericardium."""
  heart.lung_zone = (rng.uniform(-40.0, 110.0), rng.uniform(30.0, 110.0), rng.uniform(0.0, 12.0))
  n = int(rng.integers(4, 15))
  ang = rng.uniform(0, 360, n)
  dist = np.interp(ang, _PHI, outer) + rng.uniform(2.0, 70.0, n)
  a = rng.uniform(4.0, 40.0, n)
  b = a * rng.uniform(0.3, 1.0, n)
  cls = np.asarray(BLOB_CLASSES)[rng.integers(len(BLOB_CLASSES), size=n)]
  # keep each blob outside the heart: its centre at least its smaller semi-axis beyond it
  dist = np.maximum(dist, np.interp(ang, _PHI, outer) + b)
  heart.blobs = np.stack([dist * np.cos(np.deg2rad(ang)), dist * np.sin(np.deg2rad(ang)), a, b,
                          rng.uniform(0, np.pi, n), cls], axis=1)


def mbf_field(heart: Heart, phi_deg, depth):
  """True MBF (ml/g/min) at angles ``phi_deg`` and transmural depth (0 endo .. 1 epi)."""
  a1, p1, a2, p2, grad = heart.mbf_mod
  phi = np.deg2rad(phi_deg)
  mbf = heart.mbf_normal * (1.0 + a1 * np.cos(phi - np.deg2rad(p1))
                            + a2 * np.cos(2 * phi - np.deg2rad(p2))) * (1.0 + grad * (0.5 - depth))
  if heart.defect is not None:
    centre, half, transmural, ratio = heart.defect
    d_ang = np.abs(_wrap180(phi_deg - (heart.phi_rv + centre)))
    ang = 1.0 / (1.0 + np.exp((d_ang - half) / 8.0))
    rad = 1.0 / (1.0 + np.exp((depth - transmural) / 0.08))  # subendocardial predominance
    mbf = mbf * (1.0 - (1.0 - ratio) * ang * rad)
  return mbf


def evaluate(heart: Heart, x, y, with_mbf=True):
  """Tissue class, true MBF (ml/g/min, 0 off the myocardium) and dark-rim zone of points.

  Args:
    heart: the slice anatomy.
    x, y: float arrays of equal shape, heart-frame mm.
    with_mbf: also compute the MBF field (else zeros).

  Returns:
    (classes uint8, mbf float64, rim bool), each of the shape of ``x``.
  """
  r = np.sqrt(x * x + y * y)
  phi = np.mod(np.degrees(np.arctan2(y, x)), 360.0)
  idx = (phi * (N_ANG / 360.0) + 0.5).astype(np.intp) % N_ANG
  endo, epi, trab, rv_h, rv_wall, outer = heart.tables[:, idx]
  cls = np.full(x.shape, LUNG if heart.lung_zone is None else BODY, dtype=np.uint8)
  # Outside the heart, lowest priority first.
  if heart.lung_zone is not None:
    lung_dir, lung_half, gap = heart.lung_zone
    cls[(np.abs(_wrap180(phi - lung_dir)) < lung_half) & (r > outer + gap)] = LUNG
    for bx, by, ba, bb, bang, bcls in heart.blobs:
      u = (x - bx) * np.cos(bang) + (y - by) * np.sin(bang)
      v = -(x - bx) * np.sin(bang) + (y - by) * np.cos(bang)
      cls[(u / ba) ** 2 + (v / bb) ** 2 < 1.0] = int(bcls)
  nx, ny, d, mt, ft = heart.chest
  proj = x * nx + y * ny
  cls[proj > d] = MUSCLE
  cls[proj > d + mt] = SUBFAT
  cls[proj > d + mt + ft] = AIR
  lung = np.nonzero(cls.ravel() == LUNG)[0]
  xl, yl = x.ravel()[lung], y.ravel()[lung]
  for vx, vy, vr, artery in heart.vessels:  # small discs: test a narrow column first
    near = np.nonzero(np.abs(xl - vx) < vr)[0]
    near = near[(xl[near] - vx) ** 2 + (yl[near] - vy) ** 2 < vr * vr]
    cls.ravel()[lung[near]] = PULM_ART if artery else PULM_VEIN
  lx, ly, rl = heart.liver
  cls[(x - lx) ** 2 + (y - ly) ** 2 < rl * rl] = LIVER
  ax, ay, ra = heart.aorta
  cls[(x - ax) ** 2 + (y - ay) ** 2 < ra * ra] = AORTA
  # Heart, from the outside in.
  rv_out = epi + rv_h
  has_rv = rv_h > 0
  cls[r < outer] = PERI
  cls[r < outer - heart.peri_t] = EPIFAT
  cls[has_rv & (r < rv_out + rv_wall)] = RVWALL
  cls[has_rv & (r < rv_out)] = RVBLOOD
  cls[r < epi] = MYO
  lv = r < endo
  cls[lv] = LVBLOOD
  tissue = lv & (r >= endo - trab)
  for px, py, rp in heart.papillary:
    tissue |= (x - px) ** 2 + (y - py) ** 2 < rp * rp
  cls[tissue & (r < epi)] = PAP
  rim = (r > endo - 1.2) & (r < endo + 1.0)
  mbf = np.zeros(x.shape)
  if with_mbf:
    myo = cls == MYO
    depth = (r[myo] - endo[myo]) / (epi[myo] - endo[myo])
    mbf[myo] = mbf_field(heart, phi[myo], depth)
  return cls, mbf, rim
