"""`python -m trainer.main`: bad input stops with one line before any work."""
import json
import os
import subprocess
import sys

import pytest

from configs import cifar10_increase_batch
from tests import xla_flags

SMOKE = "--config=configs/cifar10_increase_batch.py:smoke"
ENV = dict(os.environ,
           XLA_FLAGS=xla_flags.xla_flags(8),
           JAX_PLATFORMS="cpu")


def run_main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "trainer.main", *args],
                        capture_output=True, text=True, timeout=timeout, env=ENV)


BAD = [
    ([SMOKE, "--config.schedule.batch_size=68"],
     "stage 0 global batch B=68 is not divisible by the device count 8"),
    ([SMOKE, "--config.schedule.batch_size=32"],
     "B=32 gives 4 examples per device, not a multiple of ghost_batch_size=8"),
    ([SMOKE, "--config.max_device_batch=24"],
     "max_device_batch=24 does not divide the per-device batch 32"),
    ([SMOKE, "--config.max_device_batch=12"],
     "max_device_batch=12 is not a multiple of ghost_batch_size=8"),
    ([SMOKE, "--config.eval_batch_size=100"],
     "eval_batch_size=100 must be a positive multiple of the device count 8"),
    ([SMOKE, "--config.steps_in_flight=0"],
     "steps_in_flight=0 must be 1 (read each step's metrics before the next) "
     "or 2 (one step ahead); unset: 1 on the CPU, 2 elsewhere"),
    ([SMOKE, "--config.accumulation=device"],
     "accumulation='device' is not one of host, compiled"),
    ([SMOKE, "--config.weight_average=ema", "--config.ema_horizon_epochs=0.0"],
     "ema_horizon_epochs=0.0 must be positive"),
    ([SMOKE, "--config.weight_average=ema", "--config.ema_bn_batches=0"],
     "ema_bn_batches=0 must be at least 1"),
    ([SMOKE, "--config.weight_average=ema", "--config.ema_bn_batch_size=4096"],
     "batches of 4096 examples (ema_bn_batch_size), more than "
     "dataset.num_train_examples=2048"),
    ([SMOKE, "--config.schedule.kind=adaptive", "--config.schedule.max_batch=512",
      "--config.accumulation=compiled"],
     "schedule.kind='adaptive' measures the noise scale from per-device "
     "gradients: set accumulation='host'"),
    ([SMOKE, "--config.schedule.kind=adaptive",
      "--config.schedule.max_batch=4096"],
     "schedule.max_batch=4096 exceeds dataset.num_train_examples=2048"),
    ([SMOKE, "--config.checkpoint_every_steps=0"],
     "checkpoint_every_steps=0 must be a whole number ≥ 1"),
    ([SMOKE, "--config.log_every_steps=0"],
     "log_every_steps=0 must be a whole number ≥ 1"),
    ([SMOKE, "--config.checkpoints_to_keep=0"],
     "checkpoints_to_keep=0 must be a whole number ≥ 1"),
    ([SMOKE, "--config.eval_every_epochs=0.0"],
     "eval_every_epochs=0.0 must be positive"),
    ([SMOKE, "--config.checkpoint_every_minutes=-1.0"],
     "checkpoint_every_minutes=-1.0 must be ≥ 0 (0 turns the timer off)"),
    ([SMOKE, "--config.optimizer.name=lamb"], "optimizer.name='lamb' is unknown"),
    ([SMOKE, "--config.optimizer.weight_decay=-1.0"],
     "optimizer.weight_decay=-1.0 must not be negative"),
    ([SMOKE, "--config.model.width=0"], "model.width must be a positive integer, got 0"),
    ([SMOKE, "--config.bn_momentum=1.5"], "bn_momentum must be in [0, 1), got 1.5"),
    ([SMOKE, "--config.noise_scale_horizon_epochs=0.0"],
     "noise_scale_horizon_epochs=0.0 must be positive"),
    ([SMOKE, "--config.dataset.augment=flip"], "dataset.augment='flip' is unknown"),
    (["--config=configs/fashion_mnist.py:smoke", "--config.dataset.image_size=32"],
     "example 0 has an image of shape (28, 28, 1), not 32x32x1"),
    ([SMOKE, "--config.optimizer.name=sgd"],
     "optimizer.name='sgd' has no momentum but schedule.momentum=0.9: set "
     "schedule.momentum=0.0, or optimizer.name='momentum'"),
    ([SMOKE, "--config.model.name=vgg"], "model.name"),
    ([SMOKE], "--workdir is required"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line(tmp_path, args, message):
  if "--workdir is required" != message:
    args = [*args, f"--workdir={tmp_path / 'w'}"]
  r = run_main(*args)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w")  # Refused before it is made.


def test_workdir_of_another_config_is_refused(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  saved = json.loads(cifar10_increase_batch.get_config("smoke").to_json())
  saved["seed"] = 1
  # Recorded as resolved on the CPU.
  saved["model"].update(bn_fuse_relu=False, stem_space_to_depth=False)
  (workdir / "config.json").write_text(json.dumps(saved))
  r = run_main(SMOKE, f"--workdir={workdir}")
  assert r.returncode == 2
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: workdir {workdir} holds a run of a different "
                         "config: "), r.stderr
  assert line.endswith("config: seed (1 → 0); use a new --workdir, or pass "
                       "--allow_config_change to resume with it"), line


def test_a_run_recorded_with_the_relu_fused_is_a_change_on_the_cpu(tmp_path):
  # bn_fuse_relu unset is on for GPUs, off here: the record holds what
  # trained, so a GPU run resumed here is another config.
  workdir = tmp_path / "w"
  workdir.mkdir()
  saved = json.loads(cifar10_increase_batch.get_config("smoke").to_json())
  saved["model"].update(bn_fuse_relu=True, stem_space_to_depth=False)
  (workdir / "config.json").write_text(json.dumps(saved))
  r = run_main(SMOKE, f"--workdir={workdir}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].endswith(
      "config: model.bn_fuse_relu (True → False); use a new --workdir, or "
      "pass --allow_config_change to resume with it"), r.stderr
