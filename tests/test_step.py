"""The pure train step: device-count and micro-batch equivalence, HLO, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import models
from configs import base
from trainer import compile as compile_lib
from trainer import loop
from trainer import mesh as mesh_lib
from trainer import micro_batching
from trainer import optimizer as optimizer_lib
from trainer import step as step_lib

B = 64


def tiny_config():
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=B)
  config.model.width = 4
  return config


def data(num_steps, seed=0):
  """Batches whose label is readable from the image, so the loss falls."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    labels = rng.integers(0, 10, B).astype(np.int32)
    images = rng.normal(size=(B, 16, 16, 1)).astype(np.float32)
    images[..., 0] += labels[:, None, None] - 4.5
    out.append(dict(image=images, label=labels))
  return out


def train(mesh, max_device_batch, num_steps=6, optimizer="momentum"):
  config = tiny_config()
  config.optimizer.name = optimizer
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  k = compile_lib.micro_batches(B, mesh.size, max_device_batch, 8)
  step = jax.jit(
      functools.partial(step_lib.train_step, model=model, tx=tx,
                        num_devices=mesh.size, num_micro_batches=k),
      in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh),
                    mesh_lib.replicated(mesh)),
      out_shardings=(mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)))
  hyper = dict(learning_rate=jnp.float32(0.1), momentum=jnp.float32(0.9),
               bn_decay=jnp.float32(0.5))
  losses = []
  for batch in data(num_steps):
    state, metrics = step(state, mesh_lib.global_batch(batch, mesh), hyper)
    losses.append(float(metrics["train_loss"]))
  return k, losses, jax.device_get(state)


def train_host(mesh, max_device_batch, num_steps=6):
  """`train` through StepCompiler with host accumulation."""
  config = tiny_config()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  compiler = host_compiler(mesh, model, tx, state, max_device_batch)
  step = compiler.get(B)
  replicated = mesh_lib.replicated(mesh)
  hyper = {k: jax.device_put(np.float32(v), replicated) for k, v in
           dict(learning_rate=0.1, momentum=0.9, bn_decay=0.5).items()}
  losses = []
  for batch in data(num_steps):
    # Every transfer is explicit (device_put, make_array_from_process_local_
    # data, device_get): no hidden host round trip inside the step.
    with jax.transfer_guard("disallow"):
      state, metrics = step(state, batch, hyper)
      losses.append(float(jax.device_get(metrics["train_loss"])))
  compiler.close()
  k = compile_lib.micro_batches(B, mesh.size, max_device_batch, 8)
  return k, losses, jax.device_get(state)


def host_compiler(mesh, model, tx, state, max_device_batch, compiled=None):
  return compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx,
      abstract_state=compile_lib.abstract(state),
      image_shape=(16, 16, 1), max_device_batch=max_device_batch,
      ghost_batch_size=8, accumulation="host",
      on_compiled=lambda b, k, *_: (compiled if compiled is not None
                                    else {}).setdefault(b, k))


def one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def reference():
  """6 steps on one device, no micro-batching."""
  return train(one_device_mesh(), max_device_batch=64)


def assert_same_training(a, b):
  np.testing.assert_allclose(a[1], b[1], rtol=2e-5)
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6),
      a[2].params, b[2].params)
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6),
      a[2].batch_stats, b[2].batch_stats)


def test_loss_falls(reference):
  k, losses, state = reference
  assert k == 1
  assert losses[-1] < losses[0]
  assert int(state.step) == 6


def test_eight_devices_match_one(reference):
  assert_same_training(reference, train(mesh_lib.make_mesh(), max_device_batch=8))


@pytest.mark.parametrize("max_device_batch,k", [(32, 2), (16, 4)])
def test_micro_batches_match_whole_batch(reference, max_device_batch, k):
  result = train(one_device_mesh(), max_device_batch=max_device_batch)
  assert result[0] == k
  assert_same_training(reference, result)


def test_micro_batches_on_eight_devices_match(reference):
  # 64 over 8 devices = 8 per device; ghost 8 forbids splitting further, so
  # use a 2-device mesh: 32 per device in 4 micro-batches of 8.
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  result = train(mesh, max_device_batch=8)
  assert result[0] == 4
  assert_same_training(reference, result)


# 8 devices: 8 per device is one micro-batch of the shared accumulate
# executable at max_device_batch=8, and the composed single step below it.
@pytest.mark.parametrize("devices,max_device_batch,k",
                         [(1, 16, 4), (2, 8, 4), (8, 8, 1), (8, 16, 1)])
def test_host_accumulation_matches_whole_batch(reference, devices,
                                               max_device_batch, k):
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  result = train_host(mesh, max_device_batch)
  assert result[0] == k
  assert_same_training(reference, result)


def test_host_accumulation_compiles_once_per_micro_batch_size():
  mesh = mesh_lib.make_mesh()
  config = tiny_config()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  compiled = {}
  compiler = host_compiler(mesh, model, tx, state, max_device_batch=16,
                           compiled=compiled)
  # 64 is 8 per device, below max_device_batch: one composed step. 128 is
  # one micro-batch of 16 per device, 256 and 512 two and four: all three
  # share one compile of init/accumulate/apply.
  compiler.start([64, 128, 256])
  steps = {b: compiler.get(b) for b in (64, 128, 256, 512)}
  assert compiled == {64: 1, 128: 1}
  assert isinstance(steps[64], compile_lib.FusedStep)
  assert all(isinstance(steps[b], compile_lib.AccumulatingStep)
             for b in (128, 256, 512))
  assert (steps[128].model_executable is steps[512].model_executable
          is not steps[64].model_executable)
  functions = compiler.compile_accumulation(256)
  # Micro-batches accumulate on their own device; only the update reduces.
  assert "all-reduce" not in functions["accumulate"].as_text()
  assert "all-reduce" in functions["apply"].as_text()
  compiler.close()


def test_unknown_accumulation_mode_is_refused():
  with pytest.raises(compile_lib.ConfigError,
                     match="accumulation='device' is not one of host, compiled"):
    compile_lib.StepCompiler(
        mesh=None, model=None, tx=None, abstract_state=None,
        image_shape=(16, 16, 1), max_device_batch=8, ghost_batch_size=8,
        accumulation="device", on_compiled=print)


def test_momentum_change_takes_effect():
  config = tiny_config()
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 2))}
  for m in (0.9, 0.0):
    state = optimizer_lib.set_hyperparams(state, learning_rate=1.0, momentum=m)
    updates, state = tx.update(grads, state, params)
  # Trace: t1 = g + wd*w; t2 = 0 * t1 + (g + wd*w): m=0 forgets t1.
  np.testing.assert_allclose(updates["w"], -(1 + 5e-4) * np.ones((2, 2)),
                             rtol=1e-6)


def test_compiled_step_moves_no_batch_data_between_devices():
  mesh = mesh_lib.make_mesh()
  config = tiny_config()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = jax.eval_shape(lambda: loop.create_train_state(
      config, model, tx, mesh, seed=0))
  state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=mesh_lib.replicated(mesh)), state)
  compiler = compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx, abstract_state=state,
      image_shape=(16, 16, 1), max_device_batch=16, ghost_batch_size=8,
      on_compiled=lambda *a: None)
  assert compile_lib.micro_batches(256, mesh.size, 16, 8) == 2
  text = compiler.compile(256).as_text()  # 32 per device, 2 micro-batches.
  assert "all-reduce" in text
  for op in ("all-gather", "all-to-all", "collective-permute"):
    assert op not in text, op


BAD_MICRO = [
    (dict(batch_size=64, num_devices=8, max_device_batch=12, ghost_batch_size=8),
     "max_device_batch=12 is not a multiple of ghost_batch_size=8"),
    (dict(batch_size=64, num_devices=8, max_device_batch=0, ghost_batch_size=8),
     "max_device_batch=0 must be positive"),
    (dict(batch_size=64, num_devices=8, max_device_batch=16, ghost_batch_size=16),
     "ghost_batch_size=16 is larger than the per-device batch 8"),
    (dict(batch_size=384, num_devices=8, max_device_batch=32, ghost_batch_size=8),
     "max_device_batch=32 does not divide the per-device batch 48"),
]


@pytest.mark.parametrize("kwargs,message", BAD_MICRO)
def test_bad_micro_batching_is_refused(kwargs, message):
  with pytest.raises(compile_lib.ConfigError, match=message):
    compile_lib.micro_batches(**kwargs)


def test_micro_batch_counts():
  assert compile_lib.micro_batches(64, 8, 8, 8) == 1
  assert compile_lib.micro_batches(512, 8, 16, 8) == 4
  assert compile_lib.micro_batches(512, 1, 512, 8) == 1


@pytest.mark.parametrize("batch_size,accumulation,want", [
    (64, "host", ("single", 64)),   # 8 per device, below 16: its own.
    (128, "host", ("micro", 16)),   # exactly 16: one micro-batch of the set.
    (512, "host", ("micro", 16)),   # 4 micro-batches of the same set.
    (128, "compiled", ("fused", 128)),
    (512, "compiled", ("fused", 512)),
])
def test_step_keys(batch_size, accumulation, want):
  assert micro_batching.step_key(batch_size, 8, 16, 8, accumulation) == want


@pytest.mark.parametrize("closed_first", [False, True])
def test_background_compile_failure_is_reported_while_the_run_lasts(
    capsys, closed_first):
  """A background compile that fails says so at once; one that fails after
  the run has ended (its metrics file closed under it) says nothing."""
  import threading
  config = tiny_config()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  mesh = mesh_lib.make_mesh()
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  go = threading.Event()

  def on_compiled(batch_size, *_):
    if batch_size == 2 * B:
      go.wait(60)
      raise ValueError("I/O operation on closed file.")

  compiler = compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx, abstract_state=compile_lib.abstract(state),
      image_shape=(16, 16, 1), max_device_batch=16, ghost_batch_size=8,
      accumulation="host", on_compiled=on_compiled)
  compiler.start([B, 2 * B])  # 2B: its own functions, in the background.
  background = compiler._futures[compiler._key(2 * B)]
  if closed_first:
    compiler.close()
  go.set()
  assert str(background.exception(timeout=120)) == (
      "I/O operation on closed file.")
  compiler.close()
  err = capsys.readouterr().err
  if closed_first:
    assert "did not compile" not in err
  else:
    assert err.startswith(f"warning: the step for B={2 * B} did not compile: "
                          "I/O operation on closed file.; the run will stop")
