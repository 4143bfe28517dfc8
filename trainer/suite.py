r"""Run the science suite (configs/fashion_mnist_suite.py), then its reports.

    python -m trainer.suite --out workdirs/suite [--smoke] [--only NAME,...] \
        [--dry_run] [--target_accuracy 0.88]

Trains every run of the suite one after another, each as
`python -m trainer.main --config=configs/fashion_mnist_suite.py:<name>,seed=<k>
--workdir=OUT/runs/<name>_seed<k>` on 8 virtual CPU devices (as `make run`),
its stdout and stderr appended to `OUT/runs/<name>_seed<k>/train.log`. An
interrupted suite resumes by rerunning the same command: finished runs (an
evaluation after their last example) are kept as they are and not launched,
the others are launched again and the trainer resumes them from their
checkpoints. A partly trained run whose config has since changed is refused
by the trainer, never silently mixed; delete its directory to retrain it.

Then writes, from every finished run in OUT/runs (seeds averaged):
`OUT/report/` (the five SGD+momentum schedules), `OUT/report_sgd/` and
`OUT/report_adam/` (decay_lr vs increase_batch with plain SGD, with Adam), as
`python -m trainer.report` does. Give `--smoke` its own OUT (the trainer
refuses a workdir of another config). `--dry_run` prints the runs, their
plans and the estimated time, and trains nothing. Exits 1 naming each failed
run and its log.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time

from configs import fashion_mnist_suite as suite_config
from trainer import micro_batching
from trainer import plan as plan_lib
from trainer import report as report_lib

CONFIG_FILE = "configs/fashion_mnist_suite.py"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8  # Virtual CPU devices: ~2.5x faster than one on this host.

# Each report directory compares these experiments.
REPORTS = {
    "report": ("decay_lr", "increase_batch", "hybrid", "increased_lr",
               "increased_momentum"),
    "report_sgd": ("sgd_decay_lr", "sgd_increase_batch"),
    "report_adam": ("adam_decay_lr", "adam_increase_batch"),
    "report_beyond": ("decay_lr", "increase_batch", "increase_batch_ema",
                      "adaptive"),
}
# The time-to-target column of the reports (a fraction of the test split).
TARGET_ACCURACY = 0.88
SMOKE_TARGET_ACCURACY = 0.5  # 2,048 examples: smoke runs end near 55%.

# The --dry_run estimate, from measurements on the 2-core development host
# with 8 virtual devices (README; benchmarks/train_step.py): training ran at
# 1,160-1,500 examples/s at B=128 and 1,550-1,880 at B=1024-2048 in host-
# accumulated micro-batches of 16; 1,500 leaves a margin for a busy machine.
# Start-up (imports, data, state) took ~20 s, an evaluation of the 10,000 test
# examples ~3 s, and compiling ~5-7 s per compiled shape
# (micro_batching.step_key: with host accumulation one per batch size below
# max_device_batch per device and one set for all the others; with compiled
# accumulation one per batch size).
EXAMPLES_PER_SECOND = 1500.0
STARTUP_SECONDS = 20.0
EVAL_SECONDS = 3.0
COMPILE_SECONDS = 7.0


class SuiteError(ValueError):
  """Bad suite arguments; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the suite: an experiment at one seed."""
  experiment: str
  seed: int
  variant: str  # The text after ':' in --config.
  workdir: str  # Absolute; its basename is the run's name.
  config: object  # The ml_collections config the trainer will build.
  plan: plan_lib.Plan

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)

  @property
  def log_path(self) -> str:
    return os.path.join(self.workdir, "train.log")

  @property
  def command(self) -> list[str]:
    return [sys.executable, "-m", "trainer.main",
            f"--config={CONFIG_FILE}:{self.variant}", f"--workdir={self.workdir}"]


def plan_runs(out: str, *, smoke: bool = False,
              only: list[str] | None = None) -> list[Run]:
  """The suite's runs in order, each with its config and plan (no training)."""
  known = [e.name for e in suite_config.EXPERIMENTS]
  unknown = [name for name in only or () if name not in known]
  if unknown:
    raise SuiteError(f"--only: unknown experiment(s) {', '.join(unknown)}; "
                     f"known: {', '.join(known)}")
  runs = []
  for experiment in suite_config.EXPERIMENTS:
    if only and experiment.name not in only:
      continue
    for seed in experiment.seeds:
      variant = f"{experiment.name},seed={seed}" + (",smoke" if smoke else "")
      config = suite_config.get_config(variant)
      runs.append(Run(
          experiment=experiment.name, seed=seed, variant=variant,
          workdir=os.path.join(os.path.abspath(out), "runs",
                               f"{experiment.name}_seed{seed}"),
          config=config,
          plan=plan_lib.plan_from_config(config, num_devices=NUM_DEVICES)))
  return runs


def train_env(environ=None, devices: int = NUM_DEVICES) -> dict:
  """The environment of a training run: `devices` virtual CPU devices (8),
  the other XLA_FLAGS kept."""
  env = dict(os.environ if environ is None else environ)
  flag = "--xla_force_host_platform_device_count"
  others = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
  env["XLA_FLAGS"] = " ".join([f"{flag}={devices}", *others])
  return env


def estimate_seconds(run: Run) -> float:
  """Wall-clock estimate of one run from scratch (s), see the constants."""
  config, plan = run.config, run.plan
  eval_every = max(1, round(config.eval_every_epochs * plan.num_train_examples))
  evals = math.ceil(plan.total_examples / eval_every)
  shapes = {micro_batching.step_key(b, NUM_DEVICES, config.max_device_batch,
                                    config.ghost_batch_size,
                                    config.accumulation)
            for b in plan.batch_sizes}
  compiles = COMPILE_SECONDS * len(shapes)
  return (plan.total_examples / EXAMPLES_PER_SECOND + evals * EVAL_SECONDS
          + STARTUP_SECONDS + compiles)


def format_seconds(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def plan_table(runs: list[Run]) -> str:
  """One row per run: schedule, optimizer, ε, m, B by stage, updates, time."""
  header = ("run", "kind", "optimizer", "lr", "momentum", "B by stage",
            "epochs", "updates", "examples", "estimate")
  rows = [header]
  for run in runs:
    stages = run.plan.stages
    rows.append((
        run.name, run.plan.kind, run.config.optimizer.name,
        "/".join(f"{s.learning_rate:.3g}" for s in stages),
        f"{stages[0].momentum:g}",
        "/".join(str(s.batch_size) for s in stages),
        f"{run.config.schedule.num_epochs:g}", str(run.plan.total_updates),
        str(run.plan.total_examples), format_seconds(estimate_seconds(run))))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in rows)


def last_eval(workdir: str) -> dict | None:
  """The last eval record of a workdir's metrics.jsonl, if any."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  try:
    evals = [r for r in report_lib.read_records(path) if r["kind"] == "eval"]
  except report_lib.ReportError:
    return None
  return evals[-1] if evals else None


def is_finished(run: Run) -> bool:
  """Whether the run evaluated after its last example (num_epochs · N; by
  examples, since an adaptive run's number of steps is not known ahead)."""
  record = last_eval(run.workdir)
  end = math.ceil(run.config.schedule.num_epochs * run.plan.num_train_examples)
  return record is not None and record["examples_seen"] >= end


def launch(run: Run) -> int:
  """Trains one run, appending its output to its log; the exit status."""
  os.makedirs(run.workdir, exist_ok=True)
  with open(run.log_path, "a", encoding="utf-8") as log:
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"{' '.join(run.command)}\n")
    log.flush()
    return subprocess.run(run.command, cwd=REPO_ROOT, env=train_env(),
                          stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode


def write_reports(out: str, runs: list[Run], target_accuracy: float,
                  failed: set[str]) -> list[str]:
  """Regenerates each report from its finished runs; the directories written."""
  written = []
  for directory, experiments in REPORTS.items():
    chosen = [r for r in runs if r.experiment in experiments]
    finished = [r for r in chosen if r.name not in failed and is_finished(r)]
    names = {r.name for r in finished}
    missing = [r.name for r in chosen if r.name not in names]
    report_dir = os.path.join(out, directory)
    if not finished:
      print(f"{report_dir}: no finished runs yet; not written", flush=True)
      continue
    for what, names_out in (
        ("failed", [n for n in missing if n in failed]),
        ("not finished (yet)", [n for n in missing if n not in failed])):
      if names_out:
        print(f"{report_dir}: leaving out runs {what}: {', '.join(names_out)}",
              flush=True)
    try:
      report_lib.main([*(r.workdir for r in finished), "--out", report_dir,
                       "--target_accuracy", str(target_accuracy)])
    except SystemExit as e:
      if e.code:
        raise SuiteError(f"the report in {report_dir} failed (see above)") from e
    written.append(report_dir)
  return written


def run_suite(out: str, runs: list[Run], report_runs: list[Run],
              target_accuracy: float) -> int:
  """Trains `runs` in order, then writes the reports; the exit status."""
  start = time.perf_counter()
  failed = {}
  for i, run in enumerate(runs, 1):
    if is_finished(run):  # Kept as it is: not retrained, not relaunched.
      print(f"[{i}/{len(runs)}] {run.name}: already finished", flush=True)
      continue
    elapsed = format_seconds(time.perf_counter() - start)
    print(f"[{i}/{len(runs)}] {run.name}: training (elapsed {elapsed}; "
          f"log {run.log_path})", flush=True)
    run_start = time.perf_counter()
    try:
      status = launch(run)
    except KeyboardInterrupt:
      print(f"interrupted during {run.name}; rerun the same command to resume",
            file=sys.stderr)
      return 130
    took = format_seconds(time.perf_counter() - run_start)
    record = last_eval(run.workdir)
    if status == 0 and is_finished(run):
      print(f"[{i}/{len(runs)}] {run.name}: done in {took}, "
            f"{record['step']} updates, test accuracy "
            f"{100 * record['eval_accuracy']:.2f}%", flush=True)
      continue
    why = (f"exit status {status}" if status else
           "it stopped before its final step (preempted?)")
    failed[run.name] = f"{why}; see {run.log_path}"
    print(f"[{i}/{len(runs)}] {run.name}: FAILED after {took} ({why})",
          flush=True)
  written = write_reports(out, report_runs, target_accuracy, set(failed))
  print(f"suite: {len(runs) - len(failed)}/{len(runs)} runs done in "
        f"{format_seconds(time.perf_counter() - start)}; reports in "
        f"{', '.join(written) or '(none)'}", flush=True)
  for name, why in failed.items():
    print(f"error: run {name} failed: {why}", file=sys.stderr)
  return 1 if failed else 0


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not argparse's usage block.
    raise SuiteError(message)


def parse_args(argv):
  parser = _Parser(prog="python -m trainer.suite", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True,
                      help="Suite directory: runs/ and the report directories.")
  parser.add_argument("--smoke", action="store_true",
                      help="The tiny variant of every run (2,048 examples).")
  parser.add_argument("--only", help="Comma-separated experiment names.")
  parser.add_argument("--dry_run", action="store_true",
                      help="Print the runs, plans and time estimate; train nothing.")
  parser.add_argument("--target_accuracy", type=float, default=None,
                      help=f"Report's time-to-target accuracy (default "
                      f"{TARGET_ACCURACY}, {SMOKE_TARGET_ACCURACY} with --smoke).")
  args = parser.parse_args(argv)
  if args.target_accuracy is None:
    args.target_accuracy = SMOKE_TARGET_ACCURACY if args.smoke else TARGET_ACCURACY
  if not 0 < args.target_accuracy <= 1:
    raise SuiteError(f"--target_accuracy={args.target_accuracy:g} must be a "
                     "fraction in (0, 1]")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise SuiteError(f"--out={args.out} exists and is not a directory")
  if args.only is not None:
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if not args.only:
      raise SuiteError("--only names no experiment")
  return args


def main(argv=None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(args.out, smoke=args.smoke, only=args.only)
  except ValueError as e:  # SuiteError, or a config that cannot be planned.
    print(f"error: {e}", file=sys.stderr)
    return 2
  total = sum(map(estimate_seconds, runs))
  print(plan_table(runs))
  print(f"{len(runs)} runs, {sum(r.plan.total_examples for r in runs):,} "
        f"examples, estimated {total / 60:.1f} min from scratch "
        f"({EXAMPLES_PER_SECOND:,.0f} examples/s, {STARTUP_SECONDS:g} s start-up, "
        f"{EVAL_SECONDS:g} s per evaluation and {COMPILE_SECONDS:g} s per "
        "compiled step)", flush=True)
  if args.dry_run:
    print("\n".join(" ".join(r.command) for r in runs))
    print(f"environment: XLA_FLAGS={train_env()['XLA_FLAGS']}")
    return 0
  # Reports cover every finished run in OUT, not only this invocation's.
  report_runs = plan_runs(args.out, smoke=args.smoke)
  try:
    return run_suite(args.out, runs, report_runs, args.target_accuracy)
  except SuiteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
