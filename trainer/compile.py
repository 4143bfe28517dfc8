"""Ahead-of-time compilation: one train step per distinct stage batch size.

The first stage's step compiles before the clock starts; the others compile in
a background thread while training runs, so a stage switch does not stall.
JAX's persistent compilation cache makes a second launch nearly free.
"""
from __future__ import annotations

import concurrent.futures
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp

from trainer import mesh as mesh_lib
from trainer import step as step_lib


class ConfigError(ValueError):
  """A config that cannot run on this mesh; the message names the field."""


def enable_compilation_cache(directory: str) -> None:
  """Persist compiled executables in `directory` (every size, every time)."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def micro_batches(batch_size: int, num_devices: int, max_device_batch: int,
                  ghost_batch_size: int) -> int:
  """How many micro-batches a global batch of `batch_size` examples needs."""
  _check(max_device_batch > 0,
         f"max_device_batch={max_device_batch} must be positive")
  _check(max_device_batch % ghost_batch_size == 0,
         f"max_device_batch={max_device_batch} is not a multiple of "
         f"ghost_batch_size={ghost_batch_size}")
  per_device = batch_size // num_devices
  _check(per_device >= ghost_batch_size,
         f"ghost_batch_size={ghost_batch_size} is larger than the per-device "
         f"batch {per_device} (B={batch_size} over {num_devices} devices)")
  if per_device <= max_device_batch:
    return 1
  _check(per_device % max_device_batch == 0,
         f"max_device_batch={max_device_batch} does not divide the per-device "
         f"batch {per_device} (B={batch_size} over {num_devices} devices)")
  return per_device // max_device_batch


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


class StepCompiler:
  """Compiles and hands out the train step of each stage batch size."""

  def __init__(self, *, mesh, model, tx, abstract_state, image_shape,
               max_device_batch: int, ghost_batch_size: int,
               micro_batch_unroll: int = 0,
               on_compiled: Callable[[int, int, float], None]):
    self._mesh, self._model, self._tx = mesh, model, tx
    self._state = abstract_state
    self._image_shape = tuple(image_shape)
    self._max_device_batch = max_device_batch
    self._ghost = ghost_batch_size
    self._unroll = micro_batch_unroll
    self._on_compiled = on_compiled
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="compile")

  def compile(self, batch_size: int):
    """Lowers and compiles the step for `batch_size` (blocking)."""
    n = self._mesh.size
    k = micro_batches(batch_size, n, self._max_device_batch, self._ghost)
    state_sharding = mesh_lib.replicated(self._mesh)
    data = mesh_lib.batch_sharding(self._mesh)
    fn = jax.jit(
        functools.partial(step_lib.train_step, model=self._model, tx=self._tx,
                          num_devices=n, num_micro_batches=k,
                          unroll=self._unroll),
        in_shardings=(state_sharding, data, state_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=(0,))
    batch = dict(
        image=jax.ShapeDtypeStruct((batch_size, *self._image_shape),
                                   jnp.float32, sharding=data),
        label=jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=state_sharding)
    hyper = dict(learning_rate=scalar, momentum=scalar, bn_decay=scalar)
    start = time.perf_counter()
    compiled = fn.lower(self._state, batch, hyper).compile()
    seconds = time.perf_counter() - start
    self._on_compiled(batch_size, k, seconds)
    return compiled

  def start(self, batch_sizes) -> None:
    """Compiles the first size now and queues the rest in the background."""
    if not batch_sizes:
      return
    first, *rest = batch_sizes
    done = concurrent.futures.Future()
    done.set_result(self.compile(first))
    self._futures[first] = done
    for b in rest:
      self._futures[b] = self._pool.submit(self.compile, b)

  def get(self, batch_size: int):
    """The compiled step for `batch_size`, waiting if it is still compiling."""
    if batch_size not in self._futures:
      self._futures[batch_size] = self._pool.submit(self.compile, batch_size)
    return self._futures[batch_size].result()

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
