"""Test-wide settings: CPU only, no display, a temporary home for matplotlib and IPython."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
_HOME = tempfile.mkdtemp(prefix="perfjax-test-home-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_HOME, "matplotlib"))
os.environ.setdefault("IPYTHONDIR", os.path.join(_HOME, "ipython"))
