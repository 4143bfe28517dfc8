"""Every test process sees 8 virtual CPU devices compiled fast
(tests/xla_flags.py), and the session's runs share one JAX compilation cache
(both set before jax is imported)."""
import atexit
import os
import shutil
import tempfile

from tests import xla_flags

xla_flags.set_for_this_process()

# Runs of the same tiny config in different tests and subprocesses compile
# the same programs: the trainer reads JAX_COMPILATION_CACHE_DIR where a
# config names no cache, so they compile once per session. A developer's own
# setting is used instead, and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="grow_batch_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache():
  """The compilation cache shared by the session's runs (see above)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, xla_cache):
  """An uninterrupted one-process run of tests/tiny_run.py's config."""
  from tests import tiny_run
  workdir = str(tmp_path_factory.mktemp("reference"))
  r = tiny_run.run(workdir, xla_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir
