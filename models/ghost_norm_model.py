"""What every model here shares: ghost batch norm settings, a compute dtype,
He-initialised convolutions and uint8 pixels normalised on the device.

Each model subclasses `GhostNormModel` and builds its layers from `conv()`,
`norm(train)` and `inputs(images)`. The shared fields are keyword-only, so a
model's own fields may follow them without defaults;
`models.create_model` passes every field by keyword.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.ghost_batch_norm import GhostBatchNorm
from models.pixels import model_input

# He init for ReLU networks, as torchvision's kaiming_normal_(mode='fan_out').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _keyword(**default):
  return dataclasses.field(kw_only=True, **default)


class GhostNormModel(nn.Module):
  """A classifier whose batch norms all use ghost batches.

  Attributes (keyword-only):
    num_classes: size of the logits.
    ghost_batch_size: examples per batch norm group in training.
    bn_epsilon: batch norm epsilon.
    dtype: compute dtype; parameters are float32, logits float32.
    bn_fast_variance: batch norm variance in one pass (see
      GhostBatchNorm.fast_variance).
    bn_explicit_gradient: the batch norm gradient written out rather than
      autodiff's (see GhostBatchNorm.explicit_gradient).
    bn_fuse_relu: the ReLU after a batch norm, and a skip add before it,
      inside that gradient (see GhostBatchNorm.fuse_relu).
    pixel_mean, pixel_std: per-channel normalisation of uint8 images (of
      pixels / 255); see models/pixels.py.
  """
  num_classes: int = _keyword()
  ghost_batch_size: int = _keyword()
  bn_epsilon: float = _keyword()
  dtype: Any = _keyword()
  bn_fast_variance: bool = _keyword(default=True)
  bn_explicit_gradient: bool = _keyword(default=True)
  bn_fuse_relu: bool = _keyword(default=False)
  pixel_mean: Sequence[float] | None = _keyword(default=None)
  pixel_std: Sequence[float] | None = _keyword(default=None)

  def conv(self):
    """`nn.Conv` without bias, computing in `dtype` with float32 He-initialised
    kernels (arguments as nn.Conv's)."""
    return functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=conv_kernel_init)

  def norm(self, train: bool):
    """`GhostBatchNorm` with this model's settings: batch statistics of ghost
    batches in training, the running averages otherwise. A norm followed by
    a ReLU is built with `relu=True`."""
    return functools.partial(
        GhostBatchNorm, ghost_batch_size=self.ghost_batch_size,
        use_running_average=not train, dtype=self.dtype,
        epsilon=self.bn_epsilon, fast_variance=self.bn_fast_variance,
        explicit_gradient=self.bn_explicit_gradient,
        fuse_relu=self.bn_fuse_relu)

  def inputs(self, images: jax.Array) -> jax.Array:
    """`images` in `dtype`: uint8 pixels normalised, float images as given."""
    return model_input(images, self.pixel_mean, self.pixel_std, self.dtype)

  def logits(self, features: jax.Array) -> jax.Array:
    """Float32 logits of [B, H, W, C] `features`: the spatial mean, then the
    classifier `head`. Call from the model's compact `__call__`."""
    x = jnp.mean(jnp.asarray(features, jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    param_dtype=jnp.float32, name="head")(x)
