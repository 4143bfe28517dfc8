"""models/space_to_depth.py: nn.Conv's parameter, values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import base
from models.ghost_norm_model import conv_kernel_init
from models.space_to_depth import SpaceToDepthConv

CONVS = [
    # ResNet-50's stem at 32 px: 7x7/2, padded 3 each side.
    ((2, 32, 32, 3), 7, 2, ((3, 3), (3, 3))),
    # Odd sizes: the high side cropped or padded beyond the conv's own.
    ((1, 17, 20, 3), 7, 2, ((3, 3), (3, 3))),
    ((1, 15, 15, 4), 3, 2, ((1, 1), (1, 1))),
    # A stride that does not divide the kernel, uneven padding, 16 channels
    # (no channel padding needed).
    ((1, 16, 14, 16), 5, 3, ((2, 1), (0, 2))),
    ((1, 9, 9, 2), 4, 2, ((0, 0), (0, 0))),
]


def both(shape, k, s, padding, features=8):
  plain = nn.Conv(features, (k, k), (s, s), padding=padding, use_bias=False,
                  kernel_init=conv_kernel_init)
  blocked = SpaceToDepthConv(features, (k, k), (s, s), padding,
                             dtype=jnp.float32, param_dtype=jnp.float32,
                             kernel_init=conv_kernel_init)
  return plain, blocked


@pytest.mark.parametrize("shape, k, s, padding", CONVS)
def test_parameter_values_and_gradients_are_the_plain_convs(shape, k, s,
                                                            padding):
  plain, blocked = both(shape, k, s, padding)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = plain.init(jax.random.key(0), x)
  # Same name, shape and initial values from the same key: checkpoints of
  # either load into the other.
  mine = blocked.init(jax.random.key(0), x)
  assert jax.tree.structure(mine) == jax.tree.structure(variables)
  np.testing.assert_array_equal(mine["params"]["kernel"],
                                variables["params"]["kernel"])

  def loss(module, v, x):
    y = module.apply(v, x)
    return jnp.sum(y * jnp.cos(y)), y

  (_, want), (dv, dx) = jax.jit(jax.value_and_grad(
      lambda v, x: loss(plain, v, x), argnums=(0, 1), has_aux=True))(
          variables, x)
  (_, got), (gv, gx) = jax.jit(jax.value_and_grad(
      lambda v, x: loss(blocked, v, x), argnums=(0, 1), has_aux=True))(
          variables, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gv["params"]["kernel"], dv["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-4)


def test_in_bfloat16_the_stem_is_the_plain_convs_to_its_rounding():
  """As ResNet-50 runs it on a GPU: bf16 inputs and kernel."""
  shape, k, s, padding = CONVS[0]
  x = jax.random.normal(jax.random.key(1), shape)
  plain, blocked = both(shape, k, s, padding)
  plain, blocked = plain.clone(dtype=jnp.bfloat16), blocked.clone(
      dtype=jnp.bfloat16)
  variables = plain.init(jax.random.key(0), x)
  want, got = (jax.jit(m.apply)(variables, x) for m in (plain, blocked))
  assert got.dtype == want.dtype == jnp.bfloat16
  error = jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(
      want.astype(jnp.float32))
  assert error < 1e-2, error


def test_blocks_of_the_resnet_stem_have_channels_padded_to_eight():
  """3 channels in 2x2 blocks are 12, padded with zeros to 16 for the
  tensor cores: a 4x4/1 convolution."""
  _, blocked = both((2, 32, 32, 3), 7, 2, ((3, 3), (3, 3)))
  x = jnp.ones((2, 32, 32, 3))
  variables = blocked.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(blocked.apply)(variables, x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name ==
           "conv_general_dilated"]
  assert [(e.invars[0].aval.shape, e.invars[1].aval.shape,
           e.params["window_strides"]) for e in convs] == [
               ((2, 19, 19, 16), (4, 4, 16, 8), (1, 1))]


@pytest.mark.parametrize("kernel, strides, shape, message", [
    ((7, 5), (2, 2), (1, 16, 16, 3), r"kernel \(7, 5\), strides \(2, 2\)"),
    ((7, 7), (2, 1), (1, 16, 16, 3), r"kernel \(7, 7\), strides \(2, 1\)"),
    ((7, 7), (2, 2), (16, 16, 3), r"input shape \(16, 16, 3\)"),
])
def test_bad_shapes_are_refused(kernel, strides, shape, message):
  conv = SpaceToDepthConv(8, kernel, strides, ((3, 3), (3, 3)),
                          dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=conv_kernel_init)
  with pytest.raises(ValueError, match="SpaceToDepthConv: needs a square "
                     "kernel and equal strides over \\[B, H, W, C\\] input; "
                     "got " + ".*" + message):
    conv.init(jax.random.key(0), jnp.ones(shape))


def test_resnet50_builds_its_stem_from_blocks_when_asked():
  """The same parameters (names, shapes) either way, and the stem's module
  the one asked for; traced only (the values: the test above)."""
  config = base.get_base_config()
  config.model.name = "resnet50"
  config.dataset.mean, config.dataset.std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
  params, stems = {}, {}
  for blocked in (False, True):
    config.model.stem_space_to_depth = blocked
    model = models.create_model(config)
    seen = []

    def record(next_fun, args, kwargs, context):
      if context.module.name == "stem_conv":
        seen.append(type(context.module))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      params[blocked] = jax.eval_shape(
          lambda x, m=model: m.init(jax.random.key(0), x, train=False), images)
    stems[blocked] = set(seen)
  assert stems == {False: {nn.Conv}, True: {SpaceToDepthConv}}
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params[False])
          == jax.tree.map(lambda a: (a.shape, a.dtype), params[True]))
