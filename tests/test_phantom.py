"""perfjax.data.phantom.simulate: contract, determinism, physics sanity, geometry, motion."""
import numpy as np
import pytest
from scipy import ndimage

from perfjax import physics, sectors
from perfjax.data import phantom, schema
from perfjax.errors import InputError

N = 6  # two studies of basal, mid, apical


@pytest.fixture(scope="module")
def flash():
  return phantom.simulate(11, N, "flash", motion_fraction=0.5, defect_fraction=0.5, study_offset=40)


@pytest.fixture(scope="module")
def clean():
  """Noise-free, artefact-free, unblurred, unrotated, uncentred FLASH and bSSFP twins.

  The physics is pinned on the narrow phantom: the wide one randomises contrast and
  acquisition on top of the same signal equations (tested below).
  """
  kw = dict(noise=0.0, dark_rim=0.0, banding=0.0, rotation_deg=0.0, translation_mm=0.0,
            defect_fraction=1.0, blur=False, variability="narrow")
  return {p: phantom.simulate(3, 3, p, **kw) for p in physics.PROTOCOLS}


def _curves(d, i, key="raw"):
  m = d["mask"][i]
  return {c: d[key][i][m == c].mean(axis=0) for c in (1, 2, 3)}


def test_keys_shapes_dtypes_are_the_schema(flash):
  """simulate returns exactly the schema's phantom fields, each [N, *shape] of its dtype."""
  assert list(flash) == [f.name for f in schema.PHANTOM]
  for f in schema.PHANTOM:
    if f.kind == "text":
      assert flash[f.name].shape == (N,) and flash[f.name].dtype.kind == "U", f.name
    else:
      assert flash[f.name].shape == (N,) + f.shape, f.name
      assert flash[f.name].dtype == f.dtype, f.name
  assert flash["image"].shape == (N, 128, 128, 30) and flash["mask"].shape == (N, 128, 128)
  assert schema.N_AIF_PARAMS == len(physics.AIF_PARAM_NAMES)
  assert phantom.AIF_SIZE == schema.AIF_SIZE
  assert list(flash["protocol"]) == ["flash"] * N


def test_schema_is_one_table_that_imports_only_conventions():
  """Names unique, a one-line meaning each, fills of the field's dtype; imports point one way."""
  import ast  # pylint: disable=g-import-not-at-top
  names = [f.name for f in schema.FIELDS]
  assert len(names) == len(set(names)) and schema.BY_NAME.keys() == set(names)
  for f in schema.FIELDS:
    assert f.meaning and "\n" not in f.meaning, f.name
    assert f.where in (schema.BOTH, schema.PHANTOM_ONLY, schema.RECORD_ONLY), f.name
    if f.fill is not None:
      assert f.where != schema.PHANTOM_ONLY, f.name
      np.testing.assert_equal(np.full(f.shape, f.fill, f.dtype), f.fill, err_msg=f.name)
  tree = ast.parse(open(schema.__file__).read())
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert {m for m in imported if m.startswith("perfjax")} <= {"perfjax"}
  assert {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
          and n.module == "perfjax" for a in n.names} == {"conventions"}


def test_ranges(flash):
  img = flash["image"].reshape(N, -1)
  np.testing.assert_allclose(img.min(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(img.max(1), 1.0, atol=1e-6)
  assert np.all(flash["raw"] >= 0)
  t = flash["times"]
  # one frame per beat: RR 0.4-1.5 s (heart rates 40-150 bpm) in the wide phantom
  assert np.all(t[:, 0] == 0) and np.all(np.diff(t, axis=1) >= 0.4 - 1e-5)
  assert np.all(np.diff(t, axis=1) <= 1.5 + 1e-5)
  assert list(flash["slice_level"]) == [0, 1, 2, 0, 1, 2]
  assert list(flash["study_id"]) == [40, 40, 40, 41, 41, 41]
  for i in range(N):
    m = flash["mask"][i]
    assert set(np.unique(m)) == {0, 1, 2, 3}
    mbf = flash["mbf"][i]
    assert np.all(mbf[m != 1] == 0) and np.all(mbf[m == 1] > 0)
    assert 0.3 < mbf[m == 1].min() and mbf[m == 1].max() < 5.5
    if not flash["defect"][i]:
      assert 2.2 < np.median(mbf[m == 1]) < 4.9
    s6 = sectors.sector_map(m, 6, 1)
    np.testing.assert_allclose(flash["mbf_sector6"][i], sectors.sector_means(mbf, s6, 6), rtol=1e-5)
    s48 = sectors.sector_map(m, 24, 2)
    np.testing.assert_allclose(flash["mbf_sector48"][i], sectors.sector_means(mbf, s48, 48),
                               rtol=1e-5)
  assert 0 < flash["motion"].sum() < N  # motion_fraction 0.5 on 6 slices, seed 11


def test_slices_per_study_and_single_slice():
  d = phantom.simulate(6, 4, "bssfp", slices_per_study=2, rotation_deg=0.0)
  assert list(d["slice_level"]) == [0, 2, 0, 2]
  assert list(d["study_id"]) == [0, 0, 1, 1]
  one = phantom.simulate(6, 1, "bssfp", slices_per_study=1)
  assert list(one["slice_level"]) == [1] and one["image"].shape == (1, 128, 128, 30)


def test_rest_flow():
  d = phantom.simulate(2, 3, "flash", stress=False, defect_fraction=0.0)
  myo = d["mbf"][d["mask"] == 1]
  assert 0.6 < myo.min() and myo.max() < 1.6
  assert not d["stress"].any()


def test_determinism_and_slice_independence(flash):
  again = phantom.simulate(11, 4, "flash", motion_fraction=0.5, defect_fraction=0.5,
                           study_offset=40, workers=1)  # fixture: 2 threads
  for key in ("image", "raw", "mask", "mbf", "times", "rvip", "aif", "motion_shift_px"):
    np.testing.assert_array_equal(again[key], flash[key][:4], err_msg=key)
  other = phantom.simulate(12, 1, "flash")
  assert not np.array_equal(other["mask"][0], flash["mask"][0])


def test_aif_matches_its_parameters(flash):
  for i in range(N):
    np.testing.assert_allclose(
        flash["aif"][i], physics.aif_concentration(flash["times"][i], flash["aif_params"][i]),
        rtol=1e-4, atol=1e-5)
    assert flash["aif"][i, 0] == 0.0 and 3.5 < flash["aif"][i].max() < 10.0


def test_rv_before_lv_before_myocardium(clean):
  for d in clean.values():
    for i in range(3):
      c = _curves(d, i)
      rv, lv, myo = (int(np.argmax(c[k])) for k in (3, 2, 1))
      assert rv < lv < myo, (rv, lv, myo)
      assert lv == d["peak_lv_frame"][i]


def test_peak_lv_frame_on_noisy_images(flash):
  for i in np.nonzero(~flash["motion"])[0]:
    lv = _curves(flash, i, "image")[2]
    assert abs(int(np.argmax(lv)) - int(flash["peak_lv_frame"][i])) <= 1


def test_defect_sectors_enhance_less(clean):
  d = clean["flash"]
  assert d["defect"].all()
  for i in range(3):
    smap = sectors.sector_map(d["mask"][i], 6, 1)
    raw = d["raw"][i]
    enh = np.array([(raw[smap == k].mean(0) - raw[smap == k, 0].mean()).max() for k in range(1, 7)])
    truth = d["mbf_sector6"][i]
    lo, hi = int(np.argmin(truth)), int(np.argmax(truth))
    assert truth[lo] < 0.85 * truth[hi]
    assert enh[lo] < 0.9 * enh[hi]
    assert np.corrcoef(enh, truth)[0, 1] > 0.8


def test_flash_vs_bssfp_baseline(clean):
  ratio = {}
  for p, d in clean.items():
    c = _curves(d, 1)
    ratio[p] = c[2][0] / c[1][0]  # LV blood / myocardium before contrast
  assert ratio["flash"] < 1.0 < ratio["bssfp"]
  # Same seed, same hearts: the two sequences image identical anatomy and kinetics.
  for key in ("mask", "mbf", "aif", "times", "rvip"):
    np.testing.assert_array_equal(clean["flash"][key], clean["bssfp"][key], err_msg=key)


def test_true_mbf_recovered_by_inverse(clean):
  """Noise-free: signal -> concentration -> linear Fermi fit at known (w, k, tau_d) = truth."""
  d = clean["flash"]
  for i in range(3):
    interior = ndimage.binary_erosion(d["mask"][i] == 1, np.ones((3, 3), bool))
    assert interior.sum() >= 8
    raw = d["raw"][i][interior].astype(np.float64)
    conc = physics.concentration_from_signal(
        raw, raw[:, 0], "flash", float(d["seq_ts"][i]), float(d["seq_tr"][i]),
        float(d["seq_flip_deg"][i]), int(d["seq_n_pulses"][i]), float(d["t1_myo_s"][i]),
        float(d["t2_myo_s"][i]))
    w, k, tau = (float(v) for v in d["fermi"][i])
    unit = physics.tissue_concentration(d["times"][i].astype(np.float64),
                                        d["aif_params"][i].astype(np.float64), 1.0, w, k, tau)
    mbf_fit = physics.per_s_to_ml_g_min(conc.mean(0) @ unit / (unit @ unit))
    assert mbf_fit == pytest.approx(d["mbf"][i][interior].mean(), rel=0.03)


def test_geometry_standard_orientation(clean):
  d = clean["flash"]
  for i in range(3):
    m = d["mask"][i]
    lv = np.argwhere(m == 2).mean(0)
    rv = np.argwhere(m == 3).mean(0)
    assert rv[1] < lv[1] - 5  # RV on the image left
    assert np.all(np.abs(lv - 63.5) < 3)  # LV-centred crop
    ant, inf = d["rvip"][i]
    assert ant[0] < lv[0] < inf[0]  # anterior RVIP above, inferior below the LV centre
    assert ant[1] < lv[1] and inf[1] < lv[1]


def test_rvip_on_myocardium_and_agrees_with_sectors(flash):
  for i in range(N):
    m = flash["mask"][i]
    dist = ndimage.distance_transform_edt(m != 1)
    found = sectors.rv_insertion_points(m)
    for j, name in enumerate(("anterior", "inferior")):
      r, c = flash["rvip"][i, j]
      assert dist[int(round(r)), int(round(c))] <= 1.5
      assert np.hypot(r - found[name][0], c - found[name][1]) <= 2.5, (i, name)


def test_motion_slices_move_and_others_do_not():
  # narrow: phase correlation needs the textureless, ringing-free images to find the shifts
  kw = dict(noise=0.0, dark_rim=0.0, include_motion_deformation=False, variability="narrow")
  still = phantom.simulate(4, 3, "flash", motion_fraction=0.0, **kw)
  moving = phantom.simulate(4, 3, "flash", motion_fraction=1.0, **kw)
  assert moving["motion"].all() and not still["motion"].any()
  np.testing.assert_array_equal(still["mask"], moving["mask"])
  assert np.all(still["motion_shift_px"] == 0)

  win = np.outer(np.hanning(128), np.hanning(128))

  def shift(a, b):  # integer translation of a relative to b by phase correlation
    a, b = (a - a.mean()) * win, (b - b.mean()) * win
    f = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
    r = np.abs(np.fft.ifft2(f / (np.abs(f) + 1e-12)))
    idx = np.array(np.unravel_index(np.argmax(r), r.shape), float)
    return np.where(idx > 64, idx - 128, idx)

  for i in range(3):
    ref = int(moving["peak_lv_frame"][i])
    np.testing.assert_allclose(moving["raw"][i, ..., ref], still["raw"][i, ..., ref], rtol=1e-4,
                               atol=1e-3 * still["raw"][i].max())
    true = moving["motion_shift_px"][i]
    assert np.abs(true).max() > 2.0
    for t in range(30):
      est = shift(moving["raw"][i, ..., t], still["raw"][i, ..., t])
      assert np.all(np.abs(est - true[t]) <= 1.0), (i, t, est, true[t])
    # The still slice's heart stays put: frames line up with the reference frame.
    for t in (0, 29):
      assert np.all(shift(still["raw"][i, ..., t], still["raw"][i, ..., ref]) == 0)


def test_rician_noise_statistics():
  """Complex Gaussian noise taken to magnitude: Rayleigh where there is no signal."""
  from perfjax.data import _imaging

  sig = np.zeros((128, 128, 30), np.float32)
  sig[64:] = 50.0
  raw, image = np.empty_like(sig), np.empty_like(sig)
  _imaging.magnitude(sig, 2.0, np.random.default_rng(0), raw, image)
  assert raw[:64].mean() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.01)  # Rayleigh
  assert raw[:64].std() == pytest.approx(2.0 * np.sqrt(2 - np.pi / 2), rel=0.02)
  assert raw[64:].mean() == pytest.approx(np.sqrt(50.0 ** 2 + 2.0 ** 2), rel=0.002)
  assert raw[64:].std() == pytest.approx(2.0, rel=0.02)
  assert image.min() == 0.0 and image.max() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs", [
    dict(protocol="spin-echo"), dict(n_slices=0), dict(motion_fraction=1.5), dict(seed=-1),
    dict(noise=-1.0), dict(defect_fraction=2.0), dict(translation_mm=50.0),
    dict(rotation_deg=-5.0), dict(slices_per_study=0)])
def test_bad_inputs(kwargs):
  args = dict(seed=0, n_slices=1, protocol="flash")
  args.update(kwargs)
  with pytest.raises(InputError):
    phantom.simulate(**args)


# ----------------------------------------------------------------------------- wide variability


@pytest.fixture(scope="module")
def wide_and_narrow():
  kw = dict(slices_per_study=1, noise=0.0)  # one mid slice per study
  return (phantom.simulate(5, 16, "flash", **kw),
          phantom.simulate(5, 16, "flash", variability="narrow", **kw))


def _epi_diameter_px(mask):
  return 2.0 * np.sqrt(np.sum((mask == 1) | (mask == 2)) / np.pi)


def test_wide_heart_sizes_span_the_real_range(wide_and_narrow):
  wide, narrow = wide_and_narrow
  d_wide = np.array([_epi_diameter_px(m) for m in wide["mask"]])
  d_narrow = np.array([_epi_diameter_px(m) for m in narrow["mask"]])
  lo, hi = phantom.EPI_DIAMETER_PX
  # area-equivalent diameters of the drawn epicardium (ellipticity and the papillary
  # muscles make them a little smaller than the drawn mean diameter)
  assert d_wide.min() >= 0.75 * lo and d_wide.max() <= 1.1 * hi, d_wide
  assert d_wide.max() - d_wide.min() >= 20.0, d_wide  # 16 draws spread over the range
  assert np.median(d_wide) > np.median(d_narrow) + 5.0, (d_wide, d_narrow)


def test_wide_arrival_frames_span_the_first_half(wide_and_narrow):
  from perfjax.data import preprocess  # pylint: disable=g-import-not-at-top
  wide, narrow = wide_and_narrow
  a_wide = np.array([preprocess.bolus_arrival(x) for x in wide["raw"]])
  a_narrow = np.array([preprocess.bolus_arrival(x) for x in narrow["raw"]])
  # the rule's arrival is the first 10 % crossing of the most enhancing pixels (RV or LV):
  # RV arrival at frames 0-12 plus, where the LV dominates, the pulmonary transit
  assert a_wide.min() <= 5 and a_wide.max() >= 10 and a_wide.max() <= 24, a_wide
  assert a_wide.max() - a_wide.min() >= 6, a_wide
  assert a_narrow.min() >= 3 and a_narrow.max() <= 12, a_narrow


def test_wide_surroundings_vary_in_contrast(wide_and_narrow):
  """The median pre-contrast background (outside the heart's labels) varies from slice to
  slice far more than in the narrow phantom, whose background is mostly dark lung."""
  wide, narrow = wide_and_narrow

  def background_level(d):
    return np.array([np.median(d["image"][i][..., 0][d["mask"][i] == 0]) for i in range(16)])

  bw, bn = background_level(wide), background_level(narrow)
  assert bw.std() > 2.0 * bn.std() and bw.max() > bn.max(), (bw, bn)


def test_wide_saturation_raises_the_baseline(wide_and_narrow):
  """Saturation delays up to 0.2 s and imperfect saturation put the pre-contrast LV blood at
  up to about 0.45 of its peak, as in real stress series; the narrow phantom saturates
  ideally (about 0.1)."""
  wide, narrow = wide_and_narrow

  def lv_baseline_over_peak(d):
    lv = np.array([d["image"][i][d["mask"][i] == 2].mean(axis=0) for i in range(16)])
    return lv[:, :2].mean(axis=1) / lv.max(axis=1)

  assert np.all(narrow["seq_sat_residual"] == 0.0)
  eta = wide["seq_sat_residual"]
  assert eta.min() >= 0.0 and eta.max() <= phantom.SATURATION_RESIDUAL_MAX and eta.std() > 0.05
  assert wide["seq_ts"].max() <= phantom.SATURATION_DELAY_MAX_S + 1e-6
  rw, rn = lv_baseline_over_peak(wide), lv_baseline_over_peak(narrow)
  assert rn.max() < 0.2 and rw.max() > 0.25 and rw.max() < 0.6, (rw, rn)
  assert np.median(rw) > np.median(rn) + 0.05, (rw, rn)


def test_narrow_draws_are_unchanged_by_the_wide_stream(wide_and_narrow):
  """Both share the heart's own draws (its MBF and Fermi parameters), not the imaging."""
  wide, narrow = wide_and_narrow
  np.testing.assert_array_equal(wide["fermi"], narrow["fermi"])
  assert not np.allclose(wide["image"], narrow["image"])


def test_unknown_variability_is_an_input_error():
  with pytest.raises(InputError, match="variability"):
    phantom.simulate(0, 1, "flash", variability="extreme")
