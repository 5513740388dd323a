"""Explicit, opt-in process set-up: XLA host devices, the persistent compilation cache, the
multi-process runtime and the per-program CPU fusion options.

Nothing here runs at import. `launch.py` calls `configure_host_devices()` and
`configure_compilation_cache()` in its `main()`;
notebooks, benchmarks and scripts that want the same programs call it themselves, first thing,
before any JAX computation (JAX fixes its devices when it first initialises a backend):

    from perfjax import platform
    platform.configure_host_devices()   # one XLA host device per core (a power of two, <= 4)

The YNNPACK fusion of XLA:CPU is not a process-wide flag either: the programs it speeds up (the
UNet's train step and sliding window) pass `cpu_fusion_options(...)` to
`jax.jit(..., compiler_options=...)`, and other programs (the Fermi solver, which the eltwise
fusion cannot compile) choose their own kinds.
"""
from __future__ import annotations

import os

import jax

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"

_FUSION_KINDS = {"dot": "LIBRARY_FUSION_TYPE_DOT", "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
                 "reduce": "LIBRARY_FUSION_TYPE_REDUCE"}


def cpu_device_count(cores: int | None = None) -> int:
  """XLA host devices on a CPU: the largest power of two <= the usable cores, at most 4.

  Each device runs its share of the sliding windows (or of the training batch) on its own
  thread, which keeps the cores busy through the serial parts of the computation
  (benchmarks/RESULTS.md). Powers of two up to 4 divide every config's batch size.
  """
  cores = len(os.sched_getaffinity(0)) if cores is None else cores
  return max(1, min(4, 1 << (max(cores, 1).bit_length() - 1)))


def configure_host_devices(count: int | None = None) -> int | None:
  """Asks JAX for `count` CPU devices (default `cpu_device_count()`); call before any JAX work.

  Leaves the choice to the user when XLA_FLAGS already names
  `--xla_force_host_platform_device_count`
  and returns None then, as it does when JAX's backends are already initialised (too late to
  change: a warning says so). Otherwise returns the count it set. Affects the CPU platform only;
  on a GPU/TPU host the accelerator is used as before.
  """
  if HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  count = cpu_device_count() if count is None else int(count)
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:  # Backends already initialised.
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn(f"perfjax.platform.configure_host_devices({count}) came too late: {e}",
                  stacklevel=2)
    return None
  return count


COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # the user's own choice, left alone
COMPILATION_CACHE_OFF_ENV = "PERFJAX_COMPILATION_CACHE"  # "0": no persistent cache
COMPILATION_CACHE_MIN_SECONDS = 0.5  # programs that compile faster are not worth a file


def default_compilation_cache_dir() -> str:
  """`$XDG_CACHE_HOME/perfjax/xla` (default `~/.cache/perfjax/xla`), beside the datasets."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "perfjax", "xla")


def configure_compilation_cache(path: str | None = None) -> str | None:
  """JAX's persistent compilation cache in `path` (default `default_compilation_cache_dir()`),
  so that a later run of the same programs (the training step, the sliding windows, the Fermi
  solves) loads them instead of compiling again; call before any JAX work.

  Returns the folder, or None where the user chose otherwise (`JAX_COMPILATION_CACHE_DIR` set:
  JAX uses it as it is; `PERFJAX_COMPILATION_CACHE=0`: no cache) or the folder cannot be
  made. It grows with each new program (a few MB each); delete the folder to empty it.
  """
  if os.environ.get(COMPILATION_CACHE_ENV) or os.environ.get(COMPILATION_CACHE_OFF_ENV) == "0":
    return None
  path = path or default_compilation_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILATION_CACHE_MIN_SECONDS)
  return path


# The variables `initialize_distributed` reads where no cluster manager is detected (jax itself
# reads only JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS).
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_settings(environ=None) -> dict[str, object]:
  """The arguments of `jax.distributed.initialize` that the environment names.

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; the
  ones not set are left to JAX's cluster detection (TPU pods, SLURM, Open MPI, Kubernetes).
  """
  environ = os.environ if environ is None else environ
  settings: dict[str, object] = {}
  if environ.get(COORDINATOR_ENV):
    settings["coordinator_address"] = environ[COORDINATOR_ENV]
  for name, key in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
    if environ.get(name):
      try:
        settings[key] = int(environ[name])
      except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer") from None
  return settings


def initialize_distributed(environ=None) -> tuple[int, int]:
  """`jax.distributed.initialize(**distributed_settings())`: joins a multi-process run.

  Call it before any JAX computation, on every process. Returns (process index, process
  count).
  """
  jax.distributed.initialize(**distributed_settings(environ))
  return jax.process_index(), jax.process_count()


def cpu_fusion_options(*kinds: str) -> dict[str, str]:
  """`compiler_options` turning on XLA:CPU's YNNPACK fusion of `kinds` (dot, eltwise, reduce).

  The same as XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=<kinds> for one program (bit for
  bit). Only CPU compilers read the option.
  """
  unknown = set(kinds) - set(_FUSION_KINDS)
  if unknown:
    raise ValueError(f"unknown YNN fusion kinds {sorted(unknown)}; use {sorted(_FUSION_KINDS)}")
  return {"xla_cpu_experimental_ynn_fusion_type": ",".join(_FUSION_KINDS[k] for k in kinds)}


# The UNet's programs (train step, sliding window): dot + eltwise + reduce, about 1.3-1.5x faster
# on x86 CPUs than without, same outputs to ~1e-6 (benchmarks/RESULTS.md).
UNET_CPU_OPTIONS = cpu_fusion_options("dot", "eltwise", "reduce")


def compiler_options_for(platform_name: str, options: dict[str, str]) -> dict[str, str] | None:
  """`options` for a CPU program, None for any other platform's."""
  return dict(options) if platform_name == "cpu" else None
