"""The real development set: convert it to perfjax input, and score a model on it.

The data is the public repository ``cmartin-isla/ML-perfusion``: its ``dataset/base`` and
``dataset/mid`` hold, for 40 patients, a stress (``adeno``) and a rest (``basal``) first-pass
series of a basal and a mid short-axis slice, NIfTI ``[T, 160, 160]`` (49-93 frames, 2.29 mm
pixels, not motion-corrected), each with a mask file ``*_gt`` labelled on about 17 frames
(1 myocardium, 2 LV blood pool; no RV). It has no licence: nothing of it, and nothing derived
from it per patient, is committed. This script reads it from where you fetched it and writes
only into the folder you name.

  python benchmarks/real_data.py convert --source ML-perfusion/dataset --out ~/perfusion_real
  python benchmarks/real_data.py score --data ~/perfusion_real --workdir released/patch3 \
      --json /tmp/real_scores.json
  python benchmarks/real_data.py embedded --dataset synthetic_mixed --workdir released/patch3

Fine-tuning the released model on 10 patients and scoring it on the other 30 (the masks have
no RV: training treats their background as background-or-RV,
``config.train.rv_unlabelled="auto"``). The recipe of benchmarks/RESULTS.md (fifth pass): all
10 patients train for 400 steps at a constant 5e-4, the step count chosen by 5-fold
cross-validation inside the 10 (``folds`` writes the fold folders and the final one)::

  python benchmarks/real_data.py split --data ~/perfusion_real --train 8 --validation 2
  python benchmarks/real_data.py folds --data ~/perfusion_real --out ~/perfusion_folds
  for k in 0 1 2 3 4; do   # the recipe's choice: the step of the best mean validation Dice
    PERFJAX_DATA_DIR=~/folds_tfds/$k python launch.py --config=configs/patch3.py --mode=train \
        --workdir=runs/fold$k --config.data.dataset=manual \
        --config.data.manual_dir=$HOME/perfusion_folds/fold$k --config.train.init_from=released \
        --config.train.num_steps=700 --config.train.learning_rate=5e-4 \
        --config.train.schedule=constant --config.train.warmup_steps=0 \
        --config.train.eval_every=50 --config.train.patience=100
  done
  PERFJAX_DATA_DIR=~/folds_tfds/final python launch.py --config=configs/patch3.py \
      --mode=train --workdir=runs/finetune --config.data.dataset=manual \
      --config.data.manual_dir=$HOME/perfusion_folds/final --config.train.init_from=released \
      --config.train.num_steps=400 --config.train.learning_rate=5e-4 \
      --config.train.schedule=constant --config.train.warmup_steps=0 \
      --config.train.eval_every=400
  python benchmarks/real_data.py score --data ~/perfusion_real --workdir runs/finetune \
      --split test

``convert`` writes a perfjax ``manual`` dataset folder (``<patient>/<stress|rest>_<base|mid>``
``.nii.gz``, ``_mask.nii.gz`` and the ``.json`` sidecar of frame times), which the
``manual`` TFDS config, ``--mode=predict`` and fine-tuning read as they are:

* orientation: one turn for every file (`reorient`), chosen by eye on a few patients' RV
  first-pass enhancement to put the RV on the image's left (the CONVENTIONS.md short-axis
  display). The source files are not all stored alike, though: on about 45 % of the slices
  the RV ends up on the right (70 of 159 by the RV's early enhancement, 74 of 157 by the
  released model's segmented RV, the two agreeing on 144; `predict.orientation_warning`
  flags them). Without RV labels nothing scored here uses the sectors, and Dice does not
  depend on it: mirroring those slices changes the released model's myocardium Dice by a
  paired median of 0.0004 [-0.007, 0.005] (benchmarks/RESULTS.md, 2026-11-29 afternoon);
* motion: every frame is translated so the centroid of its mask (myocardium + LV) sits where
  it is on the reference frame (ground-truth motion compensation, fine for an evaluation
  set); frames without a mask take the shift of the nearest labelled frame;
* the mask is that of the reference frame, the labelled frame of peak mean myocardial
  signal;
* frame times: one frame per heartbeat at a nominal RR of 0.8 s (stress) or 1.0 s (rest);
  the files hold none.

``score`` preprocesses each slice with perfjax's own reader and preprocessing (truncation
to 30 frames by perfjax's first-pass rule, resampling to the target pixel size, the crop at
the LV centre of the mask), segments it at stride 32 with the model of ``--workdir`` and
reports myocardium and LV Dice per slice (summaries printed; per-slice rows only into the
``--json`` file you name, outside the repository).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import sys
import time

import numpy as np
from scipy import ndimage

from perfjax.data import io as data_io
from perfjax.data import preprocess
from perfjax.data import writers
from perfjax.errors import InputError

NOMINAL_RR_S = {"stress": 0.8, "rest": 1.0}
_NAME = re.compile(r"reor_(?P<patient>\d+)_(?P<state>adeno|basal)_(?P<level>bas|mid)\.nii\.gz$")


def reorient(array_thw: np.ndarray) -> np.ndarray:
  """The files' ``[T, a, b]`` -> perfjax ``[row, col, T]``: ``out[r, c] = in[H-1-c, W-1-r]``."""
  out = np.flip(np.flip(array_thw, 1), 2)  # [T, a, b] rotated by 180 degrees
  return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))


def align_frames(image_hwt: np.ndarray, masks_hwt: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Translates every frame onto the reference frame by its mask centroid.

  Returns (aligned image [H, W, T], reference mask [H, W] int32, reference frame).
  """
  labelled = np.nonzero(masks_hwt.reshape(-1, masks_hwt.shape[-1]).max(0) > 0)[0]
  if labelled.size == 0:
    raise InputError("mask", "no labelled frame")
  myo_signal = [image_hwt[..., t][masks_hwt[..., t] == 1].mean() for t in labelled]
  ref = int(labelled[int(np.argmax(myo_signal))])
  cents = {int(t): np.array(ndimage.center_of_mass(masks_hwt[..., t] > 0)) for t in labelled}
  out = np.empty_like(image_hwt, dtype=np.float32)
  for t in range(image_hwt.shape[-1]):
    nearest = int(labelled[int(np.argmin(np.abs(labelled - t)))])
    shift = cents[ref] - cents[nearest]
    out[..., t] = ndimage.shift(image_hwt[..., t].astype(np.float32), shift, order=1,
                                mode="nearest")
  return out, masks_hwt[..., ref].astype(np.int32), ref


def convert(source: pathlib.Path, out: pathlib.Path) -> int:
  """Writes the ``manual`` dataset folder; returns the number of slices written."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  files = sorted(p for level in ("base", "mid") for p in (source / level).glob("reor_*.nii.gz")
                 if _NAME.search(p.name))
  if not files:
    raise InputError(source, "holds no reor_<patient>_<adeno|basal>_<bas|mid>.nii.gz file")
  n = 0
  for path in files:
    meta = _NAME.search(path.name)
    gt = path.with_name(path.name.replace(".nii.gz", "_gt.nii.gz"))
    if not gt.is_file():
      print(f"{path}: no mask file {gt.name}; skipped", file=sys.stderr)
      continue
    try:
      img = nib.load(str(path))
      image = reorient(np.asarray(img.dataobj, np.float32))
      masks = reorient(np.asarray(nib.load(str(gt)).dataobj).astype(np.int32))
      image, mask, _ = align_frames(image, masks)
    except Exception as e:  # pylint: disable=broad-except  # one bad file never stops the rest
      print(f"{path}: {type(e).__name__}: {e}; skipped", file=sys.stderr)
      continue
    state = "stress" if meta["state"] == "adeno" else "rest"
    level = "base" if meta["level"] == "bas" else "mid"
    zooms = img.header.get_zooms()
    pixel_mm = (float(zooms[1]), float(zooms[2]))
    times = np.arange(image.shape[-1]) * NOMINAL_RR_S[state]
    name = out / meta["patient"] / f"{state}_{level}.nii.gz"
    writers.write_nifti(name, image, pixel_mm, times=times)
    writers.write_nifti(name.with_name(f"{state}_{level}_mask.nii.gz"), mask, pixel_mm)
    n += 1
  return n


def split_patients(data: pathlib.Path, n_train: int, n_validation: int, seed: int = 0) -> dict:
  """Writes ``data/splits.json``: ``n_train`` + ``n_validation`` patients drawn with ``seed``
  for fine-tuning, every other patient in "test" (a patient's stress and rest slices stay
  together)."""
  patients = sorted(p.name for p in data.iterdir() if p.is_dir())
  order = np.random.default_rng(seed).permutation(len(patients))
  chosen = [patients[i] for i in order]
  splits = {"train": sorted(chosen[:n_train]),
            "validation": sorted(chosen[n_train:n_train + n_validation]),
            "test": sorted(chosen[n_train + n_validation:])}
  (data / "splits.json").write_text(json.dumps(splits, indent=1))
  return splits


def finetune_folds(data: pathlib.Path, out: pathlib.Path, n_folds: int = 5, seed: int = 0
                   ) -> dict[pathlib.Path, dict]:
  """Manual-dataset folders for choosing and training the fine-tuning recipe (RESULTS.md).

  From the train + validation patients of ``data/splits.json`` (the fine-tuning patients),
  writes ``out/fold<k>`` for k < ``n_folds``: every fine-tuning patient linked, the k-th share
  (shuffled with ``seed``) as validation, the rest as train; and ``out/final``: all of them as
  train and the first test patient as validation. The training loop needs a validation split;
  with ``eval_every = num_steps`` that patient is evaluated once, at the last step, and
  chooses nothing. The patients are symbolic links: nothing is copied. Returns {folder:
  its splits}.
  """
  splits = json.loads((data / "splits.json").read_text())
  patients = sorted(splits.get("train", []) + splits.get("validation", []))
  if len(patients) < n_folds or not splits.get("test"):
    raise SystemExit(f"{data / 'splits.json'}: needs >= {n_folds} train + validation patients "
                     "and a test patient (run `split` first)")
  order = list(patients)
  random.Random(seed).shuffle(order)
  shares = np.array_split(np.array(order), n_folds)
  layouts = {f"fold{k}": {"train": sorted(set(patients) - set(share)),
                          "validation": sorted(map(str, share))} for k, share in enumerate(shares)}
  layouts["final"] = {"train": patients, "validation": sorted(splits["test"])[:1]}
  written = {}
  for name, layout in layouts.items():
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for patient in layout["train"] + layout["validation"]:
      link = folder / patient
      if not link.exists():
        link.symlink_to((data / patient).resolve(), target_is_directory=True)
    (folder / "splits.json").write_text(json.dumps(layout, indent=1))
    written[folder] = layout
  return written


def slices_of(data: pathlib.Path, split: str | None = None
              ) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """(id, image, mask) of every converted slice (of ``split`` in splits.json), in name order."""
  keep = None
  if split is not None:
    keep = set(json.loads((data / "splits.json").read_text())[split])
  out = []
  for image in sorted(data.glob("*/*.nii.gz")):
    if keep is not None and image.parent.name not in keep:
      continue
    if image.name.endswith("_mask.nii.gz"):
      continue
    mask = image.with_name(image.name.replace(".nii.gz", "_mask.nii.gz"))
    out.append((f"{image.parent.name}/{image.name[:-len('.nii.gz')]}", image, mask))
  return out


def load_slices(data: pathlib.Path, centre: str = "mask", split: str | None = None
                ) -> dict[str, np.ndarray]:
  """Preprocessed slices: image [N,128,128,30], mask, peak_lv_frame and id."""
  rows: dict[str, list] = {k: [] for k in ("image", "mask", "peak_lv_frame", "id")}
  for slice_id, image_path, mask_path in slices_of(data, split):
    rec = data_io.read_slice(image_path, mask_path)
    pre = preprocess.preprocess_slice(rec["image"], rec["times"], rec["mask"], rec["pixel_mm"],
                                      source=str(image_path), centre=centre)
    for k in ("image", "mask", "peak_lv_frame"):
      rows[k].append(pre[k])
    rows["id"].append(slice_id)
  return {k: np.asarray(v) for k, v in rows.items()}


def segment(workdir: str, images_nhwt: np.ndarray, peak_lv_frame: np.ndarray,
            mirror_tta: bool = True) -> np.ndarray:
  """Stride-32 segmentation [N, H, W] by the best checkpoint of ``workdir`` (``mirror_tta``:
  each window's probabilities averaged over its four mirrorings, as config.eval does)."""
  from perfjax import checkpoints, predict  # pylint: disable=g-import-not-at-top
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  config = checkpoints.trained_config(patch3.get_config(), workdir)
  config.eval.mirror_tta = bool(mirror_tta)
  model, variables = checkpoints.load_params(config, workdir)
  out = predict.predict_arrays(model, variables, images_nhwt, peak_lv_frame, config,
                               with_um=False, desc="segment")
  return out["segmentation"]


def score(data: pathlib.Path, workdir: str, centre: str = "mask", split_name: str | None = None,
          mirror_tta: bool = True) -> dict:
  """Dice of the model of ``workdir`` on every converted slice (of a split), with summaries."""
  from perfjax import metrics  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  split = load_slices(data, centre, split_name)
  seg = segment(workdir, split["image"], split["peak_lv_frame"], mirror_tta)
  rows = []
  for i, slice_id in enumerate(split["id"]):
    gt, pred = split["mask"][i], seg[i]
    lv = gt == 2
    rows.append(dict(id=slice_id, dice_myo=metrics.dice(pred, gt, 1),
                     dice_lv=metrics.dice(pred, gt, 2),
                     lv_as_rv=bool(np.mean(pred[lv] == 3) > 0.5) if lv.any() else False))
  return dict(workdir=workdir, centre=centre, split=split_name, mirror_tta=mirror_tta,
              n=len(rows), seconds=time.time() - t0,
              summary=summarise(rows), slices=rows)


def score_embedded(dataset: str, workdir: str) -> dict:
  """Whole-slice myocardium Dice (stride 32) of ``workdir`` on the test split of an embedded
  dataset config: the released model's other target (it must not lose the phantom)."""
  from perfjax import metrics  # pylint: disable=g-import-not-at-top
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top
  split = datasets.load_split(dataset, "test", keys=("image", "mask", "peak_lv_frame", "motion"))
  seg = segment(workdir, split["image"], split["peak_lv_frame"])
  dice = np.array([metrics.dice(p, g, 1) for p, g in zip(seg, split["mask"])])
  clean = ~split["motion"]
  return dict(workdir=workdir, dataset=dataset, n=int(dice.size), mean=float(dice.mean()),
              median=float(np.median(dice)), mean_no_motion=float(dice[clean].mean()),
              n_no_motion=int(clean.sum()))


def _bootstrap_ci(values: np.ndarray, stat=np.median, n_boot: int = 2000, seed: int = 0):
  rng = np.random.default_rng(seed)
  boots = [stat(rng.choice(values, values.size)) for _ in range(n_boot)]
  return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def summarise(rows: list[dict]) -> dict:
  """Median [95 % bootstrap CI], mean, IQR of the Dice values, overall and per group."""
  out = {}
  groups = {"all": rows}
  for key in ("stress", "rest", "base", "mid"):
    groups[key] = [r for r in rows if key in r["id"].split("/")[-1]]
  for name, group in groups.items():
    if not group:
      continue
    entry = dict(n=len(group), lv_as_rv=int(sum(r["lv_as_rv"] for r in group)))
    for metric in ("dice_myo", "dice_lv"):
      v = np.array([r[metric] for r in group], np.float64)
      entry[metric] = dict(median=float(np.median(v)), ci95=_bootstrap_ci(v),
                           mean=float(v.mean()), q25=float(np.percentile(v, 25)),
                           q75=float(np.percentile(v, 75)))
    out[name] = entry
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="the repository's dataset/ -> a perfjax manual folder")
  c.add_argument("--source", required=True, type=pathlib.Path)
  c.add_argument("--out", required=True, type=pathlib.Path)
  p = sub.add_parser("split", help="choose fine-tuning patients: writes DATA/splits.json")
  p.add_argument("--data", required=True, type=pathlib.Path)
  p.add_argument("--train", type=int, default=8)
  p.add_argument("--validation", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  f = sub.add_parser("folds", help="folders for the fine-tuning recipe's cross-validation "
                     "and its final training (from DATA/splits.json)")
  f.add_argument("--data", required=True, type=pathlib.Path)
  f.add_argument("--out", required=True, type=pathlib.Path)
  f.add_argument("--folds", type=int, default=5)
  f.add_argument("--seed", type=int, default=0)
  e = sub.add_parser("embedded", help="Dice on the test split of an embedded dataset config")
  e.add_argument("--dataset", default="synthetic_mixed")
  e.add_argument("--workdir", action="append", required=True)
  s = sub.add_parser("score", help="Dice of a trained model on the converted slices")
  s.add_argument("--data", required=True, type=pathlib.Path)
  s.add_argument("--workdir", action="append", required=True,
                 help="a trained workdir (repeat to score several, e.g. seeds)")
  s.add_argument("--centre", default="mask", choices=("mask", "images"),
                 help="crop centre: the mask's LV centroid, or the LV found from the images")
  s.add_argument("--split", choices=("train", "validation", "test"),
                 help="score only the patients of this split of DATA/splits.json")
  s.add_argument("--mirror-tta", action=argparse.BooleanOptionalAction, default=True,
                 help="average each window over its four mirrorings (config.eval.mirror_tta, "
                 "on by default)")
  s.add_argument("--json", type=pathlib.Path, help="per-slice rows (keep it outside the repo)")
  args = parser.parse_args(argv)
  if args.command == "convert":
    n = convert(args.source, args.out)
    print(f"{n} slices written to {args.out}")
    return 0
  if args.command == "embedded":
    for w in args.workdir:
      print(json.dumps(score_embedded(args.dataset, w)))
    return 0
  if args.command == "split":
    splits = split_patients(args.data, args.train, args.validation, args.seed)
    print({k: len(v) for k, v in splits.items()}, "patients; written to", args.data / "splits.json")
    return 0
  if args.command == "folds":
    for folder, layout in finetune_folds(args.data, args.out, args.folds, args.seed).items():
      print(folder, layout)
    return 0
  results = [score(args.data, w, args.centre, args.split, args.mirror_tta) for w in args.workdir]
  for r in results:
    a = r["summary"]["all"]
    print(f"{r['workdir']}: n={a['n']} myocardium Dice median {a['dice_myo']['median']:.3f} "
          f"[{a['dice_myo']['ci95'][0]:.3f}, {a['dice_myo']['ci95'][1]:.3f}] mean "
          f"{a['dice_myo']['mean']:.3f}; LV Dice median {a['dice_lv']['median']:.3f}; LV as RV "
          f"{a['lv_as_rv']}; " + ", ".join(
              f"{g} {v['dice_myo']['median']:.3f}" for g, v in r["summary"].items() if g != "all"))
  if args.json:
    args.json.write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
