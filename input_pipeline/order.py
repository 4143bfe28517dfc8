"""The global example order: one stream of example indices for the run.

Position t of the stream (t = examples seen) is example `perm_e[t mod N]` of
epoch e = t // N, where `perm_e` is a permutation of the N training examples
keyed by (seed, e). A step that starts at examples seen x takes positions
[x, x + B); B comes from the plan, so the schedule decides where the stream
is cut and nothing else. A batch may span an epoch boundary.
"""
from __future__ import annotations

import collections

import numpy as np

from input_pipeline import keyed_random


class ExampleOrder:
  """Maps stream positions to (epoch, example index), deterministically."""

  def __init__(self, num_examples: int, seed: int, cached_epochs: int = 2):
    self.num_examples = num_examples
    self.seed = seed
    self._cache: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._cached_epochs = cached_epochs

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the N examples in `epoch`: argsort of keyed hashes."""
    if epoch not in self._cache:
      keys = keyed_random.hash64(self.seed, keyed_random.ORDER_STREAM, epoch,
                                 np.arange(self.num_examples))
      self._cache[epoch] = np.argsort(keys, kind="stable")
      while len(self._cache) > self._cached_epochs:
        self._cache.popitem(last=False)
    self._cache.move_to_end(epoch)
    return self._cache[epoch]

  def at(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, example indices) of stream positions [start, stop)."""
    positions = np.arange(start, stop, dtype=np.int64)
    epochs = positions // self.num_examples
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      indices[where] = self.permutation(int(epoch))[
          positions[where] % self.num_examples]
    return epochs, indices
