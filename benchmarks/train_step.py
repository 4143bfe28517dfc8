"""Examples/s of the compiled train step across global batch sizes.

    python benchmarks/train_step.py --config=configs/fashion_mnist.py \
        --batch_sizes=128,512 --devices=1,8 [--set max_device_batch=64 ...]

Each device count runs in its own subprocess (XLA fixes it at start-up); all
figures come from the same invocation so they can be compared side by side.
Data is random; only the step is timed (after one warm-up step).
"""
import argparse
import ast
import json
import os
import subprocess
import sys
import time


def measure(config_path, batch_sizes, steps, overrides):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ml_collections import config_flags  # noqa: F401 (loads config files)
  from ml_collections.config_flags import config_flags as cf

  import models
  from trainer import compile as compile_lib
  from trainer import loop
  from trainer import mesh as mesh_lib
  from trainer import optimizer as optimizer_lib

  path, _, variant = config_path.partition(":")
  config = cf._LoadConfigModule("bench_config", path).get_config(variant or None)
  for item in overrides:
    field, value = item.split("=", 1)
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = ast.literal_eval(value)
  mesh = mesh_lib.make_mesh()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.01,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  d = config.dataset
  compiler = compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx, abstract_state=abstract,
      image_shape=(d.image_size, d.image_size, d.channels),
      max_device_batch=config.max_device_batch,
      ghost_batch_size=config.ghost_batch_size,
      micro_batch_unroll=config.micro_batch_unroll, on_compiled=lambda *a: None)
  hyper = {k: jax.device_put(np.float32(v), mesh_lib.replicated(mesh))
           for k, v in dict(learning_rate=0.01, momentum=0.9, bn_decay=0.9).items()}
  rows = []
  rng = np.random.default_rng(0)
  for b in batch_sizes:
    step = compiler.compile(b)
    batch = mesh_lib.global_batch(dict(
        image=rng.normal(size=(b, d.image_size, d.image_size, d.channels)).astype(np.float32),
        label=rng.integers(0, d.num_classes, b).astype(np.int32)), mesh)
    state, m = step(state, batch, hyper)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch, hyper)
      jax.block_until_ready(m)
    seconds = (time.perf_counter() - start) / steps
    rows.append(dict(devices=mesh.size, batch_size=b,
                     micro_batches=compile_lib.micro_batches(
                         b, mesh.size, config.max_device_batch,
                         config.ghost_batch_size),
                     step_seconds=seconds, examples_per_second=b / seconds))
  compiler.close()
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--batch_sizes", default="128,512")
  p.add_argument("--devices", default="1,8")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE, e.g. model.width=8")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  sizes = [int(x) for x in a.batch_sizes.split(",")]
  if a.child:
    print(json.dumps(measure(a.config, sizes, a.steps, a.set)))
    return
  rows = []
  for n in a.devices.split(","):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]],
                         env=env, capture_output=True, text=True, check=True)
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  best = max(r["examples_per_second"] for r in rows)
  print(f"{'devices':>7} {'B':>6} {'micro':>5} {'ms/step':>8} {'ex/s':>8} {'vs best':>7}")
  for r in rows:
    print(f"{r['devices']:>7} {r['batch_size']:>6} {r['micro_batches']:>5} "
          f"{1000 * r['step_seconds']:>8.1f} {r['examples_per_second']:>8.0f} "
          f"{r['examples_per_second'] / best:>7.2f}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
