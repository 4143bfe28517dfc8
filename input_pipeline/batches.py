"""Train and eval batches for one process.

Train: the step that starts at examples seen x takes stream positions
[x, x + B) (see order.py), B = `plan.at(x).batch_size`; process p of P reads
and augments rows [p*B/P, (p+1)*B/P) only. Augmentation draws come from
(seed, epoch, example index), so a step's pixels do not depend on P, on the
worker count, or on where the run was resumed.

Eval: the whole split in its stored order, cut into global batches; the last
one is padded with zero images whose `mask` is 0, so every example is scored
exactly once and no batch shape is new to the compiled step.

Images travel as uint8 pixels, a quarter of the bytes of float32 to copy to
the devices; the model normalises them there (models/pixels.py).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from input_pipeline import augment
from input_pipeline import keyed_random
from input_pipeline import order
from input_pipeline import prefetch
from input_pipeline import sources
from input_pipeline import worker_processes
from input_pipeline.errors import DataError

IMAGE_DTYPE = np.uint8  # Of the batches' `image`.


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in "
                    f"[0, process_count={process_count})")


def _check_pipeline_config(d) -> None:
  augment.check_config(d)
  if d.prefetch_batches < 0 or d.num_workers < 0:
    raise DataError(f"dataset.prefetch_batches={d.prefetch_batches} and "
                    f"dataset.num_workers={d.num_workers} must not be negative")
  if d.worker_processes < 0:
    raise DataError(f"dataset.worker_processes={d.worker_processes} must not "
                    "be negative (0: read in this process's threads)")


def check_sources(config, sources_: Iterable[sources.Source]) -> None:
  """DataError for a bad `config.dataset` field or a split whose first
  example does not fit it: what reading batches would find, found first."""
  _check_pipeline_config(config.dataset)
  for source in sources_:
    Reader(config, source, train=False)  # Reads and checks example 0.


def _threads(d) -> int:
  """The pipeline's threads: `num_workers`, or with worker processes one
  per process (each waits for its process's task)."""
  return d.worker_processes or d.num_workers


def _processes(config, train: bool) -> worker_processes.WorkerProcesses | None:
  n = config.dataset.worker_processes
  return worker_processes.WorkerProcesses(config, train, n) if n else None


def _prefetcher(jobs, d, processes) -> prefetch.Prefetcher:
  return prefetch.Prefetcher(
      jobs, num_workers=_threads(d), prefetch_batches=d.prefetch_batches,
      on_close=None if processes is None else processes.close)


def _chunks(num_rows: int, num_workers: int) -> list[tuple[int, int]]:
  """Row ranges for the tasks of one batch, about one per worker."""
  size = max(1, -(-num_rows // max(1, num_workers)))
  return [(lo, min(lo + size, num_rows)) for lo in range(0, num_rows, size)]


class Reader:
  """Reads and augments rows of a batch into given arrays, here or, once
  `processes` is set, in worker processes (each with a Reader of its own)."""

  def __init__(self, config, source: sources.Source, train: bool):
    self.d = config.dataset
    self.seed = config.seed
    self.source = source
    self.train = train
    self.processes: worker_processes.WorkerProcesses | None = None
    self.fetch(0)  # Fail now, not in a worker, on a wrong image shape.

  def fetch(self, index: int) -> tuple[np.ndarray, int]:
    """Example `index`; DataError if it cannot be read or has a wrong shape."""
    try:
      image, label = self.source[index]
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A corrupt record or image: one line naming it, not a decoder trace.
      raise DataError(f"{self.source.name} example {index} cannot be read: "
                      f"{sources.first_line(e)}") from e
    augment.check_image(self.d, image, f"{self.source.name} example {index}")
    return image, label

  def fetch_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    """Examples `indices` in one read where the source allows; if that read
    fails, one at a time, so that the error names the bad example."""
    try:
      examples = sources.read_examples(self.source, indices)
    except DataError:
      raise
    except Exception:  # pylint: disable=broad-except
      return [self.fetch(index) for index in indices]
    for index, (image, _) in zip(indices, examples):
      augment.check_image(self.d, image, f"{self.source.name} example {index}")
    return examples

  def read(self, epochs: np.ndarray, indices: np.ndarray, images_out: np.ndarray,
           labels_out: np.ndarray) -> None:
    images = []
    for k, (image, label) in enumerate(self.fetch_many(
        [int(i) for i in indices])):
      images.append(image)
      labels_out[k] = label
    bad = (labels_out < 0) | (labels_out >= self.d.num_classes)
    if bad.any():
      k = int(np.argmax(bad))
      raise DataError(f"{self.source.name} example {int(indices[k])} has label "
                      f"{int(labels_out[k])}, outside dataset.num_classes="
                      f"{self.d.num_classes}; fix dataset.num_classes")
    if self.train:
      draws = keyed_random.uniforms(
          self.seed, keyed_random.AUGMENT_STREAM, epochs[:, None],
          indices[:, None], np.arange(augment.num_draws(self.d)))
      augment.train_images(self.d, images, draws, out=images_out)
    else:
      augment.eval_images(self.d, images, out=images_out)

  def job(self, epochs, indices, num_rows: int, extra: dict[str, Any],
          mask: np.ndarray | None = None) -> prefetch.Job:
    """A batch of `num_rows` rows, the first len(indices) read from the source."""
    d = self.d
    image = np.empty((num_rows, d.image_size, d.image_size, d.channels),
                     IMAGE_DTYPE)
    image[len(indices):] = 0  # Eval padding.
    label = np.zeros((num_rows,), np.int32)
    read = self.read if self.processes is None else self.processes.read
    def task(lo, hi):
      return lambda: read(epochs[lo:hi], indices[lo:hi], image[lo:hi],
                          label[lo:hi])
    tasks = [task(lo, hi) for lo, hi in _chunks(len(indices), _threads(d))]
    def finish():
      batch = dict(image=image, label=label, **extra)
      if mask is not None:
        batch["mask"] = mask
      return batch
    return prefetch.Job(tasks, finish)


def train_batches(config, plan, start_examples: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  source: sources.Source | None = None) -> prefetch.Prefetcher:
  """This process's slices of the train batches, from `start_examples` on.

  Yields dicts: `image` uint8 [B/P, S, S, C], `label` int32 [B/P], and the
  python ints `examples_seen` (at the start of the batch) and `step`. Stops
  after the plan's last step. `start_examples` (examples) must be where a
  step of `plan` starts. Errors in the config or data raise DataError now.
  `source` (from `sources.train_source`) saves reopening the split.
  """
  d = config.dataset
  _check_pipeline_config(d)
  _check_process(process_index, process_count)
  n = d.num_train_examples
  if plan.num_train_examples != n:
    raise DataError(f"the plan is for {plan.num_train_examples} training examples "
                    f"but dataset.num_train_examples={n}; rebuild the plan")
  for b in plan.batch_sizes:
    if b > n:
      raise DataError(f"global batch B={b} exceeds the N={n} training examples "
                      "(dataset.num_train_examples); lower the batch or raise N")
    if b % process_count:
      raise DataError(f"global batch B={b} does not split over "
                      f"process_count={process_count} processes")
  total = plan.total_examples
  if not 0 <= start_examples <= total or (
      start_examples < total
      and plan.examples_at_step(plan.at(start_examples).step) != start_examples):
    raise DataError(f"start_examples={start_examples} is not where a step of the "
                    f"plan starts (plan covers 0-{total} examples)")
  source = source if source is not None else sources.train_source(config)
  reader = Reader(config, source, train=True)
  reader.processes = _processes(config, train=True)  # After the checks.
  if reader.processes is not None and process_index == 0:
    print(f"input_pipeline: reading in {d.worker_processes} worker processes "
          "(dataset.worker_processes)", flush=True)
  stream = order.ExampleOrder(n, config.seed)

  def jobs():
    x = start_examples
    while x < total:
      position = plan.at(x)
      share = position.batch_size // process_count
      lo = x + process_index * share
      epochs, indices = stream.at(lo, lo + share)
      yield reader.job(epochs, indices, share,
                       dict(examples_seen=x, step=position.step))
      x += position.batch_size

  return _prefetcher(jobs(), d, reader.processes)


def eval_batches(config, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1,
                 source: sources.Source | None = None) -> prefetch.Prefetcher:
  """This process's slices of the eval split in batches of `global_batch_size`.

  Yields dicts: `image` uint8 [G/P, S, S, C], `label` int32 [G/P] and `mask`
  float32 [G/P], 1 for a real example and 0 for padding. The batches cover
  the split exactly once, in order; the last is padded, never dropped.
  `source` (from `sources.eval_source`) saves reopening the split.
  """
  d = config.dataset
  _check_pipeline_config(d)
  _check_process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"eval batch {global_batch_size} must be a positive multiple "
                    f"of process_count={process_count}")
  source = source if source is not None else sources.eval_source(config)
  reader = Reader(config, source, train=False)
  reader.processes = _processes(config, train=False)  # After the checks.
  num_examples, share = len(source), global_batch_size // process_count

  def jobs():
    for start in range(0, num_examples, global_batch_size):
      lo = start + process_index * share
      indices = np.arange(lo, min(lo + share, num_examples), dtype=np.int64)
      mask = np.zeros((share,), np.float32)
      mask[:len(indices)] = 1
      yield reader.job(np.zeros_like(indices), indices, share, {}, mask)

  return _prefetcher(jobs(), d, reader.processes)
