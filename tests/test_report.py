"""`python -m trainer.report`: table numbers, grouping, figures, bad input.

Runs are synthetic metrics.jsonl files with N = 1000 training examples, so
every expected number below can be checked by hand.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from trainer import report

N = 1000
RATE = 1000.0  # examples/s logged by every run: 1 s per epoch.


def train_records(stages, log_every, *, rate=RATE, wall_per_example=None):
  """Train records at every `log_every`-th step and at each stage's end.

  stages: (batch_size, learning_rate, epochs) in order.
  """
  records, step, examples = [], 0, 0
  for stage, (batch, lr, epochs) in enumerate(stages):
    end = examples + epochs * N
    while examples < end:
      step, examples = step + 1, examples + batch
      if step % log_every == 0 or examples >= end:
        record = dict(kind="train", step=step, examples_seen=examples,
                      epoch=examples / N, stage=stage, batch_size=batch,
                      learning_rate=lr, momentum=0.9,
                      noise_scale=lr * N / batch / 0.1,
                      train_loss=2.0 / (1 + examples / N), train_accuracy=0.5,
                      grad_norm=1.0, examples_per_second=rate, step_time=0.1)
        if wall_per_example:
          record["wall_time"] = examples * wall_per_example
        records.append(record)
  return records


def eval_records(stages, accuracies, wall_per_example=None):
  """One eval at the end of each epoch, at the step that ends it."""
  out = []
  for epoch, accuracy in enumerate(accuracies, 1):
    step = sum(min(epochs, max(0, epoch - sum(e for *_, e in stages[:i])))
               * N // batch for i, (batch, _, epochs) in enumerate(stages))
    record = dict(kind="eval", step=step, examples_seen=epoch * N,
                  epoch=float(epoch), eval_loss=1 - accuracy,
                  eval_accuracy=accuracy, eval_examples=500)
    if wall_per_example:
      record["wall_time"] = epoch * N * wall_per_example
    out.append(record)
  return out


def write_run(workdir, records, kind=None):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if kind:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(dict(seed=0, schedule=dict(kind=kind, num_epochs=4.0)), f)
  return str(workdir)


INCREASE = [(100, 0.1, 2), (200, 0.1, 2)]  # 20 + 10 = 30 updates.
DECAY = [(100, 0.1, 2), (100, 0.05, 2)]  # 40 updates.


@pytest.fixture
def runs(tmp_path):
  """decay (1 run) and inc (2 seeds); seed 1 was killed and resumed."""
  decay = train_records(DECAY, log_every=4)  # Evals fall between records.
  decay_dir = write_run(tmp_path / "decay", decay + eval_records(
      DECAY, [0.5, 0.7, 0.9, 0.91]), kind="decay_lr")

  # Seed 0 records wall_time at 2 ms per example, while its examples/s
  # would say 1 ms: the recorded time must win.
  seed0 = train_records(INCREASE, log_every=5, wall_per_example=0.002)
  seed0_dir = write_run(tmp_path / "inc_seed0", seed0 + eval_records(
      INCREASE, [0.6, 0.8, 0.9, 0.92], wall_per_example=0.002),
      kind="increase_batch")

  # Seed 1 first logged steps 20 and 25 (a slow train record, an eval at
  # 95%), then died; the resumed run logged steps 25 and 30 again.
  seed1 = train_records(INCREASE, log_every=5)
  evals = eval_records(INCREASE, [0.6, 0.75, 0.85, 0.90])
  stale = [dict(r, examples_per_second=1.0) for r in seed1 if r["step"] == 25]
  stale += [dict(evals[2], eval_accuracy=0.95)]
  resumed = [r for r in seed1 + evals if r["step"] >= 25]
  first = [r for r in seed1 + evals if r["step"] < 25]
  seed1_dir = write_run(tmp_path / "inc-seed1", first + stale + resumed,
                        kind="increase_batch")
  return [decay_dir, seed0_dir, seed1_dir]


def table_rows(text):
  """{label: cells} of the Markdown table."""
  rows = [l.strip("|").split("|") for l in text.splitlines()
          if l.startswith("| ") and not l.startswith("| run ")]
  return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_labels_drop_the_seed_suffix():
  assert report.default_label("/w/cifar_inc_seed3") == "cifar_inc"
  assert report.default_label("/w/cifar_inc-seed12/") == "cifar_inc"
  assert report.default_label("seedling") == "seedling"
  assert report.default_label("/w/seed1") == "seed1"


def test_resume_keeps_the_last_record_of_a_step(runs):
  run = report.load_run(runs[2])
  assert [r["step"] for r in run.train] == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in run.evals] == [10, 20, 25, 30]
  assert run.evals[2]["eval_accuracy"] == 0.85
  assert run.train[4]["examples_per_second"] == RATE


def test_time_is_wall_time_when_recorded_else_examples_over_rate(runs):
  decay, seed0, seed1 = (report.load_run(d) for d in runs)
  # 4 epochs of 1000 examples at 1000 examples/s.
  assert decay.train_seconds()[-1] == pytest.approx(4.0)
  # Eval at epoch 3 (step 30) lies between train records 28 and 32.
  assert decay.eval_seconds() == pytest.approx([1.0, 2.0, 3.0, 4.0])
  assert seed0.train_seconds()[-1] == pytest.approx(8.0)
  assert seed0.eval_seconds() == pytest.approx([2.0, 4.0, 6.0, 8.0])
  assert seed1.train_seconds()[-1] == pytest.approx(4.0)


def test_summary_numbers(runs):
  groups = report.group_runs([report.load_run(d) for d in runs])
  assert list(groups) == ["decay", "inc"]
  assert [os.path.basename(r.workdir) for r in groups["inc"]] == [
      "inc_seed0", "inc-seed1"]
  decay = report.summarize(groups["decay"], 0.9)
  assert decay["final_accuracy"] == [0.91]
  assert decay["updates"] == [40]
  assert decay["target_updates"] == [30]
  assert decay["target_seconds"] == pytest.approx([3.0])
  inc = report.summarize(groups["inc"], 0.9)
  assert inc["final_accuracy"] == [0.92, 0.90]
  assert inc["updates"] == [30, 30]
  assert inc["seconds"] == pytest.approx([8.0, 4.0])
  assert inc["target_updates"] == [25, 30]
  assert inc["target_seconds"] == pytest.approx([6.0, 4.0])
  never = report.summarize(groups["inc"], 0.93)
  assert never["target_updates"] == [math.inf, math.inf]


def test_table_by_hand(runs):
  groups = report.group_runs([report.load_run(d) for d in runs])
  rows = table_rows(report.markdown_table(groups, 0.9))
  # seeds, schedule, final accuracy, updates, time, time/updates to 90%.
  assert rows["decay"] == ["1", "decay_lr", "91.00", "40", "4.0 s", "3.0 s",
                           "30"]
  # Accuracy (92 + 90) / 2 ± sqrt(2 * 1² / 1); time (8 + 4) / 2 ± sqrt(8);
  # to target (6 + 4) / 2 ± sqrt(2) s and (25 + 30) / 2 ± sqrt(12.5) updates.
  assert rows["inc"] == ["2", "increase_batch", "91.00 ± 1.41", "30",
                         "6.0 ± 2.8 s", "5.0 ± 1.4 s", "28 ± 4"]
  rows = table_rows(report.markdown_table(groups, 0.92))
  assert rows["decay"][5:] == ["not reached", "not reached"]
  # Only seed 0 reaches 92%, at its last eval (epoch 4).
  assert rows["inc"][5:] == ["8.0 s (1/2 seeds)", "30 (1/2 seeds)"]


def assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
  assert len(data) > 10_000, (path, len(data))


def test_command_writes_table_and_figures(runs, tmp_path):
  out = tmp_path / "report"
  r = subprocess.run([sys.executable, "-m", "trainer.report", *runs,
                      "--out", str(out), "--labels", "decay LR,grow B,grow B"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  markdown = (out / "report.md").read_text()
  rows = table_rows(markdown)
  assert rows["decay LR"][2:4] == ["91.00", "40"]
  assert rows["grow B"][:3] == ["2", "increase_batch", "91.00 ± 1.41"]
  assert "| grow B | 2 |" in r.stdout
  for name in report.FIGURES:
    assert_png(out / name)
    assert f"![{name}]({name})" in markdown


def test_runs_without_evals_still_report(tmp_path):
  workdir = write_run(tmp_path / "noeval", train_records(DECAY, log_every=4),
                      kind="decay_lr")
  out = tmp_path / "report"
  report.main([workdir, "--out", str(out)])
  rows = table_rows((out / "report.md").read_text())
  assert rows["noeval"] == ["1", "decay_lr", "—", "40", "4.0 s", "—", "—"]
  written = sorted(os.listdir(out))
  assert written == ["loss_vs_epochs.png", "report.md", "schedule.png"]
  assert_png(out / "schedule.png")


def bad_inputs(tmp_path):
  good = write_run(tmp_path / "good",
                   eval_records(DECAY, [0.9]) + train_records(DECAY, 4))
  empty = write_run(tmp_path / "empty", [])
  corrupt = write_run(tmp_path / "corrupt", train_records(DECAY, 4)[:2])
  with open(os.path.join(corrupt, "metrics.jsonl"), "a") as f:
    f.write('{"kind": "train", "step": 9, "exam\n')
  lacking = write_run(tmp_path / "lacking",
                      [dict(kind="eval", step=3, epoch=1.0)])
  compile_only = write_run(tmp_path / "compile_only", [dict(
      kind="compile", step=0, batch_size=8, micro_batches=1,
      compile_seconds=1.0)])
  bare = tmp_path / "bare"
  bare.mkdir()
  # Two experiments whose workdirs share a basename: not seeds of one.
  run_a = write_run(tmp_path / "a" / "run", train_records(DECAY, 4), "decay_lr")
  run_b = write_run(tmp_path / "b" / "run", train_records(INCREASE, 4),
                    "increase_batch")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  return [
      ([str(tmp_path / "missing")], f"run directory {tmp_path}/missing does "
       "not exist"),
      ([str(bare)], f"{bare} has no metrics.jsonl"),
      ([empty], f"{empty}/metrics.jsonl is empty"),
      ([good, corrupt], f"{corrupt}/metrics.jsonl line 3: not valid JSON"),
      ([lacking], f"{lacking}/metrics.jsonl line 1: eval record lacks "
       "examples_seen, eval_accuracy"),
      ([compile_only], "has no train or eval records"),
      ([good, "--labels", "a,b"], "--labels has 2 label(s) for 1 run"),
      ([good, good], "a run directory is given twice"),
      ([good, "--target_accuracy", "90"], "--target_accuracy=90 must be a "
       "fraction in (0, 1]"),
      ([good, "--out"], "argument --out: expected one argument"),
      ([run_a, run_b], f"{run_a} and {run_b} share the label 'run' but not "
       "their config (schedule.kind ('decay_lr' → 'increase_batch')); seeds "
       "of one experiment are averaged: give each experiment its own --labels"),
      ([good, "--out", f"{a_file}/report"],
       f"--out={a_file}/report: Not a directory"),
  ]


def test_bad_input_is_one_line(tmp_path):
  cases = bad_inputs(tmp_path)
  for args, message in cases:
    if "--out" not in args:
      args = [*args, "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-m", "trainer.report", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, (args, r.stderr)
    assert lines[0].startswith("error: ") and message in lines[0], (
        args, lines[0])
  assert not os.path.exists(tmp_path / "out")


def test_a_last_line_cut_by_a_kill_is_skipped(tmp_path, capsys):
  records = train_records(DECAY, 4)
  path = os.path.join(write_run(tmp_path / "cut", records), "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"kind": "train", "st')
  assert report.read_records(path) == records
  assert capsys.readouterr().err == (
      f"warning: {path} line {len(records) + 1} is incomplete; skipped\n")


def test_noise_scale_figure_only_for_runs_that_measured_it(tmp_path):
  measured = train_records(INCREASE, log_every=2)
  for r in measured:
    r["grad_noise_scale"] = 50.0 + r["epoch"] * 40.0
  runs = [write_run(tmp_path / "adaptive", measured, kind="adaptive"),
          write_run(tmp_path / "plain", train_records(DECAY, log_every=2),
                    kind="decay_lr")]
  out = tmp_path / "report"
  report.main([*runs, "--out", str(out)])
  assert_png(out / "noise_scale.png")
  out_plain = tmp_path / "report_plain"
  report.main([runs[1], "--out", str(out_plain)])
  assert not (out_plain / "noise_scale.png").exists()
