"""Where a result came from: the date, the code's git commit, the package versions, the device,
the command, and the config (with a short fingerprint) and data it was made from.

Written into results.json and the reports, so that any figure can be traced and remade.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys

from perfjax.data.writers import jsonable


def config_fingerprint(config) -> str:
  """A short hash of a config's values (equal configs, equal fingerprints)."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  text = json.dumps(jsonable(values), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _git(*args: str) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return None
  try:
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> str:
  """The git commit of the perfjax source (`+ local changes` when the tree differs), or the
  installed package version when it is not a git checkout."""
  commit = _git("rev-parse", "--short=12", "HEAD")
  if commit is None:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    try:
      return f"perfjax {metadata.version('perfjax')} (not a git checkout)"
    except metadata.PackageNotFoundError:
      return "unknown"
  dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "perfjax")
  return commit + (" + local changes" if dirty else "")


VERSIONED = ("perfjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
             "tensorflow-datasets", "ml_collections")


def package_versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": sys.version.split()[0]}
  for name in VERSIONED:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  return out


def provenance(config, data: dict | None = None) -> dict:
  """When, by which code and packages, from which config and data a result was made."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    device = f"{len(devices)} x {devices[0].platform} ({devices[0].device_kind})"
  except Exception:  # pylint: disable=broad-except
    device = "unknown"
  argv = sys.argv
  command = (" ".join(argv) if argv and os.path.basename(argv[0]) in
             ("launch.py", "perfjax", "__main__.py", "cli.py") else None)
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              code=code_version(), versions=package_versions(), device=device, command=command,
              config_fingerprint=config_fingerprint(config),
              config=config.to_dict() if hasattr(config, "to_dict") else dict(config),
              data=data or {})
