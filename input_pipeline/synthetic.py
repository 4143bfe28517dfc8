"""A synthetic dataset for smoke tests: learnable, deterministic, no files.

Example i of a split has a label drawn from (seed, split, i) and an image
that is its class's pattern plus uniform noise. A pattern is a coarse 4x4
grid of grey levels per channel keyed by (seed, class), stretched to the
image size and mirrored left-right, so random crops and flips keep it
recognisable and a tiny model's loss falls within a few hundred steps.
"""
from __future__ import annotations

import numpy as np

from input_pipeline import keyed_random

_GRID = 4  # Pattern cells per side.
_SPLIT_KEYS = {"train": 0, "eval": 1}
_PATTERN_KEY = 2  # Class patterns are shared by both splits.


class SyntheticSource:
  """`num_examples` images of `image_size`^2 x `channels`, generated on access."""

  def __init__(self, *, seed: int, subset: str, num_examples: int,
               image_size: int, channels: int, num_classes: int, noise: float):
    self.name = f"synthetic {subset}"
    self.num_examples = num_examples
    self.image_size = image_size
    self.channels = channels
    split = _SPLIT_KEYS[subset]
    index = np.arange(num_examples)
    stream = keyed_random.SYNTHETIC_STREAM
    self.labels = (keyed_random.hash64(seed, stream, split, index, 0)
                   % np.uint64(num_classes)).astype(np.int64)
    self.noise_seeds = keyed_random.hash64(seed, stream, split, index, 1)
    grids = 32 + 192 * keyed_random.uniforms(
        seed, stream, _PATTERN_KEY, np.arange(num_classes)[:, None],
        np.arange(_GRID * _GRID * channels)).reshape(
            num_classes, _GRID, _GRID, channels)
    # Mirror-symmetric, so that flips keep the class.
    self.grids = np.rint((grids + grids[:, :, ::-1]) / 2).astype(np.int16)
    # Pixels per grid cell along a side (image_size need not divide by 4).
    self.cell_sizes = np.bincount(np.arange(image_size) * _GRID // image_size,
                                  minlength=_GRID)
    # Uniform noise (cheaper than Gaussian) of standard deviation `noise`,
    # as a table from a random byte to a pixel offset.
    scale = noise / np.sqrt((256**2 - 1) / 12)
    self.noise_table = np.rint((np.arange(256) - 127.5) * scale).astype(np.int16)

  def __len__(self) -> int:
    return self.num_examples

  def pattern(self, label: int) -> np.ndarray:
    """The noiseless int16 image of class `label`, values in [32, 224]."""
    grid = self.grids[label]
    return np.repeat(np.repeat(grid, self.cell_sizes, 0), self.cell_sizes, 1)

  def __getitem__(self, index: int):
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.name} index {index} out of range")
    label = int(self.labels[index])
    rng = np.random.default_rng(int(self.noise_seeds[index]))
    noise = rng.integers(0, 256, (self.image_size, self.image_size, self.channels),
                         dtype=np.uint8)
    image = self.pattern(label) + self.noise_table[noise]
    return np.clip(image, 0, 255).astype(np.uint8), label
