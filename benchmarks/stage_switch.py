"""Stage switches and the persistent compilation cache, measured on real runs.

    python benchmarks/stage_switch.py [--config=configs/fashion_mnist.py:smoke] \
        [--accumulation=host,compiled] [--set field=value ...]

For each accumulation mode, trains the config twice with `trainer.main` (8
virtual CPU devices, every step logged), in fresh workdirs that share one
fresh compilation-cache directory:
* launch 1 (empty cache): for every stage after the first, the first step's
  time (including any wait for that stage's compile) over the stage's median
  step time. Goal ≤ 1.5.
* launch 2 (warm cache): its total compile seconds over launch 1's. Goal ≤ 0.1.
Both from the `compile` and `train` records of each run's metrics.jsonl.
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


def launch(config, workdir, cache_dir, accumulation, overrides, devices):
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  command = [sys.executable, "-m", "trainer.main", f"--config={config}",
             f"--workdir={workdir}", "--config.log_every_steps=1",
             f"--config.accumulation={accumulation}",
             f"--config.compilation_cache_dir={cache_dir}",
             *[f"--config.{o}" for o in overrides]]
  start = time.perf_counter()
  out = subprocess.run(command, env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  if out.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  return time.perf_counter() - start


def stage_switches(workdir):
  """[(stage, B, first step s, median step s)] for stages after the first."""
  train = metrics_lib.read_metrics(workdir, "train")
  rows = []
  for stage in sorted({r["stage"] for r in train})[1:]:
    times = [r["step_time"] for r in train if r["stage"] == stage]
    batch = next(r["batch_size"] for r in train if r["stage"] == stage)
    rows.append((stage, batch, times[0], statistics.median(times)))
  return rows


def compile_seconds(workdir):
  return sum(r["compile_seconds"]
             for r in metrics_lib.read_metrics(workdir, "compile"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py:smoke")
  p.add_argument("--accumulation", default="host,compiled")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE")
  a = p.parse_args()
  print(f"{'accumulation':>12} {'stage':>5} {'B':>6} {'first ms':>9} "
        f"{'median ms':>9} {'first/median':>12}")
  summary = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in a.accumulation.split(","):
      cache = os.path.join(tmp, f"cache_{mode}")
      first, second = (os.path.join(tmp, f"{mode}_{i}") for i in (1, 2))
      wall1 = launch(a.config, first, cache, mode, a.set, a.devices)
      wall2 = launch(a.config, second, cache, mode, a.set, a.devices)
      for stage, batch, t0, median in stage_switches(first):
        print(f"{mode:>12} {stage:>5} {batch:>6} {1000 * t0:>9.1f} "
              f"{1000 * median:>9.1f} {t0 / median:>12.2f}")
      summary.append((mode, compile_seconds(first), compile_seconds(second),
                      wall1, wall2))
  print(f"\n{'accumulation':>12} {'compile 1st':>11} {'compile 2nd':>11} "
        f"{'2nd/1st':>7} {'wall 1st':>8} {'wall 2nd':>8}")
  for mode, c1, c2, w1, w2 in summary:
    print(f"{mode:>12} {c1:>10.1f}s {c2:>10.1f}s {c2 / c1:>7.2f} "
          f"{w1:>7.1f}s {w2:>7.1f}s")


if __name__ == "__main__":
  main()
