"""The perfusion_cmr TFDS dataset: round trip, splits by study, determinism, manual data."""
import concurrent.futures
import fcntl
import json
import time

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from perfjax.data import datasets, nifti, phantom, schema, writers
from perfjax.errors import InputError

CONFIG = "synthetic_small"
pytestmark = pytest.mark.slow  # Dataset builds.


@pytest.fixture(scope="module")
def data_dir(small_data_dir):
  return small_data_dir  # conftest: synthetic_small, built once per session


@pytest.fixture(scope="module")
def splits(data_dir):
  return {s: datasets.load_split(CONFIG, s, data_dir) for s in datasets.SPLITS}


def _spec(split):
  return dict(datasets.CONFIGS[[c.name for c in datasets.CONFIGS].index(CONFIG)].splits)[split]


def test_round_trip_equals_the_phantom(splits):
  for split in datasets.SPLITS:
    spec = _spec(split)
    want = phantom.simulate(datasets.chunk_seed(spec.seed, 0), 3 * spec.n_studies, spec.protocol,
                            spec.motion_fraction, study_offset=spec.study_offset)
    got = splits[split]
    assert len(got["image"]) == 3 * spec.n_studies
    for key in ("image", "raw", "mask", "times", "mbf", "motion", "peak_lv_frame", "aif",
                "mbf_sector6", "mbf_sector48", "rvip", "fermi", "slice_level", "study_id",
                "seq_ts", "seq_flip_deg", "seq_n_pulses", "t1_blood_s", "pixel_mm"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split}/{key}")
      dtype = datasets.ARRAYS[key][1] if key in datasets.ARRAYS else datasets.SCALARS[key][0]
      assert got[key].dtype == dtype, key
    assert np.all(got["protocol"] == spec.protocol) and np.all(got["has_truth"])
    assert np.all(got["has_mask"])


def test_features_are_the_schema_record(tmp_path):
  """The TFDS features are schema.RECORD: names, dtypes, shapes, encodings (no build needed)."""
  features = datasets.builder(CONFIG, tmp_path).info.features
  assert sorted(features.keys()) == sorted(f.name for f in schema.RECORD)
  for f in schema.RECORD:
    feat = features[f.name]
    if f.kind == "text":
      assert isinstance(feat, tfds.features.Text), f.name
      continue
    assert isinstance(feat, tfds.features.Tensor), f.name
    assert feat.shape == f.shape and np.dtype(feat.np_dtype) == np.dtype(f.dtype), f.name
    want = tfds.features.Encoding.BYTES if f.kind == "array" else tfds.features.Encoding.NONE
    assert feat._encoding == want, f.name  # pylint: disable=protected-access
  # A synthetic record takes every shared non-text field from the phantom.
  assert set(datasets._FROM_PHANTOM) == {  # pylint: disable=protected-access
      f.name for f in schema.PHANTOM if f.where == schema.BOTH and f.kind != "text"}


def test_shapes_and_types(splits):
  d = splits["train"]
  assert d["image"].shape == (6, 128, 128, 30) and d["image"].dtype == np.float32
  assert d["mask"].shape == (6, 128, 128) and d["mask"].dtype == np.int32
  assert d["times"].shape == (6, 30) and np.all(d["times"][:, 0] == 0)
  assert d["mbf_sector48"].shape == (6, 48) and d["motion"].dtype == np.bool_
  assert d["slice_id"].tolist() == [f"flash-{s:04d}/{j}" for s in (0, 1) for j in range(3)]
  assert d["slice_level"].tolist() == [0, 1, 2, 0, 1, 2]


def test_splits_are_disjoint_by_study_and_sized(splits):
  ids = {s: set(splits[s]["study_id"].tolist()) for s in datasets.SPLITS}
  assert ids == {"train": {0, 1}, "validation": {2}, "test": {3, 4}}
  names = [n for s in datasets.SPLITS for n in splits[s]["slice_id"]]
  assert len(names) == len(set(names)) == 15
  assert set(splits["test"]["protocol"]) == {"bssfp"}
  assert set(splits["validation"]["protocol"]) == {"flash"}
  # Paper-size and CPU configs: sizes and protocols as the issue says, ids never shared.
  for cfg in datasets.CONFIGS[:2]:
    sp = dict(cfg.splits)
    spans = [set(range(s.study_offset, s.study_offset + s.n_studies)) for s in sp.values()]
    assert not (spans[0] & spans[1]) and not (spans[0] & spans[2]) and not (spans[1] & spans[2])
    assert len({s.seed for s in sp.values()}) == 3
  paper = dict(datasets.CONFIGS[0].splits)
  assert (paper["train"].n_studies, paper["validation"].n_studies, paper["test"].n_studies) == (
      80, 16, 40)
  assert paper["test"].protocol == "bssfp" and paper["test"].motion_fraction == 0.2


def _lock_is_held(path) -> bool:
  if not path.exists():
    return False
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


def test_build_is_deterministic_and_concurrent_first_uses_wait(data_dir, tmp_path):
  keys = ["image", "mask", "study_id"]
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    building = pool.submit(datasets.load_split, CONFIG, "validation", tmp_path, keys)
    lock = tmp_path / "perfusion_cmr" / CONFIG / ".build.lock"
    deadline = time.monotonic() + 60
    while not _lock_is_held(lock) and not building.done() and time.monotonic() < deadline:
      time.sleep(0.01)
    # A second first use while the build runs: it waits, then reads the finished build.
    waiting = datasets.load_split(CONFIG, "validation", tmp_path, keys)
    again = building.result()
  first = datasets.load_split(CONFIG, "validation", data_dir, keys)
  assert sorted(again) == sorted(waiting) == keys
  for k in keys:
    np.testing.assert_array_equal(again[k], first[k])
    np.testing.assert_array_equal(waiting[k], first[k])


def test_data_source_random_access(data_dir):
  src = datasets.source(CONFIG, "test", data_dir)
  assert len(src) == 6
  rec = src[4]
  assert rec["image"].shape == (128, 128, 30) and rec["slice_id"] == b"bssfp-0004/1"
  pair = src.__getitems__([0, 5])
  assert [r["slice_level"] for r in pair] == [0, 2]
  # The public TFDS entry point reads the same records (the builder is registered).
  tsrc = tfds.data_source(f"perfusion_cmr/{CONFIG}", data_dir=str(data_dir), split="test")
  np.testing.assert_array_equal(tsrc[4]["raw"], rec["raw"])


def test_loader_errors(data_dir):
  with pytest.raises(InputError, match="unknown perfusion_cmr config 'nope'"):
    datasets.load_split("nope", "train", data_dir)
  with pytest.raises(InputError, match="no split 'dev'"):
    datasets.load_split(CONFIG, "dev", data_dir)
  with pytest.raises(InputError, match="unknown features"):
    datasets.load_split(CONFIG, "train", data_dir, keys=["image", "bogus"])
  with pytest.raises(InputError, match="needs manual_dir"):
    datasets.load_split("manual", "train", data_dir)


# ----------------------------------------------------------------------------- manual data


def _phantom_slices():
  # the narrow phantom: the peak-frame detector's accuracy is pinned on it (test_preprocess)
  return phantom.simulate(5, 3, "flash", 0.0, noise=0.5, variability="narrow")


def _write_dicom_series(folder, raw, times):
  """One uint16 DICOM file per frame, with AcquisitionTime and InstanceNumber."""
  from pydicom import uid  # pylint: disable=g-import-not-at-top
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=g-import-not-at-top
  folder.mkdir()
  scaled = np.round(raw / raw.max() * 4000).astype(np.uint16)
  for k in range(raw.shape[-1]):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = uid.MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = uid.MRImageStorage, "MR"
    ds.Rows, ds.Columns = raw.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing, ds.InstanceNumber = [1.4, 1.4], k + 1
    ds.AcquisitionTime = f"1200{10 + times[k]:09.6f}"
    ds.PixelData = scaled[..., k].tobytes()
    ds.save_as(folder / f"frame{k:03d}.dcm", enforce_file_format=True)


def _expected_peak(d, j):
  """The phantom's peak frame after 6 baseline frames are added and the series truncated."""
  from perfjax.data import preprocess  # pylint: disable=g-import-not-at-top
  padded = np.concatenate([np.repeat(d["raw"][j][..., :1], 6, -1), d["raw"][j]], -1)
  return int(d["peak_lv_frame"][j]) + 6 - preprocess.first_pass_start(padded)


def _manual_dir(root, d, bad_mask=False):
  """Four studies: NIfTI with masks; NIfTI and DICOM without masks; one multi-slice NIfTI
  [X, Y, 3, T] with its mask [X, Y, 3]; npz."""
  pre = np.repeat(d["raw"][..., :1], 6, axis=-1)  # 6 extra baseline frames before the series
  times = np.concatenate([np.arange(6) * 0.8, d["times"][0] + 4.8])
  (root / "alpha").mkdir(parents=True)
  (root / "beta").mkdir()
  (root / "gamma").mkdir()
  for j, name in enumerate(("basal", "mid", "apical")):
    raw = np.concatenate([pre[j], d["raw"][j]], -1)
    writers.write_nifti(root / "alpha" / f"{name}.nii.gz", raw, pixel_mm=(1.4, 1.4), times=times)
    mask = d["mask"][j] if not (bad_mask and j == 1) else np.where(d["mask"][j] == 3, 5, 1)
    writers.write_nifti(root / "alpha" / f"{name}_mask.nii.gz", mask, pixel_mm=(1.4, 1.4))
  writers.write_nifti(root / "beta" / "slice_a.nii", np.concatenate([pre[1], d["raw"][1]], -1),
                      pixel_mm=(2.8, 2.8), times=times)
  _write_dicom_series(root / "beta" / "slice_b", np.concatenate([pre[0], d["raw"][0]], -1), times)
  np.savez(root / "gamma" / "apex.npz", image=d["raw"][2], times=d["times"][2], mask=d["mask"][2])
  (root / "delta").mkdir()
  to_nifti = nifti.to_nifti_axes
  stack = np.stack([to_nifti(np.concatenate([pre[j], d["raw"][j]], -1)) for j in range(3)], 2)
  masks = np.stack([to_nifti(d["mask"][j]) for j in range(3)], 2)
  affine = np.diag([-1.4, 1.4, 8.0, 1.0])
  nib.save(nib.Nifti1Image(stack.astype(np.float32), affine), root / "delta" / "stack.nii.gz")
  nib.save(nib.Nifti1Image(masks.astype(np.int16), affine), root / "delta" / "stack_mask.nii.gz")
  (root / "delta" / "stack.json").write_text(json.dumps(
      {"times": times.tolist(), "slice_level": ["apical", "mid", "basal"]}))
  (root / "splits.json").write_text(json.dumps({"train": ["alpha", "delta", "gamma"],
                                                "test": ["beta"]}))


def test_manual_config_ingests_user_folders(tmp_path):
  d = _phantom_slices()
  _manual_dir(tmp_path / "manual", d)
  out = datasets.load_split("manual", "train", tmp_path / "tfds", manual_dir=tmp_path / "manual")
  assert out["slice_id"].tolist() == ["alpha/apical", "alpha/basal", "alpha/mid",
                                      "delta/stack_slice1", "delta/stack_slice2",
                                      "delta/stack_slice3", "gamma/apex"]
  assert out["slice_level"].tolist() == [2, 0, 1, 2, 1, 0, 2]
  assert out["image"].shape == (7, 128, 128, 30)
  assert np.allclose(out["image"].min((1, 2, 3)), 0) and np.allclose(out["image"].max((1, 2, 3)), 1)
  assert not out["has_truth"].any() and out["has_mask"].all()
  assert np.isnan(out["mbf"]).all() and np.isnan(out["mbf_sector48"]).all()
  assert out["study_id"].tolist() == [0, 0, 0, 2, 2, 2, 3]
  # The multi-slice file's slices are the one-slice files' (same arrays, same masks).
  for k, j in ((3, 0), (4, 1), (5, 2)):
    np.testing.assert_array_equal(out["image"][k], out["image"][(1, 2, 0)[j]])
    np.testing.assert_array_equal(out["mask"][k], out["mask"][(1, 2, 0)[j]])
  # The 6 added baseline frames are cut (3 kept before arrival): the peak frame moves.
  for k, j in enumerate((2, 0, 1)):
    lv = out["mask"][k] == 2
    rows, cols = np.nonzero(lv)
    assert abs(rows.mean() - 64) < 1 and abs(cols.mean() - 64) < 1
    assert set(np.unique(out["mask"][k])) == {0, 1, 2, 3}
    assert abs(int(out["peak_lv_frame"][k]) - _expected_peak(d, j)) <= 1
  test = datasets.load_split("manual", "test", tmp_path / "tfds")
  assert test["slice_id"].tolist() == ["beta/slice_a", "beta/slice_b"]
  assert not test["has_mask"].any() and np.all(test["mask"] == -1)
  assert test["pixel_mm"].tolist() == pytest.approx([1.4, 1.4])
  # Without a mask the crop is centred on the LV found from the images (DICOM: basal slice).
  for k, j in enumerate((1, 0)):
    frame = test["raw"][k][..., test["peak_lv_frame"][k]]
    assert frame[60:68, 60:68].mean() > 0.6 * frame.max(), k
    assert abs(int(test["peak_lv_frame"][k]) - _expected_peak(d, j)) <= 1
  with pytest.raises(InputError, match="no split 'validation'"):
    datasets.load_split("manual", "validation", tmp_path / "tfds")
  # The user's folder changes: the build is redone (here: beta moves to validation).
  (tmp_path / "manual" / "splits.json").write_text(
      json.dumps({"train": ["alpha", "delta", "gamma"], "validation": ["beta"]}))
  val = datasets.load_split("manual", "validation", tmp_path / "tfds",
                            manual_dir=tmp_path / "manual", keys=["slice_id"])
  assert val["slice_id"].tolist() == ["beta/slice_a", "beta/slice_b"]


def test_manual_bad_input_names_the_file_and_leaves_nothing(tmp_path):
  _manual_dir(tmp_path / "manual", _phantom_slices(), bad_mask=True)
  with pytest.raises(InputError, match=r"mid_mask.nii.gz: mask has labels outside 0..3: \[5\]"):
    datasets.prepare("manual", tmp_path / "tfds", manual_dir=tmp_path / "manual")
  b = datasets.builder("manual", tmp_path / "tfds")
  assert not b.is_prepared()
  # No record file, no incomplete folder: only the build lock (and TFDS's .config metadata).
  leftovers = [p for p in (tmp_path / "tfds" / "perfusion_cmr" / "manual").rglob("*")
               if p.is_file() and p.name != ".build.lock"]
  assert leftovers == [], leftovers
  assert not any("incomplete" in p.name for p in (tmp_path / "tfds").rglob("*"))


def test_manual_splits_rules(tmp_path):
  with pytest.raises(InputError, match="manual_dir not found"):
    datasets.manual_splits(tmp_path / "none")
  for name in ("p01", "p02", "p03", "p04", "p05", "p06"):
    (tmp_path / name).mkdir()
  by_hash = datasets.manual_splits(tmp_path)
  assert by_hash == datasets.manual_splits(tmp_path)
  assert sorted(sum(by_hash.values(), [])) == ["p01", "p02", "p03", "p04", "p05", "p06"]
  (tmp_path / "splits.json").write_text(json.dumps({"train": ["p01"], "test": ["p01"]}))
  with pytest.raises(InputError, match="'p01' is in both train and test"):
    datasets.manual_splits(tmp_path)
  (tmp_path / "splits.json").write_text(json.dumps({"train": ["p99"]}))
  with pytest.raises(InputError, match="'p99' has no folder"):
    datasets.manual_splits(tmp_path)
  (tmp_path / "splits.json").write_text(json.dumps({"training": ["p01"]}))
  with pytest.raises(InputError, match="must map"):
    datasets.manual_splits(tmp_path)


def test_the_contracts_constants_are_part_of_both_fingerprints(tmp_path, monkeypatch):
  """A changed conventions.py (a density, a frame count) rebuilds synthetic and manual data."""
  from perfjax import conventions
  before = datasets.phantom_fingerprint(), datasets.manual_fingerprint(tmp_path)
  edited = tmp_path.parent / "conventions_edited.py"
  edited.write_text(open(conventions.__file__).read().replace("1.05", "1.06"))
  monkeypatch.setattr(conventions, "__file__", str(edited))
  after = datasets.phantom_fingerprint(), datasets.manual_fingerprint(tmp_path)
  assert after[0] != before[0] and after[1] != before[1]


def test_stale_phantom_build_is_redone(tmp_path, monkeypatch):
  datasets.prepare(CONFIG, tmp_path)
  stamp = tmp_path / "perfusion_cmr" / CONFIG / "1.0.0" / "source_fingerprint.json"
  assert json.loads(stamp.read_text())["fingerprint"] == datasets.phantom_fingerprint()
  records = next((tmp_path / "perfusion_cmr" / CONFIG / "1.0.0").glob("*train.array_record*"))
  before = records.stat().st_mtime_ns
  datasets.prepare(CONFIG, tmp_path)  # same code: reused
  assert records.stat().st_mtime_ns == before
  monkeypatch.setattr(datasets, "phantom_fingerprint", lambda: "changed")
  datasets.prepare(CONFIG, tmp_path)  # the phantom changed: rebuilt
  assert json.loads(stamp.read_text())["fingerprint"] == "changed"
  assert records.stat().st_mtime_ns != before
  assert len(datasets.source(CONFIG, "train", tmp_path)) == 6
  assert not any("incomplete" in p.name for p in tmp_path.rglob("*"))
