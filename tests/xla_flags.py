"""XLA_FLAGS for the test processes and the runs they start.

Tests compile far more than they run, so they switch off XLA:CPU's LLVM
optimisations (`--xla_backend_optimization_level=0`): the same HLO, fused and
partitioned as always, turned into slower machine code sooner. On the 2-core
development machine it took tests/test_step.py and test_ghost_batch_norm.py
from 185 to 119 s. A developer's own XLA_FLAGS keep their settings.
"""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
  """`devices` virtual CPU devices, compiled fast, for a child process."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def set_for_this_process() -> None:
  """8 virtual devices unless XLA_FLAGS names a count, and fast compiles
  unless it names an optimisation level (before jax is imported)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if not any(f.startswith("--xla_force_host_platform_device_count") for f in flags):
    flags.append("--xla_force_host_platform_device_count=8")
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append(FAST_COMPILE)
  os.environ["XLA_FLAGS"] = " ".join(flags)
