"""Preemption: on SIGTERM, save at the next step boundary and exit 0.

On a multi-process run JAX's distributed runtime catches SIGTERM itself, and
`reached_preemption_sync_point` makes every process agree on the step to save
at: the step after the latest one any process has reported. A resumed run
reports its starting step first (`report_start`, as soon as it knows it),
or a notice during start-up (restore, the first compile) would be agreed at
step 1, which a run resumed past it never reaches. A single process installs
its own handler, and treats Ctrl-C (SIGINT) the same way; a second Ctrl-C
stops at once, saving nothing more.
"""
from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


def report_start(step: int) -> bool:
  """Reports the step a multi-process run starts from to JAX's preemption
  sync; True if every process should stop there (a notice already agreed
  on it). A single process has nothing to report."""
  if jax.process_count() == 1:
    return False
  return multihost_utils.reached_preemption_sync_point(step)


class PreemptionWatcher:
  """Tells the step loop when a preemption notice has arrived; `requested`:
  one already has (report_start's answer)."""

  def __init__(self, requested: bool = False):
    self._requested = requested
    self.reason = "preempted"
    self._previous = {}
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self._requested:
        raise KeyboardInterrupt  # The second Ctrl-C: stop now.
      self.reason = "interrupted"
      print("interrupted: saving at the end of this step, then stopping "
            "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)
    self._requested = True

  def should_stop(self, step: int) -> bool:
    """True at the step boundary where every process should save and stop."""
    if jax.process_count() > 1:
      return (self._requested
              or multihost_utils.reached_preemption_sync_point(step))
    return self._requested

  def close(self) -> None:
    for signum, previous in self._previous.items():
      if previous is not None:  # None: not installed from Python.
        signal.signal(signum, previous)
    self._previous = {}
