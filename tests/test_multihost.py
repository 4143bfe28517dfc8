"""Two processes (4 virtual CPU devices each, gloo collectives) train exactly
what one process with 8 devices trains, and their checkpoint resumes in one
process of another device count."""
import os
import re
import shutil
import signal
import subprocess
import sys

import portpicker
import pytest

from tests import xla_flags
from tests.tiny_run import (ENV, TOTAL_STEPS, assert_same_state,
                            checkpoint_steps, command, final_state, run)
from trainer import metrics as metrics_lib


def _two_processes(workdir, cache, *extra, sigterm_after=None, check=True,
                   runner=None, env=None):
  """The tiny run as two processes of 4 devices each; their outputs. With
  `sigterm_after`, both get SIGTERM once process 0 prints that text;
  `runner` replaces `-m trainer.main`; `check`: both must exit 0."""
  port = portpicker.pick_unused_port()
  env = dict(env or ENV, XLA_FLAGS=xla_flags.xla_flags(4))
  commands = [command(workdir, cache, f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}", *extra)
              for i in range(2)]
  if runner:
    commands = [[c[0], runner, *c[3:]] for c in commands]
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "300", *c],  # Distributed JAX catches SIGTERM.
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for c in commands]
  head = []
  if sigterm_after is not None:
    for line in procs[0].stdout:
      head.append(line)
      if sigterm_after in line:
        for p in procs:
          p.send_signal(signal.SIGTERM)  # `timeout` passes it on.
        break
  outs = [p.communicate() for p in procs]
  outs[0] = ("".join(head) + outs[0][0], outs[0][1])
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0 or not check, err[-3000:]
  return (outs, [p.returncode for p in procs]) if not check else outs


@pytest.fixture(scope="module")
def two_run(tmp_path_factory, xla_cache):
  """The tiny run as two processes: its workdir and outputs."""
  two = str(tmp_path_factory.mktemp("two"))
  return two, _two_processes(two, xla_cache)


@pytest.fixture(scope="module")
def runs(xla_cache, tiny_reference, two_run):
  return (xla_cache, tiny_reference, *two_run)


def _assert_same_training(single, two):
  a = metrics_lib.read_metrics(single, "train")
  b = metrics_lib.read_metrics(two, "train")
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(
      range(1, TOTAL_STEPS + 1))
  for x, y in zip(a, b):
    assert x["batch_size"] == y["batch_size"]
    assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
  # Gradients summed in another order over 28 steps: equal to ~1e-6 absolute.
  assert_same_state(final_state(single), final_state(two), rtol=1e-3, atol=2e-5)


def test_two_processes_match_one(runs):
  _, single, two, outs = runs
  assert "2 process(es), 8 devices (4 on process 0)" in outs[0][0]
  assert "step 28/28" not in outs[1][0]  # Only process 0 reports.
  _assert_same_training(single, two)


def test_two_processes_reading_in_worker_processes_match_one(runs, tmp_path):
  """Each host's slice read by worker processes of its own (as the ImageNet
  configs read on a pod) trains the same."""
  cache, single, _, _ = runs
  outs = _two_processes(str(tmp_path), cache,
                        "--config.dataset.worker_processes=2")
  assert ("input_pipeline: reading in 2 worker processes "
          "(dataset.worker_processes)") in outs[0][0]
  assert "worker processes" not in outs[1][0]  # Process 0 reports.
  _assert_same_training(single, str(tmp_path))


def _stopped_at_step_16(finished, workdir):
  """A copy of the `finished` run's workdir as it was at the first stage
  boundary (checkpoints after step 16 removed)."""
  workdir = str(workdir)
  shutil.copytree(finished, workdir)
  for step in checkpoint_steps(workdir):
    if step > 16:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def test_two_process_checkpoint_resumes_on_one_process_of_half_the_devices(
    runs, tmp_path):
  """A pod job resumed on another slice: the two-process run's checkpoint at
  the first stage boundary (step 16 of 28, 8 devices) resumed by one process
  of 4 devices trains on as the uninterrupted one-process run did (the same
  ghost batches; sums in another order)."""
  cache, single, two, _ = runs
  workdir = _stopped_at_step_16(two, tmp_path / "resumed")
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  r = run(workdir, cache, env=dict(ENV, XLA_FLAGS=xla_flags.xla_flags(4)))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 16 (1024 examples seen)" in r.stdout
  assert "1 process(es), 4 devices" in r.stdout
  a = metrics_lib.read_metrics(single, "train")[16:]
  b = metrics_lib.read_metrics(workdir, "train")
  assert [x["step"] for x in b] == list(range(17, TOTAL_STEPS + 1))
  for x, y in zip(a, b):
    assert y["batch_size"] == x["batch_size"]
    assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
  assert_same_state(final_state(single), final_state(workdir), rtol=1e-3,
                    atol=2e-5)


def test_preemption_during_a_resumed_start_up_is_honoured(runs, tmp_path):
  """A notice that arrives while a resumed two-process run restores and
  compiles stops it at its first step with a checkpoint (JAX's sync point
  would otherwise be step 1, which a run resumed at 16 never reaches)."""
  cache, _, two, _ = runs
  workdir = _stopped_at_step_16(two, tmp_path / "preempted")
  outs = _two_processes(workdir, cache, sigterm_after="resumed from step 16")
  saved = re.search(r"preempted: saved step (\d+) ", outs[0][0])
  assert saved, outs[0][0][-3000:]
  # The step after the latest any process had reported when the notice
  # reached the coordination service: one or two steps in, not the end.
  assert 17 <= int(saved.group(1)) < TOTAL_STEPS
  assert checkpoint_steps(workdir)[-1] == int(saved.group(1))


# Two bare processes: report_start(16) with a notice before or after it; the
# first step of 17.. at which PreemptionWatcher stops.
_REPORT_START = """
import sys, jax
from tests import early_notice
from trainer import preemption
port, pid, notice = sys.argv[1:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(pid))
if notice == "before":
  early_notice.notice_and_wait()
at_start = preemption.report_start(16)
if notice == "after":
  early_notice.notice_and_wait()
watcher = preemption.PreemptionWatcher(requested=at_start)
print("stops at", next((s for s in range(17, 100) if watcher.should_stop(s)),
                       None))
"""


@pytest.mark.parametrize("notice", ["before", "after"])
def test_a_notice_before_or_after_report_start_stops_at_the_first_step(
    notice):
  """JAX agrees a notice at the step after the latest any process has
  reported, 0 before any: one before report_start(16) at step 1, which a
  run resumed at 16 passes only while report_start replays 1..16."""
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "120", sys.executable, "-c", _REPORT_START,
       str(port), str(i), notice],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
           for i in range(2)]
  for p in procs:
    out, err = p.communicate()
    assert p.returncode == 0, err[-3000:]
    assert out.strip() == "stops at 17", (out, err[-3000:])


def test_a_notice_before_a_resumed_run_reports_its_start_is_honoured(
    xla_cache, two_run, tmp_path):
  """SIGTERM before report_start (during model init, the data checks):
  agreed at step 1, which the run resumed at 16 never reached (it trained
  to the end, killed there in a real preemption); it stops at 17."""
  workdir = _stopped_at_step_16(two_run[0], tmp_path / "early")
  outs = _two_processes(workdir, xla_cache, runner="tests/early_notice.py")
  assert "resumed from step 16" in outs[0][0], outs[0][0][-3000:]
  assert "preempted: saved step 17 " in outs[0][0], outs[0][0][-3000:]
  assert checkpoint_steps(workdir)[-1] == 17


def test_an_error_on_one_process_ends_both_at_once(runs, tmp_path):
  """Process 1 cannot read its first batch: it prints the error and leaves
  at once; process 0, waiting for it in the first step's collectives, is
  ended too. (Exiting normally, process 1 waited 5 minutes at JAX's shutdown
  barrier and then both aborted.)"""
  cache = runs[0]
  outs, codes = _two_processes(
      str(tmp_path / "w"), cache, check=False, runner="tests/failing_reader.py",
      env=dict(ENV, FAIL_PROCESS="1"))
  assert codes[1] == 2 and codes[0] != 0, outs  # Not -9: `timeout` killed.
  assert ": injected read error" in outs[1][1].splitlines()[-2]
  assert "process 1 stopped (exit status 2)" in outs[1][1]
  assert "process 0 stopped" in outs[0][1]
