"""Wide ResNet (Zagoruyko & Komodakis 2016) with ghost batch norm.

The CIFAR-10 model of Smith et al. 2018 is WRN-16-4 (2,748,890 parameters for
10 classes): a 3x3 stem of `width` filters, then three groups of
(depth - 4) / 6 pre-activation blocks of width * widen_factor * (1, 2, 4)
filters, the last two groups starting with stride 2. No dropout.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.ghost_batch_norm import GhostBatchNorm
from models.pixels import model_input
from models.resnet import conv_kernel_init

ModuleDef = Any
Dtype = Any

_PAD3 = ((1, 1), (1, 1))


def check_depth(depth: int) -> None:
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f"wide_resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), "
        f"got model.depth={depth}")


class WideResNetBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 projection on shape change."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    preactivated = nn.relu(self.norm()(x))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(
        preactivated)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD3)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), self.strides, padding=0,
                    name="proj_conv")(preactivated)
    return x + y


class WideResNet(nn.Module):
  """WRN-depth-widen_factor with ghost batch norm.

  Attributes:
    depth: total conv layers counted as in the paper; 6n + 4.
    widen_factor: k, the multiplier of the group widths.
    width: filters of the stem; group i has width * widen_factor * 2**i.
    num_classes: size of the logits.
    ghost_batch_size: examples per batch norm group in training.
    bn_epsilon: batch norm epsilon.
    dtype: compute dtype; parameters are float32, logits float32.
    bn_fast_variance: batch norm variance in one pass (see
      GhostBatchNorm.fast_variance).
    bn_explicit_gradient: the batch norm gradient written out rather than
      autodiff's (see GhostBatchNorm.explicit_gradient).
    pixel_mean, pixel_std: per-channel normalisation of uint8 images (of
      pixels / 255); see models/pixels.py.
  """
  depth: int
  widen_factor: int
  width: int
  num_classes: int
  ghost_batch_size: int
  bn_epsilon: float
  dtype: Dtype
  bn_fast_variance: bool = True
  bn_explicit_gradient: bool = True
  pixel_mean: Sequence[float] | None = None
  pixel_std: Sequence[float] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images: float [B, H, W, C]; returns float32 logits [B, num_classes]."""
    check_depth(self.depth)
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=conv_kernel_init)
    norm = functools.partial(
        GhostBatchNorm, ghost_batch_size=self.ghost_batch_size,
        use_running_average=not train, dtype=self.dtype,
        epsilon=self.bn_epsilon, fast_variance=self.bn_fast_variance,
        explicit_gradient=self.bn_explicit_gradient)

    x = model_input(images, self.pixel_mean, self.pixel_std, self.dtype)
    x = conv(self.width, (3, 3), padding=_PAD3, name="stem_conv")(x)
    blocks_per_group = (self.depth - 4) // 6
    for i in range(3):
      for j in range(blocks_per_group):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideResNetBlock(
            filters=self.width * self.widen_factor * 2**i, strides=strides,
            conv=conv, norm=norm)(x)
    x = nn.relu(norm(name="final_norm")(x))
    x = jnp.mean(jnp.asarray(x, jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    param_dtype=jnp.float32, name="head")(x)
