"""The sharded batch of each training step, fed to the devices ahead of the step.

`BatchFeeder` runs a background thread that turns each step's example indices
(`perfjax.inputs.batch_indices`, a pure function of (seed, step)) into the step's batch, sharded
over the "data" axis of the mesh: gathered on the devices from windows kept there when they fit
(`windows_fit_on_device`), else gathered on the host (`shard_batch`) and transferred ahead.
Multi-process runs feed each process's own rows (`local_rows`).
"""
from __future__ import annotations

import functools
import queue
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perfjax import inputs


def shard_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Global arrays sharded on "data" from this process's rows of the global batch."""
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_rows(indices: np.ndarray) -> np.ndarray:
  """This process's share of the global batch indices (all of them on a single host)."""
  return np.split(indices, jax.process_count())[jax.process_index()]


# Training windows live on the accelerator when they take at most this share of its memory.
DEVICE_WINDOWS_MEMORY_SHARE = 0.25
PREFETCH_BATCHES = 2


def windows_fit_on_device(num_bytes: int, devices) -> bool:
  """Whether the training windows (`num_bytes`) should be kept on every device.

  Accelerators with a known memory limit: when the windows take at most
  DEVICE_WINDOWS_MEMORY_SHARE of it. CPUs: never (their "device" memory is the host's; a
  background thread assembling the batch costs nothing next to a CPU step).
  """
  device = devices[0]
  if device.platform == "cpu":
    return False
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  return bool(limit) and num_bytes <= DEVICE_WINDOWS_MEMORY_SHARE * limit


def put_replicated(mesh: Mesh, array: np.ndarray) -> jax.Array:
  """A host array (the same on every process) replicated on all devices of `mesh`."""
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, PartitionSpec()),
                                      lambda index: array[index])


@functools.lru_cache(maxsize=8)
def _jit_take(mesh: Mesh):
  """Rows `indices` [B] (sharded on "data") of device-resident windows, sharded on "data"."""
  return jax.jit(lambda windows, indices: {k: v[indices] for k, v in windows.items()},
                 out_shardings=NamedSharding(mesh, PartitionSpec("data")))


class BatchFeeder:
  """The sharded batch of each step, assembled ahead of the step that needs it.

  A background thread computes each step's indices (`inputs.batch_indices`: a pure function of
  (seed, step), so the batches are the same however they are fed) and either sends them to the
  devices, which gather the batch from windows kept there (`on_device=True`), or gathers this
  process's rows on the host and starts their transfer (`shard_batch`). Up to PREFETCH_BATCHES
  batches wait in a queue; `get(step)` hands them out in order.
  """

  def __init__(self, mesh: Mesh, windows: dict[str, np.ndarray], seed: int, batch_size: int,
               start_step: int, stop_step: int, on_device: bool | None = None):
    self.mesh, self.windows = mesh, windows
    self.num_examples = len(next(iter(windows.values())))
    self.seed, self.batch_size = int(seed), int(batch_size)
    if on_device is None:
      on_device = windows_fit_on_device(sum(v.nbytes for v in windows.values()),
                                        mesh.devices.flat)
    self.on_device = bool(on_device)
    self.device_windows = ({k: put_replicated(mesh, v) for k, v in windows.items()}
                           if self.on_device else None)
    self._queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    self._stop = threading.Event()
    self._next = int(start_step)
    self._thread = threading.Thread(target=self._produce, args=(int(start_step), int(stop_step)),
                                    daemon=True, name="perfjax-batches")
    self._thread.start()

  def _assemble(self, step: int):
    rows = local_rows(inputs.batch_indices(self.seed, step, self.num_examples, self.batch_size))
    if self.on_device:
      sharding = NamedSharding(self.mesh, PartitionSpec("data"))
      return jax.make_array_from_process_local_data(sharding, rows.astype(np.int32))
    return shard_batch(self.mesh, {k: v[rows] for k, v in self.windows.items()})

  def _produce(self, start: int, stop: int) -> None:
    for step in range(start, stop):
      try:
        item = (step, self._assemble(step), None)
      except Exception as e:  # pylint: disable=broad-except  (re-raised by get())
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or item[2] is not None:
        return

  def get(self, step: int) -> dict[str, jax.Array]:
    """The batch of `step` (steps are asked for in order from `start_step`)."""
    if step != self._next:
      raise ValueError(f"batch of step {step} asked for, step {self._next} is next")
    got_step, batch, error = self._queue.get()
    if error is not None:
      raise error
    assert got_step == step, (got_step, step)
    self._next += 1
    if self.on_device:
      return _jit_take(self.mesh)(self.device_windows, batch)
    return batch

  def close(self) -> None:
    """Stops the thread (batches already queued are dropped)."""
    self._stop.set()
    self._thread.join(timeout=10)
