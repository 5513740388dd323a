"""The `perfusion_cmr` TFDS dataset (array_record, read without TensorFlow) and its loaders.

Configs (studies of three slices: basal, mid, apical; splits are by study, so no study
is in two splits; every split has its own fixed seed, so builds are deterministic):

  synthetic       paper size: FLASH train 80 + validation 16 studies (no motion),
                  bSSFP test 40 studies with motion_fraction 0.2.
  synthetic_cpu   the default main job: FLASH train 60 + validation 10, bSSFP test 12
                  (motion_fraction 0.25).
  synthetic_mixed real-image models on a CPU: train 60 + validation 10 studies, each
                  FLASH or bSSFP at random, rest or stress in turn; bSSFP stress test 12
                  (motion_fraction 0.25).
  synthetic_mixed_large  the released real-image model: the same with train 240 +
                  validation 30 studies (a 2.4 GB build).
  synthetic_small CI and tests: train 2, validation 1, test 2 (motion_fraction 0.5).
  manual          the user's own studies from `manual_dir`, through `perfjax.data.io`
                  and `perfjax.data.preprocess` (layout below).

Every record holds the fields of one slice that `perfjax.data.schema.RECORD` defines (names,
shapes, dtypes, fills, meanings; `ARRAYS`, `SCALARS`, `TEXTS` below are its views): the
CONVENTIONS.md arrays, the phantom's truths, sequence parameters, the study's AIF series,
`study_id` (unique across the splits of a config), `study_name`, `slice_id` (e.g.
"flash-0003/1") and `protocol`. For manual data a field the data does not know gets its
schema `fill` (NaN truths, `has_truth`/`has_aif_series`/`motion` False, `mask` -1 and
`has_mask` False for a slice without a mask), and `peak_lv_frame` is the one detected from
the images.

Manual layout (`manual_dir`): `MANUAL_LAYOUT` below.

Loaders: `load_split(config, split)` returns stacked numpy arrays (the dataset is built
on first use into `data_dir`: `$PERFJAX_DATA_DIR` or `~/.cache/perfjax/tfds`);
`source(config, split)` returns the random-access data source (`len`, `[i]`,
`__getitems__`), e.g. for grain. A build is redone when what made it changed: the
phantom's code (`phantom_fingerprint`), or for manual data the files of `manual_dir` and
the reading code (`manual_fingerprint`); one data_dir holds one manual dataset.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from perfjax import conventions
from perfjax.data import dicom
from perfjax.data import grid
from perfjax.data import io
from perfjax.data import nifti
from perfjax.data import preprocess
from perfjax.data import schema
from perfjax.data import sidecar
from perfjax.data import writers
from perfjax.errors import InputError

STUDIES_PER_CHUNK = 8  # phantom studies simulated at once while writing (bounds memory)
SPLITS = ("train", "validation", "test")

# The features of a record, by how TFDS stores them: views of `schema.RECORD` (one definition of
# the fields, shared with the phantom). name -> (shape, dtype, fill) / (dtype, fill); texts.
ARRAYS = {f.name: (f.shape, f.dtype, f.fill) for f in schema.RECORD if f.kind == "array"}
SCALARS = {f.name: (f.dtype, f.fill) for f in schema.RECORD if f.kind == "scalar"}
TEXTS = tuple(f.name for f in schema.RECORD if f.kind == "text")
_MODULE_SUMMARY = ("The `perfusion_cmr` TFDS dataset (array_record, read without TensorFlow) and "
                   "its loaders.")
MANUAL_LAYOUT = """Manual layout (`manual_dir`):

  manual_dir/
    splits.json                  optional: {"train": [study, ...], "validation": [...],
                                 "test": [...]}; without it a study goes to train,
                                 validation or test by a hash of its name (70/15/15 %)
    <study>/                     one folder per study (exam); the folder name is its id
      <slice>.nii.gz             NIfTI 2D+time image (times: <slice>.json or pixdim[4])
      <slice>_mask.nii.gz        optional mask of that slice (io.MASK_SUFFIXES)
      <slice>.npz                or numpy arrays: image, times, [mask], [pixel_mm]
      <slice>/                   or a folder of DICOM files (one per frame, or multi-frame)

A multi-slice file [X, Y, Z, T] (mask [X, Y, Z]) or DICOM series of several positions gives
the slices <slice>_slice1, ... (`perfjax.data.io.per_slice`). A slice's level is the
sidecar's "slice_level" (a list of one per slice for a multi-slice input), else 0, 1, 2 when
a one-slice input's name contains basal/base, mid or apical/apex (else -1). Images are
resampled to `target_pixel_mm` (1.4 mm), truncated to the first pass, LV-centred and cropped
to 128 x 128, and normalised (see preprocess.py).

"""


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A synthetic split: `n_studies` studies of `protocol` from the phantom with `seed`."""
  protocol: str
  n_studies: int
  motion_fraction: float
  seed: int
  study_offset: int
  stress: bool | str = True  # phantom.simulate's stress: True, False or "mixed"


@dataclasses.dataclass(eq=False)
class PerfusionConfig(tfds.core.BuilderConfig):
  """A `perfusion_cmr` config: synthetic splits, or manual data (`splits` empty)."""
  splits: tuple[tuple[str, SplitSpec], ...] = ()
  slices_per_study: int = 3
  target_pixel_mm: float = preprocess.TARGET_PIXEL_MM
  manual_fractions: tuple[float, float] = (0.7, 0.85)  # hash < 0.7 train, < 0.85 validation


def _synthetic(name, n_train, n_val, n_test, motion_test, seed, description, train="flash",
               train_stress=True):
  splits = (("train", SplitSpec(train, n_train, 0.0, seed + 1, 0, train_stress)),
            ("validation", SplitSpec(train, n_val, 0.0, seed + 2, n_train, train_stress)),
            ("test", SplitSpec("bssfp", n_test, motion_test, seed + 3, n_train + n_val)))
  return PerfusionConfig(name=name, description=description, splits=splits)


CONFIGS = (
    _synthetic("synthetic", 80, 16, 40, 0.2, 1000,
               "Paper size: FLASH 80 + 16 studies x 3 slices; bSSFP test 40 x 3."),
    _synthetic("synthetic_cpu", 60, 10, 12, 0.25, 2000,
               "CPU main job: FLASH 60 + 10 studies x 3 slices; bSSFP test 12 x 3."),
    _synthetic("synthetic_mixed", 60, 10, 12, 0.25, 4000,
               "Real-image model: FLASH or bSSFP, rest or stress studies (at random) 60 + 10 "
               "x 3 slices; bSSFP stress test 12 x 3.", train="mixed", train_stress="mixed"),
    _synthetic("synthetic_mixed_large", 240, 30, 12, 0.25, 5000,
               "Real-image model, GPU size: the wide phantom as synthetic_mixed, 240 + 30 x 3 "
               "training and validation slices; bSSFP stress test 12 x 3.", train="mixed",
               train_stress="mixed"),
    _synthetic("synthetic_small", 2, 1, 2, 0.5, 3000,
               "CI and tests: FLASH 2 + 1 studies x 3 slices; bSSFP test 2 x 3."),
    PerfusionConfig(name="manual", description="The user's own studies from manual_dir."),
)


def chunk_seed(split_seed: int, chunk: int) -> int:
  """Phantom seed of the `chunk`-th group of `STUDIES_PER_CHUNK` studies of a split."""
  return int(np.random.SeedSequence([split_seed, chunk]).generate_state(1)[0])


def _tensor(shape, dtype):
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


class PerfusionCmr(tfds.core.GeneratorBasedBuilder):
  """Perfusion CMR slices: synthetic phantom studies, or the user's own (manual)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: phantom configs and manual data."}
  BUILDER_CONFIGS = list(CONFIGS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_LAYOUT

  def __init__(self, **kwargs):
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {k: _tensor(shape, dtype) for k, (shape, dtype, _) in ARRAYS.items()}
    features.update({k: dtype for k, (dtype, _) in SCALARS.items()})
    features.update({k: tfds.features.Text() for k in TEXTS})
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description=_MODULE_SUMMARY,
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.splits:
      return {name: self._generate_examples(spec=spec) for name, spec in cfg.splits}
    root = pathlib.Path(dl_manager.manual_dir)
    assignment = manual_splits(root, cfg.manual_fractions)
    return {name: self._generate_examples(root=root, studies=studies)
            for name, studies in assignment.items() if studies}

  def _generate_examples(self, spec: SplitSpec | None = None, root: pathlib.Path | None = None,
                         studies: Sequence[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Synthetic records from the phantom (`spec`), or the manual `studies` under `root`."""
    if spec is not None:
      yield from self._generate_synthetic(spec)
    else:
      yield from self._generate_manual(root, studies)

  def _generate_synthetic(self, spec: SplitSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """Phantom studies in chunks; the next chunk is simulated while this one is written."""
    from perfjax.data import phantom  # pylint: disable=g-import-not-at-top
    per = self.builder_config.slices_per_study
    firsts = list(range(0, spec.n_studies, STUDIES_PER_CHUNK))

    def simulate(chunk):
      n = min(STUDIES_PER_CHUNK, spec.n_studies - firsts[chunk])
      return phantom.simulate(chunk_seed(spec.seed, chunk), n * per, spec.protocol,
                              spec.motion_fraction, study_offset=spec.study_offset + firsts[chunk],
                              slices_per_study=per, stress=spec.stress)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(simulate, 0)
      for chunk in range(len(firsts)):
        d = pending.result()
        if chunk + 1 < len(firsts):
          pending = pool.submit(simulate, chunk + 1)
        for i in range(len(d["image"])):
          rec = {k: d[k][i] for k in _FROM_PHANTOM}
          sid = int(d["study_id"][i])
          name = f"{spec.protocol}-{sid:04d}"
          rec.update(has_truth=True, has_mask=True, study_name=name,
                     slice_id=f"{name}/{i % per}", protocol=str(d["protocol"][i]))
          yield f"{sid:06d}-{i % per:02d}", _complete(rec, int(d["slice_level"][i]))

  def _generate_manual(self, root: pathlib.Path, studies: Sequence[str]
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
    cfg = self.builder_config
    all_studies = sorted(p.name for p in _study_dirs(root))
    for study in studies:
      sid = all_studies.index(study)
      slices = io.per_slice(_manual_slices(root / study))
      for j, (name, path, mask_path, index) in enumerate(slices):
        out = io.load_preprocessed(path, mask_path, cfg.target_pixel_mm, index)
        has_mask = out["mask"] is not None
        pixel = cfg.target_pixel_mm if out["pixel_mm"] is not None else np.nan
        rec = dict(image=out["image"], raw=out["raw"], times=out["times"],
                   mask=out["mask"] if has_mask else None, peak_lv_frame=out["peak_lv_frame"],
                   study_id=sid, has_mask=has_mask, pixel_mm=pixel, study_name=study,
                   slice_id=f"{study}/{name}", protocol="unknown")
        yield f"{study}/{j:03d}", _complete(rec, sidecar.slice_level(path, index, out["n_slices"]))


# The features a synthetic record takes from phantom.simulate (the rest are set per record).
_FROM_PHANTOM = tuple(f.name for f in schema.RECORD
                      if f.where == schema.BOTH and f.kind != "text")


def _complete(rec: dict[str, Any], level: int) -> dict[str, Any]:
  """Fills the features a record lacks with their 'unknown' values; casts dtypes."""
  out = {}
  for k, (shape, dtype, fill) in ARRAYS.items():
    v = rec.get(k)
    out[k] = np.full(shape, fill, dtype) if v is None else np.asarray(v, dtype).reshape(shape)
  for k, (dtype, fill) in SCALARS.items():
    v = rec.get(k, fill)
    if v is None:
      raise ValueError(f"record lacks {k}")  # a programming error, not bad input
    out[k] = dtype(v)
  out["slice_level"] = np.int32(level)
  for k in TEXTS:
    out[k] = str(rec[k])
  return out


# ----------------------------------------------------------------------------- manual data


def _study_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _manual_slices(study: pathlib.Path) -> list[tuple[str, pathlib.Path, pathlib.Path | None]]:
  """(name, image path, mask path or None) of each slice in a study folder, sorted."""
  out = io.slice_entries(study, npz=True)
  if not out:
    raise InputError(study, "study folder holds no slices (.nii/.nii.gz, .npz or DICOM folders)")
  return out


def manual_splits(root: str | os.PathLike, fractions: tuple[float, float] = (0.7, 0.85)
                  ) -> dict[str, list[str]]:
  """Assigns each study folder of `root` to a split: splits.json, else a hash of its name."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise InputError(root, "manual_dir not found")
  studies = [p.name for p in _study_dirs(root)]
  if not studies:
    raise InputError(root, "manual_dir holds no study folders")
  split_file = root / "splits.json"
  if split_file.exists():
    try:
      given = json.loads(split_file.read_text())
    except (OSError, ValueError) as e:
      raise InputError(split_file, f"unreadable JSON ({e})") from None
    if not isinstance(given, dict) or set(given) - set(SPLITS):
      raise InputError(split_file, f"must map some of {list(SPLITS)} to lists of study folders")
    seen: dict[str, str] = {}
    for split, names in given.items():
      for s in names:
        if s in seen:
          raise InputError(split_file, f"study {s!r} is in both {seen[s]} and {split}")
        if s not in studies:
          raise InputError(split_file, f"study {s!r} has no folder in {root}")
        seen[s] = split
    return {split: sorted(given.get(split, [])) for split in SPLITS}
  out = {split: [] for split in SPLITS}
  for s in studies:
    u = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2.0 ** 32
    out["train" if u < fractions[0] else "validation" if u < fractions[1] else "test"].append(s)
  return out


# ----------------------------------------------------------------------------- loaders


def default_data_dir() -> str:
  return os.environ.get("PERFJAX_DATA_DIR") or os.path.expanduser("~/.cache/perfjax/tfds")


def builder(config_name: str, data_dir: str | os.PathLike | None = None) -> PerfusionCmr:
  names = [c.name for c in CONFIGS]
  if config_name not in names:
    raise InputError("config_name", f"unknown perfusion_cmr config {config_name!r}; one of {names}")
  return PerfusionCmr(config=config_name, data_dir=str(data_dir or default_data_dir()))


@contextlib.contextmanager
def _lock(path: pathlib.Path, shared: bool = False) -> Iterator[None]:
  """A file lock: exclusive while building (concurrent first uses build once), shared while
  `load_split` reads (a rebuild by another process waits for the readers)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _shuffle_in_memory() -> Iterator[None]:
  """Lets TFDS order a split of any size in memory while it is written.

  Past `MAX_MEM_BUFFER_SIZE` (1 GB) TFDS spills to temporary files through `tf.io.gfile`,
  which needs TensorFlow (not a perfjax dependency): a split over 1 GB (e.g.
  `synthetic_mixed_large`'s 720 training slices, or a large manual data set) would fail.
  """
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  limit = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = sys.maxsize
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = limit


def _hash_files(files: Sequence[pathlib.Path], h=None) -> str:
  h = h or hashlib.sha256()
  for f in files:
    if f.exists():
      h.update(f.name.encode() + f.read_bytes())
  return h.hexdigest()[:16]


def phantom_fingerprint() -> str:
  """Hash of the sources of the synthetic records (phantom, schema, physics, sectors, the
  contract's constants, this)."""
  import perfjax  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(perfjax.__file__).parent
  return _hash_files(sorted(root.glob("data/_*.py")) + [
      root / "data" / "phantom.py", root / "data" / "schema.py", root / "physics.py",
      root / "sectors.py", pathlib.Path(conventions.__file__), pathlib.Path(__file__)])


def manual_fingerprint(manual_dir: str | os.PathLike) -> str:
  """Hash of a manual_dir's listing (names, sizes, mtimes) and of the reading code."""
  root = pathlib.Path(manual_dir)
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      st = p.stat()
      h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
  return _hash_files([pathlib.Path(m.__file__) for m in (io, nifti, dicom, sidecar, grid,
                                                          preprocess, conventions)]
                     + [pathlib.Path(__file__)], h)


def prepare(config_name: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> PerfusionCmr:
  """Builds the config's dataset unless already built; returns the builder.

  A build records the fingerprint of what made it beside its records (the phantom's code;
  for manual data the manual_dir's files and the reading code) and is redone when that
  changed, so a cache is never silently stale. A manual build is reused without a check
  when no manual_dir is given.
  """
  b = builder(config_name, data_dir)
  synthetic = config_name != "manual"
  if not synthetic and manual_dir is None and not b.is_prepared():
    raise InputError("manual_dir", "the manual config needs manual_dir (a folder of studies)")
  if not synthetic and manual_dir is not None and not pathlib.Path(manual_dir).is_dir():
    raise InputError(manual_dir, "manual_dir not found")
  with _lock(pathlib.Path(b.data_dir).parent / ".build.lock"):
    # A builder made before the lock would keep the (empty) info it read while another
    # process was still building: read it again now.
    b = builder(config_name, data_dir)
    stamp = pathlib.Path(b.data_dir) / "source_fingerprint.json"
    if synthetic:
      fingerprint = phantom_fingerprint()
    else:
      fingerprint = manual_fingerprint(manual_dir) if manual_dir is not None else None
    recorded = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    stale = fingerprint is not None and b.is_prepared() and recorded != fingerprint
    if stale or not b.is_prepared():
      mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if stale
              else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
      cfg = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None,
                                         download_mode=mode)
      b = builder(config_name, data_dir)
      with _shuffle_in_memory():
        b.download_and_prepare(download_config=cfg)
      writers.write_json(stamp, {"fingerprint": fingerprint})
  return b


def source(config_name: str, split: str, data_dir: str | os.PathLike | None = None,
           manual_dir: str | os.PathLike | None = None, prepared: PerfusionCmr | None = None):
  """The random-access data source of a split (`len(src)`, `src[i]`, `src.__getitems__`).

  `prepared`: a builder `prepare` returned (skips the check that the build is current).
  """
  b = prepared or prepare(config_name, data_dir, manual_dir)
  if split not in b.info.splits:
    raise InputError("split", f"{config_name} has no split {split!r}; has {sorted(b.info.splits)}")
  return b.as_data_source(split=split)


def load_split(config_name: str, split: str, data_dir: str | os.PathLike | None = None,
               keys: Sequence[str] | None = None, manual_dir: str | os.PathLike | None = None
               ) -> dict[str, np.ndarray]:
  """All records of a split as stacked numpy arrays (text as str arrays), in order.

  `keys` limits the features returned (saves memory for the big splits).
  """
  keys = list(keys) if keys is not None else list(ARRAYS) + list(SCALARS) + list(TEXTS)
  unknown = set(keys) - set(ARRAYS) - set(SCALARS) - set(TEXTS)
  if unknown:
    raise InputError("keys", f"unknown features {sorted(unknown)}")
  b = prepare(config_name, data_dir, manual_dir)
  out = {k: [] for k in keys}
  with _lock(pathlib.Path(b.data_dir).parent / ".build.lock", shared=True):
    src = source(config_name, split, data_dir, manual_dir, prepared=b)
    n = len(src)
    for start in range(0, n, 32):
      for rec in src.__getitems__(list(range(start, min(start + 32, n)))):
        for k in keys:
          out[k].append(rec[k])
  result = {}
  for k, vals in out.items():
    if k in TEXTS:
      result[k] = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in vals])
    elif k in SCALARS:
      result[k] = np.asarray(vals, SCALARS[k][0])
    else:
      result[k] = (np.stack(vals).astype(ARRAYS[k][1], copy=False) if vals
                   else np.zeros((0,) + ARRAYS[k][0], ARRAYS[k][1]))
  return result
