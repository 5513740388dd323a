"""Every bad or unusual input of issue 12 through `perfjax predict` (the CLI's code path), with a
tiny untrained model: each file's exact outcome, the batch always finishing; the output folder
checks; outputs on the input's own grid overlaying the input exactly; reruns and permissions."""
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from perfjax import checkpoints
from perfjax import predict
from perfjax import predict_files
from perfjax.data import nifti
from perfjax.data import phantom
from perfjax.data import sidecar
from perfjax.data import writers
from perfjax.errors import InputError
from perfjax.model import make_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/patch3.py:tiny"


def _tiny_config():
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  return patch3.get_config("tiny")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a `best` checkpoint of the tiny model's initial parameters."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  path = tmp_path_factory.mktemp("work")
  model = make_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 30), jnp.float32))["params"]
  checkpoints.save(checkpoints.manager(str(path), "best"), 1,
                   dict(params=params, step=np.int32(1), dice=np.float32(0.0)))
  return path


@pytest.fixture(scope="module")
def sim():
  return phantom.simulate(5, 1, "bssfp")


def _good(path, sim, pixel_mm=(1.4, 1.4), affine=None):
  return writers.write_nifti(path, sim["raw"][0], pixel_mm=pixel_mm, times=sim["times"][0],
                             affine=affine)


def _dicom(folder, n=30, **tags):
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for k in range(n):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = 20, 20
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = rng.integers(0, 1000, (20, 20), dtype=np.uint16).tobytes()
    ds.InstanceNumber = str(k + 1)
    ds.TriggerTime = str(1000.0 * k)
    ds.PixelSpacing = ["1.5", "1.5"]
    for key, value in tags.items():
      value = value(k) if callable(value) else value
      try:
        setattr(ds, key, value)
      except ValueError:  # not a valid number: stored as text, as a broken scanner would
        ds.add_new(tag_for_keyword(key), "LO", value)
    ds.save_as(folder / f"im{k:03d}.dcm", enforce_file_format=True)


def _nifti(path, data, affine=np.eye(4), zooms=None, times=30):
  img = nib.Nifti1Image(data, affine)
  if zooms is not None:
    img.header.set_zooms(zooms)
  nib.save(img, path)
  if times:
    sidecar.sidecar_path(path).write_text(json.dumps({"times": list(np.arange(times) * 0.9)}))


def _run(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# The sweep: name -> (how to write it, expected status, a piece of the expected error).
def _sweep_inputs(folder: pathlib.Path, sim) -> dict:
  rgb = np.zeros((20, 20, 1, 30), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
  cases = {}
  _good(folder / "good.nii.gz", sim)
  cases["good"] = ("ok|warning", None)
  _nifti(folder / "rgb.nii.gz", rgb)
  cases["rgb"] = ("failed", "colour (RGB) NIfTI data")
  _nifti(folder / "complex.nii.gz", np.ones((20, 20, 1, 30), np.complex64))
  cases["complex"] = ("failed", "complex NIfTI data (complex64) is not supported")
  _nifti(folder / "huge_pixels.nii.gz", np.ones((20, 20, 1, 30), np.float32),
         zooms=(200.0, 200.0, 1.0, 1.0))
  cases["huge_pixels"] = ("failed", "pixel spacing 200 x 200 mm is outside")
  _nifti(folder / "big_pixels.nii.gz", np.ones((200, 200, 1, 30), np.float32),
         zooms=(10.0, 10.0, 1.0, 1.0))  # a valid pixel size, but 1429 pixels after resampling
  cases["big_pixels"] = ("failed", "would give 1429 x 1429 pixels (at most 1024)")
  _nifti(folder / "tiny16.nii.gz", sim["raw"][0][56:72, 56:72][None].transpose(1, 2, 0, 3)
         .reshape(16, 16, 1, 30), affine=np.diag([-1.4, 1.4, 1, 1]))
  cases["tiny16"] = ("failed|warning", "tiny16.nii.gz")
  (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
  cases["broken"] = ("failed", "unreadable or truncated NIfTI file")
  _nifti(folder / "rank5.nii.gz", np.ones((20, 20, 1, 30, 2), np.float32))
  cases["rank5"] = ("failed", "expected a 2D+time image")
  _nifti(folder / "nan.nii.gz", np.full((20, 20, 1, 30), np.nan, np.float32))
  cases["nan"] = ("failed", "NaN/Inf")
  _nifti(folder / "few_frames.nii.gz", np.ones((20, 20, 1, 12), np.float32), times=12)
  cases["few_frames"] = ("failed", "12 time frames; at least 30")
  _nifti(folder / "no_times.nii.gz", np.ones((20, 20, 30), np.float32), times=0)
  cases["no_times"] = ("failed", "needs a JSON sidecar no_times.json")
  _nifti(folder / "time_first.nii.gz", np.ones((40, 20, 24), np.float32), times=40)
  cases["time_first"] = ("failed", "frame times of time_first.json match axis 0, not the last")
  _good(folder / "a.v1.nii.gz", sim)
  _good(folder / "a.v2.nii.gz", sim)
  cases["a.v1"] = ("ok|warning", None)
  cases["a.v2"] = ("ok|warning", None)
  _good(pathlib.Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.nii.gz")), sim)  # not UTF-8
  cases["cafxe9"] = ("ok|warning", None)
  _dicom(folder / "dcm_trigger", TriggerTime="abcdefg")
  cases["dcm_trigger"] = ("failed", "TriggerTime 'abcdefg' is not a number")
  _dicom(folder / "dcm_instance", InstanceNumber=lambda k: f"{k}2a45")
  cases["dcm_instance"] = ("failed", "InstanceNumber")
  _dicom(folder / "dcm_position", ImagePositionPatient=["12x4.5", "0", "0"])
  cases["dcm_position"] = ("failed", "ImagePositionPatient")
  _dicom(folder / "dcm_spacing1", PixelSpacing=["1.5"])
  cases["dcm_spacing1"] = ("failed", "PixelSpacing")
  _dicom(folder / "dcm_spacing0", PixelSpacing=["0", "0"])
  cases["dcm_spacing0"] = ("failed", "dcm_spacing0 (PixelSpacing): pixel spacing 0 x 0 mm")
  (folder / "empty_dir").mkdir()
  cases["empty_dir"] = ("failed", "folder holds no DICOM files")
  return cases


@pytest.mark.slow
def test_bad_input_sweep_through_the_cli(workdir, sim, tmp_path, capsys):
  folder = tmp_path / "in"
  folder.mkdir()
  cases = _sweep_inputs(folder, sim)
  out = folder / "out"  # inside the input folder: skipped, not read as a DICOM series
  proc = _run([f"--config={CONFIG}", f"--workdir={workdir}", "--mode=predict",
               f"--input={folder}", f"--output={out}"])
  assert proc.returncode == predict.EXIT_SOME_FAILED, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  rows = json.loads((out / "slices.json").read_text())["slices"]
  by_id = {r["id"]: r for r in rows}
  assert sorted(by_id) == sorted(cases), sorted(by_id)
  for slice_id, (status, problem) in cases.items():
    row = by_id[slice_id]
    assert row["status"] in status.split("|"), (slice_id, row)
    if problem is not None:
      assert problem in (row["error"] or ""), (slice_id, row["error"])
    if row["status"] == "failed":
      assert row["error"] and not (out / slice_id).exists(), slice_id
    else:
      names = {p.name for p in (out / slice_id).iterdir()}
      assert set(predict.CROP_FILES + predict.INPUT_GRID_FILES) <= names, slice_id
  n_failed = sum(r["status"] == "failed" for r in rows)
  assert f"predicted {len(rows) - n_failed} of {len(rows)} slices" in proc.stdout
  assert f"{n_failed} failed" in proc.stdout and "holds the output folder" in proc.stdout
  assert (out / "predict.log").read_text().count("Traceback") == n_failed
  assert by_id["a.v1"]["file"].endswith("a.v1.nii.gz")
  assert by_id["cafxe9"]["file"].endswith("caf\\xe9.nii.gz")
  # Normal permissions (0666 less the umask), not mkstemp's 0600.
  umask = os.umask(0)
  os.umask(umask)
  for p in [out / "slices.json", out / "good" / "segmentation.nii.gz"]:
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p

  # A rerun into the same folder with fewer inputs leaves exactly the new run's files.
  for p in folder.iterdir():
    if p.name not in ("good.nii.gz", "good.json", "broken.nii.gz", "out"):
      if p.is_dir():
        for q in p.iterdir():
          q.unlink()
        p.rmdir()
      else:
        p.unlink()
  (out / "mine.txt").write_text("the user's own file")
  (out / "broken").mkdir()  # the user's own folder, named like an input: never the slice's
  (out / "broken" / "keep.txt").write_text("the user's own file")
  # In process (the CLI's exit status and summary are checked above): predict itself clears.
  capsys.readouterr()
  for _ in range(2):  # and a second rerun never removes the user's folder
    again = predict.predict(_tiny_config(), str(workdir), str(folder), str(out))
    assert predict.n_failed(again) == 1
    assert sorted(p.name for p in out.iterdir()) == ["broken", "good", "mine.txt", "predict.log",
                                                     "slices.csv", "slices.json"]
    assert [r["id"] for r in json.loads((out / "slices.json").read_text())["slices"]] == [
        "broken-2", "good"]
    assert (out / "broken" / "keep.txt").read_text() == "the user's own file"
    assert "mine.txt" in capsys.readouterr().out  # listed, left alone


def test_unique_safe_ids():
  names = ["a.v1", "a.v1", "A.V1", ".", "", "..", "../x", "slices.json", "a/b", "caf\udce9"]
  ids = predict_files.unique_ids(names)
  assert ids == ["a.v1", "a.v1-2", "A.V1-3", "slice", "slice-2", "slice-3", "x", "slices.json-2",
                 "a_b", "cafxe9"]
  assert all(i and "/" not in i and not i.startswith(".") for i in ids)
  assert predict_files.unique_ids(["good", "Good", "x"], occupied=["GOOD", "good-2"]) == [
      "good-3", "Good-4", "x"]


def test_input_folder_reads_nifti_in_any_case_and_names_what_it_skips(tmp_path):
  for name in ("a.nii.gz", "B.NII.GZ", "a_mask.nii.gz", "a.json", "im0001.dcm", "notes.txt",
               "b_SEG.nii.gz", "c.nii", "c_labels.nii", "c_seg.nii.gz", "d_mask.nii.gz"):
    (tmp_path / name).write_bytes(b"")
  entries, notes = predict_files.input_entries(str(tmp_path), str(tmp_path / "out"))
  assert [(name, path.name, mask and mask.name) for name, path, mask, _ in entries] == [
      ("B", "B.NII.GZ", "b_SEG.nii.gz"), ("a", "a.nii.gz", "a_mask.nii.gz"),
      ("c", "c.nii", "c_seg.nii.gz")]  # _seg ranks before _labels
  assert notes == ["skipped 4 file(s) that are not inputs: c_labels.nii, d_mask.nii.gz, "
                   "im0001.dcm, notes.txt (a DICOM series is read from its own sub-folder, a "
                   "mask beside its image; predict reads NIfTI files and such folders)"]
  for name in ("a.nii.gz", "B.NII.GZ", "a_mask.nii.gz", "b_SEG.nii.gz", "c.nii", "c_labels.nii",
               "c_seg.nii.gz", "d_mask.nii.gz"):
    (tmp_path / name).unlink()
  with pytest.raises(InputError, match=r"holds no NIfTI file .* \(skipped 2 file\(s\) that are "
                                       r"not inputs: im0001.dcm, notes.txt"):
    predict_files.input_entries(str(tmp_path), str(tmp_path / "out"))


def test_aif_series_files_beside_the_slices_are_not_read_as_slices(tmp_path):
  for name in ("mid.nii.gz", "aif.nii.gz", "aif_pd.nii.gz"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "mid.json").write_text(json.dumps(
      {"aif_series": {"file": "aif.nii.gz", "pd_file": "aif_pd.nii.gz"}}))
  entries, notes = predict_files.input_entries(str(tmp_path), str(tmp_path / "out"))
  assert [name for name, _, _, _ in entries] == ["mid"]
  assert notes == ["skipped aif.nii.gz: the AIF series of mid.nii.gz",
                   "skipped aif_pd.nii.gz: the AIF series of mid.nii.gz"]


def test_foreign_entries_are_what_no_predict_run_wrote(tmp_path):
  for name in ("a", "b", "c", "d"):
    (tmp_path / name).mkdir()
  for name in ("slices.csv", "notes.txt", ".hidden", "a/a.png", "a/um.nii.gz", "d/d.png",
               "d/keep.txt"):
    (tmp_path / name).write_text("")
  (tmp_path / "slices.json").write_text(json.dumps({"slices": [
      dict(id="a", status="ok"), dict(id="gone", status="ok"), dict(id="c", status="failed"),
      dict(id="d", status="warning")]}))
  # A failed slice has no folder: a folder of its name is the user's.
  assert predict_files.foreign_entries(str(tmp_path)) == ["b", "c", "notes.txt"]
  predict_files.clear_previous(str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "b", "c", "d", "notes.txt"]
  assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]  # only predict's files go
  assert predict_files.foreign_entries(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("how", ["file_parent", "readonly", "is_input"])
def test_unwritable_output_is_found_before_any_compute(workdir, sim, tmp_path, how, monkeypatch):
  folder = tmp_path / "in"
  _good(folder / "good.nii.gz", sim)
  if how == "file_parent":
    (tmp_path / "f").write_text("x")
    output, match = tmp_path / "f" / "out", "is a file, not a folder"
  elif how == "readonly":
    if os.geteuid() == 0:
      # root writes anywhere: the same check through a failing probe.
      def no_write(*a, **k):
        raise PermissionError(13, "Permission denied")
      monkeypatch.setattr(predict_files.tempfile, "mkstemp", no_write)
    output, match = tmp_path / "ro", "not writable"
    output.mkdir()
    output.chmod(0o500)
  else:
    output, match = folder, "the output folder is the input folder"
  called = []
  monkeypatch.setattr(predict.checkpoints, "load_params", lambda *a: called.append(a))
  with pytest.raises(InputError, match=match):
    predict.predict(_tiny_config(), str(workdir), str(folder), str(output))
  assert not called


@pytest.mark.slow
def test_segmentation_overlays_a_non_identity_affine_input_exactly(workdir, sim, tmp_path):
  """A NIfTI stored transposed and flipped with an oblique, translated affine: the
  `*_input.nii.gz` outputs have its shape and affine, and the segmentation is the crop's,
  placed back where the crop came from (the mask's round trip through the same files)."""
  image = np.concatenate([np.repeat(sim["raw"][0][..., :1], 4, -1), sim["raw"][0]], -1)
  image = image[4:120, 10:124]  # 116 x 114: the crop is padded and not centred
  times = np.concatenate([np.arange(4) * 0.8, sim["times"][0] + 3.2])
  theta = np.deg2rad(25.0)
  rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                  [0, 0, 1]])
  base = np.eye(4)
  base[:3, :3] = rot @ np.diag([-1.4, 1.4, 8.0])
  base[:3, 3] = (-40.0, 25.0, 60.0)
  ref = writers.write_nifti(tmp_path / "ref.nii.gz", image, (1.4, 1.4), times, affine=base)
  data = np.asarray(nib.load(ref).dataobj)[::-1, :, :, :].swapaxes(0, 1)  # stored [Y, X, 1, T]
  flip = np.array([[-1, 0, 0, image.shape[1] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
  swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
  affine = base @ flip @ swap
  folder = tmp_path / "in"
  folder.mkdir()
  img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
  nib.save(img, folder / "obl.nii.gz")
  (folder / "obl.json").write_text(json.dumps({"times": times.tolist()}))
  mask = np.zeros(image.shape[:2], np.int32)
  mask[np.asarray(sim["mask"][0])[4:120, 10:124] > 0] = np.asarray(sim["mask"][0])[4:120,
                                                                                  10:124][
      np.asarray(sim["mask"][0])[4:120, 10:124] > 0]
  mdata = nifti.to_nifti_axes(mask)[::-1].swapaxes(0, 1)
  nib.save(nib.Nifti1Image(np.ascontiguousarray(mdata).astype(np.int16), affine),
           folder / "obl_mask.nii.gz")
  out = tmp_path / "out"
  rows = predict.predict(_tiny_config(), str(workdir), str(folder), str(out))
  assert rows[0]["status"] in ("ok", "warning"), rows[0]
  seg_in = nib.load(out / "obl" / "segmentation_input.nii.gz")
  assert seg_in.shape == data.shape[:3]
  np.testing.assert_allclose(seg_in.affine, affine, atol=1e-4)
  probs = nib.load(out / "obl" / "probabilities_input.nii.gz")
  assert probs.shape == data.shape[:3] + (1, 4)
  # The crop file's affine puts each crop pixel on the same world point as the input voxel.
  seg_crop = nib.load(out / "obl" / "segmentation.nii.gz")
  geo = rows[0]["geometry"]
  np.testing.assert_allclose(seg_crop.affine, geo["crop_affine"], atol=1e-4)
  crop = np.asarray(seg_crop.dataobj)
  ii, jj = np.meshgrid(np.arange(crop.shape[0]), np.arange(crop.shape[1]), indexing="ij")
  world = seg_crop.affine @ np.stack([ii.ravel(), jj.ravel(), 0 * ii.ravel(), 1 + 0 * ii.ravel()])
  vox = np.linalg.solve(affine, world)[:2]
  assert np.abs(vox - vox.round()).max() < 1e-3  # the crop's pixels are the input's (1.4 mm)
  vox = vox.round().astype(int)
  inside = (vox[0] >= 0) & (vox[0] < data.shape[0]) & (vox[1] >= 0) & (vox[1] < data.shape[1])
  native = np.asarray(seg_in.dataobj)[..., 0]
  assert inside.sum() > 0.7 * crop.size
  np.testing.assert_array_equal(crop.ravel()[inside], native[vox[0][inside], vox[1][inside]])
  assert np.all(native[tuple(np.delete(np.indices(native.shape).reshape(2, -1),
                                       vox[0][inside] * native.shape[1] + vox[1][inside], 1))]
                == 0)  # 0 outside the crop
  assert geo["input_shape"] == list(image.shape[:2])
  assert rows[0]["dice"] is not None


def _with_ground_truth_masks(monkeypatch):
  """predict with the slice's own mask as the "model's" segmentation (the flow and study
  outputs are then those of known masks; the tiny untrained model segments nothing)."""
  prepare = predict.prepared
  last = {}

  def prepared(*args):
    last["s"] = prepare(*args)
    return last["s"]

  def masks_as_segmentation(model, variables, images, peak, config, **kwargs):
    del model, variables, peak, config, kwargs
    seg = np.asarray(last["s"]["mask"], np.int32)[None]
    probs = np.eye(4, dtype=np.float32)[seg]
    return dict(probs=probs, segmentation=seg, um=np.zeros(seg.shape, np.float32))

  monkeypatch.setattr(predict, "prepared", prepared)
  monkeypatch.setattr(predict, "predict_arrays", masks_as_segmentation)


def _sequence(sim, i):
  return dict(protocol=str(sim["protocol"][i]), ts=float(sim["seq_ts"][i]),
              tr=float(sim["seq_tr"][i]), flip_deg=float(sim["seq_flip_deg"][i]),
              n_pulses=int(sim["seq_n_pulses"][i]), t1_blood=float(sim["t1_blood_s"][i]),
              t2_blood=float(sim["t2_blood_s"][i]), t1_myo=float(sim["t1_myo_s"][i]),
              t2_myo=float(sim["t2_myo_s"][i]),
              sat_residual=float(sim["seq_sat_residual"][i]) if "seq_sat_residual" in sim else 0.0)


@pytest.fixture(scope="module")
def study_sim():
  """One noise-free narrow-phantom study (basal, mid, apical) without motion."""
  return phantom.simulate(3, 3, "flash", 0.0, noise=0.0, variability="narrow")


def test_flow_is_relative_without_the_sequence_and_study_bullseyes(workdir, study_sim, tmp_path,
                                                                    monkeypatch):
  """Without sequence parameters the flow is labelled relative everywhere and no MBF field
  holds it; with them (the sidecar's "sequence") it is MBF in ml/g/min, close to the truth.
  The slices of a study (the sidecar's "study") at levels from their names or the sidecar's
  "slice_level" give one AHA 16-segment row each."""
  sim = study_sim
  folder = tmp_path / "in"
  names = dict(cal=("cal_basal", "cal_mid", "cal_apical"), rel=("rel_base", "rel_mid", "rel_x"))
  for study, levels in names.items():
    for i, name in enumerate(levels):
      path = writers.write_nifti(folder / f"{name}.nii.gz", sim["raw"][i], pixel_mm=(1.4, 1.4),
                                 times=sim["times"][i])
      writers.write_nifti(folder / f"{name}_mask.nii.gz", sim["mask"][i], pixel_mm=(1.4, 1.4))
      side = sidecar.sidecar_path(path)
      meta = dict(json.loads(side.read_text()), study=f"patient-{study}")
      if study == "cal":
        meta["sequence"] = _sequence(sim, i)
      if name == "rel_x":
        meta["slice_level"] = "apical"
      side.write_text(json.dumps(meta))
  _with_ground_truth_masks(monkeypatch)
  out = tmp_path / "out"
  rows = predict.predict(_tiny_config(), str(workdir), str(folder), str(out))
  from perfjax import perfusion  # pylint: disable=g-import-not-at-top
  for r in rows:
    # A pool AIF whose conversion amplifies signal errors more than AIF_MAX_AMPLIFICATION
    # times is a warning with its note; relative flow has neither.
    amp = r["aif_amplification"]
    noted = r["flow_units"] == "ml/g/min" and amp > perfusion.AIF_MAX_AMPLIFICATION
    if r["flow_units"] == "ml/g/min":
      assert amp > 1.0, r
    else:
      assert amp is None, r
    assert (r["aif_note"] is not None) == noted, r
    assert r["status"] == ("warning" if noted else "ok"), r["error"]
    assert (r["error"] or "").endswith(r["aif_note"] or "")
  by_id = {r["id"]: r for r in rows}
  truth = [float(np.mean(sim["mbf_sector48"][i])) for i in range(3)]
  csv_rows = (out / "slices.csv").read_text().splitlines()
  header = csv_rows[0].split(",")
  csv_by_id = {line.split(",")[0]: dict(zip(header, line.split(","))) for line in csv_rows[1:]}
  for study, levels in names.items():
    for i, name in enumerate(levels):
      r, line = by_id[name], csv_by_id[name]
      assert r["study"] == line["study"] == f"patient-{study}" and r["slice_level"] == i
      if study == "cal":
        assert r["flow_units"] == "ml/g/min" and r["flow_relative"] is None
        assert r["mbf"] == pytest.approx(truth[i], rel=0.15), (name, r["mbf"], truth[i])
        assert len(r["mbf_sector48"]) == 48 and r["flow_relative_sector48"] is None
        assert r["mbf_flip_lo"] is not None and r["mbf_flip_hi"] is not None
        assert r["mbf_flip_lo"] != r["mbf"] != r["mbf_flip_hi"]
        assert line["mbf"] and line["flow_relative"] == "" and line["flow_units"] == "ml/g/min"
      else:
        # Relative (raw-signal) flow: never in an MBF field, labelled in the CSV and the JSON.
        assert r["flow_units"] == predict.RELATIVE_UNITS and "not ml/g/min" in r["flow_units"]
        assert r["mbf"] is None and r["mbf_sector48"] is None and r["mbf_flip_lo"] is None
        assert np.isfinite(r["flow_relative"]) and len(r["flow_relative_sector48"]) == 48
        assert line["mbf"] == "" and line["flow_relative"] and "relative" in line["flow_units"]
      assert r["aif_source"] == "own" and r["sector_failures"] is None
  studies = {st["study"]: st for st in json.loads((out / "studies.json").read_text())["studies"]}
  assert sorted(studies) == ["patient-cal", "patient-rel"]
  assert studies["patient-cal"]["slices"] == {"basal": "cal_basal", "mid": "cal_mid",
                                              "apical": "cal_apical"}
  assert studies["patient-rel"]["slices"] == {"basal": "rel_base", "mid": "rel_mid",
                                              "apical": "rel_x"}
  assert studies["patient-cal"]["units"] == "ml/g/min"
  assert studies["patient-rel"]["units"] == predict.RELATIVE_UNITS
  want = perfusion.aha16_mbf({i: sim["mbf_sector48"][i] for i in range(3)})
  for st in studies.values():
    assert np.isfinite(np.array(st["aha16"], np.float64)).all() and len(st["aha16"]) == 16
  np.testing.assert_allclose(studies["patient-cal"]["aha16"], want, rtol=0.25)
  # One picture per unit: MBF and relative flow never share a colour scale.
  assert (out / "bullseyes.png").stat().st_size > 0
  assert (out / "bullseyes_relative.png").stat().st_size > 0


def test_study_outputs_rules(tmp_path):
  """Segments from the right levels, a repeated level or mixed units leave a study out with a
  note, slices of unknown level are not in any study."""
  flows, rows = {}, []
  for sid, study, level, absolute, value in (
      ("a0", "A", 0, True, 1.0), ("a1", "A", 1, True, 2.0), ("a2", "A", 2, True, 3.0),
      ("b0", "B", 1, True, 1.0), ("b1", "B", 1, True, 1.0),
      ("c0", "C", 0, True, 1.0), ("c1", "C", 2, False, 1.0),
      ("d0", "D", None, False, 1.0)):
    rows.append(dict(id=sid, study=study, slice_level=level))
    flows[sid] = dict(values48=np.full(48, value), counts48=np.ones(48), absolute=absolute)
  studies, notes = predict.study_outputs(rows, flows, str(tmp_path))
  assert [s["study"] for s in studies] == ["A"]
  aha = studies[0]["aha16"]
  assert aha[:6] == [1.0] * 6 and aha[6:12] == [2.0] * 6 and aha[12:] == [3.0] * 4
  assert any("study B" in n and "more than one mid" in n for n in notes)
  assert any("study C" in n and "mix" in n for n in notes)
  assert not any("study D" in n for n in notes)
  assert json.loads((tmp_path / "studies.json").read_text())["studies"] == studies


def test_a_multi_slice_file_is_predicted_slice_by_slice(workdir, study_sim, tmp_path, monkeypatch):
  """One [X, Y, Z, T] file (and its [X, Y, Z] mask) of a study's three slices: three rows
  `<name>_slice<k>`, each read with its own times, written on its own slice of the file's
  grid, one study (the file) whose levels come from the sidecar's list."""
  sim = study_sim
  to_nifti = nifti.to_nifti_axes
  data = np.stack([to_nifti(np.asarray(sim["raw"][i])) for i in range(3)], axis=2)
  masks = np.stack([to_nifti(np.asarray(sim["mask"][i])) for i in range(3)], axis=2)
  affine = np.diag([-1.4, 1.4, 10.0, 1.0])
  affine[:3, 3] = (5.0, -7.0, 30.0)
  folder = tmp_path / "in"
  folder.mkdir()
  nib.save(nib.Nifti1Image(data.astype(np.float32), affine), folder / "rest.nii.gz")
  nib.save(nib.Nifti1Image(masks.astype(np.int16), affine), folder / "rest_mask.nii.gz")
  assert all(float(sim["seq_flip_deg"][i]) == float(sim["seq_flip_deg"][0]) for i in range(3))
  (folder / "rest.json").write_text(json.dumps(dict(
      times=[np.asarray(sim["times"][i]).tolist() for i in range(3)],
      slice_level=["basal", "mid", "apical"], sequence=_sequence(sim, 0))))
  _with_ground_truth_masks(monkeypatch)
  out = tmp_path / "out"
  rows = predict.predict(_tiny_config(), str(workdir), str(folder), str(out))
  assert [r["id"] for r in rows] == ["rest_slice1", "rest_slice2", "rest_slice3"]
  truth = [float(np.mean(sim["mbf_sector48"][i])) for i in range(3)]
  for k, r in enumerate(rows):
    assert r["status"] in ("ok", "warning") and r["dice"] == 1.0, r["error"]
    assert r["file"].endswith(f"rest.nii.gz (slice {k + 1})")
    assert r["study"] == "rest" and r["slice_level"] == k
    assert r["mbf"] == pytest.approx(truth[k], rel=0.15), (k, r["mbf"], truth[k])
    seg = nib.load(out / r["id"] / "segmentation_input.nii.gz")
    assert seg.shape == data.shape[:2] + (1,)
    np.testing.assert_allclose(seg.affine[:3, 3], (5.0, -7.0, 30.0 + 10.0 * k), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(seg.dataobj)[..., 0], masks[..., k])
  studies = json.loads((out / "studies.json").read_text())["studies"]
  assert [st["study"] for st in studies] == ["rest"]
  assert studies[0]["slices"] == {"basal": "rest_slice1", "mid": "rest_slice2",
                                  "apical": "rest_slice3"}


@pytest.mark.parametrize("sequence, problem", [
    ({"protocol": "flash"}, '"sequence" lacks ts, tr, flip_deg, n_pulses'),
    ({"protocol": "gre", "ts": 0.1, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20},
     'protocol must be "flash" or "bssfp"'),
    ({"protocol": "flash", "ts": 100, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20},
     "ts = 100 is outside"),
    ({"protocol": "flash", "ts": "x", "tr": 0.0025, "flip_deg": 12, "n_pulses": 20},
     "ts 'x' is not a number"),
    ({"protocol": "flash", "ts": True, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20},
     "ts True is not a number"),
    ({"protocol": "flash", "ts": 0.1, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20,
      "sat_residual": 1.5}, "sat_residual = 1.5 is outside [0, 0.95]"),
    ({"protocol": "flash", "ts": 0.1, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20, "te": 1},
     "unknown fields ['te']")])
def test_bad_sequence_sidecar_is_one_clear_error(tmp_path, sim, sequence, problem):
  path = _good(tmp_path / "s.nii.gz", sim)
  side = sidecar.sidecar_path(path)
  side.write_text(json.dumps(dict(json.loads(side.read_text()), sequence=sequence)))
  with pytest.raises(InputError, match=re.escape(problem)):
    sidecar.slice_metadata(path)


def test_the_sidecar_carries_the_saturations_residual():
  """A real saturation leaves some M0 (the phantom's seq_sat_residual, 0-35 %); the conversion
  needs it (without it a wide-phantom slice's MBF came out 0.84 for 3.01 ml/g/min)."""
  base = {"protocol": "flash", "ts": 0.1, "tr": 0.0025, "flip_deg": 12, "n_pulses": 20}
  assert sidecar.parse_sequence(base, "s.json")["sat_residual"] == 0.0
  assert sidecar.parse_sequence(dict(base, sat_residual=0.2), "s.json")["sat_residual"] == 0.2


def test_the_aif_series_takes_the_slices_blood_and_keeps_its_own_saturation(tmp_path):
  writers.write_nifti(tmp_path / "aif.nii.gz", np.ones((8, 8, 30), np.float32),
                      times=np.arange(30.0))
  base = {"protocol": "flash", "ts": 0.03, "tr": 0.0025, "flip_deg": 12, "n_pulses": 10}
  slice_seq = sidecar.parse_sequence(dict(base, t1_blood=1.5, t2_blood=0.2), "s.json")
  series = sidecar.parse_aif_series(
      {"file": "aif.nii.gz", "sequence": dict(base, sat_residual=0.1)}, tmp_path / "s.json",
      slice_seq)
  assert (series["sequence"]["t1_blood"], series["sequence"]["t2_blood"]) == (1.5, 0.2)
  assert series["sequence"]["sat_residual"] == 0.1
  own = sidecar.parse_aif_series({"file": "aif.nii.gz", "sequence": dict(base, t1_blood=1.7)},
                                 tmp_path / "s.json", slice_seq)
  assert own["sequence"]["t1_blood"] == 1.7 and own["sequence"]["sat_residual"] == 0.0


def test_aif_series_from_the_sidecar(study_sim, tmp_path):
  """A sidecar's "aif_series" (the dual-sequence series' file, proton-density frame and
  sequence) is read beside the slice and gives its AIF: MBF within 5 % of the truth; its
  mistakes are that file's one-line errors."""
  sim, i = study_sim, 1
  series_dir = tmp_path / "series"  # outside the input folder: not read as a slice
  series_dir.mkdir()
  _nifti(series_dir / "aif.nii.gz", sim["aif_image"][i][:, :, None], times=0)
  _nifti(series_dir / "aif29.nii.gz", sim["aif_image"][i][:, :, None, :29], times=0)
  _nifti(series_dir / "aif_pd.nii.gz", sim["aif_pd"][i], times=0)
  aif_sequence = dict(protocol="flash", ts=float(sim["aif_seq_ts"][i]),
                      tr=float(sim["aif_seq_tr"][i]), flip_deg=float(sim["aif_seq_flip_deg"][i]),
                      n_pulses=int(sim["aif_seq_n_pulses"][i]),
                      t1_blood=float(sim["t1_blood_s"][i]), t2_blood=float(sim["t2_blood_s"][i]))
  series = {"file": "../series/aif.nii.gz", "pd_file": "../series/aif_pd.nii.gz",
            "sequence": aif_sequence}
  cases = {"good": dict(sequence=_sequence(sim, i), aif_series=series),
           "no_sequence": dict(aif_series=series),
           "short": dict(sequence=_sequence(sim, i),
                         aif_series=dict(series, file="../series/aif29.nii.gz")),
           "unknown": dict(sequence=_sequence(sim, i), aif_series=dict(series, dose=2)),
           "missing": dict(sequence=_sequence(sim, i),
                           aif_series=dict(series, file="../series/none.nii.gz"))}
  folder = tmp_path / "in"
  for name, extra in cases.items():
    path = writers.write_nifti(folder / f"{name}.nii.gz", sim["raw"][i], pixel_mm=(1.4, 1.4),
                               times=sim["times"][i])
    writers.write_nifti(folder / f"{name}_mask.nii.gz", sim["mask"][i], pixel_mm=(1.4, 1.4))
    side = sidecar.sidecar_path(path)
    side.write_text(json.dumps(dict(json.loads(side.read_text()), **extra)))
  slices, failures = predict_files.read_inputs(str(folder))
  errors = {f["id"]: f["error"] for f in failures}
  assert sorted(errors) == ["missing", "no_sequence", "short", "unknown"]
  assert '"aif_series" needs the slice\'s own "sequence" too' in errors["no_sequence"]
  assert "short.nii.gz: its AIF series has 29 frames, the slice 30" in errors["short"]
  assert "has unknown fields ['dose']" in errors["unknown"]
  assert 'missing.json: "aif_series" file ../series/none.nii.gz: no such file' in errors["missing"]
  (good,) = slices
  assert good["aif_series"]["image"].shape == (32, 32, 30) and good["aif_series"]["pd"] is not None
  flow = predict.slice_flow(good, good["mask"])
  from perfjax import perfusion  # pylint: disable=g-import-not-at-top
  truth = float(perfusion.slice_mbf(sim["mbf_sector48"][i].astype(np.float64)))
  assert flow["aif_source"] == "series" and flow["flow_units"] == "ml/g/min"
  assert flow["mbf"] == pytest.approx(truth, rel=0.05)
  assert isinstance(flow["spill_sectors"], int) and 0 <= flow["spill_sectors"] <= 48
  known = set(perfusion.REASONS.values()) | {predict.EMPTY_SECTOR}
  assert set((flow["sector_failures"] or {}).values()) <= known, flow["sector_failures"]



def test_aif_note_names_a_saturated_or_near_saturated_aif_and_what_to_do():
  assert predict.aif_note(float("inf"), "own") == (
      "AIF from a slice's blood pool at or beyond the saturation of the sequence's signal: its "
      "peak concentration, and the MBF, are not determined by the images; give an AIF series "
      "(dual sequence or dual bolus, README) for absolute MBF")
  assert predict.aif_note(8.4, "study slice 0: largest clean pool (40 px)") == (
      "AIF from a slice's blood pool near saturation: 1 % of blood-signal error is 8 % of its "
      "peak concentration, so MBF is approximate; give an AIF series (dual sequence or dual "
      "bolus, README) for absolute MBF")
  assert predict.aif_note(6.0, "series").startswith("AIF from the AIF series near saturation")
  assert predict.aif_note(6.0, "series").endswith("check the series' sequence parameters")
  for ok in (1.2, 5.0, float("nan")):
    assert predict.aif_note(ok, "own") is None
