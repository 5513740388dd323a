"""JAX's multi-process runtime: two processes on this machine equal one process with two devices.

Each process of a distributed run has one CPU device and joins through
`jax.distributed.initialize` (coordinator 127.0.0.1 on a free port, JAX_NUM_PROCESSES=2,
JAX_PROCESS_ID=0/1), as `perfjax ... --distributed` does on a cluster (README, "Distributed").
The reference is one process with two XLA host devices (set in the subprocess's environment
only). Training (the `perfjax train` command, tiny config) gives the same losses and parameters,
and the sliding window split over both processes the same statistics.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from perfjax import checkpoints, platform, training_log

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of one subprocess: CPU only, `devices` XLA host devices."""
  env = {k: v for k, v in os.environ.items()
         if k not in (platform.COORDINATOR_ENV, platform.NUM_PROCESSES_ENV,
                      platform.PROCESS_ID_ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"{platform.HOST_DEVICE_FLAG}={devices}", **extra)
  return env


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
  return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run_one_and_two(argv_of, **env_extra) -> None:
  """Starts one 2-device process and two 1-device distributed processes; all must succeed.

  `argv_of(role)` is the command line of role "one" (the reference) or "two" (both distributed
  processes, which share it).
  """
  port = _free_port()
  procs = {"one": _start(argv_of("one"), _env(2, **env_extra))}
  for pid in range(2):
    procs[f"two/{pid}"] = _start(argv_of("two"), _env(
        1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(pid), **env_extra))
  try:
    logs = {name: p.communicate(timeout=TIMEOUT_S)[0] for name, p in procs.items()}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  for name, p in procs.items():
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs[name][-4000:]}"


def test_distributed_settings_from_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert platform.distributed_settings(env) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  assert platform.distributed_settings({}) == {}  # SLURM, Open MPI, TPU pods: detected by JAX
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    platform.distributed_settings({"JAX_PROCESS_ID": "first"})


@pytest.mark.slow
def test_cli_training_two_processes_equal_two_devices(tmp_path, small_data_dir):
  """`perfjax train --distributed` on two processes: the losses and parameters of one process
  with two devices, bit for bit (the same global batch, sharded the same way)."""
  def argv_of(role):
    return [sys.executable, "-m", "perfjax", "train", "--config=configs/patch3.py:tiny",
            "--config.augment.mode=conventional", f"--workdir={tmp_path / role}"] + (
                ["--distributed"] if role == "two" else [])

  _run_one_and_two(argv_of, PERFJAX_DATA_DIR=str(small_data_dir))
  losses = {role: [(r["step"], r["train/loss"]) for r in training_log.read_metrics(tmp_path / role)
                   if "train/loss" in r] for role in ("one", "two")}
  assert [s for s, _ in losses["one"]] == [1, 2, 3, 4]
  assert losses["two"] == losses["one"]
  summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
  assert summary["num_devices"] == 2 and summary["step"] == 4
  from perfjax.configs import patch3  # pylint: disable=g-import-not-at-top
  config = patch3.get_config("tiny")
  for which in ("latest", "best"):
    one = checkpoints.load_params(config, tmp_path / "one", which)[1]
    two = checkpoints.load_params(config, tmp_path / "two", which)[1]
    jax.tree.map(np.testing.assert_array_equal, one, two)


_SLIDING_WINDOW_SCRIPT = r"""
import os, sys
import numpy as np
from perfjax import platform
if os.environ.get(platform.NUM_PROCESSES_ENV):
  platform.initialize_distributed()
import jax
from perfjax import inference
from perfjax.fast_unet import UNetPredictor
from perfjax.model import UNet, numpy_params
assert jax.device_count() == 2
model = UNet(features=4, depth=2)
params = numpy_params(model, 3, seed=0, patch=8)
images = np.random.default_rng(1).random((2, 24, 20, 3)).astype(np.float32)
# The windows are split over all (global) devices; the fast path (whole-image first layer).
out = inference.sliding_window(UNetPredictor(model, fast=True), params, images, patch=8,
                               stride=2, chunk_size=16, devices=jax.devices())
if jax.process_index() == 0:
  np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
def test_sliding_window_over_two_processes_equals_two_devices(tmp_path):
  script = tmp_path / "sliding_window.py"
  script.write_text(_SLIDING_WINDOW_SCRIPT)
  _run_one_and_two(lambda role: [sys.executable, str(script), str(tmp_path / f"{role}.npz")])
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files)
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], atol=1e-6, err_msg=name)
