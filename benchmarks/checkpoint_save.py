"""Checkpoint saves of a replicated train state: orbax's default against the
trainer's setting.

    python benchmarks/checkpoint_save.py \
        [--configs=configs/fashion_mnist.py,configs/imagenet_resnet50.py] \
        [--saves=4] [--rounds=2] [--devices=8]

Orbax's default writes every replicated array in one slice per replica
(`min_slice_bytes=0`); the trainer writes arrays whole below
`trainer.checkpoint.MIN_SLICE_BYTES` per slice. For each round, config and
setting, a fresh child process (so the first save's compiles count) builds
the config's train state replicated over `--devices` virtual CPU devices and
saves it `--saves` times with `trainer.checkpoint.Checkpointer`, waiting for
each write. Prints, per setting: the first save's blocking ms (what the step
loop waits for), the later saves' median blocking ms and ms until written,
and the process CPU ms per later save (what competes with training steps);
then trainer / orbax-default ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

SETTINGS = ("orbax default", "trainer")


def measure(config_path: str, setting: str, saves: int) -> dict:
  """Times `saves` saves of the config's initial state in this process."""
  import jax

  import models
  from benchmarks import common
  from trainer import checkpoint as checkpoint_lib
  from trainer import loop
  from trainer import mesh as mesh_lib

  config = common.load_config(config_path, [])
  mesh = mesh_lib.make_mesh()
  model = models.create_model(config)
  tx = common.optimizer(config)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  leaves = jax.tree_util.tree_leaves(state)
  min_slice_bytes = (0 if setting == "orbax default"
                     else checkpoint_lib.MIN_SLICE_BYTES)
  blocking, written, cpu = [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    checkpoints = checkpoint_lib.Checkpointer(
        workdir, every_steps=10**9, every_minutes=0.0, max_to_keep=2,
        min_slice_bytes=min_slice_bytes)
    for step in range(1, saves + 1):
      start, start_cpu = time.perf_counter(), time.process_time()
      checkpoints.save(step, state, dict(examples_seen=step))
      blocking.append(time.perf_counter() - start)
      checkpoints.wait()
      written.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
    checkpoints.close()
  return dict(arrays=len(leaves), megabytes=sum(x.nbytes for x in leaves) / 1e6,
              first_blocking=blocking[0],
              blocking=statistics.median(blocking[1:]),
              written=statistics.median(written[1:]),
              cpu=statistics.median(cpu[1:]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs",
                 default="configs/fashion_mnist.py,configs/imagenet_resnet50.py")
  p.add_argument("--saves", type=int, default=4)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.saves < 2:
    p.error("--saves must be at least 2 (the first save is reported apart)")
  if a.child:
    config_path, setting = a.child.split("@")
    print(json.dumps(measure(config_path, setting, a.saves)))
    return
  from benchmarks import child
  print(f"{'config':<32} {'setting':<13} {'arrays':>6} {'MB':>7} "
        f"{'1st save ms':>11} {'save ms':>8} {'written ms':>10} {'CPU ms':>7}")
  results = {}
  for _ in range(a.rounds):
    for config_path in a.configs.split(","):
      for setting in SETTINGS:
        r = child.run(__file__, f"--child={config_path}@{setting}", a.devices,
                      f"{config_path} with {setting}")
        results.setdefault((config_path, setting), []).append(r)
        print(f"{config_path:<32} {setting:<13} {r['arrays']:>6} "
              f"{r['megabytes']:>7.1f} {1000 * r['first_blocking']:>11.0f} "
              f"{1000 * r['blocking']:>8.0f} {1000 * r['written']:>10.0f} "
              f"{1000 * r['cpu']:>7.0f}", flush=True)
  print("\ntrainer / orbax default (medians over rounds)")
  for config_path in a.configs.split(","):
    ours, theirs = (results[(config_path, s)] for s in ("trainer",
                                                         "orbax default"))
    ratios = []
    for key in ("first_blocking", "blocking", "written", "cpu"):
      ratio = (statistics.median(r[key] for r in ours)
               / statistics.median(r[key] for r in theirs))
      ratios.append(f"{key} {ratio:.2f}")
    print(f"{config_path}: {', '.join(ratios)}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
