"""Counter-based random numbers: a pure function of their integer keys.

The example order and the augmentation draw from `hash64(seed, stream, epoch,
index, draw)`, so a number never depends on which thread, worker or process
computes it, nor on what was computed before: that is what makes the stream
identical for any process count and resumable at any offset. It is
vectorised (keys broadcast like numpy arrays) and written here, not taken
from numpy's generators, so that the order is fixed by this file alone and
survives numpy upgrades.
"""
from __future__ import annotations

import numpy as np

# Streams keep the draws of different purposes independent.
ORDER_STREAM = 1
AUGMENT_STREAM = 2
SYNTHETIC_STREAM = 3

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser (a bijection on uint64 with full avalanche)."""
  z = (z ^ (z >> np.uint64(30))) * _MUL1
  z = (z ^ (z >> np.uint64(27))) * _MUL2
  return z ^ (z >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
  """A uint64 array hashing the broadcast integer `keys` (each below 2**63)."""
  arrays = [np.atleast_1d(np.asarray(k, dtype=np.int64)).astype(np.uint64)
            for k in keys]
  h = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), np.uint64)
  for a in arrays:  # uint64 arrays wrap silently, as a hash wants.
    h = _mix(h + _GOLDEN + a)
  return h


def uniforms(*keys) -> np.ndarray:
  """float64 numbers in [0, 1), one per broadcast element of `keys`."""
  return (hash64(*keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53
