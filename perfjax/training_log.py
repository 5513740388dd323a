"""Training's own record: scalars to metrics.jsonl and TensorBoard, read back exactly on resume,
and the training curves drawn from them.
"""
from __future__ import annotations

import json
import os

from matplotlib.figure import Figure  # Not pyplot: no global backend or figure state.

from perfjax.data.writers import atomic_path


class MetricWriter:
  """Scalars to `metrics.jsonl` (one JSON object per line) and TensorBoard event files.

  On resume from step N the records after N (written before the interruption) are dropped
  from both, so the files read as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      kept = [json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= resume_step]
      with atomic_path(self.path, ".jsonl") as tmp:
        with open(tmp, "w") as f:
          f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # Also from step 0: a run killed before its first checkpoint starts again from scratch.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    # One whole line per append; a line cut short by a crash is skipped by `read_metrics`.
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=int(step), **{k: float(v) for k, v in scalars.items()})) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl (a last line cut short by a crash is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_curves(workdir: str) -> str | None:
  """Writes `training_curves.png` (loss, learning rate, validation Dice) from metrics.jsonl."""
  records = read_metrics(workdir)
  if not records:
    return None
  def series(name):
    pts = [(r["step"], r[name]) for r in records if name in r]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig = Figure(figsize=(11, 3.2), layout="constrained")
  ax_loss, ax_lr, ax_dice = fig.subplots(1, 3)
  ax_loss.plot(*series("train/loss"), lw=1)
  ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="training loss")
  ax_lr.plot(*series("train/learning_rate"), lw=1)
  ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
  ax_dice.plot(*series("val/dice_myo"), "o-", ms=3)
  ax_dice.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="validation myocardium Dice")
  for ax in (ax_loss, ax_lr, ax_dice):
    ax.grid(alpha=0.3)
  path = os.path.join(workdir, "training_curves.png")
  with atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return path
