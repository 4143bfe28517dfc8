"""Ghost batch norm against NumPy, and its sharding contract on 8 devices."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models
from models import GhostBatchNorm
from models import ghost_batch_norm

EPSILON = 1e-5


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def numpy_ghost_batch_norm(x, g, scale, bias, epsilon):
  """Reference in float64: output, and the mean over groups of mean and var."""
  x = np.asarray(x, np.float64)
  groups = x.reshape((x.shape[0] // g, g) + x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mean = groups.mean(axis=axes, keepdims=True)
  var = ((groups - mean) ** 2).mean(axis=axes, keepdims=True)
  y = (groups - mean) / np.sqrt(var + epsilon) * scale + bias
  channels = x.shape[-1]
  return (y.reshape(x.shape), mean.reshape(-1, channels).mean(0),
          var.reshape(-1, channels).mean(0))


def random_variables(x, rng):
  channels = x.shape[-1]
  params = {"scale": rng.uniform(0.5, 2.0, channels).astype(np.float32),
            "bias": rng.normal(size=channels).astype(np.float32)}
  stats = {"mean": np.full(channels, 123.0, np.float32),
           "var": np.full(channels, 456.0, np.float32)}
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("g,shape", [
    (1, (6, 3, 3, 5)),
    (2, (8, 4, 4, 3)),
    (4, (8, 2, 3, 3)),
    (8, (8, 4, 4, 3)),  # One group: plain batch norm.
    (3, (9, 7)),  # No spatial axes.
])
@pytest.mark.parametrize("fast_variance", [True, False])
def test_training_matches_numpy(g, shape, fast_variance):
  rng = np.random.default_rng(g)
  # Groups with different offsets and spreads, so a wrong grouping shows.
  x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, (shape[0],) + (1,) *
                                            (len(shape) - 1))
       + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)))
  x = x.astype(np.float32)
  variables = random_variables(x, rng)
  module = GhostBatchNorm(ghost_batch_size=g, use_running_average=False,
                          dtype=jnp.float32, epsilon=EPSILON,
                          fast_variance=fast_variance)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  want_y, want_mean, want_var = numpy_ghost_batch_norm(
      x, g, variables["params"]["scale"], variables["params"]["bias"], EPSILON)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  # The batch's statistics are written as they are: no moving average here.
  stats = updates["batch_stats"]
  assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
  np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5, atol=1e-5)


def test_fast_variance_of_a_constant_group_is_not_negative():
  """E[x²] - E[x]² of a constant group of 999.9, summed in float32 as the
  module sums (each example's 5 x 5 pixels, then the group's 2 examples),
  rounds to -0.375; the clamp keeps var + epsilon positive, so the output
  is finite."""
  x = np.full((4, 5, 5, 2), 999.9, np.float32)
  variables = random_variables(x, np.random.default_rng(0))
  module = GhostBatchNorm(ghost_batch_size=2, use_running_average=False,
                          dtype=jnp.float32, epsilon=EPSILON)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], 0.0)
  # Unclamped, rsqrt(-0.375 + epsilon) would make every output NaN.
  assert np.isfinite(y).all()


def grads_of_a_loss(x, variables, g, fast_variance, explicit_gradient,
                    dtype=jnp.float32, relu=False, fuse_relu=True,
                    residual=None):
  """Gradients in x, scale and bias (and the residual, if one is given, as a
  third element) of a loss that reaches the output and both written
  statistics, with random weights so no term cancels."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=x.shape).astype(np.float32)
  a, b = rng.normal(size=(2, x.shape[-1])).astype(np.float32)
  module = GhostBatchNorm(ghost_batch_size=g, use_running_average=False,
                          dtype=dtype, epsilon=EPSILON,
                          fast_variance=fast_variance,
                          explicit_gradient=explicit_gradient, relu=relu,
                          fuse_relu=fuse_relu)

  def loss(params, x, residual):
    y, updates = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        residual, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    return (jnp.sum(jnp.asarray(y, jnp.float32) * w)
            + jnp.sum(stats["mean"] * a) + jnp.sum(stats["var"] * b))

  argnums = (0, 1) if residual is None else (0, 1, 2)
  return jax.grad(loss, argnums=argnums)(variables["params"], x, residual)


@pytest.mark.parametrize("g,shape", [
    (2, (8, 4, 4, 3)), (4, (8, 2, 3, 3)), (8, (8, 4, 4, 3)), (3, (9, 7))])
@pytest.mark.parametrize("fast_variance", [True, False])
def test_explicit_gradient_equals_autodiff(g, shape, fast_variance):
  rng = np.random.default_rng(g)
  x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, (shape[0],) + (1,) *
                                            (len(shape) - 1))
       + rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)))
  x = x.astype(np.float32)
  variables = random_variables(x, rng)
  (params, dx), (want_params, want_dx) = (
      grads_of_a_loss(x, variables, g, fast_variance, explicit)
      for explicit in (True, False))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(params[name], want_params[name], rtol=1e-4,
                               atol=1e-4)
  assert np.abs(dx).max() > 1e-2  # Not vacuously equal.


@pytest.mark.parametrize("g,shape", [
    (2, (8, 4, 4, 3)), (3, (9, 7)), (4, (8, 3, 3, 16))])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_relu_gradient_equals_autodiff_of_relu_after_the_norm(
    g, shape, fuse, with_residual):
  """The written-out gradient with the residual add and the ReLU inside it
  (the mask recomputed from x, or after a skip add kept from the forward
  pass: packed to bits where the channels are a multiple of 8, 16 here,
  else recomputed) or after it, against autodiff of the norm, then
  `residual + y`, then nn.relu."""
  rng = np.random.default_rng(g)
  x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
  variables = random_variables(x, rng)
  residual = (rng.normal(size=shape).astype(np.float32) if with_residual
              else None)
  got = grads_of_a_loss(x, variables, g, True, True, relu=True,
                        fuse_relu=fuse, residual=residual)
  want = grads_of_a_loss(x, variables, g, True, False, relu=True,
                         residual=residual)
  for got_part, want_part in zip(got[1:], want[1:]):  # dx, dresidual
    np.testing.assert_allclose(got_part, want_part, rtol=1e-4, atol=1e-4)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4,
                               atol=1e-4)
  # The mask matters: without the ReLU the gradient is another one.
  linear = grads_of_a_loss(x, variables, g, True, True, residual=residual)
  assert np.abs(got[1] - linear[1]).max() > 1e-2
  if with_residual:  # The masked dy: zero where the ReLU cut, else w.
    assert 0.2 < (np.asarray(got[2]) == 0).mean() < 0.8


def test_relu_mask_packs_eight_channels_to_a_byte():
  mask = np.random.default_rng(3).random((2, 3, 24)) < 0.5
  packed = ghost_batch_norm._pack_bits(jnp.asarray(mask))
  assert packed.dtype == jnp.uint8 and packed.shape == (2, 3, 3)
  # Channel 8i + j is bit j of byte i.
  assert int(packed[0, 0, 1]) == sum(int(mask[0, 0, 8 + j]) << j
                                     for j in range(8))
  np.testing.assert_array_equal(
      ghost_batch_norm._unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_relu_output_is_the_relu_of_the_norm(train, dtype, with_residual):
  """Fused or not, training or evaluation: nn.relu(residual + y) of the
  plain norm's output y, to the bit (rounding to bfloat16 keeps signs, so
  without a residual the ReLU before or after it gives the same values)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 3, 3, 4)) * 2 + 0.5, dtype)
  variables = random_variables(x, rng)
  variables["batch_stats"] = {"mean": jnp.full((4,), 0.3),
                              "var": jnp.full((4,), 2.0)}
  residual = (jnp.asarray(rng.normal(size=x.shape), dtype) if with_residual
              else None)

  def output(residual=None, **kwargs):
    module = GhostBatchNorm(ghost_batch_size=4, use_running_average=not train,
                            dtype=dtype, epsilon=EPSILON, **kwargs)
    return module.apply(variables, x, residual, mutable=["batch_stats"])[0]

  want = nn.relu(output() if residual is None else residual + output())
  want = np.asarray(want, np.float32)
  assert (want == 0).mean() > 0.2 and (want > 0).mean() > 0.2
  for fuse in (True, False):
    got = output(residual, relu=True, fuse_relu=fuse)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_residual_of_another_shape_is_refused():
  x = jnp.ones((8, 3, 3, 4))
  module = GhostBatchNorm(ghost_batch_size=4, use_running_average=False,
                          dtype=jnp.float32, epsilon=EPSILON, relu=True)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=re.escape(
      "ghost batch norm: residual of shape (8, 3, 3, 8) does not match the "
      "input's (8, 3, 3, 4)")):
    module.apply(variables, x, jnp.ones((8, 3, 3, 8)), mutable=["batch_stats"])


def test_explicit_gradient_in_bfloat16_keeps_the_dtypes():
  """bf16 activations (the accelerator setting): dx comes back in bf16, the
  parameters' gradients in float32, and both near autodiff's."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 4, 4, 6)) * 2 + 1, jnp.bfloat16)
  variables = random_variables(x, rng)
  (params, dx), (want_params, want_dx) = (
      grads_of_a_loss(x, variables, 4, True, explicit, dtype=jnp.bfloat16)
      for explicit in (True, False))
  assert dx.dtype == jnp.bfloat16 and params["scale"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float32),
                             np.asarray(want_dx, np.float32),
                             rtol=5e-2, atol=5e-2)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(params[name], want_params[name], rtol=2e-2,
                               atol=2e-2)


def test_micro_batches_average_to_the_full_batch():
  """What the trainer relies on: halves' stats average to the batch's."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3, 3, 4)).astype(np.float32) * 2 + 1
  variables = random_variables(x, rng)
  module = GhostBatchNorm(ghost_batch_size=4, use_running_average=False,
                          dtype=jnp.float32, epsilon=EPSILON)
  apply = lambda x: module.apply(variables, x, mutable=["batch_stats"])
  y, full = apply(x)
  (y0, half0), (y1, half1) = apply(x[:8]), apply(x[8:])
  np.testing.assert_allclose(y, np.concatenate([y0, y1]), rtol=1e-6, atol=1e-6)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
        full["batch_stats"][name],
        (half0["batch_stats"][name] + half1["batch_stats"][name]) / 2,
        rtol=1e-6, atol=1e-6)


def test_eval_normalises_with_running_stats():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 2, 2, 3)).astype(np.float32)  # Not a multiple of g.
  params = {"scale": np.array([1.0, 2.0, 0.5], np.float32),
            "bias": np.array([0.0, 1.0, -1.0], np.float32)}
  stats = {"mean": np.array([0.5, -1.0, 2.0], np.float32),
           "var": np.array([4.0, 0.25, 1.0], np.float32)}
  module = GhostBatchNorm(ghost_batch_size=4, use_running_average=True,
                          dtype=jnp.float32, epsilon=EPSILON)
  y = module.apply({"params": params, "batch_stats": stats}, x)
  want = ((x - stats["mean"]) / np.sqrt(stats["var"] + EPSILON)
          * params["scale"] + params["bias"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_init_keeps_neutral_stats_and_float32_params():
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  module = GhostBatchNorm(ghost_batch_size=4, use_running_average=False,
                          dtype=jnp.bfloat16, epsilon=EPSILON)
  variables = module.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  y, _ = module.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16


def test_batch_not_multiple_of_ghost_batch_size_is_rejected():
  module = GhostBatchNorm(ghost_batch_size=4, use_running_average=False,
                          dtype=jnp.float32, epsilon=EPSILON)
  x = jnp.ones((10, 3))
  variables = module.init(jax.random.key(0), x[:8])
  with pytest.raises(ValueError,
                     match=r"batch of 10 examples .* ghost_batch_size=4"):
    module.apply(variables, x, mutable=["batch_stats"])


def test_update_running_stats_by_hand():
  old = {"block": {"mean": jnp.array([1.0, 2.0]),
                    "var": jnp.array([4.0, 4.0])}}
  step = {"block": {"mean": jnp.array([3.0, 6.0]),
                     "var": jnp.array([2.0, 0.0])}}
  new = models.update_running_stats(old, step, 0.75)
  np.testing.assert_allclose(new["block"]["mean"], [1.5, 3.0])
  np.testing.assert_allclose(new["block"]["var"], [3.5, 3.0])
  assert new["block"]["mean"].dtype == jnp.float32


def test_running_stats_decay_is_per_example():
  np.testing.assert_allclose(models.running_stats_decay(128, 0.9, 128), 0.9)
  np.testing.assert_allclose(models.running_stats_decay(512, 0.9, 128),
                             0.9 ** 4)
  # Two steps of 64 forget as much as one of 128.
  np.testing.assert_allclose(models.running_stats_decay(64, 0.9, 128) ** 2,
                             0.9)
  with pytest.raises(ValueError, match="bn_momentum must be in"):
    models.running_stats_decay(128, 1.0, 128)
  with pytest.raises(ValueError, match="bn_momentum_examples must be positive"):
    models.running_stats_decay(128, 0.9, 0)


# --- Sharding: a data-parallel forward + grad on 8 virtual devices. ---

GHOST = 4
BATCH = 64  # 8 examples, 2 ghost groups, per device.


def small_model(ghost_batch_size):
  return models.SmallResNet(
      blocks_per_stage=1, num_classes=10, width=4,
      ghost_batch_size=ghost_batch_size, bn_epsilon=EPSILON,
      zero_init_residual=False, dtype=jnp.float32)


def compiled_train_grad(mesh, model, variables, images, labels):
  """A jitted loss + grad of a training forward, batch sharded on `data`."""
  def loss_and_grads(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      log_probs = jax.nn.log_softmax(logits)
      loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))
      return loss, (logits, updates["batch_stats"])
    (loss, (logits, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, logits, stats, grads

  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  step = jax.jit(loss_and_grads,
                 in_shardings=(replicated, replicated, data, data),
                 out_shardings=(replicated, data, replicated, replicated))
  args = (jax.device_put(variables["params"], replicated),
          jax.device_put(variables["batch_stats"], replicated),
          jax.device_put(images, data), jax.device_put(labels, data))
  return step.lower(*args).compile(), args


def collectives(ghost_batch_size, images, labels):
  """Collective op names in the compiled 8-device step, and the distinct
  replica groups of its all-reduces."""
  model = small_model(ghost_batch_size)
  variables = model.init(jax.random.key(0), images[:ghost_batch_size],
                         train=False)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  compiled, _ = compiled_train_grad(mesh, model, variables, images, labels)
  hlo = compiled.as_text()
  found = {name for name in ("all-gather", "all-to-all", "collective-permute",
                             "reduce-scatter", "all-reduce") if name in hlo}
  groups = {re.search(r"replica_groups=(\S+)", line).group(1)
            for line in hlo.splitlines()
            if re.search(r"= .*\ball-reduce(-start)?\(", line)}
  return found, groups


@pytest.fixture(scope="module")
def batch():
  assert jax.device_count() == 8, (
      "these tests need 8 virtual devices (tests/conftest.py sets XLA_FLAGS="
      "--xla_force_host_platform_device_count=8 before jax starts)")
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)
  return images, labels


def test_compiled_step_moves_no_batch_data(batch):
  found, groups = collectives(GHOST, *batch)
  # Only all-reduces: gradients and statistics, each summed once over the
  # whole data axis.
  assert found == {"all-reduce"}
  assert len(groups) == 1, groups


def test_groups_straddling_devices_would_show(batch):
  """The check above has teeth: 16-example groups on 8-example shards need
  reductions within pairs of devices."""
  _, groups = collectives(16, *batch)
  assert len(groups) > 1, groups


def test_one_device_and_eight_devices_agree(batch):
  model = small_model(GHOST)
  images, labels = batch
  variables = model.init(jax.random.key(0), images[:GHOST], train=False)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.array(devices), ("data",))
    compiled, args = compiled_train_grad(mesh, model, variables, images,
                                         labels)
    results.append(jax.device_get(compiled(*args)))
  one, eight = results
  leaves_one, leaves_eight = jax.tree.leaves(one), jax.tree.leaves(eight)
  assert len(leaves_one) == len(leaves_eight)
  for a, b in zip(leaves_one, leaves_eight):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The batch's statistics were really written, not left at init.
  assert not np.allclose(one[2]["stem_norm"]["mean"], 0.0)
