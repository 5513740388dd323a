"""Patch-level training of the patch3-/patch2-UNet (paper II-B, II-C) with exact resume.

* Examples are the stride-32 64x64 windows of each training slice (`perfjax.inputs`); the batch at
  step s is a pure function of (seed, s).
* `train_step` is a pure module-level function: on-device augmentation from
  `fold_in(rng, step)`, cross-entropy, Adam. It is jitted with the state donated; the batch is
  sharded over the "data" axis of a `Mesh` of all devices and the state replicated, so the same
  code runs on one CPU, one GPU, N devices or N hosts (after `jax.distributed.initialize()`).
* The loop keeps the devices busy: a background thread prepares the next batches
  (`perfjax.feeding.BatchFeeder`: windows kept on an accelerator and gathered there, or gathered
  on the host and transferred ahead), and the metrics are fetched one step late (after the next
  step is dispatched, as google-deepmind/nanodo does) or at evaluations and checkpoints: no
  per-step host sync.
* Mixed precision: `config.model.dtype` = "bfloat16" computes the UNet in bfloat16 with float32
  parameters, loss and Adam (`perfjax.model.make_model`).
* Every `eval_every` steps: mean myocardium Dice on the whole validation slices (stride-32 sliding
  window, mean softmax); the best parameters are kept; early stopping after `patience`
  evaluations without improvement.
* Orbax checkpoints (`perfjax.checkpoints`): the latest states and the best parameters. Starting
  again with the same workdir resumes from the last complete checkpoint ("Resuming from step N");
  an interrupted and resumed run gives bit-identical parameters to an uninterrupted one.
  Ctrl-C (KeyboardInterrupt) saves the state of the last completed step first when it is
  consistent (not half-way through that step's evaluation, finite, single process), says so in
  one line, and re-raises. `run_devices.json` records the devices a run started on; resuming
  on another number or kind of devices warns that the result will not be bit-identical.
* A NaN/Inf loss or gradient raises `TrainingError`; nothing non-finite is ever saved.
* Progress bar (tqdm), `metrics.jsonl`, TensorBoard events (`tensorboard/`) and
  `training_curves.png` in the workdir (`perfjax.training_log.MetricWriter`, `plot_curves`).
* Loading trained parameters is `perfjax.checkpoints.load_params`.
* Importing this module and running the step need only jax, flax, optax and numpy; `train()`
  imports the loop's own dependencies (orbax, ml_collections, matplotlib, scipy) when called.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perfjax import augment, inputs, platform
from perfjax.feeding import BatchFeeder, put_replicated
from perfjax.conventions import (BACKGROUND, BACKGROUND_OR_RV, MYOCARDIUM, PATCH, RV_BLOOD_POOL,
                                 TRAIN_STRIDE)
from perfjax.errors import InputError, TrainingError
from perfjax.fast_unet import UNetPredictor
from perfjax.inference import sliding_window
from perfjax.model import UNet, make_model

if TYPE_CHECKING:
  import ml_collections

SCHEDULES = ("constant", "cosine")


# ------------------------------------------------------------------------------------ building


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises InputError naming the field when a training config value cannot work."""
  inputs.input_channels(config.input)
  if config.augment.mode not in augment.MODES:
    raise InputError("config.augment.mode", f"expected one of {augment.MODES}, got "
                     f"{config.augment.mode!r}")
  fields = [("train", name) for name in ("batch_size", "num_steps", "eval_every", "log_every",
                                          "checkpoint_every", "max_to_keep", "patience")]
  fields += [("model", "features"), ("model", "depth"), ("eval", "stride_seg")]
  if config.eval.get("chunk_size") is not None:  # None: the platform's default
    fields.append(("eval", "chunk_size"))
  for group, name in fields:  # validation uses eval's fields: found before any training step
    if int(config[group][name]) < 1:
      raise InputError(f"config.{group}.{name}", f"must be >= 1, got {config[group][name]}")
  t = config.train
  if t.schedule not in SCHEDULES:
    raise InputError("config.train.schedule", f"expected one of {SCHEDULES}, got {t.schedule!r}")
  if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
    raise InputError("config.train.learning_rate", f"must be finite and > 0, got {t.learning_rate}")
  num_devices = jax.device_count() if num_devices is None else num_devices
  if t.batch_size % num_devices:
    raise InputError("config.train.batch_size", f"{t.batch_size} is not divisible by the "
                     f"{num_devices} devices the batch is sharded over")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant or cosine decay to 1% at `num_steps`."""
  t = config.train
  return _schedule(float(t.learning_rate), str(t.schedule), int(t.warmup_steps),
                   int(t.num_steps))


def _schedule(peak: float, schedule: str, warmup: int, num_steps: int) -> optax.Schedule:
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=0.01)
  else:
    main = optax.constant_schedule(peak)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with `learning_rate_schedule`; equal configs give the same object (compile cache)."""
  t = config.train
  return _adam(float(t.learning_rate), str(t.schedule), int(t.warmup_steps), int(t.num_steps))


@functools.lru_cache(maxsize=16)
def _adam(learning_rate, schedule, warmup_steps, num_steps) -> optax.GradientTransformation:
  return optax.adam(_schedule(learning_rate, schedule, warmup_steps, num_steps))


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
  """`config.augment` minus `mode`: optional overrides of `perfjax.augment.AugmentConfig`."""
  return augment.AugmentConfig.from_mapping(
      {k: v for k, v in config.augment.items() if k != "mode"})


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis "data" over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def init_state(config: ml_collections.ConfigDict, model: UNet,
               tx: optax.GradientTransformation) -> dict[str, Any]:
  """The training state at step 0: a plain dict pytree (what the checkpoints store)."""
  return _init_state(model, tx, int(config.seed), inputs.input_channels(config.input),
                     patch_size(config))


def patch_size(config: ml_collections.ConfigDict) -> int:
  """config.model.patch: the training window size (64, the paper's; older configs lack it)."""
  return int(config.model.get("patch", PATCH))


def train_stride(config: ml_collections.ConfigDict) -> int:
  """config.train.stride: the step of the training windows (32, the paper's)."""
  return int(config.train.get("stride", TRAIN_STRIDE))


def _init_state(model: UNet, tx: optax.GradientTransformation, seed: int, channels: int,
                patch: int = PATCH):
  root = inputs.prng_key(seed)  # fold_in 0: data order (perfjax.inputs).
  params = model.init(jax.random.fold_in(root, 1),
                      jnp.zeros((1, patch, patch, channels), jnp.float32))["params"]
  # The step key is stored as raw uint32 key data (what checkpoints can hold).
  return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
              rng=jax.random.key_data(jax.random.fold_in(root, 2)),
              best_dice=jnp.float32(-1.0), best_step=jnp.int32(0))


def initial_state(config: ml_collections.ConfigDict, model: UNet,
                  tx: optax.GradientTransformation, mesh: Mesh | None = None) -> dict[str, Any]:
  """`init_state` compiled as one program (eager init runs op by op: far slower), replicated."""
  mesh = make_mesh() if mesh is None else mesh
  return _jit_init(model, tx, int(config.seed), inputs.input_channels(config.input), mesh,
                   patch_size(config))()


# Compiled programs are cached per (model, optimiser, ...) so that repeated `train` calls in one
# process (resume, tests, sweeps) compile once.
@functools.lru_cache(maxsize=8)
def _jit_init(model, tx, seed, channels, mesh, patch=PATCH):
  return jax.jit(functools.partial(_init_state, model, tx, seed, channels, patch),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


# ---------------------------------------------------------------------------------------- step


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], *, model: UNet,
               tx: optax.GradientTransformation, augment_mode: str,
               augment_cfg: augment.AugmentConfig | None = None):
  """One optimisation step: augment on device, cross-entropy, Adam.

  Args:
    state: `init_state` dict.
    batch: image [B, 64, 64, C] float32, mask [B, 64, 64] int32.
  Returns:
    (new state, dict(loss, grad_norm)): the loss of the batch before the update.
  """
  step = state["step"]
  rng = jax.random.wrap_key_data(state["rng"], impl=inputs.PRNG_IMPL)
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(rng, step))
  images, labels = augment.augment_batch(aug_key, batch["image"], batch["mask"], augment_mode,
                                         augment_cfg)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})
    return partial_label_cross_entropy(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(state, params=params, opt_state=opt_state, step=step + 1)
  return new_state, dict(loss=loss, grad_norm=optax.tree.norm(grads))


def partial_label_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-pixel cross-entropy; `BACKGROUND_OR_RV` pixels score -log(p_background + p_RV).

  Labels 0..3 give exactly optax's softmax cross-entropy. A pixel of a partial mask that may
  be background or an undrawn RV is neither pushed towards background nor towards RV.
  """
  full = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(labels == BACKGROUND_OR_RV, BACKGROUND, labels))
  log_p = jax.nn.log_softmax(logits)
  merged = -jax.nn.logsumexp(log_p[..., jnp.array([BACKGROUND, RV_BLOOD_POOL])], axis=-1)
  return jnp.where(labels == BACKGROUND_OR_RV, merged, full)


def jit_train_step(config: ml_collections.ConfigDict, model: UNet,
                   tx: optax.GradientTransformation, mesh: Mesh):
  """`train_step` jitted for `mesh`: state donated and replicated, batch sharded on "data"."""
  return _jit_step(model, tx, config.augment.mode, augment_config(config), mesh)


@functools.lru_cache(maxsize=8)
def _jit_step(model, tx, augment_mode, augment_cfg, mesh):
  step = functools.partial(train_step, model=model, tx=tx, augment_mode=augment_mode,
                           augment_cfg=augment_cfg)
  return jax.jit(step, donate_argnums=0, out_shardings=NamedSharding(mesh, PartitionSpec()),
                 compiler_options=platform.compiler_options_for(mesh.devices.flat[0].platform,
                                                                platform.UNET_CPU_OPTIONS))


# ---------------------------------------------------------------------------------- validation


def validation_dice(model: UNet, params, images_nhwc, masks_nhw,
                    config: ml_collections.ConfigDict) -> np.ndarray:
  """Myocardium Dice of each whole slice: stride-`eval.stride_seg` windows, mean softmax."""
  from perfjax import metrics  # pylint: disable=g-import-not-at-top  (scipy: the loop only)
  out = sliding_window(UNetPredictor(model), {"params": params}, images_nhwc,
                       patch=patch_size(config), stride=config.eval.stride_seg,
                       chunk_size=config.eval.chunk_size)
  return np.array([metrics.dice(seg, gt, label=MYOCARDIUM)
                   for seg, gt in zip(out["segmentation"], np.asarray(masks_nhw))])


# ------------------------------------------------------------------------------------ training


def load_data(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The train and validation splits of `config.data.dataset` (built on first use).

  In a multi-process run process 0 loads first (building the dataset if needed), the others
  once it has, so that no two processes build the same dataset.
  """
  from perfjax.data.datasets import load_split  # pylint: disable=g-import-not-at-top

  def load():
    return {split: load_split(config.data.dataset, split, config.data.data_dir,
                              manual_dir=config.data.get("manual_dir"))
            for split in ("train", "validation")}

  if jax.process_count() == 1:
    return load()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = load() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("perfjax.train.load_data")
  return data if data is not None else load()


RELEASED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "released")


def init_source(config: ml_collections.ConfigDict) -> str:
  """The workdir that `config.train.init_from` names: a training workdir, or "released" for
  the released model of `config.input` (`released/patch3`, `released/patch2`)."""
  source = str(config.train.init_from)
  if source == "released":
    source = os.path.join(RELEASED_DIR, config.input)
  if not os.path.isdir(source):
    raise InputError("config.train.init_from", f"{source}: no such workdir")
  return source


def with_source_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the input and model of `config.train.init_from` (the architecture to
  fine-tune is the source's: `init_from=released` needs no model flags); others unchanged."""
  if not config.train.get("init_from"):
    return config
  from perfjax import checkpoints  # pylint: disable=g-import-not-at-top  (see train())
  return checkpoints.trained_config(config, init_source(config), fields=("input", "model"))


def resumable_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config `train` runs in `workdir` with: a fine-tune's input and model are its source's
  (`with_source_model`), or, once it has a checkpoint, its own config.json's (the source may be
  gone by then). A run with a checkpoint resumes only with the settings that started it:
  others raise InputError rather than mix in (`checkpoints.resume_conflicts`)."""
  from perfjax import checkpoints  # pylint: disable=g-import-not-at-top  (see train())
  if checkpoints.latest_step(workdir) is None:
    return with_source_model(config)
  if config.train.get("init_from"):
    config = checkpoints.trained_config(config, workdir, fields=("input", "model"))
  conflicts = checkpoints.resume_conflicts(config, workdir)
  if conflicts:
    raise InputError(workdir, "holds a run started with other settings, which a resume would "
                     f"mix in: {'; '.join(conflicts[:6])}" + (" ..." if len(conflicts) > 6 else "")
                     + f". Resume with the settings of its {checkpoints.CONFIG_FILE}, or choose "
                     "another --workdir")
  return config


def init_params(config: ml_collections.ConfigDict, source: str):
  """The best parameters of `source` for fine-tuning; its model must be `config`'s."""
  from perfjax import checkpoints  # pylint: disable=g-import-not-at-top  (see train())
  saved = checkpoints.load_workdir_config(source)
  for field in ("input", "model"):
    mine, theirs = checkpoints.plain(config[field]), checkpoints.plain(saved[field])
    if field == "model":  # fields older configs lack take today's defaults; the computation
      theirs = {**mine, **theirs}  # dtype does not change the (float32) parameters
      mine, theirs = ({k: v for k, v in d.items() if k != "dtype"} for d in (mine, theirs))
    if mine != theirs:
      raise InputError("config.train.init_from", f"{source} was trained with {field} "
                       f"{theirs}, this config has {mine}: set the same {field} to fine-tune")
  _, variables = checkpoints.load_params(config, source, "best")
  return jax.tree.map(np.asarray, variables["params"])


def _replicate(mesh: Mesh, tree):
  """Host values (the same on every process) replicated on `mesh`."""
  return jax.tree.map(lambda value: put_replicated(mesh, np.asarray(value)), tree)


def _patience_exhausted(step: int, best_step: int, config) -> bool:
  return step - best_step >= config.train.patience * config.train.eval_every


RUN_DEVICES_FILE = "run_devices.json"  # The devices a run started on (written by `train`).


def run_devices() -> dict[str, Any]:
  """The devices this process trains on: what `RUN_DEVICES_FILE` records."""
  return dict(device_count=jax.device_count(), platform=jax.devices()[0].platform,
              process_count=jax.process_count())


def devices_warning(workdir: str) -> str | None:
  """The warning for resuming `workdir` on other devices than it started on; None when they
  are the same or the run predates `RUN_DEVICES_FILE` (or it cannot be read)."""
  try:
    with open(os.path.join(workdir, RUN_DEVICES_FILE)) as f:
      recorded = json.load(f)
    then = {k: recorded[k] for k in ("device_count", "platform")}
    then["process_count"] = recorded.get("process_count", 1)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None
  now = run_devices()
  if then == now:
    return None

  def words(d):
    hosts = f" on {d['process_count']} processes" if d["process_count"] != 1 else ""
    return f"{d['device_count']} {d['platform']} device(s){hosts}"

  rule = "!" * 78
  return (f"{rule}\nWARNING: this run started on {words(then)} ({RUN_DEVICES_FILE}) and is "
          f"resumed on {words(now)}.\nTraining goes on, but the batch is now sharded "
          f"differently: the result will NOT be bit-identical to an uninterrupted run.\n{rule}")


def _all_finite(tree) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def train(config: ml_collections.ConfigDict, workdir: str, *, data: dict | None = None,
          stop_after: int | None = None) -> dict:
  """Trains (or resumes training) in `workdir`; returns the summary also in train_summary.json.

  Args:
    config: a `configs/patch3.py` / `configs/patch2.py` config.
    workdir: checkpoints, metrics and figures go here; an existing run there is resumed.
    data: optional {"train": split, "validation": split} dicts as `load_split` returns them
      (image, mask, peak_lv_frame); default: `config.data.dataset`.
    stop_after: stop once this step is done (with a checkpoint), as a preemption would; a
      later call resumes. The result is the same as one uninterrupted call.
  """
  # The loop's own dependencies (orbax, ml_collections, matplotlib, tensorboardX); the step and
  # the batches need only jax, flax, optax and numpy (benchmarks/bench_gpu.py relies on it).
  from perfjax import checkpoints, reporting, training_log  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  config = resumable_config(config, workdir)
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  t = config.train

  data = load_data(config) if data is None else data
  x_train, y_train = inputs.training_windows(data["train"], config.input, patch_size(config),
                                             train_stride(config),
                                             config.train.get("rv_unlabelled", "auto"))
  val = inputs.labelled_slices(data["validation"], "validation data")
  unlabelled = {name: int(np.sum(~np.asarray(data[name].get("has_mask", True), bool)))
                for name in ("train", "validation")}
  if lead and any(unlabelled.values()):
    print("left out slices without a mask: " + ", ".join(
        f"{n} of {name}" for name, n in unlabelled.items() if n), flush=True)
  x_val = inputs.model_inputs(val["image"], val.get("peak_lv_frame"), config.input)
  y_val = np.asarray(val["mask"])
  if x_train.shape[-1] != inputs.input_channels(config.input):
    raise InputError("training data", f"{config.input} expects "
                     f"{inputs.input_channels(config.input)} channels, got {x_train.shape[-1]}")
  num_examples = len(x_train)

  model, tx = make_model(config), make_optimizer(config)
  schedule = learning_rate_schedule(config)
  mesh = make_mesh()
  state = initial_state(config, model, tx, mesh)

  latest = checkpoints.manager(workdir, "latest", t.max_to_keep)
  best = checkpoints.manager(workdir, "best")
  start = 0
  if latest.latest_step() is not None:
    state = checkpoints.restore(latest, state)
    start = int(state["step"])
    if lead:
      print(f"Resuming from step {start} ({latest.directory})", flush=True)
  else:
    if lead:
      reporting.write_text(os.path.join(workdir, RUN_DEVICES_FILE),
                           json.dumps(run_devices(), indent=2))
    if config.train.get("init_from"):
      source = init_source(config)
      state = dict(state, params=_replicate(mesh, init_params(config, source)))
      if lead:
        print(f"Starting from the parameters of {source}", flush=True)
  best_dice, best_step = float(state["best_dice"]), int(state["best_step"])
  if lead:
    reporting.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))

  writer = training_log.MetricWriter(workdir, start, enabled=lead)
  step_fn = jit_train_step(config, model, tx, mesh)
  first_step_s = None
  step, stopped_early, train_s, wall0 = start, False, 0.0, time.perf_counter()
  # Metrics of dispatched steps, fetched only when the device has already moved on (one step
  # late, as google-deepmind/nanodo does) or at an evaluation / checkpoint, which waits anyway.
  pending: list[tuple[int, dict]] = []
  postfix: dict[str, str] = {}
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=t.num_steps, initial=start, disable=not lead, dynamic_ncols=True,
             desc=f"{config.input}/{config.augment.mode}", mininterval=2.0, file=sys.stderr)
  timer = dict(tick=time.perf_counter(), steps=0)  # Steps dispatched since `tick`.

  def flush(upto: int) -> None:
    """Fetches the metrics of steps <= `upto`, stops on non-finite values, logs their mean."""
    nonlocal pending, train_s
    due = [(s, m) for s, m in pending if s <= upto]
    if not due:
      return
    fetched = jax.tree.map(np.asarray, [m for _, m in due])
    for (s, _), m in zip(due, fetched):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        last = latest.latest_step()
        kept = (f"The last good checkpoint (step {last}) in {latest.directory} is kept"
                if last is not None else "No checkpoint had been saved yet")
        raise TrainingError(
            f"non-finite training loss {float(m['loss'])} / gradient norm "
            f"{float(m['grad_norm'])} at step {s}; training stopped. {kept}. Check the data "
            f"for NaN/Inf or lower config.train.learning_rate.")
    # Out of `pending` only once checked: an interrupted fetch leaves them to the next flush.
    pending = pending[len(due):]
    now = time.perf_counter()
    interval_s, timed = now - timer["tick"], timer["steps"] - len(pending)
    train_s += interval_s
    timer.update(tick=now, steps=len(pending))
    loss = float(np.mean([m["loss"] for m in fetched]))
    postfix["loss"] = f"{loss:.4f}"
    writer.write(due[-1][0], **{
        "train/loss": loss,
        "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
        "train/learning_rate": float(schedule(due[-1][0] - 1)),
        "train/steps_per_second": timed / max(interval_s, 1e-9)})
    bar.set_postfix(postfix, refresh=False)

  def restart_timer() -> None:
    """After an evaluation or checkpoint: their time is not training time."""
    timer.update(tick=time.perf_counter(), steps=0)

  done = start >= t.num_steps or _patience_exhausted(start, best_step, config)
  if done and lead:
    print(f"Training already finished at step {start}", flush=True)
  elif start and lead:
    warning = devices_warning(workdir)  # Other devices: not bit-identical (said, not refused).
    if warning:
      print(warning, file=sys.stderr, flush=True)
  last_step = t.num_steps if stop_after is None else max(start, min(t.num_steps, stop_after))
  feeder = None
  evaluated = start  # The last step whose evaluation (and best checkpoint) is complete.

  def save_on_interrupt() -> str:
    """After Ctrl-C: saves the last completed step's state when it is consistent; says what
    was done. The state's own step counts: dispatch is asynchronous, so `step` can lag it."""
    last = latest.latest_step()
    kept = (f"resuming starts again from step {last} ({latest.directory})" if last is not None
            else "no checkpoint yet: the run starts again from step 0")
    if jax.process_count() > 1:
      return (f"interrupted after step {step}: no checkpoint saved (a multi-process run saves "
              f"at its checkpoint steps only); {kept}")
    leaves = jax.tree.leaves(state)
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves):
      return (f"interrupted after step {step}: no checkpoint saved (the state was being "
              f"updated); {kept}")
    s = int(state["step"])
    if s in latest.all_steps():
      return f"interrupted at step {s}: checkpoint already in {latest.directory}"
    if s == start:
      return f"interrupted at step {s}: no step completed, nothing to save; {kept}"
    if (s % t.eval_every == 0 or s == t.num_steps) and evaluated != s:
      return (f"interrupted at step {s}: no checkpoint saved (its evaluation had not "
              f"finished); {kept}")
    try:
      flush(s)  # Logs the metrics not fetched yet; raises on non-finite ones.
    except TrainingError as e:
      return f"interrupted at step {s}: no checkpoint saved ({e})"
    if not _all_finite(state):
      return f"interrupted at step {s}: no checkpoint saved (the state is not finite); {kept}"
    checkpoints.save(latest, s, state)  # Synchronous: complete on disk when it returns.
    return f"interrupted at step {s}: checkpoint saved in {latest.directory}"

  try:
    feeder = BatchFeeder(mesh, {"image": x_train, "mask": y_train}, config.seed, t.batch_size,
                         start, start if done else last_step)
    log_due = None  # A logging step whose metrics are fetched after the next dispatch.
    while not done and step < last_step:
      batch = feeder.get(step)
      if first_step_s is None:  # Compilation (unless cached in this process) + one step.
        t0 = time.perf_counter()
        state, step_metrics = step_fn(state, batch)
        jax.block_until_ready(step_metrics)
        first_step_s = time.perf_counter() - t0
        restart_timer()
        bar.unpause()  # The ETA leaves compilation out (after a resume it read hours).
      else:
        state, step_metrics = step_fn(state, batch)
        timer["steps"] += 1
      step += 1
      pending.append((step, step_metrics))
      bar.update(1)
      if log_due is not None:  # The device is busy with this step: fetch the last one's.
        flush(log_due)
        log_due = None
      is_eval = step % t.eval_every == 0 or step == t.num_steps
      is_ckpt = (step % t.checkpoint_every == 0 or step == t.num_steps or step == stop_after)
      if is_eval or is_ckpt or step == last_step:
        flush(step)  # Nothing non-finite is evaluated or saved.
      elif step % t.log_every == 0:
        log_due = step
      if is_eval:
        dice = float(np.float32(np.mean(  # float32: the value the checkpoints store.
            validation_dice(model, jax.tree.map(np.asarray, state["params"]), x_val, y_val,
                            config))))
        if dice > best_dice:
          best_dice, best_step = dice, step
          checkpoints.save(best, step, dict(params=state["params"], step=np.int32(step),
                                            val_dice=np.float32(dice)))
        state = dict(state, best_dice=_replicate(mesh, np.float32(best_dice)),
                     best_step=_replicate(mesh, np.int32(best_step)))
        writer.write(step, **{"val/dice_myo": dice, "val/best_dice_myo": best_dice})
        postfix.update(dice=f"{dice:.3f}", best=f"{best_dice:.3f}")
        bar.set_postfix(postfix, refresh=False)
        stopped_early = _patience_exhausted(step, best_step, config) and step < t.num_steps
        evaluated = step
      if is_ckpt or stopped_early:
        checkpoints.save(latest, step, state)
      if is_eval or is_ckpt:
        restart_timer()
      if stopped_early:
        if lead:
          print(f"Early stopping at step {step}: no better validation Dice in {t.patience} "
                f"evaluations (best {best_dice:.4f} at step {best_step})", flush=True)
        break
    flush(step)
  except KeyboardInterrupt:
    bar.close()
    try:
      message = save_on_interrupt()
    except Exception as e:  # pylint: disable=broad-except  (the interrupt is what is raised)
      message = f"interrupted: no checkpoint saved ({type(e).__name__}: {e})"
    if lead:
      print(message, file=sys.stderr, flush=True)
    raise
  finally:
    if feeder is not None:
      feeder.close()
    bar.close()
    writer.close()
    if lead:
      training_log.plot_curves(workdir)

  trained = step - start
  summary = dict(
      step=step, start_step=start, best_step=best_step, best_val_dice=best_dice,
      stopped_early=stopped_early, finished=step >= t.num_steps or stopped_early
      or _patience_exhausted(step, best_step, config),
      num_train_windows=num_examples, num_val_slices=len(x_val), num_devices=jax.device_count(),
      first_step_seconds=first_step_s, train_seconds=train_s,
      wall_seconds=time.perf_counter() - wall0,
      # Throughput after the first (compiling) step, evaluations and checkpoints excluded.
      steps_per_second=(trained - 1) / train_s if trained > 1 and train_s else None,
      patches_per_second=(trained - 1) * t.batch_size / train_s if trained > 1 and train_s
      else None)
  summary_path = os.path.join(workdir, "train_summary.json")
  if lead and (trained or not os.path.isfile(summary_path)):  # a rerun that trained nothing
    reporting.write_text(summary_path, json.dumps(summary, indent=2))  # keeps the run's timings
  return summary
