"""Run records: `metrics.jsonl` (one JSON object per line) and TensorBoard.

Only process 0 writes. Each record has a `kind` (`train`, `eval`, `compile`)
and its fields; numeric fields also go to TensorBoard under `<kind>/<name>`.
"""
from __future__ import annotations

import json
import os
import threading

from tensorboardX import SummaryWriter


def _drop_partial_last_line(path: str) -> None:
  """A run killed mid-write leaves a line without its newline: cut it off so
  the resumed run's records start on a line of their own."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
  """Appends records to `<workdir>/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._lock = threading.Lock()  # Compile records come from a thread.
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      _drop_partial_last_line(self.path)
      self._file = open(self.path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, kind: str, step: int, **fields) -> None:
    if not self._enabled:
      return
    record = dict(kind=kind, step=int(step), **fields)
    with self._lock:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
      for name, value in fields.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{kind}/{name}", value, int(step))

  def close(self) -> None:
    if self._enabled:
      with self._lock:
        self._file.close()
        self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The records of a workdir's metrics.jsonl, optionally of one kind."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if kind is None or r["kind"] == kind]
