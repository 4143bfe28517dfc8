"""models/max_pool.py: the values and gradients of nn.max_pool, to the bit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.max_pool import max_pool

POOLS = [
    # ResNet-50's stem pool.
    ((2, 12, 12, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    # Inception-ResNet-v2's, on odd and even sizes.
    ((2, 11, 10, 4), (3, 3), (2, 2), ((0, 0), (0, 0))),
    # Overlapping windows of another shape, padded on one side only.
    ((1, 7, 6, 2), (2, 3), (1, 2), ((0, 1), (1, 0))),
    # Strides longer than the window: input positions no window reaches
    # (phases of the gradient with no offset), and trailing rows unread.
    ((1, 11, 9, 2), (2, 1), (3, 2), ((0, 0), (1, 0))),
]


def output_shape(shape, window, strides, padding):
  return ((shape[0],)
          + tuple((shape[1 + d] + sum(padding[d]) - window[d]) // strides[d]
                  + 1 for d in range(2))
          + (shape[-1],))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, window, strides, padding", POOLS)
def test_values_and_gradient_are_max_pools(dtype, shape, window, strides,
                                           padding):
  """Small integers, so that most windows hold their maximum more than
  once (the first in row-major order takes the gradient) and every sum of
  gradients is exact whatever its order."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, shape), dtype)
  dy = jnp.asarray(
      rng.integers(-4, 5, output_shape(shape, window, strides, padding)),
      dtype)
  want, want_vjp = jax.vjp(lambda x: nn.max_pool(x, window, strides, padding),
                           x)
  got, got_vjp = jax.vjp(lambda x: max_pool(x, window, strides, padding), x)
  assert got.dtype == want.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  (want_dx,), (got_dx,) = want_vjp(dy), got_vjp(dy)
  np.testing.assert_array_equal(np.asarray(got_dx, np.float32),
                                np.asarray(want_dx, np.float32))
  assert np.count_nonzero(np.asarray(got_dx, np.float32)) > x.size // 8


def test_the_first_of_equal_maxima_takes_the_gradient():
  x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 2, 0].set(5.0).at[0, 2, 0, 0].set(5.0)
  dx = jax.grad(lambda x: max_pool(x, (3, 3), (1, 1), ((0, 0), (0, 0)))[
      0, 0, 0, 0])(x)
  want = np.zeros((3, 3))
  want[1, 2] = 1.0
  np.testing.assert_array_equal(dx[0, :, :, 0], want)


def test_gradient_under_jit_matches():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 9, 9, 5))
  args = ((3, 3), (2, 2), ((1, 1), (1, 1)))

  def loss(pool, x):
    return jnp.sum(jnp.sin(pool(x, *args)))

  got = jax.jit(jax.grad(lambda x: loss(max_pool, x)))(x)
  want = jax.grad(lambda x: loss(nn.max_pool, x))(x)
  np.testing.assert_array_equal(got, want)


def test_nan_propagates_as_in_nn_max_pool():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1).at[0, 1, 1, 0].set(jnp.nan)
  args = ((2, 2), (2, 2), ((0, 0), (0, 0)))
  np.testing.assert_array_equal(max_pool(x, *args), nn.max_pool(x, *args))
  assert np.isnan(max_pool(x, *args)[0, 0, 0, 0])


@pytest.mark.parametrize("window, strides, padding, message", [
    ((3, 3), (2,), ((1, 1), (1, 1)),
     r"max_pool: window \(3, 3\), strides \(2,\) and padding "
     r"\(\(1, 1\), \(1, 1\)\) must each have one entry per spatial "
     r"dimension of an input of shape \(1, 8, 8, 2\)"),
    ((12, 12), (1, 1), ((0, 0), (0, 0)),
     "max_pool: a window of 144 values is more than an int8 offset can "
     r"name \(127\)"),
])
def test_bad_pool_is_refused(window, strides, padding, message):
  with pytest.raises(ValueError, match=message):
    max_pool(jnp.zeros((1, 8, 8, 2)), window, strides, padding)


def test_integer_values_are_refused():
  with pytest.raises(ValueError, match=r"max_pool: needs floating-point "
                     r"values \(padding is -inf\), got int32"):
    max_pool(jnp.zeros((1, 8, 8, 2), jnp.int32), (2, 2), (2, 2),
             ((0, 0), (0, 0)))
