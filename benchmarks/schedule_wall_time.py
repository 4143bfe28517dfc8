"""Is growing the batch faster on the same hardware? decay_lr against
increase_batch, wall-clock, side by side in one invocation.

    python benchmarks/schedule_wall_time.py \
        [--config=configs/fashion_mnist_suite.py] [--epochs=1] \
        [--processes=1,2] [--set field=value ...]

For each process count (1: one process with 8 virtual CPU devices; 2: two
local processes with 4 each, joined by `jax.distributed` over gloo, which
puts a cross-process all-reduce in every step, as a pod does), trains the
config's `decay_lr` and `increase_batch` variants from scratch, in that
order, into fresh workdirs sharing one fresh compilation cache, and prints
each run's wall time (its last train record's `wall_time`: training,
evaluation and background compiles; start-up and the first stage's compile
excluded), updates, and increase_batch / decay_lr. The schedules are cut to `--epochs` by scaling
the config's epochs and milestones together.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer import metrics as metrics_lib  # noqa: E402


def train(config, workdir, cache, processes, overrides):
  base = [sys.executable, "-m", "trainer.main", f"--config={config}",
          f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}",
          *[f"--config.{o}" for o in overrides]]
  # CPU unless JAX_PLATFORMS names an accelerator (benchmarks/gpu_figures.sh).
  platform = os.environ.get("JAX_PLATFORMS") or "cpu"
  env = dict(os.environ, JAX_PLATFORMS=platform,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             f"--xla_force_host_platform_device_count={8 // processes}")
  if processes == 1:
    commands = [base]
  else:
    import portpicker  # pylint: disable=import-outside-toplevel
    port = portpicker.pick_unused_port()
    commands = [[*base, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={processes}", f"--process_id={i}"]
                for i in range(processes)]
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
           for c in commands]
  for p in procs:
    _, err = p.communicate()
    if p.returncode:
      sys.exit(f"{' '.join(commands[0])} failed:\n{err[-3000:]}")
  last = metrics_lib.read_metrics(workdir, "train")[-1]
  return last["wall_time"], last["step"]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist_suite.py")
  p.add_argument("--epochs", type=float, default=1.0,
                 help="length of both schedules (the suite's is 4)")
  p.add_argument("--processes", default="1,2")
  p.add_argument("--set", action="append", default=[],
                 help="config override FIELD=VALUE")
  a = p.parse_args()
  scale = a.epochs / 4.0  # The suite's schedules are 4 epochs long.
  overrides = [f"schedule.num_epochs={a.epochs}",
               "schedule.milestones_epochs=({},{},{})".format(
                   *(round(m * scale, 4) for m in (1.2, 2.4, 3.2))),
               "eval_every_epochs=" + str(a.epochs), *a.set]
  print(f"{'processes':>9} {'schedule':>15} {'updates':>8} {'wall s':>8} "
        f"{'ratio':>6}")
  with tempfile.TemporaryDirectory() as tmp:
    for processes in map(int, a.processes.split(",")):
      cache = os.path.join(tmp, f"cache{processes}")
      times = {}
      for kind in ("decay_lr", "increase_batch"):
        seconds, updates = train(
            f"{a.config}:{kind}", os.path.join(tmp, f"{kind}_{processes}"),
            cache, processes, overrides)
        times[kind] = seconds
        ratio = (f"{seconds / times['decay_lr']:>6.2f}"
                 if kind == "increase_batch" else f"{'':>6}")
        print(f"{processes:>9} {kind:>15} {updates:>8} {seconds:>8.1f} "
              f"{ratio}", flush=True)


if __name__ == "__main__":
  main()
