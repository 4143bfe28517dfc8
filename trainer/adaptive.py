"""The `adaptive` schedule: the global batch follows the measured noise scale.

Every `schedule.adaptive_every_epochs` the loop asks `decide` for the batch
of the steps that follow, from the gradient noise scale B_simple measured so
far (trainer/noise_scale.py): the largest allowed size B0·growth^j that is
not above clip(adaptive_scale·B_simple, B0, max_batch), and never smaller
than the current B. Allowed sizes are few (log_growth(max_batch/B0) + 1), so
few steps are compiled, and they are whole multiples of B0, so every one
splits over the devices and into ghost batches when B0 does.

A change becomes a new stage of the plan (`plan.build_plan(...,
decisions=...)`) starting at that step; the decisions are saved with every
checkpoint and written to metrics.jsonl (`batch_decision` records), so a
resumed run rebuilds the same plan and goes on deciding from the same
noise-scale state.
"""
from __future__ import annotations


def allowed_batch_sizes(schedule, batch0: int) -> list[int]:
  """B0·growth^j for j = 0, 1, ... up to schedule.max_batch."""
  sizes = [batch0]
  while sizes[-1] * schedule.adaptive_growth <= schedule.max_batch:
    sizes.append(sizes[-1] * schedule.adaptive_growth)
  return sizes


def target_batch(schedule, batch0: int, grad_noise_scale: float) -> float:
  """adaptive_scale · B_simple, clipped to [B0, max_batch]."""
  return min(max(schedule.adaptive_scale * grad_noise_scale, batch0),
             schedule.max_batch)


def decide(schedule, batch0: int, current: int,
           grad_noise_scale: float | None) -> int:
  """The batch size for the next steps (current while nothing is measured)."""
  if grad_noise_scale is None:
    return current
  target = target_batch(schedule, batch0, grad_noise_scale)
  best = max(b for b in allowed_batch_sizes(schedule, batch0) if b <= target)
  return max(current, best)


def next_decision(examples_seen: int, every_examples: int) -> int:
  """The first decision point after `examples_seen` (same on resume)."""
  return (examples_seen // every_examples + 1) * every_examples
