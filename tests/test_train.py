"""Training: inputs, the jitted step, exact resume, NaN handling, multi-device equality."""
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfjax import checkpoints, feeding, inputs, train, training_log
from perfjax.errors import InputError, TrainingError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(mode="none", **train_fields):
  spec = importlib.util.spec_from_file_location("_cfg_patch3", ROOT / "configs" / "patch3.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.augment.mode = mode
  config.train.update(train_fields)
  return config


def toy_split(n, seed, frames=30):
  """Rings: myocardium (1) around an LV pool (2), an RV (3) on the left; enhancing in turn."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:128, :128]
  images = np.zeros((n, 128, 128, frames), np.float32)
  masks = np.zeros((n, 128, 128), np.int32)
  t = np.arange(frames)
  for i in range(n):
    cy, cx = 64 + rng.integers(-6, 7), 64 + rng.integers(-6, 7)
    radius = np.hypot(rows - cy, cols - cx)
    r_in = rng.uniform(10, 16)
    m = np.zeros((128, 128), np.int32)
    m[np.hypot(rows - cy, cols - cx + 2 * r_in) < r_in + 4] = 3
    m[(radius >= r_in) & (radius < r_in + 7)] = 1
    m[radius < r_in] = 2
    img = 0.1 + rng.normal(0, 0.03, (128, 128, frames))
    for label, peak, amp in ((3, 8, 0.8), (2, 12, 0.8), (1, 16, 0.3)):
      img[m == label] += amp * np.exp(-0.5 * ((t - peak) / 3.0) ** 2)
    images[i] = (img - img.min()) / (img.max() - img.min())
    masks[i] = m
  return dict(image=images, mask=masks, peak_lv_frame=np.full(n, 12, np.int32))


@functools.lru_cache(maxsize=1)
def _toy_data():
  return {"train": toy_split(2, 0), "validation": toy_split(1, 1)}


def _step_losses(num_steps=3, mode="conventional"):
  """Losses of `num_steps` jitted steps on all visible devices (used in a 4-device subprocess)."""
  config = _config(mode)
  x, y = inputs.training_windows(_toy_data()["train"], "patch3")
  model, tx = train.make_model(config), train.make_optimizer(config)
  mesh = train.make_mesh()
  state = train.initial_state(config, model, tx, mesh)
  step_fn = train.jit_train_step(config, model, tx, mesh)
  losses = []
  for step in range(num_steps):
    rows = inputs.batch_indices(config.seed, step, len(x), config.train.batch_size)
    batch = feeding.shard_batch(mesh, {"image": x[rows], "mask": y[rows]})
    assert len(batch["image"].sharding.device_set) == jax.device_count()
    state, m = step_fn(state, batch)
    losses.append(float(m["loss"]))
  return losses


# ------------------------------------------------------------------------------------ inputs


def test_model_inputs_patch2_is_the_peak_frame():
  images = np.broadcast_to(np.arange(30, dtype=np.float32), (2, 8, 8, 30))
  out = inputs.model_inputs(images, np.array([3, 7]), "patch2")
  assert out.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(out[0], 3.0)
  np.testing.assert_array_equal(out[1], 7.0)
  assert inputs.model_inputs(images, None, "patch3").shape == (2, 8, 8, 30)
  assert inputs.input_channels("patch2") == 1 and inputs.input_channels("patch3") == 30


@pytest.mark.parametrize("peak, kind", [(np.array([0, 30]), "patch2"), (None, "patch2"),
                                        (np.array([0.0, 1.0]), "patch2"),
                                        (np.array([0, 1]), "patch4")])
def test_model_inputs_bad_input(peak, kind):
  with pytest.raises(InputError):
    inputs.model_inputs(np.zeros((2, 8, 8, 30), np.float32), peak, kind)


def test_training_windows_are_the_nine_stride32_windows():
  split = toy_split(1, 3)
  x, y = inputs.training_windows(split, "patch2")
  assert x.shape == (9, 64, 64, 1) and y.shape == (9, 64, 64)
  # Window 4 is the centre one (rows and cols 32..95), window 8 the bottom-right one.
  np.testing.assert_array_equal(x[4, ..., 0], split["image"][0, 32:96, 32:96, 12])
  np.testing.assert_array_equal(y[8], split["mask"][0, 64:, 64:])


def test_batch_indices_pure_and_a_permutation_per_epoch():
  epoch = np.concatenate([inputs.batch_indices(0, s, 18, 4) for s in range(4)])
  assert sorted(epoch) == sorted(set(epoch)) and len(epoch) == 16  # 2 dropped per epoch
  np.testing.assert_array_equal(inputs.batch_indices(0, 5, 18, 4), inputs.batch_indices(0, 5, 18, 4))
  assert not np.array_equal(np.concatenate([inputs.batch_indices(0, s, 18, 4) for s in range(4)]),
                            np.concatenate([inputs.batch_indices(0, s, 18, 4) for s in range(4, 8)]))
  assert not np.array_equal(inputs.batch_indices(0, 0, 18, 4), inputs.batch_indices(1, 0, 18, 4))
  with pytest.raises(InputError):
    inputs.batch_indices(0, 0, 3, 4)


def test_check_config_rejects_bad_values():
  with pytest.raises(InputError, match="batch_size"):
    train.check_config(_config(), num_devices=3)
  with pytest.raises(InputError, match="augment.mode"):
    train.check_config(_config("fancy"))
  with pytest.raises(InputError, match="learning_rate"):
    train.check_config(_config(learning_rate=float("nan")))
  for group, name, value in (("model", "features", 0), ("eval", "stride_seg", 0),
                             ("eval", "chunk_size", -1), ("train", "patience", 0)):
    config = _config()
    config[group][name] = value
    with pytest.raises(InputError, match=rf"config.{group}.{name}.*must be >= 1, got {value}"):
      train.check_config(config, num_devices=1)


def test_learning_rate_schedule_warmup_then_cosine():
  sched = train.learning_rate_schedule(_config(learning_rate=1e-3, warmup_steps=10,
                                               num_steps=110, schedule="cosine"))
  np.testing.assert_allclose(float(sched(0)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 1e-3 * (0.01 + 0.99 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(sched(110)), 1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- step


def test_train_step_decreases_loss_and_is_deterministic():
  config = _config("none", learning_rate=3e-3, warmup_steps=0, schedule="constant")
  x, y = inputs.training_windows(_toy_data()["train"], "patch3")
  batch = {"image": jnp.asarray(x[:4]), "mask": jnp.asarray(y[:4])}
  model, tx = train.make_model(config), train.make_optimizer(config)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, augment_mode="none"))
  losses = []
  state = train.initial_state(config, model, tx)
  for _ in range(8):
    state, m = step_fn(state, batch)
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  assert int(state["step"]) == 8
  # Same seed, same first loss, bit for bit; about ln(4) for a fresh 4-class network.
  _, again = step_fn(train.initial_state(config, model, tx), batch)
  assert float(again["loss"]) == losses[0]
  assert 1.0 < losses[0] < 2.0


@pytest.mark.parametrize("on_device", [False, True])
def test_batch_feeder_gives_the_batches_of_batch_indices(on_device):
  # Prefetched in a thread, gathered on the host or from device-resident windows: the batch of
  # step s is always rows `batch_indices(seed, s)`, so resume stays exact.
  x, y = inputs.training_windows(_toy_data()["train"], "patch3")
  mesh = train.make_mesh()
  feeder = feeding.BatchFeeder(mesh, {"image": x, "mask": y}, seed=3, batch_size=4,
                               start_step=5, stop_step=9, on_device=on_device)
  try:
    assert feeder.on_device == on_device
    for step in range(5, 9):
      batch = feeder.get(step)
      rows = inputs.batch_indices(3, step, len(x), 4)
      np.testing.assert_array_equal(np.asarray(batch["image"]), x[rows])
      np.testing.assert_array_equal(np.asarray(batch["mask"]), y[rows])
      assert batch["image"].sharding.spec == train.PartitionSpec("data")
    with pytest.raises(ValueError, match="step 9"):
      feeder.get(10)
  finally:
    feeder.close()
  assert not feeding.windows_fit_on_device(1, jax.devices("cpu"))


def test_train_step_in_bfloat16_mixed_precision():
  # config.model.dtype = "bfloat16": bfloat16 convolutions, float32 parameters, loss and Adam.
  config = _config("conventional", learning_rate=3e-3, warmup_steps=0, schedule="constant")
  x, y = inputs.training_windows(_toy_data()["train"], "patch3")
  batch = {"image": jnp.asarray(x[:4]), "mask": jnp.asarray(y[:4])}
  tx = train.make_optimizer(config)
  first = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    model = train.make_model(config)
    step_fn = train.jit_train_step(config, model, tx, train.make_mesh())
    state = train.initial_state(config, model, tx)
    losses = []
    for _ in range(3):
      state, m = step_fn(state, batch)
      losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and m["loss"].dtype == jnp.float32, losses
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
    assert all(leaf.dtype in (jnp.float32, jnp.int32)
               for leaf in jax.tree.leaves(state["opt_state"]))
    first[dtype] = losses[0]
  np.testing.assert_allclose(first["bfloat16"], first["float32"], rtol=0.02)


@pytest.mark.slow
def test_four_devices_match_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip(),
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
  code = ("import json, jax, test_train; assert jax.device_count() == 4; "
          "print('LOSSES', json.dumps(test_train._step_losses()))")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads(proc.stdout.split("LOSSES", 1)[1])
  one = _step_losses()
  assert jax.device_count() == 1
  np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5)
  assert one[0] != one[1]  # different batches and augmentations per step


# ---------------------------------------------------------------- checkpoints, resume, NaN


def _params(workdir, config, which="latest"):
  _, variables = checkpoints.load_params(config, workdir, which)
  return jax.tree.map(np.asarray, variables["params"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """(config, workdir, summary): an uninterrupted 4-step run (evaluations and checkpoints at
  2 and 4), the reference of the resume tests. Read only."""
  config = _config("conventional", num_steps=4, eval_every=2, checkpoint_every=2)
  workdir = tmp_path_factory.mktemp("straight") / "run"
  return config, workdir, train.train(config, workdir, data=_toy_data())


def _assert_same_run(straight_run, workdir, summary):
  """`workdir`'s run ended with the parameters, best Dice and step log of the straight run."""
  config, straight_dir, straight = straight_run
  assert summary["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, _params(straight_dir, config),
               _params(workdir, config))
  jax.tree.map(np.testing.assert_array_equal, _params(straight_dir, config, "best"),
               _params(workdir, config, "best"))
  assert (summary["best_val_dice"], summary["best_step"]) == (straight["best_val_dice"],
                                                               straight["best_step"])
  assert [r["step"] for r in training_log.read_metrics(workdir) if "val/dice_myo" in r] == [2, 4]


def _interrupt_on_call(monkeypatch, owner, name, n):
  """Ctrl-C (KeyboardInterrupt) on the `n`-th call of `owner.name`, once."""
  real, calls = getattr(owner, name), []

  def wrapper(*args, **kwargs):
    calls.append(None)
    if len(calls) == n:
      raise KeyboardInterrupt
    return real(*args, **kwargs)
  monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_not_mixed_in(straight_run, tmp_path, capsys):
  """A workdir's run resumes only with the settings that started it (bookkeeping aside)."""
  config, _, straight = straight_run
  workdir = tmp_path / "run"
  train.train(config, workdir, data=_toy_data(), stop_after=2)
  other = config.copy_and_resolve_references()
  other.augment.mode, other.train.learning_rate = "advanced", 0.05
  with pytest.raises(InputError, match=r"holds a run started with other settings, which a resume "
                                       r"would mix in: augment.mode 'conventional' \(the config "
                                       r"says 'advanced'\); train.learning_rate"):
    train.train(other, workdir, data=_toy_data())
  assert json.loads((workdir / checkpoints.CONFIG_FILE).read_text())["augment"]["mode"] == (
      "conventional")  # config.json untouched
  logged = config.copy_and_resolve_references()
  logged.train.log_every = 3  # how the run is logged: free to change
  capsys.readouterr()
  resumed = train.train(logged, workdir, data=_toy_data())
  assert "Resuming from step 2" in capsys.readouterr().out
  assert resumed["best_val_dice"] == straight["best_val_dice"]


@pytest.mark.slow
def test_resume_is_bit_identical_and_skips_an_incomplete_save(straight_run, tmp_path, capsys):
  config, straight_dir, straight = straight_run
  assert straight["step"] == 4 and straight["start_step"] == 0

  resumed_dir = tmp_path / "resumed"
  first = train.train(config, resumed_dir, data=_toy_data(), stop_after=2)
  assert first["step"] == 2 and not first["finished"]
  # A save killed half-way leaves only orbax's temporary directory behind.
  partial = resumed_dir / checkpoints.LATEST_DIR / "3.orbax-checkpoint-tmp-1234567"
  (partial / "default").mkdir(parents=True)
  (partial / "default" / "junk").write_bytes(b"\x00" * 10)
  capsys.readouterr()
  second = train.train(config, resumed_dir, data=_toy_data())
  assert "Resuming from step 2" in capsys.readouterr().out
  assert second["step"] == 4 and second["start_step"] == 2

  a, b = _params(straight_dir, config), _params(resumed_dir, config)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert straight["best_val_dice"] == second["best_val_dice"]
  assert straight["best_step"] == second["best_step"]
  # Best params are saved separately; the step and metrics files read as one run.
  best = _params(resumed_dir, config, "best")
  assert jax.tree.structure(best) == jax.tree.structure(a)
  steps = [r["step"] for r in training_log.read_metrics(resumed_dir) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]
  assert [r for r in training_log.read_metrics(resumed_dir) if "val/dice_myo" in r][-1]["step"] == 4
  for name in ("training_curves.png", "config.json", "train_summary.json"):
    assert (resumed_dir / name).stat().st_size > 0
  assert any(p.name.startswith("events.out.tfevents") for p in (resumed_dir / "tensorboard").iterdir())

  # Running a finished run again trains nothing.
  again = train.train(config, resumed_dir, data=_toy_data())
  assert again["step"] == 4 and again["start_step"] == 4


@pytest.mark.slow
def test_ctrl_c_saves_the_last_completed_step_and_resume_is_bit_identical(
    straight_run, tmp_path, monkeypatch, capsys):
  config = straight_run[0]
  # Ctrl-C while waiting for the batch of step 4: steps 1-3 are done, 3 is no checkpoint step.
  _interrupt_on_call(monkeypatch, feeding.BatchFeeder, "get", 4)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, tmp_path, data=_toy_data())
  ckpt_dir = tmp_path / checkpoints.LATEST_DIR
  assert (f"interrupted at step 3: checkpoint saved in {ckpt_dir}"
          in capsys.readouterr().err.splitlines())
  assert checkpoints.manager(tmp_path, "latest", read_only=True).all_steps() == [2, 3]
  monkeypatch.undo()
  resumed = train.train(config, tmp_path, data=_toy_data())
  assert "Resuming from step 3" in capsys.readouterr().out
  assert resumed["start_step"] == 3
  _assert_same_run(straight_run, tmp_path, resumed)
  # The metrics of step 3, not fetched yet at the interrupt, were logged by it.
  assert [r["step"] for r in training_log.read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_during_an_evaluation_keeps_the_previous_checkpoint(
    straight_run, tmp_path, monkeypatch, capsys):
  config = straight_run[0]
  # Ctrl-C in the evaluation of step 4 (the second): step 4 is trained, not evaluated.
  _interrupt_on_call(monkeypatch, train, "validation_dice", 2)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, tmp_path, data=_toy_data())
  err = capsys.readouterr().err
  assert ("interrupted at step 4: no checkpoint saved (its evaluation had not finished); "
          "resuming starts again from step 2") in err
  assert checkpoints.manager(tmp_path, "latest", read_only=True).all_steps() == [2]
  monkeypatch.undo()
  resumed = train.train(config, tmp_path, data=_toy_data())
  assert resumed["start_step"] == 2
  _assert_same_run(straight_run, tmp_path, resumed)


@pytest.mark.slow
def test_resume_on_other_devices_warns(straight_run, tmp_path, capsys):
  config = straight_run[0]
  train.train(config, tmp_path, data=_toy_data(), stop_after=1)
  record = tmp_path / train.RUN_DEVICES_FILE
  recorded = json.loads(record.read_text())
  assert recorded == train.run_devices()
  assert recorded["device_count"] == jax.device_count()
  recorded["device_count"] += 7
  record.write_text(json.dumps(recorded))
  capsys.readouterr()
  train.train(config, tmp_path, data=_toy_data(), stop_after=2)
  err = capsys.readouterr().err
  assert f"started on {jax.device_count() + 7} " in err
  assert f"resumed on {jax.device_count()} " in err
  assert "NOT be bit-identical" in err
  # Same devices, or a run from before the record: no warning.
  assert train.devices_warning(straight_run[1]) is None
  record.unlink()
  assert train.devices_warning(tmp_path) is None


@pytest.mark.slow
def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _config("none", num_steps=4, eval_every=2, checkpoint_every=2)
  train.train(config, tmp_path, data=_toy_data(), stop_after=2)
  good = _params(tmp_path, config)
  bad = dict(_toy_data())
  bad["train"] = dict(bad["train"], image=bad["train"]["image"].copy())
  bad["train"]["image"][:, 40:80, 40:80, :] = np.nan  # in every training window
  with pytest.raises(TrainingError, match="non-finite training loss .* step 3.*step 2"):
    train.train(config, tmp_path, data=bad)
  mngr = checkpoints.manager(tmp_path, "latest", read_only=True)
  assert mngr.all_steps() == [2]
  after = _params(tmp_path, config)
  jax.tree.map(np.testing.assert_array_equal, good, after)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(after))


def test_load_params_without_checkpoint_is_an_input_error(tmp_path):
  with pytest.raises(InputError, match="train first"):
    checkpoints.load_params(_config(), tmp_path)
  with pytest.raises(InputError):
    checkpoints.load_params(_config(), tmp_path, which="newest")
