"""ResNets with ghost batch norm: ResNet-50 v1.5 and a small ResNet.

ResNet-50 v1.5 (He et al. 2016, with the stride of each downsampling
bottleneck on its 3x3 conv as in torchvision and the Flax ImageNet example) is
the ImageNet model; at width 64 it has 25,557,032 parameters. The small ResNet
(3x3 stem, no max pool, three stages of basic blocks of width w, 2w, 4w) is
the Fashion-MNIST / CIFAR smoke model that trains on two CPU cores.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.ghost_norm_model import GhostNormModel
from models.ghost_norm_model import conv_kernel_init
from models.max_pool import max_pool
from models.space_to_depth import SpaceToDepthConv

ModuleDef = Any

STEMS = ("imagenet", "small")


def _same_padding(kernel: int):
  return ((kernel // 2, kernel // 2),) * 2


class ResidualBlock(nn.Module):
  """What both blocks share: their fields, and the end of the block, the
  last norm of the branch with the skip added and a ReLU (post-activation,
  ResNet v1), the skip projected where the shape changes."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool

  def join(self, x, y):
    """relu(norm(y) + skip(x)), from the compact `__call__` of a subclass.
    One module takes the add and the ReLU, so that its gradient can take
    them inside (GhostBatchNorm.fuse_relu)."""
    residual = x
    if residual.shape != y.shape:
      residual = self.conv(y.shape[-1], (1, 1), self.strides, padding=0,
                           name="proj_conv")(residual)
      residual = self.norm(name="proj_norm")(residual)
    return self.norm(scale_init=_last_scale_init(self.zero_init_residual),
                     relu=True)(y, residual)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs, post-activation (ResNet v1)."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides,
                  padding=_same_padding(3))(x)
    y = self.norm(relu=True)(y)
    y = self.conv(self.filters, (3, 3), padding=_same_padding(3))(y)
    return self.join(x, y)


class BottleneckBlock(ResidualBlock):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion, post-activation."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (1, 1), padding=0)(x)
    y = self.norm(relu=True)(y)
    y = self.conv(self.filters, (3, 3), self.strides,
                  padding=_same_padding(3))(y)
    y = self.norm(relu=True)(y)
    y = self.conv(self.filters * 4, (1, 1), padding=0)(y)
    return self.join(x, y)


def _last_scale_init(zero_init_residual: bool):
  # A zero scale on the residual branch's last norm makes every block start
  # as the identity (Goyal et al. 2017), which helps the large-batch stages.
  return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


class ResNet(GhostNormModel):
  """A ResNet v1 whose batch norms all use ghost batches.

  Attributes (besides GhostNormModel's):
    stage_sizes: blocks per stage; stage i has width * 2**i filters and
      stages after the first start with a stride-2 block.
    block_cls: BasicBlock or BottleneckBlock.
    width: filters of the stem and of the first stage.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max pool) or 'small' (3x3/1 conv).
    zero_init_residual: zero scale on the last norm of each residual branch.
    stem_space_to_depth: the 'imagenet' stem's 7x7/2 conv computed as a
      4x4/1 conv over 2x2 blocks of pixels (models/space_to_depth.py): the
      same parameter and values.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: int
  stem: str
  zero_init_residual: bool
  stem_space_to_depth: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images: float [B, H, W, C]; returns float32 logits [B, num_classes]."""
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}")
    conv, norm = self.conv(), self.norm(train)
    x = self.inputs(images)
    if self.stem == "imagenet":
      if self.stem_space_to_depth:
        x = SpaceToDepthConv(
            self.width, (7, 7), (2, 2), _same_padding(7), dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=conv_kernel_init,
            name="stem_conv")(x)
      else:
        x = conv(self.width, (7, 7), (2, 2), padding=_same_padding(7),
                 name="stem_conv")(x)
      x = norm(name="stem_norm", relu=True)(x)
      x = max_pool(x, (3, 3), (2, 2), _same_padding(3))
    else:
      x = conv(self.width, (3, 3), padding=_same_padding(3),
               name="stem_conv")(x)
      x = norm(name="stem_norm", relu=True)(x)

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(
            filters=self.width * 2**i, strides=strides, conv=conv, norm=norm,
            zero_init_residual=self.zero_init_residual)(x)

    return self.logits(x)


ResNet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock,
    stem="imagenet")


def SmallResNet(*, blocks_per_stage: int, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """Three stages of basic blocks (width, 2 width, 4 width), 3x3 stem."""
  return ResNet(stage_sizes=(blocks_per_stage,) * 3, block_cls=BasicBlock,
                stem="small", **kwargs)
