"""The program cache: compiled step functions stored, then loaded untraced."""
import os

import jax
import numpy as np
import pytest

import models
from tests import test_step
from trainer import compile as compile_lib
from trainer import loop
from trainer import mesh as mesh_lib
from trainer import metrics as metrics_lib
from trainer import optimizer as optimizer_lib
from trainer import program_cache as program_cache_lib

# Per device: 8 (k=1, "single"), 32 (k=2 of 16, "micro"); compiled: fused.
SIZES = dict(host=(64, 256), compiled=(256,))


@pytest.fixture(autouse=True)
def fresh_xla_cache(tmp_path):
  """Each test starts with an empty JAX persistent cache (so its first
  compile is a real one, which the program cache stores); later compiles of
  the same function in the test are JAX cache hits, which it does not."""
  from jax._src import compilation_cache  # What JAX's own tests reset.
  before = jax.config.values["jax_compilation_cache_dir"]
  compilation_cache.reset_cache()
  compile_lib.enable_compilation_cache(str(tmp_path / "xla_cache"))
  yield
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", before)


def setup(cache, accumulation, events):
  """A StepCompiler of test_step's tiny model using `cache`, and a state."""
  mesh = mesh_lib.make_mesh()
  config = test_step.tiny_config()
  model = models.create_model(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, learning_rate=0.1,
                                    momentum=0.9)
  state = loop.create_train_state(config, model, tx, mesh, seed=0)
  compiler = compile_lib.StepCompiler(
      mesh=mesh, model=model, tx=tx,
      abstract_state=compile_lib.abstract(state), image_shape=(16, 16, 1),
      max_device_batch=16, ghost_batch_size=8, accumulation=accumulation,
      program_cache=cache,
      on_compiled=lambda b, k, seconds, loaded: events.append((b, loaded)))
  return compiler, state, mesh


def run_steps(compiler, state, mesh, batch_sizes):
  """One step per batch size from the same state; the losses and states."""
  hyper = {k: jax.device_put(np.float32(v), mesh_lib.replicated(mesh))
           for k, v in dict(learning_rate=0.1, momentum=0.9,
                            bn_decay=0.5).items()}
  rng = np.random.default_rng(0)
  out = []
  for b in batch_sizes:
    batch = dict(image=rng.normal(size=(b, 16, 16, 1)).astype(np.float32),
                 label=rng.integers(0, 10, b).astype(np.int32))
    fresh = jax.tree_util.tree_map(lambda x: x.copy(), state)
    new, metrics = compiler.get(b)(fresh, batch, hyper)
    out.append(jax.device_get((new, metrics)))
  compiler.close()
  return out


def cache(directory, context="tiny", digest=None):
  return program_cache_lib.ProgramCache(str(directory), context=context,
                                        source_digest=digest)


@pytest.mark.parametrize("accumulation", ["host", "compiled"])
def test_second_compiler_loads_what_the_first_compiled(tmp_path, accumulation):
  sizes = SIZES[accumulation]
  first, second = [], []
  programs = tmp_path / "programs"
  compiler, state, mesh = setup(cache(programs), accumulation, first)
  compiled = run_steps(compiler, state, mesh, sizes)
  assert first == [(b, False) for b in sizes]
  assert list(programs.glob("*.program"))
  compiler, state, mesh = setup(cache(programs), accumulation, second)
  compiler.start(list(sizes))
  # Held by the cache, every size loaded before `start` returned (not in
  # the background, where it would compete with training).
  assert second == [(b, True) for b in sizes]
  loaded = run_steps(compiler, state, mesh, sizes)
  for a, b in zip(jax.tree_util.tree_leaves(compiled),
                  jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(a, b)


ONE = jax.devices()[:1]  # What `doubler` is compiled for.


def doubler():
  """A small compiled function: what the cache does not care about."""
  return jax.jit(lambda x: 2.0 * x).lower(
      jax.ShapeDtypeStruct((4,), np.float32)).compile()


def test_entry_is_found_only_under_the_same_key(tmp_path):
  cache(tmp_path, "tiny", "source").store("step B=64", doubler())
  for context, digest, description in (("other", "source", "step B=64"),
                                       ("tiny", "edited", "step B=64"),
                                       ("tiny", "source", "step B=128")):
    assert cache(tmp_path, context, digest).load(description, ONE) is None
  loaded = cache(tmp_path, "tiny", "source").load("step B=64", ONE)
  np.testing.assert_array_equal(loaded(np.arange(4, dtype=np.float32)),
                                [0.0, 2.0, 4.0, 6.0])


def test_key_leaves_out_where_jax_caches_and_what_it_logs(tmp_path):
  """A workdir moved or copied (its JAX cache directory with it) still
  finds its programs; a jax.config value that changes programs misses."""
  cache(tmp_path, "tiny", "source").store("step", doubler())
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "moved"))
  with jax.log_compiles(True):
    assert cache(tmp_path, "tiny", "source").load("step", ONE) is not None
  with jax.numpy_rank_promotion("raise"):
    assert cache(tmp_path, "tiny", "source").load("step", ONE) is None


def test_source_digest_follows_every_python_file(tmp_path):
  for package in program_cache_lib._PACKAGES:
    (tmp_path / package / "sub").mkdir(parents=True)
    (tmp_path / package / "sub" / "a.py").write_text("x = 1\n")
  before = program_cache_lib._source_digest(str(tmp_path))
  assert program_cache_lib._source_digest(str(tmp_path)) == before
  (tmp_path / "models" / "sub" / "a.py").write_text("x = 2\n")
  assert program_cache_lib._source_digest(str(tmp_path)) != before
  (tmp_path / "models" / "sub" / "a.py").write_text("x = 1\n")
  (tmp_path / "models" / "notes.txt").write_text("not code")
  assert program_cache_lib._source_digest(str(tmp_path)) == before


def test_unreadable_entry_is_reported_and_removed(tmp_path, capsys):
  programs = cache(tmp_path)
  programs.store("step", doubler())
  (entry,) = tmp_path.glob("*.program")
  entry.write_bytes(b"cut short by a crash")
  assert programs.load("step", ONE) is None
  assert (f"program cache: could not load {entry} (UnpicklingError"
          in capsys.readouterr().out)
  assert not entry.exists()


def test_executable_from_jax_persistent_cache_is_not_stored(tmp_path):
  """On XLA:CPU such an executable serializes without its kernels."""
  events = []
  compiler, _, _ = setup(None, "host", events)  # Fills JAX's cache only.
  compiler.get(64)
  compiler.close()
  compiler, _, _ = setup(cache(tmp_path / "programs"), "host", events)
  compiler.get(64)
  compiler.close()
  assert events == [(64, False), (64, False)]
  assert not list((tmp_path / "programs").glob("*.program"))


def test_the_cache_directory_is_the_config_s_then_jax_s_variable(
    monkeypatch):
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert (compile_lib.compilation_cache_dir(config, "/w")
          == "/w/compilation_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared")
  assert compile_lib.compilation_cache_dir(config, "/w") == "/shared"
  config.compilation_cache_dir = "/mine"
  assert compile_lib.compilation_cache_dir(config, "/w") == "/mine"


def test_each_cache_directory_keeps_what_was_compiled_under_it(tmp_path):
  """JAX opens its persistent cache once per process: a second run in the
  same process, with another directory, must still write to its own."""
  for name, factor in (("first", 2.0), ("second", 3.0)):
    compile_lib.enable_compilation_cache(str(tmp_path / name))
    jax.jit(lambda x: x * factor).lower(np.float32(1)).compile()
  for name in ("first", "second"):
    assert len(list((tmp_path / name).glob("jit_*-cache"))) == 1, name


def test_unwritable_directory_only_warns(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  cache(tmp_path / "file" / "programs").store("step", doubler())
  assert "program cache: could not store" in capsys.readouterr().out


def test_second_launch_loads_every_step_and_trains_the_same(tmp_path):
  """Two runs of one config in two workdirs sharing a cache directory."""
  from tests.test_train import tiny_config
  config = tiny_config()
  config.compilation_cache_dir = str(tmp_path / "cache")
  finals = []
  for name in ("first", "second"):
    finals.append(loop.train_and_evaluate(config, str(tmp_path / name)))
  compiles = [metrics_lib.read_metrics(str(tmp_path / name), "compile")
              for name in ("first", "second")]
  assert not any(r["from_program_cache"] for r in compiles[0])
  assert all(r["from_program_cache"] for r in compiles[1])
  assert ([r["batch_size"] for r in compiles[0]]
          == [r["batch_size"] for r in compiles[1]] == [64, 128, 256])
  assert finals[0] == finals[1]
  assert os.listdir(tmp_path / "cache" / "programs")


def test_the_context_leaves_out_how_the_host_runs():
  """Programs kept under one input-worker or in-flight setting serve
  another (they compile the same); any other field makes a new context."""
  from configs import fashion_mnist
  from trainer import workdir as workdir_lib
  base_config = fashion_mnist.get_config()
  context = workdir_lib.without_host_fields(base_config)
  host = fashion_mnist.get_config()
  host.dataset.num_workers, host.dataset.worker_processes = 7, 3
  host.dataset.prefetch_batches, host.steps_in_flight = 5, 2
  assert workdir_lib.without_host_fields(host) == context
  assert "worker_processes" not in context and '"ghost_batch_size"' in context
  other = fashion_mnist.get_config()
  other.model.width += 8
  assert workdir_lib.without_host_fields(other) != context
