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

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from perfjax import inputs
from perfjax.errors import InputError
from perfjax.model import UNet, make_model, variable_shapes

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
WHICH = ("best", "latest")
CONFIG_FILE = "config.json"  # Written by perfjax.train.train beside the checkpoints.
TRAINED_FIELDS = ("seed", "input", "model", "augment", "train")  # What produced a checkpoint.
# Model fields that change how the trained parameters are computed, not what they are: the
# caller's value stands (a float32-trained model runs in bfloat16 when asked).
RUNTIME_MODEL_FIELDS = ("dtype",)
# Training fields that only say how a run is logged and saved: a resume may change them.
BOOKKEEPING_FIELDS = ("train.log_every", "train.checkpoint_every", "train.max_to_keep")

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


def load_params(config: ml_collections.ConfigDict, workdir: str,
                which: str = "best") -> tuple[UNet, dict]:
  """The model of `config` and its variables {"params": ...} from `workdir`'s checkpoint.

  `which`: "best" (the best validation Dice) or "latest" (the newest training state). Only the
  parameters are read, into the tree of `jax.eval_shape(model.init)` on the first local device:
  no optimiser is built. The variables go straight into
  `perfjax.inference.sliding_window(perfjax.fast_unet.UNetPredictor(model), variables, ...)`.
  """
  if which not in WHICH:
    raise InputError("which", f"expected 'best' or 'latest', got {which!r}")
  subdir = os.path.join(os.path.abspath(workdir), BEST_DIR if which == "best" else LATEST_DIR)
  if not os.path.isdir(subdir):
    raise InputError(workdir, f"no {which!r} checkpoint ({subdir} is missing); train first")
  mngr = manager(workdir, which, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise InputError(workdir, f"no complete {which!r} checkpoint in {subdir}; train first")
  model = make_model(config)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = variable_shapes(model, inputs.input_channels(config.input))["params"]
  # Only the parameters are restored (a partial restore of the saved tree: the step, Dice and
  # optimiser state stay on disk).
  target = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params)}
  try:
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except (ValueError, KeyError, TypeError) as e:
    raise InputError(subdir, f"checkpoint does not match config (input {config.input}, "
                     f"features {config.model.features}, depth {config.model.depth}): {e}") from e
  return model, {"params": restored["params"]}


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise InputError(workdir, f"no {CONFIG_FILE}: not a perfjax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def plain(value):
  """A config value as config.json holds it (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def trained_config(config: ml_collections.ConfigDict, workdir: str,
                   fields: tuple[str, ...] = TRAINED_FIELDS) -> ml_collections.ConfigDict:
  """`config` with the fields that produced the checkpoint taken from the workdir's config.json.

  So a released run (its config.json and best/ checkpoint) is evaluated or used for prediction
  with any config of the same family: the data and eval settings stay the caller's, the model
  is the one that was trained. Differences are printed. Fine-tuning takes only
  `fields=("input", "model")` from its source (its training settings stay the caller's).
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return config
  saved = load_workdir_config(workdir)
  if "model" in saved and "model" in config:
    for key in RUNTIME_MODEL_FIELDS:
      if key in config.model:
        saved.model[key] = config.model[key]
  merged = ml_collections.ConfigDict(config.to_dict())
  for name in fields:
    if name in saved and plain(saved[name]) != plain(config[name]):
      print(f"{workdir}: using the trained model's {name} from {CONFIG_FILE}: "
            f"{_differences(name, plain(saved[name]), plain(config[name]))}")
      merged[name] = saved[name]
  return merged


def latest_step(workdir: str) -> int | None:
  """The step of `workdir`'s latest complete checkpoint (None without one); creates nothing."""
  if not os.path.isdir(os.path.join(os.path.abspath(workdir), LATEST_DIR)):
    return None
  return manager(workdir, "latest", read_only=True).latest_step()


def resume_conflicts(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The fields that produced `workdir`'s checkpoints (TRAINED_FIELDS, bookkeeping aside) on
  which `config` differs from its config.json, as ``name saved (the config says mine)``.

  A field config.json lacks (added to the configs since) is not compared.
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return []
  saved = load_workdir_config(workdir)

  def flat(value, prefix):
    if isinstance(value, dict):
      return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}

  out = []
  for name in TRAINED_FIELDS:
    theirs = flat(plain(saved[name]), name) if name in saved else {}
    mine = flat(plain(config[name]), name) if name in config else {}
    for key in sorted(theirs):
      if key not in BOOKKEEPING_FIELDS and theirs[key] != mine.get(key):
        out.append(f"{key} {theirs[key]!r} (the config says {mine.get(key)!r})")
  return out


def _differences(name: str, saved, mine) -> str:
  """One line: `name.key saved (the config says mine)` for each differing key."""
  if not (isinstance(saved, dict) and isinstance(mine, dict)):
    return f"{name} {saved} (the config says {mine})"
  keys = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
  return ", ".join(f"{name}.{k} {saved.get(k)} (the config says {mine.get(k)})" for k in keys)
