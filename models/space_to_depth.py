"""A strided convolution computed as a stride-1 one over space-to-depth input.

ResNet-50's stem convolves a 3-channel image with a 7x7 kernel at stride 2.
Three input channels are too few for a GPU's tensor cores: on an H200 that
one convolution and its kernel's gradient took 2.9 of the step's 35 ms
(docs/results/benchmarks/h200/reference_step_fuse.txt) for under 2% of
its FLOPs. The same convolution can be computed as a stride-1 one with an
s x s smaller kernel over an input with s*s times the channels: each s x s
block of (padded) pixels becomes one pixel of s*s*C channels (space to
depth), and the k x k kernel, padded with zeros to a multiple of s, is
rearranged to match (the MLPerf ResNet stems do this on TPUs); the block's
channels are padded with zeros to a multiple of 8. On an H100 the stem's
convolution took 0.66 ms this way against 1.82, its kernel's gradient 0.44
against 1.17, and ResNet-50's step ran 1.05x as many examples/s
(docs/results/benchmarks/h100/reference_step_s2d.txt,
reference_in_flight_s2d.txt).

`SpaceToDepthConv` keeps nn.Conv's parameter (`kernel`, [k, k, C, F], the
same initialiser and random stream), so checkpoints and initial weights are
those of the plain convolution; its outputs are the plain convolution's up to
the order of summation (tests/test_space_to_depth.py).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Channels of the blocks are padded to a multiple of this: cuDNN's bf16
# tensor-core convolutions want channel counts that are multiples of 8.
CHANNEL_MULTIPLE = 8


def _blocks(x: jax.Array, s: int) -> jax.Array:
  """[B, H, W, C] with H, W multiples of `s` -> [B, H/s, W/s, s*s*C], each
  s x s block's pixels in row-major order, channels last."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // s, s, w // s, s, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, s * s * c)


def _kernel_blocks(kernel: jax.Array, s: int) -> jax.Array:
  """[k, k, C, F] -> [t, t, s*s*C, F] with t = ceil(k / s): the kernel padded
  with zero taps at its end to t*s, each s x s block of taps made channels in
  the order `_blocks` gives the input's."""
  k, _, c, f = kernel.shape
  t = -(-k // s)
  kernel = jnp.pad(kernel, ((0, t * s - k), (0, t * s - k), (0, 0), (0, 0)))
  kernel = kernel.reshape(t, s, t, s, c, f)
  return kernel.transpose(0, 2, 1, 3, 4, 5).reshape(t, t, s * s * c, f)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, stride: int,
                        padding: tuple[tuple[int, int], tuple[int, int]],
                        channel_multiple: int = CHANNEL_MULTIPLE
                        ) -> jax.Array:
  """lax.conv_general_dilated(x, kernel, (stride, stride), padding) in NHWC /
  HWIO, as a stride-1 convolution of space-to-depth blocks whose channels
  are padded with zeros to a multiple of `channel_multiple`."""
  k = kernel.shape[0]
  s, t = stride, -(-k // stride)
  edges = []
  for size, (lo, hi) in zip(x.shape[1:3], padding):
    out = (size + lo + hi - k) // s + 1
    # Output o reads padded rows s*o .. s*o + t*s - 1: pad (or crop) the high
    # side to exactly s * (out - 1 + t) rows, so the stride-1 convolution
    # over out - 1 + t blocks has `out` outputs.
    edges.append((lo, s * (out - 1 + t) - size - lo, 0))
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *edges, (0, 0, 0)])
  x, kernel = _blocks(x, s), _kernel_blocks(kernel, s)
  extra = -x.shape[-1] % channel_multiple
  x = jnp.pad(x, ((0, 0),) * 3 + ((0, extra),))
  kernel = jnp.pad(kernel, ((0, 0),) * 2 + ((0, extra), (0, 0)))
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SpaceToDepthConv(nn.Module):
  """nn.Conv(features, (k, k), (stride, stride), padding, use_bias=False)
  computed by `space_to_depth_conv`, in `dtype` with `param_dtype` weights."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dtype: Any
  param_dtype: Any
  kernel_init: Callable

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, k2 = self.kernel_size
    s, s2 = self.strides
    if k != k2 or s != s2 or x.ndim != 4:
      raise ValueError(
          f"SpaceToDepthConv: needs a square kernel and equal strides over "
          f"[B, H, W, C] input; got kernel {self.kernel_size}, strides "
          f"{self.strides}, input shape {x.shape}")
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return space_to_depth_conv(x, kernel, s, self.padding)
