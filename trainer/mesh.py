"""One device mesh over every device of every process, with a `data` axis."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """All devices of all processes on one `data` axis (pure data parallel)."""
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over `data`; each device a contiguous share."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays from this process's contiguous slice of the batch.

  Only array entries travel; python scalars (examples_seen, step) stay.
  """
  sharding = batch_sharding(mesh)
  # The one intended host-to-device copy of a step. With several processes
  # JAX builds it from per-device puts that a transfer guard would count as
  # implicit, so it is allowed here explicitly.
  with jax.transfer_guard_host_to_device("allow"):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items() if isinstance(v, np.ndarray)}
