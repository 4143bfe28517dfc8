"""The largest per-device batch whose train step fits on one device.

    python benchmarks/max_device_batch.py [--config=configs/imagenet_resnet50.py] \
        [--image_size=224] [--dtype=bfloat16] [--start=32] [--limit=4096] \
        [--gpu=benchmarks/gpu_specs/h100_sxm.txtpb]

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
size). The line is a guess: XLA:GPU recomputes values rather than exceed
the memory (rematerialisation), so its estimate stops growing with the
batch near the limit.
`max_device_batch` at or below it lets gradient accumulation run any
stage's batch. `--time_limit` stops before a size that would start past it.

`--gpu=FILE` runs nothing: it compiles each size for the GPU the file
describes (a text GpuTargetConfigProto, see gpu_program.py) on this
machine, as XLA would on that GPU with `--memory_gib` for arrays, and a
size fits when XLA's estimate does. Per size it prints the estimate, the
kernels and the MB that the kernels other than cuDNN's and cuBLAS's move
per example (what rematerialising adds). It needs XLA's CUDA plugin:

    make gpu-program-env
    .venv-gpu-program/bin/python benchmarks/max_device_batch.py \
        --gpu=benchmarks/gpu_specs/h100_sxm.txtpb --start=256
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def out_of_memory(error: Exception) -> bool:
  text = str(error).lower()
  return any(s in text for s in ("resource_exhausted", "out of memory",
                                 "resource exhausted"))


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
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
                      "what JAX reports for arrays; none on a CPU); with "
                      "--gpu, what JAX's allocator would hold (default: "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unset, of the "
                      "description's memory)")
  p.add_argument("--sizes", default="",
                 help="comma-separated sizes to try, each, instead of the "
                      "search (e.g. to check what --gpu predicted)")
  p.add_argument("--gpu", default="",
                 help="compile only, for the GPU this file describes (e.g. "
                      "benchmarks/gpu_specs/h100_sxm.txtpb), without one: "
                      "run with .venv-gpu-program/bin/python")
  return p


def main():
  p = parser()
  a = p.parse_args()
  if a.memory_gib < 0:
    p.error(f"--memory_gib must not be negative, got {a.memory_gib}")
  try:
    sizes = [int(b) for b in a.sizes.split(",")] if a.sizes else []
  except ValueError:
    sizes = [0]
  if any(b <= 0 or b % a.ghost_batch_size for b in sizes):
    p.error(f"--sizes must be positive multiples of --ghost_batch_size="
            f"{a.ghost_batch_size}, got {a.sizes}")
  if a.gpu:
    # Before jax is imported: keeps JAX from starting CUDA.
    from benchmarks import gpu_program
    if not os.path.isfile(a.gpu):
      p.error(f"no GPU description at {a.gpu}")
    description = gpu_program.read_target_config(a.gpu)
    if not isinstance(description, str) or "device_memory_size" not in \
        description:
      p.error(f"{a.gpu} is not a text GPU description with a "
              "device_memory_size")
    try:
      client_memory_fraction()
    except ValueError as e:
      p.error(str(e))
    if not gpu_program.plugin_found():
      sys.exit("max_device_batch.py --gpu needs XLA's CUDA plugin "
               "(jax-cuda12-pjrt), which this Python lacks: run `make "
               "gpu-program-env`, then .venv-gpu-program/bin/python "
               "benchmarks/max_device_batch.py --gpu=...")

  from benchmarks import common
  config = common.load_config(a.config, [
      f"dataset.image_size={a.image_size}", f"model.dtype={a.dtype}",
      f"ghost_batch_size={a.ghost_batch_size}"])
  start = time.perf_counter()
  if a.gpu:
    import models  # As the trainer would resolve them on the GPU, not here.
    models.resolve_platform_defaults(config, "gpu")
    fits, not_tried = _compile_only(a, config, description), set()
  else:
    fits, not_tried = _on_device(a, config, start)

  def out_of_time():
    return time.perf_counter() - start >= a.time_limit

  if sizes:
    outcome = {}
    for b in sizes:
      if out_of_time():
        break
      outcome[b] = fits(b)
    largest = max((b for b, ok in outcome.items() if ok), default=None)
    failed = min((b for b, ok in outcome.items() if not ok), default=None)
  else:
    largest, failed = largest_that_fits(
        fits, start=a.start, limit=a.limit, refine=a.refine,
        multiple=a.ghost_batch_size, out_of_time=out_of_time)
  print(f"largest per-device batch that "
        f"{'fits' if a.gpu else 'ran'}: {largest}"
        + (f" (first that did not: {failed}"
           + (", by the estimate" if failed in not_tried else "") + ")"
           if failed else ""))


def _ran_out_of_memory(b: int, error: Exception) -> bool:
  """False, once printed, where `error` is batch `b` running out of device
  memory; any other error is raised again."""
  if not out_of_memory(error):
    raise error
  print(f"{b:>6} out of memory ({str(error).splitlines()[0][:100]})",
        flush=True)
  return False


def _on_device(a, config, start):
  """(fits(b), the sizes it predicted not to fit): runs the step on the
  first device."""
  import jax
  import numpy as np
  from jax.sharding import Mesh

  import models
  from benchmarks import common
  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib

  mesh = Mesh(np.array(jax.devices()[:1]), (mesh_lib.DATA_AXIS,))
  model = models.create_model(config)
  tx = common.optimizer(config)
  hyper = common.step_hyper(mesh, learning_rate=0.1)
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  limit = (int(a.memory_gib * 2**30) if a.memory_gib > 0
           else (device.memory_stats() or {}).get("bytes_limit"))
  print(f"{config.model.name} {a.image_size} px {a.dtype} on "
        f"{device.device_kind}"
        + (f", {limit / 2**30:.4g} GiB for arrays" if limit else ""))
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
          weight_average=False, memory_limit_bytes=None)  # Checked below.
      step = compiler.get(b)
      compiler.close()
      compile_seconds = time.perf_counter() - compile_start
      gib = step_gib(step.model_executable)
      if limit and gib > limit / 2**30:
        # XLA could not recompute its way under the limit: no need to run.
        print(f"{b:>6} does not fit: XLA's estimate {gib:.4g} GiB > "
              f"{limit / 2**30:.4g}", flush=True)
        return False
      state, seconds = common.seconds_per_step(
          step, state, common.random_batch(rng, config.dataset, b), hyper,
          a.steps)
    except Exception as e:  # pylint: disable=broad-except
      return _ran_out_of_memory(b, e)
    print(f"{b:>6} {1000 * seconds:>9.1f} {b / seconds:>9.1f} {gib:>10.2f} "
          f"{compile_seconds:>10.1f}", flush=True)
    measured[b] = gib
    return True

  return fits, not_tried


def client_memory_fraction() -> float:
  """XLA_PYTHON_CLIENT_MEM_FRACTION, the share of a GPU's memory JAX's
  allocator holds (0.75 unset); ValueError unless a number in (0, 1]."""
  fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
  try:
    value = float(fraction)
  except ValueError:
    value = float("nan")
  if not 0 < value <= 1:
    raise ValueError("XLA_PYTHON_CLIENT_MEM_FRACTION must be a number in "
                     f"(0, 1], got {fraction!r}")
  return value


def _compile_only(a, config, description: str):
  """fits(b): compiles the step of batch `b` for the compile-only GPU of
  `description` (a text GpuTargetConfigProto) and asks whether XLA's
  memory estimate is within what JAX's allocator would hold there."""
  from benchmarks import common
  from benchmarks import gpu_program

  gib = a.memory_gib or (client_memory_fraction()
                         * gpu_program.device_memory_gib(description))
  mesh = gpu_program.compile_only_mesh(a.gpu, arrays_gib=gib)
  name = re.search(r'device_description_str:\s*"([^"]*)"', description)
  print(f"{config.model.name} {a.image_size} px {a.dtype}, compiled for "
        f"{name.group(1) if name else a.gpu} (no device), {gib:.4g} GiB "
        f"for arrays")
  print(f"{'B':>6} {'GiB (XLA)':>10} {'compile s':>10} {'kernels':>8} "
        f"{'MB moved/example':>17}")

  def fits(b) -> bool:
    print(f"(B={b}: compiling)", file=sys.stderr, flush=True)
    compile_start = time.perf_counter()
    try:
      accumulate = common.compile_stage(
          config, mesh, b, max_device_batch=b, micro_batch_unroll=0,
          accumulation="host", weight_average=False)["accumulate"]
    except Exception as e:  # pylint: disable=broad-except
      return _ran_out_of_memory(b, e)
    estimate = step_gib(accumulate)
    found = gpu_program.summary(gpu_program.kernels(accumulate.as_text()))
    print(f"{b:>6} {estimate:>10.2f} {time.perf_counter() - compile_start:>10.1f}"
          f" {found['kernels']:>8} {1000 * found['gb_moved'] / b:>17.1f}"
          + ("" if estimate <= gib else
             f"  does not fit: XLA could not recompute its way under "
             f"{gib:.4g} GiB"), flush=True)
    return estimate <= gib

  return fits


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
  from trainer import compile as compile_lib
  need = compile_lib.memory_bytes(compiled)
  return float("nan") if need is None else need / 2**30


if __name__ == "__main__":
  main()
