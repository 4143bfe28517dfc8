"""Kernels of a conv/norm/ReLU stack's train step as XLA compiles it for an
H100 (no GPU needed), with ghost batch norm and with Flax's BatchNorm; and
of a max pool's gradient, models/max_pool.py's and nn.max_pool's.

Run by tests/test_gpu_program.py with the Python of `make gpu-program-env`;
prints one JSON line {"ghost": {...}, "plain": {...}, "ghost_fused": {...},
"pool": {...}, "pool_flax": {...}} of `benchmarks.gpu_program.summary`
figures.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import gpu_program  # noqa: E402
from models.ghost_batch_norm import GhostBatchNorm  # noqa: E402
from models.max_pool import max_pool  # noqa: E402
from trainer import compile as compile_lib  # noqa: E402
from trainer import mesh as mesh_lib  # noqa: E402

# ResNet-50's 28 x 28 x 128 stage, B=256 in ghost batches of 32.
BATCH, SIZE, CHANNELS, GHOST, LAYERS = 256, 28, 128, 32, 4


class Stack(nn.Module):
  norm: str  # "ghost", "ghost_fused" or "plain"

  @nn.compact
  def __call__(self, x):
    for i in range(LAYERS):
      y = nn.Conv(CHANNELS, (3, 3), use_bias=False, dtype=jnp.bfloat16)(x)
      skip = x if i else None
      if self.norm == "plain":
        y = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)(y)
        x = nn.relu(y if skip is None else skip + y)
      else:
        x = GhostBatchNorm(GHOST, False, jnp.bfloat16, 1e-5, relu=True,
                           fuse_relu=self.norm == "ghost_fused")(y, skip)
    return jnp.mean(x.astype(jnp.float32))


def compiled_kernels(norm: str, mesh) -> dict:
  net = Stack(norm)
  replicated, data = (mesh_lib.replicated(mesh),
                      mesh_lib.batch_sharding(mesh))
  variables = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0),
      jnp.zeros((GHOST, SIZE, SIZE, CHANNELS), jnp.bfloat16)))
  variables = compile_lib.abstract(variables, replicated)
  x = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, CHANNELS), jnp.bfloat16,
                           sharding=data)

  def step(variables, x):
    def loss(params):
      return net.apply({"params": params,
                        "batch_stats": variables["batch_stats"]}, x,
                       mutable=["batch_stats"])
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"])
    params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g,
                                    variables["params"], grads)
    return params, stats

  compiled = jax.jit(step, in_shardings=(replicated, data),
                     out_shardings=replicated).lower(variables, x).compile()
  return gpu_program.summary(gpu_program.kernels(compiled.as_text()))


def compiled_pool_gradient(pool, mesh) -> dict:
  """The gradient of ResNet-50's stem pool (3x3, stride 2) at its 112 px
  stage, B=64."""
  x = jax.ShapeDtypeStruct((64, 112, 112, 64), jnp.bfloat16,
                           sharding=mesh_lib.batch_sharding(mesh))
  dy = jax.ShapeDtypeStruct((64, 56, 56, 64), jnp.bfloat16,
                            sharding=mesh_lib.batch_sharding(mesh))

  def gradient(x, dy):
    _, vjp = jax.vjp(lambda x: pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
    return vjp(dy)[0]

  compiled = jax.jit(gradient).lower(x, dy).compile()
  return gpu_program.summary(gpu_program.kernels(compiled.as_text()))


if __name__ == "__main__":
  mesh = gpu_program.compile_only_mesh(
      os.path.join(gpu_program.SPECS, "h100_sxm.txtpb"))
  runs = {norm: compiled_kernels(norm, mesh)
          for norm in ("ghost", "ghost_fused", "plain")}
  runs["pool"] = compiled_pool_gradient(max_pool, mesh)
  runs["pool_flax"] = compiled_pool_gradient(nn.max_pool, mesh)
  print(json.dumps(runs))
