"""train_and_evaluate: the loop that follows the plan by examples seen."""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import input_pipeline
import models
from trainer import adaptive as adaptive_lib
from trainer import checkpoint as checkpoint_lib
from trainer import compile as compile_lib
from trainer import distributed
from trainer import mesh as mesh_lib
from trainer import metrics as metrics_lib
from trainer import micro_batching
from trainer import noise_scale as noise_scale_lib
from trainer import optimizer as optimizer_lib
from trainer import plan as plan_lib
from trainer import preemption as preemption_lib
from trainer import program_cache as program_cache_lib
from trainer import step as step_lib
from trainer import workdir as workdir_lib


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


# Failures during a run that end it with one line (bad input is ValueError).
RUN_ERRORS = (TrainingDiverged, checkpoint_lib.CheckpointError)


def initial_state_fn(config, model, tx, seed: int):
  """The function that makes the initial TrainState (no arguments)."""
  d = config.dataset

  def init():
    dummy = jnp.zeros((config.ghost_batch_size, d.image_size, d.image_size,
                       d.channels), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), dummy, train=False)
    params = variables["params"]
    ema = (jax.tree_util.tree_map(jnp.copy, params)
           if config.weight_average == "ema" else None)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables["batch_stats"],
                               opt_state=tx.init(params), ema_params=ema)

  return init


def create_train_state(config, model, tx, mesh, seed: int):
  """The initial TrainState, created directly with replicated sharding (the
  key and the example input too: no host-to-device transfer)."""
  return jax.jit(initial_state_fn(config, model, tx, seed),
                 out_shardings=mesh_lib.replicated(mesh))()


@functools.lru_cache(maxsize=256)
def _scalar(value: float, sharding):
  """A float32 scalar on `sharding`, made once per value: with several
  processes every device_put of a host value first checks with the others
  that theirs is equal (a blocking exchange), which the step's ε, m and
  batch-norm decay, fixed within a stage, would cost at every step."""
  return jax.device_put(np.float32(value), sharding)


@dataclasses.dataclass
class _Clock:
  """Examples/s over the window since the last log line, the share of
  that window the loop spent waiting for its next batch, and the seconds it
  waited for a stage's compile."""
  start: float
  examples: int
  input_wait: float = 0.0  # Seconds, added by the loop.
  compile_wait: float = 0.0  # Seconds, added by the loop.

  def rate(self, examples_seen: int, without_compile: bool = False) -> float:
    elapsed = time.perf_counter() - self.start
    if without_compile:
      elapsed -= self.compile_wait
    return (examples_seen - self.examples) / max(elapsed, 1e-9)

  def input_wait_fraction(self) -> float:
    return self.input_wait / max(time.perf_counter() - self.start, 1e-9)

  def reset(self, examples_seen: int) -> None:
    self.start, self.examples = time.perf_counter(), examples_seen
    self.input_wait = self.compile_wait = 0.0


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def evaluate(state, eval_fn, config, mesh, source) -> dict:
  """Loss and accuracy over the whole eval split (padding masked out), with
  `steps_in_flight` batches dispatched before the oldest one's sums are
  read."""
  totals = dict(loss_sum=0.0, correct_sum=0.0, count=0.0)
  in_flight, unread = steps_in_flight(config), collections.deque()

  def read(out):
    out = jax.device_get(out)
    for k in totals:
      totals[k] += float(out[k])

  with input_pipeline.eval_batches(
      config, config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), source=source) as batches:
    for batch in batches:
      unread.append(eval_fn(state, mesh_lib.global_batch(batch, mesh)))
      while len(unread) >= in_flight:
        read(unread.popleft())
  while unread:
    read(unread.popleft())
  count = max(totals["count"], 1.0)
  return dict(eval_loss=totals["loss_sum"] / count,
              eval_accuracy=totals["correct_sum"] / count,
              eval_examples=int(totals["count"]))


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the final record: step, examples_seen, whether the run was
  `preempted`, and the last evaluation.
  """
  is_chief = jax.process_index() == 0
  # The record names what trains: resumed where the platform would resolve
  # them otherwise, the run's config has changed.
  models.resolve_platform_defaults(config)
  # Every check that can fail on bad input runs before the workdir is touched.
  mesh = mesh_lib.make_mesh()
  # Finished stages need not split over this run's devices (a resume on
  # another slice); the restore checks again from where it really starts.
  resume = checkpoint_lib.newest_examples_seen(workdir)
  plan = plan_lib.plan_from_config(config, num_devices=mesh.size,
                                   devices_from_examples=resume)
  _check_eval_batch(config, mesh.size)
  _check_intervals(config)
  steps_in_flight(config)
  compile_lib.check_accumulation(config.accumulation)
  _check_weight_average(config, mesh.size)
  if config.schedule.kind == "adaptive":
    _check_adaptive(config, mesh.size)
  micro_batching.check_batch_sizes(config, plan, mesh.size, resume)
  model = models.create_model(config)
  first = plan.stages[0]
  models.running_stats_decay(first.batch_size, config.bn_momentum,
                             config.bn_momentum_examples)
  tx = optimizer_lib.make_optimizer(config.optimizer,
                                    learning_rate=first.learning_rate,
                                    momentum=first.momentum)
  sources = dict(train=input_pipeline.train_source(config),
                 eval=input_pipeline.eval_source(config))
  input_pipeline.check_sources(config, sources.values())

  workdir_lib.check_config(workdir, config, allow_config_change)
  workdir_lib.prepare(workdir)
  lock = workdir_lib.Lock(workdir) if is_chief else None
  try:
    # Again under the lock: a run that held it may have recorded its config.
    workdir_lib.check_config(workdir, config, allow_config_change)
    return _train(config, workdir, plan, mesh, model, tx, sources, is_chief)
  finally:
    if lock:
      lock.release()


def _train(config, workdir, plan, mesh, model, tx, sources, is_chief):
  """Restores or creates the state, compiles, runs the loop, closes up."""
  cache_dir = compile_lib.compilation_cache_dir(config, workdir)
  compile_lib.enable_compilation_cache(cache_dir)
  programs = (program_cache_lib.ProgramCache(
      os.path.join(cache_dir, "programs"),
      context=workdir_lib.without_host_fields(config))
              if config.program_cache else None)
  replicated = mesh_lib.replicated(mesh)
  state = create_train_state(config, model, tx, mesh, config.seed)
  checkpoints = checkpoint_lib.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps,
      every_minutes=config.checkpoint_every_minutes,
      max_to_keep=config.checkpoints_to_keep,
      keep_steps=_stage_ends(plan))
  # The newest checkpoint's step (the restore may fall back to an older one:
  # a step reported ahead of the loop's is still passed).
  stop_at_start = preemption_lib.report_start(checkpoints.latest_step() or 0)
  examples_seen, wall_time, noise_state, decisions = 0, 0.0, None, []
  try:
    restored = checkpoints.restore(state)
    if restored is not None:
      state, meta = restored
      examples_seen = int(meta["examples_seen"])
      wall_time = float(meta.get("wall_time", 0.0))
      noise_state = meta.get("noise_scale")
      decisions = [(int(x), int(b))
                   for x, b in meta.get("batch_decisions", [])]
      plan = plan_lib.plan_from_config(config, mesh.size, decisions,
                                       devices_from_examples=examples_seen)
      micro_batching.check_batch_sizes(config, plan, mesh.size, examples_seen)
      checkpoints.keep(_stage_ends(plan))
      _check_resume_point(plan, int(state.step), examples_seen,
                          checkpoints.directory)
  except (checkpoint_lib.CheckpointError, ValueError):
    checkpoints.close()
    raise
  if is_chief:  # Only once the checkpoint is known to fit this config.
    workdir_lib.record_config(workdir, config)
  if restored is not None:
    if is_chief:
      print(f"resumed from step {int(state.step)} ({examples_seen} examples "
            f"seen) in {checkpoints.directory}", flush=True)

  writer = metrics_lib.MetricsWriter(
      workdir, enabled=is_chief,
      purge_step=None if restored is None else int(state.step) + 1)
  start_step = int(state.step)
  compiler = compile_lib.StepCompiler.for_config(
      config, mesh=mesh, model=model, tx=tx, state=state,
      program_cache=programs,
      on_compiled=functools.partial(_record_compile, writer, start_step,
                                    is_chief, config.accumulation))
  eval_fn = jax.jit(
      lambda st, b: step_lib.eval_step(st, b, model=model),
      in_shardings=(replicated, mesh_lib.batch_sharding(mesh)),
      out_shardings=replicated)
  stats_fn = jax.jit(
      lambda params, stats, b: step_lib.batch_stats_step(params, stats, b,
                                                         model=model),
      in_shardings=(replicated, replicated, mesh_lib.batch_sharding(mesh)),
      out_shardings=replicated)
  if is_chief:
    print(plan.table(), flush=True)
    print(f"{distributed.describe()}; workdir {workdir}", flush=True)
    for batch_size in plan.batch_sizes_from(examples_seen):
      k = compile_lib.micro_batches(batch_size, mesh.size,
                                    config.max_device_batch,
                                    config.ghost_batch_size)
      print(f"B={batch_size}: {batch_size // mesh.size} examples per device "
            f"in {k} micro-batch(es)", flush=True)

  preemption = preemption_lib.PreemptionWatcher(requested=stop_at_start)
  try:
    noise = noise_scale_lib.NoiseScaleTracker.from_state(
        noise_state, noise_scale_lib.horizon_decay(
            plan.stages[0].batch_size,
            config.noise_scale_horizon_epochs * plan.num_train_examples))
    final = _run(config, plan, state, examples_seen, wall_time, noise,
                 decisions, mesh, compiler, eval_fn, stats_fn, checkpoints,
                 writer, is_chief, sources, preemption)
  finally:
    preemption.close()
    compiler.close()
    writer.close()
    checkpoints.close()  # Waits for the last save; raises if it failed.
  seconds = final.pop("wall_time")
  if is_chief:
    _print_end(final, seconds, start_step, plan, writer.path,
               checkpoints.directory, preemption.reason)
  return final


def _print_end(final, seconds, start_step, plan, metrics_path, checkpoint_dir,
               reason):
  """The run's last line(s): stopped, already complete, or done."""
  where = f"metrics in {metrics_path}, checkpoints in {checkpoint_dir}"
  if final["preempted"]:
    print(f"{reason}: saved step {final['step']} in {checkpoint_dir}; rerun "
          f"the same command to resume\n{where}", flush=True)
  elif final["step"] == start_step:
    print(f"already complete: {final['step']}/{plan.total_updates} updates; "
          f"{where}", flush=True)
  else:
    accuracy = (f", eval accuracy {final['eval_accuracy']:.4f}"
                if "eval_accuracy" in final else "")
    print(f"done: {final['step']} updates, {final['examples_seen']:,} "
          f"examples in {_format_eta(seconds)} of training"
          f"{accuracy}; {where}", flush=True)


def _record_compile(writer, step, is_chief, accumulation, batch_size,
                    micro_batches, seconds, loaded):
  writer.write("compile", step, batch_size=batch_size,
               micro_batches=micro_batches, compile_seconds=seconds,
               from_program_cache=loaded)
  if is_chief:
    shared = (", shared by every larger B"
              if accumulation == "host" and micro_batches > 1 else "")
    how = "loaded from the program cache" if loaded else "compiled"
    print(f"{how}: the train step for B={batch_size} ({micro_batches} "
          f"micro-batch(es){shared}) in {seconds:.1f}s", flush=True)


def _update_noise_scale(noise, metrics, batch_size, num_devices,
                        horizon_examples):
  """Folds this step's gradient norms into `noise`; B_simple or None.

  Needs the per-device norms of host accumulation and more than one device
  (one device's batch is the global batch: no second batch size).
  """
  if "grad_sq_small" not in metrics or num_devices < 2:
    return None
  return noise.update(float(metrics["grad_sq_small"]),
                      float(metrics["grad_sq_big"]),
                      batch_size / num_devices, batch_size,
                      decay=noise_scale_lib.horizon_decay(batch_size,
                                                          horizon_examples))


def _peak_host_memory_mb() -> float:
  """This process's peak resident memory so far (MiB; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def averaged_weights_state(state, stats_fn, config, mesh, source):
  """`state` with the averaged weights and batch statistics recomputed for
  them: the mean ghost-batch statistics of the first `ema_bn_batches` full
  batches of training examples (unaugmented) under those weights."""
  batch_size = _bn_batch_size(config, mesh.size)
  # Counted from the split's size, the same on every process (a process's
  # own padding mask is not: its slice of the last batch may be full while
  # another's is padded, and stats_fn is one program across processes).
  num_batches = min(config.ema_bn_batches, len(source) // batch_size)
  if not num_batches:
    raise compile_lib.ConfigError(
        f"weight averaging: the training split has no full batch of "
        f"{batch_size} examples to recompute batch-norm statistics from")
  total, count = None, 0
  with input_pipeline.eval_batches(
      config, batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), source=source) as batches:
    for batch in batches:
      if count == num_batches:
        break
      stats = stats_fn(state.ema_params, state.batch_stats,
                       mesh_lib.global_batch(batch, mesh))
      total = stats if total is None else jax.tree_util.tree_map(
          jnp.add, total, stats)
      count += 1
  return state.replace(
      params=state.ema_params,
      batch_stats=jax.tree_util.tree_map(
          lambda x: x / _scalar(count, x.sharding), total))


def _bn_batch_size(config, num_devices) -> int:
  """ema_bn_batch_size rounded down to whole ghost batches on every device."""
  unit = num_devices * config.ghost_batch_size
  return unit * max(1, config.ema_bn_batch_size // unit)


def _check_weight_average(config, num_devices):
  if config.weight_average not in ("none", "ema"):
    raise compile_lib.ConfigError(
        f"weight_average={config.weight_average!r} is not one of none, ema")
  if config.weight_average == "ema":
    if config.ema_horizon_epochs <= 0:
      raise compile_lib.ConfigError(
          f"ema_horizon_epochs={config.ema_horizon_epochs} must be positive")
    if config.ema_bn_batches < 1:
      raise compile_lib.ConfigError(
          f"ema_bn_batches={config.ema_bn_batches} must be at least 1")
    batch_size = _bn_batch_size(config, num_devices)
    n = config.dataset.num_train_examples
    if batch_size > n:
      raise compile_lib.ConfigError(
          f"weight averaging recomputes batch-norm statistics on batches of "
          f"{batch_size} examples (ema_bn_batch_size), more than "
          f"dataset.num_train_examples={n}; lower ema_bn_batch_size")


def _check_adaptive(config, num_devices):
  """The adaptive schedule needs the noise scale: host accumulation, 2+
  devices, and every size it may pick must fit the dataset."""
  if config.accumulation != "host":
    raise compile_lib.ConfigError(
        "schedule.kind='adaptive' measures the noise scale from per-device "
        "gradients: set accumulation='host'")
  if num_devices < 2:
    raise compile_lib.ConfigError(
        "schedule.kind='adaptive' needs at least 2 devices to measure the "
        "noise scale (on CPU: XLA_FLAGS=--xla_force_host_platform_device_"
        "count=8)")
  n = config.dataset.num_train_examples
  if config.schedule.max_batch > n:
    raise compile_lib.ConfigError(
        f"schedule.max_batch={config.schedule.max_batch} exceeds "
        f"dataset.num_train_examples={n}")


def steps_in_flight(config) -> int:
  """`config.steps_in_flight`, or where unset 1 on the CPU and 2 elsewhere."""
  n = config.steps_in_flight
  if n is None:
    return 1 if jax.default_backend() == "cpu" else 2
  if n not in (1, 2):
    raise compile_lib.ConfigError(
        f"steps_in_flight={n} must be 1 (read each step's metrics before the "
        "next) or 2 (one step ahead); unset: 1 on the CPU, 2 elsewhere")
  return n


def _check_eval_batch(config, num_devices):
  b = config.eval_batch_size
  if b <= 0 or b % num_devices:
    raise compile_lib.ConfigError(
        f"eval_batch_size={b} must be a positive multiple of the device "
        f"count {num_devices}")


def _check_resume_point(plan, step: int, examples_seen: int, directory: str):
  """ConfigError unless `plan` reaches `examples_seen` at update `step`,
  as the plan the checkpoint was saved under did. A schedule changed under
  --allow_config_change before that point would renumber the updates (the
  count the paper compares) and reuse the saved steps' names."""
  where = (f"the checkpoint at step {step} ({examples_seen} examples seen) "
           f"in {directory}")
  if examples_seen > plan.total_examples:
    raise compile_lib.ConfigError(
        f"{where} is past the end of this config's plan "
        f"({plan.total_examples} examples, {plan.total_updates} updates)")
  if (step > plan.total_updates
      or plan.examples_at_step(step) != examples_seen):
    raise compile_lib.ConfigError(
        f"{where} does not fit this config's plan, whose step {step} "
        + (f"starts at {plan.examples_at_step(step)} examples"
           if step <= plan.total_updates else "does not exist")
        + ": its stages before the checkpoint differ; change the schedule "
        "only after the checkpoint's position, or use a new --workdir")


def _stage_ends(plan) -> list[int]:
  """The steps that end the plan's stages, whose checkpoints are kept."""
  return [s.start_step + s.num_steps for s in plan.stages]


def _check_intervals(config):
  """How often the run logs, evaluates and saves, and the noise scale's
  horizon: refused before any work, not at the first step that divides by
  it."""
  for name in ("log_every_steps", "checkpoint_every_steps",
               "checkpoints_to_keep"):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise compile_lib.ConfigError(f"{name}={value!r} must be a whole number ≥ 1")
  if not config.eval_every_epochs > 0:
    raise compile_lib.ConfigError(
        f"eval_every_epochs={config.eval_every_epochs} must be positive")
  if not config.noise_scale_horizon_epochs > 0:
    raise compile_lib.ConfigError(
        f"noise_scale_horizon_epochs={config.noise_scale_horizon_epochs} "
        "must be positive")
  if not config.checkpoint_every_minutes >= 0:
    raise compile_lib.ConfigError(
        f"checkpoint_every_minutes={config.checkpoint_every_minutes} must be "
        "≥ 0 (0 turns the timer off)")


def _step_hyper(config, pos, num_train_examples, sharding) -> dict:
  """The plan's scalars for the step at `pos`, as replicated arrays."""
  hyper = dict(
      learning_rate=pos.learning_rate, momentum=pos.momentum,
      bn_decay=models.running_stats_decay(pos.batch_size, config.bn_momentum,
                                          config.bn_momentum_examples))
  if config.weight_average == "ema":
    hyper["ema_decay"] = step_lib.weight_average_decay(
        pos.batch_size, config.ema_horizon_epochs * num_train_examples)
  return {k: _scalar(v, sharding) for k, v in hyper.items()}


def _evaluations(state, eval_fn, stats_fn, config, mesh, sources) -> dict:
  """The raw weights' evaluation, and the averaged weights' (as ema_*)."""
  out = evaluate(state, eval_fn, config, mesh, sources["eval"])
  if config.weight_average == "ema":
    averaged = averaged_weights_state(state, stats_fn, config, mesh,
                                      sources["train"])
    out.update({f"ema_{k}": v for k, v in evaluate(
        averaged, eval_fn, config, mesh, sources["eval"]).items()
                if k != "eval_examples"})
  return out


def _check_finite(metrics, step, pos, checkpoints) -> None:
  """Raises TrainingDiverged, naming the last checkpoint, on a NaN or
  infinite training loss."""
  loss = float(metrics["train_loss"])
  if math.isfinite(loss):
    return
  latest = checkpoints.latest_step()
  # The loss of step t is computed from the state after t-1 updates: the
  # checkpoint just before it may hold the weights that diverged.
  where = ("no checkpoint yet" if latest is None else
           f"last checkpoint: step {latest} in {checkpoints.directory} (its "
           "weights may already be diverging: resumed unchanged, the run "
           "may fail the same way)")
  raise TrainingDiverged(
      f"non-finite loss {loss} at step {step} "
      f"(stage {pos.stage}, B={pos.batch_size}); {where}")


def _log_train(writer, is_chief, plan, pos, step, examples_seen, metrics,
               noise_scale, clock, run_start, **timings) -> None:
  """Writes the `train` record of this step (examples/s over the window
  since the last one, which `clock` restarts) and prints its progress line
  with the ETA on the chief."""
  n = plan.num_train_examples
  rate, input_wait = clock.rate(examples_seen), clock.input_wait_fraction()
  # A compile waited for happens once: the time left runs at the rest's rate.
  eta_rate = clock.rate(examples_seen, without_compile=True)
  compile_wait = clock.compile_wait
  clock.reset(examples_seen)
  record = dict(
      examples_seen=examples_seen, epoch=examples_seen / n,
      stage=pos.stage, batch_size=pos.batch_size,
      learning_rate=pos.learning_rate, momentum=pos.momentum,
      noise_scale=pos.noise_scale,
      **{k: float(v) for k, v in metrics.items()},
      **({} if noise_scale is None else dict(grad_noise_scale=noise_scale)),
      examples_per_second=rate, input_wait_fraction=input_wait,
      compile_wait=compile_wait, **timings,
      peak_host_memory_mb=_peak_host_memory_mb(),
      wall_time=time.perf_counter() - run_start)
  writer.write("train", step, **record)
  if is_chief:
    eta = (plan.total_examples - examples_seen) / max(eta_rate, 1e-9)
    print(f"step {step}/{plan.total_updates} epoch {examples_seen / n:.2f} "
          f"stage {pos.stage} B={pos.batch_size} "
          f"lr={pos.learning_rate:.4g} "
          f"loss {record['train_loss']:.4f} "
          f"acc {record['train_accuracy']:.3f} {rate:,.0f} ex/s "
          f"input wait {input_wait:.0%} ETA {_format_eta(eta)}", flush=True)


def _decide_batch(writer, is_chief, schedule, batch0, pos, step,
                  examples_seen, n, noise_scale) -> int:
  """The adaptive schedule's batch size from here on, recorded (and
  printed on the chief when it changes)."""
  batch = adaptive_lib.decide(schedule, batch0, pos.batch_size, noise_scale)
  writer.write("batch_decision", step, examples_seen=examples_seen,
               epoch=examples_seen / n, grad_noise_scale=noise_scale,
               previous_batch_size=pos.batch_size, batch_size=batch)
  if is_chief and batch != pos.batch_size:
    print(f"adaptive: B {pos.batch_size} → {batch} at epoch "
          f"{examples_seen / n:.2f} (B_simple {noise_scale:.1f})", flush=True)
  return batch


def _log_eval(writer, is_chief, step, examples_seen, n, run_start,
              evaluation) -> None:
  """Writes the `eval` record and prints its line on the chief."""
  writer.write("eval", step, examples_seen=examples_seen,
               epoch=examples_seen / n,
               wall_time=time.perf_counter() - run_start, **evaluation)
  if is_chief:
    ema = (f" (EMA weights: {evaluation['ema_eval_accuracy']:.4f})"
           if "ema_eval_accuracy" in evaluation else "")
    print(f"eval at epoch {examples_seen / n:.2f}: "
          f"loss {evaluation['eval_loss']:.4f} "
          f"accuracy {evaluation['eval_accuracy']:.4f}{ema}", flush=True)


@dataclasses.dataclass
class _Dispatched:
  """A step handed to the devices whose metrics the host has not read."""
  plan: plan_lib.Plan
  pos: plan_lib.Position
  metrics: dict  # Device arrays until read.
  start: float  # When the host began the step (compile wait included).


class _StepReader:
  """Reads dispatched steps' metrics in order: the finite-loss check, the
  noise scale and the `train` record.

  A step's `step_time` runs from its start, or from the previous step's
  metrics arriving if that was later (the step was queued behind it),
  to its own metrics arriving: the device's step time when steps overlap.
  """

  def __init__(self, config, mesh, noise, checkpoints, writer, is_chief,
               clock, run_start):
    self._config, self._mesh, self._noise = config, mesh, noise
    self._checkpoints, self._writer = checkpoints, writer
    self._is_chief, self._clock, self._run_start = is_chief, clock, run_start
    self._last_read = -math.inf

  def read(self, d: _Dispatched) -> float | None:
    """Waits for `d`'s metrics, checks and logs them; returns B_simple (or
    None)."""
    metrics = jax.device_get(d.metrics)
    now = time.perf_counter()
    step_time = now - max(d.start, self._last_read)
    self._last_read = now
    pos, n = d.pos, d.plan.num_train_examples
    examples_seen, step = pos.examples_seen + pos.batch_size, pos.step + 1
    _check_finite(metrics, step, pos, self._checkpoints)
    noise_scale = _update_noise_scale(
        self._noise, metrics, pos.batch_size, self._mesh.size,
        self._config.noise_scale_horizon_epochs * n)
    stage_end = examples_seen >= d.plan.stages[pos.stage].end_examples
    if step % self._config.log_every_steps == 0 or stage_end:
      _log_train(self._writer, self._is_chief, d.plan, pos, step,
                 examples_seen, metrics, noise_scale, self._clock,
                 self._run_start, step_time=step_time)
    return noise_scale


def _run(config, plan, state, examples_seen, wall_time, noise, decisions,
         mesh, compiler, eval_fn, stats_fn, checkpoints, writer, is_chief,
         sources, preemption):
  """The step loop; `wall_time` (seconds) continues a resumed run's clock.

  With `steps_in_flight` at 2 the host dispatches step t+1 before it
  reads step t's metrics, so its per-step work (the next batch, its copy to
  the devices, logging) overlaps the devices' compute. Steps that end a
  stage, evaluate, decide the batch or save are read before the next one is
  dispatched: the state they act on is the one their metrics describe.

  An adaptive schedule's batch decision ends the input stream and starts a
  new one, from the same example, with the replanned batch sizes.
  """
  n = plan.num_train_examples
  s = config.schedule
  adaptive = s.kind == "adaptive"
  batch0 = plan.stages[0].batch_size
  decide_every = max(1, round(s.adaptive_every_epochs * n))
  next_decide = adaptive_lib.next_decision(examples_seen, decide_every)
  replicated = mesh_lib.replicated(mesh)
  eval_every = max(1, round(config.eval_every_epochs * n))
  next_eval = (examples_seen // eval_every + 1) * eval_every
  # Every size the schedule may pick, compiled ahead.
  compiler.start(micro_batching.batch_sizes_to_run(config, plan,
                                                   examples_seen))
  run_start = time.perf_counter() - wall_time
  clock = _Clock(time.perf_counter(), examples_seen)
  reader = _StepReader(config, mesh, noise, checkpoints, writer, is_chief,
                       clock, run_start)
  in_flight = steps_in_flight(config)
  last_eval, preempted, replanned, unread = {}, False, True, None
  while replanned and not preempted:
    replanned = False
    with input_pipeline.train_batches(
        config, plan, start_examples=examples_seen,
        process_index=jax.process_index(),
        process_count=jax.process_count(), source=sources["train"]) as stream:
      while True:
        waited = time.perf_counter()
        local = next(stream, None)
        if local is None:
          break
        clock.input_wait += time.perf_counter() - waited
        pos = plan.at(local["examples_seen"])
        start = time.perf_counter()
        step_fn = compiler.get(pos.batch_size)
        clock.compile_wait += time.perf_counter() - start
        state, metrics = step_fn(state, local,
                                 _step_hyper(config, pos, n, replicated))
        dispatched = _Dispatched(plan, pos, metrics, start)
        if unread is not None:  # The previous step; this one queues behind.
          reader.read(unread)
          unread = None
        examples_seen = pos.examples_seen + pos.batch_size
        step = pos.step + 1
        stage_end = examples_seen >= plan.stages[pos.stage].end_examples
        done = examples_seen >= plan.total_examples
        decide = (adaptive and examples_seen >= next_decide and not done)
        evaluate_now = examples_seen >= next_eval or done
        preempted = preemption.should_stop(step)
        save = stage_end or done or preempted or checkpoints.due(step)
        if in_flight > 1 and not (decide or evaluate_now or save):
          unread = dispatched
          continue
        noise_scale = reader.read(dispatched)
        if decide:
          next_decide = adaptive_lib.next_decision(examples_seen, decide_every)
          batch = _decide_batch(writer, is_chief, s, batch0, pos, step,
                                examples_seen, n, noise_scale)
          if batch != pos.batch_size:
            decisions.append((examples_seen, batch))
            plan = plan_lib.plan_from_config(
                config, mesh.size, decisions,
                devices_from_examples=examples_seen)
            checkpoints.keep(_stage_ends(plan))
            replanned = save = True
        if evaluate_now:
          next_eval = (examples_seen // eval_every + 1) * eval_every
          last_eval = _evaluations(state, eval_fn, stats_fn, config, mesh,
                                   sources)
          _log_eval(writer, is_chief, step, examples_seen, n, run_start,
                    last_eval)
          clock.reset(examples_seen)  # Evaluation time is not training time.
        if save:
          checkpoints.save(step, state, dict(
              examples_seen=examples_seen, step=step, stage=pos.stage,
              wall_time=time.perf_counter() - run_start,
              noise_scale=noise.state_dict(),
              batch_decisions=[list(d) for d in decisions]))
          writer.sync()
        if preempted or replanned:
          break
  if unread is not None:  # Only if the stream ended before the plan did.
    reader.read(unread)
  return dict(step=int(state.step), examples_seen=examples_seen,
              preempted=preempted,
              wall_time=time.perf_counter() - run_start, **last_eval)
