"""Where a train step's time goes: a JAX profiler trace of the trainer's step,
summed per kind of XLA operation, for the first run of the compiled step and
for the steady state.

    python benchmarks/profile_step.py [--config=configs/fashion_mnist.py] \
        [--batch_size=128] [--steps=4] [--trace_dir=DIR] [--set field=value]

The step is the one the trainer runs (`StepCompiler`, the config's
accumulation mode) on 8 virtual CPU devices unless XLA_FLAGS says otherwise.
Times are summed over the device threads (so they exceed wall time); a
category's share of the step and its first-run / steady-state ratio are
what to read. `--trace_dir` keeps the trace for TensorBoard or Perfetto.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.default_virtual_devices(8)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--batch_size", type=int, default=0,
                 help="default: the schedule's first batch size")
  p.add_argument("--steps", type=int, default=4,
                 help="steady-state steps traced after the first")
  p.add_argument("--trace_dir", default="")
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE")
  a = p.parse_args()

  import jax
  import numpy as np
  from jax import profiler

  import models
  from benchmarks import trace_ops
  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib
  from trainer import optimizer as optimizer_lib

  config = common.load_config(a.config, a.set)
  b = a.batch_size or config.schedule.batch_size
  mesh = mesh_lib.make_mesh()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.01,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  compiler = compile_lib.StepCompiler.for_config(
      config, mesh=mesh, model=model, tx=tx, state=state,
      weight_average=False)
  step = compiler.get(b)
  hyper = common.step_hyper(mesh, learning_rate=0.01)
  batch = common.random_batch(np.random.default_rng(0), config.dataset, b)
  root = a.trace_dir or tempfile.mkdtemp()
  phases = {}
  for phase, steps in (("first run", 1), ("steady", a.steps)):
    directory = os.path.join(root, phase.replace(" ", "_"))
    start = time.perf_counter()
    with profiler.trace(directory):
      for _ in range(steps):
        state, metrics = step(state, batch, hyper)
        jax.device_get(metrics)
    wall = (time.perf_counter() - start) / steps
    phases[phase] = (wall, {
        k: v / steps for k, v in trace_ops.by_category(
            trace_ops.op_milliseconds(directory)).items()})
  compiler.close()

  print(f"{a.config} B={b} on {mesh.size} devices, {config.accumulation} "
        f"accumulation; per step, summed over device threads")
  first_wall, first = phases["first run"]
  steady_wall, steady = phases["steady"]
  total = sum(steady.values())
  print(f"{'operations':<36} {'first ms':>9} {'steady ms':>9} "
        f"{'share':>6} {'first/steady':>12}")
  for label, _ in trace_ops.CATEGORIES:
    f, s = first.get(label, 0.0), steady.get(label, 0.0)
    ratio = f"{f / s:12.2f}" if s else f"{'-':>12}"
    print(f"{label:<36} {f:9.1f} {s:9.1f} {s / total:6.1%} {ratio}")
  print(f"{'wall time of the step':<36} {1000 * first_wall:9.1f} "
        f"{1000 * steady_wall:9.1f} {'':>6} {first_wall / steady_wall:12.2f}")
  if a.trace_dir:
    print(f"trace: {a.trace_dir} (tensorboard --logdir, or Perfetto)")


if __name__ == "__main__":
  main()
