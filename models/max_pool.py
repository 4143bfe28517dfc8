"""Max pooling whose gradient is one elementwise pass.

`nn.max_pool`'s gradient is XLA's select-and-scatter. XLA:GPU lowers it to
a reduce-window that writes, besides the maxima, the index of each window's
maximum as int32 arrays of the output's size, a buffer of zeros the size of
the padded input, and a scatter into it: for ResNet-50's pool at 224 px and
B=256, 3.6 GB read and written per step (`benchmarks/gpu_program.py`).

`max_pool` here keeps the position of each window's maximum from the
forward pass, as an int8 offset within the window, and writes the gradient
per phase of the stride (`_backward`): one pass that reads the output's
gradient and the offsets and writes the input's, which XLA:GPU fuses into
the kernel that consumes it (ResNet-50's stem norm's backward pass).

Values and gradients are nn.max_pool's: the first maximum of a window in
row-major order takes the gradient, as XLA's select-and-scatter with `>=`
picks it (tests/test_max_pool.py).
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], ...]


def _check(x, window: tuple[int, ...], strides: tuple[int, ...],
           padding: Padding):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"max_pool: needs floating-point values (padding is "
                     f"-inf), got {x.dtype}")
  spatial = x.ndim - 2
  if not len(window) == len(strides) == len(padding) == spatial:
    raise ValueError(
        f"max_pool: window {window}, strides {strides} and padding "
        f"{padding} must each have one entry per spatial dimension of an "
        f"input of shape {x.shape} (batch first, channels last)")
  if math.prod(window) > 127:
    raise ValueError(f"max_pool: a window of {math.prod(window)} values is "
                     f"more than an int8 offset can name (127)")


def _output_size(size: int, window: int, stride: int, pad: tuple[int, int]):
  return (size + pad[0] + pad[1] - window) // stride + 1


def _window_views(x, window, strides, padding):
  """For each offset of the window in row-major order, the [B, *out, C]
  strided view of the values at that offset of every window (of the input
  padded with -inf)."""
  spatial = x.ndim - 2
  out_sizes = [_output_size(x.shape[1 + d], window[d], strides[d], padding[d])
               for d in range(spatial)]
  padded = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),),
                   constant_values=-jnp.inf)
  views = []
  for offset in itertools.product(*(range(w) for w in window)):
    start = (0,) + offset + (0,)
    limit = ((x.shape[0],)
             + tuple(o + s * (n - 1) + 1
                     for o, s, n in zip(offset, strides, out_sizes))
             + (x.shape[-1],))
    views.append(lax.slice(padded, start, limit, (1,) + tuple(strides) + (1,)))
  return views


def _pool(x, window, strides, padding):
  """The maxima [B, *out, C] and the int8 offset of each window's first
  maximum."""
  views = _window_views(x, window, strides, padding)
  best, where = views[0], jnp.zeros(views[0].shape, jnp.int8)
  for k, view in enumerate(views[1:], start=1):
    where = jnp.where(view > best, jnp.int8(k), where)
    best = jnp.maximum(best, view)  # Propagates NaN, as reduce_window does.
  return best, where


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _pool(x, window, strides, padding)[0]


def _forward(x, window, strides, padding):
  out, where = _pool(x, window, strides, padding)
  return out, (where, x.shape)


def _backward(window, strides, padding, residuals, dy):
  """dx: at each offset of the window, dy where that offset held the
  window's maximum, placed back at the offset's input positions; summed
  over offsets (a value in several windows gets each window's share).

  Written per phase: a padded input position p = s*m + a (per dimension)
  is offset a + s*j of window m - j, so the gradient of the positions of
  phase a is a sum over j of the offset's masked dy shifted by j, at the
  output's resolution; the phases, interleaved, are dx. Each position thus
  sums only the offsets that can reach it (at most 4 of a 3x3/2 pool's 9).
  """
  where, shape = residuals
  spatial = len(shape) - 2
  zero = jnp.zeros((), dy.dtype)
  out = dy.shape[1:-1]
  blocks = [-(-(shape[1 + d] + sum(padding[d])) // strides[d])
            for d in range(spatial)]
  phases = {}
  offsets = itertools.product(*(range(w) for w in window))
  for k, offset in enumerate(offsets):
    phase = tuple(o % s for o, s in zip(offset, strides))
    shift = [o // s for o, s in zip(offset, strides)]
    placed = lax.pad(
        jnp.where(where == k, dy, zero), zero,
        [(0, 0, 0)] + [(j, m - n - j, 0) for j, m, n in
                       zip(shift, blocks, out)] + [(0, 0, 0)])
    phases[phase] = placed if phase not in phases else phases[phase] + placed
  empty = jnp.zeros((shape[0], *blocks, shape[-1]), dy.dtype)
  stacked = jnp.stack([phases.get(a, empty) for a in itertools.product(
      *(range(s) for s in strides))])  # [s_1 * ... * s_n, B, *blocks, C]
  stacked = stacked.reshape(*strides, shape[0], *blocks, shape[-1])
  # -> [B, m_1, s_1, ..., m_n, s_n, C] -> [B, m_1 s_1, ..., m_n s_n, C].
  order = [spatial] + [i for d in range(spatial)
                       for i in (spatial + 1 + d, d)] + [2 * spatial + 1]
  dx = stacked.transpose(order).reshape(
      shape[0], *(m * s for m, s in zip(blocks, strides)), shape[-1])
  start = (0,) + tuple(p[0] for p in padding) + (0,)
  return (lax.slice(dx, start, tuple(s + p for s, p in zip(shape, start))),)


_max_pool.defvjp(_forward, _backward)


def max_pool(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
             padding: Padding) -> jax.Array:
  """Max pooling of `x` [B, *spatial, C] over `window` with `strides`,
  padded with -inf by `padding` ((low, high) per spatial dimension): the
  values of nn.max_pool(x, window, strides, padding), and its gradient."""
  window, strides = tuple(window), tuple(strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  _check(x, window, strides, padding)
  return _max_pool(x, window, strides, padding)
