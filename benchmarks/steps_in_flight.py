"""Does dispatching one step ahead save wall time? The same training run with
`steps_in_flight=1` (read each step's metrics before the next) and `=2`,
side by side, alternating, in one invocation.

    python benchmarks/steps_in_flight.py [--config=configs/fashion_mnist.py] \
        [--epochs=0.5] [--processes=1,2] [--rounds=2] [--set field=value ...]

Each run trains from scratch into a fresh workdir (one compilation cache per
process count, warmed by an untimed run of each setting so that no row pays for
compiling). The config's epochs and milestones are scaled together to
`--epochs`. Printed per run: updates, wall seconds (the last train record's
`wall_time`: training, evaluation and checkpoints; start-up and the first
stage's compile excluded), the median `step_time` of the logged steps, and
the ratio of the round's 2-in-flight wall time to its 1-in-flight one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from benchmarks import schedule_wall_time  # noqa: E402
from trainer import metrics as metrics_lib  # noqa: E402


def scaled_schedule(config_path: str, overrides, epochs: float) -> list:
  """Overrides that cut the config's schedule to `epochs`, milestones
  scaled with it."""
  config = common.load_config(config_path, overrides)
  scale = epochs / config.schedule.num_epochs
  milestones = tuple(round(m * scale, 4)
                     for m in config.schedule.milestones_epochs)
  return [f"schedule.num_epochs={epochs}",
          f"schedule.milestones_epochs={milestones}",
          f"eval_every_epochs={epochs}"]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--epochs", type=float, default=0.5)
  p.add_argument("--processes", default="1,2")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE")
  a = p.parse_args()
  if a.epochs <= 0 or a.rounds < 1:
    p.error("--epochs must be positive and --rounds at least 1")
  overrides = [*scaled_schedule(a.config, a.set, a.epochs), *a.set]
  print(f"{'processes':>9} {'round':>5} {'in flight':>9} {'updates':>8} "
        f"{'wall s':>8} {'median step ms':>14} {'2 / 1':>6}")
  with tempfile.TemporaryDirectory() as tmp:
    for processes in map(int, a.processes.split(",")):
      cache = os.path.join(tmp, f"cache{processes}")
      for n in (1, 2):  # The program cache's key covers the whole config.
        schedule_wall_time.train(
            a.config, os.path.join(tmp, f"warm{processes}_{n}"), cache,
            processes, [*overrides, f"steps_in_flight={n}"])
      for r in range(a.rounds):
        walls = {}
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for n in order:
          workdir = os.path.join(tmp, f"p{processes}_r{r}_n{n}")
          seconds, updates = schedule_wall_time.train(
              a.config, workdir, cache, processes,
              [*overrides, f"steps_in_flight={n}"])
          walls[n] = seconds
          steps = [x["step_time"]
                   for x in metrics_lib.read_metrics(workdir, "train")]
          ratio = (f"{walls[2] / walls[1]:>6.2f}" if len(walls) == 2
                   else f"{'':>6}")
          print(f"{processes:>9} {r:>5} {n:>9} {updates:>8} {seconds:>8.1f} "
                f"{1e3 * statistics.median(steps):>14.1f} {ratio}",
                flush=True)


if __name__ == "__main__":
  main()
