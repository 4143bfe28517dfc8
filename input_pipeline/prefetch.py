"""Background preparation of batches: bounded, ordered, closeable.

A batch is a `Job`: independent `tasks` (each reads and augments a chunk of
rows into preallocated arrays) and a `finish` that returns the batch. Tasks
run on `num_workers` threads; `prefetch_batches` jobs beyond the one being
returned are kept in flight, so the host works while the step runs and
memory stays bounded. Results come back in job order, and no task's output
depends on which thread ran it, so the batches are the same for any worker
count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class Job:
  tasks: list[Callable[[], None]]
  finish: Callable[[], dict[str, Any]]


class Prefetcher:
  """An iterator of batches prepared ahead; use as a context manager or
  call `close()` to stop its threads early."""

  def __init__(self, jobs: Iterator[Job], *, num_workers: int,
               prefetch_batches: int,
               on_close: Callable[[], None] | None = None):
    """`on_close` runs once, after the threads have stopped (the worker
    processes' shutdown)."""
    self._jobs = jobs
    self._on_close = on_close
    self._depth = prefetch_batches + 1
    self._pool = (concurrent.futures.ThreadPoolExecutor(
        num_workers, thread_name_prefix="input_pipeline")
                  if num_workers > 0 else None)
    self._pending: collections.deque = collections.deque()
    self._exhausted = False
    self._closed = False

  def __iter__(self) -> "Prefetcher":
    return self

  def _submit(self, job: Job):
    if self._pool is None:
      return job, []  # num_workers=0: run the tasks in the caller, on demand.
    return job, [self._pool.submit(task) for task in job.tasks]

  def __next__(self) -> dict[str, Any]:
    if self._closed:
      raise StopIteration
    try:
      while not self._exhausted and len(self._pending) < self._depth:
        job = next(self._jobs, None)
        if job is None:
          self._exhausted = True
        else:
          self._pending.append(self._submit(job))
      if not self._pending:
        self.close()
        raise StopIteration
      job, futures = self._pending.popleft()
      if self._pool is None:
        for task in job.tasks:
          task()
      for future in futures:
        future.result()  # Re-raises a task's error here, in the consumer.
      return job.finish()
    except BaseException:
      self.close()
      raise

  def close(self) -> None:
    """Cancels queued work and joins the worker threads."""
    if self._closed:
      return
    self._closed = True
    for _, futures in self._pending:
      for future in futures:
        future.cancel()
    self._pending.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
    if self._on_close is not None:
      self._on_close()

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    # Never closed: stop the threads without waiting. Worker processes, if
    # any, stop at exit (`on_close` would free memory a thread may still
    # be copying from).
    if not getattr(self, "_closed", True) and self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
