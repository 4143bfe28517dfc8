"""Ghost batch norm: statistics over fixed-size groups of examples.

Growing the global batch B must not shrink the noise of batch norm, so in
training every group of `ghost_batch_size` consecutive examples is normalised
by its own mean and variance, whatever B is (Hoffer et al. 2017; Smith et al.
2018 use ghost batches of 128 on CIFAR-10 and 32 on ImageNet).

The groups are made by a reshape [B, ...] -> [B/g, g, ...]. The trainer shards
the batch on the `data` mesh axis with a per-device share that is a multiple of
g, so a group never straddles a device and the compiled step moves no
activations between devices (tests/test_ghost_batch_norm.py reads the HLO).

The module does not keep the moving average itself. In training it writes the
statistics of the current batch into the `batch_stats` collection; the train
step averages them over micro-batches and applies `update_running_stats` once
per step with a per-example forgetting rate (`running_stats_decay`), so the
running averages are the same with or without micro-batching and their window,
in examples, is the same in every stage.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


class GhostBatchNorm(nn.Module):
  """Batch norm over groups of `ghost_batch_size` examples, channels last.

  Attributes:
    ghost_batch_size: examples per normalisation group (training only); the
      batch must be a multiple of it.
    use_running_average: normalise with `batch_stats` (evaluation) instead of
      the statistics of each group (training).
    dtype: dtype of the output; statistics are always computed in float32.
    epsilon: added to the variance before the square root.
    param_dtype: dtype of `scale` and `bias`.
    fast_variance: the variance as E[x²] - E[x]², both means taken in the
      same pass over the activations (Flax's BatchNorm does the same); else
      as E[(x - E[x])²], a second pass after the mean, which loses nothing
      to cancellation when |mean| >> std. Both are float32.
    scale_init: initialiser of `scale` (zeros for the last norm of a residual
      branch, so that each block starts as the identity).
  """
  ghost_batch_size: int
  use_running_average: bool
  dtype: Dtype
  epsilon: float
  param_dtype: Dtype = jnp.float32
  fast_variance: bool = True
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x` [B, ..., C]; returns the same shape in `self.dtype`."""
    num_channels = x.shape[-1]
    running_mean = self.variable(
        "batch_stats", "mean", jnp.zeros, (num_channels,), jnp.float32)
    running_var = self.variable(
        "batch_stats", "var", jnp.ones, (num_channels,), jnp.float32)
    scale = self.param("scale", self.scale_init, (num_channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (num_channels,),
                      self.param_dtype)

    x32 = jnp.asarray(x, jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
      y = self._affine(x32, mean, var, scale, bias)
      return jnp.asarray(y, self.dtype)

    g = self.ghost_batch_size
    batch_size = x.shape[0]
    if g < 1 or batch_size % g:
      raise ValueError(
          f"ghost batch norm: the batch of {batch_size} examples is not a "
          f"multiple of ghost_batch_size={g}")
    # Mean and biased variance per group and channel, over examples and space:
    # each example's spatial sum first, over the activations as they are
    # ([B, ..., C] -> [B, C]), then over the g examples of each group (a tiny
    # [B/g, g, C] sum). Reducing the [B, ..., C] array itself, not a
    # [B/g, g, ..., C] view of it, lets XLA:GPU fuse the batch norm's backward
    # as it does the plain batch norm's (the grouped view cost ResNet-50 6%
    # of its step on an H100).
    spatial = tuple(range(1, x.ndim - 1))
    count = g * math.prod(x.shape[1:-1])

    def group_mean(values):  # [B, ..., C] -> [B/g, C]
      sums = jnp.sum(values, axis=spatial)
      return jnp.sum(sums.reshape(-1, g, num_channels), axis=1) / count

    def per_example(stat):  # [B/g, C] -> [B, 1, ..., 1, C]
      repeated = jnp.broadcast_to(stat[:, None], (batch_size // g, g,
                                                  num_channels))
      return repeated.reshape((batch_size,) + (1,) * len(spatial)
                              + (num_channels,))

    mean = group_mean(x32)
    if self.fast_variance:
      # Clamped: rounding can take E[x²] - E[x]² a hair below zero.
      var = jnp.maximum(group_mean(jnp.square(x32)) - jnp.square(mean), 0.0)
    else:
      var = group_mean(jnp.square(x32 - per_example(mean)))
    y = self._affine(x32, per_example(mean), per_example(var), scale, bias)

    if not self.is_initializing():
      # The batch's statistics, not an average: see the module docstring.
      running_mean.value = jnp.mean(mean, axis=0)
      running_var.value = jnp.mean(var, axis=0)
    return jnp.asarray(y, self.dtype)

  def _affine(self, x, mean, var, scale, bias):
    # One fused elementwise pass in float32: reads and writes stay in the
    # activation dtype, and x - mean suffers no bfloat16 cancellation.
    multiplier = jax.lax.rsqrt(var + self.epsilon) * jnp.asarray(
        scale, jnp.float32)
    return (x - mean) * multiplier + jnp.asarray(bias, jnp.float32)


def running_stats_decay(batch_size: int, bn_momentum: float,
                        bn_momentum_examples: int) -> float:
  """Decay of the running statistics for one step of `batch_size` examples.

  An example's weight decays by `bn_momentum` every `bn_momentum_examples`
  examples, so the averaging window is the same in every batch stage:
  decay = bn_momentum ** (batch_size / bn_momentum_examples).
  """
  if not 0.0 <= bn_momentum < 1.0:
    raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum}")
  if bn_momentum_examples <= 0:
    raise ValueError(
        f"bn_momentum_examples must be positive, got {bn_momentum_examples}")
  return bn_momentum ** (batch_size / bn_momentum_examples)


def update_running_stats(old_batch_stats: Any, step_batch_stats: Any,
                         decay: float | jax.Array) -> Any:
  """decay * old + (1 - decay) * step, leaf by leaf over `batch_stats` trees.

  `step_batch_stats` are the statistics written by a training forward pass
  (averaged over micro-batches by the caller); `decay` comes from
  `running_stats_decay`.
  """
  return jax.tree.map(
      lambda old, new: jnp.asarray(decay * old + (1.0 - decay) * new,
                                   old.dtype),
      old_batch_stats, step_batch_stats)
