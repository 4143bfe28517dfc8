"""Device time per XLA operation in a JAX profiler trace, CPU or GPU.

`trace(fn, steps)` runs `fn` `steps` times under `jax.profiler.trace` and
returns {operation: milliseconds per run}; `by_category` sums those into
the kinds of `CATEGORIES`, `by_family` by operation name less its number.
Operations are named by the trace's `hlo_op` statistic where it has one
(the HLO instruction, e.g. "fusion.12", "cudnn-conv.3"), else by the
event's name (e.g. a GPU kernel's).

Where the trace has device planes ("/device:GPU:0"), their events are the
kernels as the device ran them: a plane's derived "XLA Ops" line when it
has one, else its "Stream" lines (other lines repeat the same kernels or
hold launch statistics).
Otherwise (XLA:CPU) the operations are the host-thread events that carry
`hlo_op`, summed over the device threads, so they exceed wall time.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

CATEGORIES = (  # First match wins.
    ("YNNPACK library fusion (conv, dot)", re.compile(r"^ynn_fusion")),
    # cuDNN names its kernels by pass: fprop, dgrad (input), wgrad (filter).
    # (XLA:GPU's fusions of a convert are "..._convert_..." fusions.)
    ("convolution", re.compile(r"conv(?!ert)|cudnn|fprop|dgrad|wgrad")),
    ("matmul", re.compile(r"dot|gemm|cublas|matmul")),
    ("all-reduce", re.compile(r"all-reduce|nccl")),
    ("transpose / copy", re.compile(r"transpose|copy")),
    ("reduction", re.compile(r"reduce")),
    ("other fusion / elementwise", re.compile(r".")),
)
# XLA:CPU operation events are named like the op ("ynn_fusion.21",
# "all-reduce.50"); runtime bookkeeping ("ThunkExecutor::Execute",
# "Wait: ...") and Python frames ("$api.py:...") are not operations.
_CPU_OP = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")


def category(name: str) -> str:
  return next(label for label, pattern in CATEGORIES if pattern.search(name))


def by_category(ops: dict[str, float]) -> dict[str, float]:
  totals = collections.Counter()
  for name, ms in ops.items():
    totals[category(name)] += ms
  return dict(totals)


def by_family(ops: dict[str, float]) -> dict[str, tuple[float, int]]:
  """{family: (milliseconds, operations)}, a family being an operation's
  name without XLA's numeric suffix ("input_reduce_fusion.12" ->
  "input_reduce_fusion"): how two programs' fusions compare when their
  numbering differs."""
  totals, counts = collections.Counter(), collections.Counter()
  for name, ms in ops.items():
    family = re.sub(r"\.\d+$", "", name)
    totals[family] += ms
    counts[family] += 1
  return {family: (totals[family], counts[family]) for family in totals}


def op_milliseconds(trace_dir: str) -> dict[str, float]:
  """{operation: milliseconds} summed over the trace under `trace_dir`."""
  from jax import profiler
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                      recursive=True)
  planes = list(profiler.ProfileData.from_file(path).planes)
  totals = collections.Counter()
  devices = [p for p in planes if p.name.startswith("/device:")]
  for plane in devices:
    lines = list(plane.lines)
    lines = ([l for l in lines if l.name == "XLA Ops"]
             or [l for l in lines if l.name.startswith("Stream")] or lines)
    for line in lines:
      for event in line.events:
        stats = dict(event.stats)
        totals[str(stats.get("hlo_op") or event.name)] += (
            event.duration_ns / 1e6)
  if totals:
    return dict(totals)
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        if _CPU_OP.match(event.name):
          totals[event.name] += event.duration_ns / 1e6
  return dict(totals)


def trace(fn, steps: int, trace_dir: str = "") -> dict[str, float]:
  """{operation: milliseconds per call} of `steps` calls of `fn` (each
  waited for by `fn` itself), traced into `trace_dir` or a temporary one."""
  from jax import profiler
  directory = trace_dir or tempfile.mkdtemp()
  with profiler.trace(directory):
    for _ in range(steps):
      fn()
  return {name: ms / steps
          for name, ms in op_milliseconds(directory).items()}
