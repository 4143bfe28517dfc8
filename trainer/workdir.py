"""The workdir: a lock against two runs, and the config a run started with.

Workdirs may be local or remote (`gs://...`, through etils.epath).
"""
from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import time
import uuid

from etils import epath

from configs import base as base_config


class WorkdirError(ValueError):
  """The workdir cannot be used by this run; the message says why."""


def is_remote(path: str) -> bool:
  return "://" in str(path)


def prepare(workdir: str) -> None:
  """Creates `workdir` and checks that it is writable."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {workdir} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    # Unique across hosts (equal pids are common in identical containers).
    probe = path / f".write_test_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: "
                       f"{e.strerror or e}") from e


class Lock:
  """An exclusive lock on `<workdir>/lock`, held for the whole run.

  The kernel drops it when the process dies, so a killed run never leaves a
  stale lock behind. Remote workdirs have no such lock: a warning says so.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    if is_remote(workdir):
      print(f"warning: {workdir} is remote and cannot be locked; make sure no "
            "other run uses it", flush=True)
      self._file = None
      return
    self._file = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"workdir {workdir} is in use by {holder}; wait for that run or "
            "choose another --workdir") from e
      raise
    self._file.truncate(0)
    self._file.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    self._file.flush()

  def release(self) -> None:
    if self._file is not None and not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


# Fields that change how the host runs or records the training, not what it
# trains: the batches and the updates are the same for any value (tests), so
# a resume may change them (another host shape, a log or checkpoint cadence,
# say) without --allow_config_change.
HOST_FIELDS = frozenset({
    "dataset.num_workers", "dataset.worker_processes",
    "dataset.prefetch_batches", "steps_in_flight", "log_every_steps",
    "eval_every_epochs", "checkpoint_every_steps", "checkpoint_every_minutes",
    "checkpoints_to_keep", "compilation_cache_dir", "program_cache"})


def _without_host_fields(tree: dict) -> dict:
  """A copy of the config `tree` (its JSON as a dict) without HOST_FIELDS."""
  tree = copy.deepcopy(tree)
  for field in HOST_FIELDS:
    *parents, leaf = field.split(".")
    node = tree
    for name in parents:
      node = node.get(name, {})
    node.pop(leaf, None)
  return tree


def without_host_fields(config) -> str:
  """`config` as JSON without HOST_FIELDS: what the run trains and
  compiles, so that compiled programs kept for one setting of them serve
  another (the program cache's context)."""
  return json.dumps(_without_host_fields(json.loads(config.to_json())),
                    sort_keys=True)


# Fields added after runs were recorded whose default is left unset for the
# platform to choose, each with what runs recorded without it trained with.
ADDED_UNSET_FIELDS = {"model.stem_space_to_depth": False}


def config_differences(saved: dict, current: dict) -> list[str]:
  """`field (old → new)` for every field that differs, sorted.

  A field that `saved` lacks and `current` holds at configs/base.py's default
  is no difference: a later version of this code added it, and its default
  is what the saved run trained with. A record without one of
  ADDED_UNSET_FIELDS, `saved` or `current`, is read as holding the value
  named there.
  """
  a, b = _flatten(saved), _flatten(current)
  for tree in (a, b):
    for k, trained in ADDED_UNSET_FIELDS.items():
      tree.setdefault(k, trained)
  defaults = _flatten(json.loads(base_config.get_base_config().to_json()))
  return [f"{k} ({a.get(k)!r} → {b.get(k)!r})"
          for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
          and not (k not in a and k in defaults and b[k] == defaults[k])]


def training_differences(a: dict, b: dict) -> list[str]:
  """config_differences of two configs (as JSON dicts) but HOST_FIELDS."""
  return config_differences(_without_host_fields(a), _without_host_fields(b))


def _saved_config(workdir: str):
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise WorkdirError(
        f"{path} is not valid JSON ({e}); it records the config this "
        "workdir's run trained with: restore it, or use a new --workdir") from e


def check_config(workdir: str, config, allow_change: bool = False) -> None:
  """Raises WorkdirError if the workdir's run had another config.

  Resuming under a different config would silently mix two experiments, so
  the differing fields are listed, unless `allow_change`; HOST_FIELDS may
  differ.
  """
  saved = _saved_config(workdir)
  if saved is None or allow_change:
    return
  differ = training_differences(saved, json.loads(config.to_json()))
  if differ:
    shown = ", ".join(differ[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    raise WorkdirError(
        f"workdir {workdir} holds a run of a different config: {shown}{more}; "
        "use a new --workdir, or pass --allow_config_change to resume with it")


def record_config(workdir: str, config) -> None:
  """Writes `<workdir>/config.json`; a different earlier record is kept as
  `config.<unix time>.json`."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json())
  saved = _saved_config(workdir)
  if saved == current:
    return
  if saved is not None:
    path.rename(path.parent / f"config.{int(time.time())}.json")
  tmp = path.parent / "config.json.tmp"
  tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
  tmp.rename(path)
