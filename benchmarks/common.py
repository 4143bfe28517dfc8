"""What the step benchmarks share: a config with overrides, random batches,
the step's scalars, and timing the step as the trainer runs it."""
from __future__ import annotations

import ast
import collections
import os
import time


def default_virtual_devices(count: int) -> None:
  """Asks XLA:CPU for `count` virtual devices unless XLA_FLAGS already sets
  a device count; call before jax is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={count}")


def load_config(config_path, overrides):
  """`config_path` ("file.py" or "file.py:variant") with FIELD=VALUE
  `overrides` applied (values parsed as Python literals where they are)."""
  from ml_collections.config_flags import config_flags as cf
  path, _, variant = config_path.partition(":")
  config = cf._LoadConfigModule("bench_config", path).get_config(variant or None)
  for item in overrides:
    field, value = item.split("=", 1)
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def random_batch(rng, dataset, batch_size: int) -> dict:
  """A host batch of uniform uint8 pixels and labels shaped like `dataset`
  (the input pipeline's batches hold uint8 pixels)."""
  import numpy as np
  d = dataset
  return dict(
      image=rng.integers(0, 256, (batch_size, d.image_size, d.image_size,
                                  d.channels), dtype=np.uint8),
      label=rng.integers(0, d.num_classes, batch_size).astype(np.int32))


def step_hyper(mesh, learning_rate: float) -> dict:
  """The step's scalars, replicated on `mesh` (momentum 0.9, BN decay 0.9)."""
  import jax
  import numpy as np

  from trainer import mesh as mesh_lib
  return {k: jax.device_put(np.float32(v), mesh_lib.replicated(mesh))
          for k, v in dict(learning_rate=learning_rate, momentum=0.9,
                           bn_decay=0.9).items()}


def run_steps(step, state, args, steps: int, in_flight: int, wait):
  """`steps` calls of `step(state, *args) -> (state, out)`, each `out`
  waited for (`wait(out)`) as the trainer's loop waits for a step's
  metrics: with `in_flight=1` before the next call, with 2 after it
  (config.steps_in_flight). Returns the last state."""
  unread = collections.deque()
  for _ in range(steps):
    state, out = step(state, *args)
    unread.append(out)
    while len(unread) >= in_flight:
      wait(unread.popleft())
  for out in unread:
    wait(out)
  return state


def seconds_per_step(step, state, batch, hyper, steps: int,
                     in_flight: int = 1):
  """One untimed step, then the mean seconds of `steps` steps whose
  metrics are read as `run_steps` says. Returns (state, seconds)."""
  import jax
  state = run_steps(step, state, (batch, hyper), 1, 1, jax.device_get)
  start = time.perf_counter()
  state = run_steps(step, state, (batch, hyper), steps, in_flight,
                    jax.device_get)
  return state, (time.perf_counter() - start) / steps
