"""End to end on CPU: a tiny multi-stage run follows its plan and resumes."""
import itertools
import os
import re
import time
import types

import jax
import numpy as np
import pytest

import input_pipeline
import models
from configs import cifar10_increase_batch
from trainer import checkpoint as checkpoint_lib
from trainer import compile as compile_lib
from trainer import loop
from trainer import mesh as mesh_lib
from trainer import optimizer as optimizer_lib
from trainer import metrics as metrics_lib
from trainer import plan as plan_lib
from trainer import workdir as workdir_lib


def tiny_config():
  config = cifar10_increase_batch.get_config("smoke")
  config.dataset.num_train_examples = 1024
  config.dataset.num_eval_examples = 200  # Not a multiple of the eval batch.
  config.eval_batch_size = 64
  config.model.width = 4
  config.schedule.milestones_epochs = (1.0, 2.0)
  config.schedule.num_epochs = 3.0
  config.checkpoint_every_steps = 10
  config.log_every_steps = 4
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  with jax.transfer_guard("disallow"):  # No implicit host<->device copies.
    final = loop.train_and_evaluate(config, workdir)
  return config, workdir, final


def test_run_follows_the_plan(run):
  config, workdir, final = run
  plan = plan_lib.plan_from_config(config, num_devices=jax.device_count())
  assert [s.batch_size for s in plan.stages] == [64, 128, 256]
  assert final["step"] == plan.total_updates == 16 + 8 + 4
  assert final["examples_seen"] == plan.total_examples
  train = metrics_lib.read_metrics(workdir, "train")
  assert train[-1]["step"] == plan.total_updates
  assert {r["batch_size"] for r in train} == {64, 128, 256}
  for r in train:  # Every logged step reports what the plan fixed for it.
    pos = plan.at_step(r["step"] - 1)
    assert (r["stage"], r["batch_size"]) == (pos.stage, pos.batch_size)
    assert r["learning_rate"] == pytest.approx(pos.learning_rate)
    assert r["noise_scale"] == pytest.approx(pos.noise_scale)
    assert r["examples_per_second"] > 0 and r["step_time"] > 0
    assert r["compile_wait"] >= 0
  assert train[-1]["train_loss"] < train[0]["train_loss"]


def test_one_compile_per_batch_size(run):
  _, workdir, _ = run
  compiles = metrics_lib.read_metrics(workdir, "compile")
  assert sorted(r["batch_size"] for r in compiles) == [64, 128, 256]
  assert all(r["compile_seconds"] > 0 for r in compiles)


def test_eval_scores_the_whole_split_each_epoch(run):
  _, workdir, final = run
  evals = metrics_lib.read_metrics(workdir, "eval")
  assert [round(r["epoch"]) for r in evals] == [1, 2, 3]
  assert all(r["eval_examples"] == 200 for r in evals)
  assert final["eval_accuracy"] == evals[-1]["eval_accuracy"]
  assert evals[-1]["eval_accuracy"] > 0.2  # Synthetic labels are learnable.


def test_checkpoints_at_stage_ends_and_interval(run):
  _, workdir, _ = run
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  # Stage ends 16, 24, 28 are kept; interval 10 → 10, 20; the last 3 kept.
  assert steps == [16, 20, 24, 28]


def test_rerun_of_a_finished_run_trains_nothing(run):
  config, workdir, final = run
  again = loop.train_and_evaluate(config, workdir)
  assert again["step"] == final["step"]
  assert again["examples_seen"] == final["examples_seen"]


def test_workdir_of_another_config_is_refused(run):
  config, workdir, _ = run
  config = tiny_config()
  config.schedule.learning_rate = 0.2

  def files():
    return {name: (st.st_mtime_ns, st.st_size) for name in os.listdir(workdir)
            for st in [os.stat(os.path.join(workdir, name))]}

  before = files()
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"different config: schedule.learning_rate \(0.1 → 0.2\)"):
    loop.train_and_evaluate(config, workdir)
  assert files() == before  # Refused before the workdir (its lock) is touched.


def test_input_wait_is_the_share_of_time_spent_waiting_for_batches(
    run, tmp_path, monkeypatch):
  """The run fixture's loop hardly waits for its batches; with every batch
  held back 0.3 s, the waits are most of the wall time."""
  _, workdir, _ = run
  quick = [r["input_wait_fraction"]
           for r in metrics_lib.read_metrics(workdir, "train")]
  assert len(quick) > 5 and np.median(quick) < 0.1  # The first waits longer.
  next_batch = input_pipeline.prefetch.Prefetcher.__next__
  def slow(self):
    time.sleep(0.3)
    return next_batch(self)
  monkeypatch.setattr(input_pipeline.prefetch.Prefetcher, "__next__", slow)
  config = tiny_config()
  config.schedule.num_epochs = 1.0  # Stage 0 only: 16 steps of B=64.
  config.schedule.milestones_epochs = ()
  config.eval_every_epochs = 10.0
  loop.train_and_evaluate(config, str(tmp_path))
  slowed = [r["input_wait_fraction"]
            for r in metrics_lib.read_metrics(str(tmp_path), "train")]
  # Median: on a loaded machine one window's steps may run slow too.
  assert len(slowed) >= 4 and np.median(slowed) > 0.5, slowed


def test_resume_may_change_how_the_host_reads_and_dispatches(run):
  """Workers, prefetch depth and steps in flight do not change what is
  trained (the stream and order tests), so a resume may change them."""
  config, workdir, final = run
  config = tiny_config()
  config.dataset.num_workers = 3
  config.dataset.worker_processes = 2
  config.dataset.prefetch_batches = 1
  config.steps_in_flight = 2
  again = loop.train_and_evaluate(config, workdir)
  assert again["step"] == final["step"]
  config.seed = 1  # Still refused alongside them.
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"different config: seed \(0 → 1\);"):
    loop.train_and_evaluate(config, workdir)


def test_non_finite_loss_stops_the_run_naming_step_and_stage(tmp_path):
  config = tiny_config()
  config.schedule.learning_rate = 1e6
  config.optimizer.weight_decay = 0.0
  with pytest.raises(loop.TrainingDiverged,
                     match=r"non-finite loss .* at step \d+ \(stage 0, B=64\); "
                     r"no checkpoint yet"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_metrics_writer_drops_a_line_cut_by_a_kill(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra')
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write("train", 2, train_loss=0.5)
  writer.close()
  records = metrics_lib.read_metrics(str(tmp_path))
  assert records == [dict(kind="train", step=1),
                     dict(kind="train", step=2, train_loss=0.5)]


def test_disk_full_during_save_stops_with_one_line(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from trainer import checkpoint as checkpoint_lib
  real_save = ocp.CheckpointManager.save
  calls = []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) > 1:
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  config = tiny_config()
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  assert str(info.value) == (
      f"saving checkpoint step 16 in {tmp_path}/checkpoints failed "
      "([Errno 28] No space left on device); earlier checkpoints [10] are intact")
  assert os.listdir(tmp_path / "checkpoints") == ["10"]


def test_weight_average_is_evaluated_without_changing_training(run, tmp_path):
  """The same run with an EMA of the weights: identical training (params
  bitwise equal), and each evaluation also scores the averaged weights
  with batch-norm statistics recomputed for them."""
  _, plain_dir, plain = run
  config = tiny_config()
  config.weight_average = "ema"
  config.ema_horizon_epochs = 0.5
  workdir = str(tmp_path)
  with jax.transfer_guard("disallow"):
    final = loop.train_and_evaluate(config, workdir)
  assert final["eval_accuracy"] == plain["eval_accuracy"]
  evals = metrics_lib.read_metrics(workdir, "eval")
  assert all(0.0 <= r["ema_eval_accuracy"] <= 1.0 and r["ema_eval_loss"] > 0
             for r in evals)
  assert evals[-1]["ema_eval_accuracy"] > 0.2
  restored = []
  for directory, cfg in ((plain_dir, tiny_config()), (workdir, config)):
    model = models.create_model(cfg)
    tx = optimizer_lib.make_optimizer(cfg.optimizer, learning_rate=0.1,
                                      momentum=0.9)
    state = loop.create_train_state(cfg, model, tx, mesh_lib.make_mesh(),
                                    seed=0)
    checkpoints = checkpoint_lib.Checkpointer(
        directory, every_steps=100, every_minutes=0.0, max_to_keep=10)
    restored.append(checkpoints.restore(state)[0])
    checkpoints.close()
  plain_state, ema_state = restored
  assert plain_state.ema_params is None
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain_state.params,
                         ema_state.params)
  # The average lags the weights: it differs from them.
  differs = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)),
                                   ema_state.params, ema_state.ema_params)
  assert any(jax.tree_util.tree_leaves(differs))


@pytest.mark.parametrize("process_index", [0, 1])
def test_averaged_weights_recompute_the_same_batches_on_every_process(
    monkeypatch, process_index):
  """Batch norm for the averaged weights runs one program across processes,
  so every process must feed it the same number of batches. N=1024 in
  batches of 384 leaves a third of 256 examples: process 0's share (192) of
  it is full, process 1's is not; neither may use it."""
  config = tiny_config()
  config.weight_average = "ema"
  config.ema_bn_batch_size = 384
  config.ema_bn_batches = 3
  monkeypatch.setattr(loop.jax, "process_index", lambda: process_index)
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop.mesh_lib, "global_batch", lambda batch, mesh: batch)
  masks = []

  def stats_fn(params, batch_stats, batch):
    masks.append(batch["mask"])
    return {"mean": jax.numpy.ones(())}

  state = types.SimpleNamespace(ema_params={}, batch_stats={},
                                replace=lambda **kw: kw)
  out = loop.averaged_weights_state(state, stats_fn, config,
                                    mesh_lib.make_mesh(),
                                    input_pipeline.sources.train_source(config))
  assert len(masks) == 2  # 1024 // 384 full batches, fewer than 3.
  assert all(m.shape == (192,) and m.min() == 1 for m in masks)
  assert float(out["batch_stats"]["mean"]) == 1.0


_TIMINGS = {"step_time", "compile_wait", "examples_per_second", "wall_time",
            "peak_host_memory_mb", "input_wait_fraction"}


@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_steps_in_flight_order_and_same_training(run, tmp_path, monkeypatch,
                                                  steps_in_flight):
  """With 2, step t+1 is dispatched before step t's metrics are read, except
  after the steps whose state is saved or evaluated (stage ends, the
  checkpoint interval); with 1, each step is read before the next. Either
  way the run trains the same: every record but the timings is equal to the
  fixture's (unset: 1 on the CPU)."""
  events, dispatches = [], itertools.count(1)
  get, read = compile_lib.StepCompiler.get, loop._StepReader.read

  def logged_get(self, batch_size):
    step_fn = get(self, batch_size)

    def step(state, local, hyper):
      events.append(("dispatch", next(dispatches)))
      return step_fn(state, local, hyper)
    return step

  def logged_read(self, dispatched):
    events.append(("read", dispatched.pos.step + 1))
    return read(self, dispatched)

  monkeypatch.setattr(compile_lib.StepCompiler, "get", logged_get)
  monkeypatch.setattr(loop._StepReader, "read", logged_read)
  _, plain_dir, plain = run
  config = tiny_config()
  config.steps_in_flight = steps_in_flight
  final = loop.train_and_evaluate(config, str(tmp_path))

  synced = {10, 16, 20, 24, 28}  # Checkpoint interval 10; stage ends.
  expected = []
  for t in range(1, 29):
    expected.append(("dispatch", t))
    if steps_in_flight == 2 and t - 1 >= 1 and t - 1 not in synced:
      expected.append(("read", t - 1))
    if steps_in_flight == 1 or t in synced:
      expected.append(("read", t))
  assert events == expected
  assert final == plain
  for kind in ("train", "eval"):
    ours, theirs = (
        [{k: v for k, v in r.items() if k not in _TIMINGS}
         for r in metrics_lib.read_metrics(d, kind)]
        for d in (str(tmp_path), plain_dir))
    assert ours == theirs and ours


def test_bad_steps_in_flight_is_refused(tmp_path):
  config = tiny_config()
  config.steps_in_flight = 3
  with pytest.raises(compile_lib.ConfigError,
                     match=r"steps_in_flight=3 must be 1 \(read each step's "
                     r"metrics before the next\) or 2 \(one step ahead\); "
                     r"unset: 1 on the CPU, 2 elsewhere$"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_steps_in_flight_unset_is_1_on_the_cpu():
  config = tiny_config()
  assert config.steps_in_flight is None and jax.default_backend() == "cpu"
  assert loop.steps_in_flight(config) == 1
  config.steps_in_flight = 2
  assert loop.steps_in_flight(config) == 2


def test_bad_weight_average_is_refused(tmp_path):
  config = tiny_config()
  config.weight_average = "swa"
  with pytest.raises(compile_lib.ConfigError,
                     match="weight_average='swa' is not one of none, ema"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


class _Writer:
  """Collects what the loop writes: [(kind, step, record)]."""

  def __init__(self):
    self.records = []

  def write(self, kind, step, **record):
    self.records.append((kind, step, record))


def _position(**fields):
  return types.SimpleNamespace(**dict(
      stage=1, batch_size=128, learning_rate=0.1, momentum=0.9,
      noise_scale=12.5) | fields)


@pytest.mark.parametrize("is_chief", [True, False])
def test_train_record_and_progress_line(capsys, is_chief):
  plan = types.SimpleNamespace(num_train_examples=1000, total_examples=3000,
                               total_updates=30)
  # 1,500 examples in ~1 s, 0.5 s of which waited for a stage's compile.
  clock = loop._Clock(start=time.perf_counter() - 1.0, examples=0,
                      input_wait=0.25, compile_wait=0.5)
  writer = _Writer()
  loop._log_train(writer, is_chief, plan, _position(), 12, 1500,
                  dict(train_loss=np.float32(0.5), train_accuracy=0.75),
                  noise_scale=None, clock=clock, run_start=0.0,
                  step_time=0.25)
  (kind, step, record), = writer.records
  assert (kind, step) == ("train", 12)
  assert record["epoch"] == 1.5 and record["batch_size"] == 128
  assert record["train_loss"] == 0.5 and "grad_noise_scale" not in record
  assert record["step_time"] == 0.25
  assert 1000 < record["examples_per_second"] <= 1500  # 1,500 in ~1 s.
  assert 0.2 < record["input_wait_fraction"] <= 0.25  # 0.25 s of ~1 s.
  assert record["compile_wait"] == 0.5
  assert clock.examples == 1500 and clock.input_wait == 0.0  # Next window.
  assert clock.compile_wait == 0.0
  out = capsys.readouterr().out
  if is_chief:
    assert re.fullmatch(
        r"step 12/30 epoch 1\.50 stage 1 B=128 lr=0\.1 loss 0\.5000 "
        # The 1,500 examples left take ~0.5 s at the rate without the wait.
        r"acc 0\.750 1,[0-5]\d\d ex/s input wait 2[0-5]% ETA 0m00s\n",
        out), out
  else:
    assert out == ""


def test_eval_record_and_line(capsys):
  writer = _Writer()
  evaluation = dict(eval_loss=0.3, eval_accuracy=0.91,
                    ema_eval_accuracy=0.92)
  loop._log_eval(writer, True, 40, 2000, 1000, 0.0, evaluation)
  (kind, step, record), = writer.records
  assert (kind, step, record["epoch"]) == ("eval", 40, 2.0)
  assert record["eval_accuracy"] == 0.91
  assert capsys.readouterr().out == (
      "eval at epoch 2.00: loss 0.3000 accuracy 0.9100 "
      "(EMA weights: 0.9200)\n")


@pytest.mark.parametrize("noise,batch,line", [
    (600.0, 512, "adaptive: B 128 → 512 at epoch 0.50 (B_simple 600.0)\n"),
    (50.0, 128, ""),  # Unchanged: recorded, not printed.
])
def test_batch_decision_is_recorded_and_a_change_printed(capsys, noise,
                                                         batch, line):
  from tests.test_adaptive import schedule
  writer = _Writer()
  got = loop._decide_batch(writer, True, schedule(), 128, _position(), 5,
                           500, 1000, noise)
  assert got == batch
  (kind, step, record), = writer.records
  assert (kind, step) == ("batch_decision", 5)
  assert (record["previous_batch_size"], record["batch_size"]) == (128, batch)
  assert capsys.readouterr().out == line


def _tensorboard_events(directory):
  """Every event in the TFRecord files under `directory`."""
  import struct
  from tensorboardX.proto import event_pb2
  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_a_resumed_run_hides_the_abandoned_tensorboard_steps(tmp_path):
  """The resumed run logs again the steps after its checkpoint; its event
  file starts by purging them (TensorBoard's SessionLog START at the first
  step it will log)."""
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write("train", 12, train_loss=1.0)
  writer.close()
  time.sleep(1.1)  # Event files are named by the second they start.
  writer = metrics_lib.MetricsWriter(str(tmp_path), purge_step=11)
  writer.write("train", 11, train_loss=0.5)
  writer.close()
  events = _tensorboard_events(tmp_path / "tensorboard")
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [11]
  logged = [(e.step, e.summary.value[0].simple_value) for e in events
            if e.HasField("summary")]
  assert logged == [(12, 1.0), (11, 0.5)]


@pytest.mark.parametrize("final,start,expected", [
    (dict(step=28, examples_seen=3072, preempted=False, eval_accuracy=0.4531),
     0, "done: 28 updates, 3,072 examples in 1m05s of training, eval accuracy "
     "0.4531; metrics in M, checkpoints in C\n"),
    (dict(step=28, examples_seen=3072, preempted=False), 28,
     "already complete: 28/28 updates; metrics in M, checkpoints in C\n"),
    (dict(step=12, examples_seen=768, preempted=True), 5,
     "preempted: saved step 12 in C; rerun the same command to resume\n"
     "metrics in M, checkpoints in C\n"),
])
def test_the_last_line_says_how_the_run_ended(capsys, final, start, expected):
  loop._print_end(final, 65.0, start, types.SimpleNamespace(total_updates=28),
                  "M", "C", "preempted")
  assert capsys.readouterr().out == expected


def test_non_finite_loss_names_the_checkpoint_and_its_risk():
  checkpoints = types.SimpleNamespace(latest_step=lambda: 20,
                                      directory="/w/checkpoints")
  pos = types.SimpleNamespace(stage=1, batch_size=128)
  with pytest.raises(loop.TrainingDiverged) as e:
    loop._check_finite(dict(train_loss=np.float32("nan")), 23, pos, checkpoints)
  assert str(e.value) == (
      "non-finite loss nan at step 23 (stage 1, B=128); last checkpoint: step "
      "20 in /w/checkpoints (its weights may already be diverging: resumed "
      "unchanged, the run may fail the same way)")
