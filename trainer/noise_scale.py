"""The gradient noise scale, measured from data-parallel training for free.

McCandlish et al. 2018 (An Empirical Model of Large-Batch Training) define the
simple noise scale B_simple = tr(Σ) / |G|², with G the true gradient and Σ
the per-example gradient covariance; training at B ≪ B_simple wastes steps,
at B ≫ B_simple wastes examples. Each step already holds two gradient
estimates: every device's own mean gradient over its B_small = B / devices
examples, and their mean over the global batch B_big = B. Since
E|G_B|² = |G|² + tr(Σ)/B,

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

with |G_small|² averaged over devices. One step's estimates are noisy (and
can be negative), so each is smoothed by its own bias-corrected exponential
moving average before the ratio is taken; the trainer's averages span a
fixed number of examples (`noise_scale_horizon_epochs`), not of steps, so a
large-B stage does not average over epochs of stale gradients.
"""
from __future__ import annotations

import dataclasses
import math


def unbiased_estimates(grad_sq_small: float, grad_sq_big: float,
                       batch_small: float, batch_big: float
                       ) -> tuple[float, float]:
  """One step's (|G|², tr(Σ)) estimates from the two squared norms."""
  if not 0 < batch_small < batch_big:
    raise ValueError(f"need 0 < batch_small < batch_big, got {batch_small} "
                     f"and {batch_big}")
  grad_sq = ((batch_big * grad_sq_big - batch_small * grad_sq_small)
             / (batch_big - batch_small))
  trace = (grad_sq_small - grad_sq_big) / (1.0 / batch_small - 1.0 / batch_big)
  return grad_sq, trace


@dataclasses.dataclass
class NoiseScaleTracker:
  """Bias-corrected moving averages of |G|² and tr(Σ), and their ratio.

  Each `update` forgets the past by a decay: `decay`, or the one passed in
  (the trainer passes exp(-B / horizon), so the averages span the same
  number of examples at every batch size). `kept` is the product of the
  decays so far; dividing by 1 - kept removes the bias of starting at zero.
  The state is four numbers, saved with each checkpoint (`state_dict` /
  `from_state`) so that a resumed run continues the same estimate.
  """
  decay: float = 0.95
  grad_sq_average: float = 0.0
  trace_average: float = 0.0
  updates: int = 0
  kept: float = 1.0

  def __post_init__(self):
    _check_decay(self.decay)

  def update(self, grad_sq_small: float, grad_sq_big: float,
             batch_small: float, batch_big: float,
             decay: float | None = None) -> float | None:
    """Folds in one step; returns the current B_simple (None if unknown)."""
    grad_sq, trace = unbiased_estimates(grad_sq_small, grad_sq_big,
                                        batch_small, batch_big)
    if not (math.isfinite(grad_sq) and math.isfinite(trace)):
      return self.value
    d = self.decay if decay is None else _check_decay(decay)
    self.grad_sq_average = d * self.grad_sq_average + (1 - d) * grad_sq
    self.trace_average = d * self.trace_average + (1 - d) * trace
    self.updates += 1
    self.kept *= d
    return self.value

  @property
  def grad_sq(self) -> float | None:
    """Bias-corrected |G|² estimate."""
    if not self.updates:
      return None
    return self.grad_sq_average / (1.0 - self.kept)

  @property
  def trace(self) -> float | None:
    """Bias-corrected tr(Σ) estimate."""
    if not self.updates:
      return None
    return self.trace_average / (1.0 - self.kept)

  @property
  def value(self) -> float | None:
    """B_simple = tr(Σ)/|G|², or None while |G|² is not yet positive."""
    grad_sq, trace = self.grad_sq, self.trace
    if grad_sq is None or grad_sq <= 0.0:
      return None
    return max(trace, 0.0) / grad_sq

  def state_dict(self) -> dict:
    return dict(decay=self.decay, grad_sq_average=self.grad_sq_average,
                trace_average=self.trace_average, updates=self.updates,
                kept=self.kept)

  @classmethod
  def from_state(cls, state: dict | None, decay: float) -> "NoiseScaleTracker":
    """A tracker continuing `state` (from a checkpoint), or a fresh one."""
    if not state:
      return cls(decay=decay)
    return cls(decay=float(state["decay"]),
               grad_sq_average=float(state["grad_sq_average"]),
               trace_average=float(state["trace_average"]),
               updates=int(state["updates"]), kept=float(state["kept"]))


def horizon_decay(batch_size: int, horizon_examples: float) -> float:
  """Per-step decay exp(-B / horizon): a window of `horizon_examples`."""
  return math.exp(-batch_size / horizon_examples)


def _check_decay(decay: float) -> float:
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"noise scale decay must be in [0, 1), got {decay}")
  return decay
