"""Examples/s of the train step across global batch sizes, device counts,
accumulation modes and micro-batch sizes, side by side in one invocation.

    python benchmarks/train_step.py --config=configs/fashion_mnist.py \
        --batch_sizes=128,512,1024 --devices=8 --accumulation=host,compiled \
        [--max_device_batch=16,32,64] [--xla_flags=';--flag=value'] \
        [--in_flight=1,2] [--set model.width=8 ...]

Each device count runs in its own subprocess (XLA fixes it at start-up).
Data is random numpy on the host, handed over as the trainer does (the host
side of micro-batching is timed too); each row runs one warm-up step, then
`--steps` timed steps, reading each step's metrics before the next is
dispatched or, for `--in_flight=2`, one step later (`steps_in_flight`). The
last column divides by the best single-batch row
(no micro-batching) of the same device count: micro-batching should not make
a large B slower per example than the best B that needs none.
"""
import argparse
import itertools
import json
import os
import sys


def measure(args):
  import numpy as np

  import models
  from benchmarks import common
  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib
  from trainer import optimizer as optimizer_lib

  config = common.load_config(args.config, args.set)
  mesh = mesh_lib.make_mesh()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.01,
                                    momentum=0.9)
  hyper = common.step_hyper(mesh, learning_rate=0.01)
  rng = np.random.default_rng(0)
  rows = []
  device_batches = ([int(x) for x in args.max_device_batch.split(",")]
                    if args.max_device_batch else [config.max_device_batch])
  for accumulation in args.accumulation.split(","):
    for device_batch in device_batches:
      state = loop.create_train_state(config, model, tx, mesh, seed=0)
      compiler = compile_lib.StepCompiler.for_config(
          config, mesh=mesh, model=model, tx=tx, state=state,
          max_device_batch=device_batch, accumulation=accumulation,
          weight_average=False)
      for b, in_flight in itertools.product(
          [int(x) for x in args.batch_sizes.split(",")],
          [int(x) for x in args.in_flight.split(",")]):
        state, seconds = common.seconds_per_step(
            compiler.get(b), state, common.random_batch(rng, config.dataset, b),
            hyper, args.steps, in_flight)
        rows.append(dict(
            devices=mesh.size, accumulation=accumulation,
            max_device_batch=device_batch, batch_size=b, in_flight=in_flight,
            micro_batches=compile_lib.micro_batches(
                b, mesh.size, device_batch, config.ghost_batch_size),
            step_seconds=seconds, examples_per_second=b / seconds))
      compiler.close()
  return rows


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--batch_sizes", default="128,512,1024")
  p.add_argument("--devices", default="8")
  p.add_argument("--accumulation", default="host,compiled",
                 help="comma-separated accumulation modes to compare")
  p.add_argument("--max_device_batch", default="",
                 help="comma-separated micro-batch sizes per device to sweep "
                      "(default: the config's)")
  p.add_argument("--xla_flags", default="",
                 help="';'-separated sets of extra XLA flags to compare, e.g. "
                      "';--xla_cpu_experimental_ynn_fusion_type=' (default "
                      "flags, then no YNNPACK fusions)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--in_flight", default="1",
                 help="comma-separated steps in flight to compare, e.g. 1,2 "
                      "(each B runs them in this order)")
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE, e.g. model.width=8")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return p


def main():
  p = parser()
  a = p.parse_args()
  if any(x.strip() not in ("1", "2") for x in a.in_flight.split(",")):
    p.error(f"--in_flight={a.in_flight}: each value must be 1 or 2")
  if a.child:
    print(json.dumps(measure(a)))
    return
  from benchmarks import child
  rows = []
  for n in a.devices.split(","):
    for flags in a.xla_flags.split(";"):
      rows += [dict(r, xla_flags=flags.strip() or "default")
               for r in child.run(__file__, "--child", n, f"{n} devices",
                                  flags)]
  print(f"{'devices':>7} {'accumulation':>12} {'dev.batch':>9} {'B':>6} "
        f"{'micro':>5} {'flight':>6} {'ms/step':>8} {'ex/s':>8} "
        f"{'vs best unsplit':>15}  XLA flags")
  for r in rows:
    single = [s["examples_per_second"] for s in rows
              if s["devices"] == r["devices"] and s["micro_batches"] == 1
              and s["xla_flags"] == r["xla_flags"]]
    ratio = (f"{r['examples_per_second'] / max(single):>15.2f}"
             if single else f"{'-':>15}")
    print(f"{r['devices']:>7} {r['accumulation']:>12} "
          f"{r['max_device_batch']:>9} {r['batch_size']:>6} "
          f"{r['micro_batches']:>5} {r['in_flight']:>6} "
          f"{1000 * r['step_seconds']:>8.1f} "
          f"{r['examples_per_second']:>8.0f} {ratio}  {r['xla_flags']}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
