"""Joining the multi-controller runtime: one process per host.

On Cloud TPU pods `jax.distributed.initialize()` finds its peers by itself
(`--multihost`); elsewhere, and in tests, the coordinator address, process
count and id come from flags.
"""
from __future__ import annotations

import jax


def initialize(*, multihost: bool, coordinator_address: str | None,
               num_processes: int | None, process_id: int | None) -> None:
  """Calls jax.distributed.initialize when the run spans processes."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id "
                       "must be given together")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in "
                       f"[0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif multihost:
    jax.distributed.initialize()  # TPU pods: peers found from the metadata.


def describe() -> str:
  """`P process(es), D devices (L on this process)`, for the logs."""
  return (f"{jax.process_count()} process(es), {jax.device_count()} devices "
          f"({jax.local_device_count()} on process {jax.process_index()})")
