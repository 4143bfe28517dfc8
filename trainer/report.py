r"""Compare runs: a Markdown table and PNG figures from workdirs' metrics.jsonl.

    python -m trainer.report RUN_DIR [RUN_DIR ...] --out DIR \
        [--target_accuracy 0.9] [--labels a,b,...] [--no_band]

Runs with the same label are seeds of one experiment and are averaged. A run's
label is its workdir's basename without a trailing `_seedN` / `-seedN`, unless
`--labels` gives one per RUN_DIR. Writes `DIR/report.md` (also printed) and
`accuracy_vs_epochs.png`, `loss_vs_epochs.png`, `accuracy_vs_updates.png`,
`accuracy_vs_time.png` and `schedule.png` (ε and B vs epochs, as the paper's
Figure 1), and, for runs that measured it, `noise_scale.png` (the gradient
noise scale B_simple and B vs epochs).

Training time is the `wall_time` field of the records (seconds since the run
started, evaluation included, continued across resumes) where every train
record has it. Older logs lack it; their time is then estimated as the running
sum over train records of (examples since the previous train record) /
examples_per_second, which leaves out evaluation and checkpoint pauses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing

import numpy as np

from trainer import workdir as workdir_lib

FIGURES = ("accuracy_vs_epochs.png", "loss_vs_epochs.png",
           "accuracy_vs_updates.png", "accuracy_vs_time.png", "schedule.png")
_REQUIRED = dict(
    train=("examples_seen", "epoch", "batch_size", "learning_rate",
           "train_loss"),
    eval=("examples_seen", "epoch", "eval_accuracy"))
_SEED_SUFFIX = re.compile(r"[_-]seed\d+$")
_DASH = "—"


class ReportError(ValueError):
  """Bad input to the report; the message names the file (and line)."""


@dataclasses.dataclass
class Run:
  """One workdir's records, deduplicated and sorted by step."""
  workdir: str
  label: str
  schedule: str | None  # config.json's schedule.kind, when there is one.
  train: list[dict]
  evals: list[dict]
  config: dict | None = None  # config.json, when there is one.

  def train_seconds(self) -> np.ndarray | None:
    """Training time (s) at each train record; None if it cannot be known."""
    if not self.train:
      return None
    if all("wall_time" in r for r in self.train):
      return np.array([r["wall_time"] for r in self.train], float)
    if not all(r.get("examples_per_second", 0) > 0 for r in self.train):
      return None
    examples = np.array([r["examples_seen"] for r in self.train], float)
    rates = np.array([r["examples_per_second"] for r in self.train], float)
    return np.cumsum(np.diff(examples, prepend=0.0) / rates)

  def eval_seconds(self) -> np.ndarray | None:
    """Time (s) at each eval: its wall_time, else interpolated by examples."""
    if self.evals and all("wall_time" in r for r in self.evals):
      return np.array([r["wall_time"] for r in self.evals], float)
    seconds = self.train_seconds()
    if seconds is None or not self.evals:
      return None
    examples = [r["examples_seen"] for r in self.train]
    return np.interp([r["examples_seen"] for r in self.evals],
                     [0, *examples], [0.0, *seconds])


# Loading and grouping.

def default_label(workdir: str) -> str:
  """The workdir's basename without a trailing `_seedN` or `-seedN`."""
  name = os.path.basename(os.path.normpath(workdir))
  return _SEED_SUFFIX.sub("", name) or name


def read_records(path: str) -> list[dict]:
  """metrics.jsonl's records; the last one wins for a repeated (kind, step).

  A resumed run logs again the steps after its checkpoint, so the earlier
  records of those steps belong to the abandoned attempt.
  """
  latest = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        # Cut off by a kill mid-write (the writer drops it on resume).
        print(f"warning: {path} line {number} is incomplete; skipped",
              file=sys.stderr)
        continue
      raise ReportError(f"{path} line {number}: not valid JSON ({e.msg})")
    if not (isinstance(record, dict) and isinstance(record.get("kind"), str)
            and isinstance(record.get("step"), int)):
      raise ReportError(f"{path} line {number}: not a record with a 'kind' "
                        "and an integer 'step'")
    kind = record.get("kind")
    missing = [k for k in _REQUIRED.get(kind, ())
               if not isinstance(record.get(k), (int, float))]
    if missing:
      raise ReportError(f"{path} line {number}: {kind} record lacks "
                        f"{', '.join(missing)}")
    latest[(kind, record["step"])] = record
  if not latest:
    raise ReportError(f"{path} is empty")
  return sorted(latest.values(), key=lambda r: r["step"])


def load_run(workdir: str, label: str | None = None) -> Run:
  """Reads `<workdir>/metrics.jsonl` and, if present, `config.json`."""
  if not os.path.isdir(workdir):
    raise ReportError(f"run directory {workdir} does not exist")
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ReportError(f"{workdir} has no metrics.jsonl (not a training "
                      "workdir?)")
  records = read_records(path)
  train = [r for r in records if r.get("kind") == "train"]
  evals = [r for r in records if r.get("kind") == "eval"]
  if not train and not evals:
    raise ReportError(f"{path} has no train or eval records")
  schedule = config = None
  config_path = os.path.join(workdir, "config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
      schedule = config.get("schedule", {}).get("kind")
    except (json.JSONDecodeError, AttributeError) as e:
      raise ReportError(f"{config_path}: not a JSON config ({e})")
  return Run(workdir, label or default_label(workdir), schedule, train, evals,
             config)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
  """Runs by label, in order of first appearance. ReportError if runs of
  one label (averaged as seeds of one experiment) differ in more than the
  seed."""
  groups = {}
  for run in runs:
    groups.setdefault(run.label, []).append(run)
  for label, group in groups.items():
    first = group[0]
    for run in group[1:]:
      if first.config is None or run.config is None:
        continue
      differ = workdir_lib.training_differences(
          dict(first.config, seed=None), dict(run.config, seed=None))
      if differ:
        raise ReportError(
            f"{first.workdir} and {run.workdir} share the label {label!r} "
            f"but not their config ({', '.join(differ[:3])}"
            f"{', …' if len(differ) > 3 else ''}); seeds of one experiment "
            "are averaged: give each experiment its own --labels")
  return groups


# The table.

def summarize(runs: list[Run], target_accuracy: float) -> dict:
  """Per-run numbers of one group; None where a run cannot tell.

  Accuracies are fractions, times seconds, updates parameter updates (steps).
  """
  out = dict(final_accuracy=[], updates=[], seconds=[], target_seconds=[],
             target_updates=[], final_ema_accuracy=[])
  for run in runs:
    out["updates"].append(max(r["step"] for r in run.train + run.evals))
    seconds = run.train_seconds()
    out["seconds"].append(None if seconds is None else float(seconds[-1]))
    if not run.evals:
      for key in ("final_accuracy", "target_seconds", "target_updates",
                  "final_ema_accuracy"):
        out[key].append(None)
      continue
    out["final_accuracy"].append(run.evals[-1]["eval_accuracy"])
    out["final_ema_accuracy"].append(run.evals[-1].get("ema_eval_accuracy"))
    hits = [i for i, r in enumerate(run.evals)
            if r["eval_accuracy"] >= target_accuracy]
    eval_seconds = run.eval_seconds()
    first = hits[0] if hits else None
    out["target_updates"].append(
        math.inf if first is None else run.evals[first]["step"])
    out["target_seconds"].append(
        math.inf if first is None else
        None if eval_seconds is None else float(eval_seconds[first]))
  return out


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (n-1; 0 for one value)."""
  values = np.array(values, float)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return float(values.mean()), std


def _format_stat(values, fmt, unit="") -> str:
  known = [v for v in values if v is not None]
  if not known:
    return _DASH
  reached = [v for v in known if v != math.inf]
  if not reached:
    return "not reached"
  mean, std = mean_std(reached)
  # Identical values (the updates of seeds of one plan) need no "± 0".
  text = fmt(mean) + (f" ± {fmt(std)}" if std > 0 else "") + unit
  if len(reached) < len(values):
    text += f" ({len(reached)}/{len(values)} seeds)"
  return text


def _format_seconds(values) -> str:
  known = [v for v in values if v not in (None, math.inf)]
  scale, unit = _time_unit(max(known, default=0.0))
  return _format_stat([v if v in (None, math.inf) else v / scale
                       for v in values], lambda x: f"{x:.1f}", " " + unit)


def _time_unit(longest_seconds: float) -> tuple[float, str]:
  """Seconds per unit and the unit's name for times up to this long."""
  if longest_seconds >= 7200:
    return 3600.0, "h"
  return (60.0, "min") if longest_seconds >= 120 else (1.0, "s")


def markdown_table(groups: dict[str, list[Run]], target_accuracy: float) -> str:
  """One row per group: schedule, final accuracy, updates, time, to target."""
  target = f"{100 * target_accuracy:g}%"
  # Runs with weight averaging add a column: the averaged weights' accuracy.
  has_ema = any("ema_eval_accuracy" in r for runs in groups.values()
                for run in runs for r in run.evals)
  lines = [f"| run | seeds | schedule | final test accuracy (%) | updates "
           f"| training time | time to {target} | updates to {target} |"
           + (" EMA weights' final test accuracy (%) |" if has_ema else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if has_ema else "")]
  for label, runs in groups.items():
    s = summarize(runs, target_accuracy)
    kinds = sorted({r.schedule for r in runs if r.schedule})
    accuracy = [None if a is None else 100 * a for a in s["final_accuracy"]]
    cells = [label.replace("|", "\\|"), str(len(runs)),
             ", ".join(kinds) or _DASH,
             _format_stat(accuracy, lambda x: f"{x:.2f}"),
             _format_stat(s["updates"], lambda x: f"{x:,.0f}"),
             _format_seconds(s["seconds"]),
             _format_seconds(s["target_seconds"]),
             _format_stat(s["target_updates"], lambda x: f"{x:,.0f}")]
    if has_ema:
      cells.append(_format_stat(
          [None if a is None else 100 * a for a in s["final_ema_accuracy"]],
          lambda x: f"{x:.2f}"))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Mean ± sample standard deviation over seeds. Updates are "
            "parameter updates (steps); a target is reached at the first "
            "evaluation at or above it. Training time: " + (
                "the runs' recorded wall-clock time."
                if _all_wall_time(groups) else
                "recorded wall-clock time where logged, else the sum of "
                "logged examples / (examples/s), which leaves out evaluation.")]
  return "\n".join(lines) + "\n"


def _all_wall_time(groups) -> bool:
  return all(all("wall_time" in r for r in run.train)
             for runs in groups.values() for run in runs)


# The figures.

def _mean_curve(curves):
  """(x, mean, std) of seeds' (x, y) curves on the first one's x points.

  Seeds may log at different x (wall-clock time), so the others are
  interpolated; only the range that every seed covers is kept.
  """
  curves = [(np.asarray(x, float), np.asarray(y, float))
            for x, y in curves if len(x)]
  if not curves:
    return None
  lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
  x = curves[0][0]
  x = x[(x >= lo) & (x <= hi)]
  ys = np.stack([np.interp(x, cx, cy) for cx, cy in curves])
  std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(x)
  return x, ys.mean(axis=0), std


def _plot(ax, groups, curve_of, band, **style):
  """Draws each group's mean curve; returns whether anything was drawn."""
  drawn = False
  for (color, dashes), (label, runs) in zip(_styles(), groups.items()):
    curves = [c for c in map(curve_of, runs) if c is not None]
    mean = _mean_curve(curves)
    if mean is None or not len(mean[0]):
      continue
    x, y, std = mean
    ax.plot(x, y, color=color, linestyle=dashes,
            label=f"{label} (n={len(curves)})" if len(runs) > 1 else label,
            **style)
    if band and len(curves) > 1:
      ax.fill_between(x, y - std, y + std, color=color, alpha=0.2, lw=0)
    drawn = True
  return drawn


def _styles():
  """(color, line style) per group; styles tell apart curves that overlap."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  dashes = ["-", "--", "-.", ":"]
  return [(colors[i % len(colors)], dashes[i % len(dashes)]) for i in range(99)]


def draw_figures(groups: dict[str, list[Run]], out_dir: str,
                 band: bool = True) -> list[str]:
  """Writes the PNG figures the runs' records allow; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  scale, unit = _time_unit(max(
      (s[-1] for runs in groups.values() for r in runs
       if (s := r.eval_seconds()) is not None), default=0.0))

  def accuracy(x_of):
    def curve(run):
      x = x_of(run) if run.evals else None
      return None if x is None else (x, [100 * r["eval_accuracy"]
                                         for r in run.evals])
    return curve

  def eval_time(run):
    seconds = run.eval_seconds()
    return None if seconds is None else seconds / scale

  figures = [
      ("accuracy_vs_epochs.png", "epochs", "test accuracy (%)",
       accuracy(lambda run: [r["epoch"] for r in run.evals])),
      ("loss_vs_epochs.png", "epochs", "training loss (cross-entropy)",
       lambda run: ([r["epoch"] for r in run.train],
                    [r["train_loss"] for r in run.train])
       if run.train else None),
      ("accuracy_vs_updates.png", "parameter updates (steps)",
       "test accuracy (%)",
       accuracy(lambda run: [r["step"] for r in run.evals])),
      ("accuracy_vs_time.png", f"wall-clock training time ({unit})",
       "test accuracy (%)", accuracy(eval_time)),
  ]
  written = []
  for name, xlabel, ylabel, curve_of in figures:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if _plot(ax, groups, curve_of, band, lw=1.5):
      ax.set(xlabel=xlabel, ylabel=ylabel)
      lows = [min(l.get_ydata()) for l in ax.lines]
      if name.startswith("loss") and min(lows) > 0:
        ax.set_yscale("log")  # Limits from the means: a band may reach 0.
        ax.set_ylim(min(lows) / 1.2,
                    1.2 * max(max(l.get_ydata()) for l in ax.lines))
      ax.grid(alpha=0.3)
      ax.legend()
      fig.tight_layout()
      written.append(_save(fig, out_dir, name))
    plt.close(fig)

  fig, (lr_ax, batch_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
  # A train record's ε and B held for the steps since the previous record.
  for ax, key, ylabel in ((lr_ax, "learning_rate", "learning rate ε"),
                          (batch_ax, "batch_size", "batch size B (examples)")):
    _plot(ax, groups, lambda run, key=key: (
        [0.0] + [r["epoch"] for r in run.train],
        [run.train[0][key]] + [r[key] for r in run.train]) if run.train
          else None, band=False, drawstyle="steps-pre", lw=1.5)
    ax.set(xlabel="epochs", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
  if lr_ax.lines:
    batch_ax.set_yscale("log")
    sizes = sorted({r["batch_size"] for runs in groups.values() for run in runs
                    for r in run.train})
    if len(sizes) <= 8:  # Label the stages' own sizes, not powers of ten.
      batch_ax.set_yticks(sizes, [str(b) for b in sizes])
      batch_ax.minorticks_off()
    lr_ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out_dir, "schedule.png"))
  plt.close(fig)

  # The measured gradient noise scale (runs that log it) beside their B.
  measured = {label: runs for label, runs in groups.items()
              if any("grad_noise_scale" in r for run in runs
                     for r in run.train)}
  if measured:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = dict(zip(groups, _styles()))
    for label, runs in measured.items():
      color, _ = styles[label]
      mean = _mean_curve([
          ([r["epoch"] for r in run.train if "grad_noise_scale" in r],
           [r["grad_noise_scale"] for r in run.train
            if "grad_noise_scale" in r]) for run in runs])
      if mean is not None and len(mean[0]):
        ax.plot(mean[0], mean[1], color=color, lw=1.5,
                label=f"{label}: B_simple")
      run = runs[0]
      ax.plot([0.0] + [r["epoch"] for r in run.train],
              [run.train[0]["batch_size"]]
              + [r["batch_size"] for r in run.train], color=color,
              linestyle="--", drawstyle="steps-pre", lw=1.2,
              label=f"{label}: B")
    ax.set(xlabel="epochs", ylabel="examples", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(_save(fig, out_dir, "noise_scale.png"))
    plt.close(fig)
  return written


def _save(fig, out_dir, name):
  path = os.path.join(out_dir, name)
  fig.savefig(path)
  return path


# The command.

def _fail(message: str) -> typing.NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not argparse's usage block.
    _fail(message)


def main(argv=None) -> None:
  parser = _Parser(prog="python -m trainer.report", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="A training workdir (holds metrics.jsonl).")
  parser.add_argument("--out", required=True, help="Directory for the report.")
  parser.add_argument("--target_accuracy", type=float, default=0.9,
                      help="Test accuracy (a fraction) for time-to-target.")
  parser.add_argument("--labels", help="Comma-separated label per RUN_DIR.")
  parser.add_argument("--no_band", action="store_true",
                      help="No ±std band around seeds' mean curves.")
  args = parser.parse_args(argv)
  if not 0 < args.target_accuracy <= 1:
    _fail(f"--target_accuracy={args.target_accuracy:g} must be a fraction in "
          "(0, 1], e.g. 0.9")
  labels = [None] * len(args.run_dirs)
  if args.labels is not None:
    labels = [label.strip() for label in args.labels.split(",")]
    if len(labels) != len(args.run_dirs) or not all(labels):
      _fail(f"--labels has {len(labels)} label(s) for {len(args.run_dirs)} "
            "run directories; give one non-empty label per RUN_DIR")
  if len({os.path.realpath(d) for d in args.run_dirs}) < len(args.run_dirs):
    _fail("a run directory is given twice")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    _fail(f"--out={args.out} exists and is not a directory")
  try:
    runs = [load_run(d, label) for d, label in zip(args.run_dirs, labels)]
  except (ReportError, OSError) as e:
    _fail(str(e))
  try:
    groups = group_runs(runs)
  except ReportError as e:
    _fail(str(e))
  for run in runs:
    if not run.evals:
      print(f"warning: {run.workdir} has no eval records; its accuracy "
            "columns are empty", file=sys.stderr)
  table = markdown_table(groups, args.target_accuracy)
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    _fail(f"--out={args.out}: {e.strerror or e}")
  figures = draw_figures(groups, args.out, band=not args.no_band)
  with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
    f.write("# Run comparison\n\n" + table + "\n" +
            "".join(f"![{n}]({n})\n" for n in map(os.path.basename, figures)))
  print(table)
  print(f"wrote {os.path.join(args.out, 'report.md')} and {len(figures)} "
        f"figure(s) in {args.out}")


if __name__ == "__main__":
  main()
