r"""Trains and evaluates a patch UNet; the one entry point of perfjax.

  python launch.py --config=configs/patch3.py --workdir=runs/patch3           # train + evaluate
  python launch.py --config=configs/patch2.py --workdir=runs/patch2
  python launch.py --config=configs/patch3.py:tiny --workdir=/tmp/t --mode=train
  python launch.py --config=configs/patch3.py --workdir=runs/patch3 --mode=evaluate
  python launch.py --config=configs/patch3.py --workdir=runs/patch3 --mode=predict \
    --input=study_dir --output=out_dir
  python launch.py --config=configs/patch3.py --config.augment.mode=conventional \
    --config.train.num_steps=2000 --workdir=runs/patch3_conv
  python launch.py --config=configs/paper_experiments.py --workdir=runs/paper --mode=reproduce

Starting again with the same --workdir resumes training from its last complete checkpoint.
Config fields are overridden with --config.<field>=<value>; unknown fields are an error.
On a multi-host GPU cluster or TPU pod run the same command on every host with --distributed
(calls jax.distributed.initialize(), which reads the cluster from the environment: TPU pods,
SLURM, Open MPI; or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""
import os
import sys



def cpu_device_count(cores: int | None = None) -> int:
  """XLA host devices on a CPU: the largest power of two <= the usable cores, at most 4.

  Each device runs its share of the sliding windows (or of the training batch) on its own
  thread, which keeps the cores busy through the serial parts of the computation
  (benchmarks/RESULTS.md). Powers of two up to 4 divide every config's batch size.
  """
  cores = len(os.sched_getaffinity(0)) if cores is None else cores
  return max(1, min(4, 1 << (max(cores, 1).bit_length() - 1)))


# XLA reads its flags once, when jax initialises its backends: set them before importing jax.
# The YNN fusion makes the UNet about 1.3-1.5x faster on x86 CPUs (same outputs to ~1e-6).
# They concern the CPU platform only; on a GPU/TPU host the accelerator is used as before.
XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
                 f"--xla_force_host_platform_device_count={cpu_device_count()}")


def xla_flags(current: str) -> str:
  """`current` XLA_FLAGS plus perfjax's CPU flags, unless the user already set those flags."""
  parts = current.split()
  for flag in XLA_CPU_FLAGS:
    name = flag.split("=")[0]
    if not any(p.split("=")[0] == name for p in parts):
      parts.append(flag)
  return " ".join(parts)


os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ("train_and_evaluate", "train", "evaluate", "predict", "reproduce")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/patch3.py or configs/patch3.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", MODES, "What to run.")
_INPUT = flags.DEFINE_string(
    "input", None, "predict: a NIfTI file, a folder of NIfTI files / DICOM series, or "
    "split:NAME for a split of the config's dataset (default split:test).")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder (default WORKDIR/predictions).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config(spec: str):
  """get_config() of a `path[:variant]` config spec (as config_flags loads it)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_perfjax_launch_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def unknown_overrides(argv: list[str], config) -> list[str]:
  """The `--config.<path>` arguments of `argv` whose path is not a field of `config`."""
  bad = []
  for arg in argv[1:]:
    if not arg.lstrip("-").startswith("config."):
      continue
    path = arg.lstrip("-")[len("config."):].split("=", 1)[0]
    node = config
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        bad.append(path)
        break
      node = node[part]
  return bad


def _known_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for name in config.keys():
    value = config[name]
    keys += _known_keys(value, f"{prefix}{name}.") if hasattr(value, "keys") else [prefix + name]
  return keys


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear message for an unknown --config.<field>."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):  # config_flags' error for an unknown field.
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.lstrip("-").startswith("config=")),
                None)
    config = _load_config(spec) if spec else None
    bad = unknown_overrides(argv, config) if config is not None else []
    if not bad:
      raise
    sys.stderr.write(f"error: unknown config field(s) {', '.join(bad)} in {spec}; known "
                     f"fields: {', '.join(_known_keys(config))}\n")
    sys.exit(2)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mode = _MODE.value
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from perfjax.errors import PerfjaxError  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  if ("base" in config) != (mode == "reproduce"):
    raise app.UsageError("--mode=reproduce takes an experiment config "
                         "(configs/paper_experiments.py) and the other modes a training config "
                         "(configs/patch3.py, configs/patch2.py)")
  try:
    if mode == "reproduce":
      from perfjax import reproduce  # pylint: disable=g-import-not-at-top
      reproduce.run_all(config, workdir)
    if mode in ("train", "train_and_evaluate"):
      from perfjax import train  # pylint: disable=g-import-not-at-top
      train.train(config, workdir)
    if mode in ("evaluate", "train_and_evaluate"):
      from perfjax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate(config, workdir)
    if mode == "predict":
      from perfjax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.predict(config, workdir, input=_INPUT.value, output=_OUTPUT.value)
  except PerfjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
