"""Inception-ResNet-V2 (Szegedy et al. 2016) with ghost batch norm.

The ImageNet model of Smith et al. 2018 (ghost batch 32, 299x299 images,
inputs of at least 75x75). The layout follows the Keras application: stem to
35x35x192, mixed 5b, 10 x block35 (residual scale 0.17), reduction A,
20 x block17 (0.1), reduction B, 10 x block8 (0.2; the last one scale 1 and no
ReLU), a 1x1 conv to 1536, global average pooling and the classifier. Unlike
Keras, every batch norm has a learned scale as well as a bias.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.ghost_norm_model import GhostNormModel
from models.max_pool import max_pool

ModuleDef = Any

MIN_IMAGE_SIZE = 75  # Smaller inputs vanish in the valid convs and pools.


class ConvNorm(nn.Module):
  """Conv (no bias) -> ghost batch norm -> optional ReLU."""
  filters: int
  kernel: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  padding: str = "SAME"
  relu: bool = True

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.filters, tuple(self.kernel), self.strides,
                  padding=self.padding)(x)
    return self.norm(relu=self.relu)(x)


class InceptionResNetBlock(nn.Module):
  """x + scale * up(concat(branches(x))), then ReLU unless `relu` is False.

  `branches` lists, per branch, its (filters, kernel) convs in order.
  """
  branches: Sequence[Sequence[tuple[int, tuple[int, int]]]]
  scale: float
  conv: ModuleDef
  norm: ModuleDef
  relu: bool = True

  @nn.compact
  def __call__(self, x):
    outputs = []
    for branch in self.branches:
      y = x
      for filters, kernel in branch:
        y = ConvNorm(filters, kernel, self.conv, self.norm)(y)
      outputs.append(y)
    mixed = jnp.concatenate(outputs, axis=-1)
    # The filter-expansion conv has a bias and no norm, as in the paper.
    up = self.conv(x.shape[-1], (1, 1), use_bias=True, name="up_conv")(mixed)
    x = x + jnp.asarray(self.scale, x.dtype) * up
    return nn.relu(x) if self.relu else x


BLOCK35 = (((32, (1, 1)),),
           ((32, (1, 1)), (32, (3, 3))),
           ((32, (1, 1)), (48, (3, 3)), (64, (3, 3))))
BLOCK17 = (((192, (1, 1)),),
           ((128, (1, 1)), (160, (1, 7)), (192, (7, 1))))
BLOCK8 = (((192, (1, 1)),),
          ((192, (1, 1)), (224, (1, 3)), (256, (3, 1))))


class InceptionResNetV2(GhostNormModel):
  """Inception-ResNet-V2 whose batch norms all use ghost batches (its
  attributes are GhostNormModel's)."""

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images: float [B, H, W, C], H, W >= 75; float32 logits [B, classes]."""
    if min(images.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(
          f"inception_resnet_v2 needs images of at least {MIN_IMAGE_SIZE} "
          f"pixels a side, got {images.shape[1]}x{images.shape[2]}")
    conv, norm = self.conv(), self.norm(train)
    cn = functools.partial(ConvNorm, conv=conv, norm=norm)
    block = functools.partial(InceptionResNetBlock, conv=conv, norm=norm)
    pool = functools.partial(max_pool, window=(3, 3), strides=(2, 2),
                             padding=((0, 0), (0, 0)))

    x = self.inputs(images)
    # Stem: 299 -> 35x35x192.
    x = cn(32, (3, 3), strides=2, padding="VALID")(x)
    x = cn(32, (3, 3), padding="VALID")(x)
    x = cn(64, (3, 3))(x)
    x = pool(x)
    x = cn(80, (1, 1), padding="VALID")(x)
    x = cn(192, (3, 3), padding="VALID")(x)
    x = pool(x)

    # Mixed 5b (Inception-A): 35x35x320.
    pooled = nn.avg_pool(x, (3, 3), padding="SAME", count_include_pad=False)
    x = jnp.concatenate([
        cn(96, (1, 1))(x),
        cn(64, (5, 5))(cn(48, (1, 1))(x)),
        cn(96, (3, 3))(cn(96, (3, 3))(cn(64, (1, 1))(x))),
        cn(64, (1, 1))(pooled),
    ], axis=-1)
    for _ in range(10):
      x = block(BLOCK35, 0.17)(x)

    # Reduction A: 17x17x1088.
    x = jnp.concatenate([
        cn(384, (3, 3), strides=2, padding="VALID")(x),
        cn(384, (3, 3), strides=2, padding="VALID")(
            cn(256, (3, 3))(cn(256, (1, 1))(x))),
        pool(x),
    ], axis=-1)
    for _ in range(20):
      x = block(BLOCK17, 0.1)(x)

    # Reduction B: 8x8x2080.
    x = jnp.concatenate([
        cn(384, (3, 3), strides=2, padding="VALID")(cn(256, (1, 1))(x)),
        cn(288, (3, 3), strides=2, padding="VALID")(cn(256, (1, 1))(x)),
        cn(320, (3, 3), strides=2, padding="VALID")(
            cn(288, (3, 3))(cn(256, (1, 1))(x))),
        pool(x),
    ], axis=-1)
    for _ in range(9):
      x = block(BLOCK8, 0.2)(x)
    x = block(BLOCK8, 1.0, relu=False)(x)

    x = cn(1536, (1, 1))(x)
    return self.logits(x)
