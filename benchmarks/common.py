"""What the step benchmarks share: a config with overrides, random batches,
the step's scalars, timing the step as the trainer runs it, and compiling a
stage's functions for any mesh (compile-only devices included)."""
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
  `overrides` applied (values parsed as Python literals where they are, and
  true/false in any case as booleans, as in `--config.x=` flags)."""
  from ml_collections.config_flags import config_flags as cf
  path, _, variant = config_path.partition(":")
  config = cf._LoadConfigModule("bench_config", path).get_config(variant or None)
  for item in overrides:
    field, value = item.split("=", 1)
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    if value.lower() in ("true", "false"):
      node[leaf] = value.lower() == "true"
      continue
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


def optimizer(config):
  """The config's optimizer as the step benchmarks build it (ε 0.1, m 0.9:
  the trainer's step takes both as inputs)."""
  from trainer import optimizer as optimizer_lib
  return optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                      momentum=0.9)


def abstract_state(config, model, tx, mesh):
  """The initial train state as ShapeDtypeStructs replicated on `mesh`: no
  arrays made, so any mesh serves, compile-only devices included."""
  import jax

  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib
  return compile_lib.abstract(
      jax.eval_shape(loop.initial_state_fn(config, model, tx, seed=0)),
      mesh_lib.replicated(mesh))


def compile_stage(config, mesh, per_device_batch: int, **overrides) -> dict:
  """{function name: compiled} the trainer runs for a stage of
  `per_device_batch` examples on every device of `mesh` (compiled only,
  so `mesh` may be of devices this machine has not got); `overrides`
  replace the config's compiler settings (`StepCompiler.for_config`). No
  memory check: the caller judges XLA's estimates itself."""
  import models
  from trainer import compile as compile_lib

  model = models.create_model(config)
  tx = optimizer(config)
  state = abstract_state(config, model, tx, mesh)
  overrides.setdefault("memory_limit_bytes", None)
  compiler = compile_lib.StepCompiler.for_config(
      config, mesh=mesh, model=model, tx=tx, state=state, **overrides)
  batch_size = per_device_batch * mesh.size
  try:
    if compiler.accumulation == "host":
      return compiler.compile_accumulation(batch_size)
    return {"step": compiler.compile(batch_size)}
  finally:
    compiler.close()


def unwritable(path: str, folder: bool = False) -> str | None:
  """Why an output `path` (a file; with `folder`, a folder made if
  missing) could not be written, or None: checked before the work, not
  found after minutes of compiling."""
  if not path:
    return None
  if folder:
    if os.path.exists(path) and not os.path.isdir(path):
      return f"cannot write into {path}: it is a file"
    return None
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    return f"cannot write {path}: it is a folder"
  if not os.path.isdir(parent):
    return f"cannot write {path}: no folder {parent}"
  if not os.access(parent, os.W_OK):
    return f"cannot write {path}: {parent} is not writable"
  return None
