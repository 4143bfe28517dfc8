"""Running a benchmark's measurement in a child process.

XLA fixes the number of (virtual CPU) devices when it starts, so a benchmark
that compares device counts or models measures each in a fresh process:
the script re-runs itself with `child_argument` added and prints its rows as
one JSON line last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence


def run(script: str, child_argument: str, devices, what: str,
        xla_flags: str = "", platforms: str | None = None,
        extra_args: Sequence[str] = ()):
  """What `script` re-run with `child_argument` and this process's arguments
  (then `extra_args`, which win over them) on `devices` virtual CPU devices
  (and `xla_flags`) prints as its last line, as JSON; exits with the
  child's stderr tail if it fails. The child keeps this process's XLA_FLAGS,
  placed first so that `devices` and `xla_flags` win over them (XLA takes
  the last of a repeated flag). JAX_PLATFORMS is `platforms`, or this
  process's (default cpu)."""
  env = dict(os.environ,
             XLA_FLAGS=(f"{os.environ.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={devices} "
                        f"{xla_flags}"),
             JAX_PLATFORMS=platforms or os.environ.get("JAX_PLATFORMS", "cpu"))
  out = subprocess.run([sys.executable, script, child_argument, *sys.argv[1:],
                        *extra_args],
                       env=env, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"benchmark child for {what} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])
