"""Kill, preempt and resume: the resumed run is bitwise the uninterrupted run."""
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

TOTAL_STEPS = 28  # 16 + 8 + 4 steps at B = 64, 128, 256.


def command(workdir, cache_dir, *extra):
  return [
      sys.executable, "-m", "trainer.main",
      "--config=configs/cifar10_increase_batch.py:smoke",
      f"--workdir={workdir}",
      "--config.dataset.num_train_examples=1024",
      "--config.dataset.num_eval_examples=128",
      "--config.eval_batch_size=64",
      "--config.model.width=4",
      "--config.schedule.milestones_epochs=(1.0,2.0)",
      "--config.schedule.num_epochs=3.0",
      "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=5",
      f"--config.compilation_cache_dir={cache_dir}",
      *extra]


ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def run(workdir, cache_dir, *extra, timeout=300):
  r = subprocess.run(command(workdir, cache_dir, *extra), capture_output=True,
                     text=True, timeout=timeout, env=ENV)
  return r


def run_until(workdir, cache_dir, step, sig):
  """Starts a run and sends `sig` once it prints progress for `step`."""
  p = subprocess.Popen(command(workdir, cache_dir), stdout=subprocess.PIPE,
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


def checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def final_state(workdir):
  path = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state")
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def assert_bitwise_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  assert len(flat_a) > 10  # params, batch stats and optimizer state
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("reference"))
  r = run(workdir, cache_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_killed_and_preempted_run_ends_bitwise_equal(tmp_path, cache_dir,
                                                     reference):
  workdir = str(tmp_path / "interrupted")
  # SIGKILL mid-stage (around the interval save at 5), SIGTERM, SIGKILL at a
  # stage boundary (its save has just started) and right after the switch.
  rc, _ = run_until(workdir, cache_dir, 9, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  latest = checkpoint_steps(workdir)[-1:]  # The save at 5 may not be done.
  assert latest in ([], [5])

  rc, out = run_until(workdir, cache_dir, 12, signal.SIGTERM)
  assert rc == 0, out[-2000:]
  if latest:
    assert "resumed from step 5 (320 examples seen)" in out
  else:
    assert "resumed" not in out
  saved = int(re.search(r"preempted: saved step (\d+)", out).group(1))
  assert saved >= 12 and checkpoint_steps(workdir)[-1] == saved

  rc, out = run_until(workdir, cache_dir, 16, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert f"resumed from step {saved}" in out

  before = checkpoint_steps(workdir)[-1]
  rc, out = run_until(workdir, cache_dir, 17, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert f"resumed from step {before}" in out

  r = run(workdir, cache_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout
  assert_bitwise_equal(final_state(reference), final_state(workdir))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, cache_dir,
                                                          reference):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "lock"))
  latest = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state")
  for root, _, files in os.walk(latest):  # Truncate every data file.
    for name in files:
      if "ocdbt" in root or name.startswith("d"):
        open(os.path.join(root, name), "w").close()
  r = run(workdir, cache_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"warning: checkpoint step {TOTAL_STEPS}" in r.stdout
  assert "resumed from step 25" in r.stdout
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert_bitwise_equal(final_state(reference), final_state(workdir))


def test_second_run_on_a_workdir_is_refused(tmp_path, cache_dir):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  with open(workdir / "lock", "w") as held:
    held.write("pid 12345 since earlier")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r = run(str(workdir), cache_dir)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: workdir {workdir} is in use by pid 12345 since earlier; wait for "
      "that run or choose another --workdir")
  assert not (workdir / "checkpoints").exists()


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, cache_dir,
                                                      reference):
  workdir = str(tmp_path / "other_model")
  shutil.copytree(reference, workdir)
  before = checkpoint_steps(workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  r = run(workdir, cache_dir, "--config.model.width=8", "--allow_config_change")
  assert r.returncode == 2
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(
      "error: checkpoint step 28 holds another model (checkpoint vs this "
      "config: batch_stats/BasicBlock_0/GhostBatchNorm_0/mean (4,) vs (8,);"), line
  assert line.endswith("more); use a new --workdir"), line
  assert checkpoint_steps(workdir) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_unwritable_workdir(tmp_path, cache_dir):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  r = run(str(blocker / "w"), cache_dir)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir {blocker / 'w'} is not writable: ")


def test_allow_config_change_resumes_and_keeps_the_old_record(tmp_path,
                                                             cache_dir,
                                                             reference):
  workdir = str(tmp_path / "changed")
  shutil.copytree(reference, workdir)
  r = run(workdir, cache_dir, "--config.log_every_steps=2")
  assert r.returncode == 2
  assert "log_every_steps (1 → 2)" in r.stderr.strip().splitlines()[-1]
  r = run(workdir, cache_dir, "--config.log_every_steps=2",
          "--allow_config_change")
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {TOTAL_STEPS}" in r.stdout
  archived = [f for f in os.listdir(workdir) if re.fullmatch(r"config\.\d+\.json", f)]
  assert len(archived) == 1
  assert '"log_every_steps": 2' in open(os.path.join(workdir, "config.json")).read()
