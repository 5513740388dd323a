r"""The `perfjax` command (also `python -m perfjax` and `python launch.py`).

  perfjax run --config=configs/patch3.py --workdir=runs/patch3        # train, then evaluate
  perfjax train --config=configs/patch3.py:tiny --workdir=/tmp/t        # train only
  perfjax evaluate --config=configs/patch3.py --workdir=runs/patch3     # results.json + report
  perfjax predict --config=configs/patch3.py --workdir=runs/patch3 --input=my_slices/ \
      --output=my_predictions/
  perfjax reproduce --config=configs/paper_experiments.py --workdir=runs/paper
  perfjax crossval --config=configs/paper_experiments.py:crossval --workdir=runs/crossval \
      --config.base.data.manual_dir=$HOME/perfusion_real        # Table 1 on real images
  perfjax ood-failures --config=configs/patch3.py --workdir=runs/patch3  # OOD AUC per failure
  perfjax run --config=patch3 --config.augment.mode=conventional --workdir=runs/patch3_conv

Without a command it runs `--mode` (default: train, then evaluate), as `python launch.py` does.

--config names a config file and an optional variant after ':' (`patch3.py:tiny`). The configs
shipped with perfjax (patch3, patch2, paper_experiments; perfjax/configs/) are found from any
directory, as `configs/patch3.py` or just `patch3`; a file of that name where you run the
command is used first. Fields are overridden with --config.<field>=<value>; unknown fields are
an error that lists the known ones.

Starting again with the same --workdir resumes training from its last complete checkpoint, and
skips the evaluation when results.json is current. Ctrl-C stops the run; the same command
resumes it. On a multi-host GPU cluster or TPU pod run the same command on every host with
--distributed (calls jax.distributed.initialize(), which reads the cluster from the environment:
TPU pods, SLURM, Open MPI; or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from absl import app
from absl import flags
from ml_collections import config_flags

MODES = ("train_and_evaluate", "train", "evaluate", "predict", "reproduce", "cross_validate",
         "ood_failures")
COMMANDS = {"run": "train_and_evaluate", "train": "train", "evaluate": "evaluate",
            "predict": "predict", "reproduce": "reproduce", "crossval": "cross_validate",
            "ood-failures": "ood_failures"}
# The experiment modes and the field that marks their config (configs/paper_experiments.py).
EXPERIMENT_FIELD = {"reproduce": "seeds", "cross_validate": "crossval"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/patch3.py or configs/patch3.py:tiny "
    "(the packaged configs are found from any directory; also as patch3, patch3:tiny).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", MODES,
                          "What to run (or give it as the command: run, train, evaluate, ...).")
_INPUT = flags.DEFINE_string(
    "input", None, "predict: a NIfTI file, a folder of NIfTI files / DICOM series, or "
    "split:NAME for a split of the config's dataset (default split:test).")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder (default WORKDIR/predictions).")
_FAILURE_SLICES = flags.DEFINE_integer(
    "failure_slices", 12, "ood_failures: clean phantom slices of the failure set (each failure "
    "type is made from each of them).", lower_bound=1)
_FAILURE_SEED = flags.DEFINE_integer("failure_seed", 0, "ood_failures: seed of the failure set.")
_FAILURE_TYPES = flags.DEFINE_list(
    "failure_types", None, "ood_failures: the failure types to score (default: all of "
    "perfjax.data.failures.FAILURE_TYPES), e.g. motion_8px,ghosting.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run first (jax.distributed.initialize(); "
    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID where no cluster manager is "
    "detected).")
flags.mark_flags_as_required(["config", "workdir"])


class UsageProblem(Exception):
  """A mistake on the command line: reported as one line, exit status 2."""


def _fail(message: str, status: int = 2):
  sys.stderr.write(f"error: {message}\n")
  sys.exit(status)


# ------------------------------------------------------------------------------ the config spec


def resolve_config_path(path: str) -> str:
  """The config file `path` names: the file itself, else the packaged config of that name.

  `configs/patch3.py`, `patch3.py` and `patch3` all name `perfjax/configs/patch3.py` when no
  such file exists where the command runs. Raises UsageProblem for anything else.
  """
  if os.path.isfile(path):
    return path
  from perfjax import configs  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
  if name in configs.NAMES and parent in ("", "configs"):
    return configs.path(name)
  if os.path.isdir(path):
    raise UsageProblem(f"--config={path} is a folder; name a config file such as "
                       "configs/patch3.py")
  raise UsageProblem(f"config file {path!r} not found (run from {os.getcwd()}); the packaged "
                     f"configs are {', '.join(configs.NAMES)}, e.g. --config=configs/patch3.py")


def _config_spec(argv: list[str]) -> tuple[int, str] | None:
  """(index, value) of the --config value in `argv` (`--config=X` or `--config X`)."""
  for i, arg in enumerate(argv[1:], 1):
    name = arg.lstrip("-")
    if arg.startswith("-") and name.startswith("config="):
      return i, name.split("=", 1)[1]
    if arg.startswith("-") and name == "config" and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None


def rewrite_argv(argv: list[str]) -> tuple[list[str], str | None]:
  """`argv` with the command turned into --mode and the config path resolved.

  Returns (argv, the config spec as the user wrote it).
  """
  argv = list(argv)
  if len(argv) > 1 and not argv[1].startswith("-"):
    command = argv[1]
    if command not in COMMANDS:
      raise UsageProblem(f"unknown command {command!r}; use one of {', '.join(COMMANDS)} "
                         "(perfjax --help)")
    given = [a for a in argv[2:] if a.lstrip("-").startswith("mode=")]
    if given and given[-1].split("=", 1)[1] != COMMANDS[command]:
      raise UsageProblem(f"command {command!r} and {given[-1]} disagree; give one of them")
    argv = [argv[0]] + [f"--mode={COMMANDS[command]}"] + argv[2:]
  found = _config_spec(argv)
  if found is None:
    return argv, None
  rest = _config_spec([argv[0]] + argv[found[0] + 1:])
  if rest is not None:
    raise UsageProblem(f"--config is given twice ({found[1]} and {rest[1]}); give one")
  index, spec = found
  path, sep, variant = spec.partition(":")
  resolved = resolve_config_path(path)
  value = resolved + sep + variant
  if argv[index].lstrip("-").startswith("config="):
    argv[index] = f"--config={value}"
  else:
    argv[index] = value
  return argv, spec


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


def _one_line(error: BaseException) -> str:
  """The innermost message of a (chained) exception, on one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    inner = error.__cause__ or error.__context__
    if not str(inner):
      break
    error = inner
  text = " ".join(str(error).split())
  return text or type(error).__name__


def parse_flags(argv: list[str], user_spec: str | None = None) -> list[str]:
  """absl's flag parsing; every mistake is one line on stderr and exit status 2."""
  spec = None
  found = _config_spec(argv)
  if found is not None:
    spec = found[1]
  shown = user_spec or spec
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags' error for an unknown field.
    config = None
    if spec:
      try:
        config = _load_config(spec)
      except Exception:  # pylint: disable=broad-except
        config = None
    bad = unknown_overrides(argv, config) if config is not None else []
    if not bad:
      _fail(f"--config={shown}: {_one_line(e)}")
    _fail(f"unknown config field(s) {', '.join(bad)} in {shown}; known fields: "
          f"{', '.join(_known_keys(config))}")
  except flags.Error as e:
    if "variant" in _one_line(e):
      _fail(f"--config={shown}: {_one_line(e)}")
    _fail(f"{' '.join(str(e).split())} (perfjax --help)")
  except Exception as e:  # pylint: disable=broad-except  (a config file that does not load)
    _fail(f"--config={shown}: {type(e).__name__}: {_one_line(e)}")
  return []  # Not reached.


# ------------------------------------------------------------------------------ process set-up


class _DropMessages(logging.Filter):
  """Drops log records whose message contains one of `needles` (library noise)."""

  def __init__(self, *needles: str):
    super().__init__()
    self.needles = needles

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(n in message for n in self.needles)


def quiet_libraries() -> None:
  """Silences what libraries print that means nothing to a perfjax user.

  The TPU probe of a CPU-only JAX, TFDS's 'Downloading and preparing dataset Unknown size'
  (nothing is downloaded: the phantom is generated) and its 'no dataset_info.json' warnings,
  orbax's INFO logging, and long progress bars in logs that are not a terminal (a bar line at
  most every 30 s, 100 columns wide).
  """
  logging.getLogger("absl").setLevel(logging.WARNING)
  noise = _DropMessages("Unable to initialize backend 'tpu'", "libtpu", "dataset_info.json",
                        "Dataset info", "Load dataset info from", "Reusing dataset",
                        "Constructing tf.data.Dataset")
  for name in ("absl", "jax._src.xla_bridge", "jax", "tensorflow_datasets"):
    logging.getLogger(name).addFilter(noise)
  warnings.filterwarnings("ignore", message=".*libtpu.*")
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  if not sys.stderr.isatty():
    # tqdm reads these defaults when it is first imported (perfjax imports it later).
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    os.environ.setdefault("TQDM_NCOLS", "100")


def _quiet_tfds() -> None:
  """TFDS's build messages in perfjax's words (the phantom is generated, not downloaded)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  builder = tfds.core.DatasetBuilder

  def building(self):
    print(f"Building dataset {self.name}/{self.builder_config.name if self.builder_config else ''}"
          f" (first use; generated, nothing is downloaded) in {self.data_dir} ...", flush=True)

  def built(self):
    print(f"Dataset built: {self.data_dir}", flush=True)

  builder._log_download_bytes = building  # pylint: disable=protected-access
  builder._log_download_done = built  # pylint: disable=protected-access
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()


# ------------------------------------------------------------------------------ the run


def _check_workdir(workdir: str) -> None:
  path = os.path.abspath(workdir)
  probe = path
  while probe and not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if os.path.exists(probe) and not os.path.isdir(probe):
    where = "is a file" if probe == path else f"is under {probe}, which is a file"
    raise UsageProblem(f"--workdir={workdir} {where}; give a folder (it is created if needed)")


def results_are_current(config, workdir: str) -> str | None:
  """Why `workdir`'s results.json is current for `config` (None when it is not).

  Current: written by an evaluation of this config (same fingerprint) after the best
  checkpoint was last saved.
  """
  from perfjax import provenance  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "results.json")
  best = os.path.join(workdir, "best")
  if not (os.path.isfile(path) and os.path.isdir(best)):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f).get("provenance") or {}
  except (OSError, ValueError):
    return None
  if recorded.get("config_fingerprint") != provenance.config_fingerprint(config):
    return None
  newest = max((os.path.getmtime(os.path.join(root, name))
                for root, _, names in os.walk(best) for name in names), default=0.0)
  if newest > os.path.getmtime(path):
    return None
  return f"results.json of {recorded.get('date', 'an earlier run')} is newer than the best " \
         "checkpoint and was made with the same config"


def _print_outputs(workdir: str, mode: str, output: str | None) -> None:
  lines = []
  if mode in ("train", "train_and_evaluate"):
    for name in ("train_summary.json", "training_curves.png"):
      if os.path.isfile(os.path.join(workdir, name)):
        lines.append(f"  training:  {os.path.join(workdir, name)}")
  if mode in ("evaluate", "train_and_evaluate"):
    for name, what in (("results.json", "results"), ("report.html", "report"),
                       ("figures", "figures")):
      if os.path.exists(os.path.join(workdir, name)):
        lines.append(f"  {what + ':':10} {os.path.join(workdir, name)}")
  if mode in EXPERIMENT_FIELD:
    for name in ("reproduce.json", "reproduce.html", "crossval.json", "crossval.html"):
      if os.path.exists(os.path.join(workdir, name)):
        lines.append(f"  {name}: {os.path.join(workdir, name)}")
  if mode == "predict":
    out = output or os.path.join(workdir, "predictions")
    lines.append(f"  predictions: {os.path.abspath(out)}")
  if mode == "ood_failures":
    for name in ("ood_failures.json", "ood_failures.md", "ood_failures.html",
                 "ood_failures_figures"):
      if os.path.exists(os.path.join(workdir, name)):
        lines.append(f"  {name}: {os.path.join(workdir, name)}")
  if lines:
    print("Written:\n" + "\n".join(lines), flush=True)


def main_after_flags(argv) -> None:
  if len(argv) > 1:
    raise UsageProblem(f"unexpected arguments: {' '.join(argv[1:])} (perfjax --help)")
  mode = _MODE.value
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  field = EXPERIMENT_FIELD.get(mode)
  if ("base" in config) != (field is not None) or (field and field not in config):
    raise UsageProblem("--mode=reproduce takes an experiment config "
                       "(configs/paper_experiments.py), --mode=cross_validate its :crossval "
                       "variant, and the other modes a training config "
                       "(configs/patch3.py, configs/patch2.py)")
  _check_workdir(workdir)
  # The process-wide set-up of the entry point, here and nowhere else: on a CPU one XLA host
  # device per core (before JAX initialises its backends; XLA_FLAGS with
  # --xla_force_host_platform_device_count=N chooses otherwise), a persistent compilation
  # cache, and quiet libraries.
  from perfjax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_host_devices()
  platform.configure_compilation_cache()
  if _DISTRIBUTED.value:  # Before any JAX computation; see platform.initialize_distributed.
    try:
      platform.initialize_distributed()
    except (ValueError, RuntimeError) as e:  # what JAX says of a missing or bad set-up
      raise UsageProblem(f"--distributed: {e} (set {platform.COORDINATOR_ENV}, "
                         f"{platform.NUM_PROCESSES_ENV} and {platform.PROCESS_ID_ENV}, or run "
                         "where JAX detects the cluster; README, Multi-device and "
                         "multi-host)") from None
  _quiet_tfds()
  from perfjax.errors import PerfjaxError  # pylint: disable=g-import-not-at-top
  step = mode
  try:
    if mode == "reproduce":
      from perfjax import reproduce  # pylint: disable=g-import-not-at-top
      reproduce.run_all(config, workdir)
    if mode == "cross_validate":
      from perfjax import crossval  # pylint: disable=g-import-not-at-top
      crossval.run_all(config, workdir)
    if mode in ("train", "train_and_evaluate"):
      from perfjax import train  # pylint: disable=g-import-not-at-top
      step = "train"
      train.train(config, workdir)
    if mode in ("evaluate", "train_and_evaluate"):
      step = "evaluate"
      current = results_are_current(config, workdir) if mode == "train_and_evaluate" else None
      if current:
        print(f"Evaluation skipped: {current}. --mode=evaluate (perfjax evaluate) redoes it.",
              flush=True)
      else:
        if os.path.isfile(os.path.join(workdir, "results.json")):
          print("Evaluating again: the results in the workdir are from another config or an "
                "older checkpoint; figures and report are replaced.", flush=True)
        from perfjax import evaluate  # pylint: disable=g-import-not-at-top
        evaluate.evaluate(config, workdir)
    if mode == "ood_failures":
      from perfjax import ood  # pylint: disable=g-import-not-at-top
      result = ood.failure_benchmark(config, workdir, seed=_FAILURE_SEED.value,
                                     n_slices=_FAILURE_SLICES.value,
                                     failure_types=_FAILURE_TYPES.value or None)
      print(ood.failure_table(result), flush=True)
    if mode == "predict":
      from perfjax import predict  # pylint: disable=g-import-not-at-top
      rows = predict.predict(config, workdir, input=_INPUT.value, output=_OUTPUT.value)
      if predict.n_failed(rows):  # The others are written; the summary line said how many.
        _print_outputs(workdir, mode, _OUTPUT.value)
        sys.exit(predict.EXIT_SOME_FAILED)
  except PerfjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    again = " ".join(sys.argv)
    if step in ("train", "train_and_evaluate", "reproduce", "cross_validate"):
      hint = "the same command resumes from the last complete checkpoint"
    else:
      hint = "the same command starts it again"
    sys.stderr.write(f"\ninterrupted during {step}; {hint}: {again}\n")
    sys.exit(130)
  _print_outputs(workdir, mode, _OUTPUT.value)


def _main(argv) -> None:
  # absl's app.run sets the absl logger's level from --verbosity after parsing: quiet it again
  # (orbax logs every save at INFO, TFDS every dataset read).
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    main_after_flags(argv)
  except UsageProblem as e:
    _fail(str(e))


def print_help() -> None:
  print(__doc__.strip())
  print("\nFlags:")
  for flag in (_CONFIG, _WORKDIR, _MODE, _INPUT, _OUTPUT, _FAILURE_SLICES, _FAILURE_SEED,
               _FAILURE_TYPES, _DISTRIBUTED):
    f = flags.FLAGS[flag.name]
    print(f"  --{f.name}: {f.help}")
  print("  --config.<field>=<value>: override a config field")
  print("  --helpfull: every flag, JAX's and absl's included")


def main(argv: list[str] | None = None) -> None:
  """Entry point of the `perfjax` command, `python -m perfjax` and `launch.py`."""
  argv = list(sys.argv if argv is None else argv)
  if (len(argv) == 1 or argv[1] == "help"
      or any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:])):
    print_help()
    sys.exit(0)
  quiet_libraries()
  try:
    argv, user_spec = rewrite_argv(argv)
  except UsageProblem as e:
    _fail(str(e))
  try:
    app.run(_main, argv=argv, flags_parser=lambda a: parse_flags(a, user_spec))
  except KeyboardInterrupt:  # Before the run started (imports, flag parsing).
    sys.stderr.write("\ninterrupted\n")
    sys.exit(130)


if __name__ == "__main__":
  main()
