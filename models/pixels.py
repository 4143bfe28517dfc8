"""The model's input: uint8 pixels normalised on the device.

The input pipeline ships uint8 pixels, a quarter of the bytes of float32,
to the devices; the model's first operation turns them into
(pixels / 255 - mean) / std per channel in float32, then the compute dtype:
one elementwise pass over the C-channel input, small beside the first
convolution's output. Float images are taken as already normalised (tests,
or callers that normalise themselves).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def model_input(images: jax.Array, mean: Sequence[float] | None,
                std: Sequence[float] | None, dtype: Any) -> jax.Array:
  """`images` [B, H, W, C] in `dtype`: uint8 pixels normalised by the
  per-channel `mean` and `std` (of pixels / 255), float images as given."""
  if not jnp.issubdtype(images.dtype, jnp.integer):
    return jnp.asarray(images, dtype)
  if mean is None or std is None:
    raise ValueError(
        f"{images.dtype} images need the model's pixel_mean and pixel_std "
        "(models.create_model sets them from dataset.mean and dataset.std)")
  channels = images.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(
        f"pixel_mean={tuple(mean)} and pixel_std={tuple(std)} need one value "
        f"per channel of the {channels}-channel images")
  std = jnp.asarray(std, jnp.float32)
  scale = 1.0 / (255.0 * std)
  bias = -jnp.asarray(mean, jnp.float32) / std
  return jnp.asarray(images.astype(jnp.float32) * scale + bias, dtype)
