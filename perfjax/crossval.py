"""Table 1 on real images: cross-validation over patient folds of a `manual` dataset.

The labelled slices of `config.base.data.manual_dir` are divided into `crossval.folds` folds by
patient (the study folder: every slice of a patient, stress and rest, basal and mid, is in one
fold). For each fold, the networks of `crossval.networks` (patch2/patch3 x conventional/
advanced, and ``patch3_finetuned``: the released model fine-tuned) train on the other folds'
patients (`crossval.validation_patients` of them choose the checkpoint) and are scored on the
fold's patients. Masks without an RV train as partial labels (`config.train.rv_unlabelled`).

Per slice (stride-32 segmentation): whole-slice myocardium and LV Dice; 6- and 12-sector
myocardium Dice only where the RV insertion points can be found from the prediction (the
ground truth has no RV: both masks are divided by the prediction's septal angle, each about
its own LV centre; other slices have no sector Dice, and the table says how many do); 1 - U
from `perfjax.evaluate` (results.json), the softmax entropy score and the baseline scores of
`config.eval.baselines`.

  WORKDIR/folds.json                      patients of every fold (checked on resume)
  WORKDIR/fold<k>/<network>/              the run: checkpoints, results.json, report
  WORKDIR/fold<k>/<network>/crossval.json its per-slice scores; marks the run finished
  WORKDIR/crossval.json, crossval.md      mean and spread over folds, OOD, the verdicts

A finished run is skipped, an unfinished one resumes (training resumes from its checkpoint).
A claim is judged on the per-fold paired differences, as `perfjax.reproduce` does over seeds:
a difference within the fold spread is not a finding. OOD: how well a low score predicts a
poor segmentation (myocardium Dice < `crossval.poor_dice`), pooled over the folds' slices,
AUC with a 95 % bootstrap interval over patients.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import ml_collections
import numpy as np

from perfjax import frame_motion
from perfjax import metrics
from perfjax import reporting
from perfjax import reproduce
from perfjax import sectors
from perfjax import uncertainty
from perfjax.data import writers
from perfjax.conventions import LV_BLOOD_POOL, MYOCARDIUM, PAPER_OOD_SCORE, STANDARD_SEPTAL_ANGLE
from perfjax.errors import InputError

NETWORKS = ("patch2_conventional", "patch2_advanced", "patch3_conventional", "patch3_advanced",
            "patch3_finetuned")
DICE_KEYS = ("dice_myo", "dice_lv", "sector6", "sector12")
# Names of the OOD scores in crossval.md; any other is a baseline's 1 - U.
SCORE_LABELS = {PAPER_OOD_SCORE: "1 - U (paper)", uncertainty.ENTROPY_SCORE: "1 - softmax entropy",
                uncertainty.ENSEMBLE_ENTROPY_SCORE: "1 - ensemble entropy",
                uncertainty.ENSEMBLE_MI_SCORE: "1 - ensemble mutual information",
                frame_motion.FRAME_MOTION_SCORE: "- frame-to-frame motion (px)"}


# ------------------------------------------------------------------------------------- folds


def patient_folds(patients, n_folds: int, seed: int) -> dict[str, int]:
  """patient -> fold (0..n_folds-1): a seeded shuffle dealt round-robin (sizes differ by <= 1)."""
  patients = sorted(set(patients))
  if n_folds < 2 or len(patients) < n_folds:
    raise InputError("crossval.folds", f"{n_folds} folds need at least 2 folds and as many "
                     f"patients; the data has {len(patients)} patients")
  order = np.random.default_rng(seed).permutation(len(patients))
  return {patients[i]: int(k % n_folds) for k, i in enumerate(order)}


def fold_patients(folds: dict[str, int], fold: int, n_validation: int, seed: int
                  ) -> dict[str, list[str]]:
  """train / validation / test patients of `fold`: test is the fold, validation a seeded draw
  of `n_validation` patients of the other folds, train the rest."""
  test = sorted(p for p, k in folds.items() if k == fold)
  others = sorted(p for p, k in folds.items() if k != fold)
  if not 0 < n_validation < len(others):
    raise InputError("crossval.validation_patients", f"{n_validation}: must leave patients to "
                     f"train on ({len(others)} outside fold {fold})")
  chosen = set(np.random.default_rng([seed, fold]).choice(others, n_validation, replace=False))
  return dict(train=[p for p in others if p not in chosen], validation=sorted(chosen), test=test)


def subset(data: dict[str, np.ndarray], patients) -> dict[str, np.ndarray]:
  """The slices of `data` whose patient (study_name) is one of `patients`, in data order."""
  keep = np.isin(data["study_name"], list(patients))
  return {k: v[keep] for k, v in data.items()}


def load_labelled_slices(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Every slice with a mask of the manual dataset (all of its splits), as `load_split` gives."""
  from perfjax.data import datasets  # pylint: disable=g-import-not-at-top  (TFDS: slow import)
  data = config.data
  if data.dataset != "manual" or not data.get("manual_dir"):
    raise InputError("config.base.data", "cross-validation needs dataset='manual' and "
                     "manual_dir (a folder of patients' studies)")
  b = datasets.prepare("manual", data.data_dir, data.manual_dir)
  parts = [datasets.load_split("manual", s, data.data_dir) for s in datasets.SPLITS
           if s in b.info.splits]
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  listed = {p.name for p in pathlib.Path(data.manual_dir).iterdir()
            if p.is_dir() and not p.name.startswith(".")}
  left_out = sorted(listed - set(out["study_name"]))
  if left_out:
    print(f"{len(left_out)} patient folders are in no split of splits.json and are left out",
          flush=True)
  unlabelled = int((~out["has_mask"]).sum())
  if unlabelled:
    print(f"{unlabelled} slices without a mask are left out", flush=True)
  return {k: v[out["has_mask"]] for k, v in out.items()}


# ----------------------------------------------------------------------------------- networks


def network_config(config: ml_collections.ConfigDict, network: str) -> ml_collections.ConfigDict:
  """The training config of `network` ("<input>_<augmentation>" or "patch3_finetuned")."""
  input_kind, _, kind = network.partition("_")
  if network not in NETWORKS:
    raise InputError("crossval.networks", f"unknown network {network!r}; one of {NETWORKS}")
  run = ml_collections.ConfigDict(config.base.to_dict())
  run.input = input_kind
  run.eval.ood_labels, run.eval.patch2_workdir = "motion", None
  # Masks without RV: a network may predict no RV, so U's sectors need a fallback orientation.
  run.eval.u_fallback_septal_angle = STANDARD_SEPTAL_ANGLE
  if kind == "finetuned":
    cv = config.crossval
    run.augment.mode = "advanced"
    run.train.init_from = cv.fine_tune_from
    run.train.num_steps, run.train.learning_rate = cv.fine_tune_steps, cv.fine_tune_learning_rate
    run.train.warmup_steps = 0
    run.train.eval_every = run.train.checkpoint_every = max(1, cv.fine_tune_steps // 8)
  else:
    run.augment.mode = kind
  return run


# ------------------------------------------------------------------------------ slice scores


def prediction_sector_dice(pred: np.ndarray, gt: np.ndarray, n_radial: int
                           ) -> tuple[float, str | None]:
  """Mean 6 x n_radial-sector myocardium Dice with the prediction's RV insertion points.

  Both masks are divided by the prediction's septal angle, each about its own LV centre (a
  ground truth without an RV has no angle of its own). NaN and the reason when the prediction
  has no RV insertion points (or no LV).
  """
  try:
    theta_s = sectors.septal_angle(pred, source="prediction")
    maps = [sectors.sector_map(m, 6, n_radial, theta_s=theta_s, source=name)
            for m, name in ((pred, "prediction"), (gt, "ground truth"))]
  except InputError as err:
    return float("nan"), str(err)
  per = [metrics.dice_sets(maps[0] == s, maps[1] == s) for s in range(1, 6 * n_radial + 1)]
  return float(np.mean(per)), None


def slice_rows(segmentation, split: dict, one_minus_u, others: dict,
               u_sectors_from=None) -> list[dict]:
  """Per slice: id, patient, Dice (myocardium, LV, prediction-RVIP sectors) and the scores:
  "U" is 1 - U of `perfjax.evaluate`, the others by name (`perfjax.ood.other_scores`: the
  entropy score and each baseline's 1 - U; low = uncertain); where U's sectors came from
  (`uncertainty.slice_uncertainty`'s sectors_from)."""
  u_sectors_from = u_sectors_from or [None] * len(segmentation)
  rows = []
  for i, (pred, gt) in enumerate(zip(segmentation, np.asarray(split["mask"]))):
    s6, problem = prediction_sector_dice(pred, gt, 1)
    s12, _ = prediction_sector_dice(pred, gt, 2)
    rows.append(dict(id=str(split["slice_id"][i]), patient=str(split["study_name"][i]),
                     dice_myo=metrics.dice(pred, gt, MYOCARDIUM),
                     dice_lv=metrics.dice(pred, gt, LV_BLOOD_POOL), sector6=s6, sector12=s12,
                     sector_problem=problem, u_sectors_from=u_sectors_from[i],
                     scores={PAPER_OOD_SCORE: _score(one_minus_u[i]),
                             **{k: _score(v[i]) for k, v in others.items()}}))
  return rows


def _score(value) -> float:
  """A 1 - U score; null in results.json is -inf (uncertain by definition: a sector without
  segmented myocardium)."""
  return float("-inf") if value is None or not np.isfinite(value) else float(value)


def score_run(run_config: ml_collections.ConfigDict, run_dir: str, split: dict) -> list[dict]:
  """The slice rows of a trained and evaluated run on its test split."""
  from perfjax import checkpoints, ood, predict  # pylint: disable=g-import-not-at-top
  trained = checkpoints.trained_config(run_config, run_dir)
  model, variables = checkpoints.load_params(trained, run_dir, "best")
  pred = predict.predict_arrays(model, variables, split["image"], split["peak_lv_frame"],
                                trained, with_um=False, desc="segment")
  with open(os.path.join(run_dir, "results.json")) as f:
    evaluated = json.load(f)["slices"]
  others = ood.other_scores(model, variables, split, pred, trained)  # entropy and baselines
  return slice_rows(pred["segmentation"], split, [s["one_minus_U"] for s in evaluated], others,
                    [s.get("u_sectors_from") for s in evaluated])


def run_fold_network(config: ml_collections.ConfigDict, run_dir: str, network: str,
                     data: dict[str, dict]) -> dict:
  """Trains (or resumes), evaluates and scores one network of one fold; writes crossval.json."""
  from perfjax import evaluate, train  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  run_cfg = network_config(config, network)
  summary = train.train(run_cfg, run_dir, data={k: data[k] for k in ("train", "validation")})
  if not os.path.isfile(os.path.join(run_dir, "results.json")):
    evaluate.evaluate(run_cfg, run_dir, split_name="test", split=data["test"],
                      n_panels=config.n_panels)
  out = dict(network=network, slices=score_run(run_cfg, run_dir, data["test"]),
             steps=summary["step"], steps_per_second=summary["steps_per_second"],
             seconds=time.time() - t0)
  writers.write_json(os.path.join(run_dir, "crossval.json"), out)
  return out


def _check_folds(workdir: str, folds: dict) -> None:
  path = os.path.join(workdir, "folds.json")
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != folds:
      raise InputError(path, "holds other folds (the data or crossval.folds/seed/"
                       "validation_patients changed): use a new workdir")
  else:
    writers.write_json(path, folds)


def run_all(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every (fold, network) missing in `workdir`, then writes crossval.json and .md."""
  cv = config.crossval
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data = load_labelled_slices(config.base)
  by_patient = patient_folds(data["study_name"], cv.folds, cv.seed)
  plan = {f"fold{k}": fold_patients(by_patient, k, cv.validation_patients, cv.seed)
          for k in range(cv.folds)}
  _check_folds(workdir, plan)
  print(f"{len(data['image'])} labelled slices of {len(by_patient)} patients, {cv.folds} folds "
        f"x {len(cv.networks)} networks", flush=True)
  runs, total, done = {}, cv.folds * len(cv.networks), 0
  for fold, patients in plan.items():
    split = {name: subset(data, p) for name, p in patients.items()}
    for network in cv.networks:
      run_dir = os.path.join(workdir, fold, network)
      marker = os.path.join(run_dir, "crossval.json")
      done += 1
      if os.path.isfile(marker):  # kept only when these settings made it
        from perfjax import train  # pylint: disable=g-import-not-at-top  (as run_fold_network)
        train.resumable_config(network_config(config, network), run_dir)
        with open(marker) as f:
          runs[(fold, network)] = json.load(f)
        continue
      print(f"== {fold} {network} ({done} of {total}; test: {len(split['test']['image'])} "
            f"slices of {len(patients['test'])} patients)", flush=True)
      runs[(fold, network)] = run_fold_network(config, run_dir, network, split)
      mean = np.mean([r["dice_myo"] for r in runs[(fold, network)]["slices"]])
      print(f"   {fold} {network}: myocardium Dice {mean:.3f} "
            f"({runs[(fold, network)]['seconds']:.0f} s)", flush=True)
  summary = summarize(runs, cv.poor_dice, cv.bootstrap, cv.seed)
  summary["synthetic"] = synthetic_table(cv.get("synthetic_reproduce"))
  summary["setup"] = dict(patients=len(by_patient), slices=int(len(data["image"])),
                          validation_patients=cv.validation_patients,
                          num_steps=config.base.train.num_steps,
                          features=config.base.model.features,
                          fine_tune_steps=cv.fine_tune_steps)
  writers.write_json(os.path.join(workdir, "crossval.json"), summary)
  reporting.write_markdown(os.path.join(workdir, "crossval.md"), report_markdown(summary))
  print(f"wrote {os.path.join(workdir, 'crossval.md')}", flush=True)
  return summary


# ------------------------------------------------------------------------------- aggregation


def fold_means(runs: dict) -> dict[str, dict[str, dict[str, float]]]:
  """network -> Dice key -> fold -> mean over the fold's slices (sectors: measurable ones)."""
  out: dict = {}
  for (fold, network), run in sorted(runs.items()):
    for key in DICE_KEYS:
      v = np.array([np.nan if s[key] is None else s[key] for s in run["slices"]], np.float64)
      out.setdefault(network, {}).setdefault(key, {})[fold] = (
          float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"))
  return out


def paired(means: dict, a: str, b: str, key: str) -> list[float]:
  """means[a][key] - means[b][key] for every fold that has both networks."""
  if a not in means or b not in means:
    return []
  return [means[a][key][f] - means[b][key][f] for f in sorted(means[a][key])
          if f in means[b][key]]


def claims(means: dict) -> list[dict]:
  """The paper's claims, and the fine-tuned row against training from scratch, judged on
  per-fold paired differences (reproduce.verdict)."""
  out = []
  for key in DICE_KEYS:
    for aug in ("conventional", "advanced"):
      out.append(dict(claim=f"patch3 > patch2 ({aug} augmentation), {key}", **reproduce.verdict(
          paired(means, f"patch3_{aug}", f"patch2_{aug}", key), unit="fold")))
    for inp in ("patch2", "patch3"):
      out.append(dict(claim=f"advanced > conventional ({inp}), {key}", **reproduce.verdict(
          paired(means, f"{inp}_advanced", f"{inp}_conventional", key), unit="fold")))
    # Not the paper's: does starting from the released (synthetic-only) model help?
    out.append(dict(claim=f"fine-tuned released > patch3 advanced from scratch, {key}",
                    **reproduce.verdict(paired(means, "patch3_finetuned", "patch3_advanced", key),
                                        unit="fold")))
  return out


def bootstrap_auc(scores, poor, patients, n_boot: int, seed: int) -> list[float]:
  """95 % interval of the AUC over `n_boot` resamplings of patients (all of a patient's slices
  together); draws with one class only are skipped."""
  scores, poor, patients = np.asarray(scores), np.asarray(poor, bool), np.asarray(patients)
  ids = np.unique(patients)
  rows = [np.nonzero(patients == p)[0] for p in ids]
  rng = np.random.default_rng(seed)
  aucs = []
  for _ in range(n_boot):
    take = np.concatenate([rows[i] for i in rng.integers(0, len(ids), len(ids))])
    if 0 < poor[take].sum() < take.size:
      aucs.append(uncertainty.auc(scores[take], poor[take]))
  if not aucs:
    return [float("nan"), float("nan")]
  return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


def ood_table(runs: dict, network: str, poor_dice: float, n_boot: int, seed: int) -> dict:
  """score -> AUC of predicting myocardium Dice < poor_dice (low score = poor), pooled over
  the folds' slices, with n, the number of poor slices and the patient-bootstrap interval."""
  rows = [s for (_, net), run in sorted(runs.items()) if net == network for s in run["slices"]]
  if not rows:
    return {}
  poor = np.array([r["dice_myo"] < poor_dice for r in rows])
  patients = [r["patient"] for r in rows]
  out = {}
  # Scores every run has (runs evaluated by an older perfjax lack the newer scores).
  for name in [n for n in rows[0]["scores"] if all(n in r["scores"] for r in rows)]:
    # -inf (uncertain by definition) reads back from JSON as null: _score restores it.
    scores = np.array([_score(r["scores"][name]) for r in rows], np.float64)
    entry = dict(n=len(rows), n_poor=int(poor.sum()), auc=float("nan"),
                 ci95=[float("nan"), float("nan")])
    if 0 < poor.sum() < poor.size:
      entry.update(auc=uncertainty.auc(scores, poor),
                   ci95=bootstrap_auc(scores, poor, patients, n_boot, seed))
    out[name] = entry
  return out


def summarize(runs: dict, poor_dice: float = 0.7, n_boot: int = 2000, seed: int = 0) -> dict:
  """Mean and spread over folds per network, sector coverage, OOD and the verdicts.

  `runs`: (fold, network) -> the run's crossval.json.
  """
  means = fold_means(runs)
  networks = {}
  for network, by_key in means.items():
    slices = [s for (_, net), run in runs.items() if net == network for s in run["slices"]]
    inp, _, kind = network.partition("_")
    networks[network] = dict(
        input=inp, augment=kind, folds=sorted(by_key["dice_myo"]), n_slices=len(slices),
        n_sectors=int(sum(s["sector_problem"] is None for s in slices)),
        n_u_fallback=int(sum(s.get("u_sectors_from") == "fallback" for s in slices)),
        paper=dict(zip(reproduce.DICE_COLUMNS, reproduce.PAPER_TABLE1.get((inp, kind), ()))),
        ood=ood_table(runs, network, poor_dice, n_boot, seed),
        **{key: reproduce.spread(list(by_key[key].values())) for key in DICE_KEYS})
  seconds = [r.get("seconds") for r in runs.values() if r.get("seconds")]
  return dict(folds=sorted({f for f, _ in runs}), networks=networks, claims=claims(means),
              poor_dice=poor_dice, run_seconds=dict(total=float(np.sum(seconds)) if seconds
                                                    else None, runs=len(seconds)))


def synthetic_table(path: str | None) -> dict:
  """network -> whole-slice Dice (mean, sd) of a `--mode=reproduce` reproduce.json, if given."""
  if not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    nets = json.load(f)["networks"]
  return {name: n["dice.whole"] for name, n in nets.items()}


# ---------------------------------------------------------------------------------- report


def _ms(stat: dict | None) -> str:
  if not stat or not reproduce.is_number(stat.get("mean")):
    return "n/a"
  sd = stat.get("sd")
  return f"{stat['mean']:.3f}" + (f" ± {sd:.3f}" if reproduce.is_number(sd) else "")


def _auc(entry: dict | None) -> str:
  if not entry or not np.isfinite(entry.get("auc", np.nan)):
    return "n/a"
  lo, hi = entry["ci95"]
  return f"{entry['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def report_markdown(summary: dict) -> str:
  """crossval.md: Table 1 on real images (mean ± sd over folds), OOD, the verdicts."""
  nets, folds = summary["networks"], summary["folds"]
  synthetic = summary.get("synthetic") or {}
  lines = [
      "# Table 1 on real images: cross-validation by patient", "",
      f"{len(folds)} folds by patient (stress and rest of a patient in one fold); mean ± sd "
      "over the folds of each fold's mean. Sector Dice only on the slices where the prediction "
      "has RV insertion points (the masks have no RV): both masks are divided by the "
      "prediction's septal angle; the column 'sectors' counts those slices.", ""]
  setup = summary.get("setup")
  if setup:
    lines += [f"{setup['slices']} labelled slices of {setup['patients']} patients; each fold "
              f"trains on the other folds' patients ({setup['validation_patients']} of them "
              f"choose the checkpoint): UNet width {setup['features']}, {setup['num_steps']} "
              f"steps (fine-tuning: {setup['fine_tune_steps']}).", ""]
  lines += [
      "| network | myocardium Dice | LV Dice | 6-sector | 12-sector | sectors | paper whole / 6 "
      "/ 12 | synthetic whole |", "|---|---|---|---|---|---|---|---|"]
  for name, n in nets.items():
    p = n["paper"]
    paper = (f"{p['whole']:.2f} / {p['sector6']:.2f} / {p['sector12']:.2f}" if p else "-")
    lines.append(f"| {name} | {_ms(n['dice_myo'])} | {_ms(n['dice_lv'])} | "
                 f"{_ms(n['sector6'])} | {_ms(n['sector12'])} | {n['n_sectors']} of "
                 f"{n['n_slices']} | {paper} | {_ms(synthetic.get(name))} |")
  lines += ["", f"## Does a low score predict a poor segmentation (myocardium Dice < "
            f"{summary['poor_dice']})?", "",
            "AUC over the slices of all folds (low score = poor), 95 % bootstrap interval over "
            "patients.", "", "| network | score | n | poor | AUC [95 % CI] |",
            "|---|---|---|---|---|"]
  for name, n in nets.items():
    for score, entry in n["ood"].items():
      label = SCORE_LABELS.get(score, f"1 - U of {score}")
      lines.append(f"| {name} | {label} | {entry['n']} | {entry['n_poor']} | {_auc(entry)} |")
  fallback = [f"{name} {n['n_u_fallback']} of {n['n_slices']}" for name, n in nets.items()
              if n.get("n_u_fallback")]
  if fallback:
    lines += ["", "U's six sectors need RV insertion points; where the prediction has none, "
              "they are placed at the standard display orientation (septum at "
              f"{STANDARD_SEPTAL_ANGLE:g} deg, CONVENTIONS.md): " + ", ".join(fallback)
              + " slices."]
  lines += ["", "## The paper's claims (and fine-tuning against training from scratch), judged "
            "over folds", "",
            "d = the per-fold paired difference (same test patients). *agrees*: mean(d) has the "
            "claimed sign and exceeds sd(d); *contradicted*: the opposite sign beyond sd(d); "
            "otherwise not a finding.", "",
            "| claim | mean d | sd d | folds | verdict |", "|---|---|---|---|---|"]
  for c in summary["claims"]:
    mean = f"{c['mean']:+.4f}" if np.isfinite(c["mean"]) else "n/a"
    sd = f"{c['sd']:.4f}" if np.isfinite(c["sd"]) else "n/a"
    lines.append(f"| {c['claim']} | {mean} | {sd} | {c['n']} | {c['verdict']} |")
  secs = summary.get("run_seconds") or {}
  if secs.get("total"):
    lines += ["", f"Run time: {secs['total'] / 3600:.2f} h over {secs['runs']} runs (each "
              "run's last call: a resumed run counts from where it resumed)."]
  return "\n".join(lines) + "\n"
