"""Readers (NIfTI, DICOM, npz) and atomic writers, on files the tests write; bad files."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from perfjax.data import dicom, grid, io, nifti, sidecar, writers
from perfjax.errors import InputError

H, W, T = 20, 24, 30


def _series(n_t=T, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 100, (H, W, n_t)).astype(np.float32)
  times = np.cumsum(rng.uniform(0.7, 1.0, n_t))
  return image, times - times[0]


def _mask():
  m = np.zeros((H, W), np.int32)
  m[5:15, 6:16] = 1
  m[8:12, 9:13] = 2
  m[6:14, 2:5] = 3
  return m


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_with_sidecar_times(tmp_path):
  image, times = _series()
  path = writers.write_nifti(tmp_path / "s.nii.gz", image, pixel_mm=(1.5, 1.25), times=times)
  writers.write_nifti(tmp_path / "s_mask.nii.gz", _mask(), pixel_mm=(1.5, 1.25))
  assert json.loads((tmp_path / "s.json").read_text())["times"] == pytest.approx(times.tolist())
  out = io.read_nifti(path, tmp_path / "s_mask.nii.gz")
  np.testing.assert_array_equal(out["image"], image)
  np.testing.assert_allclose(out["times"], times, atol=1e-9)
  np.testing.assert_array_equal(out["mask"], _mask())
  assert out["mask"].dtype == np.int32 and out["image"].dtype == np.float32
  assert out["pixel_mm"] == (1.5, 1.25)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.nii.gz", "s_mask.nii.gz"]


def test_nifti_orientation_is_rot90_of_the_voxel_array(tmp_path):
  # With the radiological affine (i toward the patient's left, j anterior) or no orientation at
  # all, voxel (i=2, j=Y-1) is column 2 of the TOP row as a NIfTI viewer shows the slice.
  data = np.zeros((W, H, 1, T), np.float32)
  data[2, H - 1, 0, :] = 1.0
  data[W - 1, 0, 0, :] = 2.0  # right column, bottom row
  for name, affine in [("radiological", np.diag([-1.1, 1.3, 1.0, 1.0])), ("unknown", None)]:
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((1.1, 1.3, 1.0, 0.9))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / f"{name}.nii")
    out = io.read_nifti(tmp_path / f"{name}.nii")
    assert out["image"].shape == (H, W, T)
    assert out["image"][0, 2, 0] == 1.0 and out["image"][H - 1, W - 1, 0] == 2.0
    assert out["pixel_mm"] == pytest.approx((1.3, 1.1))
    # No sidecar: uniform times from pixdim[4].
    np.testing.assert_allclose(out["times"], 0.9 * np.arange(T), rtol=1e-6)
  # The identity affine puts +i toward the patient's RIGHT: shown on the image's left.
  img = nib.Nifti1Image(data, np.diag([1.1, 1.3, 1.0, 1.0]))
  img.header.set_zooms((1.1, 1.3, 1.0, 0.9))
  nib.save(img, tmp_path / "eye.nii")
  out = io.read_nifti(tmp_path / "eye.nii")
  assert out["image"][0, W - 3, 0] == 1.0 and out["image"][H - 1, 0, 0] == 2.0


@pytest.mark.parametrize("transpose, flip_i, flip_j", [
    (False, False, False), (True, False, False), (False, True, False), (False, False, True),
    (True, True, True), (True, False, True)])
def test_nifti_affine_decides_the_display_whatever_the_storage(tmp_path, transpose, flip_i,
                                                               flip_j):
  """The same patient-space image stored with its voxel axes swapped or reversed (and the
  affine saying so) reads to the same array, and `write_on_grid` writes it back on those
  voxels with that affine."""
  image, times = _series()
  base = np.diag([-1.5, 1.25, 8.0, 1.0])
  base[:3, 3] = (10.0, -20.0, 30.0)
  ref = writers.write_nifti(tmp_path / "ref.nii.gz", image, pixel_mm=(1.25, 1.5), times=times,
                            affine=base)
  data = np.asarray(nib.load(ref).dataobj)[:, :, 0]  # [X, Y, T]
  affine = base.copy()
  if flip_i:
    data = data[::-1]
    affine = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                [0, 0, 0, 1]], float)
  if flip_j:
    data = data[:, ::-1]
    affine = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0],
                                [0, 0, 0, 1]], float)
  if transpose:
    data = np.swapaxes(data, 0, 1)
    affine = affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
  nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), tmp_path / "s.nii.gz")
  (tmp_path / "s.json").write_text(json.dumps({"times": times.tolist()}))
  out = io.read_nifti(tmp_path / "s.nii.gz")
  np.testing.assert_array_equal(out["image"], image)
  assert out["pixel_mm"] == pytest.approx((1.25, 1.5))
  seg = (image[..., 0] > 50).astype(np.int32)
  back = nib.load(writers.write_on_grid(tmp_path / "seg.nii.gz", seg, out["grid"]))
  np.testing.assert_allclose(back.affine, affine, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(back.dataobj), data[..., 0] > 50)


def test_nifti_times_from_millisecond_pixdim_and_3d_needs_a_sidecar(tmp_path):
  image, times = _series()
  img = nib.Nifti1Image(image[:, :, None, :], np.eye(4))
  img.header.set_zooms((1.0, 1.0, 1.0, 850.0))
  img.header.set_xyzt_units("mm", "msec")
  nib.save(img, tmp_path / "ms.nii")
  np.testing.assert_allclose(io.read_nifti(tmp_path / "ms.nii")["times"], 0.85 * np.arange(T),
                             rtol=1e-6)
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "three.nii")
  with pytest.raises(InputError, match="needs a JSON sidecar three.json"):
    io.read_nifti(tmp_path / "three.nii")
  (tmp_path / "three.json").write_text(json.dumps({"times": times.tolist()}))
  np.testing.assert_allclose(io.read_nifti(tmp_path / "three.nii")["times"], times, atol=1e-9)


def test_a_time_first_file_is_told_to_put_time_last(tmp_path):
  image, times = _series()
  nib.save(nib.Nifti1Image(np.moveaxis(image, -1, 0), np.eye(4)), tmp_path / "tfirst.nii.gz")
  (tmp_path / "tfirst.json").write_text(json.dumps({"times": times.tolist()}))
  with pytest.raises(InputError, match=rf"axes are \[{T}, {H}, {W}\] and the {T} frame times "
                                       r"of tfirst.json match axis 0, not the last"):
    io.read_nifti(tmp_path / "tfirst.nii.gz")
  (tmp_path / "tfirst.json").write_text(json.dumps({"times": times[:-1].tolist()}))
  with pytest.raises(InputError, match=rf"times must have shape \[{W}\]"):  # no axis matches
    io.read_nifti(tmp_path / "tfirst.nii.gz")


def _save_raw(path, data, dt=1.0):
  img = nib.Nifti1Image(data, np.eye(4))
  img.header.set_zooms((1.0,) * (data.ndim - 1) + (dt,))
  nib.save(img, path)
  return path


@pytest.mark.parametrize("data, dt, match", [
    (np.ones((H, W, 2, T), np.float32), 1.0, r"holds 2 slices: read one at a time"),
    (np.ones((H, W), np.float32), 1.0, r"\[X, Y, 1, T\]"),
    (np.ones((H, W, 1, 29), np.float32), 1.0, "29 time frames"),
    (np.full((H, W, 1, T), np.nan, np.float32), 1.0, "NaN/Inf"),
    (np.ones((H, W, 1, T), np.float32), 0.0, "no frame times"),
    (np.ones((H, W, 1, T), np.float32), 800.0, "a median spacing of 800 looks like milliseconds"),
    (np.ones((H, W, 1, T), np.float32), 0.0025, "a median frame spacing of 0.0025 s is shorter "
                                                "than a heartbeat"),
    (np.ones((H, W, 3, 1), np.float32), 1.0, r"shape \[\d+, \d+, 3, 1\] is 3 slices of one time "
                                             "frame each"),
])
def test_bad_nifti_images(tmp_path, data, dt, match):
  path = _save_raw(tmp_path / "bad.nii.gz", data, dt)
  with pytest.raises(InputError, match=match) as e:
    io.read_nifti(path)
  assert e.value.source == str(path)


def test_nifti_sidecar_problems(tmp_path):
  image, times = _series()
  path = writers.write_nifti(tmp_path / "s.nii", image, times=times)
  side = tmp_path / "s.json"
  side.write_text(json.dumps({"times": times[::-1].tolist()}))
  with pytest.raises(InputError, match="not strictly increasing"):
    io.read_nifti(path)
  side.write_text(json.dumps({"times": times[:-2].tolist()}))
  with pytest.raises(InputError, match="shape"):
    io.read_nifti(path)
  side.write_text("{not json")
  with pytest.raises(InputError, match="unreadable JSON") as e:
    io.read_nifti(path)
  assert e.value.source == str(side)
  side.write_text(json.dumps({"TriggerTimes": times.tolist()}))
  with pytest.raises(InputError, match='no "times" .*; it has \'TriggerTimes\''):
    io.read_nifti(path)
  side.write_text(json.dumps({"times": (1000 * times).tolist()}))
  with pytest.raises(InputError, match="looks like milliseconds"):
    io.read_nifti(path)
  side.write_text(json.dumps({"FrameTimesStart": (times + 5).tolist()}))
  np.testing.assert_allclose(io.read_nifti(path)["times"], times, atol=1e-9)


def test_a_4d_files_sidecar_without_times_leaves_them_to_pixdim(tmp_path):
  image, _ = _series()
  path = _save_raw(tmp_path / "s.nii.gz", image[:, :, None, :], dt=0.8)
  (tmp_path / "s.json").write_text(json.dumps({"slice_level": "mid"}))
  np.testing.assert_allclose(io.read_nifti(path)["times"], 0.8 * np.arange(T))
  assert io.slice_count(_save_raw(tmp_path / "z.nii.gz", np.ones((H, W, 3, 1), np.float32))) == 1


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_and_missing_nifti(tmp_path, suffix):
  image, times = _series()
  path = writers.write_nifti(tmp_path / f"s{suffix}", image, times=times)
  blob = path.read_bytes()
  path.write_bytes(blob[:len(blob) // 2])
  with pytest.raises(InputError, match="unreadable or truncated NIfTI") as e:
    io.read_nifti(path)
  assert e.value.source == str(path)
  with pytest.raises(InputError, match="file not found"):
    io.read_nifti(tmp_path / f"missing{suffix}")
  (tmp_path / f"junk{suffix}").write_bytes(b"hello")
  with pytest.raises(InputError, match="unreadable"):
    io.read_nifti(tmp_path / f"junk{suffix}")


@pytest.mark.parametrize("mask, match", [
    (lambda m: np.where(m == 3, 7, m), r"outside 0..3: \[7\]"),
    (lambda m: np.where(m == 1, 0, m), "no myocardium"),
    (lambda m: m[:, :-1], "does not match"),
    (lambda m: np.stack([m, m], -1), "2D mask"),
])
def test_bad_nifti_masks(tmp_path, mask, match):
  image, times = _series()
  path = writers.write_nifti(tmp_path / "s.nii.gz", image, times=times)
  m = mask(_mask())
  mpath = tmp_path / "m.nii.gz"
  nib.save(nib.Nifti1Image(nifti.to_nifti_axes(m.astype(np.int16)), np.eye(4)), mpath)
  with pytest.raises(InputError, match=match) as e:
    io.read_nifti(path, mpath)
  assert e.value.source == str(mpath)


def test_write_nifti_is_atomic(tmp_path, monkeypatch):
  image, times = _series()
  path = writers.write_nifti(tmp_path / "out.nii.gz", image, times=times)
  before = path.read_bytes()

  def broken_save(img, filename):
    with open(filename, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")

  monkeypatch.setattr(nib, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    writers.write_nifti(path, 2 * image, times=times)
  with pytest.raises(OSError, match="disk full"):
    writers.write_nifti(tmp_path / "new.nii", image)
  # The old file is intact, the new one never appeared, no temporary file is left.
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.nii.gz"]


def test_write_nifti_rejects_bad_arguments(tmp_path):
  with pytest.raises(InputError, match="must end with"):
    writers.write_nifti(tmp_path / "x.png", np.zeros((4, 4)))
  with pytest.raises(InputError, match="shape"):
    writers.write_nifti(tmp_path / "x.nii", np.zeros((2, 4, 4, 4)))
  with pytest.raises(InputError, match="strictly increasing"):
    writers.write_nifti(tmp_path / "x.nii", np.zeros((4, 4, 3)), times=[0, 1, 1])
  assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- DICOM


def _write_dicom(path, frame, instance=None, acq_time=None, trigger=None, slope=1.0,
                 intercept=0.0, position=(0.0, 0.0, 0.0), orientation=None):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = MRImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = MRImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.Rows, ds.Columns = frame.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.PixelSpacing = [1.8, 1.6]
  ds.ImagePositionPatient = list(position)
  if orientation is not None:
    ds.ImageOrientationPatient = list(orientation)
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if instance is not None:
    ds.InstanceNumber = instance
  if acq_time is not None:
    ds.AcquisitionTime = acq_time
  if trigger is not None:
    ds.TriggerTime = trigger
  ds.PixelData = frame.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def _tm(seconds):
  h, rem = divmod(seconds % 86400.0, 3600)
  m, s = divmod(rem, 60)
  return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def _dicom_folder(folder, n_t=T, acq=True, trigger="beat", instance=True, start=10 * 3600 + 5):
  folder.mkdir()
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 1000, (n_t, H, W))
  times = np.cumsum(rng.uniform(0.7, 1.0, n_t))
  names = rng.permutation(n_t)  # file names do not follow the frame order
  for k in range(n_t):
    trig = {"beat": 250.0, "cumulative": 1000.0 * times[k], None: None}[trigger]
    _write_dicom(folder / f"IM{names[k]:04d}", frames[k], instance=k + 1 if instance else None,
                 acq_time=_tm(start + times[k]) if acq else None, trigger=trig,
                 slope=0.5, intercept=-3.0)
  return frames, times - times[0]


def test_dicom_series_order_times_and_rescale(tmp_path):
  frames, times = _dicom_folder(tmp_path / "series")
  out = dicom.read_dicom_series(tmp_path / "series")
  assert out["image"].shape == (H, W, T) and out["time_tag"] == "AcquisitionTime"
  np.testing.assert_allclose(out["image"], np.moveaxis(frames, 0, -1) * 0.5 - 3.0)
  np.testing.assert_allclose(out["times"], times, atol=2e-6)
  assert out["pixel_mm"] == (1.8, 1.6)
  assert io.read_slice(tmp_path / "series")["image"].shape == (H, W, T)


def test_dicom_cumulative_trigger_time_and_midnight(tmp_path):
  _, times = _dicom_folder(tmp_path / "trig", acq=False, trigger="cumulative", instance=False)
  out = dicom.read_dicom_series(tmp_path / "trig")
  assert out["time_tag"] == "TriggerTime"
  np.testing.assert_allclose(out["times"], times, atol=1e-6)
  _, times = _dicom_folder(tmp_path / "night", start=24 * 3600 - 10.0)
  np.testing.assert_allclose(dicom.read_dicom_series(tmp_path / "night")["times"], times, atol=2e-6)


def test_dicom_without_timing_tags(tmp_path):
  _dicom_folder(tmp_path / "s", acq=False, trigger=None)
  with pytest.raises(InputError, match="no timing tags") as e:
    dicom.read_dicom_series(tmp_path / "s")
  assert e.value.source == str(tmp_path / "s")


def test_dicom_per_beat_trigger_time_is_not_a_clock(tmp_path):
  _dicom_folder(tmp_path / "s", acq=False, trigger="beat")
  with pytest.raises(InputError, match="TriggerTime does not increase"):
    dicom.read_dicom_series(tmp_path / "s")


def test_dicom_bad_files(tmp_path):
  _dicom_folder(tmp_path / "s")
  victim = sorted((tmp_path / "s").iterdir())[3]
  blob = victim.read_bytes()
  victim.write_bytes(blob[:len(blob) - 300])
  with pytest.raises(InputError, match="unreadable or truncated DICOM") as e:
    dicom.read_dicom_series(tmp_path / "s")
  assert e.value.source == str(victim)
  victim.write_text("not a dicom file")
  with pytest.raises(InputError, match="unreadable"):
    dicom.read_dicom_series(tmp_path / "s")
  with pytest.raises(InputError, match="folder not found"):
    dicom.read_dicom_series(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no DICOM files"):
    dicom.read_dicom_series(tmp_path / "empty")


def test_dicom_too_few_frames_and_two_positions(tmp_path):
  _dicom_folder(tmp_path / "short", n_t=12)
  with pytest.raises(InputError, match="12 time frames"):
    dicom.read_dicom_series(tmp_path / "short")
  _dicom_folder(tmp_path / "two")
  _write_dicom(tmp_path / "two" / "extra", np.zeros((H, W)), instance=99, acq_time=_tm(40000.0),
               position=(0.0, 0.0, 8.0))
  with pytest.raises(InputError, match="2 slice positions"):
    dicom.read_dicom_series(tmp_path / "two")


def test_multi_slice_nifti_is_read_one_slice_at_a_time(tmp_path):
  """[X, Y, Z, T] (dcm2niix's multi-slice series) and its [X, Y, Z] mask: slice k is read on
  its own, with the affine moved to it; times shared or one list per slice."""
  slices = [_series(seed=k) for k in range(3)]
  to_nifti = nifti.to_nifti_axes
  data = np.stack([to_nifti(img) for img, _ in slices], axis=2)
  affine = np.diag([-1.5, 1.25, 8.0, 1.0])
  affine[:3, 3] = (5.0, -7.0, 30.0)
  nib.save(nib.Nifti1Image(data, affine), tmp_path / "multi.nii.gz")
  masks = [np.roll(_mask(), k, axis=1) for k in range(3)]
  nib.save(nib.Nifti1Image(np.stack([to_nifti(m) for m in masks], 2).astype(np.int16), affine),
           tmp_path / "multi_mask.nii.gz")
  side = tmp_path / "multi.json"
  side.write_text(json.dumps({"times": slices[0][1].tolist()}))
  assert io.slice_count(tmp_path / "multi.nii.gz") == 3
  for k, (image, times) in enumerate(slices):
    out = io.read_nifti(tmp_path / "multi.nii.gz", tmp_path / "multi_mask.nii.gz", slice_index=k)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], masks[k])
    np.testing.assert_allclose(out["times"], slices[0][1], atol=1e-9)
    np.testing.assert_allclose(out["grid"]["affine"][:3, 3], (5.0, -7.0, 30.0 + 8.0 * k))
    assert out["grid"]["slice_axis"] and out["pixel_mm"] == (1.25, 1.5)
  side.write_text(json.dumps({"times": [t.tolist() for _, t in slices]}))  # one list per slice
  for k, (_, times) in enumerate(slices):
    np.testing.assert_allclose(io.read_nifti(tmp_path / "multi.nii.gz", slice_index=k)["times"],
                               times, atol=1e-9)
  meta = [sidecar.slice_metadata(tmp_path / "multi.nii.gz", None, k, 3) for k in range(3)]
  assert [m["study"] for m in meta] == ["multi"] * 3
  assert [m["slice_level"] for m in meta] == [-1] * 3
  side.write_text(json.dumps({"times": slices[0][1].tolist(), "slice_level": ["apical", 1, 0]}))
  assert [sidecar.slice_metadata(tmp_path / "multi.nii.gz", None, k, 3)["slice_level"]
          for k in range(3)] == [2, 1, 0]

  path = str(tmp_path / "multi.nii.gz")
  for kwargs, match in (({}, "holds 3 slices: read one at a time"),
                        (dict(slice_index=3), r"has no slice 3 \(it holds 3\)")):
    with pytest.raises(InputError, match=match) as e:
      io.read_nifti(path, **kwargs)
    assert e.value.source == path
  side.write_text(json.dumps({"times": [t.tolist() for _, t in slices[:2]]}))
  with pytest.raises(InputError, match=r'"times" holds 2 lists \(one per slice\), the image 3'):
    io.read_nifti(path, slice_index=0)
  side.write_text(json.dumps({"times": slices[0][1].tolist(), "slice_level": [0, 1]}))
  with pytest.raises(InputError, match='"slice_level" lists 2 levels, the input holds 3 slices'):
    sidecar.slice_metadata(path, None, 0, 3)
  side.write_text(json.dumps({"times": slices[0][1].tolist()}))
  writers.write_nifti(tmp_path / "flat_mask.nii.gz", _mask())
  with pytest.raises(InputError, match=r"the image holds 3 slices: expected a mask \[X, Y, 3\]"):
    io.read_nifti(path, tmp_path / "flat_mask.nii.gz", slice_index=1)
  # A one-slice file has slice 0 only; what cannot be read counts as one slice.
  image, times = slices[0]
  one = writers.write_nifti(tmp_path / "one.nii.gz", image, times=times)
  assert io.slice_count(one) == 1
  np.testing.assert_array_equal(io.read_nifti(one, slice_index=0)["image"], image)
  with pytest.raises(InputError, match=r"has no slice 1 \(it holds 1\)"):
    io.read_nifti(one, slice_index=1)
  (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
  assert io.slice_count(tmp_path / "broken.nii.gz") == 1


def test_dicom_series_of_several_positions_is_read_one_slice_at_a_time(tmp_path):
  """The slices of a multi-slice series folder come in order along the slice normal."""
  folder = tmp_path / "multi"
  folder.mkdir()
  rng = np.random.default_rng(2)
  frames = rng.integers(0, 1000, (2, T, H, W))
  times = np.cumsum(rng.uniform(0.7, 1.0, T))
  # The normal of this orientation is -z: the slice at z = 8 comes first.
  for z_index, z in enumerate((0.0, 8.0)):
    for k in range(T):
      _write_dicom(folder / f"IM{z_index}_{k:03d}", frames[z_index, k],
                   instance=z_index * T + k + 1,
                   acq_time=_tm(36000.0 + times[k] + 0.3 * z_index), position=(0.0, 0.0, z),
                   orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
  assert dicom.dicom_slice_count(folder) == io.slice_count(folder) == 2
  first, second = (dicom.read_dicom_series(folder, slice_index=k) for k in (0, 1))
  # Columns go to -y (anterior in LPS): rows flipped so that anterior is at the top.
  assert first["grid"]["layout"] == second["grid"]["layout"] == (False, True, False)
  np.testing.assert_array_equal(first["image"], np.moveaxis(frames[1], 0, -1)[::-1])
  np.testing.assert_array_equal(second["image"], np.moveaxis(frames[0], 0, -1)[::-1])
  np.testing.assert_allclose(second["times"], times - times[0], atol=2e-6)
  assert first["n_slices"] == 2 and len(first["files"]) == T
  assert first["grid"]["affine"][2, 3] == pytest.approx(8.0)
  with pytest.raises(InputError, match="series holds 2 slice positions: read one at a time"):
    dicom.read_dicom_series(folder)
  with pytest.raises(InputError, match=r"has no slice 2 \(it holds 2\)"):
    io.read_slice(folder, slice_index=2)


def test_dicom_frames_drifting_within_the_plane_are_one_slice(tmp_path):
  """Positions that move within the plane (0.3 mm a frame) and 0.5 mm along the normal: one
  slice, not one slice per frame."""
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 1000, (T, H, W))
  for k in range(T):
    _write_dicom(tmp_path / f"IM{k:03d}", frames[k], instance=k + 1, acq_time=_tm(36000.0 + k),
                 position=(0.3 * k, -0.2 * k, 0.5 * (k % 2)),
                 orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
  assert dicom.dicom_slice_count(tmp_path) == 1
  np.testing.assert_array_equal(io.read_slice(tmp_path)["image"], np.moveaxis(frames, 0, -1))


@pytest.mark.parametrize("orientation, layout", [
    ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (False, False, False)),  # axial, as displayed
    ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (False, False, True)),  # mirrored: columns to the right
    ((0.0, 1.0, 0.0, -1.0, 0.0, 0.0), (True, False, True)),  # rows to +P, columns to -L: rotated
])
def test_dicom_is_turned_to_the_display_as_the_same_series_in_nifti(tmp_path, orientation, layout):
  rng = np.random.default_rng(5)
  stored = rng.integers(0, 1000, (H, W, T))
  times = np.cumsum(rng.uniform(0.7, 1.0, T))
  (tmp_path / "dcm").mkdir()
  for k in range(T):
    _write_dicom(tmp_path / "dcm" / f"IM{k:03d}", stored[..., k], instance=k + 1,
                 acq_time=_tm(36000.0 + times[k]), orientation=orientation)
  from_dicom = io.read_slice(tmp_path / "dcm")
  affine = from_dicom["grid"]["affine"]
  img = nib.Nifti1Image(nifti.to_nifti_axes(stored.astype(np.float32)), affine)
  img.set_sform(affine, 1)
  nib.save(img, tmp_path / "same.nii.gz")
  (tmp_path / "same.json").write_text(json.dumps({"times": times.tolist()}))
  from_nifti = io.read_slice(tmp_path / "same.nii.gz")
  assert from_dicom["grid"]["layout"] == from_nifti["grid"]["layout"] == layout
  np.testing.assert_array_equal(from_dicom["image"], from_nifti["image"])
  assert from_dicom["pixel_mm"] == pytest.approx(from_nifti["pixel_mm"])
  # A mask beside the series, on the stored voxels, is turned with it.
  mask = np.zeros((H, W), np.int32)
  mask[2:5, 3:6], mask[0, 0] = 1, 2
  nib.save(nib.Nifti1Image(nifti.to_nifti_axes(mask), np.eye(4)), tmp_path / "dcm_mask.nii.gz")
  read = io.read_slice(tmp_path / "dcm", tmp_path / "dcm_mask.nii.gz")
  np.testing.assert_array_equal(read["mask"], grid.apply_layout(mask, layout))


def _enhanced_dicom(path, frames, times, positions, per_frame_groups=None):
  """An Enhanced MR Image Storage file: frames [N, H, W]; each frame's time and position in
  its per-frame functional groups, orientation, spacing and rescale shared."""
  from pydicom.sequence import Sequence  # pylint: disable=g-import-not-at-top

  def item(**fields):
    ds = Dataset()
    for k, v in fields.items():
      setattr(ds, k, v)
    return ds

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.NumberOfFrames = len(frames)
  ds.Rows, ds.Columns = frames.shape[1:]
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.SharedFunctionalGroupsSequence = Sequence([item(
      PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
      PixelMeasuresSequence=Sequence([item(PixelSpacing=[1.8, 1.6], SliceThickness=8.0)]),
      PixelValueTransformationSequence=Sequence([item(RescaleSlope=2.0, RescaleIntercept=-5.0)]))])
  groups = [item(
      FrameContentSequence=Sequence([item(FrameAcquisitionDateTime=f"20261129{_tm(36000.0 + t)}")]),
      PlanePositionSequence=Sequence([item(ImagePositionPatient=list(pos))]))
      for t, pos in zip(times, positions)]
  ds.PerFrameFunctionalGroupsSequence = Sequence(groups[:per_frame_groups])
  ds.PixelData = frames.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


def test_enhanced_multi_frame_dicom(tmp_path):
  """One Enhanced MR file holding two slice positions, their frames interleaved: each slice's
  frames, times, spacing, rescale and place come from the functional groups."""
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 1000, (T, 2, H, W))  # [time, slice, row, col]
  beat = np.cumsum(rng.uniform(0.7, 1.0, T))
  times = [beat[t] + 0.2 * z for t in range(T) for z in range(2)]
  positions = [(0.0, 0.0, 10.0 * z) for _ in range(T) for z in range(2)]
  (tmp_path / "emr").mkdir()
  _enhanced_dicom(tmp_path / "emr" / "series.dcm", pixels.reshape(2 * T, H, W), times, positions)
  assert dicom.dicom_slice_count(tmp_path / "emr") == io.slice_count(tmp_path / "emr") == 2
  for z in range(2):  # the normal is +z: slice 0 is at z = 0
    out = io.read_slice(tmp_path / "emr", slice_index=z)
    np.testing.assert_array_equal(out["image"], np.moveaxis(pixels[:, z], 0, -1) * 2.0 - 5.0)
    np.testing.assert_allclose(out["times"], beat - beat[0], atol=2e-6)
    assert out["time_tag"] == "AcquisitionDateTime" and out["pixel_mm"] == (1.8, 1.6)
    assert out["grid"]["affine"][2, 3] == pytest.approx(10.0 * z)
  (tmp_path / "one").mkdir()
  _enhanced_dicom(tmp_path / "one" / "s.dcm", pixels[:, 0], beat, [(0.0, 0.0, 0.0)] * T)
  np.testing.assert_array_equal(dicom.read_dicom_series(tmp_path / "one")["image"],
                                np.moveaxis(pixels[:, 0], 0, -1) * 2.0 - 5.0)
  _enhanced_dicom(tmp_path / "one" / "s.dcm", pixels[:, 0], beat, [(0.0, 0.0, 0.0)] * T,
                  per_frame_groups=T - 1)
  with pytest.raises(InputError, match=f"multi-frame DICOM with {T} frames but {T - 1} per-frame"):
    dicom.read_dicom_series(tmp_path / "one")


# ----------------------------------------------------------------------------- npz, dispatch


def test_npz_and_no_pickles(tmp_path):
  image, times = _series()
  np.savez(tmp_path / "s.npz", image=image, times=times + 3.0, mask=_mask(), pixel_mm=1.5)
  out = io.read_slice(tmp_path / "s.npz")
  np.testing.assert_array_equal(out["image"], image)
  np.testing.assert_allclose(out["times"], times)
  assert out["pixel_mm"] == (1.5, 1.5) and out["mask"].dtype == np.int32
  np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object), times=times)
  with pytest.raises(InputError, match="unreadable .npz"):
    io.read_npz(tmp_path / "obj.npz")
  np.savez(tmp_path / "noimg.npz", times=times)
  with pytest.raises(InputError, match="missing array 'image'"):
    io.read_npz(tmp_path / "noimg.npz")
  (tmp_path / "x.txt").write_text("x")
  with pytest.raises(InputError, match="unknown format"):
    io.read_slice(tmp_path / "x.txt")


def test_atomic_json(tmp_path):
  writers.write_json(tmp_path / "a.json", {"x": [1, 2]})
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
  with pytest.raises(TypeError):
    writers.write_json(tmp_path / "a.json", {"x": object()})
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
  assert os.listdir(tmp_path) == ["a.json"]


def test_json_is_strict_numpy_to_python_nan_and_inf_to_null(tmp_path):
  writers.write_json(tmp_path / "s.json", {"a": np.float32(0.5), "b": np.arange(2),
                                           "c": float("nan"), "d": [np.inf, np.bool_(True)],
                                           3: np.int64(7)})
  text = (tmp_path / "s.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": 0.5, "b": [0, 1], "c": None, "d": [None, True], "3": 7}


def test_load_preprocessed_and_back_to_the_input_grid(tmp_path):
  from perfjax.data import phantom, preprocess  # pylint: disable=g-import-not-at-top
  d = phantom.simulate(3, 1, "flash", 0.0)
  raw = np.concatenate([np.repeat(d["raw"][0][..., :1], 5, -1), d["raw"][0]], -1)
  small = raw[::2, ::2]  # 64 x 64 at twice the pixel size
  times = np.concatenate([np.arange(5) * 0.8, d["times"][0] + 4.0])
  writers.write_nifti(tmp_path / "s.nii.gz", small, pixel_mm=(2.8, 2.8), times=times)
  writers.write_nifti(tmp_path / "m.nii.gz", d["mask"][0][::2, ::2], pixel_mm=(2.8, 2.8))
  out = io.load_preprocessed(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")
  assert out["image"].shape == (128, 128, 30) and out["pixel_mm"] == pytest.approx((2.8, 2.8))
  assert out["zoom"] == (2.0, 2.0) and out["frame_start"] >= 2
  seg = preprocess.to_original(out["mask"], out, labels=True)
  path = writers.write_nifti(tmp_path / "seg.nii.gz", seg, pixel_mm=out["pixel_mm"])
  back = io.read_nifti_mask(path, (64, 64))
  assert np.mean(back == d["mask"][0][::2, ::2]) > 0.95


def test_slice_metadata_study_level_and_sequence(tmp_path):
  """Study: the sidecar's, else the DICOM StudyInstanceUID, else the folder; level: the
  sidecar's, else the name; the sequence only from the sidecar, checked and completed."""
  names = ("p1_basal", "Base", "mid-2", "apex", "apical3", "midline", "submid", "x")
  assert [sidecar.level_from_name(n) for n in names] == [0, 0, 1, 2, 2, 1, -1, -1]
  study = tmp_path / "patient3"
  study.mkdir()
  image, times = _series()
  path = writers.write_nifti(study / "s_mid.nii.gz", image, times=times)
  assert sidecar.slice_metadata(path) == dict(study="patient3", slice_level=1, sequence=None,
                                              aif_series=None)
  side = sidecar.sidecar_path(path)
  seq = dict(protocol="FLASH", ts=0.1, tr=0.0025, flip_deg=12, n_pulses=20)
  side.write_text(json.dumps(dict(times=list(times), study="P3", slice_level="apical",
                                  sequence=seq)))
  meta = sidecar.slice_metadata(path)
  assert meta["study"] == "P3" and meta["slice_level"] == 2
  assert meta["sequence"] == dict(protocol="flash", ts=0.1, tr=0.0025, flip_deg=12.0,
                                  n_pulses=20.0, **sidecar.SEQUENCE_DEFAULTS)
  side.write_text(json.dumps(dict(times=list(times), slice_level=5)))
  with pytest.raises(InputError, match="slice_level"):
    sidecar.slice_metadata(path)
  # A DICOM folder: its StudyInstanceUID, its own name's level, a sidecar `folder.json`.
  _dicom_folder(study / "series.basal")
  grid = io.read_slice(study / "series.basal")["grid"]
  assert sidecar.slice_metadata(study / "series.basal", grid) == dict(
      study="patient3", slice_level=0, sequence=None, aif_series=None)  # no study UID in the files
  grid = dict(grid, study="1.2.3")
  assert sidecar.slice_metadata(study / "series.basal", grid)["study"] == "1.2.3"
  (study / "series.basal.json").write_text(json.dumps(dict(study="P3b", sequence=seq)))
  meta = sidecar.slice_metadata(study / "series.basal", grid)
  assert meta["study"] == "P3b" and meta["sequence"]["protocol"] == "flash"
