"""Ahead-of-time compilation of the train step of every stage.

What is compiled per stage depends on `config.accumulation` (see
`StepCompiler`). The first stage's functions compile before the clock
starts; the others compile in a background thread while training runs, so a
stage switch does not stall.
A second launch loads the compiled functions from `program_cache` (no
tracing); where it misses, JAX's persistent compilation cache still skips
XLA's compile.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import (
    compilation_cache as jax_compilation_cache)
from jax.sharding import NamedSharding, PartitionSpec as P

from input_pipeline import batches as batches_lib
from trainer import mesh as mesh_lib
from trainer import program_cache as program_cache_lib
from trainer import step as step_lib
# ConfigError, check_accumulation and micro_batches: also compile_lib.* elsewhere.
from trainer.micro_batching import ConfigError  # noqa: F401
from trainer.micro_batching import check_accumulation
from trainer.micro_batching import micro_batches
from trainer.micro_batching import step_key


def compilation_cache_dir(config, workdir: str) -> str:
  """Where a run keeps compiled executables: `config.compilation_cache_dir`,
  else JAX's own JAX_COMPILATION_CACHE_DIR (one cache shared by many runs),
  else `<workdir>/compilation_cache`."""
  return (config.compilation_cache_dir
          or os.environ.get("JAX_COMPILATION_CACHE_DIR")
          or os.path.join(workdir, "compilation_cache"))


def enable_compilation_cache(directory: str) -> None:
  """Persist compiled executables in `directory` (every size, every time).

  JAX opens its cache once per process, at the first compile; a later run in
  the same process with another directory would go on writing to the first
  one, under keys that name the new one. So the cache is reopened."""
  if jax.config.values["jax_compilation_cache_dir"] != directory:
    jax_compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def memory_bytes(compiled) -> int | None:
  """XLA's estimate of the device memory an executable needs (arguments,
  outputs not donated, temporaries), or None where XLA gives none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (a loaded executable)
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_memory_limit(mesh) -> int | None:
  """Bytes this process's first device of `mesh` holds for arrays (JAX's
  allocator limit on a GPU or TPU), or None where it reports none (CPU,
  compile-only devices)."""
  for device in mesh.devices.flat:
    if device.process_index == jax.process_index():
      try:
        return (device.memory_stats() or {}).get("bytes_limit")
      except Exception:  # pylint: disable=broad-except
        return None
  return None


def abstract(tree, sharding=None):
  """ShapeDtypeStructs (with shardings) of a tree of arrays: what `lower`
  takes. Each keeps its own sharding unless `sharding` is given (which also
  places the ShapeDtypeStructs of `jax.eval_shape`)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding or x.sharding),
      tree)


class FusedStep:
  """A stage's update as one compiled function."""

  def __init__(self, compiled, mesh):
    self.compiled, self._mesh = compiled, mesh

  @property
  def model_executable(self):
    """The executable that runs the model (what bounds device memory)."""
    return self.compiled

  def __call__(self, state, local_batch, hyper):
    return self.compiled(state, mesh_lib.global_batch(local_batch, self._mesh),
                         hyper)


class AccumulatingStep:
  """A stage's update as k >= 1 `accumulate_step` calls and one `apply_step`
  (a per-device batch below `max_device_batch` runs as the composed
  "single" step instead).

  Micro-batch j takes rows j·m:(j+1)·m of every device's share of the
  batch (m examples per device), as `step._split_micro_batches` does, so
  both accumulation modes compute the same update.
  """

  def __init__(self, *, mesh, micro_batches: int, device_batch: int,
               init, accumulate, apply):
    self._mesh, self._k, self._m = mesh, micro_batches, device_batch
    self._init, self._accumulate, self._apply = init, accumulate, apply
    self._k_scalar = jax.device_put(np.float32(micro_batches),
                                    mesh_lib.replicated(mesh))

  @property
  def model_executable(self):
    """The executable that runs the model (what bounds device memory)."""
    return self._accumulate

  def _micro_batch(self, local_batch, j):
    out = {}
    for key, x in local_batch.items():
      if not isinstance(x, np.ndarray):
        continue
      devices = x.shape[0] // (self._k * self._m)
      x = x.reshape(devices, self._k, self._m, *x.shape[1:])[:, j]
      out[key] = x.reshape(devices * self._m, *x.shape[2:])
    return mesh_lib.global_batch(out, self._mesh)

  def __call__(self, state, local_batch, hyper):
    accumulators = self._init(state)
    # No collective runs until `apply`, so the k calls queue up without waits.
    for j in range(self._k):
      accumulators = self._accumulate(accumulators, state,
                                      self._micro_batch(local_batch, j))
    return self._apply(state, accumulators,
                       dict(hyper, micro_batches=self._k_scalar))


class StepCompiler:
  """Compiles and hands out the train step of each stage batch size.

  `accumulation="compiled"` compiles `step.train_step` once per distinct
  batch size (micro-batches looped inside it). `accumulation="host"` builds
  every step from `step.accumulate_step` and `step.apply_step` (which also
  yield the per-device gradient norms of the noise scale): batch sizes whose
  per-device share is below `max_device_batch` get the two composed into one
  function each; every batch size whose share reaches it, the one at exactly
  `max_device_batch` (k = 1) included, shares one accumulate/apply pair, so a
  stage switch between such stages runs executables that have already run.
  """

  def __init__(self, *, mesh, model, tx, abstract_state, image_shape,
               max_device_batch: int, ghost_batch_size: int,
               image_dtype=np.float32,
               micro_batch_unroll: int = 0, accumulation: str = "compiled",
               weight_average: bool = False,
               program_cache: program_cache_lib.ProgramCache | None = None,
               memory_limit_bytes: int | None = None,
               on_compiled: Callable[[int, int, float, bool], None]):
    """`on_compiled(batch_size, micro_batches, seconds, loaded)` follows each
    compile; `loaded` is true where `program_cache` supplied the functions.
    A function whose memory by XLA's estimate exceeds `memory_limit_bytes`
    (per device) is a ConfigError naming `max_device_batch`, raised where
    the step is asked for, and printed at once if it compiled in the
    background.
    The cache's context must identify `model` and `tx` (the trainer passes
    the whole config). Batches hold `image` of `image_shape` and
    `image_dtype` (the input pipeline's uint8 for `for_config`)."""
    check_accumulation(accumulation)
    self._mesh, self._model, self._tx = mesh, model, tx
    self._state = abstract_state
    self._image_shape = tuple(image_shape)
    self._image_dtype = np.dtype(image_dtype)
    self._max_device_batch = max_device_batch
    self._ghost = ghost_batch_size
    self._unroll = micro_batch_unroll
    self.accumulation = accumulation
    # The steps take hyper['ema_decay'] too (TrainState.ema_params is set).
    self._weight_average = weight_average
    self._on_compiled = on_compiled
    self._program_cache = program_cache
    self._memory_limit = memory_limit_bytes
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._steps = {}  # Batch size -> its step callable, once compiled.
    self._lock = threading.Lock()
    self._closed = False  # Set by close(): the run is over.
    self._pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="compile")

  @classmethod
  def for_config(cls, config, *, mesh, model, tx, state, **overrides):
    """A compiler of the steps `config` trains with (image shape,
    micro-batching, accumulation, weight averaging from the config), for
    the sharded `state`; keyword arguments replace any of its settings."""
    d = config.dataset
    settings = dict(
        image_shape=(d.image_size, d.image_size, d.channels),
        image_dtype=batches_lib.IMAGE_DTYPE,
        max_device_batch=config.max_device_batch,
        ghost_batch_size=config.ghost_batch_size,
        micro_batch_unroll=config.micro_batch_unroll,
        accumulation=config.accumulation,
        weight_average=config.weight_average == "ema",
        memory_limit_bytes=device_memory_limit(mesh),
        on_compiled=lambda *args: None)
    settings.update(overrides)
    return cls(mesh=mesh, model=model, tx=tx, abstract_state=abstract(state),
               **settings)

  def _abstract_batch(self, batch_size):
    data = mesh_lib.batch_sharding(self._mesh)
    return dict(
        image=jax.ShapeDtypeStruct((batch_size, *self._image_shape),
                                   self._image_dtype, sharding=data),
        label=jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data))

  def _hyper(self, *names):
    scalar = jax.ShapeDtypeStruct((), jnp.float32,
                                  sharding=mesh_lib.replicated(self._mesh))
    if self._weight_average:
      names += ("ema_decay",)
    return {name: scalar for name in names}

  def compile(self, batch_size: int):
    """Lowers and compiles the fused step for `batch_size` (blocking)."""
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
    return fn.lower(self._state, self._abstract_batch(batch_size),
                    self._hyper("learning_rate", "momentum",
                                "bn_decay")).compile()

  def compile_accumulation(self, batch_size: int):
    """Compiles the host-accumulation functions for `batch_size` (blocking).

    Where the per-device batch reaches `max_device_batch` (k >= 1
    micro-batches of it): `init`, `accumulate` (one micro-batch) and
    `apply`, shared by every such batch size. Below it: `single`, the three
    composed into one function for this batch size. Returns a dict of them.
    """
    n = self._mesh.size
    k = micro_batches(batch_size, n, self._max_device_batch, self._ghost)
    m = batch_size // n // k
    replicated = mesh_lib.replicated(self._mesh)
    per_device = NamedSharding(self._mesh, P(mesh_lib.DATA_AXIS))

    def init(state):
      return jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (n, *x.shape)),
          step_lib.init_accumulator(state))

    def accumulate_one_device(accumulators, state, batch):
      own = jax.tree_util.tree_map(lambda x: x[0], accumulators)
      own = step_lib.accumulate_step(own, state, batch, model=self._model)
      return jax.tree_util.tree_map(lambda x: x[None], own)

    # check_vma=False: the gradient of each device's own loss stays local
    # (with checking on, JAX would all-reduce it at every micro-batch).
    accumulate = jax.shard_map(
        accumulate_one_device, mesh=self._mesh,
        in_specs=(P(mesh_lib.DATA_AXIS), P(), P(mesh_lib.DATA_AXIS)),
        out_specs=P(mesh_lib.DATA_AXIS), check_vma=False)
    data = mesh_lib.batch_sharding(self._mesh)
    apply = functools.partial(step_lib.apply_step, tx=self._tx)
    if step_key(batch_size, n, self._max_device_batch, self._ghost,
                "host")[0] == "single":
      # Below max_device_batch no other batch size shares the executables:
      # the three as one function (one dispatch per step, and XLA may
      # overlap the gradients' all-reduce with the backward pass).
      def single(state, batch, hyper):
        return apply(state, accumulate(init(state), state, batch),
                     dict(hyper, micro_batches=jnp.float32(1.0)))
      compiled = dict(single=jax.jit(
          single, in_shardings=(replicated, data, replicated),
          out_shardings=(replicated, replicated), donate_argnums=(0,)).lower(
              self._state, self._abstract_batch(batch_size),
              self._hyper("learning_rate", "momentum", "bn_decay")).compile())
    else:
      abstract_acc = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=per_device),
          jax.eval_shape(init, self._state))
      compiled = dict(
          init=jax.jit(init, in_shardings=(replicated,),
                       out_shardings=per_device).lower(self._state).compile(),
          accumulate=jax.jit(
              accumulate, in_shardings=(per_device, replicated, data),
              out_shardings=per_device, donate_argnums=(0,)).lower(
                  abstract_acc, self._state,
                  self._abstract_batch(n * m)).compile(),
          apply=jax.jit(
              apply, in_shardings=(replicated, per_device, replicated),
              out_shardings=(replicated, replicated), donate_argnums=(0,)).lower(
                  self._state, abstract_acc,
                  self._hyper("learning_rate", "momentum", "bn_decay",
                              "micro_batches")).compile())
    return compiled

  def _key(self, batch_size):
    """What is compiled for `batch_size` (see `micro_batching.step_key`)."""
    return step_key(batch_size, self._mesh.size, self._max_device_batch,
                    self._ghost, self.accumulation)

  _FUNCTIONS = dict(fused=("step",), single=("single",),
                    micro=("init", "accumulate", "apply"))

  def _description(self, key, name) -> str:
    """Everything besides the cache's context that fixes function `name`
    of `key`: shapes, shardings and the compiler's settings."""
    return "\n".join(map(repr, (
        key, name, self._image_shape, self._image_dtype,
        self._max_device_batch, self._ghost,
        self._unroll, self.accumulation, self._weight_average,
        self._mesh.shape, [d.id for d in self._mesh.devices.flat],
        jax.tree_util.tree_structure(self._state),
        jax.tree_util.tree_leaves(self._state))))

  def _build(self, key, batch_size):
    """Loads the functions of `key` from the program cache, or compiles
    (and stores) them; then reports to `on_compiled`."""
    start = time.perf_counter()
    names = self._FUNCTIONS[key[0]]
    cache = self._program_cache
    loaded = {}
    if cache is not None:
      for name in names:
        fn = cache.load(self._description(key, name),
                        devices=self._mesh.devices.flat)
        if fn is None:
          break
        loaded[name] = fn
    from_cache = len(loaded) == len(names)
    hits = program_cache_lib.persistent_cache_hits()
    if from_cache:
      functions = loaded
    elif key[0] == "fused":
      functions = dict(step=self.compile(batch_size))
    else:
      functions = self.compile_accumulation(batch_size)
    self._check_memory(batch_size, functions)
    compiled_here = program_cache_lib.persistent_cache_hits() == hits
    if cache is not None and not from_cache and compiled_here:
      for name in names:
        cache.store(self._description(key, name), functions[name])
    k = micro_batches(batch_size, self._mesh.size, self._max_device_batch,
                      self._ghost)
    self._on_compiled(batch_size, k, time.perf_counter() - start, from_cache)
    return functions

  def _check_memory(self, batch_size, functions) -> None:
    """ConfigError if a function needs more than the device holds (a step
    that would run out of memory at its stage's first step)."""
    if not self._memory_limit:
      return
    for name, fn in functions.items():
      need = memory_bytes(fn)
      if need is not None and need > self._memory_limit:
        raise ConfigError(
            f"B={batch_size}: its {name} function needs {need / 2**30:.2f} "
            f"GiB per device by XLA's estimate, more than the "
            f"{self._memory_limit / 2**30:.2f} GiB the device holds for "
            f"arrays; lower max_device_batch (now {self._max_device_batch}) "
            "to run it as more, smaller micro-batches")

  def _warn_if_failed(self, batch_size, future) -> None:
    """Says at once that a background compile failed (the run stops only
    when it reaches that batch size, hours later on ImageNet). Not once the
    run has ended: a compile still running then fails on the closed
    metrics file, and nothing will use it."""
    if (self._closed or future.cancelled()
        or future.exception() is None):
      return
    error = future.exception()
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(f"warning: the step for B={batch_size} did not compile: {first}; "
          "the run will stop if it reaches that batch size (its last stage "
          "ends in a checkpoint)", file=sys.stderr, flush=True)

  def _submit(self, batch_size, background: bool):
    key = self._key(batch_size)
    with self._lock:
      if key not in self._futures:
        if background:
          self._futures[key] = self._pool.submit(self._build, key, batch_size)
          self._futures[key].add_done_callback(
              functools.partial(self._warn_if_failed, batch_size))
        else:
          done = concurrent.futures.Future()
          done.set_result(self._build(key, batch_size))
          self._futures[key] = done
      return self._futures[key]

  def _in_program_cache(self, batch_size) -> bool:
    key = self._key(batch_size)
    return self._program_cache is not None and all(
        self._program_cache.contains(self._description(key, name))
        for name in self._FUNCTIONS[key[0]])

  def start(self, batch_sizes) -> None:
    """Compiles the first size now and queues the rest in the background;
    sizes the program cache holds load now (a load is short, and in the
    background it would compete with training for the host's cores)."""
    if not batch_sizes:
      return
    first, *rest = batch_sizes
    self._submit(first, background=False)
    for b in rest:
      self._submit(b, background=not self._in_program_cache(b))

  def get(self, batch_size: int):
    """The step for `batch_size`, a callable (state, local batch, hyper) ->
    (state, metrics); waits if it is still compiling."""
    if batch_size in self._steps:
      return self._steps[batch_size]
    compiled = self._submit(batch_size, background=True).result()
    self._steps[batch_size] = self._make_step(batch_size, compiled)
    return self._steps[batch_size]

  def _make_step(self, batch_size, compiled):
    kind = self._key(batch_size)[0]
    if kind == "fused":
      return FusedStep(compiled["step"], self._mesh)
    if kind == "single":
      return FusedStep(compiled["single"], self._mesh)
    n = self._mesh.size
    k = micro_batches(batch_size, n, self._max_device_batch, self._ghost)
    return AccumulatingStep(mesh=self._mesh, micro_batches=k,
                            device_batch=batch_size // n // k, **compiled)

  def close(self) -> None:
    self._closed = True
    self._pool.shutdown(wait=False, cancel_futures=True)
