"""XLA_FLAGS for the test processes and the runs they start.

Tests compile far more than they run, so they switch off XLA:CPU's LLVM
optimisations (`--xla_backend_optimization_level=0`; XLA's default is 3): the
same HLO, fused and partitioned as always, turned into slower machine code
sooner. On the 2-core development machine it took tests/test_step.py and
test_ghost_batch_norm.py from 185 to 119 s. A developer's own XLA_FLAGS keep
their settings, in the test processes and the runs they start:
`XLA_FLAGS=--xla_backend_optimization_level=3 make test` tests XLA's default
code generation.
"""
import os

from benchmarks import common
from trainer import suite

FAST_COMPILE = "--xla_backend_optimization_level=0"


def set_for_this_process() -> None:
  """8 virtual devices unless XLA_FLAGS names a count, and fast compiles
  unless it names an optimisation level (before jax is imported)."""
  common.default_virtual_devices(8)
  flags = os.environ["XLA_FLAGS"].split()
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    os.environ["XLA_FLAGS"] = " ".join([*flags, FAST_COMPILE])


def xla_flags(devices: int = 8) -> str:
  """This process's XLA_FLAGS with `devices` virtual CPU devices, for a run
  it starts."""
  return suite.train_env(devices=devices)["XLA_FLAGS"]
