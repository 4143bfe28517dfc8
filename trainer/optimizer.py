"""Optimizers from optax with ε and m set by the plan at every step.

The learning rate and momentum are injected hyperparameters: the train step
writes the plan's values into the optimizer state, so a stage's change of ε or
m takes effect at once without recompiling.
"""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def _decay_mask(params):
  """L2 on kernels only (ndim > 1): biases and batch-norm scales are exempt."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def _with_weight_decay(inner, weight_decay):
  if not weight_decay:
    return inner
  return optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), inner)


def make_optimizer(opt_config, *, learning_rate: float,
                   momentum: float) -> optax.GradientTransformation:
  """optax transform for `config.optimizer`; ε and m are initial values.

  'sgd' ignores m; 'adam' uses m as β1. Weight decay is coupled L2 added to
  the gradient, as in the paper's SGD.
  """
  name, wd = opt_config.name, opt_config.weight_decay
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={name!r} is unknown; choose one of "
                     f"{', '.join(OPTIMIZERS)}")
  if not wd >= 0:
    raise ValueError(f"optimizer.weight_decay={wd} must not be negative")
  if name == "sgd":
    if momentum:
      # The plan's noise scale ε/(1-m)·(N/B-1) would count a momentum the
      # optimizer never applies.
      raise ValueError(
          f"optimizer.name='sgd' has no momentum but schedule.momentum="
          f"{momentum:g}: set schedule.momentum=0.0, or optimizer.name="
          "'momentum'")
    factory = lambda learning_rate: _with_weight_decay(
        optax.sgd(learning_rate), wd)
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)
  if name == "adam":
    factory = lambda learning_rate, momentum: _with_weight_decay(
        optax.adam(learning_rate, b1=momentum, b2=opt_config.adam_b2,
                   eps=opt_config.adam_eps), wd)
  else:
    nesterov = name == "nesterov"
    factory = lambda learning_rate, momentum: _with_weight_decay(
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov), wd)
  return optax.inject_hyperparams(factory)(learning_rate=learning_rate,
                                           momentum=momentum)


def set_hyperparams(opt_state, *, learning_rate, momentum):
  """A copy of `opt_state` running at ε=learning_rate and m=momentum."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = learning_rate
  if "momentum" in hyper:
    hyper["momentum"] = momentum
  return opt_state._replace(hyperparams=hyper)
