"""The train step as XLA compiles it for a GPU, counted on a machine without one.

    python benchmarks/gpu_program.py [--models=resnet50] [--image_size=224] \
        [--batch_size=256] [--ghost_batch_size=32] [--dtype=bfloat16] \
        [--bn_gradient=explicit,autodiff] [--bn_relu=separate,fused] \
        [--stem=conv,space_to_depth] \
        [--gpu=benchmarks/gpu_specs/h100_sxm.txtpb] [--families=12] \
        [--hlo_dir=DIR] [--json=FILE] [--profile=OPS_JSON]

JAX compiles ahead of time for devices it does not have: XLA's CUDA plugin
(the `jax-cuda12-pjrt` package, of the same version as jax) builds a
compile-only device from a description of the GPU (`--gpu`, a text
`GpuTargetConfigProto`), and `jit(...).lower(...).compile()` then runs the
whole XLA:GPU pipeline, fusion included, on the CPU. Our step (what
`reference_step.py` times) and the Flax-ImageNet-style reference are
compiled that way, and for each this prints, from the optimised HLO:

  kernels   every operation of the entry computation the GPU runs: fusions,
            library calls (cuDNN convolutions, cuBLAS), copies;
  tiny      of them, those that read and write under 1 MB (launches, not
            bandwidth);
  GB moved  what the kernels other than library calls read and write, each
            operand and output counted once (no cache): the traffic of the
            passes over the activations that bound ResNet-50 on a GPU;
  masks GB  of that, boolean arrays (`pred`, a byte per value): the masks
            of ReLUs that XLA chose to write out rather than recompute.

then the families of kernels (names less XLA's numbers, as in
`reference_step.py --profile_steps`) whose counts differ most between the
trainers; with `--profile`, each trainer's kernels against the operations a
GPU profile of `reference_step.py --ops_json` recorded. Against the third
H100 session's profile (docs/results/benchmarks/h100/), the reference's
step compiled here had the same 1,166 operations, family by family
(README, Performance).

Installed beside jax, the plugin would make every `import jax` try, and
fail, to start CUDA on a machine without a GPU; `make gpu-program-env` puts it
in its own environment, `.venv-gpu-program` (174 MB), whose Python runs this:

    make gpu-program-env
    .venv-gpu-program/bin/python benchmarks/gpu_program.py
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys

# Compile-only devices need no GPU runtime: keep JAX from starting one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_BYTES = 1 << 20
SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# XLA's CUDA plugin: jax-cuda12-pjrt (make gpu-program-env) or, in a CUDA 13
# image, jax-cuda13-pjrt.
PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
# XLA:GPU's memory limit for a step without one from JAX's allocator, as a
# share of the device's memory (with_memory_for_arrays).
XLA_SHARE_OF_DEVICE_MEMORY = 0.8
# HLO instructions that launch nothing.
_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant",
                "bitcast", "after-all", "partition-id", "replica-id"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
          "u64": 8}


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str     # The HLO instruction, e.g. "loop_convert_fusion.12".
  opcode: str   # "fusion", "custom-call", "copy", ...
  bytes: int    # Its operands' and outputs' sizes.
  mask_bytes: int = 0  # Of those, boolean (`pred`) arrays'.

  @property
  def family(self) -> str:
    return family(self.name)


def family(name: str) -> str:
  """An operation's name less XLA's number: "loop_convert_fusion.12" ->
  "loop_convert_fusion"."""
  return re.sub(r"\.\d+$", "", name)


def shape_bytes(shape: str, only: str | None = None) -> int:
  """Bytes of an HLO shape: "bf16[256,56,56,64]{3,2,1,0}", or a tuple of
  them in parentheses; with `only` (e.g. "pred"), of its arrays of that
  type."""
  return sum(_BYTES.get(dtype, 4) * math.prod(
      int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]",
                                           shape)
             if only in (None, dtype))


def kernels(hlo_text: str) -> list[Kernel]:
  """The operations of an optimised HLO module's entry computation (as
  `Compiled.as_text()` prints it) that run as kernels, in order."""
  start = hlo_text.index("\nENTRY")
  entry = hlo_text[start + 1:hlo_text.index("\n}", start)]
  shapes, found = {}, []
  for line in entry.splitlines()[1:]:
    # XLA numbers every fifth operand or tuple element ("/*index=5*/").
    line = re.sub(r"/\*.*?\*/", "", line)
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) "
                 r"([a-z][a-z\-]*)\((.*)", line)
    if not m:
      if line.strip():
        raise ValueError(f"gpu_program: unread HLO instruction: {line[:120]}")
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = shape
    if opcode in _NOT_KERNELS:
      continue
    # The operands end at the call's closing parenthesis.
    operands = re.findall(r"%([\w.\-]+)", rest[:rest.find(")")])
    arrays = [shape] + [shapes.get(o, "") for o in operands]
    found.append(Kernel(name, opcode, sum(map(shape_bytes, arrays)),
                        sum(shape_bytes(a, "pred") for a in arrays)))
  return found


def summary(found: list[Kernel]) -> dict:
  """Kernels, tiny kernels, library calls, GB moved by the others and, of
  those, by masks."""
  others = [k for k in found if k.opcode != "custom-call"]
  return dict(
      kernels=len(found),
      tiny=sum(k.bytes < TINY_BYTES for k in found),
      library=len(found) - len(others),
      gb_moved=sum(k.bytes for k in others) / 1e9,
      mask_gb=sum(k.mask_bytes for k in others) / 1e9)


def families(found: list[Kernel]) -> collections.Counter:
  return collections.Counter(k.family for k in found)


def plugin_found() -> bool:
  import importlib.util
  try:
    return any(importlib.util.find_spec(p) is not None for p in PLUGINS)
  except ModuleNotFoundError:  # No jax_plugins package at all.
    return False


def read_target_config(gpu_spec: str) -> str | bytes:
  """The GPU description in the file `gpu_spec`: a text
  GpuTargetConfigProto, or the bytes XLA returned (gpu_figures.sh)."""
  with open(gpu_spec, "rb") as f:
    target_config = f.read()
  try:
    return target_config.decode()
  except UnicodeDecodeError:
    return target_config


def device_memory_gib(target_config: str) -> float:
  """The device memory of a text GPU description, in GiB."""
  m = re.search(r"device_memory_size:\s*(\d+)", target_config)
  if not m:
    raise ValueError("the GPU description has no device_memory_size")
  return int(m.group(1)) / 2**30


def with_memory_for_arrays(target_config: str, gib: float) -> str:
  """A text GPU description whose memory makes XLA plan a step for `gib`
  GiB, as it does on that GPU when JAX's allocator holds `gib` GiB.

  XLA:GPU schedules a step, and recomputes values rather than keep them
  (rematerialisation), to keep its temporaries under 95% of what the
  module's memory limit leaves beside its arguments and outputs.
  On a GPU, JAX's client sets that limit to its allocator's
  (XLA_PYTHON_CLIENT_MEM_FRACTION of the memory, 0.75 by default); for a
  compile-only device there is none, and XLA takes 80% of the
  description's device_memory_size instead.
  """
  if not isinstance(target_config, str):
    raise ValueError("only a text GPU description's memory can be set")
  device_memory_gib(target_config)  # Has one to replace.
  size = int(gib * 2**30 / XLA_SHARE_OF_DEVICE_MEMORY)
  return re.sub(r"device_memory_size:\s*\d+", f"device_memory_size: {size}",
                target_config)


def compile_only_mesh(gpu_spec: str, arrays_gib: float | None = None):
  """A one-device `data` mesh of a compile-only GPU described in the file
  `gpu_spec` (a text GpuTargetConfigProto); with `arrays_gib`, XLA plans
  each step for that much memory (`with_memory_for_arrays`)."""
  from jax.experimental import topologies

  from trainer import mesh as mesh_lib
  target_config = read_target_config(gpu_spec)
  if arrays_gib is not None:
    target_config = with_memory_for_arrays(target_config, arrays_gib)
  topology = topologies.get_topology_desc(
      platform="cuda", target_config=target_config, topology="1x1x1")
  return topologies.make_mesh(topo=topology, mesh_shape=(1,),
                              axis_names=(mesh_lib.DATA_AXIS,))


def compile_steps(name: str, args, mesh) -> dict:
  """{trainer: compiled step} for model `name`: ours once per
  --bn_gradient, --bn_relu and --stem, and the reference, all for `mesh`."""
  import jax
  import jax.numpy as jnp

  import models
  from benchmarks import common
  from benchmarks import reference_step as ref_lib
  from trainer import compile as compile_lib
  from trainer import mesh as mesh_lib

  config = ref_lib.load(name, args)
  b, d = args.batch_size, config.dataset
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)

  compiled = {}
  for who, *variant in ref_lib.our_variants(
      ["one_pass"], args.bn_gradient.split(","), args.bn_relu.split(","),
      ref_lib.model_stems(config, args.stem.split(","))):
    ref_lib.set_variant(config, *variant)
    model = models.create_model(config)
    tx = common.optimizer(config)
    state = common.abstract_state(config, model, tx, mesh)
    # The function reference_step.py times.
    compiled[who] = ref_lib.compile_our_step(config, mesh, model, tx, state, b)
    print(f"compiled {name} {who}", file=sys.stderr, flush=True)

  init, step = ref_lib.reference_functions(ref_lib.reference_model(config),
                                           config)
  state = compile_lib.abstract(jax.eval_shape(init, jax.random.PRNGKey(0)),
                               replicated)
  batch = compile_lib.abstract(dict(
      image=jax.ShapeDtypeStruct((b, d.image_size, d.image_size, d.channels),
                                 jnp.uint8),
      label=jax.ShapeDtypeStruct((b,), jnp.int32)), data)
  compiled["reference"] = ref_lib.reference_jit(step, mesh).lower(
      state, batch).compile()
  print(f"compiled {name} reference", file=sys.stderr, flush=True)
  return compiled


def report(name: str, found: dict[str, list[Kernel]], top: int) -> list[str]:
  """The summary table and the `top` families that differ most."""
  lines = [f"{name}: the step's kernels on the GPU, per trainer",
           f"{'trainer':>24} {'kernels':>8} {'tiny':>6} {'library':>8} "
           f"{'GB moved':>9} {'masks GB':>9}"]
  for who, ks in found.items():
    s = summary(ks)
    lines.append(f"{who:>24} {s['kernels']:>8} {s['tiny']:>6} "
                 f"{s['library']:>8} {s['gb_moved']:>9.2f} "
                 f"{s['mask_gb']:>9.2f}")
  counts = {who: families(ks) for who, ks in found.items()}
  names = set().union(*counts.values())
  spread = lambda f: max(c[f] for c in counts.values()) - min(
      c[f] for c in counts.values())
  differing = sorted((f for f in names if spread(f)),
                     key=lambda f: (-spread(f), f))[:top]
  if differing:
    lines.append(f"{name}: kernels by family, the {len(differing)} that "
                 "differ most")
    lines.append(f"{'family':>32}" + "".join(f" {w:>24}" for w in counts))
    for f in differing:
      lines.append(f"{f:>32}" + "".join(f" {c[f]:>24}"
                                        for c in counts.values()))
  return lines


def against_profile(name: str, found: dict[str, list[Kernel]],
                    profiled_rows: list[dict]) -> list[str]:
  """Each trainer's compiled kernels against the operations a GPU profile
  recorded for it (`reference_step.py --ops_json` rows of model `name`):
  their numbers and the families whose counts differ."""
  lines = []
  for row in profiled_rows:
    if row["model"] != name or row["trainer"] not in found or not row["ops"]:
      continue
    profiled = collections.Counter(family(op) for op in row["ops"])
    compiled = families(found[row["trainer"]])
    differ = sorted(f for f in set(profiled) | set(compiled)
                    if profiled[f] != compiled[f])
    lines.append(
        f"{name} {row['trainer']}: {sum(profiled.values())} operations "
        f"profiled, {sum(compiled.values())} compiled; "
        + (", ".join(f"{f} {profiled[f]} vs {compiled[f]}" for f in differ)
           or "every family the same"))
  return lines


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  from benchmarks import reference_step as ref_lib
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="resnet50")
  p.add_argument("--image_size", type=int, default=224,
                 help="ResNet-50's; the small model keeps its 28 px")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--ghost_batch_size", type=int, default=32)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--bn_gradient", default="explicit",
                 help=f"comma-separated: {', '.join(ref_lib.BN_GRADIENTS)}")
  p.add_argument("--bn_relu", default="separate,fused",
                 help=f"comma-separated: {', '.join(ref_lib.BN_RELUS)}")
  p.add_argument("--stem", default="conv,space_to_depth",
                 help=f"comma-separated: {', '.join(ref_lib.STEMS)}")
  p.add_argument("--gpu", default=os.path.join(SPECS, "h100_sxm.txtpb"),
                 help="the GPU's description (text GpuTargetConfigProto)")
  p.add_argument("--families", type=int, default=12,
                 help="kernel families to list, those differing most")
  p.add_argument("--hlo_dir", default="",
                 help="also write each optimised HLO module here")
  p.add_argument("--json", default="",
                 help="also write the summaries and family counts here")
  p.add_argument("--profile", default="",
                 help="reference_step.py --ops_json output (.json or "
                      ".json.gz) of the same trainers, to compare with")
  return p


def main():
  p = parser()
  from benchmarks import reference_step as ref_lib
  a = p.parse_args()
  for name in a.models.split(","):
    if name not in ref_lib.MODELS:
      p.error(f"unknown model {name!r}; choose from "
              f"{', '.join(ref_lib.MODELS)}")
  ref_lib.choices(a.bn_gradient, ref_lib.BN_GRADIENTS, "--bn_gradient")
  ref_lib.choices(a.bn_relu, ref_lib.BN_RELUS, "--bn_relu")
  ref_lib.choices(a.stem, ref_lib.STEMS, "--stem")
  if not os.path.isfile(a.gpu):
    p.error(f"no GPU description at {a.gpu}")
  if a.profile and not os.path.isfile(a.profile):
    p.error(f"no profile at {a.profile}")
  from benchmarks.common import unwritable
  for reason in (unwritable(a.json), unwritable(a.hlo_dir, folder=True)):
    if reason:
      p.error(reason)
  if not plugin_found():
    sys.exit("gpu_program.py needs XLA's CUDA plugin (jax-cuda12-pjrt), "
             "which this Python lacks: run `make gpu-program-env`, then "
             ".venv-gpu-program/bin/python benchmarks/gpu_program.py")
  profiled_rows = ref_lib.load_ops_json(a.profile) if a.profile else []
  mesh = compile_only_mesh(a.gpu)
  results = {}
  for name in a.models.split(","):
    found = {}
    for who, step in compile_steps(name, a, mesh).items():
      text = step.as_text()
      found[who] = kernels(text)
      if a.hlo_dir:
        os.makedirs(a.hlo_dir, exist_ok=True)
        with open(os.path.join(a.hlo_dir, f"{name}_{who.replace('/', '_')}"
                               ".hlo"), "w") as f:
          f.write(text)
    print("\n".join(report(name, found, a.families)
                    + against_profile(name, found, profiled_rows)), flush=True)
    results[name] = {who: dict(summary(ks), families=dict(families(ks)))
                     for who, ks in found.items()}
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
