"""Would one combined OOD score beat the single ones? (issue 14) An offline check on the slices
of an `ood_failures.json` (`--mode=ood_failures`).

A combination of scores in different units needs a reference of in-distribution slices: each
score is turned into a robust z-score against a calibration half of the clean slices
((score - median) / (1.4826 MAD)), and the combined score is the smallest z of its members (a
slice is as unreliable as its worst sign). Its AUC is then taken on the other half of the
clean slices against every failed slice, per group of failure types, averaged over random
halvings; each single score gets the same treatment (a monotone map: its AUC on the held-out
half only), so the rows compare like with like. A failure set written before frame_motion was
a score gets it recomputed from the images (the set is a function of its seed).

    .venv/bin/python benchmarks/ood_combined.py runs/released/ood_failures.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from perfjax import frame_motion
from perfjax import uncertainty
from perfjax.data import failures

MAD_TO_SD = 1.4826  # MAD of a normal distribution x this = its standard deviation


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """(values - median) / (1.4826 MAD) of the finite values of ``reference``; a constant
  reference scales by a tiny positive spread instead of 0 (every departure is then far out)."""
  reference = reference[np.isfinite(reference)]
  median = np.median(reference)
  spread = MAD_TO_SD * np.median(np.abs(reference - median))
  return (values - median) / max(spread, 1e-9 * max(abs(median), 1.0))


def load_scores(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The failure labels [M] and every score [M] of an ood_failures.json (null = -inf, an
  uncertain-by-definition slice), frame_motion recomputed when the file predates it."""
  with open(path) as f:
    out = json.load(f)
  slices = out["slices"]
  scores = {name: np.nan_to_num(np.asarray(slices[name], np.float64), nan=-np.inf)
            for name in out["scores"]}
  if frame_motion.FRAME_MOTION_SCORE not in scores:
    data = failures.failure_set(out["seed"], out["n_slices"], out["protocol"],
                                tuple(dict.fromkeys(f for f in slices["failure"]
                                                    if f != failures.CLEAN)))
    if list(data["failure"]) != list(slices["failure"]):
      raise SystemExit(f"{path}: the failure set of its seed does not match its slices")
    scores[frame_motion.FRAME_MOTION_SCORE] = frame_motion.frame_motion_score(data["image"])
  return np.asarray(slices["failure"]), scores


def held_out_aucs(failure: np.ndarray, scores: dict[str, np.ndarray], members: tuple[str, ...],
                  repeats: int, seed: int) -> dict[str, tuple[float, float]]:
  """Mean and sd over ``repeats`` random halvings of the clean slices of the AUC of
  min(robust z of ``members``) per group of failure types and for all failures."""
  clean_index = np.flatnonzero(failure == failures.CLEAN)
  groups = {g: m for g, m in failures.FAILURE_GROUPS.items() if np.isin(failure, m).any()}
  groups["all"] = tuple(failures.FAILURE_TYPES)
  rng = np.random.default_rng(seed)
  aucs = {g: [] for g in groups}
  for _ in range(repeats):
    order = rng.permutation(clean_index)
    calibration, held_out = order[:len(order) // 2], order[len(order) // 2:]
    combined = np.min([robust_z(scores[m], scores[m][calibration]) for m in members], axis=0)
    # NaN only where a member's calibration half has no finite value: read as unreliable.
    combined = np.nan_to_num(combined, nan=-np.inf)
    negatives = np.isin(np.arange(len(failure)), held_out)
    for g, kinds in groups.items():
      keep = negatives | np.isin(failure, kinds)
      aucs[g].append(uncertainty.auc(combined[keep], ~negatives[keep]))
  return {g: (float(np.mean(v)), float(np.std(v))) for g, v in aucs.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("path", help="an ood_failures.json")
  parser.add_argument("--repeats", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  failure, scores = load_scores(args.path)
  # Each score alone, frame_motion (the images' motion) with each network score, and all.
  singles = [(name,) for name in scores]
  motion = frame_motion.FRAME_MOTION_SCORE
  pairs = [(motion, name) for name in scores if name != motion]
  rows = {members: held_out_aucs(failure, scores, members, args.repeats, args.seed)
          for members in dict.fromkeys(singles + pairs + [tuple(scores)])}
  groups = list(next(iter(rows.values())))
  n_clean = int((failure == failures.CLEAN).sum())
  print(f"{args.path}: {n_clean} clean slices (halved: calibration / held-out negatives), "
        f"{len(failure) - n_clean} failed; mean (sd) AUC over {args.repeats} halvings")
  print("| score | " + " | ".join(groups) + " |")
  print("|---|" + "---|" * len(groups))
  for members, by_group in rows.items():
    name = members[0] if len(members) == 1 else "min z(" + ", ".join(members) + ")"
    print(f"| {name} | " + " | ".join(f"{m:.3f} ({s:.3f})" for m, s in by_group.values()) + " |")


if __name__ == "__main__":
  main()
