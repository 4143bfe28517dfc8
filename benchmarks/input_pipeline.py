"""Examples per second of the train input pipeline on this host.

    python -m benchmarks.input_pipeline [--seconds=5] [--workers=0,1,2]
        [--processes=2]

Cases:
* `fashion_mnist_idx`: configs/fashion_mnist.py (IDX files, 28x28x1,
  pad-crop-flip), skipped when the IDX files are not installed.
* `synthetic_224_inception`: the synthetic source at 224x224x3 (generating
  the image is part of the cost), inception crop + flip + resize to 224.
* `imagenet_jpeg_mock`: `imagenet2012` through the TFDS source under
  `tfds.testing.mock_data`, whose examples are JPEGs of ImageNet's typical
  sizes decoded by TFDS's own image feature (as a prepared array_record
  ImageNet would be), then the inception recipe at 224.
* `imagenet_array_record`: the same kind of JPEGs (512 distinct) prepared by
  TFDS as an array_record dataset in a temporary directory (TFDS writes
  already-encoded JPEGs without TensorFlow) and read through the trainer's
  TFDS source as a prepared ImageNet is: record reads and TFDS's example
  parsing included.

For each worker count (threads; then with `--processes`, worker processes,
`dataset.worker_processes`, but for the mock, whose patching a spawned
process would not see): wall-clock examples/s, and examples per CPU-second
(CPU time over all threads, and over the worker processes from /proc): the
per-core figure, which says how many cores a given step rate needs.

With threads, also how much of each example's CPU time is spent outside OpenCV's decode,
resize, flip and colour calls, which release the GIL (process CPU time less
the CPU time of the threads inside those calls): an upper bound on the time
an example holds the GIL, hence a lower bound on what one process's worker
threads can deliver however many cores the host has (`GIL ceiling`). Only
that bound is measured; other calls (numpy's copies among them) may release
the GIL too.

Then, in the same invocation, the train step of configs/fashion_mnist.py on 8
virtual devices at `--step_batch_sizes` (benchmarks/train_step.py, host
accumulation) and the ratio of the Fashion-MNIST pipeline's examples/s to the
step's: the pipeline keeps ahead when the ratio is ≥ 3 (it shares the same
cores while training, so its share of them is what counts).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base
from configs import fashion_mnist
from input_pipeline import train_batches
from trainer import plan as plan_lib

_SECONDS = flags.DEFINE_float("seconds", 5.0, "Measuring time per case (s).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "num_workers values.")
_PROCESSES = flags.DEFINE_list(
    "processes", [], "worker_processes values (positive) to run as well.")
_STEP_BATCH_SIZES = flags.DEFINE_string(
    "step_batch_sizes", "128,1024",
    "Train step batch sizes to compare the Fashion-MNIST pipeline with "
    "(empty: skip).")

ARRAY_RECORD_EXAMPLES = 512  # Distinct JPEGs written (about 24 MB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_like(config, source: str, name: str) -> None:
  d = config.dataset
  d.update(dict(name=name, source=source, image_size=224, channels=3,
                num_classes=1000, augment="inception", mean=IMAGENET_MEAN,
                std=IMAGENET_STD, num_train_examples=100_000))
  config.schedule.batch_size = 256
  config.ghost_batch_size = 32


def fashion_mnist_config():
  config = fashion_mnist.get_config()
  config.dataset.source = "idx"  # What "auto" reads here, without TFDS too.
  return config


def synthetic_config():
  config = base.get_base_config()
  _imagenet_like(config, "synthetic", "synthetic")
  return config


def imagenet_mock_config():
  config = base.get_base_config()
  _imagenet_like(config, "tfds", "imagenet2012")
  return config


def imagenet_like_jpegs(count: int) -> list[bytes]:
  """`count` JPEGs of ImageNet's typical sizes (300-500 px a side, ~400x350
  on average): smooth blocks plus noise, quality 90."""
  from PIL import Image
  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(count):
    h, w = rng.integers(300, 500), rng.integers(350, 500)
    smooth = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
    image = np.repeat(np.repeat(smooth, 16, 0), 16, 1)[:h, :w]
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


class _JpegDataSource:
  """Stands in for ImageNet's array_record source: JPEG bytes decoded by the
  dataset's own TFDS image feature on every access."""

  def __init__(self, builder, num_examples: int, num_distinct: int = 32):
    self._feature = builder.info.features["image"]
    self._num_examples = num_examples
    self._jpegs = imagenet_like_jpegs(num_distinct)

  def __len__(self):
    return self._num_examples

  def __getitem__(self, index):
    jpeg = self._jpegs[index % len(self._jpegs)]
    return {"image": self._feature.decode_example_np(jpeg), "label": index % 1000}


# OpenCV calls that release the GIL while they run, as the pipeline makes
# them (TFDS's image feature decodes with imdecode and cvtColor).
OPENCV_GIL_FREE = ("imdecode", "cvtColor", "resize", "flip")


class OpenCvSeconds:
  """Within `with`, counts the CPU seconds that threads spend inside
  OPENCV_GIL_FREE (wrapping the cv2 module's functions, which the pipeline
  and TFDS look up at each call); `seconds` holds the total over threads."""

  def __init__(self):
    self.seconds = 0.0
    self._saved = {}

  def __enter__(self):
    import cv2
    for name in OPENCV_GIL_FREE:
      self._saved[name] = original = getattr(cv2, name)
      setattr(cv2, name, self._timed(original))
    return self

  def _timed(self, function):
    lock = threading.Lock()

    def timed(*args, **kwargs):
      start = time.thread_time()  # This thread's CPU time, not the wall's.
      try:
        return function(*args, **kwargs)
      finally:
        spent = time.thread_time() - start
        with lock:
          self.seconds += spent
    return timed

  def __exit__(self, *exc):
    import cv2
    for name, original in self._saved.items():
      setattr(cv2, name, original)


@functools.cache
def _jpeg_builder_class():
  """A TFDS builder of `imagenet_like_jpegs` (class made, and so registered
  with TFDS under its name, on the first call)."""
  import tensorflow_datasets as tfds

  class ImagenetLikeJpegs(tfds.core.GeneratorBasedBuilder):
    """JPEGs of ImageNet's sizes with 1,000 classes, one train split."""
    VERSION = tfds.core.Version("1.0.0")
    # Nothing to download. (TFDS would look for a checksums file beside
    # this module, which needs importlib_resources, not installed.)
    url_infos = None

    def __init__(self, *, num_examples: int = 256, **kwargs):
      self._num_examples = num_examples
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(encoding_format="jpeg"),
           "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      # File objects: TFDS stores their bytes as they are, no TensorFlow.
      for i, jpeg in enumerate(imagenet_like_jpegs(self._num_examples)):
        yield i, {"image": io.BytesIO(jpeg), "label": i % 1000}

  return ImagenetLikeJpegs


def prepare_array_record_jpegs(data_dir: str, num_examples: int) -> str:
  """Prepares `num_examples` ImageNet-like JPEGs as a TFDS array_record
  dataset under `data_dir`; returns its TFDS name."""
  builder = _jpeg_builder_class()(num_examples=num_examples,
                                  data_dir=data_dir,
                                  file_format="array_record")
  builder.download_and_prepare()
  return builder.name


def children_cpu_seconds() -> float:
  """CPU seconds used so far by this process's live child processes (the
  pipeline's worker processes), from /proc (Linux)."""
  import multiprocessing
  ticks = os.sysconf("SC_CLK_TCK")
  total = 0.0
  for child in multiprocessing.active_children():
    try:
      with open(f"/proc/{child.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue  # Exited meanwhile.
    total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime.
  return total


class RanOut(Exception):
  """The run's plan ended before the row's time was up."""


def measure(config, seconds: float) -> tuple[float, float, int, float | None]:
  """(examples/s, examples per CPU-second, examples, CPU seconds per example
  outside OPENCV_GIL_FREE, None with worker processes) after a warm-up
  batch. Raises RanOut if the config's plan ends within `seconds`."""
  plan = plan_lib.plan_from_config(config)
  with train_batches(config, plan) as batches, OpenCvSeconds() as opencv:
    next(batches)  # Loads the source and fills the prefetch queue.
    opencv.seconds = 0.0
    wall, cpu, examples = time.perf_counter(), time.process_time(), 0
    children = children_cpu_seconds()
    for batch in batches:
      examples += len(batch["label"])
      if time.perf_counter() - wall >= seconds:
        break
    else:  # Its workers have exited: their CPU time is no longer readable.
      raise RanOut(f"ran out of examples after {examples} in "
                   f"{time.perf_counter() - wall:.2f} s of {seconds:g}: "
                   "give the case more epochs")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    children = children_cpu_seconds() - children
    held = (None if config.dataset.worker_processes
            else max(cpu - opencv.seconds, 0.0) / examples)
  return examples / wall, examples / (cpu + children), examples, held


def main(argv):
  del argv
  if not all(p.isdigit() and int(p) > 0 for p in _PROCESSES.value):
    raise app.UsageError(f"--processes={','.join(_PROCESSES.value)}: each "
                         "value must be a positive integer (threads: "
                         "--workers)")
  cases = []
  if os.path.isfile(os.path.join(base.FASHION_MNIST_IDX_DIR,
                                 "train-images-idx3-ubyte.gz")):
    cases.append(("fashion_mnist_idx", fashion_mnist_config, None))
  else:
    print(f"skipping fashion_mnist_idx: no IDX files in {base.FASHION_MNIST_IDX_DIR}")
  cases.append(("synthetic_224_inception", synthetic_config, None))
  try:
    cases += jpeg_cases()
  except ImportError as e:  # The GPU machine's image has no TFDS.
    print(f"skipping imagenet_jpeg_mock and imagenet_array_record: {e}")

  print(f"host: {os.cpu_count()} CPU cores; {_SECONDS.value:g} s per row")
  print(f"{'case':<26}{'workers':>8}{'procs':>6}{'examples/s':>12}"
        f"{'per CPU-s':>11}{'examples':>10}{'GIL ms/ex <=':>14}"
        f"{'GIL ceiling >=':>16}")
  settings = ([(int(w), 0) for w in _WORKERS.value]
              + [(0, int(p)) for p in _PROCESSES.value])
  fashion_rates = []
  for name, make_config, context in cases:
    for workers, processes in settings:
      if processes and context is not None:
        continue  # A spawned process would not see the mock.
      config = make_config()
      config.dataset.num_workers = workers
      config.dataset.worker_processes = processes
      try:
        with context() if context is not None else contextlib.nullcontext():
          rate, per_cpu, examples, held = measure(config, _SECONDS.value)
      except RanOut as e:
        print(f"{name:<26}{workers:>8}{processes:>6}  {e}", flush=True)
        continue
      gil = (f"{'-':>14}{'-':>16}" if held is None else
             f"{1e3 * held:>14.3f}{1 / held if held else float('inf'):>16.0f}")
      print(f"{name:<26}{workers:>8}{processes:>6}{rate:>12.0f}"
            f"{per_cpu:>11.0f}{examples:>10}{gil}", flush=True)
      if name == "fashion_mnist_idx":
        fashion_rates.append(rate)
  if fashion_rates and _STEP_BATCH_SIZES.value:
    compare_with_step(min(fashion_rates), _STEP_BATCH_SIZES.value)


def jpeg_cases():
  """The two JPEG cases, (name, config maker, context); ImportError without
  TFDS."""
  import tensorflow_datasets as tfds
  mock = lambda: tfds.testing.mock_data(
      as_data_source_fn=lambda builder, split, **_: _JpegDataSource(builder, 100_000))
  data_dir = tempfile.mkdtemp(prefix="imagenet_like_jpegs_")
  atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
  jpegs_name = prepare_array_record_jpegs(data_dir, ARRAY_RECORD_EXAMPLES)

  def array_record_config():
    config = base.get_base_config()
    _imagenet_like(config, "tfds", jpegs_name)
    config.dataset.data_dir = data_dir
    config.dataset.num_train_examples = ARRAY_RECORD_EXAMPLES
    config.schedule.kind = "decay_lr"  # B stays 256, within N.
    # Enough epochs of the 512 JPEGs for any row: 10 ran out within the 4 s
    # of a row on 16 cores (4,864 examples).
    config.schedule.num_epochs = 1000.0
    return config
  return [("imagenet_jpeg_mock", imagenet_mock_config, mock),
          ("imagenet_array_record", array_record_config, None)]


def compare_with_step(input_rate: float, batch_sizes: str) -> None:
  """Prints the step's examples/s and input_rate over it, per batch size."""
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "train_step.py")
  out = subprocess.run(
      [sys.executable, script, "--child", f"--batch_sizes={batch_sizes}",
       "--accumulation=host", "--config=configs/fashion_mnist.py"],
      env=env, capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if out.returncode:
    sys.exit(f"train step benchmark failed:\n{out.stderr[-3000:]}")
  print(f"\nfashion_mnist_idx (slowest worker count: {input_rate:.0f} ex/s) "
        "against the default config's train step on 8 virtual devices:")
  print(f"{'B':>6}{'step ex/s':>11}{'input/step':>12}")
  for row in json.loads(out.stdout.strip().splitlines()[-1]):
    print(f"{row['batch_size']:>6}{row['examples_per_second']:>11.0f}"
          f"{input_rate / row['examples_per_second']:>12.1f}")


if __name__ == "__main__":
  app.run(main)
