"""Examples per second of the train input pipeline on this host.

    python -m benchmarks.input_pipeline [--seconds=5] [--workers=0,1,2]

Cases:
* `fashion_mnist_idx`: configs/fashion_mnist.py (IDX files, 28x28x1,
  pad-crop-flip), skipped when the IDX files are not installed.
* `synthetic_224_inception`: the synthetic source at 224x224x3 (generating
  the image is part of the cost), inception crop + flip + resize to 224.
* `imagenet_jpeg_mock`: `imagenet2012` through the TFDS source under
  `tfds.testing.mock_data`, whose examples are JPEGs of ImageNet's typical
  sizes decoded by TFDS's own image feature (as a prepared array_record
  ImageNet would be), then the inception recipe at 224.

For each worker count: wall-clock examples/s, and examples per CPU-second
(process CPU time over all threads): the per-core figure, which says how many
cores a given step rate needs.

Then, in the same invocation, the train step of configs/fashion_mnist.py on 8
virtual devices at `--step_batch_sizes` (benchmarks/train_step.py, host
accumulation) and the ratio of the Fashion-MNIST pipeline's examples/s to the
step's: the pipeline keeps ahead when the ratio is ≥ 3 (it shares the same
cores while training, so its share of them is what counts).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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
_STEP_BATCH_SIZES = flags.DEFINE_string(
    "step_batch_sizes", "128,1024",
    "Train step batch sizes to compare the Fashion-MNIST pipeline with "
    "(empty: skip).")

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
  return fashion_mnist.get_config()


def synthetic_config():
  config = base.get_base_config()
  _imagenet_like(config, "synthetic", "synthetic")
  return config


def imagenet_mock_config():
  config = base.get_base_config()
  _imagenet_like(config, "tfds", "imagenet2012")
  return config


class _JpegDataSource:
  """Stands in for ImageNet's array_record source: JPEG bytes decoded by the
  dataset's own TFDS image feature on every access."""

  def __init__(self, builder, num_examples: int, num_distinct: int = 32):
    from PIL import Image
    self._feature = builder.info.features["image"]
    self._num_examples = num_examples
    rng = np.random.default_rng(0)
    self._jpegs = []
    for _ in range(num_distinct):  # ImageNet's images average ~400x350.
      h, w = rng.integers(300, 500), rng.integers(350, 500)
      smooth = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
      image = np.repeat(np.repeat(smooth, 16, 0), 16, 1)[:h, :w]
      image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format="JPEG", quality=90)
      self._jpegs.append(buffer.getvalue())

  def __len__(self):
    return self._num_examples

  def __getitem__(self, index):
    jpeg = self._jpegs[index % len(self._jpegs)]
    return {"image": self._feature.decode_example_np(jpeg), "label": index % 1000}


def measure(config, seconds: float) -> tuple[float, float, int]:
  """(examples/s, examples per CPU-second, examples) after a warm-up batch."""
  plan = plan_lib.plan_from_config(config)
  with train_batches(config, plan) as batches:
    next(batches)  # Loads the source and fills the prefetch queue.
    wall, cpu, examples = time.perf_counter(), time.process_time(), 0
    for batch in batches:
      examples += len(batch["label"])
      if time.perf_counter() - wall >= seconds:
        break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return examples / wall, examples / cpu, examples


def main(argv):
  del argv
  import tensorflow_datasets as tfds
  cases = []
  if os.path.isfile(os.path.join(base.FASHION_MNIST_IDX_DIR,
                                 "train-images-idx3-ubyte.gz")):
    cases.append(("fashion_mnist_idx", fashion_mnist_config, None))
  else:
    print(f"skipping fashion_mnist_idx: no IDX files in {base.FASHION_MNIST_IDX_DIR}")
  cases.append(("synthetic_224_inception", synthetic_config, None))
  mock = lambda: tfds.testing.mock_data(
      as_data_source_fn=lambda builder, split, **_: _JpegDataSource(builder, 100_000))
  cases.append(("imagenet_jpeg_mock", imagenet_mock_config, mock))

  print(f"host: {os.cpu_count()} CPU cores; {_SECONDS.value:g} s per row")
  print(f"{'case':<26}{'workers':>8}{'examples/s':>12}{'per CPU-s':>11}{'examples':>10}")
  fashion_rates = []
  for name, make_config, context in cases:
    for workers in map(int, _WORKERS.value):
      config = make_config()
      config.dataset.num_workers = workers
      if context is None:
        result = measure(config, _SECONDS.value)
      else:
        with context():
          result = measure(config, _SECONDS.value)
      rate, per_cpu, examples = result
      print(f"{name:<26}{workers:>8}{rate:>12.0f}{per_cpu:>11.0f}{examples:>10}",
            flush=True)
      if name == "fashion_mnist_idx":
        fashion_rates.append(rate)
  if fashion_rates and _STEP_BATCH_SIZES.value:
    compare_with_step(min(fashion_rates), _STEP_BATCH_SIZES.value)


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
