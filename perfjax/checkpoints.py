"""Orbax checkpoints of a training run: the latest few states and the best parameters.

Layout of a workdir:
  checkpoints/<step>/   the full training state (params, Adam state, step, rng, best Dice), the
                        newest `max_to_keep` steps;
  best/<step>/          params, step and validation Dice of the best evaluation so far (one kept).

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed during a save leaves only a `<step>.orbax-checkpoint-tmp-*` directory behind, which is
ignored (and cleaned up) on the next start: the run resumes from the last complete step.
Saves are synchronous: the training step donates its state buffers, so they must be on disk
before the next step runs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST_DIR = "checkpoints"
BEST_DIR = "best"

def manager(workdir: str, which: str = "latest", max_to_keep: int = 2,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The CheckpointManager of `workdir`'s latest states ("latest") or best params ("best")."""
  subdir = {"latest": LATEST_DIR, "best": BEST_DIR}[which]
  # `read_only` (for loading) only avoids creating, cleaning or deleting anything; orbax's own
  # read_only mode would warn on every load.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep if which == "latest" else 1,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), subdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree: Any) -> None:
  """Saves `tree` as `step` (no-op when that step is already complete on disk)."""
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.StandardSave(tree))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """Restores `step` (default: latest) into the structure, dtypes and shardings of `target`.

  `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with `sharding` set).
  """
  step = mngr.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
