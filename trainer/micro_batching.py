"""How a stage's global batch splits into micro-batches, and which compiled
step it runs.

No JAX here: the trainer's `StepCompiler` and the suite's time estimate
(`trainer/suite.py`) share these rules.
"""
from __future__ import annotations

from trainer import adaptive

ACCUMULATION_MODES = ("host", "compiled")


class ConfigError(ValueError):
  """A config that cannot run on this mesh; the message names the field."""


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def check_accumulation(accumulation: str) -> None:
  _check(accumulation in ACCUMULATION_MODES,
         f"accumulation={accumulation!r} is not one of "
         f"{', '.join(ACCUMULATION_MODES)}")


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


def batch_sizes_to_run(config, plan, from_examples: int = 0) -> list[int]:
  """Every global batch the run may use from `from_examples` on (a resumed
  run's position), in order: its stages' and, with kind='adaptive', every
  larger size the schedule may pick."""
  sizes = list(plan.batch_sizes_from(from_examples))
  if sizes and config.schedule.kind == "adaptive":
    sizes += [b for b in adaptive.allowed_batch_sizes(
        config.schedule, plan.stages[0].batch_size) if b > sizes[-1]]
  return sizes


def check_batch_sizes(config, plan, num_devices: int,
                      from_examples: int = 0) -> None:
  """Every batch of `batch_sizes_to_run` splits into whole micro-batches
  over `num_devices`."""
  for batch_size in batch_sizes_to_run(config, plan, from_examples):
    micro_batches(batch_size, num_devices, config.max_device_batch,
                  config.ghost_batch_size)


def step_key(batch_size: int, num_devices: int, max_device_batch: int,
             ghost_batch_size: int, accumulation: str) -> tuple:
  """What is compiled for `batch_size`; batch sizes with equal keys share it.

  ("fused", B): `compiled` accumulation, one step per batch size.
  ("single", B): `host` accumulation of a per-device batch below
  `max_device_batch`, its functions composed into one.
  ("micro", m): `host` accumulation at or past `max_device_batch`, k >= 1
  micro-batches of m per device through one init/accumulate/apply set.
  """
  k = micro_batches(batch_size, num_devices, max_device_batch,
                    ghost_batch_size)
  if accumulation == "compiled":
    return ("fused", batch_size)
  m = batch_size // num_devices // k
  if m < max_device_batch:
    return ("single", batch_size)
  return ("micro", m)
