"""The science suite: its configs' plans (a table) and the runner's logic.

No test trains: the runner's launcher is replaced by one that writes the
metrics a finished (or failed) run would leave.
"""
import json
import os
import subprocess
import sys

import pytest

from configs import fashion_mnist_suite as suite_config
from trainer import compile as compile_lib
from trainer import plan as plan_lib
from trainer import report as report_lib
from trainer import suite
from trainer import workdir as workdir_lib

N = 60_000
# Stage batches of 128 over 1.2/1.2/0.8/0.8 epochs: ceil(72000/128) = 563
# steps to 72,064, then 562, 375 and 375.
DECAY_LR_UPDATES = 1875
# 563 at 128; ceil((144000-72064)/384) = 188; ceil((192000-144256)/1152) = 42;
# ceil((240000-192640)/3456) = 14.
INCREASE_BATCH_UPDATES = 807
INCREASE_BATCH = [128, 384, 1152, 3456]


def g(lr, m, b):
  return lr / (1 - m) * (N / b - 1)


def thirds(lr):
  return [lr, lr / 3, lr / 9, lr / 27]


# Hybrid at the 1152 cap sets ε so that g falls by exactly 3 from the stage
# before the cap.
_LR_CAP = g(0.2, 0.9, 768) / 3 / g(1.0, 0.9, 1152)
_M_CAP = g(0.2, 0.95, 512) / 3 / g(1.0, 0.95, 1152)
# name, kind, optimizer, B by stage, ε by stage, m, updates
TABLE = [
    ("decay_lr", "decay_lr", "momentum", [128] * 4, thirds(0.1), 0.9,
     DECAY_LR_UPDATES),
    ("increase_batch", "increase_batch", "momentum", INCREASE_BATCH, [0.1] * 4,
     0.9, INCREASE_BATCH_UPDATES),
    # 563 + 188 + 42 + ceil((240000-192640)/1152) = 42.
    ("hybrid", "hybrid", "momentum", [128, 384, 1152, 1152],
     [0.1, 0.1, 0.1, 0.1 / 3], 0.9, 835),
    # B0 = 128·(0.2/0.1) = 256: 282 + 94 + 42 + 41.
    ("increased_lr", "hybrid", "momentum", [256, 768, 1152, 1152],
     [0.2, 0.2, _LR_CAP, _LR_CAP / 3], 0.9, 459),
    # B0 = 128·(0.2/0.1)·(0.1/0.05) = 512: 141 + 63 + 41 + 42.
    ("increased_momentum", "hybrid", "momentum", [512, 1152, 1152, 1152],
     [0.2, _M_CAP, _M_CAP / 3, _M_CAP / 9], 0.95, 287),
    ("sgd_decay_lr", "decay_lr", "sgd", [128] * 4, thirds(1.0), 0.0,
     DECAY_LR_UPDATES),
    ("sgd_increase_batch", "increase_batch", "sgd", INCREASE_BATCH, [1.0] * 4,
     0.0, INCREASE_BATCH_UPDATES),
    ("adam_decay_lr", "decay_lr", "adam", [128] * 4, thirds(1e-3), 0.9,
     DECAY_LR_UPDATES),
    ("adam_increase_batch", "increase_batch", "adam", INCREASE_BATCH,
     [1e-3] * 4, 0.9, INCREASE_BATCH_UPDATES),
    ("increase_batch_ema", "increase_batch", "momentum", INCREASE_BATCH,
     [0.1] * 4, 0.9, INCREASE_BATCH_UPDATES),
    # Planned before any decision: B0 to the end (an upper bound on updates).
    ("adaptive", "adaptive", "momentum", [128], [0.1], 0.9, DECAY_LR_UPDATES),
]
NAMES = [row[0] for row in TABLE]
MOMENTUM_SCHEDULES = NAMES[:5]


def plan_of(variant):
  return plan_lib.plan_from_config(suite_config.get_config(variant),
                                   num_devices=8)


@pytest.mark.parametrize("name,kind,optimizer,batches,lrs,momentum,updates",
                         TABLE)
def test_experiment_plan(name, kind, optimizer, batches, lrs, momentum, updates):
  config = suite_config.get_config(name)
  plan = plan_lib.plan_from_config(config, num_devices=8)
  assert config.optimizer.name == optimizer
  assert plan.kind == kind
  assert [s.batch_size for s in plan.stages] == batches
  assert [s.learning_rate for s in plan.stages] == pytest.approx(lrs)
  assert {s.momentum for s in plan.stages} == {momentum}
  assert plan.total_updates == updates
  assert plan.total_examples >= 4 * N


def test_experiments_and_seeds():
  assert [e.name for e in suite_config.EXPERIMENTS] == NAMES
  seeds = {e.name: e.seeds for e in suite_config.EXPERIMENTS}
  assert all(seeds[n] == (0, 1, 2) for n in ("decay_lr", "increase_batch", "hybrid"))
  assert sum(map(len, seeds.values())) == 17
  ema = suite_config.get_config("increase_batch_ema")
  plain = suite_config.get_config("increase_batch")
  assert workdir_lib.config_differences(
      json.loads(plain.to_json()), json.loads(ema.to_json())) == [
          "weight_average ('none' → 'ema')"]
  adaptive = suite_config.get_config("adaptive").schedule
  assert (adaptive.max_batch, adaptive.adaptive_every_epochs,
          adaptive.adaptive_scale, adaptive.adaptive_growth) == (
              2048, 0.25, 1.0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_shared_protocol(name):
  """Same data, model, epochs and milestones; g falls ~3x at each of them."""
  config = suite_config.get_config(name)
  assert (config.dataset.name, config.dataset.num_train_examples) == (
      "fashion_mnist", N)
  assert config.dataset.source != "synthetic"
  assert (config.model.name, config.model.width, config.ghost_batch_size,
          config.max_device_batch) == ("small_resnet", 8, 16, 16)
  s = config.schedule
  assert (s.num_epochs, tuple(s.milestones_epochs), s.decay_factor) == (
      4.0, (1.2, 2.4, 3.2), 3.0)
  assert config.eval_every_epochs == 0.5
  plan = plan_lib.plan_from_config(config, num_devices=8)
  reference = plan_of("decay_lr")  # g = 467.8 / 3^k: noise scale per stage.
  # B·3 ≠ (N/B - 1)·3 exactly, so the growing schedules' g is ≤ 6% lower.
  scale = 1e-2 if config.optimizer.name == "adam" else 1.0  # ε 1e-3 vs 0.1.
  for stage, ref in zip(plan.stages, reference.stages):
    assert stage.noise_scale == pytest.approx(scale * ref.noise_scale, rel=0.06)
  # Every stage splits into per-device micro-batches of max_device_batch.
  for batch in plan.batch_sizes:
    compile_lib.micro_batches(batch, 8, config.max_device_batch,
                              config.ghost_batch_size)


def test_increase_batch_needs_far_fewer_updates_and_stays_below_n():
  decay, grow = plan_of("decay_lr"), plan_of("increase_batch")
  assert decay.total_updates / grow.total_updates > 2.3
  assert max(grow.batch_sizes) <= N // 10
  assert len(grow.batch_sizes) == 4
  assert (plan_of("increased_momentum").total_updates
          < plan_of("increased_lr").total_updates < plan_of("hybrid").total_updates)


@pytest.mark.parametrize("name", ["decay_lr", "increase_batch", "hybrid"])
def test_seeds_differ_only_in_seed(name):
  configs = [json.loads(suite_config.get_config(f"{name},seed={k}").to_json())
             for k in (0, 1, 2)]
  assert workdir_lib.config_differences(configs[0], configs[1]) == ["seed (0 → 1)"]
  assert workdir_lib.config_differences(configs[0], configs[2]) == ["seed (0 → 2)"]
  assert configs[0] == json.loads(suite_config.get_config(name).to_json())


@pytest.mark.parametrize("name", NAMES)
def test_smoke_variant_is_tiny_real_data_same_structure(name):
  full, smoke = suite_config.get_config(name), suite_config.get_config(
      f"{name},seed=1,smoke")
  plan = plan_lib.plan_from_config(smoke, num_devices=8)
  assert smoke.seed == 1
  assert smoke.dataset.source == full.dataset.source != "synthetic"
  assert smoke.optimizer.name == full.optimizer.name
  assert plan.kind == full.schedule.kind
  assert len(plan.stages) == (1 if plan.kind == "adaptive" else 4)
  if plan.kind not in ("decay_lr", "adaptive"):
    assert len(plan.batch_sizes) >= 3
  assert plan.total_examples <= 10_000
  for batch in plan.batch_sizes:
    compile_lib.micro_batches(batch, 8, smoke.max_device_batch,
                              smoke.ghost_batch_size)


BAD_VARIANTS = [
    (None, "needs a variant naming the experiment"),
    ("", "needs a variant naming the experiment"),
    ("decay", "unknown experiment 'decay'"),
    ("seed=1", "variant 'seed=1' names no experiment: the experiment comes "
     "first"),
    ("smoke", "variant 'smoke' names no experiment: .* e.g. "
     "':increase_batch,seed=1,smoke'"),
    ("decay_lr,seed=x", "seed='x' in variant 'decay_lr,seed=x' must be a "
     "non-negative integer"),
    ("decay_lr,seed=-1", "seed='-1' .* must be a non-negative integer"),
    ("decay_lr,seed=", "seed='' .* must be a non-negative integer"),
    ("decay_lr,seed=1,seed=2", "gives 'seed' twice"),
    ("decay_lr,smok", "unknown option 'smok'"),
    ("decay_lr,smoke=1", "unknown option 'smoke=1'"),
]


@pytest.mark.parametrize("variant,message", BAD_VARIANTS)
def test_bad_variant_is_refused_with_its_problem(variant, message):
  with pytest.raises(ValueError, match=message):
    suite_config.get_config(variant)


def test_bad_variant_on_the_command_line_is_one_line():
  r = subprocess.run(
      [sys.executable, "-m", "trainer.plan",
       "--config=configs/fashion_mnist_suite.py:decay_lr,sed=1"],
      capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "unknown option 'sed=1'" in lines[0]


# The runner.

RUN_NAMES = ([f"{n}_seed{k}" for n in ("decay_lr", "increase_batch", "hybrid")
              for k in (0, 1, 2)]
             + [f"{n}_seed0" for n in NAMES[3:]])


def test_runs_names_workdirs_and_commands(tmp_path):
  runs = suite.plan_runs(str(tmp_path))
  assert [r.name for r in runs] == RUN_NAMES
  for run in runs:
    assert run.workdir == str(tmp_path / "runs" / run.name)
    assert run.log_path == os.path.join(run.workdir, "train.log")
    # The report groups a run's seeds under the experiment's name.
    assert report_lib.default_label(run.workdir) == run.experiment
    assert run.command == [
        sys.executable, "-m", "trainer.main",
        f"--config=configs/fashion_mnist_suite.py:{run.experiment},seed={run.seed}",
        f"--workdir={run.workdir}"]
    assert run.config == suite_config.get_config(run.variant)
    assert run.config.seed == run.seed


def test_smoke_runs_take_the_smoke_variant(tmp_path):
  runs = suite.plan_runs(str(tmp_path), smoke=True)
  assert [r.name for r in runs] == RUN_NAMES
  assert all(r.variant.endswith(",smoke") and r.command[3].endswith(",smoke")
             for r in runs)
  assert all(r.plan.total_examples <= 10_000 for r in runs)


def test_only_selects_experiments_in_suite_order(tmp_path):
  runs = suite.plan_runs(str(tmp_path), only=["sgd_decay_lr", "hybrid"])
  assert [r.name for r in runs] == ["hybrid_seed0", "hybrid_seed1",
                                    "hybrid_seed2", "sgd_decay_lr_seed0"]
  with pytest.raises(suite.SuiteError,
                     match="--only: unknown experiment.s. hybird; known: decay_lr"):
    suite.plan_runs(str(tmp_path), only=["hybird"])


def test_reports_cover_every_experiment():
  named = {n for names in suite.REPORTS.values() for n in names}
  assert named == set(NAMES)
  assert suite.REPORTS["report"] == tuple(MOMENTUM_SCHEDULES)
  # The adaptive schedule against the paper's two (their runs reused).
  assert suite.REPORTS["report_beyond"] == (
      "decay_lr", "increase_batch", "increase_batch_ema", "adaptive")


def test_train_env_has_8_devices_and_keeps_other_flags():
  env = suite.train_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                      "--xla_cpu_foo=1", "HOME": "/h"})
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                              "--xla_cpu_foo=1")
  assert env["HOME"] == "/h"
  assert suite.train_env({})["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=8")
  assert suite.train_env({}, devices=4)["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=4")


def test_dry_run_estimate_fits_the_hour_and_trains_nothing(tmp_path, capsys):
  runs = suite.plan_runs(str(tmp_path))
  # The paper's 15 runs fit the hour; weight averaging and the adaptive
  # schedule add two more.
  paper = [r for r in runs if r.experiment not in ("increase_batch_ema",
                                                   "adaptive")]
  assert len(paper) == 15
  assert sum(map(suite.estimate_seconds, paper)) <= 60 * 60
  assert sum(map(suite.estimate_seconds, runs)) <= 65 * 60
  assert suite.main(["--out", str(tmp_path / "s"), "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "17 runs, 4,089,600 examples, estimated" in out
  assert " ".join(runs[0].command).replace(str(tmp_path), str(tmp_path / "s")) in out
  assert "increase_batch_seed0" in out and "128/384/1152/3456" in out
  assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("argv,message", [
    (["--dry_run"], "the following arguments are required: --out"),
    (["--out", "x", "--only", "nope"], "--only: unknown experiment(s) nope"),
    (["--out", "x", "--only", ","], "--only names no experiment"),
    (["--out", "x", "--target_accuracy", "90"], "must be a fraction"),
    (["--out", "setup.py", "--dry_run"], "--out=setup.py exists and is not a directory"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
  assert suite.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def write_metrics(run, final=True):
  """The records a run leaves: train and eval at each stage's end."""
  os.makedirs(run.workdir, exist_ok=True)
  records = []
  stages = run.plan.stages if final else run.plan.stages[:1]
  for stage in stages:
    step = stage.start_step + stage.num_steps
    common = dict(step=step, examples_seen=stage.end_examples,
                  epoch=stage.end_examples / run.plan.num_train_examples,
                  wall_time=float(step))
    records.append(dict(kind="train", batch_size=stage.batch_size,
                        learning_rate=stage.learning_rate, train_loss=1.0 / step,
                        **common))
    records.append(dict(kind="eval", eval_accuracy=0.8 + 0.01 * stage.index,
                        **common))
  with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def test_suite_runs_in_order_names_failures_and_reports(tmp_path, monkeypatch,
                                                        capsys):
  out = tmp_path / "suite"
  launched = []

  def fake_launch(run):
    launched.append(run.name)
    if run.experiment == "sgd_increase_batch":
      return 1  # Crashes before writing anything.
    write_metrics(run, final=run.experiment != "adam_increase_batch")
    return 0  # adam_increase_batch "exits cleanly" half way (preempted).

  monkeypatch.setattr(suite, "launch", fake_launch)
  only = "increase_batch,decay_lr,sgd_increase_batch,adam_increase_batch"
  assert suite.main(["--out", str(out), "--only", only]) == 1
  assert launched == ["decay_lr_seed0", "decay_lr_seed1", "decay_lr_seed2",
                      "increase_batch_seed0", "increase_batch_seed1",
                      "increase_batch_seed2", "sgd_increase_batch_seed0",
                      "adam_increase_batch_seed0"]
  captured = capsys.readouterr()
  assert "[4/8] increase_batch_seed0: training (elapsed" in captured.out
  assert "[1/8] decay_lr_seed0: done in" in captured.out
  assert "1875 updates, test accuracy 83.00%" in captured.out
  errors = captured.err.strip().splitlines()
  log = out / "runs" / "sgd_increase_batch_seed0" / "train.log"
  assert errors == [
      f"error: run sgd_increase_batch_seed0 failed: exit status 1; see {log}",
      "error: run adam_increase_batch_seed0 failed: it stopped before its "
      "final step (preempted?); see "
      f"{out / 'runs' / 'adam_increase_batch_seed0' / 'train.log'}"]
  # The main report groups the seeds; the others had no finished run.
  (left_out,) = [l for l in captured.out.splitlines()
                 if l.startswith(f"{out / 'report'}: leaving out")]
  assert left_out.startswith(
      f"{out / 'report'}: leaving out runs not finished (yet): ")
  assert "hybrid_seed0" in left_out and "decay_lr_seed0" not in left_out
  table = (out / "report" / "report.md").read_text()
  rows = [l for l in table.splitlines() if l.startswith("| ") and "seeds" not in l]
  assert [r.split(" | ")[:2] for r in rows] == [["| decay_lr", "3"],
                                                ["| increase_batch", "3"]]
  assert "hybrid" not in table
  for figure in report_lib.FIGURES:
    assert (out / "report" / figure).is_file()
  assert not (out / "report_sgd").exists()
  assert not (out / "report_adam").exists()


def test_rerun_skips_finished_runs_and_reports_earlier_ones(tmp_path,
                                                            monkeypatch):
  """Finished runs are not relaunched; unfinished ones resume (the trainer
  continues from their checkpoints)."""
  out = tmp_path / "suite"
  launched = []

  def fake_launch(run):
    launched.append(run.name)
    if not os.path.exists(os.path.join(run.workdir, "metrics.jsonl")):
      write_metrics(run)
    return 0

  monkeypatch.setattr(suite, "launch", fake_launch)
  assert suite.main(["--out", str(out), "--only", "sgd_decay_lr"]) == 0
  assert suite.main(["--out", str(out), "--only", "sgd_decay_lr,"
                     "sgd_increase_batch"]) == 0
  assert launched == ["sgd_decay_lr_seed0", "sgd_increase_batch_seed0"]
  table = (out / "report_sgd" / "report.md").read_text()
  assert "| sgd_decay_lr | 1 |" in table and "| sgd_increase_batch | 1 |" in table
  # A later --only run keeps the earlier runs in the reports.
  assert suite.main(["--out", str(out), "--only", "sgd_increase_batch"]) == 0
  assert "| sgd_decay_lr | 1 |" in (out / "report_sgd" / "report.md").read_text()


def test_interrupt_stops_with_a_resume_hint(tmp_path, monkeypatch, capsys):
  def interrupted(run):
    raise KeyboardInterrupt

  monkeypatch.setattr(suite, "launch", interrupted)
  assert suite.main(["--out", str(tmp_path), "--only", "adam_decay_lr"]) == 130
  assert ("interrupted during adam_decay_lr_seed0; rerun the same command to "
          "resume") in capsys.readouterr().err


def test_launch_appends_the_runs_output_to_its_log(tmp_path, monkeypatch):
  run = suite.plan_runs(str(tmp_path), only=["adam_decay_lr"])[0]
  script = "import os, sys; print('out', os.environ['XLA_FLAGS']); print('err', file=sys.stderr); sys.exit(3)"
  monkeypatch.setattr(suite.Run, "command", [sys.executable, "-c", script])
  assert suite.launch(run) == 3
  assert suite.launch(run) == 3
  log = open(run.log_path).read()
  assert log.count("=== ") == 2
  assert log.count("out --xla_force_host_platform_device_count=8") == 2
  assert log.count("err\n") == 2


def test_estimate_counts_one_compile_per_shape(tmp_path):
  # increase_batch: B 128 → 3456 over 8 devices with max_device_batch=16.
  # Host accumulation: 16 per device and up share one set, one compile;
  # compiled accumulation: one step per batch size, four.
  run = suite.plan_runs(str(tmp_path), only=["increase_batch"])[0]
  assert run.config.max_device_batch * suite.NUM_DEVICES == 128
  host = suite.estimate_seconds(run)
  run.config.accumulation = "compiled"
  assert suite.estimate_seconds(run) - host == pytest.approx(
      3 * suite.COMPILE_SECONDS)
