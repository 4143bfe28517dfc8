"""Every test process sees 8 virtual CPU devices (set before jax is imported)."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
  """A compilation cache shared by the subprocess runs of one session."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, xla_cache):
  """An uninterrupted one-process run of tests/tiny_run.py's config."""
  from tests import tiny_run
  workdir = str(tmp_path_factory.mktemp("reference"))
  r = tiny_run.run(workdir, xla_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir
