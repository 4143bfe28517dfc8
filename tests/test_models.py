"""Models built by the factory: sizes, structure, dtypes, and bad configs.

Full-size models are only traced (`jax.eval_shape`); the one real forward is
the small ResNet on Fashion-MNIST-sized images.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import pixels as pixels_lib
from configs import base


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def make_config(name, **model_fields):
  config = base.get_base_config()
  config.model.name = name
  for field, value in model_fields.items():
    setattr(config.model, field, value)
  return config


def fashion_mnist_config(**model_fields):
  return make_config("small_resnet", **model_fields)


def shapes(model, image_shape, batch=2):
  """(variables, logits) as ShapeDtypeStructs: one trace, no compile."""
  images = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32)
  logits, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False),
      images)
  return variables, logits


def init(model, images):
  """Variables, as a jitted init (one compile, not one per op)."""
  return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      images)


def apply_train(model, variables, images, mutable=("batch_stats",), **kwargs):
  """(logits, updated collections) of a jitted training forward."""
  return jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=list(mutable), **kwargs))(variables, images)


def num_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      variables["params"]))


@pytest.mark.parametrize("config,image_shape,want_params", [
    # Stem 3x3x1x16; blocks 16, 32, 64 wide with two 3x3 convs each.
    (fashion_mnist_config(), (28, 28, 1), 77_754),
    # WRN-16-4 on CIFAR-10, as in Zagoruyko & Komodakis (2.7M).
    (make_config("wide_resnet", width=16, depth=16, widen_factor=4),
     (32, 32, 3), 2_748_890),
    # ResNet-50 on ImageNet, as torchvision's resnet50.
    (make_config("resnet50", width=64), (224, 224, 3), 25_557_032),
    # Keras' 55,813,192 trainable parameters plus the 30,272 batch norm
    # scales that Keras leaves out.
    (make_config("inception_resnet_v2"), (299, 299, 3), 55_843_464),
], ids=["small_resnet", "wide_resnet_16_4", "resnet50", "inception_resnet_v2"])
def test_parameter_counts_and_logits(config, image_shape, want_params):
  if config.model.name in ("resnet50", "inception_resnet_v2"):
    config.dataset.num_classes = 1000
  model = models.create_model(config)
  variables, logits = shapes(model, image_shape)
  assert num_params(variables) == want_params
  assert logits.shape == (2, config.dataset.num_classes)
  assert logits.dtype == jnp.float32


def test_resnet50_strides_on_the_3x3_conv():
  """v1.5: a downsampling bottleneck keeps the resolution through its 1x1."""
  config = make_config("resnet50", width=64)
  model = models.create_model(config)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables, _ = shapes(model, (224, 224, 3))
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False,
                               capture_intermediates=True,
                               mutable=["intermediates"]),
      variables, images)
  first_of_stage_2 = state["intermediates"]["BottleneckBlock_3"]
  assert first_of_stage_2["Conv_0"]["__call__"][0].shape == (2, 56, 56, 128)
  assert first_of_stage_2["Conv_1"]["__call__"][0].shape == (2, 28, 28, 128)
  assert first_of_stage_2["Conv_2"]["__call__"][0].shape == (2, 28, 28, 512)
  assert len([k for k in variables["params"] if "Block" in k]) == 16


@pytest.fixture(scope="module")
def fashion_batch():
  rng = np.random.default_rng(0)
  return rng.normal(size=(8, 28, 28, 1)).astype(np.float32)


def test_small_resnet_training_forward_writes_stats(fashion_batch):
  config = fashion_mnist_config(width=8)
  config.ghost_batch_size = 4
  model = models.create_model(config)
  variables = init(model, fashion_batch)
  logits, updates = apply_train(model, variables, fashion_batch)
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Every norm wrote its batch's statistics over the init values.
  stats = updates["batch_stats"]
  assert jax.tree.structure(stats) == jax.tree.structure(
      variables["batch_stats"])
  written = jax.tree_util.tree_leaves_with_path(stats)
  # Stem, 2 per block, 1 per projection (blocks 2 and 3): 9 norms.
  assert len(written) == 2 * 9
  for path, value in written:
    neutral = 1.0 if path[-1].key == "var" else 0.0
    assert not np.allclose(value, neutral), path
  # Evaluation needs no multiple of the ghost batch size.
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, fashion_batch[:3])
  assert eval_logits.shape == (3, 10)


@pytest.mark.parametrize("zero_init_residual,want", [(True, 0.0), (False, 1.0)])
def test_zero_init_residual(zero_init_residual, want):
  config = fashion_mnist_config(zero_init_residual=zero_init_residual)
  model = models.create_model(config)
  params = init(model, jnp.zeros((2, 28, 28, 1)))["params"]
  for block in ("BasicBlock_0", "BasicBlock_1", "BasicBlock_2"):
    np.testing.assert_array_equal(params[block]["GhostBatchNorm_1"]["scale"],
                                  want)
    np.testing.assert_array_equal(params[block]["GhostBatchNorm_0"]["scale"],
                                  1.0)


def test_relu_inside_the_norm_gradient_changes_no_gradient(fashion_batch):
  """model.bn_fuse_relu: the ReLUs and skip adds inside the norms' written-
  out gradient (masks recomputed from x, or kept from the forward pass
  packed to bits) give the gradients of the ReLUs after the norms, to the
  bit, in float32."""
  grads = []
  for fuse in (True, False):
    config = fashion_mnist_config(width=8, zero_init_residual=False,
                                  bn_fuse_relu=fuse)
    config.ghost_batch_size = 4
    model = models.create_model(config)
    variables = init(model, fashion_batch)

    def loss(params):
      logits, _ = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          fashion_batch, train=True, mutable=["batch_stats"])
      return jnp.sum(logits * jnp.arange(10.0))

    grads.append(jax.jit(jax.grad(loss))(variables["params"]))
  fused, separate = (jax.tree.leaves(g) for g in grads)
  assert len(fused) == len(separate) == 3 * 9 + 2  # Convs, norms, head.
  for got, want in zip(fused, separate):
    np.testing.assert_array_equal(got, want)
  assert max(float(np.abs(g).max()) for g in fused) > 1e-2


def test_bfloat16_model_keeps_float32_params_and_logits(fashion_batch):
  config = fashion_mnist_config(width=8, zero_init_residual=False)
  config.ghost_batch_size = 4
  model_f32 = models.create_model(config)
  config.model.dtype = "bfloat16"
  model_bf16 = models.create_model(config)
  variables = init(model_bf16, fashion_batch)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  logits, state = apply_train(
      model_bf16, variables, fashion_batch, capture_intermediates=True,
      mutable=("batch_stats", "intermediates"))
  assert logits.dtype == jnp.float32
  for leaf in jax.tree.leaves(state["batch_stats"]):
    assert leaf.dtype == jnp.float32
  # The convolutions and norms really compute in bfloat16.
  block = state["intermediates"]["BasicBlock_1"]
  assert block["Conv_0"]["__call__"][0].dtype == jnp.bfloat16
  assert block["GhostBatchNorm_0"]["__call__"][0].dtype == jnp.bfloat16
  logits_f32, _ = apply_train(model_f32, variables, fashion_batch)
  np.testing.assert_allclose(logits, logits_f32, atol=0.05 * float(
      np.max(np.abs(logits_f32))))


@pytest.mark.parametrize("field,value,message", [
    ("name", "vgg", r"unknown model.name 'vgg'; choices: small_resnet, "
                    r"wide_resnet, resnet50, inception_resnet_v2"),
    ("dtype", "float16", r"unknown model.dtype 'float16'; choices: float32, "
                         r"bfloat16"),
])
def test_bad_model_config_is_rejected(field, value, message):
  with pytest.raises(ValueError, match=message):
    config = base.get_base_config()
    setattr(config.model, field, value)
    models.create_model(config)


def test_inception_resnet_v2_rejects_small_images():
  model = models.create_model(make_config("inception_resnet_v2"))
  with pytest.raises(ValueError, match="at least 75 pixels a side, got 64x64"):
    shapes(model, (64, 64, 3))


def test_bad_wide_resnet_depth_is_rejected():
  with pytest.raises(ValueError, match=r"6n \+ 4 .* model.depth=18"):
    models.create_model(make_config("wide_resnet", depth=18))


@pytest.mark.parametrize("name", ["small_resnet", "wide_resnet",
                                  "inception_resnet_v2"])
def test_the_blocked_stem_is_refused_for_models_without_its_stem(name):
  with pytest.raises(ValueError, match=(
      f"^model.stem_space_to_depth applies to resnet50's 7x7/2 stem; {name} "
      "has none: leave it unset or false$")):
    models.create_model(make_config(name, stem_space_to_depth=True))


@pytest.mark.parametrize("ghost_batch_size", [0, -4])
def test_bad_ghost_batch_size_is_rejected(ghost_batch_size):
  config = fashion_mnist_config()
  config.ghost_batch_size = ghost_batch_size
  with pytest.raises(ValueError, match="ghost_batch_size must be a positive"):
    models.create_model(config)


@pytest.mark.parametrize("name,image_shape", [
    ("small_resnet", (28, 28, 1)), ("wide_resnet", (32, 32, 3)),
    ("resnet50", (64, 64, 3)), ("inception_resnet_v2", (75, 75, 3))])
@pytest.mark.parametrize("field,attribute", [
    ("bn_fast_variance", "fast_variance"),
    ("bn_explicit_gradient", "explicit_gradient"),
    ("bn_fuse_relu", "fuse_relu")])
@pytest.mark.parametrize("value", [True, False])
def test_batch_norm_settings_reach_every_norm(name, image_shape, field,
                                              attribute, value):
  model = models.create_model(make_config(name, **{field: value}))
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.GhostBatchNorm):
      seen.append(getattr(context.module, attribute))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes(model, image_shape)
  assert seen and set(seen) == {value}


@pytest.mark.parametrize("backend,value,want", [
    ("cpu", None, False), ("gpu", None, True), ("tpu", None, False),
    ("gpu", False, False), ("cpu", True, True), ("tpu", True, True)])
def test_unset_bn_fuse_relu_is_on_for_gpus_only(monkeypatch, backend, value,
                                                want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  config = make_config("small_resnet", bn_fuse_relu=value)
  assert models.create_model(config).bn_fuse_relu is want
  assert config.model.bn_fuse_relu is value  # The record keeps what was set.
  # With autodiff's gradient the option changes nothing: unset, it is off.
  config.model.bn_explicit_gradient = False
  assert models.fuse_relu(config) is (want and value is not None)


@pytest.mark.parametrize("backend,value,want", [
    ("cpu", None, False), ("gpu", None, True), ("tpu", None, False),
    ("gpu", False, False), ("cpu", True, True), ("tpu", True, True)])
def test_unset_stem_space_to_depth_is_on_for_gpus_only(monkeypatch, backend,
                                                       value, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  config = make_config("resnet50", stem_space_to_depth=value)
  assert models.create_model(config).stem_space_to_depth is want
  assert config.model.stem_space_to_depth is value
  models.resolve_platform_defaults(config)  # What the run records.
  assert config.model.stem_space_to_depth is want
  assert config.model.bn_fuse_relu is (backend == "gpu")


@pytest.mark.parametrize("name", ["small_resnet", "wide_resnet",
                                  "inception_resnet_v2"])
def test_unset_stem_space_to_depth_is_off_for_models_without_that_stem(
    monkeypatch, name):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = make_config(name)
  models.resolve_platform_defaults(config)
  assert config.model.stem_space_to_depth is False
  models.create_model(config)  # The recorded value builds the model.


@pytest.mark.parametrize("name,image_shape,want", [
    # (norms, with ReLU, with a residual as well): stem + 16 bottlenecks of
    # three norms, the last taking the skip, + 4 projections.
    ("resnet50", (64, 64, 3), (53, 49, 16)),
    # stem + 3 basic blocks of two norms + 2 projections (stages 2 and 3).
    ("small_resnet", (28, 28, 1), (9, 7, 3)),
])
def test_residual_add_and_relu_go_into_the_norm_before_them(
    name, image_shape, want):
  """Where a ReLU or a residual add follows a batch norm, the norm takes
  them (so its written-out gradient can fuse them)."""
  model = models.create_model(make_config(name))
  calls = []

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, models.GhostBatchNorm)
        and context.method_name == "__call__"):
      residual = args[1] if len(args) > 1 else kwargs.get("residual")
      calls.append((context.module.relu, residual is not None))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes(model, image_shape)
  assert (len(calls), sum(r for r, _ in calls),
          sum(r and s for r, s in calls)) == want


def test_model_input_maps_pixels_to_standard_units():
  pixels = jnp.asarray([[[[0, 255]]]], jnp.uint8)
  x = pixels_lib.model_input(pixels, (0.5, 0.25), (0.5, 0.25), jnp.float32)
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(x[0, 0, 0], [-1.0, 3.0], rtol=1e-6)
  # Float images are taken as normalised already.
  floats = jnp.asarray([[[[0.5, -2.0]]]], jnp.float32)
  np.testing.assert_array_equal(
      pixels_lib.model_input(floats, None, None, jnp.bfloat16),
      floats.astype(jnp.bfloat16))


@pytest.mark.parametrize("mean,std,message", [
    (None, None, r"uint8 images need the model's pixel_mean and pixel_std"),
    ((0.5,), (0.5,), r"pixel_mean=\(0.5,\) and pixel_std=\(0.5,\) need one "
     r"value per channel of the 2-channel images"),
])
def test_model_input_bad_pixel_stats(mean, std, message):
  with pytest.raises(ValueError, match=message):
    pixels_lib.model_input(jnp.zeros((1, 1, 1, 2), jnp.uint8), mean, std,
                           jnp.float32)


def test_uint8_batch_gives_the_logits_of_the_host_normalised_batch(
    fashion_batch):
  """The pipeline's uint8 pixels, normalised by the model on the device,
  give what the same pixels normalised on the host in float64 give."""
  config = fashion_mnist_config(width=8, zero_init_residual=False)
  config.ghost_batch_size = 4
  model = models.create_model(config)
  pixels = np.random.default_rng(3).integers(0, 256, (8, 28, 28, 1),
                                             dtype=np.uint8)
  d = config.dataset
  normalised = ((pixels / 255.0 - np.asarray(d.mean)) / np.asarray(d.std))
  variables = init(model, fashion_batch)
  # Evaluation mode: batch norm uses the (initial) running statistics, so
  # an input left unnormalised would show in the logits.
  evaluate = jax.jit(lambda x: model.apply(variables, x, train=False))
  np.testing.assert_allclose(evaluate(pixels),
                             evaluate(normalised.astype(np.float32)),
                             rtol=1e-4, atol=1e-4)
