"""dataset.worker_processes: the same batches as threads, errors as one line
(a worker's own DataError: test_input_errors), nothing left behind."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from input_pipeline import DataError
from input_pipeline import eval_batches
from input_pipeline import train_batches
from tests.test_input_errors import _raises
from tests.test_input_stream import _assert_same
from tests.test_input_stream import _config
from tests.test_input_stream import _stream
from trainer import plan as plan_lib


@pytest.mark.parametrize("augment_kind", ["pad_crop_flip", "inception"])
def test_worker_processes_give_the_same_stream(augment_kind):
  """Every stage (the batch grows, so each thread's block grows), pixel for
  pixel and label for label."""
  config = _config(augment_kind=augment_kind)
  threads = _stream(config)
  config.dataset.worker_processes = 2
  processes = _stream(config)
  assert len({len(b["label"]) for b in processes}) > 1  # Several stages.
  _assert_same(processes, threads)


def test_worker_processes_give_the_same_eval_batches():
  config = _config(augment_kind="inception")
  with eval_batches(config, 48) as batches:
    threads = list(batches)
  config.dataset.worker_processes = 2
  with eval_batches(config, 48) as batches:
    processes = list(batches)
  assert len(processes) == len(threads) > 1
  for a, b in zip(processes, threads):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])


# Tasks already submitted when the worker dies fail; once the pool knows
# (after `settle` seconds), it refuses new ones.
@pytest.mark.parametrize("settle,prefetch", [(0.0, 2), (2.0, 0)])
def test_a_dead_worker_process_stops_the_pipeline_with_one_line(settle,
                                                                 prefetch):
  config = _config()
  config.dataset.worker_processes = 2
  config.dataset.prefetch_batches = prefetch
  with train_batches(config, plan_lib.plan_from_config(config)) as batches:
    next(batches)
    processes = batches._on_close.__self__._pool._processes  # pylint: disable=protected-access
    os.kill(next(iter(processes)), signal.SIGKILL)
    time.sleep(settle)
    _raises(r"^an input worker process died .*; lower "
            r"dataset.worker_processes if the host ran out of memory, or set "
            r"it to 0 to read in threads$", list, batches)


def test_closing_stops_the_processes_and_frees_their_memory():
  config = _config()
  config.dataset.worker_processes = 2
  batches = train_batches(config, plan_lib.plan_from_config(config))
  next(batches)
  workers = batches._on_close.__self__  # pylint: disable=protected-access
  pids = list(workers._pool._processes)  # pylint: disable=protected-access
  names = [block.name for block in workers._blocks]  # pylint: disable=protected-access
  assert len(pids) == 2 and names
  batches.close()
  assert list(batches) == []
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  assert not [n for n in names if os.path.exists(f"/dev/shm/{n.lstrip('/')}")]


ROOT = pathlib.Path(__file__).resolve().parent.parent
_PARENT = """
import sys, time
sys.path.insert(0, {root!r})
from input_pipeline import train_batches
from tests.test_input_stream import _config
from trainer import plan as plan_lib
if __name__ == "__main__":
  config = _config()
  config.dataset.worker_processes = 2
  batches = train_batches(config, plan_lib.plan_from_config(config))
  next(batches)
  print(*batches._on_close.__self__._pool._processes, flush=True)
  time.sleep(300)
"""


def _running(pid: int) -> bool:
  """Whether `pid` exists and has not exited (a zombie has)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_worker_processes_end_when_their_parent_is_killed(tmp_path):
  """A trainer killed outright (SIGKILL, the OOM killer) cannot shut its
  workers down; they notice within about a second and exit."""
  script = tmp_path / "parent.py"
  script.write_text(_PARENT.format(root=str(ROOT)))
  parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    line = parent.stdout.readline()
    while line.startswith("input_pipeline:"):  # Its notice comes first.
      line = parent.stdout.readline()
    pids = [int(p) for p in line.split()]
  finally:
    parent.kill()
    parent.wait()
  assert len(pids) == 2 and all(_running(p) for p in pids)
  deadline = time.monotonic() + 15
  while time.monotonic() < deadline and any(_running(p) for p in pids):
    time.sleep(0.2)
  assert not [p for p in pids if _running(p)]


def test_negative_worker_processes_is_refused():
  config = _config()
  config.dataset.worker_processes = -1
  with pytest.raises(DataError, match=r"^dataset.worker_processes=-1 must not "
                     r"be negative \(0: read in this process's threads\)$"):
    train_batches(config, plan_lib.plan_from_config(config))
