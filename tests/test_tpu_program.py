"""benchmarks/tpu_program.py: the trainer's step compiled for a TPU slice on
this CPU (libtpu's compile-only devices)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import tpu_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = os.path.join(ROOT, ".venv-tpu-program")  # make tpu-program-env


def test_collectives_are_counted_by_kind_async_ones_once():
  hlo = """
  %all-reduce-start.1 = (f32[10]{0}, f32[3]{0}) all-reduce-start(%a, %b), replica_groups={}
  %all-reduce-done.1 = (f32[10]{0}, f32[3]{0}) all-reduce-done(%all-reduce-start.1)
  %all-reduce.2 = f32[4]{0} all-reduce(%c), replica_groups={}
  %all-gather.3 = f32[8]{0} all-gather(%d), dimensions={0}
  %fusion.4 = f32[8]{0} fusion(%all-gather.3), kind=kLoop
"""
  assert tpu_program.collectives(hlo) == {"all-reduce": 2, "all-gather": 1}


def test_memory_per_chip_is_known_by_generation():
  assert tpu_program.hbm_gib("v5e:2x2") == 16
  assert tpu_program.hbm_gib("v4:2x2x1") == 32
  assert tpu_program.hbm_gib("v9:2x2") is None


@pytest.mark.parametrize("flag, message", [
    ("--topology=v5e", "--topology 'v5e' is not generation:chips"),
    ("--per_device_batch=-8", "--per_device_batch must be positive, got -8"),
    ("--topology=v9:2x2", "no memory known for v9; pass --hbm_gib"),
    ("--per_device_batch=12", "--per_device_batch 12 is not a multiple of "
     "ghost_batch_size=8"),
    ("--json=/nowhere/tpu.json", "cannot write /nowhere/tpu.json: no folder "
     "/nowhere"),
])
def test_bad_flag_is_refused_before_compiling(flag, message):
  result = subprocess.run(
      [sys.executable, "benchmarks/tpu_program.py",
       "--config=configs/fashion_mnist.py:smoke", flag],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert message in result.stderr.strip().splitlines()[-1]


def test_without_libtpu_it_says_where_to_get_it():
  result = subprocess.run(
      [sys.executable, "benchmarks/tpu_program.py",
       "--config=configs/fashion_mnist.py:smoke"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  if result.returncode == 0:
    pytest.skip("this Python has libtpu")
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("tpu_program.py: no compile-only TPU 'v5e:2x2' (")
  assert line.endswith("libtpu is in `make tpu-program-env`: run "
                       ".venv-tpu-program/bin/python "
                       "benchmarks/tpu_program.py")


@pytest.mark.skipif(not os.path.exists(os.path.join(ENV, ".stamp")),
                    reason="no .venv-tpu-program (make tpu-program-env)")
def test_smoke_step_on_a_v5e_slice_communicates_only_in_apply(tmp_path):
  """The smoke config's stage functions for 4 v5e chips, compiled by
  XLA:TPU: accumulating a micro-batch (ghost batch norm included) moves
  nothing between chips; applying the update all-reduces the gradients
  once and gathers nothing; each fits a chip with room to spare."""
  out = tmp_path / "figures.json"
  result = subprocess.run(
      [os.path.join(ENV, "bin", "python"), "benchmarks/tpu_program.py",
       "--config=configs/fashion_mnist.py:smoke", "--topology=v5e:2x2",
       f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(out.read_text())
  assert figures["chips"] == 4 and figures["per_device_batch"] == 64
  functions = figures["functions"]
  assert set(functions) == {"init", "accumulate", "apply"}
  assert functions["accumulate"]["collectives"] == {}
  assert functions["apply"]["collectives"] == {"all-reduce": 1}
  for f in functions.values():
    assert 0 < f["total"] < 0.1 * figures["hbm_gib"]
  assert "accumulate" in result.stdout and "all-reduce 1" in result.stdout
