"""Ghost batch norm: statistics over fixed-size groups of examples.

Growing the global batch B must not shrink the noise of batch norm, so in
training every group of `ghost_batch_size` consecutive examples is normalised
by its own mean and variance, whatever B is (Hoffer et al. 2017; Smith et al.
2018 use ghost batches of 128 on CIFAR-10 and 32 on ImageNet).

A group is g consecutive rows of the batch. The trainer shards the batch on
the `data` mesh axis with a per-device share that is a multiple of g, so a
group never straddles a device and the compiled step moves no activations
between devices (tests/test_ghost_batch_norm.py reads the HLO).

Training differentiates through a hand-written batch norm gradient
(`explicit_gradient`, the default): one reduction pass and one elementwise
pass over the activations, where autodiff's gradient took XLA:GPU more. A
ReLU that follows the norm (`relu`), and a skip add before it (`residual`),
can be taken inside that gradient (`fuse_relu`): the ReLU's mask is then
recomputed from x in the same two passes, or, after a skip add, kept from
the forward pass at a bit per value.

The module does not keep the moving average itself. In training it writes the
statistics of the current batch into the `batch_stats` collection; the train
step averages them over micro-batches and applies `update_running_stats` once
per step with a per-example forgetting rate (`running_stats_decay`), so the
running averages are the same with or without micro-batching and their window,
in examples, is the same in every stage.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def _group_sum(values: jax.Array, g: int) -> jax.Array:
  """[B, ..., C] -> [B/g, C]: the sum over each group of g consecutive
  examples and over space. Each example's spatial sum is taken first, over
  the activations as they are, then the g sums of a group are added (a tiny
  [B/g, g, C] sum): reducing the [B, ..., C] array itself, rather than a
  [B/g, g, ..., C] view of it, let XLA:GPU fuse the backward pass closer to
  the way it fuses a plain batch norm's (docs/results/benchmarks/h100/)."""
  sums = jnp.sum(values, axis=tuple(range(1, values.ndim - 1)))
  return jnp.sum(sums.reshape(-1, g, sums.shape[-1]), axis=1)


def _group_mean(values: jax.Array, g: int) -> jax.Array:
  """[B, ..., C] -> [B/g, C]: `_group_sum` over the values per group."""
  return _group_sum(values, g) / _group_count(values.shape, g)


def _group_count(shape, g: int) -> int:
  """Values per channel in a group of g examples of `shape` [B, ..., C]."""
  return g * math.prod(shape[1:-1])


def _per_example(stat: jax.Array, g: int, ndim: int) -> jax.Array:
  """[B/g, C] -> [B, 1, ..., 1, C] (ndim dimensions): each group's value
  for each of its examples, to broadcast against the activations."""
  groups, channels = stat.shape
  repeated = jnp.broadcast_to(stat[:, None], (groups, g, channels))
  return repeated.reshape((groups * g,) + (1,) * (ndim - 2) + (channels,))


def _ghost_normalize(x, scale, bias, residual, g, epsilon, fast_variance,
                     dtype, relu=False):
  """Ghost batch norm of `x` [B, ..., C] in training: returns the output in
  `dtype` (plus `residual` unless it is None, then through a ReLU if
  `relu`) and each group's mean and biased variance [B/g, C] (float32).

  Statistics and the affine map are computed in float32; reads and writes
  stay in the activations' dtype. `fast_variance`: E[x²] - E[x]², clamped
  at 0 against rounding, in the same pass as the mean (as Flax's BatchNorm);
  else E[(x - E[x])²], a second pass that loses nothing to cancellation
  when |mean| >> std.

  The multiplier rsqrt(var + ε) * scale is computed per group, [B/g, C],
  and broadcast to the examples after: computed per example, XLA:GPU wrote
  it out as a [B/g, g, C] array in a kernel of its own, one per norm
  (`benchmarks/gpu_program.py` counts the kernels of the H100 program).
  """
  x32 = jnp.asarray(x, jnp.float32)
  mean = _group_mean(x32, g)
  example_mean = _per_example(mean, g, x.ndim)
  if fast_variance:
    var = jnp.maximum(_group_mean(jnp.square(x32), g) - jnp.square(mean), 0.0)
  else:
    var = _group_mean(jnp.square(x32 - example_mean), g)
  multiplier = _per_example(_multiplier(var, scale, epsilon), g, x.ndim)
  y = _affine(x32, example_mean, multiplier, bias)
  return _output(y, residual, relu, dtype), mean, var


def _output(y32, residual, relu, dtype):
  """The norm's float32 output `y32` in `dtype`, plus `residual` (added in
  `dtype`, as `nn.relu(residual + y)` after the norm would) and through a
  ReLU if `relu`. The same values as those separate operations, to the bit;
  the ReLU goes before the rounding when there is no residual (rounding
  keeps signs)."""
  if residual is None:
    return jnp.asarray(jax.nn.relu(y32) if relu else y32, dtype)
  z = jnp.asarray(y32, dtype) + jnp.asarray(residual, dtype)
  return jax.nn.relu(z) if relu else z


def _multiplier(var, scale, epsilon):
  """rsqrt(var + epsilon) * scale in float32: what the centred activations
  are multiplied by (`var` [C] or [B/g, C])."""
  return jax.lax.rsqrt(var + epsilon) * jnp.asarray(scale, jnp.float32)


def _affine(x32, mean, multiplier, bias):
  """(x - mean) * multiplier + bias in float32, `mean` and `multiplier`
  broadcasting against `x32` (the groups' in training, from the running
  averages in evaluation): one fused elementwise pass whose reads and
  writes stay in the activations' dtype, and x - mean suffers no bfloat16
  cancellation."""
  return (x32 - mean) * multiplier + jnp.asarray(bias, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _ghost_normalize_explicit(x, scale, bias, residual, g, epsilon,
                              fast_variance, dtype, relu):
  """`_ghost_normalize` with its gradient written out (see `_backward`)."""
  return _ghost_normalize(x, scale, bias, residual, g, epsilon, fast_variance,
                          dtype, relu)


def _forward(x, scale, bias, residual, g, epsilon, fast_variance, dtype,
             relu):
  # symbolic_zeros=True below: the primals come wrapped (`.value`).
  x, scale, bias = x.value, scale.value, bias.value
  residual = None if residual is None else residual.value
  out = _ghost_normalize(x, scale, bias, residual, g, epsilon, fast_variance,
                         dtype, relu)
  y, mean, var = out
  # After a skip add, the ReLU's mask is kept from the output, packed to a
  # bit per value (`_relu_passed`).
  packed = (_pack_bits(y > 0) if relu and residual is not None
            and y.shape[-1] % 8 == 0 else None)
  return out, (x, scale, bias, residual, mean, jax.lax.rsqrt(var + epsilon),
               packed)


def _backward(g, epsilon, fast_variance, dtype, relu, residuals, cotangents):
  """The gradient of batch norm in one reduction pass and one elementwise
  pass over the activations: with x̂ = (x - mean) * rstd and n values per
  group, dx = scale * rstd * (dy - mean(dy) - x̂ * mean(dy * x̂)) per group,
  plus the terms of the statistics' own cotangents when they have any (in
  training only the output reaches the loss, so they are symbolic zeros and
  cost nothing). Autodiff of the forward pass gives the same values;
  XLA:GPU spread its reductions over more passes.

  With `relu`, dy is first masked where the ReLU's input (x̂ * scale +
  bias, plus the residual if there is one) is not positive; the mask is
  recomputed from x, or kept from the forward pass after a skip add
  (`_relu_passed`), so the ReLU's gradient costs no pass of its own over
  the activations. The residual's gradient is the masked dy."""
  del epsilon, fast_variance  # Same function of x in every case.
  x, scale, bias, residual, mean, rstd, packed = residuals
  dy, dmean, dvar = (None if isinstance(c, jax.custom_derivatives.SymbolicZero)
                     else c for c in cotangents)
  ndim = x.ndim
  count = _group_count(x.shape, g)
  x32 = jnp.asarray(x, jnp.float32)
  centred = x32 - _per_example(mean, g, ndim)
  dx = jnp.zeros_like(x32)
  dscale = dbias = jnp.zeros(scale.shape, jnp.float32)
  if dy is not None:
    dy32 = jnp.asarray(dy, jnp.float32)
    x_hat = centred * _per_example(rstd, g, ndim)
    if relu:
      dy32 = jnp.where(
          _relu_passed(x32, x_hat, scale, bias, residual, mean, rstd,
                       packed, g, dtype), dy32, 0.0)
    # dx = scale * rstd / n * (n * dy - sum(dy) - x̂ * sum(dy * x̂)): the
    # group sums enter dx as the reduction leaves them, where dividing them
    # by n first made XLA:GPU write the quotients out in two kernels of
    # their own per norm. dscale and dbias add the groups' means times n
    # (the same values): adding the sums themselves, XLA re-reduced the
    # per-example sums in two more kernels instead of folding the sum over
    # groups into the optimizer's update (`benchmarks/gpu_program.py`).
    sum_dy = _group_sum(dy32, g)
    sum_dy_x_hat = _group_sum(dy32 * x_hat, g)
    dx = (_per_example(rstd * jnp.asarray(scale, jnp.float32) / count, g,
                       ndim)
          * (dy32 * count - _per_example(sum_dy, g, ndim)
             - x_hat * _per_example(sum_dy_x_hat, g, ndim)))
    dscale = jnp.sum(sum_dy_x_hat / count, axis=0) * count
    dbias = jnp.sum(sum_dy / count, axis=0) * count
  if dmean is not None:  # mean = sum(x) / n per group.
    dx = dx + _per_example(dmean / count, g, ndim)
  if dvar is not None:  # var = sum((x - mean)²) / n; the mean's term is 0.
    dx = dx + centred * _per_example(2.0 * dvar / count, g, ndim)
  dresidual = None
  if residual is not None:
    dresidual = (jnp.zeros(residual.shape, residual.dtype) if dy is None
                 else jnp.asarray(dy32, residual.dtype))
  return (jnp.asarray(dx, x.dtype), jnp.asarray(dscale, scale.dtype),
          jnp.asarray(dbias, scale.dtype), dresidual)


def _relu_passed(x32, x_hat, scale, bias, residual, mean, rstd, packed, g,
                 dtype):
  """Where the ReLU after the norm (and the residual add) was positive in
  the forward pass: `_backward`'s mask.

  Without a residual it is recomputed from x, which both backward passes
  read anyway (values within rounding of zero may fall either side).
  x̂ * scale + bias > 0 is written x * a > -b with per-group a = rstd *
  scale and b = bias - mean * a, a comparison of x alone, which XLA:GPU
  recomputes inside both passes; written from x̂, it joined the forward
  pass's kernel and was written out as a mask of a byte per value that both
  passes read (2.2 GB more per ResNet-50 step at B=256,
  `benchmarks/gpu_program.py`).

  With a residual, recomputing it would read the residual again in both
  passes, and XLA:GPU wrote it out a byte per value instead; the forward
  pass keeps it from the output, packed eight values to a byte (`packed`,
  when the channels are a multiple of 8; else it is recomputed)."""
  if packed is not None:
    return _unpack_bits(packed, x32.shape)
  scale32, bias32 = (jnp.asarray(v, jnp.float32) for v in (scale, bias))
  if residual is None:
    a = rstd * scale32
    return (x32 * _per_example(a, g, x32.ndim)
            > -_per_example(bias32 - mean * a, g, x32.ndim))
  return _output(x_hat * scale32 + bias32, residual, False, dtype) > 0


def _pack_bits(mask: jax.Array) -> jax.Array:
  """Booleans [..., C] (C a multiple of 8) -> uint8 [..., C/8], channel
  8i + j in bit j of byte i."""
  bits = mask.astype(jnp.uint8).reshape(mask.shape[:-1] + (-1, 8))
  return jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1,
                 dtype=jnp.uint8)


def _unpack_bits(packed: jax.Array, shape) -> jax.Array:
  """`_pack_bits`'s inverse: booleans of `shape` [..., C]."""
  bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
  return bits.reshape(shape) > 0


_ghost_normalize_explicit.defvjp(_forward, _backward, symbolic_zeros=True)


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
    explicit_gradient: differentiate training with the batch norm gradient
      written out (one reduction pass, one elementwise pass); else with
      JAX's autodiff of the forward pass. Same values.
    relu: apply a ReLU to the output (after adding the residual, if the
      call passes one).
    fuse_relu: with `explicit_gradient`, take the residual add and the ReLU
      inside the written-out gradient, which recomputes the ReLU's mask from
      x and the residual in its own two passes; else they follow the batch
      norm as `residual + y` and `nn.relu` would, and the ReLU's gradient is
      a separate select over the activations unless XLA fuses it. Same
      values, to the bit, for a residual in `dtype`.
    scale_init: initialiser of `scale` (zeros for the last norm of a residual
      branch, so that each block starts as the identity).
  """
  ghost_batch_size: int
  use_running_average: bool
  dtype: Dtype
  epsilon: float
  param_dtype: Dtype = jnp.float32
  fast_variance: bool = True
  explicit_gradient: bool = True
  relu: bool = False
  fuse_relu: bool = False
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array,
               residual: jax.Array | None = None) -> jax.Array:
    """Normalises `x` [B, ..., C], adds `residual` (same shape) if given,
    then a ReLU if `relu`; returns the same shape in `self.dtype`."""
    if residual is not None and residual.shape != x.shape:
      raise ValueError(
          f"ghost batch norm: residual of shape {residual.shape} does not "
          f"match the input's {x.shape}")
    num_channels = x.shape[-1]
    running_mean = self.variable(
        "batch_stats", "mean", jnp.zeros, (num_channels,), jnp.float32)
    running_var = self.variable(
        "batch_stats", "var", jnp.ones, (num_channels,), jnp.float32)
    scale = self.param("scale", self.scale_init, (num_channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (num_channels,),
                      self.param_dtype)

    if self.use_running_average:
      y = _affine(jnp.asarray(x, jnp.float32), running_mean.value,
                  _multiplier(running_var.value, scale, self.epsilon), bias)
      return _output(y, residual, self.relu, self.dtype)

    g = self.ghost_batch_size
    batch_size = x.shape[0]
    if g < 1 or batch_size % g:
      raise ValueError(
          f"ghost batch norm: the batch of {batch_size} examples is not a "
          f"multiple of ghost_batch_size={g}")
    dtype = jnp.dtype(self.dtype)
    if self.explicit_gradient and self.fuse_relu:
      y, mean, var = _ghost_normalize_explicit(
          x, scale, bias, residual, g, self.epsilon, self.fast_variance,
          dtype, self.relu)
    else:
      normalize = (_ghost_normalize_explicit if self.explicit_gradient
                   else _ghost_normalize)
      y, mean, var = normalize(x, scale, bias, None, g, self.epsilon,
                               self.fast_variance, dtype, False)
      if residual is not None:
        y = residual + y
      if self.relu:
        y = nn.relu(y)
    if not self.is_initializing():
      # The batch's statistics, not an average: see the module docstring.
      running_mean.value = jnp.mean(mean, axis=0)
      running_var.value = jnp.mean(var, axis=0)
    return y


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
