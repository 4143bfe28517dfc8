"""The trainer's step compiled for a Cloud TPU slice on a machine without one:
memory per chip and collectives.

    python benchmarks/tpu_program.py [--topology=v5e:2x2] \
        [--config=configs/imagenet_resnet50.py] [--per_device_batch=320] \
        [--hbm_gib=16] [--set FIELD=VALUE ...] [--json=FILE]

libtpu (the `libtpu` package of jax's `tpu` extra) compiles for a TPU
topology it is not running on (`jax.experimental.topologies`), as Cloud
TPU's ahead-of-time compilation does. This compiles the functions the
trainer runs for a stage of `--per_device_batch` examples per chip (by
default the config's `max_device_batch`, the largest micro-batch any stage
runs) on every chip of the topology, and prints per function what XLA:TPU
allocates on each chip (arguments, outputs not aliased to arguments,
temporaries, code), that total against the chip's memory, and the
collectives in the program (with host accumulation, `accumulate` must have
none: each chip's micro-batch gradients stay local until `apply`).

v4 and v5p chips are compiled for as one device each ("megacore"), as JAX
runs them. libtpu installed beside jax would make every `import jax` look
for a TPU; `make tpu-program-env` puts it in its own environment:

    make tpu-program-env
    .venv-tpu-program/bin/python benchmarks/tpu_program.py --topology=v4:2x2x1
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

# Compile-only devices need no TPU runtime: keep JAX from looking for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Nor a lock on TPU hardware, which a second compiling process would wait on.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Memory per chip (GiB) by generation, from Cloud TPU's system architecture
# pages: what --hbm_gib defaults to.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Generations with two TensorCores per chip, which JAX drives as one device
# ("megacore"), as on a real slice of them.
MEGACORE = {"v4", "v5p"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def collectives(hlo_text: str) -> dict[str, int]:
  """{kind: count} of the collectives in an optimised HLO module (an
  asynchronous one counted once, by its start)."""
  found = re.findall(r"= .*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(",
                     hlo_text)
  return dict(collections.Counter(found))


def memory(compiled) -> dict[str, float]:
  """GiB per chip that XLA allocates for `compiled`."""
  m = compiled.memory_analysis()
  gib = {k: v / 2**30 for k, v in dict(
      arguments=m.argument_size_in_bytes,
      outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
      temporaries=m.temp_size_in_bytes,
      code=m.generated_code_size_in_bytes).items()}
  gib["total"] = sum(gib.values())
  return gib


def hbm_gib(topology: str) -> float | None:
  return HBM_GIB.get(topology.split(":")[0])


def main():
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  from benchmarks.common import compile_stage, load_config, unwritable
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5e:2x2",
                 help="TPU topology, generation:chips (v4:2x2x1, v5e:2x2, "
                      "v5e:4x4, ...)")
  p.add_argument("--config", default="configs/imagenet_resnet50.py",
                 help="config file[:variant]")
  p.add_argument("--per_device_batch", type=int, default=0,
                 help="examples per chip (default: the config's "
                      "max_device_batch)")
  p.add_argument("--hbm_gib", type=float, default=0.0,
                 help="memory per chip (default by generation: " + ", ".join(
                     f"{k} {v}" for k, v in HBM_GIB.items()) + ")")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override (repeatable)")
  p.add_argument("--json", default="", help="also write the figures here")
  a = p.parse_args()
  if ":" not in a.topology:
    p.error(f"--topology {a.topology!r} is not generation:chips "
            "(e.g. v5e:2x2)")
  if a.per_device_batch < 0:
    p.error(f"--per_device_batch must be positive, got {a.per_device_batch}")
  hbm = a.hbm_gib or hbm_gib(a.topology)
  if not hbm:
    p.error(f"no memory known for {a.topology.split(':')[0]}; pass --hbm_gib")
  if unwritable(a.json):
    p.error(unwritable(a.json))
  config = load_config(a.config, a.set)
  import models  # As the trainer would resolve them on the TPU, not here.
  models.resolve_platform_defaults(config, "tpu")
  per_device = a.per_device_batch or config.max_device_batch
  if per_device % config.ghost_batch_size:
    p.error(f"--per_device_batch {per_device} is not a multiple of "
            f"ghost_batch_size={config.ghost_batch_size}")
  try:
    from jax.experimental import topologies
    generation = a.topology.split(":")[0]
    topology = topologies.get_topology_desc(
        topology_name=a.topology, platform="tpu",
        **({"chip_config_name": "megacore"} if generation in MEGACORE
           else {}))
  except Exception as e:  # No libtpu, or a topology it does not know.
    sys.exit(f"tpu_program.py: no compile-only TPU {a.topology!r} "
             f"({str(e).splitlines()[0][:160]}); libtpu is in "
             "`make tpu-program-env`: run .venv-tpu-program/bin/python "
             "benchmarks/tpu_program.py")
  from trainer import mesh as mesh_lib
  mesh = topologies.make_mesh(topo=topology, mesh_shape=(len(
      topology.devices),), axis_names=(mesh_lib.DATA_AXIS,))
  from trainer import micro_batching
  try:
    compiled_stage = compile_stage(config, mesh, per_device)
  except micro_batching.ConfigError as e:  # No micro-batches of this size.
    sys.exit(f"tpu_program.py: {e}")
  rows = {}
  for name, compiled in compiled_stage.items():
    rows[name] = dict(memory(compiled),
                      collectives=collectives(compiled.as_text()))
  print(f"{a.config} on {a.topology} ({mesh.size} chips, {hbm:g} GiB each), "
        f"{per_device} examples per chip, accumulation={config.accumulation}")
  print(f"{'function':>10} {'arguments':>9} {'outputs':>8} {'temps':>8} "
        f"{'code':>6} {'total GiB':>9} {'of HBM':>7}  collectives")
  for name, r in rows.items():
    kinds = ", ".join(f"{k} {n}" for k, n in r["collectives"].items())
    print(f"{name:>10} {r['arguments']:>9.2f} {r['outputs']:>8.2f} "
          f"{r['temporaries']:>8.2f} {r['code']:>6.3f} {r['total']:>9.2f} "
          f"{r['total'] / hbm:>7.0%}  {kinds or 'none'}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(topology=a.topology, chips=mesh.size, hbm_gib=hbm,
                     per_device_batch=per_device, functions=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
