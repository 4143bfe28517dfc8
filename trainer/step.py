"""The pure train and eval steps.

`train_step(state, batch, hyper, *, model, tx, ...)` takes the replicated
state, a global batch sharded on the mesh's `data` axis and the plan's scalars
for this step, and returns the new state and metrics. Nothing else is read:
the function is tested directly, and `trainer/compile.py` jits it once per
stage shape (`config.accumulation = "compiled"`).

The same update split in two (`config.accumulation = "host"`):
`accumulate_step` adds one micro-batch's gradients into a per-device
accumulator (run on each device's share, no communication), and `apply_step`
averages the accumulators over devices and micro-batches and updates the
state. The host calls `accumulate_step` k times per update, so every stage
runs the same two compiled functions at the same per-device micro-batch size:
a stage switch compiles nothing and a large B runs at the examples/s of the
best micro-batch size.
"""
from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from models import update_running_stats
from trainer import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Parameter updates done (int32).
  params: Any
  batch_stats: Any  # Ghost batch norm running mean/var, for evaluation.
  opt_state: Any
  # Exponential moving average of params (config.weight_average='ema'),
  # None when off. Updated by every step with hyper['ema_decay'].
  ema_params: Any = None


def _update(state: TrainState, grads, step_batch_stats, hyper, tx):
  """One optimizer update at the plan's ε and m, the running statistics and
  the weight average moved along."""
  opt_state = optimizer_lib.set_hyperparams(
      state.opt_state, learning_rate=hyper["learning_rate"],
      momentum=hyper["momentum"])
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(
      step=state.step + 1, params=params,
      batch_stats=update_running_stats(state.batch_stats, step_batch_stats,
                                       hyper["bn_decay"]),
      opt_state=opt_state,
      ema_params=_average_weights(state.ema_params, params, hyper))


def _average_weights(ema_params, params, hyper):
  """ema·d + params·(1-d), or None when weight averaging is off."""
  if ema_params is None:
    return None
  d = hyper["ema_decay"]
  return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p,
                                ema_params, params)


def weight_average_decay(batch_size: int, horizon_examples: float) -> float:
  """Per-step EMA decay exp(-B / horizon): the average spans the same number
  of examples whatever the stage's batch size."""
  return math.exp(-batch_size / horizon_examples)


def cross_entropy(logits, labels):
  """Mean softmax cross entropy over the batch, integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _split_micro_batches(x, num_devices: int, num_micro_batches: int):
  """[B, ...] → [k, B/k, ...], micro-batch j taking rows j·b:(j+1)·b of
  every device's share, so no example leaves its device."""
  if num_micro_batches == 1:
    return x[None]
  b = x.shape[0] // (num_devices * num_micro_batches)
  x = x.reshape(num_devices, num_micro_batches, b, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(num_micro_batches, num_devices * b, *x.shape[3:])


def train_step(state: TrainState, batch, hyper, *, model, tx,
               num_devices: int = 1, num_micro_batches: int = 1,
               unroll: int = 0):
  """One update on a global batch.

  Args:
    state: TrainState, replicated.
    batch: dict with `image` [B, H, W, C] (the pipeline's uint8 pixels,
      which the model normalises, or normalised floats) and `label` [B]
      int32, sharded over devices along B.
    hyper: dict of scalars from the plan: `learning_rate` (ε), `momentum` (m)
      and `bn_decay`, the running-statistics decay for this step's B.
    model: a flax module with ghost batch norm (models/).
    tx: the optax transform of trainer/optimizer.py.
    num_devices: devices the batch is sharded over (static).
    num_micro_batches: the per-device share is split into this many
      micro-batches whose gradients are averaged before one update (static).
    unroll: micro-batches per loop iteration; 0 unrolls the loop fully (XLA's
      CPU backend ran a looped step ~12x slower than the unrolled one).

  Returns:
    (new_state, metrics) with metrics `train_loss`, `train_accuracy` and
    `grad_norm` (the global gradient's L2 norm).
  """
  images = _split_micro_batches(batch["image"], num_devices, num_micro_batches)
  labels = _split_micro_batches(batch["label"], num_devices, num_micro_batches)

  def loss_fn(params, micro_images, micro_labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, micro_images,
        train=True, mutable=["batch_stats"])
    loss = cross_entropy(logits, micro_labels)
    correct = jnp.mean(jnp.argmax(logits, -1) == micro_labels)
    return loss, (correct, updates["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(carry, xs):
    grads, loss, correct, stats = carry
    (l, (c, s)), g = grad_fn(state.params, *xs)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    return (add(grads, g), loss + l, correct + c, add(stats, s)), None

  zeros = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  if num_micro_batches == 1:
    (loss, (correct, stats)), grads = grad_fn(state.params, images[0], labels[0])
  else:
    init = (zeros(state.params), 0.0, 0.0, zeros(state.batch_stats))
    (grads, loss, correct, stats), _ = jax.lax.scan(micro_step, init,
                                                    (images, labels),
                                                    unroll=unroll or True)
  k = float(num_micro_batches)
  mean = lambda tree: jax.tree_util.tree_map(lambda x: x / k, tree)
  grads, stats = mean(grads), mean(stats)

  new_state = _update(state, grads, stats, hyper, tx)
  metrics = dict(train_loss=loss / k, train_accuracy=correct / k,
                 grad_norm=optax.tree.norm(grads))
  return new_state, metrics


def _loss_and_stats(params, batch_stats, batch, *, model):
  logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"],
      train=True, mutable=["batch_stats"])
  loss = cross_entropy(logits, batch["label"])
  correct = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return loss, (correct, updates["batch_stats"])


def init_accumulator(state: TrainState):
  """Zero sums for one device: gradients, batch statistics, loss, accuracy."""
  zeros = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  return dict(grads=zeros(state.params), batch_stats=zeros(state.batch_stats),
              loss=jnp.zeros((), jnp.float32),
              correct=jnp.zeros((), jnp.float32))


def accumulate_step(accumulator, state: TrainState, batch, *, model):
  """Adds one micro-batch's mean gradient (and statistics) to `accumulator`.

  Runs on one device's share of the micro-batch; nothing is reduced across
  devices, so successive calls need no communication.
  """
  (loss, (correct, stats)), grads = jax.value_and_grad(
      _loss_and_stats, has_aux=True)(state.params, state.batch_stats, batch,
                                     model=model)
  add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
  return dict(grads=add(accumulator["grads"], grads),
              batch_stats=add(accumulator["batch_stats"], stats),
              loss=accumulator["loss"] + loss,
              correct=accumulator["correct"] + correct)


def apply_step(state: TrainState, accumulators, hyper, *, tx):
  """One update from per-device accumulators (leading axis: device).

  `hyper` holds `learning_rate`, `momentum`, `bn_decay` and `micro_batches`,
  the number of `accumulate_step` calls summed into each accumulator (a
  runtime scalar, so one compiled function serves every stage). Returns
  (new_state, metrics) like `train_step`, plus `grad_sq_small` (the squared
  norm of one device's mean gradient, averaged over devices) and
  `grad_sq_big` (that of the global mean gradient), the inputs of
  `trainer/noise_scale.py`.
  """
  num_devices = jax.tree_util.tree_leaves(accumulators)[0].shape[0]
  count = hyper["micro_batches"] * num_devices
  mean = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.sum(x, axis=0) / count, tree)
  grads, stats = mean(accumulators["grads"]), mean(accumulators["batch_stats"])
  # Each device's own mean gradient (over its B/devices examples): with the
  # global mean, the two batch sizes of the gradient noise scale.
  device_sq_norms = sum(
      jnp.sum(jnp.square(g / hyper["micro_batches"]),
              axis=tuple(range(1, g.ndim)))
      for g in jax.tree_util.tree_leaves(accumulators["grads"]))
  new_state = _update(state, grads, stats, hyper, tx)
  grad_norm = optax.tree.norm(grads)
  metrics = dict(train_loss=jnp.sum(accumulators["loss"]) / count,
                 train_accuracy=jnp.sum(accumulators["correct"]) / count,
                 grad_norm=grad_norm,
                 grad_sq_small=jnp.mean(device_sq_norms),
                 grad_sq_big=jnp.square(grad_norm))
  return new_state, metrics


def batch_stats_step(params, batch_stats, batch, *, model):
  """The ghost batch statistics of `batch` under `params` (training-mode
  forward, nothing updated): averaged over batches, the running statistics
  that belong to averaged weights."""
  _, (_, stats) = _loss_and_stats(params, batch_stats, batch, model=model)
  return stats


def eval_step(state: TrainState, batch, *, model):
  """Sums over a padded eval batch; `mask` 0 marks padding.

  Returns dict of `loss_sum`, `correct_sum` and `count` (examples scored).
  """
  logits = model.apply({"params": state.params,
                        "batch_stats": state.batch_stats},
                       batch["image"], train=False)
  mask = batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(losses * mask),
              correct_sum=jnp.sum(correct * mask), count=jnp.sum(mask))
