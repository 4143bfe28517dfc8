"""The adaptive schedule: decisions, plans from decisions, an exact resume."""
import json
import os
import signal
import subprocess
import types

import pytest
from ml_collections import config_dict

from configs import base
from trainer import adaptive
from trainer import micro_batching
from trainer import plan as plan_lib
from tests.tiny_run import ENV, assert_same_state, checkpoint_steps, command


def schedule(**changes):
  s = base.get_base_config().schedule
  s.kind = "adaptive"
  s.batch_size = 128
  s.max_batch = 2048
  s.update(changes)
  return s


def test_allowed_sizes_are_b0_times_powers_of_growth():
  assert adaptive.allowed_batch_sizes(schedule(), 128) == [128, 256, 512,
                                                            1024, 2048]
  assert adaptive.allowed_batch_sizes(schedule(adaptive_growth=3), 128) == [
      128, 384, 1152]


@pytest.mark.parametrize("current,noise,scale,expected", [
    (128, None, 1.0, 128),     # Nothing measured yet: keep B.
    (128, 50.0, 1.0, 128),     # Below B0: clipped up to B0.
    (128, 300.0, 1.0, 256),    # Largest allowed size not above the target.
    (128, 511.9, 1.0, 256),
    (128, 512.0, 1.0, 512),
    (128, 300.0, 4.0, 1024),   # adaptive_scale multiplies B_simple.
    (128, 1e6, 1.0, 2048),     # Capped at max_batch.
    (1024, 300.0, 1.0, 1024),  # Never shrinks.
])
def test_decide(current, noise, scale, expected):
  s = schedule(adaptive_scale=scale)
  assert adaptive.decide(s, 128, current, noise) == expected


def test_decision_points_are_a_function_of_examples_seen():
  assert [adaptive.next_decision(x, 100) for x in (0, 99, 100, 250)] == [
      100, 100, 200, 300]


def plan(decisions, **changes):
  return plan_lib.build_plan(schedule(num_epochs=2.0, **changes),
                             num_train_examples=10_000, ghost_batch_size=16,
                             num_devices=8, decisions=decisions)


def test_plan_from_decisions():
  p = plan([(2560, 512), (6656, 1024)])
  rows = [(s.start_examples, s.end_examples, s.start_step, s.num_steps,
           s.batch_size, s.learning_rate) for s in p.stages]
  assert rows == [(0, 2560, 0, 20, 128, 0.1),
                  (2560, 6656, 20, 8, 512, 0.1),
                  (6656, 20_992, 28, 14, 1024, 0.1)]
  assert p.total_updates == 42
  assert p.at(6656).step == 28 and p.at(6656).batch_size == 1024
  linear = plan([(2560, 512)], adaptive_lr_rule="linear")
  assert [s.learning_rate for s in linear.stages] == [0.1, pytest.approx(0.4)]


def test_sizes_to_run_from_a_position():
  """The stage's own size and every larger one it may pick, compiled
  ahead; none once the plan is done (rerunning a finished adaptive run
  raised an IndexError here)."""
  config = types.SimpleNamespace(schedule=schedule())
  p = plan([(2560, 512), (6656, 1024)])
  assert micro_batching.batch_sizes_to_run(config, p, 0) == [
      128, 512, 1024, 2048]
  assert micro_batching.batch_sizes_to_run(config, p, 6656) == [1024, 2048]
  assert micro_batching.batch_sizes_to_run(config, p, p.total_examples) == []


def test_plan_without_decisions_runs_b0_to_the_end():
  p = plan([])
  assert [(s.batch_size, s.num_steps) for s in p.stages] == [(128, 157)]
  assert "if B grows no further" in p.table()


BAD = [
    (dict(max_batch=None), [],
     "schedule.max_batch must be set for schedule.kind='adaptive'"),
    (dict(adaptive_growth=1), [],
     "schedule.adaptive_growth=1 must be an integer ≥ 2"),
    (dict(adaptive_lr_rule="sqrt"), [],
     "schedule.adaptive_lr_rule='sqrt' is unknown; choose one of constant, "
     "linear"),
    (dict(adaptive_every_epochs=0.0), [],
     "schedule.adaptive_every_epochs=0.0 must be positive"),
    (dict(adaptive_scale=-1.0), [], "schedule.adaptive_scale=-1.0 must be "
     "positive"),
    (dict(), [(1000, 512)], "batch decision 1 at examples_seen=1000 is not a "
     "step boundary after stage 0 (B=128 from 0)"),
    (dict(), [(25_600, 512)], "batch decision 1 at examples_seen=25600 is "
     "past the end of training (20000 examples)"),
    (dict(kind="increase_batch", milestones_epochs=(1.0,)), [(2560, 512)],
     "batch decisions are only for kind='adaptive', not 'increase_batch'"),
]


@pytest.mark.parametrize("changes,decisions,message", BAD)
def test_bad_adaptive_schedule(changes, decisions, message):
  with pytest.raises(plan_lib.PlanError, match=message.replace(
      "(", r"\(").replace(")", r"\)")):
    plan(decisions, **changes)


ADAPTIVE = ["--config.schedule.kind=adaptive",
            "--config.schedule.max_batch=256",
            "--config.schedule.adaptive_every_epochs=0.5",
            "--config.schedule.adaptive_scale=4.0"]


def records(workdir, kind):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def latest_state(workdir):
  from tests import tiny_run
  step = checkpoint_steps(workdir)[-1]
  old, tiny_run.TOTAL_STEPS = tiny_run.TOTAL_STEPS, step
  try:
    return step, tiny_run.final_state(workdir)
  finally:
    tiny_run.TOTAL_STEPS = old


def test_adaptive_run_grows_b_and_resumes_exactly(tmp_path, xla_cache):
  """The tiny synthetic run measures B_simple ≈ 75 at epoch 0.5, so with
  adaptive_scale 4 it grows B 64 → 256; preempted after that decision and
  resumed, it ends bitwise equal to the uninterrupted run."""
  whole = str(tmp_path / "whole")
  r = subprocess.run(command(whole, xla_cache, *ADAPTIVE), capture_output=True,
                     text=True, env=ENV, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  decisions = records(whole, "batch_decision")
  assert decisions[0]["examples_seen"] == 512
  rule = config_dict.ConfigDict(dict(adaptive_scale=4.0, max_batch=256,
                                     adaptive_growth=2))
  for d in decisions:  # Each follows the rule from the logged B_simple.
    assert d["batch_size"] == adaptive.decide(
        rule, 64, d["previous_batch_size"], d["grad_noise_scale"])
  assert decisions[-1]["batch_size"] > 64
  train = records(whole, "train")
  assert all(t["grad_noise_scale"] > 0 for t in train[1:])
  grown = [d for d in decisions if d["batch_size"] != d["previous_batch_size"]]
  for t in train:  # Steps use the batch decided before them.
    before = [d["batch_size"] for d in grown
              if d["examples_seen"] < t["examples_seen"]]
    assert t["batch_size"] == (before[-1] if before else 64)
  # A decision ends a stage: its checkpoint is kept, as plan stages' are.
  kept = checkpoint_steps(whole)
  assert all(d["step"] in kept for d in grown), (kept, grown)
  assert len(kept) > 3  # Not merely the latest checkpoints_to_keep=3.

  parts = str(tmp_path / "parts")
  with open(tmp_path / "parts.stderr", "w+", encoding="utf-8") as errors:
    p = subprocess.Popen(command(parts, xla_cache, *ADAPTIVE),
                         stdout=subprocess.PIPE, stderr=errors,
                         text=True, env=ENV)
    out = []
    for line in p.stdout:
      out.append(line)
      if line.startswith("step 10/"):  # After the decision at step 8.
        p.send_signal(signal.SIGTERM)
        break
    p.communicate(timeout=120)
    errors.seek(0)
    assert p.returncode == 0, "".join(out) + errors.read()[-3000:]
  r = subprocess.run(command(parts, xla_cache, *ADAPTIVE), capture_output=True,
                     text=True, env=ENV, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout
  assert records(parts, "batch_decision")[-1] == decisions[-1]
  step, state = latest_state(parts)
  whole_step, whole_state = latest_state(whole)
  assert step == whole_step
  assert_same_state(whole_state, state)


def test_adaptive_needs_two_devices():
  from trainer import compile as compile_lib
  from trainer import loop
  config = base.get_base_config()
  config.schedule.kind = "adaptive"
  config.schedule.max_batch = 1024
  config.accumulation = "host"
  with pytest.raises(compile_lib.ConfigError,
                     match="needs at least 2 devices to measure the noise"):
    loop._check_adaptive(config, 1)  # pylint: disable=protected-access
