"""Compiled step functions kept on disk, loaded on the next launch untraced.

JAX's persistent compilation cache skips XLA's compile on a second launch,
but every function is still traced and lowered to find its cache entry: on
this repository's CPU runs 0.6 s a function for the small model and 2.5 s
for ResNet-50, so a second launch spent 0.23–0.27 of the first's compile
seconds (README, benchmarks/stage_switch.py). This cache stores the
executables themselves (`jax.experimental.serialize_executable`), under a
key made of everything the traced program can depend on:

* the caller's context (the trainer's config but for the fields that only
  say how the host runs it, `workdir.HOST_FIELDS`) and description of the
  function (its batch size, shapes, shardings, settings);
* the source text of the `trainer` and `models` packages;
* the versions of Python, jax, jaxlib, flax and optax, every `jax.config`
  value but where JAX caches and what it logs, and the XLA_FLAGS /
  LIBTPU_INIT_ARGS environment;
* the backend, its version, and this process's devices and index.

Any change to these is a miss (the function is compiled as before, then
stored). A file that fails to load is reported in one line and removed.
Only functions compiled in this process are stored: on XLA:CPU an
executable that JAX's persistent cache handed back serializes without its
kernels (running it after loading failed with "Function ... not found"),
so `StepCompiler` skips storing whatever `persistent_cache_hits` counted.
Loading runs pickle: point the cache only at a directory you trust, as
with JAX's own cache.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import platform
import sys
import threading
import uuid

import jax
from etils import epath
from jax.experimental import serialize_executable

_PACKAGES = ("trainer", "models")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARIES = ("jax", "jaxlib", "flax", "optax")
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = threading.local()


def _count_hit(event: str, **_) -> None:
  if event == _HIT_EVENT:
    _hits.count = getattr(_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


def persistent_cache_hits() -> int:
  """Hits of JAX's persistent compilation cache so far in this thread."""
  return getattr(_hits, "count", 0)


def _source_digest(root: str = _ROOT, packages=_PACKAGES) -> str:
  digest = hashlib.sha256()
  for package in packages:
    for folder, dirs, files in os.walk(os.path.join(root, package)):
      dirs.sort()
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          digest.update(os.path.relpath(path, root).encode())
          with open(path, "rb") as f:
            digest.update(f.read())
  return digest.hexdigest()


# jax.config values that change no program: where JAX keeps its own cache
# (a workdir's, by default: a copied or moved workdir would miss) and what
# it logs.
_NOT_IN_KEY = frozenset({"jax_compilation_cache_dir", "jax_log_compiles",
                         "jax_explain_cache_misses", "jax_logging_level",
                         "jax_debug_log_modules"})


def _environment() -> list[str]:
  """What outside the caller's description can change a compiled program."""
  from importlib import metadata
  devices = jax.local_devices()
  client = devices[0].client
  return [
      sys.version, platform.machine(),
      *(f"{lib} {metadata.version(lib)}" for lib in _LIBRARIES),
      *(f"{k}={v!r}" for k, v in sorted(jax.config.values.items())
        if k not in _NOT_IN_KEY),
      *(f"{k}={os.environ.get(k, '')}" for k in ("XLA_FLAGS",
                                                  "LIBTPU_INIT_ARGS")),
      client.platform, client.platform_version,
      f"process {jax.process_index()} of {jax.process_count()}",
      *(f"{d.id} {d.device_kind}" for d in jax.devices()),
  ]


def _error(e: Exception) -> str:
  """"Type: first line of the message", for a one-line report."""
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class ProgramCache:
  """Executables under `directory`, one file per description.

  `context` names what the functions' code closes over that no description
  shows (the trainer passes its config as JSON, less HOST_FIELDS: model,
  optimizer...).
  """

  def __init__(self, directory: str, context: str, *,
               source_digest: str | None = None):
    self.directory = epath.Path(directory)
    self._base = [context, source_digest or _source_digest(), *_environment()]

  def _path(self, description: str):
    key = hashlib.sha256("\n".join([*self._base, description]).encode())
    return self.directory / f"{key.hexdigest()}.program"

  def contains(self, description: str) -> bool:
    return self._path(description).exists()

  def load(self, description: str, devices):
    """The compiled function stored under `description`, or None; `devices`
    are those it was compiled for, in its device assignment's order."""
    path = self._path(description)
    if not path.exists():
      return None
    try:
      payload, in_tree, out_tree = pickle.loads(path.read_bytes())
      return serialize_executable.deserialize_and_load(
          payload, in_tree, out_tree, execution_devices=list(devices))
    except Exception as e:  # pylint: disable=broad-except
      print(f"program cache: could not load {path} ({_error(e)}); removed "
            "it, compiling instead", flush=True)
      path.unlink(missing_ok=True)
      return None

  def store(self, description: str, compiled) -> None:
    """Writes `compiled` (whole file or nothing: write, then rename)."""
    path = self._path(description)
    try:
      blob = pickle.dumps(serialize_executable.serialize(compiled))
      self.directory.mkdir(parents=True, exist_ok=True)
      partial = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
      partial.write_bytes(blob)
      partial.replace(path)  # Overwrites an entry that failed to load.
    except Exception as e:  # pylint: disable=broad-except
      # A cache that cannot be written costs the next launch a compile only.
      print(f"program cache: could not store {path} ({_error(e)})",
            flush=True)
