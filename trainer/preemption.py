"""Preemption: on SIGTERM, save at the next step boundary and exit 0.

On a multi-process run JAX's distributed runtime catches SIGTERM itself, and
`reached_preemption_sync_point` makes every process agree on the step to save
at. A single process installs its own handler.
"""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Tells the step loop when a preemption notice has arrived."""

  def __init__(self):
    self._requested = False
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._requested = True

  def should_stop(self, step: int) -> bool:
    """True at the step boundary where every process should save and stop."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
