"""The schedule planner: where the batch size changes.

Turns `config.schedule` into stages that cover ranges of *examples seen*
(steps per epoch change with B, so examples are the clock). Pure Python: a
dry run needs no accelerator.

    python -m trainer.plan --config=configs/cifar10_increase_batch.py
    python -m trainer.plan --config=configs/fashion_mnist.py:smoke --json plan.json

The noise scale of SGD with momentum is g = ε/(1-m) · (N/B - 1) (ε learning
rate, m momentum, N training examples, B global batch). Every schedule divides
g by `decay_factor` at each milestone:

* `decay_lr`: B fixed, ε ÷ factor.
* `increase_batch`: ε fixed, B × factor (the paper's rule).
* `hybrid`: B × factor until `max_batch`; from the cap on, B stays and ε is
  chosen so that g falls by exactly the factor at each milestone.
* `adaptive`: B follows the measured gradient noise scale during training
  (trainer/adaptive.py); its plan is rebuilt from the batch decisions made
  so far, the last one running to the end.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
from typing import Sequence

from trainer import micro_batching

SCHEDULE_KINDS = ("decay_lr", "increase_batch", "hybrid", "adaptive")
ADAPTIVE_LR_RULES = ("constant", "linear")


class PlanError(ValueError):
  """A schedule that cannot be planned; the message names the field."""


def noise_scale(learning_rate: float, momentum: float, num_examples: int,
                batch_size: int) -> float:
  """g = ε/(1-m) · (N/B - 1), the SGD noise scale (N, B in examples)."""
  return learning_rate / (1.0 - momentum) * (num_examples / batch_size - 1.0)


@dataclasses.dataclass(frozen=True)
class Stage:
  """A constant-batch range of training, `num_steps` updates of `batch_size`.

  `start_epoch`/`end_epoch` are the nominal milestones; `start_examples` and
  `end_examples` (exclusive) are where the steps really fall, since a stage
  runs whole steps until its milestone is reached.
  """
  index: int
  start_epoch: float
  end_epoch: float
  start_examples: int
  end_examples: int
  start_step: int
  num_steps: int
  batch_size: int
  learning_rate: float  # Peak ε, before warm-up.
  momentum: float
  noise_scale: float  # g at the peak ε.


@dataclasses.dataclass(frozen=True)
class Position:
  """What the plan fixes for the step that starts at `examples_seen`."""
  examples_seen: int
  step: int
  epoch: float
  stage: int
  batch_size: int
  learning_rate: float  # Warm-up included.
  momentum: float
  noise_scale: float  # With the warmed-up ε.


@dataclasses.dataclass(frozen=True)
class Plan:
  """The stages of a run and the answers that depend on examples seen."""
  kind: str
  num_train_examples: int
  warmup_examples: int
  stages: tuple[Stage, ...]
  warmup_start_learning_rate: float = 0.0  # ε where warm-up begins.

  @property
  def total_updates(self) -> int:
    return sum(s.num_steps for s in self.stages)

  @property
  def total_examples(self) -> int:
    """Examples seen when the last step ends (≥ num_epochs · N)."""
    return self.stages[-1].end_examples

  @property
  def batch_sizes(self) -> tuple[int, ...]:
    """Distinct global batch sizes, in order of first use."""
    return self.batch_sizes_from(0)

  def batch_sizes_from(self, examples_seen: int) -> tuple[int, ...]:
    """Distinct batch sizes of the stages still to run at `examples_seen`
    (a resumed run's position), in order of first use."""
    return tuple(dict.fromkeys(s.batch_size for s in self.stages
                               if s.end_examples > examples_seen))

  def stage_at(self, examples_seen: int) -> Stage:
    if not 0 <= examples_seen < self.total_examples:
      raise ValueError(
          f"examples_seen={examples_seen} is outside the plan "
          f"[0, {self.total_examples})")
    starts = [s.start_examples for s in self.stages]
    return self.stages[bisect.bisect_right(starts, examples_seen) - 1]

  def learning_rate_at(self, examples_seen: int) -> float:
    """ε for the step starting at `examples_seen`, linear warm-up included.

    Warm-up rises linearly in examples seen from ε_start
    (`warmup_start_learning_rate`, 0 unless set) to ε: the step that brings
    examples seen to x + B uses ε_start + (ε - ε_start) · (x + B) / W, W =
    warmup_examples, so the step that completes warm-up is the first at
    full ε.
    """
    stage = self.stage_at(examples_seen)
    if examples_seen >= self.warmup_examples:
      return stage.learning_rate
    done = min(1.0, (examples_seen + stage.batch_size) / self.warmup_examples)
    start = self.warmup_start_learning_rate
    return start + (stage.learning_rate - start) * done

  def at(self, examples_seen: int) -> Position:
    """Everything the plan fixes for the step starting at `examples_seen`."""
    stage = self.stage_at(examples_seen)
    lr = self.learning_rate_at(examples_seen)
    return Position(
        examples_seen=examples_seen,
        step=stage.start_step
        + (examples_seen - stage.start_examples) // stage.batch_size,
        epoch=examples_seen / self.num_train_examples,
        stage=stage.index,
        batch_size=stage.batch_size,
        learning_rate=lr,
        momentum=stage.momentum,
        noise_scale=noise_scale(lr, stage.momentum, self.num_train_examples,
                                stage.batch_size))

  def examples_at_step(self, step: int) -> int:
    """Examples seen before update `step` (0-based) starts."""
    if not 0 <= step <= self.total_updates:
      raise ValueError(f"step={step} is outside the plan [0, {self.total_updates}]")
    for stage in self.stages:
      if step < stage.start_step + stage.num_steps:
        return stage.start_examples + (step - stage.start_step) * stage.batch_size
    return self.total_examples

  def at_step(self, step: int) -> Position:
    return self.at(self.examples_at_step(step))

  def to_json(self) -> dict:
    return dict(
        kind=self.kind,
        num_train_examples=self.num_train_examples,
        warmup_examples=self.warmup_examples,
        warmup_start_learning_rate=self.warmup_start_learning_rate,
        stages=[dataclasses.asdict(s) for s in self.stages],
        total_updates=self.total_updates,
        total_examples=self.total_examples)

  def table(self) -> str:
    """The plan as a fixed-width text table, one row per stage."""
    header = ("stage", "epochs", "examples", "B", "lr", "momentum",
              "noise_scale", "steps")
    rows = [header]
    for s in self.stages:
      rows.append((
          str(s.index), f"{s.start_epoch:g}-{s.end_epoch:g}",
          f"{s.start_examples}-{s.end_examples}", str(s.batch_size),
          f"{s.learning_rate:.4g}", f"{s.momentum:g}", f"{s.noise_scale:.4g}",
          str(s.num_steps)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    warmup = self.warmup_examples / self.num_train_examples
    start = (f" from lr {self.warmup_start_learning_rate:.4g}"
             if self.warmup_start_learning_rate and warmup else "")
    lines.append(
        f"{self.kind}: N={self.num_train_examples}, warm-up {warmup:g} "
        f"epochs{start}, "
        f"total updates {self.total_updates}"
        + (" if B grows no further (B follows the measured noise scale)"
           if self.kind == "adaptive" else ""))
    return "\n".join(lines)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise PlanError(message)


def _check_numbers(s) -> None:
  """Every number of the schedule is a finite int or float."""
  for key, value in s.items():
    if key in ("kind", "adaptive_lr_rule") or value is None:
      continue
    items = value if isinstance(value, (tuple, list)) else (value,)
    _require(all(isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v) for v in items),
             f"schedule.{key}={value!r} must be "
             + ("finite numbers" if items is value else "a finite number"))


def _check_schedule(s, num_train_examples: int) -> None:
  _check_numbers(s)
  _require(s.kind in SCHEDULE_KINDS,
           f"schedule.kind={s.kind!r} is unknown; choose one of "
           f"{', '.join(SCHEDULE_KINDS)}")
  _require(num_train_examples > 0,
           f"dataset.num_train_examples={num_train_examples} must be positive")
  _require(s.num_epochs > 0, f"schedule.num_epochs={s.num_epochs} must be positive")
  _require(s.learning_rate > 0,
           f"schedule.learning_rate={s.learning_rate} must be positive")
  _require(s.batch_size > 0, f"schedule.batch_size={s.batch_size} must be positive")
  _require(0 <= s.momentum < 1,
           f"schedule.momentum={s.momentum} must be in [0, 1)")
  _require(s.decay_factor > 1,
           f"schedule.decay_factor={s.decay_factor} must be greater than 1")
  _require(s.warmup_epochs >= 0,
           f"schedule.warmup_epochs={s.warmup_epochs} must not be negative")
  _require(s.warmup_epochs <= s.num_epochs,
           f"schedule.warmup_epochs={s.warmup_epochs} exceeds "
           f"schedule.num_epochs={s.num_epochs}")
  _require(s.warmup_start_learning_rate >= 0,
           f"schedule.warmup_start_learning_rate={s.warmup_start_learning_rate} "
           "must not be negative")
  # The adaptive schedule has no milestones (B follows the noise scale).
  m = [] if s.kind == "adaptive" else list(s.milestones_epochs)
  _require(all(a < b for a, b in zip(m, m[1:])),
           f"schedule.milestones_epochs={tuple(m)} must be strictly increasing")
  _require(all(0 < x < s.num_epochs for x in m),
           f"schedule.milestones_epochs={tuple(m)} must lie inside "
           f"(0, num_epochs={s.num_epochs:g})")
  if s.max_batch is not None:
    _require(s.max_batch > 0, f"schedule.max_batch={s.max_batch} must be positive")
  if s.kind in ("hybrid", "adaptive"):
    _require(s.max_batch is not None,
             f"schedule.max_batch must be set for schedule.kind={s.kind!r}")
  if s.kind == "adaptive":
    _require(s.adaptive_every_epochs > 0,
             f"schedule.adaptive_every_epochs={s.adaptive_every_epochs} must "
             "be positive")
    _require(s.adaptive_scale > 0,
             f"schedule.adaptive_scale={s.adaptive_scale} must be positive")
    _require(isinstance(s.adaptive_growth, int) and s.adaptive_growth >= 2,
             f"schedule.adaptive_growth={s.adaptive_growth!r} must be an "
             "integer ≥ 2 (batch sizes stay whole multiples of B0)")
    _require(s.adaptive_lr_rule in ADAPTIVE_LR_RULES,
             f"schedule.adaptive_lr_rule={s.adaptive_lr_rule!r} is unknown; "
             f"choose one of {', '.join(ADAPTIVE_LR_RULES)}")
  has_ref = (s.reference_learning_rate is not None,
             s.reference_momentum is not None)
  _require(all(has_ref) or not any(has_ref),
           "schedule.reference_learning_rate and schedule.reference_momentum "
           "must be set together")
  if all(has_ref):
    _require(s.reference_learning_rate > 0,
             f"schedule.reference_learning_rate={s.reference_learning_rate} "
             "must be positive")
    _require(0 <= s.reference_momentum < 1,
             f"schedule.reference_momentum={s.reference_momentum} must be in [0, 1)")
    _require(s.linear_scaling_batch is None,
             "schedule.linear_scaling_batch and schedule.reference_* both "
             "scale the start; set only one")
  if s.linear_scaling_batch is not None:
    _require(s.linear_scaling_batch > 0,
             f"schedule.linear_scaling_batch={s.linear_scaling_batch} must be positive")


def _initial_point(s, ghost_batch_size: int) -> tuple[int, float]:
  """B0 and ε0 after the paper's scaling knobs and the cap."""
  lr = float(s.learning_rate)
  batch = s.batch_size
  if s.reference_learning_rate is not None:
    # B ∝ ε/(1-m) keeps g fixed; round to whole ghost batches.
    exact = (s.batch_size * lr / s.reference_learning_rate
             * (1 - s.reference_momentum) / (1 - s.momentum))
    batch = max(1, round(exact / ghost_batch_size)) * ghost_batch_size
  if s.max_batch is not None and batch > s.max_batch:
    if s.linear_scaling_batch is None:
      lr *= s.max_batch / batch  # Keep ε/B, hence g, at the cap.
    batch = s.max_batch
  if s.linear_scaling_batch is not None:
    # ε ∝ B already: the capped B0 alone sets it (scaling it for the cap as
    # well would halve ε twice).
    lr *= batch / s.linear_scaling_batch
  return batch, lr


def _stage_points(s, num_train_examples: int, batch: int, lr: float):
  """(B, ε) of every stage, the noise falling by decay_factor at each."""
  points = [(batch, lr)]
  for _ in s.milestones_epochs:
    batch, lr = points[-1]
    if s.kind == "decay_lr":
      points.append((batch, lr / s.decay_factor))
      continue
    grown = int(round(batch * s.decay_factor))
    if s.max_batch is None or grown <= s.max_batch:
      points.append((grown, lr))
      continue
    _require(s.kind == "hybrid",
             f"schedule.max_batch={s.max_batch} stops batch growth at B={batch} "
             "under schedule.kind='increase_batch'; use kind='hybrid' to decay "
             "the learning rate beyond the cap")
    capped = max(batch, s.max_batch)
    target = noise_scale(lr, s.momentum, num_train_examples, batch) / s.decay_factor
    per_lr = noise_scale(1.0, s.momentum, num_train_examples, capped)
    points.append((capped, target / per_lr))
  return points


def build_plan(schedule, *, num_train_examples: int, ghost_batch_size: int,
               num_devices: int = 1,
               decisions: Sequence[tuple[int, int]] = (),
               devices_from_examples: int = 0) -> Plan:
  """Plans `schedule` (a config.schedule) over N=`num_train_examples`.

  Every global batch must split into `num_devices` equal shares, each a whole
  number of ghost batches: every stage's that ends after
  `devices_from_examples` (a resumed run's position: finished stages need
  not split over its devices). Raises PlanError naming the field at fault.
  `decisions` ((examples_seen, B) pairs, kind='adaptive' only) are the
  batch changes made so far during training.
  """
  s = schedule
  _check_schedule(s, num_train_examples)
  _require(ghost_batch_size > 0,
           f"ghost_batch_size={ghost_batch_size} must be positive")
  _require(num_devices > 0, f"num_devices={num_devices} must be positive")
  batch, lr = _initial_point(s, ghost_batch_size)
  _require(s.warmup_start_learning_rate <= lr,
           f"schedule.warmup_start_learning_rate={s.warmup_start_learning_rate} "
           f"exceeds the first stage's ε={lr:.4g}, which warm-up rises to")
  n = num_train_examples
  if s.kind == "adaptive":
    plan = _adaptive_plan(s, n, batch, lr, decisions or (), ghost_batch_size)
  else:
    plan = _milestone_plan(s, n, batch, lr, decisions, ghost_batch_size)
  for stage in plan.stages:
    if stage.end_examples > devices_from_examples:
      _check_split(stage.index, stage.batch_size, ghost_batch_size,
                   num_devices)
  return plan


def _milestone_plan(s, n: int, batch: int, lr: float, decisions,
                    ghost_batch_size: int) -> Plan:
  """Stages between the schedule's milestones."""
  _require(not decisions, f"batch decisions are only for kind='adaptive', "
           f"not {s.kind!r}")
  points = _stage_points(s, n, batch, lr)

  bounds = [0.0, *map(float, s.milestones_epochs), float(s.num_epochs)]
  stages = []
  start_examples = start_step = 0
  for i, (batch, lr) in enumerate(points):
    _check_fits(i, batch, n)  # The split over devices: in build_plan.
    end_target = math.ceil(bounds[i + 1] * n)
    _require(start_examples < end_target,
             f"stage {i} (epochs {bounds[i]:g}-{bounds[i + 1]:g}) is empty: the "
             f"previous stage's batch overshoots it; space schedule.milestones_epochs "
             "by more than one batch")
    num_steps = -(-(end_target - start_examples) // batch)
    stages.append(Stage(
        index=i, start_epoch=bounds[i], end_epoch=bounds[i + 1],
        start_examples=start_examples,
        end_examples=start_examples + num_steps * batch,
        start_step=start_step, num_steps=num_steps, batch_size=batch,
        learning_rate=lr, momentum=float(s.momentum),
        noise_scale=noise_scale(lr, s.momentum, n, batch)))
    start_examples += num_steps * batch
    start_step += num_steps
  return Plan(kind=s.kind, num_train_examples=n,
              warmup_examples=math.ceil(s.warmup_epochs * n),
              warmup_start_learning_rate=float(s.warmup_start_learning_rate),
              stages=tuple(stages))


def _adaptive_plan(s, n: int, batch0: int, lr0: float, decisions,
                   ghost_batch_size: int) -> Plan:
  """Stages from B0 at 0 and each decision (examples_seen, B) onwards; the
  last stage runs to num_epochs. ε by `adaptive_lr_rule`."""
  points = [(0, batch0)] + [(int(x), int(b)) for x, b in decisions]
  end = math.ceil(s.num_epochs * n)
  stages = []
  start_step = 0
  for i, (start, batch) in enumerate(points):
    _check_fits(i, batch, n)  # The split over devices: in build_plan.
    if i + 1 < len(points):
      stop = points[i + 1][0]
      _require(stop > start and (stop - start) % batch == 0,
               f"batch decision {i + 1} at examples_seen={stop} is not a step "
               f"boundary after stage {i} (B={batch} from {start})")
      num_steps = (stop - start) // batch
    else:
      _require(start < end, f"batch decision {i} at examples_seen={start} is "
               f"past the end of training ({end} examples)")
      num_steps = -(-(end - start) // batch)
    lr = lr0 * batch / batch0 if s.adaptive_lr_rule == "linear" else lr0
    stages.append(Stage(
        index=i, start_epoch=start / n,
        end_epoch=(start + num_steps * batch) / n if i + 1 < len(points)
        else float(s.num_epochs),
        start_examples=start, end_examples=start + num_steps * batch,
        start_step=start_step, num_steps=num_steps, batch_size=batch,
        learning_rate=lr, momentum=float(s.momentum),
        noise_scale=noise_scale(lr, s.momentum, n, batch)))
    start_step += num_steps
  return Plan(kind=s.kind, num_train_examples=n,
              warmup_examples=math.ceil(s.warmup_epochs * n),
              warmup_start_learning_rate=float(s.warmup_start_learning_rate),
              stages=tuple(stages))


def _check_fits(stage: int, batch: int, num_train_examples: int) -> None:
  _require(batch <= num_train_examples,
           f"stage {stage} global batch B={batch} exceeds "
           f"dataset.num_train_examples={num_train_examples}; lower "
           "schedule.max_batch or schedule.batch_size")


def _check_split(stage: int, batch: int, ghost_batch_size: int,
                 num_devices: int) -> None:
  where = f"stage {stage} global batch B={batch}"
  _require(batch % num_devices == 0,
           f"{where} is not divisible by the device count {num_devices}")
  per_device = batch // num_devices
  _require(per_device % ghost_batch_size == 0,
           f"{where} gives {per_device} examples per device, not a multiple of "
           f"ghost_batch_size={ghost_batch_size}")


def plan_from_config(config, num_devices: int = 1,
                     decisions: Sequence[tuple[int, int]] = (),
                     devices_from_examples: int = 0) -> Plan:
  """The plan of a full experiment config (see configs/base.py)."""
  return build_plan(config.schedule,
                    num_train_examples=config.dataset.num_train_examples,
                    ghost_batch_size=config.ghost_batch_size,
                    num_devices=num_devices, decisions=decisions,
                    devices_from_examples=devices_from_examples)


def main(argv: Sequence[str]) -> None:
  from trainer import cli  # absl flags only for the command line.
  del argv
  config = cli.config()
  plan = cli.run_or_exit(plan_from_config, config, cli.FLAGS.num_devices)
  if cli.FLAGS["num_devices"].present:
    # The trainer's other check of the device count: stages past
    # max_device_batch per device must split into whole micro-batches.
    cli.run_or_exit(micro_batching.check_batch_sizes, config, plan,
                    cli.FLAGS.num_devices)
  if cli.FLAGS.json:
    try:
      with open(cli.FLAGS.json, "w") as f:
        json.dump(plan.to_json(), f, indent=2)
    except OSError as e:
      cli.fail(f"--json={cli.FLAGS.json}: {e.strerror or e}")
  print(plan.table())
  if cli.FLAGS.json:
    print(f"wrote {cli.FLAGS.json}")


if __name__ == "__main__":
  from trainer import cli
  cli.define_plan_flags()
  cli.run(main)
