"""The largest per-device batch whose train step fits on one device.

    python benchmarks/max_device_batch.py [--config=configs/imagenet_resnet50.py] \
        [--image_size=224] [--dtype=bfloat16] [--start=32] [--limit=4096]

Doubles the batch of the trainer's step (host accumulation, one
micro-batch, on a mesh of the first device alone) from `--start` until
compiling or running it fails for lack of memory, or `--limit` is reached,
then bisects `--refine` times between the largest size that ran and the
first that did not (in multiples of the ghost batch). Prints each size's
examples/s, compile seconds and XLA's estimate of the device memory of the
function that runs the model (arguments + outputs + temporaries - donated),
and the largest size that ran.

On an accelerator a size that does not fit can take minutes to fail (on an
H100, B=4,096 for ResNet-50 had neither run nor failed after more than a
minute, when the command's time ran out). So once two sizes have run, a
size whose memory estimate, extrapolated along the line through the two
largest that ran, exceeds the device's memory for arrays is not tried and
counts as not fitting; the output says so (`--predict=false` tries every
size).
`max_device_batch` at or below it lets gradient accumulation run any
stage's batch. `--time_limit` stops before a size that would start past it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

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
  p.add_argument("--refine", type=int, default=1,
                 help="bisection steps after the first size that fails")
  p.add_argument("--time_limit", type=float, default=float("inf"),
                 help="seconds after which no new size is started")
  p.add_argument("--predict", default="true", choices=("true", "false"),
                 help="skip sizes whose extrapolated memory estimate "
                      "exceeds the device's")
  p.add_argument("--memory_gib", type=float, default=0.0,
                 help="device memory to fit in, for the prediction (default: "
                      "what JAX reports for arrays; none on a CPU)")
  a = p.parse_args()
  if a.memory_gib < 0:
    p.error(f"--memory_gib must not be negative, got {a.memory_gib}")

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
  device = jax.devices()[0]
  limit = (int(a.memory_gib * 2**30) if a.memory_gib > 0
           else (device.memory_stats() or {}).get("bytes_limit"))
  print(f"{config.model.name} {a.image_size} px {a.dtype} on "
        f"{device.device_kind}"
        + (f", {limit / 2**30:.1f} GiB for arrays" if limit else ""))
  print(f"{'B':>6} {'ms/step':>9} {'ex/s':>9} {'GiB (XLA)':>10} "
        f"{'compile s':>10}")
  measured = {}  # batch size that ran: XLA's estimate in GiB
  not_tried = set()  # sizes predicted not to fit
  predict = a.predict == "true"

  def fits(b) -> bool:
    """Runs `--steps` steps of batch `b`; False if it runs out of memory or
    is predicted to."""
    reason = predicted_not_to_fit(measured, b, limit) if predict else None
    if reason:
      print(f"{b:>6} not tried: {reason}", flush=True)
      not_tried.add(b)
      return False
    print(f"(B={b}: compiling at {time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)
    try:
      state = loop.create_train_state(config, model, tx, mesh, seed=0)
      compile_start = time.perf_counter()
      compiler = compile_lib.StepCompiler.for_config(
          config, mesh=mesh, model=model, tx=tx, state=state,
          max_device_batch=b, micro_batch_unroll=0, accumulation="host",
          weight_average=False)
      step = compiler.get(b)
      compiler.close()
      compile_seconds = time.perf_counter() - compile_start
      gib = step_gib(step.model_executable)
      state, seconds = common.seconds_per_step(
          step, state, common.random_batch(rng, config.dataset, b), hyper,
          a.steps)
    except Exception as e:  # pylint: disable=broad-except
      if not out_of_memory(e):
        raise
      print(f"{b:>6} out of memory ({str(e).splitlines()[0][:100]})",
            flush=True)
      return False
    print(f"{b:>6} {1000 * seconds:>9.1f} {b / seconds:>9.1f} {gib:>10.2f} "
          f"{compile_seconds:>10.1f}", flush=True)
    measured[b] = gib
    return True

  start = time.perf_counter()
  largest, failed = largest_that_fits(
      fits, start=a.start, limit=a.limit, refine=a.refine,
      multiple=a.ghost_batch_size,
      out_of_time=lambda: time.perf_counter() - start >= a.time_limit)
  print(f"largest per-device batch that ran: {largest}"
        + (f" (first that did not: {failed}"
           + (", by the estimate" if failed in not_tried else "") + ")"
           if failed else ""))


def largest_that_fits(fits, *, start: int, limit: int, refine: int,
                      multiple: int, out_of_time=lambda: False):
  """(largest size that fit, first that did not, or None for either).

  Doubles from `start` while `fits(size)` and size <= `limit`, then bisects
  `refine` times between the two, in multiples of `multiple`. No size is
  tried once `out_of_time()`.
  """
  largest, failed, b = None, None, start
  while b <= limit and not out_of_time():
    if not fits(b):
      failed = b
      break
    largest, b = b, 2 * b
  for _ in range(refine if largest and failed else 0):
    b = (largest + failed) // 2 // multiple * multiple
    if b <= largest or out_of_time():
      break
    if fits(b):
      largest = b
    else:
      failed = b
  return largest, failed


def predicted_gib(measured: dict, b: int) -> float | None:
  """XLA's memory estimate for batch `b` extrapolated along the line
  through the two largest sizes in `measured` {size: GiB}; None with fewer
  than two, or when an estimate is missing (NaN)."""
  if len(measured) < 2:
    return None
  (b1, m1), (b2, m2) = sorted(measured.items())[-2:]
  predicted = m2 + (m2 - m1) / (b2 - b1) * (b - b2)
  return None if math.isnan(predicted) else predicted


def predicted_not_to_fit(measured: dict, b: int,
                         limit_bytes: int | None) -> str | None:
  """Why batch `b` need not be tried (its extrapolated estimate exceeds
  `limit_bytes`, the device's memory for arrays), or None to try it."""
  predicted = predicted_gib(measured, b)
  if not limit_bytes or predicted is None or predicted <= limit_bytes / 2**30:
    return None
  return (f"XLA's estimate extrapolates to {predicted:.1f} GiB > "
          f"{limit_bytes / 2**30:.1f}")


def step_gib(compiled) -> float:
  """XLA's estimate of the device memory a compiled step needs, in GiB."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**30


if __name__ == "__main__":
  main()
