"""Joining the multi-controller runtime: one process per host.

On Cloud TPU pods `jax.distributed.initialize()` finds its peers by itself
(`--multihost`); elsewhere, and in tests, the coordinator address, process
count and id come from flags.
"""
from __future__ import annotations

import os
import sys
import traceback
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


def exit_now_if_others_wait(error: BaseException) -> None:
  """Ends this process of a multi-process run now, after `error` (a
  one-line error's SystemExit, or any exception, printed here); returns for
  a single process or a clean exit.

  Exiting normally would wait at JAX's shutdown barrier (5 minutes) for
  processes that are themselves waiting for this one in the next step's
  collectives, then abort them all. Gone at once, it is reported to the
  others by JAX's distributed service, which ends them.
  """
  if jax.process_count() == 1 or (isinstance(error, SystemExit)
                                  and not error.code):
    return
  code = 1
  if isinstance(error, SystemExit):
    code = error.code if isinstance(error.code, int) else 1
  else:
    traceback.print_exception(error)
  print(f"process {jax.process_index()} stopped (exit status {code}); the "
        "other processes stop when JAX's distributed service notices",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access
