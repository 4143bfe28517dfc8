"""Table tests of the schedule planner (pure Python, no JAX)."""
import json
import re
import subprocess
import sys

import pytest

from configs import base
from trainer import plan as plan_lib

N = 10_000


def schedule(**overrides):
  s = base.get_base_config().schedule
  s.update(dict(num_epochs=10.0, milestones_epochs=(4.0, 7.0), decay_factor=2.0,
                batch_size=100, learning_rate=0.1, momentum=0.9))
  s.update(overrides)
  return s


def build(num_devices=1, ghost=10, n=N, **overrides):
  return plan_lib.build_plan(schedule(**overrides), num_train_examples=n,
                             ghost_batch_size=ghost, num_devices=num_devices)


def g(lr, m, b, n=N):
  return lr / (1 - m) * (n / b - 1)


# (examples_seen, stage, B, lr, step)
DECAY_LR = [
    (0, 0, 100, 0.1, 0),
    (39_900, 0, 100, 0.1, 399),
    (40_000, 1, 100, 0.05, 400),
    (69_900, 1, 100, 0.05, 699),
    (70_000, 2, 100, 0.025, 700),
    (99_900, 2, 100, 0.025, 999),
]
INCREASE_BATCH = [
    (0, 0, 100, 0.1, 0),
    (39_900, 0, 100, 0.1, 399),
    (40_000, 1, 200, 0.1, 400),
    (69_800, 1, 200, 0.1, 549),
    (70_000, 2, 400, 0.1, 550),
    (99_600, 2, 400, 0.1, 624),
]


@pytest.mark.parametrize("kind,table,total", [
    ("decay_lr", DECAY_LR, 1000), ("increase_batch", INCREASE_BATCH, 625)])
def test_positions(kind, table, total):
  p = build(kind=kind)
  assert p.total_updates == total
  for examples, stage, batch, lr, step in table:
    pos = p.at(examples)
    assert (pos.stage, pos.batch_size, pos.step) == (stage, batch, step), examples
    assert pos.learning_rate == pytest.approx(lr)
    assert pos.momentum == 0.9
    assert pos.noise_scale == pytest.approx(g(lr, 0.9, batch))
    assert pos.epoch == pytest.approx(examples / N)
    assert p.examples_at_step(step) == examples


def test_noise_scale_falls_by_the_factor_each_milestone_under_decay_lr():
  p = build(kind="decay_lr", decay_factor=5.0)
  ratios = [a.noise_scale / b.noise_scale for a, b in zip(p.stages, p.stages[1:])]
  assert ratios == pytest.approx([5.0, 5.0])


def test_hybrid_grows_to_cap_then_decays_lr_with_exact_noise_decay():
  # 100 -> 200 -> 300 (cap, partial growth) -> 300 with lr falling.
  p = build(kind="hybrid", milestones_epochs=(2.0, 4.0, 7.0), max_batch=300)
  assert [s.batch_size for s in p.stages] == [100, 200, 300, 300]
  lr2 = g(0.1, 0.9, 200) / 2 / g(1.0, 0.9, 300)
  assert [s.learning_rate for s in p.stages] == pytest.approx(
      [0.1, 0.1, lr2, lr2 / 2])
  assert p.stages[2].noise_scale == pytest.approx(p.stages[1].noise_scale / 2)
  assert p.stages[3].noise_scale == pytest.approx(p.stages[2].noise_scale / 2)
  assert p.batch_sizes == (100, 200, 300)
  # Steps: 20000/100 + 20000/200 + 30000/300 + 30000/300.
  assert [s.num_steps for s in p.stages] == [200, 100, 100, 100]


def test_increase_batch_past_cap_is_refused():
  with pytest.raises(plan_lib.PlanError, match="use kind='hybrid'"):
    build(kind="increase_batch", max_batch=150)


def test_larger_learning_rate_scales_initial_batch():
  # B ∝ ε: ε=0.5 against the reference ε=0.1 at B=100 -> B0=500.
  p = build(learning_rate=0.5, reference_learning_rate=0.1, reference_momentum=0.9)
  assert p.stages[0].batch_size == 500
  assert p.stages[0].learning_rate == 0.5
  assert p.stages[0].noise_scale == pytest.approx(g(0.5, 0.9, 500))


def test_larger_momentum_scales_initial_batch():
  # B ∝ 1/(1-m): m=0.98 against 0.9 -> 5x; with ε 0.5/0.1 -> 25x.
  p = build(learning_rate=0.5, momentum=0.98, reference_learning_rate=0.1,
            reference_momentum=0.9, n=100_000)
  assert p.stages[0].batch_size == 2500
  assert p.stages[0].momentum == 0.98


def test_initial_batch_respects_cap_and_keeps_lr_over_batch():
  p = build(kind="hybrid", learning_rate=0.5, reference_learning_rate=0.1,
            reference_momentum=0.9, max_batch=300)
  assert p.stages[0].batch_size == 300
  assert p.stages[0].learning_rate == pytest.approx(0.5 * 300 / 500)


def test_derived_batch_rounds_to_whole_ghost_batches():
  p = build(learning_rate=0.345, reference_learning_rate=0.1,
            reference_momentum=0.9, ghost=20)
  assert p.stages[0].batch_size == 340  # 345 -> nearest multiple of 20.


def test_linear_scaling_rule():
  p = build(learning_rate=0.1, batch_size=400, linear_scaling_batch=100)
  assert p.stages[0].learning_rate == pytest.approx(0.4)


def test_linear_scaling_rule_uses_the_capped_batch_once():
  # B0=800 capped to 400: ε = 0.1·400/100, the same ε/B as the uncapped 0.8/800.
  p = build(kind="hybrid", learning_rate=0.1, batch_size=800,
            linear_scaling_batch=100, max_batch=400)
  assert p.stages[0].batch_size == 400
  assert p.stages[0].learning_rate == pytest.approx(0.4)


# (examples_seen, lr) with 1 epoch (10,000 examples) of warm-up to ε=0.1.
WARMUP = [(0, 0.001), (100, 0.002), (4_900, 0.05), (9_900, 0.1), (10_000, 0.1),
          (50_000, 0.05)]


def test_warmup_is_linear_in_examples_seen():
  p = build(kind="decay_lr", warmup_epochs=1.0)
  assert p.warmup_examples == 10_000
  for examples, lr in WARMUP:
    assert p.learning_rate_at(examples) == pytest.approx(lr), examples
    assert p.at(examples).noise_scale == pytest.approx(g(lr, 0.9, 100))


# The same warm-up from ε=0.02 (Goyal et al. start at the reference batch's ε).
WARMUP_FROM = [(0, 0.0208), (100, 0.0216), (4_900, 0.06), (9_900, 0.1),
               (10_000, 0.1), (50_000, 0.05)]


def test_warmup_can_start_from_a_learning_rate():
  p = build(kind="decay_lr", warmup_epochs=1.0, warmup_start_learning_rate=0.02)
  for examples, lr in WARMUP_FROM:
    assert p.learning_rate_at(examples) == pytest.approx(lr), examples
  assert "warm-up 1 epochs from lr 0.02," in p.table()
  assert p.to_json()["warmup_start_learning_rate"] == 0.02


def test_stage_that_overshoots_its_milestone_shifts_the_next():
  # 4 epochs of 10,000 at B=300: ceil(40000/300)=134 steps end at 40,200.
  p = build(batch_size=300, ghost=10)
  assert p.stages[0].num_steps == 134
  assert p.stages[1].start_examples == 40_200
  assert p.at(40_199).stage == 0 and p.at(40_200).stage == 1
  assert p.total_examples >= 10 * N


def test_positions_outside_the_plan_are_refused():
  p = build()
  with pytest.raises(ValueError, match="outside the plan"):
    p.at(p.total_examples)
  with pytest.raises(ValueError, match="outside the plan"):
    p.examples_at_step(p.total_updates + 1)


PAPER_UPDATES = [
    ("cifar10_decay_lr", 78_000, 80_000),  # "about 80k"
    ("cifar10_increase_batch", 28_500, 29_500),  # "about 29k"
    ("cifar10_increased_lr", 0, 6_500),  # "under 6.5k"
    ("cifar10_increased_momentum", 0, 2_500),  # "under 2.5k"
    ("imagenet_inception_resnet_v2", 0, 6_000),  # "under 6k"
]


def load_config(name, variant=None):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  return module.get_config(variant)


@pytest.mark.parametrize("name,low,high", PAPER_UPDATES)
def test_paper_update_counts(name, low, high):
  p = plan_lib.plan_from_config(load_config(name))
  assert low <= p.total_updates < high


def test_paper_increasing_batch_sizes():
  p = plan_lib.plan_from_config(load_config("cifar10_increase_batch"))
  assert [s.batch_size for s in p.stages] == [128, 640, 3200, 16000]
  p = plan_lib.plan_from_config(load_config("cifar10_increased_momentum"))
  assert [s.batch_size for s in p.stages] == [3200, 5120, 5120, 5120]
  p = plan_lib.plan_from_config(load_config("imagenet_inception_resnet_v2"))
  assert [s.batch_size for s in p.stages] == [8192, 81920, 81920, 81920]
  assert [s.learning_rate for s in p.stages][:2] == [3.0, 3.0]


CONFIGS = ["fashion_mnist", "cifar10_decay_lr", "cifar10_increase_batch",
           "cifar10_hybrid", "cifar10_increased_lr", "cifar10_increased_momentum",
           "imagenet_resnet50", "imagenet_inception_resnet_v2"]


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_variant_keeps_the_structure_and_is_tiny(name):
  full, smoke = load_config(name), load_config(name, "smoke")
  p = plan_lib.plan_from_config(smoke, num_devices=8)
  assert p.kind == full.schedule.kind
  assert len(p.stages) == len(full.schedule.milestones_epochs) + 1
  if p.kind != "decay_lr":  # decay_lr never changes B.
    assert len(p.batch_sizes) >= 3
  assert p.total_examples <= 10_000
  # ImageNet reads in worker processes past the GIL; smoke runs in threads.
  assert full.dataset.worker_processes == (16 if "imagenet" in name else 0)
  assert smoke.dataset.worker_processes == 0


def test_unknown_config_variant_is_refused():
  with pytest.raises(ValueError, match="unknown config variant 'smok'"):
    load_config("fashion_mnist", "smok")


BAD = [
    (dict(kind="cosine"), "schedule.kind='cosine' is unknown"),
    (dict(milestones_epochs=(7.0, 4.0)), "must be strictly increasing"),
    (dict(milestones_epochs=(4.0, 12.0)), "must lie inside"),
    (dict(learning_rate=0.0), "schedule.learning_rate=0.0 must be positive"),
    (dict(learning_rate=-0.1), "schedule.learning_rate=-0.1 must be positive"),
    (dict(batch_size=0), "schedule.batch_size=0 must be positive"),
    (dict(decay_factor=1.0), "schedule.decay_factor=1.0 must be greater than 1"),
    (dict(decay_factor=-2.0), "schedule.decay_factor=-2.0 must be greater"),
    (dict(momentum=1.0), "schedule.momentum=1.0 must be in [0, 1)"),
    (dict(momentum=-0.1), "schedule.momentum=-0.1 must be in [0, 1)"),
    (dict(num_epochs=0.0), "schedule.num_epochs=0.0 must be positive"),
    (dict(warmup_epochs=-1.0), "schedule.warmup_epochs=-1.0 must not be negative"),
    (dict(kind="hybrid"), "schedule.max_batch must be set"),
    (dict(reference_learning_rate=0.1), "must be set together"),
    (dict(reference_learning_rate=0.1, reference_momentum=0.9,
          linear_scaling_batch=256), "set only one"),
    (dict(max_batch=0), "schedule.max_batch=0 must be positive"),
    (dict(decay_factor=float("inf")), "schedule.decay_factor=inf must be a finite number"),
    (dict(learning_rate=float("nan")), "schedule.learning_rate=nan must be a finite number"),
    (dict(milestones_epochs=(4.0, "abc")),
     "schedule.milestones_epochs=(4.0, 'abc') must be finite numbers"),
    (dict(warmup_start_learning_rate=-0.1),
     "schedule.warmup_start_learning_rate=-0.1 must not be negative"),
    (dict(warmup_start_learning_rate=0.2),
     "schedule.warmup_start_learning_rate=0.2 exceeds the first stage's ε=0.1, "
     "which warm-up rises to"),
    (dict(batch_size=20_000), "exceeds dataset.num_train_examples=10000"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_schedule_is_refused_with_its_field(overrides, message):
  with pytest.raises(plan_lib.PlanError, match=re.escape(message)):
    build(**overrides)


def test_batch_not_divisible_by_device_count():
  with pytest.raises(plan_lib.PlanError,
                     match="stage 0 global batch B=100 is not divisible by the "
                     "device count 8"):
    build(num_devices=8)


def test_batch_not_whole_ghost_batches_per_device():
  with pytest.raises(plan_lib.PlanError,
                     match="B=100 gives 25 examples per device, not a multiple "
                     "of ghost_batch_size=10"):
    build(num_devices=4)


def test_empty_stage_is_refused():
  with pytest.raises(plan_lib.PlanError, match="stage 2 .* is empty"):
    build(kind="decay_lr", batch_size=4000, milestones_epochs=(4.0, 4.1, 4.2))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "trainer.plan", *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_checks_micro_batches_only_for_a_device_count_it_is_given():
  # One device would take all 8192 examples, which 320 does not divide; with
  # no --num_devices the plan is of the schedule alone.
  r = run_cli("--config=configs/imagenet_resnet50.py")
  assert r.returncode == 0, r.stderr
  assert "total updates 5631" in r.stdout


def test_cli_prints_table_and_writes_json(tmp_path):
  out = tmp_path / "plan.json"
  r = run_cli("--config=configs/cifar10_increase_batch.py", f"--json={out}",
              "--config.schedule.decay_factor=2")
  assert r.returncode == 0, r.stderr
  assert "total updates" in r.stdout
  data = json.loads(out.read_text())
  p = plan_lib.plan_from_config(load_config("cifar10_increase_batch"))
  assert [s["batch_size"] for s in data["stages"]] == [128, 256, 512, 1024]
  assert data["total_updates"] == sum(s["num_steps"] for s in data["stages"])
  assert data["total_updates"] != p.total_updates  # The override took effect.
  assert str(data["total_updates"]) in r.stdout.splitlines()[-2]


CLI_BAD = [
    (["--config=configs/fashion_mnist.py", "--config.schedule.kindd=x"],
     "--config.schedule.kindd: 'kindd' is not a config field (did you mean 'kind'?)"),
    (["--config=configs/fashion_mnist.py", "--config.schedule.batch_size=abc"],
     "--config.schedule.batch_size=abc"),
    (["--config=configs/nope.py"], "No such file or directory"),
    (["--config=configs/fashion_mnist.py", "--config.schedule.momentum=1.5"],
     "schedule.momentum=1.5 must be in [0, 1)"),
    (["--config=configs/fashion_mnist.py", "--num_devices=3"],
     "not divisible by the device count 3"),
    (["--config=configs/imagenet_resnet50.py", "--num_devices=4"],
     "max_device_batch=320 does not divide the per-device batch 2048 "
     "(B=8192 over 4 devices)"),
    (["--config=configs/fashion_mnist.py:smok"], "unknown config variant 'smok'"),
    ([], "--config is required"),
    (["--config=configs/fashion_mnist.py", "--json=/nonexistent/plan.json"],
     "--json=/nonexistent/plan.json: No such file or directory"),
]


@pytest.mark.parametrize("args,message", CLI_BAD)
def test_cli_bad_input_is_one_line(args, message):
  r = run_cli(*args)
  assert r.returncode == 2
  assert r.stdout == ""
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("error: ") and message in lines[0]


def test_cli_config_without_get_config(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  r = run_cli(f"--config={bad}")
  assert r.returncode == 2
  assert r.stderr.strip() == f"error: --config={bad} does not define get_config()"


def test_cli_stops_quietly_when_its_reader_goes_away():
  # `trainer.plan ... | head -1`: the pipe is closed before the table is
  # printed; the planner exits 1 with nothing on stderr, not a traceback.
  p = subprocess.Popen(
      [sys.executable, "-m", "trainer.plan", "--config=configs/fashion_mnist.py"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  p.stdout.close()
  _, err = p.communicate(timeout=120)
  assert p.returncode == 1
  assert err == ""


def test_cli_config_file_with_a_misspelt_field(tmp_path):
  # A config file may add fields (ml_collections allows it); a misspelt one
  # would silently leave the real field at its default.
  bad = tmp_path / "bad.py"
  bad.write_text("from configs import fashion_mnist\n"
                 "def get_config():\n"
                 "  c = fashion_mnist.get_config()\n"
                 "  c.schedule.batchsize = 64\n"
                 "  return c\n")
  r = run_cli(f"--config={bad}")
  assert r.returncode == 2
  assert r.stderr.strip() == (
      f"error: --config={bad} sets 'schedule.batchsize', which is not a field "
      "of configs/base.py (did you mean 'batch_size'?)")
