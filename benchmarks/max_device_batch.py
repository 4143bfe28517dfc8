"""The largest per-device batch whose train step fits on one device.

    python benchmarks/max_device_batch.py [--config=configs/imagenet_resnet50.py] \
        [--image_size=224] [--dtype=bfloat16] [--start=32] [--limit=4096]

Doubles the batch of the trainer's step (host accumulation, one
micro-batch, on a mesh of the first device alone) from `--start` until
compiling or running it fails for lack of memory, or `--limit` is reached;
prints each size's examples/s and the largest that ran. `max_device_batch`
at or below that size lets gradient accumulation run any stage's batch.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def out_of_memory(error: Exception) -> bool:
  text = str(error).lower()
  return any(s in text for s in ("resource_exhausted", "out of memory",
                                 "resource exhausted"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/imagenet_resnet50.py")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--ghost_batch_size", type=int, default=32)
  p.add_argument("--start", type=int, default=32)
  p.add_argument("--limit", type=int, default=4096)
  p.add_argument("--steps", type=int, default=3)
  a = p.parse_args()

  import jax
  import numpy as np
  from jax.sharding import Mesh

  import models
  from benchmarks import common
  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib
  from trainer import optimizer as optimizer_lib

  config = common.load_config(a.config, [
      f"dataset.image_size={a.image_size}", f"model.dtype={a.dtype}",
      f"ghost_batch_size={a.ghost_batch_size}"])
  mesh = Mesh(np.array(jax.devices()[:1]), (mesh_lib.DATA_AXIS,))
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  hyper = common.step_hyper(mesh, learning_rate=0.1)
  rng = np.random.default_rng(0)
  print(f"{config.model.name} {a.image_size} px {a.dtype} on "
        f"{jax.devices()[0].device_kind}")
  print(f"{'B':>6} {'ms/step':>9} {'ex/s':>9}")
  largest, b = None, a.start
  while b <= a.limit:
    try:
      state = loop.create_train_state(config, model, tx, mesh, seed=0)
      compiler = compile_lib.StepCompiler.for_config(
          config, mesh=mesh, model=model, tx=tx, state=state,
          max_device_batch=b, micro_batch_unroll=0, accumulation="host",
          weight_average=False)
      step = compiler.get(b)
      state, seconds = common.seconds_per_step(
          step, state, common.random_batch(rng, config.dataset, b), hyper,
          a.steps)
      compiler.close()
    except Exception as e:  # pylint: disable=broad-except
      if not out_of_memory(e):
        raise
      print(f"{b:>6} out of memory ({str(e).splitlines()[0][:100]})")
      break
    print(f"{b:>6} {1000 * seconds:>9.1f} {b / seconds:>9.1f}", flush=True)
    largest = b
    del state, compiler, step
    b *= 2
  print(f"largest per-device batch that ran: {largest}")


if __name__ == "__main__":
  main()
