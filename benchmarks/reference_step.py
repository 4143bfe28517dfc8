"""Our train step against a plain Flax-ImageNet-style step, same process, same
batch, same mesh; plus model-FLOPs utilisation.

    python benchmarks/reference_step.py [--models=resnet50,small] \
        [--image_size=64] [--batch_size=64] [--devices=8] [--steps=5] \
        [--dtype=float32] [--peak_size=1024] \
        [--bn_variance=one_pass,two_pass] [--bn_gradient=explicit,autodiff] \
        [--bn_relu=fused,separate] [--stem=conv,space_to_depth] \
        [--in_flight=2] \
        [--cross] [--profile_steps=3] [--ops_json=ops.json]

On one GPU, the figure the performance issue asks for (bf16, 224 px;
`benchmarks/gpu_figures.sh` runs it with the GPUs' batch norm, both forms
of the stem's convolution and a profile, and `--cross` with CROSS=1):

    JAX_PLATFORMS=cuda python benchmarks/reference_step.py --models=resnet50 \
        --image_size=224 --batch_size=256 --ghost_batch_size=32 \
        --dtype=bfloat16 --peak_size=8192

The reference is what a user of Flax's ImageNet example runs: a ResNet v1.5
with ordinary `nn.BatchNorm` (statistics over the whole global batch, which
jit turns into cross-device all-reduces, the sync batch norm of that
example's pmap), optax SGD with Nesterov momentum, L2 weight decay in the
loss, `jax.jit` with the batch sharded over the same `data` mesh axis and the
state donated. Ours is the step `trainer/compile.py` compiles for the same
config and batch (host accumulation, one micro-batch: per-device gradients
in a shard_map, then the all-reduce and update): ghost batch norm, running
statistics at a per-example rate, momentum and ε as runtime scalars, the
noise-scale norms. Both get the same random batch of uint8 pixels, already
on the devices, and normalise it as their first operation. `--cross` adds
each step with the other's model, which tells a gap in the model from one in
the step around it. Each timed step is waited for before the next is
dispatched; `--in_flight=2` waits for it only after the next is dispatched,
as the trainer's loop runs on accelerators, which hides the host's dispatch
time behind the device's work.

FLOPs per step come from XLA's cost analysis of the unpartitioned step
(`Lowered.cost_analysis()`; a GPU backend has none, and the compiled GPU
program's analysis leaves out the cuDNN convolutions, so there a CPU child
process counts the same step; with `--stem=space_to_depth` it counts the
blocks' zero channels too, 1.5% more for ResNet-50); the peak is measured in
the same run as the best of five calls of ten chained `--dtype` matmuls
sharded over the same devices (one chain per device), so MFU = achieved
FLOP/s / measured matmul FLOP/s on this machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

BN_VARIANCES = ("one_pass", "two_pass")  # model.bn_fast_variance true, false
BN_GRADIENTS = ("explicit", "autodiff")  # model.bn_explicit_gradient
BN_RELUS = ("fused", "separate")  # model.bn_fuse_relu (explicit gradient)
STEMS = ("conv", "space_to_depth")  # model.stem_space_to_depth
MODELS = {
    # name: (config file, overrides)
    "resnet50": ("configs/imagenet_resnet50.py",
                 {}),  # --dtype sets model.dtype.
    "small": ("configs/fashion_mnist.py", {}),
}


def reference_model(config):
  """ResNet v1.5 with plain batch norm, shaped like `models.create_model`."""
  import flax.linen as nn
  import jax.numpy as jnp

  from models.pixels import model_input

  m = config.model
  bottleneck = m.name == "resnet50"
  dtype = jnp.dtype(m.dtype)  # Compute dtype; parameters stay float32.

  class Block(nn.Module):
    filters: int
    strides: int

    @nn.compact
    def __call__(self, x, train):
      norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                               dtype=dtype,
                               momentum=0.9, epsilon=1e-5)
      conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
      out_filters = self.filters * (4 if bottleneck else 1)
      if bottleneck:
        y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
        y = norm(scale_init=nn.initializers.zeros)(
            conv(out_filters, (1, 1))(y))
      else:
        y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
        y = norm(scale_init=nn.initializers.zeros)(
            conv(out_filters, (3, 3))(y))
      if x.shape != y.shape:
        x = norm()(conv(out_filters, (1, 1), self.strides)(x))
      return nn.relu(x + y)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      # uint8 pixels normalised on the device, as ours (models/pixels.py).
      x = model_input(x, tuple(config.dataset.mean),
                      tuple(config.dataset.std), dtype)
      if bottleneck:
        x = nn.Conv(m.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
                    dtype=dtype,
                    use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train,
                                 dtype=dtype)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        sizes = (3, 4, 6, 3)
      else:
        x = nn.Conv(m.width, (3, 3), use_bias=False, dtype=dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train,
                                 dtype=dtype)(x))
        sizes = (m.blocks_per_stage,) * 3
      for i, n in enumerate(sizes):
        for j in range(n):
          x = Block(m.width * 2**i, 2 if i > 0 and j == 0 else 1)(x, train)
      x = nn.Dense(config.dataset.num_classes, dtype=dtype)(
          jnp.mean(x, axis=(1, 2)))
      return x.astype(jnp.float32)

  return Net()


def load(name, args):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks.common import load_config
  path, overrides = MODELS[name]
  overrides = dict(overrides)
  if name == "resnet50":
    overrides["dataset.image_size"] = args.image_size
  overrides["ghost_batch_size"] = args.ghost_batch_size
  overrides["model.dtype"] = args.dtype
  config = load_config(path, [f"{k}={v}" for k, v in overrides.items()])
  return config


def build(name, args, compile_steps: bool = True) -> dict:
  """Ours (one per --bn_variance and --bn_gradient) and the reference for
  model `name` (with --cross, each step with the other's model too), their
  states, a random batch on the devices and the step scalars; the steps are
  compiled only if `compile_steps`."""
  import numpy as np

  import models
  from benchmarks import common
  from trainer import loop
  from trainer import mesh as mesh_lib

  config = load(name, args)
  mesh = mesh_lib.make_mesh()
  d, b = config.dataset, args.batch_size
  batch = mesh_lib.global_batch(
      common.random_batch(np.random.default_rng(0), d, b), mesh)

  def ours_step(model):
    """Our step for `model`: (tx, compiled step or None, state)."""
    tx = common.optimizer(config)
    state = loop.create_train_state(config, model, tx, mesh, seed=0)
    step = (compile_our_step(config, mesh, model, tx, state, b)
            if compile_steps else None)
    return tx, step, state

  # Ours, once per batch norm variance, gradient, ReLU and stem asked for
  # (the ReLU's place matters only to the written-out gradient).
  variances = choices(args.bn_variance, BN_VARIANCES, "--bn_variance")
  gradients = choices(args.bn_gradient, BN_GRADIENTS, "--bn_gradient")
  trainers = platform_variant(config)
  relus = choices(args.bn_relu or trainers["bn_relu"], BN_RELUS, "--bn_relu")
  stems = model_stems(config, choices(args.stem or trainers["stem"], STEMS,
                                      "--stem"))
  ours = {}  # trainer name: (config, model, tx, compiled step, state)
  for who, *variant in our_variants(variances, gradients, relus, stems):
    set_variant(config, *variant)
    model = models.create_model(config)
    ours[who] = (config.copy_and_resolve_references(), model,
                 *ours_step(model))
  ref_model = reference_model(config)
  if args.cross:
    ours["ours/ref_model"] = (config.copy_and_resolve_references(), ref_model,
                              *ours_step(ref_model))

  # Reference: its step for its model, and with --cross for ours.
  refs = {"reference": reference_step(ref_model, config, mesh, batch,
                                      compile_steps)}
  if args.cross:
    refs["ref/our_model"] = reference_step(ours[next(iter(ours))][1], config,
                                           mesh, batch, compile_steps)

  return dict(config=config, mesh=mesh, batch=batch,
              hyper=common.step_hyper(mesh, learning_rate=0.1), ours=ours,
              refs=refs)


def platform_variant(config) -> dict:
  """{'bn_relu': ..., 'stem': ...}: the BN_RELUS and STEMS values `config`
  runs on this platform, its unset fields resolved as the trainer would."""
  import models
  return dict(
      bn_relu="fused" if models.fuse_relu(config) else "separate",
      stem="space_to_depth" if models.stem_space_to_depth(config) else "conv")


def model_stems(config, stems: list[str]) -> list[str]:
  """`stems` for ResNet-50; ["conv"] for the other models, which have no
  7x7/2 stem (the blocked one is refused for them)."""
  return stems if config.model.name == "resnet50" else ["conv"]


def set_variant(config, variance: str, gradient: str, relu: str,
                stem: str = "conv") -> None:
  """Sets `config`'s batch norm to one of BN_VARIANCES, BN_GRADIENTS and
  BN_RELUS, and its stem to one of STEMS."""
  config.model.bn_fast_variance = variance == "one_pass"
  config.model.bn_explicit_gradient = gradient == "explicit"
  config.model.bn_fuse_relu = relu == "fused"
  config.model.stem_space_to_depth = stem == "space_to_depth"


def compile_our_step(config, mesh, model, tx, state, batch_size: int):
  """What the trainer runs for a per-device batch below max_device_batch,
  compiled for `mesh` and `state` (arrays or ShapeDtypeStructs): one
  composed function, as the reference's step is."""
  from trainer import compile as compile_lib
  compiler = compile_lib.StepCompiler.for_config(
      config, mesh=mesh, model=model, tx=tx, state=state,
      max_device_batch=2 * batch_size, micro_batch_unroll=0,
      accumulation="host", weight_average=False)
  try:
    return compiler.compile_accumulation(batch_size)["single"]
  finally:
    compiler.close()


def load_ops_json(path: str) -> list[dict]:
  """The rows of an --ops_json file (.json or .json.gz)."""
  import gzip
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def our_variants(variances, gradients, relus, stems=("conv",)):
  """[(row name, variance, gradient, relu, stem)]: every combination, except
  that autodiff's gradient runs once per stem (the ReLU's place matters only
  to the written-out one); a row is named by the settings that vary."""
  rows = []
  for variance in variances:
    for gradient in gradients:
      for relu in relus if gradient == "explicit" else relus[:1]:
        for stem in stems:
          named = ((variance, variances), (gradient, gradients),
                   (relu if gradient == "explicit" else "", relus),
                   (stem, stems))
          who = "/".join(["ours"]
                         + [v for v, vs in named if v and len(vs) > 1])
          rows.append((who, variance, gradient, relu, stem))
  return rows


def choices(flag_value: str, allowed, flag: str) -> list[str]:
  values = flag_value.split(",")
  for value in values:
    if value not in allowed:
      raise SystemExit(f"unknown {flag} {value!r}; choose from "
                       f"{', '.join(allowed)}")
  return values


def reference_functions(model, config):
  """The Flax-ImageNet-style (init, step) for `model`, not yet jitted:
  init(key) -> state; step(state, batch) -> (state, loss)."""
  import flax
  import jax
  import jax.numpy as jnp
  import optax

  d = config.dataset
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  weight_decay = config.optimizer.weight_decay

  @flax.struct.dataclass
  class RefState:
    params: object
    batch_stats: object
    opt_state: object

  def init(key):
    v = model.init(key, jnp.zeros((config.ghost_batch_size, d.image_size,
                                   d.image_size, d.channels)), train=False)
    return RefState(v["params"], v["batch_stats"], tx.init(v["params"]))

  def step(state, batch):
    def loss_fn(params):
      logits, new = model.apply(
          {"params": params, "batch_stats": state.batch_stats},
          batch["image"], train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]).mean()
      l2 = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params)
               if p.ndim > 1)
      return loss + 0.5 * weight_decay * l2, new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return RefState(optax.apply_updates(state.params, updates), stats,
                    opt_state), loss

  return init, step


def reference_jit(step, mesh):
  """`step` jitted as the reference runs it: state replicated and donated,
  the batch split over the `data` axis."""
  import jax

  from trainer import mesh as mesh_lib
  replicated, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def reference_step(model, config, mesh, batch, compile_steps: bool) -> dict:
  """The Flax-ImageNet-style step for `model`: its jitted init and step, a
  state, and the compiled step (None unless `compile_steps`)."""
  import jax

  from trainer import compile as compile_lib
  from trainer import mesh as mesh_lib

  init, step = reference_functions(model, config)
  init = jax.jit(init, out_shardings=mesh_lib.replicated(mesh))
  jitted = reference_jit(step, mesh)
  state = init(jax.random.PRNGKey(0))
  abstract = compile_lib.abstract
  compiled = (jitted.lower(abstract(state), abstract(batch)).compile()
              if compile_steps else None)
  return dict(init=init, jit=jitted, state=state, step=compiled)


def count_flops(built) -> dict:
  """{trainer: FLOPs of one step} of `build`'s steps, from XLA's cost
  analysis of the unpartitioned step (the whole global batch); None for
  each on a backend with no analysis before compiling (GPU: `main` then
  counts them on the CPU, where the same program has the same FLOPs)."""
  import functools
  import jax

  from trainer import compile as compile_lib
  from trainer import step as step_lib

  abstract, batch = compile_lib.abstract, built["batch"]
  lowered = {who: ref["jit"].lower(abstract(ref["state"]), abstract(batch))
             for who, ref in built["refs"].items()}
  for who, (_, model, tx, _, state) in built["ours"].items():
    lowered[who] = jax.jit(functools.partial(
        step_lib.train_step, model=model, tx=tx,
        num_devices=built["mesh"].size)).lower(
            abstract(state), abstract(batch), abstract(built["hyper"]))
  return {who: _flops(x) for who, x in lowered.items()}


def measure(name, args):
  import jax
  import numpy as np

  from trainer import loop

  built = build(name, args)
  flops = count_flops(built)
  mesh, batch, hyper, ours, refs = (
      built[k] for k in ("mesh", "batch", "hyper", "ours", "refs"))

  def timed(fn, state, *rest):
    """Seconds per step after one untimed step: the median of `args.steps`
    steps each waited for (`--in_flight=1`), or their mean when each is
    waited for only after the next is dispatched (2, as the trainer's loop
    runs on accelerators)."""
    run = _Runner(fn, state, *rest)
    run()
    if args.in_flight == 2:
      start = time.perf_counter()
      run.one_ahead(args.steps)
      return (time.perf_counter() - start) / args.steps
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    return float(np.median(times))

  # Interleave them so that a noisy neighbour hits all alike. Each step
  # donates its state: every run gets a fresh one.
  fresh = {who: functools.partial(loop.create_train_state, cfg, model, tx,
                                  mesh, seed=0)
           for who, (cfg, model, tx, _, _) in ours.items()}
  fresh.update({who: functools.partial(ref["init"], jax.random.PRNGKey(0))
                for who, ref in refs.items()})
  runs = {who: (step, (batch, hyper)) for who, (*_, step, _) in ours.items()}
  runs.update({who: (ref["step"], (batch,)) for who, ref in refs.items()})
  seconds = {who: [] for who in runs}
  for _ in range(args.rounds):
    for who, (step, rest) in runs.items():
      seconds[who].append(timed(step, fresh[who](), *rest))
  ops = {}
  if args.profile_steps:
    from benchmarks import trace_ops
    for who, (step, rest) in runs.items():
      ops[who] = trace_ops.trace(_Runner(step, fresh[who](), *rest),
                                 args.profile_steps)
  config, b = built["config"], args.batch_size
  peak = matmul_peak(mesh, config.model.dtype, args.peak_size)
  rows = []
  for who in seconds:
    s = float(np.median(seconds[who]))
    rows.append(dict(model=name, trainer=who, devices=mesh.size,
                     image_size=config.dataset.image_size, batch_size=b,
                     step_seconds=s, examples_per_second=b / s,
                     step_flops=flops[who], peak_flops=peak,
                     ops=ops.get(who),
                     **(platform_variant(ours[who][0]) if who in ours
                        else {})))
  return rows


def flops_child_flags(rows) -> list[str]:
  """--bn_relu and --stem as the measured `rows` ran them: a FLOPs child on
  the CPU would otherwise resolve unset ones for the CPU, not the GPU."""
  flags = []
  for key in ("bn_relu", "stem"):
    values = dict.fromkeys(r[key] for r in rows if key in r)
    if values:
      flags.append(f"--{key}={','.join(values)}")
  return flags


class _Runner:
  """Calls a donating step on its own state, waiting for each result."""

  def __init__(self, step, state, *rest):
    self.step, self.state, self.rest = step, state, rest

  def __call__(self):
    import jax
    self.state, out = self.step(self.state, *self.rest)
    jax.block_until_ready(out)

  def one_ahead(self, steps: int):
    """`steps` steps, each waited for after the next one is dispatched."""
    import jax

    from benchmarks import common
    self.state = common.run_steps(self.step, self.state, self.rest, steps,
                                  2, jax.block_until_ready)


def _flops(lowered) -> float | None:
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return None if cost is None else float(cost["flops"])


def matmul_peak(mesh, dtype="float32", n=1024, repeats=5, chain=10) -> float:
  """Best FLOP/s of `chain` dependent n x n `dtype` matmuls per device in
  one program, all devices at once, over `repeats` calls.

  One program of many products: the host's dispatch and wait, timed with
  them, are then a small part of the time, and each sample is longer (a
  single 8192^3 product, 1.5-1.8 ms on an H100, read 614 and 717 TFLOP/s in
  two calls on one machine, the first just after it started)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  sharding = NamedSharding(mesh, P("data"))
  # Random operands: a GPU multiplies constant ones or zeros faster.
  a, b = jax.jit(lambda key: product_operands(key, mesh.size, n, dtype),
                 out_shardings=(sharding, sharding))(jax.random.PRNGKey(0))
  f = jax.jit(functools.partial(product_chain, chain=chain),
              out_shardings=sharding)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 * chain * mesh.size / best


def product_operands(key, devices: int, n: int, dtype):
  """[devices, n, n] a with standard normal entries and b with entries of
  variance 1/n, so that a @ b @ b ... keeps entries of variance about 1."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(key)
  a = jax.random.normal(ka, (devices, n, n), dtype)
  b = (jax.random.normal(kb, (devices, n, n), jnp.float32)
       / jnp.sqrt(jnp.float32(n))).astype(dtype)
  return a, b


def product_chain(a, b, chain: int):
  """a @ b @ ... @ b (`chain` products per device), each on the last."""
  import jax.numpy as jnp
  for _ in range(chain):
    a = jnp.einsum("dij,djk->dik", a, b)
  return a


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="resnet50,small")
  p.add_argument("--image_size", type=int, default=64,
                 help="ResNet-50 input size (the small model keeps 28)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--ghost_batch_size", type=int, default=8)
  p.add_argument("--dtype", default="float32",
                 help="compute dtype of both models and of the peak matmul "
                      "(bfloat16 on an accelerator)")
  p.add_argument("--peak_size", type=int, default=1024,
                 help="n of the n x n matmul that measures the peak (8192 "
                      "on a GPU)")
  p.add_argument("--bn_variance", default="one_pass",
                 help="ghost batch norm variance of ours: one_pass, two_pass "
                      "or both (comma-separated), each a row")
  p.add_argument("--bn_gradient", default="explicit",
                 help="ghost batch norm gradient of ours: explicit, "
                      "autodiff or both (comma-separated), each a row")
  p.add_argument("--bn_relu", default="",
                 help="with the explicit gradient, the ReLU (and a skip "
                      "add before it) after a batch norm inside its "
                      "gradient (fused), after it (separate) or both "
                      "(comma-separated), each a row; default: the "
                      "trainer's on this platform (fused on a GPU)")
  p.add_argument("--stem", default="",
                 help="ResNet-50's 7x7/2 stem conv as it is (conv), as a "
                      "4x4/1 conv over 2x2 pixel blocks (space_to_depth) or "
                      "both (comma-separated), each a row; default: the "
                      "trainer's on this platform")
  p.add_argument("--profile_steps", type=int, default=0,
                 help="after timing, trace this many steps of each trainer "
                      "and print device time per kind of operation")
  p.add_argument("--cross", action="store_true",
                 help="two more rows: our step with the reference's model "
                      "and the reference's step with our model")
  p.add_argument("--ops_json", default="",
                 help="with --profile_steps, write every row with all its "
                      "operations' ms per step to this JSON file")
  p.add_argument("--top_ops", type=int, default=12,
                 help="operations listed per trainer with --profile_steps")
  p.add_argument("--devices", default="8")
  p.add_argument("--steps", type=int, default=3, help="timed steps per round")
  p.add_argument("--in_flight", type=int, default=1,
                 help="1: wait for each step; 2: wait for each step after "
                      "dispatching the next (config.steps_in_flight)")
  p.add_argument("--rounds", type=int, default=2,
                 help="alternating rounds of ours and the reference")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--flops_child", default="", help=argparse.SUPPRESS)
  p.add_argument("--from_ops_json", default="",
                 help="print the profile tables of an --ops_json file "
                      "(.json or .json.gz) instead of measuring")
  return p


def main():
  p = parser()
  a = p.parse_args()
  if a.in_flight not in (1, 2):
    p.error(f"--in_flight must be 1 or 2, got {a.in_flight}")
  from benchmarks.common import unwritable
  if unwritable(a.ops_json):
    p.error(unwritable(a.ops_json))
  if a.from_ops_json:
    print_profiles(load_ops_json(a.from_ops_json), a.top_ops)
    return
  if a.child:
    print(json.dumps(measure(a.child, a)))
    return
  if a.flops_child:
    print(json.dumps(count_flops(build(a.flops_child, a,
                                       compile_steps=False))))
    return
  from benchmarks import child
  rows = []
  for name in a.models.split(","):
    if name not in MODELS:
      sys.exit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    measured = child.run(__file__, f"--child={name}", a.devices, name)
    if any(r["step_flops"] is None for r in measured):
      flops = child.run(__file__, f"--flops_child={name}", a.devices,
                        f"{name} (FLOPs on the CPU)", platforms="cpu",
                        extra_args=flops_child_flags(measured))
      for r in measured:
        r["step_flops"] = flops[r["trainer"]]
    rows += measured
  print(f"{'model':>9} {'trainer':>20} {'px':>4} {'B':>5} {'ms/step':>8} "
        f"{'ex/s':>7} {'GFLOP/step':>10} {'MFU':>6} {'vs ref':>6}")
  for r in rows:
    ref = next(x for x in rows if x["model"] == r["model"]
               and x["trainer"] == "reference")
    mfu = r["step_flops"] / r["step_seconds"] / r["peak_flops"]
    print(f"{r['model']:>9} {r['trainer']:>20} {r['image_size']:>4} "
          f"{r['batch_size']:>5} {1000 * r['step_seconds']:>8.1f} "
          f"{r['examples_per_second']:>7.1f} {r['step_flops'] / 1e9:>10.2f} "
          f"{mfu:>6.1%} "
          f"{r['examples_per_second'] / ref['examples_per_second']:>6.2f}")
  print(f"peak: {rows[0]['peak_flops'] / 1e9:.1f} GFLOP/s {a.dtype} matmul over "
        f"{rows[0]['devices']} devices")
  if a.profile_steps:
    print_profiles(rows, a.top_ops)
    if a.ops_json:
      with open(a.ops_json, "w") as f:
        json.dump(rows, f, indent=1)


def print_profiles(rows, top: int):
  """Per model: device ms per step by kind of operation, one column per
  trainer; then by family of operations (fusions of the same kind), the
  `top` families by their largest difference between trainers; then each
  trainer's `top` operations."""
  from benchmarks import trace_ops
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    header = "".join(f" {r['trainer']:>20}" for r in mine)
    kinds = {r["trainer"]: trace_ops.by_category(r["ops"]) for r in mine}
    print(f"\n{model}: device ms per step (profiler trace)")
    print(f"{'operations':<36}" + header)
    for label, _ in (*trace_ops.CATEGORIES, ("total", None)):
      values = [sum(kinds[r["trainer"]].values()) if label == "total"
                else kinds[r["trainer"]].get(label, 0.0) for r in mine]
      if any(values):
        print(f"{label:<36}" + "".join(f" {v:20.2f}" for v in values))
    families = {r["trainer"]: trace_ops.by_family(r["ops"]) for r in mine}
    names = set().union(*families.values())
    spread = lambda name: (max(f.get(name, (0, 0))[0] for f in families.values())
                           - min(f.get(name, (0, 0))[0]
                                 for f in families.values()))
    print(f"\n{model}: ms per step (operations) by family, the {top} "
          f"families that differ most")
    print(f"{'family':<36}" + header)
    for name in sorted(names, key=lambda n: -spread(n))[:top]:
      cells = (families[r["trainer"]].get(name, (0.0, 0)) for r in mine)
      print(f"{name[:36]:<36}" + "".join(f" {ms:14.2f} ({n:>3})"
                                         for ms, n in cells))
    for r in mine:
      print(f"{r['trainer']}: top {top} operations, ms per step")
      for op, ms in sorted(r["ops"].items(), key=lambda x: -x[1])[:top]:
        print(f"  {ms:9.3f}  {op[:100]}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
