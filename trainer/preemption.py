"""Preemption: on SIGTERM, save at the next step boundary and exit 0.

On a multi-process run JAX's distributed runtime catches SIGTERM itself, and
`reached_preemption_sync_point` makes every process agree on the step to save
at: the step after the latest one any process has reported (0 before any),
and only a call with exactly that step answers True. A resumed run reports
every step up to its start, in order (`report_start`): a notice that came
before (from jax.distributed.initialize on: model init, the data checks)
was agreed at a step it passes there, and one during the rest of start-up
(restore, the first compile) at its first step. A single process installs
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
  sync; True if every process should stop at its first step (a notice was
  already agreed at or before `step`). A single process has nothing to
  report.

  Steps 1 to `step` are reported in order, as if the run had called at each
  (what JAX asks): a sync point agreed at k + 1, k the latest step any
  process had reported, is one no process has passed, so each meets it
  here (k < `step`) or at the loop's first step (k = `step`). Reporting
  `step` alone missed a notice that came before it: agreed at step 1. A
  million steps take about 0.3 s.
  """
  if jax.process_count() == 1:
    return False
  for s in range(1, step + 1):
    if multihost_utils.reached_preemption_sync_point(s):
      return True
  return False


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
