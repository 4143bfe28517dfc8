"""Orbax checkpoints of the train state and the data position.

One `CheckpointManager` under `<workdir>/checkpoints` holds, per saved step,
the state (params, batch-norm statistics, optimizer state, step) and a JSON
`meta` item with `examples_seen`, the stage and the run's wall time: the input
stream is keyed by (seed, examples seen), so that is all a resume needs to
continue exactly. Saves are asynchronous (the step loop does not wait for the
disk) and atomic (orbax writes to a temporary directory and renames it when
complete, so a half-written checkpoint is never listed). Replicated arrays
are written whole by one replica (see `MIN_SLICE_BYTES`).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
# Not exported by orbax 0.12 (setup.py pins <0.13); ArrayHandler needs it.
from orbax.checkpoint._src.metadata import array_metadata_store

# Orbax splits each replicated array into one slice per replica by default
# (not where JAX_PLATFORMS names a GPU), so that replicas write in parallel;
# every slice is a jitted slice of a device array. With data parallelism
# every array is replicated on every device, so a save sliced the train
# state into hundreds of small slices: 5 s of compiling at a run's first
# save, 0.23-0.37 s of dispatch in the step loop at each later one, for the
# 20k-parameter default model on 8 CPU devices. Below this many bytes per
# slice an array is written whole (0.04-0.1 s per save;
# benchmarks/checkpoint_save.py); ResNet-50's largest kernel is 4 MiB.
MIN_SLICE_BYTES = 1 << 20


def _register_array_handler(min_slice_bytes: int) -> None:
  """Registers, for the whole process, orbax's jax.Array handler with
  `min_slice_bytes` (0: orbax's default, every replicated array sliced)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          min_slice_bytes_for_replica_parallel=min_slice_bytes),
      override=True)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message says which."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def _shapes(tree) -> dict:
  """{('params', 'Conv_0', 'kernel'): shape} for every array leaf."""
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(step: int, saved, abstract_state) -> None:
  """CheckpointError when a checkpoint holds another model's arrays."""
  have, want = _shapes(saved), _shapes(abstract_state)
  differ = [f"{'/'.join(k)} {have.get(k)} vs {want.get(k)}"
            for k in sorted(have.keys() | want.keys()) if have.get(k) != want.get(k)]
  if differ:
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    raise CheckpointError(
        f"checkpoint step {step} holds another model (checkpoint vs this "
        f"config: {'; '.join(differ[:3])}{more}); use a new --workdir")


def _read_by_each_process(ok: bool) -> list[bool]:
  """Whether each process read the checkpoint it tried (the same step on
  every process, so they agree on what to do next)."""
  if jax.process_count() == 1:
    return [ok]
  return [bool(x) for x in multihost_utils.process_allgather(np.array(ok))]


class _KeptSteps:
  """orbax's preservation policy for the steps in a set that may grow (an
  adaptive run learns its stage boundaries as it decides them)."""

  def __init__(self, steps):
    self.steps = set(steps)

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


def newest_examples_seen(workdir: str) -> int:
  """Examples seen at the newest checkpoint in `workdir`, read without its
  state (where a resumed run will start); 0 if there is none or it cannot
  be read."""
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  directory = os.path.join(root, "checkpoints")
  if not epath.Path(directory).exists():
    return 0
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers=dict(meta=ocp.JsonCheckpointHandler()))
  try:
    step = manager.latest_step()
    if step is None:
      return 0
    meta = manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    return int(meta["examples_seen"])
  except Exception:  # pylint: disable=broad-except
    return 0  # The restore proper reports it; meanwhile check every stage.
  finally:
    manager.close()


class Checkpointer:
  """Saves every `every_steps` updates or `every_minutes`, and when forced.

  Keeps the latest `max_to_keep` checkpoints plus those at `keep_steps` (the
  stage boundaries; `keep` adds more). `min_slice_bytes`: see
  `MIN_SLICE_BYTES`.
  """

  def __init__(self, workdir: str, *, every_steps: int, every_minutes: float,
               max_to_keep: int, keep_steps=(), clock=time.monotonic,
               min_slice_bytes: int = MIN_SLICE_BYTES):
    root = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = os.path.join(root, "checkpoints")
    self._every_steps = every_steps
    self._every_seconds = 60.0 * every_minutes
    self._clock = clock  # Seconds; injectable for tests.
    self._last_save = clock()
    self._kept = _KeptSteps(keep_steps)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(max_to_keep), self._kept])
    _register_array_handler(min_slice_bytes)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def keep(self, steps) -> None:
    """Also keeps the checkpoints at `steps`, from the next save on."""
    self._kept.steps.update(steps)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state):
    """(state, meta) of the newest readable checkpoint, or None if none.

    A newest checkpoint that cannot be read (truncated, corrupt) is moved to
    `<workdir>/corrupt_checkpoints/` with a warning and the previous one is
    tried. If none can be read, CheckpointError names the first failure.
    Every process restores the same step: one that some processes read and
    others did not (a process-local fault, not a corrupt file) raises
    CheckpointError everywhere and sets nothing aside, so a rerun retries.
    """
    first_error = None
    for step in reversed(self.all_steps()):
      try:
        saved = self._manager.item_metadata(step)["state"]
      except Exception:  # pylint: disable=broad-except
        saved = None  # Unreadable metadata: let the restore below report it.
      if saved is not None:
        _check_shapes(step, saved, abstract_state)
      error = None
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        error = e
      read = _read_by_each_process(error is None)
      if any(read) and not all(read):
        why = (f"this process: {_first_line(error)}" if error is not None
               else "see the other processes' logs")
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} was read by "
            f"{sum(read)} of {len(read)} processes ({why}); nothing was set "
            "aside: rerun to retry")
      if error is not None:
        first_error = first_error or (step, error)
        print(f"warning: checkpoint step {step} in {self.directory} is "
              f"unreadable ({_first_line(error)}); trying the previous one",
              flush=True)
        continue
      if first_error is not None:
        self._set_aside(step)
      return restored["state"], dict(restored["meta"])
    if first_error is not None:
      step, e = first_error
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored into this model; "
          f"step {step}: {_first_line(e)}")
    return None

  def _set_aside(self, good_step: int) -> None:
    """Moves checkpoints newer than `good_step` out of orbax's directory, so
    the run re-creates them instead of skipping their steps."""
    if jax.process_index() == 0:
      aside = epath.Path(self.directory).parent / "corrupt_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      for step in self.all_steps():
        if step > good_step:
          target = aside / f"{step}-{int(time.time())}"
          (epath.Path(self.directory) / str(step)).rename(target)
          print(f"warning: moved unreadable checkpoint step {step} to {target}",
                flush=True)
    multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def due(self, step: int) -> bool:
    """True when the interval (steps, or minutes on process 0's clock) is up."""
    due = step % self._every_steps == 0
    if self._every_seconds > 0 and not due:
      late = self._clock() - self._last_save >= self._every_seconds
      if jax.process_count() > 1:  # Every process must agree to save.
        late = bool(multihost_utils.broadcast_one_to_all(np.array(late)))
      due = late
    return due

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save of `step` (skipped if already saved)."""
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._last_save = self._clock()

  def _save_error(self, step, error) -> CheckpointError:
    kept = self.all_steps()
    return CheckpointError(
        f"saving checkpoint step {step} in {self.directory} failed "
        f"({_first_line(error)}); earlier checkpoints {kept} are intact")

  def wait(self) -> None:
    """Waits for pending saves; raises CheckpointError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._manager.latest_step(), e) from e

  def close(self) -> None:
    """Waits for pending saves (raises CheckpointError if one failed), then
    releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()
