"""Stage switches and the compilation caches, measured on real runs.

    python benchmarks/stage_switch.py [--config=configs/fashion_mnist.py] \
        [--accumulation=host,compiled] [--program_cache=true,false] \
        [--schedule=short|config] [--xla_flags=...] [--set field=value ...]

`--schedule=short` (default) shortens the config's schedule to 0.8 epochs
with B doubling every 0.2 (`SHORT_SCHEDULE`, before any `--set`): for the
default config, stages of 94, 47, 24 and 12 steps of B=128 to 1024, long
enough for medians and for background compiles. `--schedule=config` keeps
the config's own, e.g. for the smoke variant (32, 16, 8 and 4 steps of B=64
to 512, about 10 s in all, against about 5 s per compile on 2 cores).

For each accumulation mode and program-cache setting, trains the config
twice with `trainer.main` (8 virtual CPU devices, every step logged), in
fresh workdirs that share one fresh compilation-cache directory:
* launch 1 (empty caches): for every stage after the first, the first
  step's time (including any wait for that stage's compile, also shown on
  its own) over the stage's median step time. Goal ≤ 1.5.
* launch 2 (warm caches): its total compile seconds over launch 1's. Goal
  ≤ 0.1. With `program_cache=false` only JAX's persistent cache serves it
  (every function is still traced and lowered).
Both from the `compile` and `train` records of each run's metrics.jsonl.
`--xla_flags` adds XLA flags to both launches, e.g.
`--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import metrics as metrics_lib  # noqa: E402


def launch(config, workdir, cache_dir, accumulation, program_cache, overrides,
           devices, xla_flags):
  env = dict(os.environ,
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                        f"{xla_flags}"),
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  command = [sys.executable, "-m", "trainer.main", f"--config={config}",
             f"--workdir={workdir}", "--config.log_every_steps=1",
             f"--config.accumulation={accumulation}",
             f"--config.compilation_cache_dir={cache_dir}",
             f"--config.program_cache={program_cache}",
             *[f"--config.{o}" for o in overrides]]
  start = time.perf_counter()
  out = subprocess.run(command, env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  if out.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  return time.perf_counter() - start


def stage_switches(workdir):
  """[(stage, B, first step s, its compile wait s, median step s)] for the
  stages after the first."""
  train = metrics_lib.read_metrics(workdir, "train")
  rows = []
  for stage in sorted({r["stage"] for r in train})[1:]:
    records = [r for r in train if r["stage"] == stage]
    rows.append((stage, records[0]["batch_size"], records[0]["step_time"],
                 records[0]["compile_wait"],
                 statistics.median(r["step_time"] for r in records)))
  return rows


def compile_seconds(workdir):
  return sum(r["compile_seconds"]
             for r in metrics_lib.read_metrics(workdir, "compile"))


SHORT_SCHEDULE = ["schedule.num_epochs=0.8",
                  "schedule.milestones_epochs=(0.2,0.4,0.6)"]


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--accumulation", default="host,compiled")
  p.add_argument("--program_cache", default="true,false")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--xla_flags", default="")
  p.add_argument("--schedule", default="short", choices=("short", "config"),
                 help="short: SHORT_SCHEDULE; config: the config's schedule")
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE (after the schedule's)")
  return p


def main():
  p = parser()
  a = p.parse_args()
  overrides = (SHORT_SCHEDULE if a.schedule == "short" else []) + a.set
  print(f"{'accumulation':>12} {'programs':>8} {'stage':>5} {'B':>6} "
        f"{'first ms':>9} {'its wait':>8} {'median ms':>9} "
        f"{'first/median':>12}")
  summary = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in a.accumulation.split(","):
      for programs in a.program_cache.split(","):
        name = f"{mode}_{programs}"
        cache = os.path.join(tmp, f"cache_{name}")
        first, second = (os.path.join(tmp, f"{name}_{i}") for i in (1, 2))
        walls = [launch(a.config, workdir, cache, mode, programs, overrides,
                        a.devices, a.xla_flags) for workdir in (first, second)]
        for stage, batch, t0, wait, median in stage_switches(first):
          print(f"{mode:>12} {programs:>8} {stage:>5} {batch:>6} "
                f"{1000 * t0:>9.1f} {1000 * wait:>8.1f} {1000 * median:>9.1f} "
                f"{t0 / median:>12.2f}")
        summary.append((mode, programs, compile_seconds(first),
                        compile_seconds(second), *walls))
  print(f"\n{'accumulation':>12} {'programs':>8} {'compile 1st':>11} "
        f"{'compile 2nd':>11} {'2nd/1st':>7} {'wall 1st':>8} {'wall 2nd':>8}")
  for mode, programs, c1, c2, w1, w2 in summary:
    print(f"{mode:>12} {programs:>8} {c1:>10.1f}s {c2:>10.1f}s {c2 / c1:>7.2f} "
          f"{w1:>7.1f}s {w2:>7.1f}s")


if __name__ == "__main__":
  main()
