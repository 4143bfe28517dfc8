"""A preemption notice before a multi-process run reports its starting step
(tests/test_multihost.py).

`python tests/early_notice.py FLAGS...` is `python -m trainer.main FLAGS...`
in which every process gets SIGTERM just before `preemption.report_start`
(as if it came during model init or the data checks) and waits there until
JAX's distributed runtime has agreed on the step to save at.
"""
import os
import runpy
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
from jax._src import distributed  # pylint: disable=wrong-import-position

from trainer import preemption  # pylint: disable=wrong-import-position

# Where XLA's preemption sync manager puts each task's reported step (its
# PreemptionSyncManager::ComputeSyncCallCounter), holding the lock that a
# reached_preemption_sync_point call waits for until the sync point is set.
_COUNTERS = "PREEMPTION_CURRENT_COUNTER/"


def notice_and_wait(timeout: float = 60.0) -> None:
  """SIGTERM to this process (JAX's handler takes it); returns once every
  process has reported its step for the sync point: the next
  reached_preemption_sync_point call answers by the agreed one."""
  os.kill(os.getpid(), signal.SIGTERM)
  deadline = time.monotonic() + timeout
  while len(distributed.global_state.client.key_value_dir_get(_COUNTERS)) < (
      jax.process_count()):
    if time.monotonic() > deadline:
      raise TimeoutError("no preemption sync after SIGTERM")
    time.sleep(0.05)


if __name__ == "__main__":
  _report_start = preemption.report_start

  def _late_report_start(step):
    notice_and_wait()
    return _report_start(step)

  preemption.report_start = _late_report_start
  sys.argv[0] = "trainer.main"
  runpy.run_module("trainer.main", run_name="__main__", alter_sys=True)
