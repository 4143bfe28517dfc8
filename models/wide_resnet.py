"""Wide ResNet (Zagoruyko & Komodakis 2016) with ghost batch norm.

The CIFAR-10 model of Smith et al. 2018 is WRN-16-4 (2,748,890 parameters for
10 classes): a 3x3 stem of `width` filters, then three groups of
(depth - 4) / 6 pre-activation blocks of width * widen_factor * (1, 2, 4)
filters, the last two groups starting with stride 2. No dropout.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from models.ghost_norm_model import GhostNormModel

ModuleDef = Any

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
    preactivated = self.norm(relu=True)(x)
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(
        preactivated)
    y = self.norm(relu=True)(y)
    y = self.conv(self.filters, (3, 3), padding=_PAD3)(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), self.strides, padding=0,
                    name="proj_conv")(preactivated)
    return x + y


class WideResNet(GhostNormModel):
  """WRN-depth-widen_factor with ghost batch norm.

  Attributes (besides GhostNormModel's):
    depth: total conv layers counted as in the paper; 6n + 4.
    widen_factor: k, the multiplier of the group widths.
    width: filters of the stem; group i has width * widen_factor * 2**i.
  """
  depth: int
  widen_factor: int
  width: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images: float [B, H, W, C]; returns float32 logits [B, num_classes]."""
    check_depth(self.depth)
    conv, norm = self.conv(), self.norm(train)
    x = self.inputs(images)
    x = conv(self.width, (3, 3), padding=_PAD3, name="stem_conv")(x)
    blocks_per_group = (self.depth - 4) // 6
    for i in range(3):
      for j in range(blocks_per_group):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideResNetBlock(
            filters=self.width * self.widen_factor * 2**i, strides=strides,
            conv=conv, norm=norm)(x)
    x = norm(name="final_norm", relu=True)(x)
    return self.logits(x)
