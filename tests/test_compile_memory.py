"""The compiler's memory check: a stage whose step needs more device memory
than JAX's allocator holds is refused by name when compiled, not found out
of memory at its stage's first step (CPU devices report no limit, so the
tests give one)."""
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import models
from configs import base
from trainer import compile as compile_lib
from trainer import loop
from trainer import optimizer as optimizer_lib

SMALL, LARGE = 16, 128  # Per-device batches of the two stages (one device).


@pytest.fixture(scope="module")
def setup():
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=SMALL)
  config.model.width = 4
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  return mesh, model, tx, state


def compiler(setup, limit):
  mesh, model, tx, state = setup
  return compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx,
      abstract_state=compile_lib.abstract(state), image_shape=(16, 16, 1),
      max_device_batch=LARGE, ghost_batch_size=8, accumulation="host",
      memory_limit_bytes=limit, on_compiled=lambda *_: None)


@pytest.fixture(scope="module")
def needs(setup):
  """XLA's estimate for each stage's step, compiled without a limit."""
  c = compiler(setup, None)
  try:
    return {b: compile_lib.memory_bytes(c.compile_accumulation(b)["single"])
            for b in (SMALL, LARGE // 2)}
  finally:
    c.close()


def test_cpu_devices_report_no_limit(setup):
  assert compile_lib.device_memory_limit(setup[0]) is None


def test_a_first_stage_that_does_not_fit_is_refused_before_training(
    setup, needs):
  limit = needs[SMALL] - 1
  c = compiler(setup, limit)
  with pytest.raises(compile_lib.ConfigError) as e:
    c.start([SMALL])
  c.close()
  assert str(e.value) == (
      f"B={SMALL}: its single function needs {needs[SMALL] / 2**30:.2f} GiB "
      f"per device by XLA's estimate, more than the {limit / 2**30:.2f} GiB "
      f"the device holds for arrays; lower max_device_batch (now {LARGE}) "
      "to run it as more, smaller micro-batches")


def test_a_later_stage_that_does_not_fit_is_reported_at_once(
    setup, needs, capfd):
  """The first stage fits and compiles; the second, compiled in the
  background, needs more than the limit: a warning as soon as it has
  compiled, and the ConfigError when the run asks for that step."""
  assert needs[SMALL] < needs[LARGE // 2]
  c = compiler(setup, (needs[SMALL] + needs[LARGE // 2]) // 2)
  try:
    c.start([SMALL, LARGE // 2])
    assert c.get(SMALL) is not None
    with pytest.raises(compile_lib.ConfigError,
                       match=f"B={LARGE // 2}: its single function needs"):
      c.get(LARGE // 2)
  finally:
    c.close()
  # The warning comes from the compile thread, just after the step failed.
  err, deadline = "", time.monotonic() + 10
  while "warning:" not in err and time.monotonic() < deadline:
    time.sleep(0.05)
    err += capfd.readouterr().err
  warning = [l for l in err.splitlines() if l.startswith("warning:")][-1]
  assert warning.startswith(f"warning: the step for B={LARGE // 2} did not "
                            f"compile: B={LARGE // 2}: its single function")
  assert warning.endswith("; the run will stop if it reaches that batch "
                          "size (its last stage ends in a checkpoint)")
