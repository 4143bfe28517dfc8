"""Orbax checkpoints of the train state and the data position.

One `CheckpointManager` under `<workdir>/checkpoints` holds, per saved step,
the state (params, batch-norm statistics, optimizer state, step) and a JSON
`meta` item with `examples_seen` and the stage: the input stream is keyed by
(seed, examples seen), so that is all a resume needs to continue exactly.
Saves are asynchronous: the step loop does not wait for the disk.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every_steps` updates and when asked (stage boundaries)."""

  def __init__(self, workdir: str, *, every_steps: int, max_to_keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state):
    """(state, meta) of the latest checkpoint, sharded like `abstract_state`;
    None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def maybe_save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts an asynchronous save when due (or forced); True if it did."""
    if not force and step % self._every_steps:
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
