"""A tiny three-stage run driven through `python -m trainer.main`, shared by
the resume and multi-process tests."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests import xla_flags

TOTAL_STEPS = 28  # 16 + 8 + 4 steps at B = 64, 128, 256.


def command(workdir, cache_dir, *extra):
  return [
      sys.executable, "-m", "trainer.main",
      "--config=configs/cifar10_increase_batch.py:smoke",
      f"--workdir={workdir}",
      "--config.dataset.num_train_examples=1024",
      "--config.dataset.num_eval_examples=128",
      "--config.eval_batch_size=64",
      "--config.model.width=4",
      "--config.schedule.milestones_epochs=(1.0,2.0)",
      "--config.schedule.num_epochs=3.0",
      "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=5",
      f"--config.compilation_cache_dir={cache_dir}",
      *extra]


# The transfer guard makes any implicit host<->device copy an error: every
# copy the trainer makes must be an explicit device_put / device_get.
ENV = dict(os.environ, XLA_FLAGS=xla_flags.xla_flags(8),
           JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
           JAX_TRANSFER_GUARD="disallow")


def run(workdir, cache_dir, *extra, timeout=300, env=None):
  return subprocess.run(command(workdir, cache_dir, *extra), capture_output=True,
                        text=True, timeout=timeout, env=env or ENV)


def checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def final_state(workdir):
  """The last checkpoint's state on one device, whatever topology saved it."""
  path = os.path.abspath(
      os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "state"))
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)


def assert_same_state(a, b, rtol=0.0, atol=0.0):
  """Every array of two restored states equal (bitwise by default)."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  assert len(flat_a) > 10  # params, batch stats and optimizer state
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))
