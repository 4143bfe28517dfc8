"""Kill, preempt and resume: the resumed run is bitwise the uninterrupted run."""
import fcntl
import os
import re
import shutil
import signal
import subprocess

import pytest

from tests import xla_flags
from trainer import preemption

from tests.tiny_run import (ENV, TOTAL_STEPS, assert_same_state,
                            checkpoint_steps, command, final_state, run)

def run_until(workdir, xla_cache, step, sig):
  """Starts a run and sends `sig` once it prints progress for `step`."""
  p = subprocess.Popen(command(workdir, xla_cache), stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=ENV)
  out = []
  try:
    for line in p.stdout:
      out.append(line)
      if line.startswith(f"step {step}/"):
        p.send_signal(sig)
        break
    rest, _ = p.communicate(timeout=120)
    out.append(rest)
  finally:
    if p.poll() is None:
      p.kill()
  return p.returncode, "".join(out)


def test_killed_and_preempted_run_ends_bitwise_equal(tmp_path, xla_cache,
                                                     tiny_reference):
  workdir = str(tmp_path / "interrupted")
  # SIGKILL mid-stage (around the interval save at 5), SIGTERM, SIGKILL at a
  # stage boundary (its save has just started) and right after the switch.
  rc, _ = run_until(workdir, xla_cache, 9, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  latest = checkpoint_steps(workdir)[-1:]  # The save at 5 may not be done.
  assert latest in ([], [5])

  rc, out = run_until(workdir, xla_cache, 12, signal.SIGTERM)
  assert rc == 0, out[-2000:]
  if latest:
    assert "resumed from step 5 (320 examples seen)" in out
  else:
    assert "resumed" not in out
  saved = int(re.search(r"preempted: saved step (\d+)", out).group(1))
  assert saved >= 12 and checkpoint_steps(workdir)[-1] == saved

  rc, out = run_until(workdir, xla_cache, 16, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert f"resumed from step {saved}" in out

  before = checkpoint_steps(workdir)[-1]
  rc, out = run_until(workdir, xla_cache, 17, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert f"resumed from step {before}" in out

  # Ctrl-C is a preemption too: the step in progress is saved.
  rc, out = run_until(workdir, xla_cache, 20, signal.SIGINT)
  assert rc == 0, out[-2000:]
  saved = int(re.search(r"interrupted: saved step (\d+)", out).group(1))
  assert saved >= 20 and checkpoint_steps(workdir)[-1] == saved

  r = run(workdir, xla_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout
  assert_same_state(final_state(tiny_reference), final_state(workdir))


def test_a_second_ctrl_c_stops_at_once(capsys):
  watcher = preemption.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.should_stop(1) and watcher.reason == "interrupted"
    assert capsys.readouterr().err == (
        "interrupted: saving at the end of this step, then stopping "
        "(Ctrl-C again stops at once)\n")
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, xla_cache,
                                                          tiny_reference):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(tiny_reference, workdir)
  os.remove(os.path.join(workdir, "lock"))
  latest = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state")
  for root, _, files in os.walk(latest):  # Truncate every data file.
    for name in files:
      if "ocdbt" in root or name.startswith("d"):
        open(os.path.join(root, name), "w").close()
  r = run(workdir, xla_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"warning: checkpoint step {TOTAL_STEPS}" in r.stdout
  assert "resumed from step 25" in r.stdout
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert_same_state(final_state(tiny_reference), final_state(workdir))


def test_second_run_on_a_workdir_is_refused(tmp_path, xla_cache):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  with open(workdir / "lock", "w") as held:
    held.write("pid 12345 since earlier")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r = run(str(workdir), xla_cache)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: workdir {workdir} is in use by pid 12345 since earlier; wait for "
      "that run or choose another --workdir")
  assert not (workdir / "checkpoints").exists()


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, xla_cache,
                                                      tiny_reference):
  workdir = str(tmp_path / "other_model")
  shutil.copytree(tiny_reference, workdir)
  before = checkpoint_steps(workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  r = run(workdir, xla_cache, "--config.model.width=8", "--allow_config_change")
  assert r.returncode == 2
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(
      "error: checkpoint step 28 holds another model (checkpoint vs this "
      "config: batch_stats/BasicBlock_0/GhostBatchNorm_0/mean (4,) vs (8,);"), line
  assert line.endswith("more); use a new --workdir"), line
  assert checkpoint_steps(workdir) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


@pytest.mark.parametrize("overrides,problem", [
    # B=64 throughout: the plan's step 28 comes 1,280 examples earlier.
    (["--config.schedule.kind=decay_lr"],
     "does not fit this config's plan, whose step 28 starts at 1792 examples: "
     "its stages before the checkpoint differ; change the schedule only after "
     "the checkpoint's position, or use a new --workdir"),
    (["--config.schedule.decay_factor=4.0"],  # 16 + 4 + 1 updates.
     "does not fit this config's plan, whose step 28 does not exist: its "
     "stages before the checkpoint differ;"),
    (["--config.schedule.num_epochs=2.5"],
     "is past the end of this config's plan (2560 examples, 26 updates)"),
])
def test_schedule_changed_before_the_checkpoint_is_refused(
    tmp_path, xla_cache, tiny_reference, overrides, problem):
  """--allow_config_change may not renumber the saved updates: refused
  before the config record is rewritten or anything compiles."""
  workdir = str(tmp_path / "rescheduled")
  shutil.copytree(tiny_reference, workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  r = run(workdir, xla_cache, *overrides, "--allow_config_change")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: the checkpoint at step 28 (3072 examples seen) in "
      f"{workdir}/checkpoints {problem}")
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  assert "compiled" not in r.stdout


def test_unwritable_workdir(tmp_path, xla_cache):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  r = run(str(blocker / "w"), xla_cache)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir {blocker / 'w'} is not writable: ")


def test_allow_config_change_resumes_and_keeps_the_old_record(tmp_path,
                                                             xla_cache,
                                                             tiny_reference):
  workdir = str(tmp_path / "changed")
  shutil.copytree(tiny_reference, workdir)
  r = run(workdir, xla_cache, "--config.optimizer.weight_decay=0.001")
  assert r.returncode == 2
  assert ("optimizer.weight_decay (0.0005 → 0.001)"
          in r.stderr.strip().splitlines()[-1])
  r = run(workdir, xla_cache, "--config.optimizer.weight_decay=0.001",
          "--allow_config_change")
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {TOTAL_STEPS}" in r.stdout
  archived = [f for f in os.listdir(workdir) if re.fullmatch(r"config\.\d+\.json", f)]
  assert len(archived) == 1
  assert '"weight_decay": 0.001' in open(os.path.join(workdir, "config.json")).read()


def test_log_checkpoint_and_eval_cadence_may_change_on_resume(
    tmp_path, xla_cache, tiny_reference):
  """HOST_FIELDS need no --allow_config_change: preempted at step 12 and
  resumed logging, saving and evaluating at other intervals, the run ends
  bitwise equal to the uninterrupted one."""
  workdir = str(tmp_path / "cadence")
  rc, out = run_until(workdir, xla_cache, 12, signal.SIGTERM)
  assert rc == 0, out[-2000:]
  r = run(workdir, xla_cache, "--config.log_every_steps=3",
          "--config.checkpoint_every_steps=7", "--config.checkpoints_to_keep=2",
          "--config.eval_every_epochs=0.5")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from step" in r.stdout and "step 15/" in r.stdout
  assert_same_state(final_state(tiny_reference), final_state(workdir))


def test_a_larger_slice_resumes_past_a_stage_it_could_not_split(
    tmp_path, xla_cache, tiny_reference):
  """Resumed at the first stage boundary on 16 devices, where stage 0's
  B=64 would leave 4 examples per device (half a ghost batch): the finished
  stage is not checked, and the rest (8 and 16 per device) trains on as the
  uninterrupted 8-device run did (the same ghost batches)."""
  workdir = str(tmp_path / "larger")
  shutil.copytree(tiny_reference, workdir)
  for step in checkpoint_steps(workdir):
    if step > 16:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  r = run(workdir, xla_cache, env=dict(ENV, XLA_FLAGS=xla_flags.xla_flags(16)))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 16 (1024 examples seen)" in r.stdout
  assert "1 process(es), 16 devices" in r.stdout
  assert_same_state(final_state(tiny_reference), final_state(workdir),
                    rtol=1e-3, atol=2e-5)
  # A fresh run on 16 devices is still refused: its stage 0 cannot split.
  r = run(str(tmp_path / "fresh"), xla_cache,
          env=dict(ENV, XLA_FLAGS=xla_flags.xla_flags(16)))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "error: stage 0 global batch B=64 gives 4 examples per device, not a "
      "multiple of ghost_batch_size=8")
