"""The benchmarks' own helpers: trace parsing, the batch search, the GPU
script."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks import child, common, max_device_batch, reference_step
from benchmarks import steps_in_flight, trace_ops
from tests import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _refused(script: str, *args) -> str:
  """The last stderr line of benchmarks/`script` run with `args`, which must
  exit with argparse's status 2 and no traceback."""
  r = subprocess.run([sys.executable, f"benchmarks/{script}", *args],
                     cwd=ROOT, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return r.stderr.splitlines()[-1]


@pytest.mark.parametrize("name,want", [
    ("ynn_fusion.21", "YNNPACK library fusion (conv, dot)"),
    ("cudnn-conv-bw-filter.3", "convolution"),
    ("sm90_xmma_wgrad_implicit_gemm_bf16", "convolution"),
    ("cublas-gemm.7", "matmul"),
    ("dot.4", "matmul"),
    ("all-reduce-start.2", "all-reduce"),
    ("ncclDevKernel_AllReduce_Sum_f32", "all-reduce"),
    ("transpose_copy_fusion.22", "transpose / copy"),
    ("input_reduce_fusion_2", "reduction"),
    # XLA:GPU names fusions after their ops: a convert is not a convolution.
    ("input_convert_reduce_fusion.49", "reduction"),
    ("loop_convert_fusion.3", "other fusion / elementwise"),
    ("loop_multiply_fusion", "other fusion / elementwise"),
])
def test_operation_categories(name, want):
  assert trace_ops.category(name) == want


def test_operation_families_drop_the_number():
  ops = {"input_reduce_fusion.12": 1.0, "input_reduce_fusion.3": 0.5,
         "input_reduce_fusion": 0.25, "cudnn-conv.7": 2.0,
         "input_reduce_select_fusion.1": 4.0}
  assert trace_ops.by_family(ops) == {
      "input_reduce_fusion": (1.75, 3), "cudnn-conv": (2.0, 1),
      "input_reduce_select_fusion": (4.0, 1)}


def test_trace_times_the_operations_of_a_jitted_function():
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 128)),
                  jnp.float32)
  jax.block_until_ready(f(x))
  ops = trace_ops.trace(lambda: jax.block_until_ready(f(x)), steps=2)
  assert ops and all(ms > 0 for ms in ops.values())
  # Python frames and runtime bookkeeping are not operations.
  assert not any(name.startswith("$") or "::" in name for name in ops)
  kinds = trace_ops.by_category(ops)
  assert sum(kinds.values()) == pytest.approx(sum(ops.values()))


def test_reference_step_rejects_an_unknown_choice():
  assert reference_step.choices("one_pass,two_pass",
                                 reference_step.BN_VARIANCES,
                                 "--bn_variance") == ["one_pass", "two_pass"]
  with pytest.raises(SystemExit,
                     match="unknown --bn_gradient 'manual'; choose from "
                           "explicit, autodiff"):
    reference_step.choices("explicit,manual", reference_step.BN_GRADIENTS,
                            "--bn_gradient")


def test_reference_step_prints_a_saved_profile(tmp_path, capsys):
  """--from_ops_json: the tables come back from a saved (gzipped) file, the
  families sorted by how much the trainers differ."""
  import gzip
  import json
  rows = [dict(model="resnet50", trainer="ours",
               ops={"cudnn-conv.1": 2.0, "loop_select_fusion.3": 1.5,
                    "loop_select_fusion.4": 0.5}),
          dict(model="resnet50", trainer="reference",
               ops={"cudnn-conv.2": 2.0, "input_reduce_fusion": 0.25})]
  path = tmp_path / "ops.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump(rows, f)
  reference_step.print_profiles(json.load(gzip.open(path, "rt")), top=2)
  out = capsys.readouterr().out
  assert "convolution" in out and "total" in out
  families = [" ".join(line.replace("(", "( ").split()) for line in
              out.split("families that differ most")[1].splitlines()[2:4]]
  assert families == ["loop_select_fusion 2.00 ( 2) 0.00 ( 0)",
                      "input_reduce_fusion 0.00 ( 0) 0.25 ( 1)"]


def test_child_keeps_the_parents_xla_flags_but_its_own_device_count(
    tmp_path, monkeypatch):
  script = tmp_path / "devices.py"
  script.write_text("import json, os, jax\n"
                    "print(json.dumps([jax.device_count(),\n"
                    "                  os.environ['XLA_FLAGS']]))\n")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2"
                     " --xla_cpu_enable_fast_math=false")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  devices, flags = child.run(str(script), "--child", 3, "a test child")
  assert devices == 3
  assert "--xla_cpu_enable_fast_math=false" in flags


def test_gpu_figures_script_passes_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  r = subprocess.run([shellcheck, str(ROOT / "benchmarks/gpu_figures.sh")],
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout


def run_gpu_figures(tmp_path, **env):
  """benchmarks/gpu_figures.sh with a stand-in Python that prints what it was
  asked to run, so the parts' order and the budget are seen without a GPU."""
  fake = tmp_path / "python"  # Prints "ran:" and its arguments, tab-separated.
  fake.write_text('#!/bin/sh\nprintf "ran:"\nfor a in "$@"; do '
                  'printf "\\t%s" "$a"; done\necho\n')
  fake.chmod(0o755)
  return subprocess.run(
      ["bash", str(ROOT / "benchmarks/gpu_figures.sh")], capture_output=True,
      text=True, check=False, timeout=60,
      env=dict({k: v for k, v in os.environ.items()
                if k not in ("PARTS", "BUDGET_S", "CROSS")},
               PYTHON=str(fake), OUT=str(tmp_path / "out"), **env))


def test_gpu_figures_runs_parts_in_the_order_given_within_the_budget(
    tmp_path):
  # Limits: batch_transfer 60 s, reference_step 300 s, stage_switch 100 s.
  r = run_gpu_figures(tmp_path, BUDGET_S="250",
                      PARTS="batch_transfer reference_step stage_switch")
  assert r.returncode == 0, r.stderr
  headings = [line.split(" (")[0].split(":")[0]
              for line in r.stdout.splitlines() if line.startswith("== ")]
  assert headings == ["== batch_transfer", "== reference_step",
                      "== stage_switch", "== done"]
  assert re.search(r"^== reference_step: skipped \(its limit is 300 s, "
                   r"2\d\d s of BUDGET_S left\)$", r.stdout, re.M)
  ran = [argv[0] for argv in benchmark_calls(r.stdout)]
  assert ran == ["benchmarks/batch_transfer.py", "benchmarks/stage_switch.py"]
  assert (tmp_path / "out" / "stage_switch.txt").read_text().startswith(
      "ran:\tbenchmarks/stage_switch.py\t--accumulation=host")


def benchmark_calls(stdout: str) -> list[list[str]]:
  """The arguments of each call the stand-in Python printed for a
  benchmark (a script under benchmarks/, or -m benchmarks.X)."""
  calls = [line.split("\t")[1:] for line in stdout.splitlines()
           if line.startswith("ran:\t")]
  return [argv[1:] if argv[0] == "-m" else argv for argv in calls
          if argv[0] == "-m" and argv[1].startswith("benchmarks.")
          or argv[0].startswith("benchmarks/")]


def test_every_gpu_figures_call_parses_with_its_benchmarks_flags(tmp_path):
  """A renamed or mistyped flag in gpu_figures.sh would cost a GPU lease:
  every benchmark call it makes parses with that benchmark's own flags."""
  from absl import flags

  from benchmarks import batch_transfer, gpu_program, stage_switch, train_step
  from benchmarks import input_pipeline  # Defines its absl flags.
  del input_pipeline
  r = run_gpu_figures(tmp_path)
  assert r.returncode == 0, r.stderr
  calls = benchmark_calls(r.stdout)
  modules = dict(reference_step=reference_step, train_step=train_step,
                 max_device_batch=max_device_batch, stage_switch=stage_switch,
                 batch_transfer=batch_transfer, gpu_program=gpu_program)
  names = sorted(argv[0] for argv in calls)
  assert names == sorted(
      ["benchmarks/reference_step.py", "benchmarks/reference_step.py",
       "benchmarks/train_step.py", "benchmarks/max_device_batch.py",
       "benchmarks/max_device_batch.py", "benchmarks/stage_switch.py",
       "benchmarks/batch_transfer.py", "benchmarks.input_pipeline",
       "benchmarks/gpu_program.py"])
  for argv in calls:
    if argv[0] == "benchmarks.input_pipeline":
      try:  # absl: unknown flags and bad values raise.
        flags.FLAGS(["input_pipeline", *argv[1:]])
      finally:
        flags.FLAGS.unparse_flags()
      continue
    parser = modules[argv[0][len("benchmarks/"):-len(".py")]].parser()
    try:
      _, unknown = parser.parse_known_args(argv[1:])
    except SystemExit:
      pytest.fail(f"{argv[0]} refused {argv[1:]}")
    assert unknown == [], argv


@pytest.mark.parametrize("env, message", [
    (dict(PARTS="reference_step refrence_step"),
     "gpu_figures.sh: unknown part 'refrence_step'; known:"),
    (dict(BUDGET_S="9m"),
     "gpu_figures.sh: BUDGET_S='9m' is not a whole number of seconds"),
])
def test_gpu_figures_refuses_bad_input_before_any_work(tmp_path, env,
                                                       message):
  r = run_gpu_figures(tmp_path, **env)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(message)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("capacity,refine,time_left,want,tried", [
    # Doubles 32..256, 512 fails, then bisects toward 300 in steps of 32.
    (300, 0, 99, (256, 512), [32, 64, 128, 256, 512]),
    (300, 1, 99, (256, 384), [32, 64, 128, 256, 512, 384]),
    (300, 3, 99, (288, 320), [32, 64, 128, 256, 512, 384, 320, 288]),
    # Nothing fails below the limit: no bisection.
    (10_000, 3, 99, (1024, None), [32, 64, 128, 256, 512, 1024]),
    # Not even the start fits.
    (16, 3, 99, (None, 32), [32]),
    # Out of time after two sizes.
    (300, 3, 2, (64, None), [32, 64]),
])
def test_largest_batch_search(capacity, refine, time_left, want, tried):
  seen = []

  def fits(b):
    seen.append(b)
    return b <= capacity

  got = max_device_batch.largest_that_fits(
      fits, start=32, limit=1024, refine=refine, multiple=32,
      out_of_time=lambda: len(seen) >= time_left)
  assert got == want
  assert seen == tried


@pytest.mark.parametrize("measured,b,want", [
    ({}, 4096, None),
    ({1024: 42.55}, 4096, None),  # One size cannot separate the fixed part.
    # The H100's ResNet-50 estimates: 17.5 GiB fixed + 24.4 MiB per example.
    ({1024: 42.55, 2048: 67.57}, 4096, 117.61),
    ({1024: 42.55, 2048: 67.57}, 2560, 80.08),
    # The two largest sizes set the line, whatever came before.
    ({256: 1.0, 1024: 42.55, 2048: 67.57}, 3072, 92.59),
    ({1024: 42.55, 2048: float("nan")}, 4096, None),
])
def test_predicted_memory(measured, b, want):
  got = max_device_batch.predicted_gib(measured, b)
  assert got == (None if want is None else pytest.approx(want, abs=0.01))


H100 = int(71.3 * 2**30)  # What JAX left for arrays at a 0.9 memory fraction.


@pytest.mark.parametrize("b,limit,want", [
    (4096, H100, "XLA's estimate extrapolates to 117.6 GiB > 71.3"),
    (2304, H100, "XLA's estimate extrapolates to 73.8 GiB > 71.3"),
    (2176, H100, None),  # 70.7 GiB: tried.
    (4096, None, None),  # No limit known (a CPU): tried.
])
def test_sizes_predicted_not_to_fit(b, limit, want):
  measured = {1024: 42.55, 2048: 67.57}
  assert max_device_batch.predicted_not_to_fit(measured, b, limit) == want
  # With one size measured nothing is predicted.
  assert max_device_batch.predicted_not_to_fit({2048: 67.57}, b, limit) is None


def test_a_size_whose_compiled_estimate_exceeds_the_memory_is_not_run():
  env = dict(os.environ, XLA_FLAGS=xla_flags.xla_flags(1))
  r = subprocess.run(
      [sys.executable, "benchmarks/max_device_batch.py",
       "--config=configs/fashion_mnist.py", "--image_size=28",
       "--dtype=float32", "--ghost_batch_size=8", "--sizes=32,8",
       "--memory_gib=0.008", "--predict=false", "--steps=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0] == "small_resnet 28 px float32 on cpu, 0.008 GiB for arrays"
  m = re.fullmatch(r"\s*32 does not fit: XLA's estimate (\S+) GiB > 0\.008",
                   lines[2])
  assert m and float(m.group(1)) > 0.008, lines[2]
  assert lines[3].split()[0] == "8" and len(lines[3].split()) == 5, lines[3]
  assert lines[4] == ("largest per-device batch that ran: 8 (first that "
                      "did not: 32)")


@pytest.mark.parametrize("sizes", ["48", "64,x", "0"])
def test_sizes_that_are_not_ghost_batches_are_refused(sizes):
  assert _refused("max_device_batch.py", f"--sizes={sizes}") == (
      "max_device_batch.py: error: --sizes must be positive multiples of "
      f"--ghost_batch_size=32, got {sizes}")


def test_running_out_of_memory_is_a_size_that_does_not_fit(capsys):
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                       "allocate 75.2GiB.\nmore")
  assert max_device_batch._ran_out_of_memory(4096, error) is False
  assert capsys.readouterr().out == (
      "  4096 out of memory (RESOURCE_EXHAUSTED: Out of memory while trying "
      "to allocate 75.2GiB.)\n")
  with pytest.raises(ValueError, match="shapes differ"):
    max_device_batch._ran_out_of_memory(4096, ValueError("shapes differ"))


def test_missing_gpu_description_is_refused():
  assert _refused("max_device_batch.py", "--gpu=nowhere.txtpb") == (
      "max_device_batch.py: error: no GPU description at nowhere.txtpb")


def test_gpu_description_without_memory_is_refused(tmp_path):
  spec = tmp_path / "gpu.txtpb"
  spec.write_text("gpu_device_info { core_count: 132 }\n")
  assert _refused("max_device_batch.py", f"--gpu={spec}") == (
      f"max_device_batch.py: error: {spec} is not a text GPU description "
      "with a device_memory_size")


@pytest.mark.parametrize("fraction", ["most", "1.5"])
def test_a_memory_fraction_jax_would_not_take_is_refused(fraction):
  r = subprocess.run(
      [sys.executable, "benchmarks/max_device_batch.py",
       "--gpu=benchmarks/gpu_specs/h100_sxm.txtpb"],
      cwd=ROOT, env=dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=fraction),
      capture_output=True, text=True, check=False)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.splitlines()[-1] == (
      "max_device_batch.py: error: XLA_PYTHON_CLIENT_MEM_FRACTION must be a "
      f"number in (0, 1], got {fraction!r}")


def test_compile_only_without_the_plugin_says_how_to_get_it():
  from benchmarks import gpu_program
  if gpu_program.plugin_found():
    pytest.skip("this Python has the CUDA plugin")
  r = subprocess.run(
      [sys.executable, "benchmarks/max_device_batch.py",
       "--gpu=benchmarks/gpu_specs/h100_sxm.txtpb"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert r.returncode == 1
  assert r.stderr.strip() == (
      "max_device_batch.py --gpu needs XLA's CUDA plugin (jax-cuda12-pjrt), "
      "which this Python lacks: run `make gpu-program-env`, then "
      ".venv-gpu-program/bin/python benchmarks/max_device_batch.py "
      "--gpu=...")


def test_unknown_bn_relu_is_refused():
  with pytest.raises(SystemExit,
                     match="unknown --bn_relu 'inside'; choose from "
                           "fused, separate"):
    reference_step.choices("fused,inside", reference_step.BN_RELUS,
                            "--bn_relu")


@pytest.mark.parametrize("backend,want", [("gpu", "fused"), ("cpu", "separate"),
                                          ("tpu", "separate")])
def test_reference_step_times_the_trainers_relu_by_default(monkeypatch,
                                                           backend, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  config = common.load_config(str(ROOT / "configs/imagenet_resnet50.py"), [])
  assert reference_step.platform_variant(config)["bn_relu"] == want


@pytest.mark.parametrize("backend,want", [
    ("gpu", "space_to_depth"), ("cpu", "conv"), ("tpu", "conv")])
def test_reference_step_times_the_trainers_stem_by_default(monkeypatch,
                                                           backend, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  config = common.load_config(str(ROOT / "configs/imagenet_resnet50.py"), [])
  assert reference_step.platform_variant(config)["stem"] == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_peaks_product_chain_keeps_its_values_in_range(dtype):
  """Twenty products of 256 x 256 operands: entries stay of order 1 (no
  overflow to inf, no underflow to zero, which a GPU multiplies faster)."""
  a, b = reference_step.product_operands(jax.random.PRNGKey(0), 2, 256, dtype)
  out = reference_step.product_chain(a, b, chain=20)
  assert out.shape == (2, 256, 256) and out.dtype == jnp.dtype(dtype)
  rms = float(jnp.sqrt(jnp.mean(jnp.square(out.astype(jnp.float32)))))
  assert 0.3 < rms < 3.0, rms


def test_the_peak_counts_every_product_of_the_chain(monkeypatch):
  """2 n^3 FLOPs per product, `chain` products per device, over the best
  call's seconds."""
  from trainer import mesh as mesh_lib
  clock = iter([0.0, 2.0, 10.0, 11.0])  # Calls of 2 s, then 1 s.
  monkeypatch.setattr(reference_step.time, "perf_counter",
                      lambda: next(clock))
  mesh = mesh_lib.make_mesh()
  peak = reference_step.matmul_peak(mesh, n=16, repeats=2, chain=3)
  assert peak == 2.0 * 16**3 * 3 * mesh.size / 1.0


@pytest.mark.parametrize("variances,gradients,relus,want", [
    (["one_pass"], ["explicit"], ["fused"], ["ours"]),
    (["one_pass"], ["explicit", "autodiff"], ["fused", "separate"],
     ["ours/explicit/fused", "ours/explicit/separate", "ours/autodiff"]),
    (["one_pass", "two_pass"], ["autodiff"], ["fused", "separate"],
     ["ours/one_pass", "ours/two_pass"]),
    (["one_pass"], ["explicit"], ["separate", "fused"],
     ["ours/separate", "ours/fused"]),
])
def test_reference_step_rows(variances, gradients, relus, want):
  rows = reference_step.our_variants(variances, gradients, relus)
  assert [who for who, *_ in rows] == want
  assert all((relu == relus[0]) or gradient == "explicit"
             for _, _, gradient, relu, _ in rows)
  assert {stem for *_, stem in rows} == {"conv"}


def test_the_flops_child_counts_the_variants_the_gpu_ran(monkeypatch):
  """On a GPU, FLOPs are counted by a child on the CPU, where unset fields
  resolve to other variants (separate ReLU, plain stem): the measured rows'
  variants are passed to it, after the user's flags, so that they win."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = common.load_config(str(ROOT / "configs/imagenet_resnet50.py"), [])
  models.resolve_platform_defaults(config)
  assert reference_step.platform_variant(config) == dict(
      bn_relu="fused", stem="space_to_depth")
  rows = [dict(trainer="ours", bn_relu="fused", stem="space_to_depth"),
          dict(trainer="reference")]
  flags = reference_step.flops_child_flags(rows)
  assert flags == ["--bn_relu=fused", "--stem=space_to_depth"]
  args = reference_step.parser().parse_args(["--bn_relu=", "--stem=", *flags])
  assert (args.bn_relu, args.stem) == ("fused", "space_to_depth")
  rows = [dict(trainer="ours/conv", bn_relu="fused", stem="conv"),
          dict(trainer="ours/space_to_depth", bn_relu="fused",
               stem="space_to_depth"), dict(trainer="reference")]
  assert reference_step.flops_child_flags(rows) == [
      "--bn_relu=fused", "--stem=conv,space_to_depth"]


def test_max_device_batch_compiles_for_a_gpu_what_the_trainer_runs_there(
    monkeypatch):
  """--gpu compiles on this CPU, where unset fields would resolve for the
  CPU: the config it compiles has the GPUs' values (the ReLU inside the
  norm's gradient, the stem over blocks)."""
  from benchmarks import gpu_program
  compiled = []

  class Compiled(Exception):
    pass

  def compile_only(a, config, description):
    compiled.append(config)
    raise Compiled

  monkeypatch.setattr(gpu_program, "plugin_found", lambda: True)
  monkeypatch.setattr(max_device_batch, "_compile_only", compile_only)
  monkeypatch.setattr(sys, "argv", [
      "max_device_batch.py", f"--gpu={ROOT}/benchmarks/gpu_specs/h100_sxm.txtpb",
      "--sizes=256"])
  with pytest.raises(Compiled):
    max_device_batch.main()
  (config,) = compiled
  assert config.model.name == "resnet50"
  assert config.model.bn_fuse_relu is True
  assert config.model.stem_space_to_depth is True


def test_the_stem_flag_leaves_the_small_model_as_it_is():
  """--stem picks ResNet-50's stem; the small model, which has none, runs
  its one row (the blocked stem would be refused for it)."""
  args = reference_step.parser().parse_args(
      ["--models=small", "--batch_size=16", "--ghost_batch_size=8",
       "--stem=conv,space_to_depth"])
  built = reference_step.build("small", args, compile_steps=False)
  assert list(built["ours"]) == ["ours"]
  assert built["ours"]["ours"][0].model.stem_space_to_depth is False


def test_reference_step_rows_per_stem():
  rows = reference_step.our_variants(["one_pass"], ["explicit", "autodiff"],
                                     ["fused"], ["conv", "space_to_depth"])
  assert rows == [
      ("ours/explicit/conv", "one_pass", "explicit", "fused", "conv"),
      ("ours/explicit/space_to_depth", "one_pass", "explicit", "fused",
       "space_to_depth"),
      ("ours/autodiff/conv", "one_pass", "autodiff", "fused", "conv"),
      ("ours/autodiff/space_to_depth", "one_pass", "autodiff", "fused",
       "space_to_depth")]


def test_unknown_stem_is_refused():
  with pytest.raises(SystemExit, match="unknown --stem 'blocks'; choose from "
                     "conv, space_to_depth"):
    reference_step.choices("conv,blocks", reference_step.STEMS, "--stem")


def test_negative_memory_limit_is_refused():
  assert _refused("max_device_batch.py", "--memory_gib=-1") == (
      "max_device_batch.py: error: --memory_gib must not be negative, "
      "got -1.0")


@pytest.mark.parametrize("in_flight,want", [
    (1, ["d1", "r1", "d2", "r2", "d3", "r3"]),
    (2, ["d1", "d2", "r1", "d3", "r2", "r3"]),
])
def test_timed_steps_read_their_metrics_as_the_loop_does(monkeypatch,
                                                        in_flight, want):
  events = []

  def step(state, batch, hyper):
    del batch, hyper
    events.append(f"d{state}")
    return state + 1, {"n": np.int32(state)}

  monkeypatch.setattr(jax, "device_get",
                      lambda m: events.append(f"r{int(m['n'])}"))
  state, seconds = common.seconds_per_step(step, 0, None, None, steps=3,
                                           in_flight=in_flight)
  assert state == 4 and seconds > 0
  assert events[:2] == ["d0", "r0"]  # The untimed warm-up step.
  assert events[2:] == want


def test_train_step_refuses_an_in_flight_other_than_1_or_2():
  assert _refused("train_step.py", "--in_flight=1,3") == (
      "train_step.py: error: --in_flight=1,3: each value must be 1 or 2")


def test_steps_in_flight_scales_the_schedule():
  assert steps_in_flight.scaled_schedule("configs/fashion_mnist.py", [],
                                         0.5) == [
      "schedule.num_epochs=0.5", "schedule.milestones_epochs=(0.2, 0.35, 0.45)",
      "eval_every_epochs=0.5"]
  assert steps_in_flight.scaled_schedule(
      "configs/fashion_mnist.py", ["schedule.num_epochs=20.0"], 2.0)[1] == (
          "schedule.milestones_epochs=(0.4, 0.7, 0.9)")


@pytest.mark.parametrize("flag", ["--epochs=0", "--rounds=0"])
def test_steps_in_flight_refuses_an_empty_comparison(flag):
  assert _refused("steps_in_flight.py", flag) == (
      "steps_in_flight.py: error: --epochs must be positive and --rounds at "
      "least 1")


def test_reference_step_refuses_an_in_flight_other_than_1_or_2():
  assert _refused("reference_step.py", "--in_flight=3") == (
      "reference_step.py: error: --in_flight must be 1 or 2, got 3")


def test_reference_step_refuses_an_ops_json_it_cannot_write():
  assert _refused("reference_step.py", "--ops_json=benchmarks") == (
      "reference_step.py: error: cannot write benchmarks: it is a folder")


@pytest.mark.parametrize("path, folder, want", [
    ("", False, None),
    ("out.json", False, None),  # In the working folder.
    ("/nowhere/out.json", False, "cannot write /nowhere/out.json: no folder "
     "/nowhere"),
    ("/nowhere/hlo", True, None),  # Made when written.
    (__file__, True, f"cannot write into {__file__}: it is a file"),
])
def test_output_paths_checked_before_the_work(path, folder, want):
  assert common.unwritable(path, folder=folder) == want


def test_reference_runner_waits_one_step_behind(monkeypatch):
  events = []

  def step(state, batch):
    del batch
    events.append(f"d{state}")
    return state + 1, state

  monkeypatch.setattr(jax, "block_until_ready",
                      lambda out: events.append(f"w{out}"))
  run = reference_step._Runner(step, 0, None)
  run()
  run.one_ahead(3)
  assert events == ["d0", "w0", "d1", "d2", "w1", "d3", "w2", "w3"]
  assert run.state == 4


def test_opencv_seconds_counts_cpu_inside_opencv_only():
  """The GIL bound's instrument: CPU seconds inside the wrapped OpenCV calls
  are counted, Python's around them are not, and the module is restored."""
  import cv2

  from benchmarks import input_pipeline
  original = cv2.resize
  image = np.zeros((1500, 1500, 3), np.uint8)
  with input_pipeline.OpenCvSeconds() as opencv:
    assert cv2.resize is not original
    for _ in range(4):
      cv2.resize(image, (1200, 1200), interpolation=cv2.INTER_CUBIC)
    inside = opencv.seconds
    sum(i * i for i in range(300_000))  # Python work: not counted.
  assert cv2.resize is original
  assert inside > 0 and opencv.seconds == inside


def test_a_row_whose_plan_ends_early_is_refused_not_printed():
  """A row whose examples run out before its time has a short wall time and,
  with worker processes, loses the exited workers' CPU time (the H100's
  array_record rows printed negative examples per CPU-second)."""
  from benchmarks import input_pipeline
  config = input_pipeline.synthetic_config()
  config.dataset.update(dict(image_size=32, num_train_examples=64))
  config.schedule.update(dict(kind="decay_lr", batch_size=16, num_epochs=1.0,
                              milestones_epochs=()))
  config.ghost_batch_size = 16
  with pytest.raises(input_pipeline.RanOut,
                     match=r"^ran out of examples after 48 in [0-9.]+ s of 60: "
                           r"give the case more epochs$"):
    input_pipeline.measure(config, seconds=60)


def test_array_record_jpegs_read_through_the_trainers_source(tmp_path):
  from benchmarks import input_pipeline
  from input_pipeline import sources
  name = input_pipeline.prepare_array_record_jpegs(str(tmp_path), 3)
  config = input_pipeline.imagenet_mock_config()
  config.dataset.update(dict(name=name, data_dir=str(tmp_path),
                             num_train_examples=3))
  source = sources.train_source(config)
  assert isinstance(source, sources.TfdsSource) and len(source) == 3
  for image, label in sources.read_examples(source, [0, 1, 2]):
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert 300 <= image.shape[0] < 500 and 350 <= image.shape[1] < 500
    assert 0 <= label < 1000


@pytest.mark.parametrize("value", ["0", "2,x"])
def test_input_pipeline_refuses_a_bad_process_count(value):
  r = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline",
                      f"--processes={value}"], cwd=ROOT, capture_output=True,
                     text=True, check=False)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert (f"--processes={value}: each value must be a positive integer "
          "(threads: --workers)") in r.stderr


@pytest.mark.parametrize("field,value,want", [
    ("model.bn_fuse_relu", "true", True),
    ("model.bn_fuse_relu", "False", False),
    ("model.bn_fuse_relu", "TRUE", True),
    ("model.width", "3", 3),
    ("optimizer.momentum", "0.5", 0.5),
    ("optimizer.name", "sgd", "sgd")])
def test_benchmark_overrides_read_values_as_config_flags_do(field, value,
                                                             want):
  # `--set model.bn_fuse_relu=true` was a string, refused by ml_collections.
  got = common.load_config(str(ROOT / "configs/fashion_mnist.py"),
                           [f"{field}={value}"])
  for name in field.split("."):
    got = got[name]
  assert got == want and type(got) is type(want)


def test_input_pipeline_without_tfds_runs_the_other_cases():
  # The GPU machine's image has no TFDS: the part ended in an ImportError.
  hide_tfds = ("import runpy, sys; sys.modules['tensorflow_datasets'] = None; "
               "runpy.run_module('benchmarks.input_pipeline', "
               "run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", hide_tfds, "--seconds=0.1",
                      "--workers=0", "--processes=", "--step_batch_sizes="],
                     cwd=ROOT, capture_output=True, text=True, check=False,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert ("skipping imagenet_jpeg_mock and imagenet_array_record: import of "
          "tensorflow_datasets halted") in r.stdout
  cases = {line.split()[0] for line in r.stdout.splitlines()
           if not line.startswith(("skipping", "host:", "case"))}
  assert "synthetic_224_inception" in cases, r.stdout
  assert not any(case.startswith("imagenet") for case in cases), r.stdout
