"""Worker processes for the input pipeline (`dataset.worker_processes`).

Threads share one GIL. OpenCV's decoding and resizing release it, but
reading a record, TFDS's parsing of it and the Python around each example
hold it: `benchmarks/input_pipeline.py` bounds that time at 0.1-0.4 ms per
ImageNet-sized example, so one process's threads may top out at a few
thousand examples/s however many cores the host has.

With P > 0 worker processes (started with `spawn`: the trainer's process has
JAX's threads running, which `fork` would copy mid-state), each process opens
its own source once and runs the same reading and augmenting as a thread
would, writing the rows of its task into a shared-memory block. The
pipeline's threads, one per task in flight, hand a task to the processes,
wait for it, and copy the rows out into the batch; a block is reused by its
thread for every later task. What a row holds depends only on (seed, epoch,
example index), so the batches are the same as with threads.

Closing the pipeline stops the processes and frees the blocks; a worker
whose parent was killed outright exits by itself within about a second.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import multiprocessing
from multiprocessing import shared_memory
import os
import threading
import time

import numpy as np

from input_pipeline.errors import DataError

# In each worker process: the reader its initializer built, and the blocks
# it has attached (by name).
_reader = None
_attached: dict[str, shared_memory.SharedMemory] = {}


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
  """Ends this worker once its parent is gone (killed outright, say, so
  that it never shut its workers down): it would otherwise wait for tasks
  forever."""
  while os.getppid() == parent:
    time.sleep(interval)
  os._exit(1)  # pylint: disable=protected-access


def _start(parent: int, config, train: bool) -> None:
  """Worker initializer: watches the parent (`parent`: its pid, passed in,
  since it may already be gone), opens the source and builds the reader."""
  global _reader
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                   name="exit_with_parent").start()
  # pylint: disable=import-outside-toplevel
  from input_pipeline import batches
  from input_pipeline import sources
  # The parent opened the same source and has shown its notices and TFDS's
  # warnings already.
  logging.getLogger("absl").setLevel(logging.ERROR)
  with contextlib.redirect_stdout(io.StringIO()):
    source = (sources.train_source(config) if train
              else sources.eval_source(config))
  _reader = batches.Reader(config, source, train)


def _attach(name: str) -> shared_memory.SharedMemory:
  """The block `name`, attached once per process. (Spawned workers share
  the parent's resource tracker, so attaching adds nothing for it to clean
  up: the parent unlinks the block.)"""
  if name not in _attached:
    _attached[name] = shared_memory.SharedMemory(name=name)
  return _attached[name]


def _read_rows(name: str, shape: tuple[int, ...], epochs: np.ndarray,
               indices: np.ndarray) -> np.ndarray:
  """In a worker: rows `indices` read and augmented into block `name` (as
  uint8 `shape`); returns their labels."""
  images = np.ndarray(shape, np.uint8, buffer=_attach(name).buf)
  labels = np.empty((len(indices),), np.int32)
  _reader.read(epochs, indices, images, labels)
  return labels


class WorkerProcesses:
  """`num_processes` worker processes reading one split for one pipeline;
  `read` is called from the pipeline's threads. Close to stop them and free
  the shared memory."""

  def __init__(self, config, train: bool, num_processes: int):
    self._pool = concurrent.futures.ProcessPoolExecutor(
        num_processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start, initargs=(os.getpid(), config, train))
    self._local = threading.local()
    self._blocks: list[shared_memory.SharedMemory] = []
    self._lock = threading.Lock()

  def _block(self, size: int) -> shared_memory.SharedMemory:
    """This thread's block, replaced by a larger one when `size` bytes do
    not fit (a later stage's larger batch)."""
    block = getattr(self._local, "block", None)
    if block is None or block.size < size:
      block = shared_memory.SharedMemory(create=True, size=max(size, 1))
      with self._lock:
        self._blocks.append(block)
      self._local.block = block
    return block

  def read(self, epochs: np.ndarray, indices: np.ndarray,
           images_out: np.ndarray, labels_out: np.ndarray) -> None:
    """What `Reader.read` does, run in a worker process."""
    block = self._block(images_out.nbytes)
    try:  # A broken pool refuses the task, or fails it once submitted.
      labels = self._pool.submit(_read_rows, block.name, images_out.shape,
                                 epochs, indices).result()
    except concurrent.futures.process.BrokenProcessPool:
      raise DataError(
          "an input worker process died (its traceback, if any, is above); "
          "lower dataset.worker_processes if the host ran out of memory, "
          "or set it to 0 to read in threads") from None
    images_out[...] = np.ndarray(images_out.shape, np.uint8, buffer=block.buf)
    labels_out[...] = labels

  def close(self) -> None:
    """Stops the processes (queued tasks cancelled) and frees the blocks."""
    self._pool.shutdown(wait=True, cancel_futures=True)
    with self._lock:
      blocks, self._blocks = self._blocks, []
    for block in blocks:
      block.close()
      block.unlink()
