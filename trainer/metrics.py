"""Run records: `metrics.jsonl` (one JSON object per line) and TensorBoard.

Only process 0 writes. Each record has a `kind` (`train`, `eval`, `compile`,
`batch_decision`) and its fields; numeric fields also go to TensorBoard under
`<kind>/<name>`.
Object stores cannot append, so for a remote workdir (`gs://...`) the file is
kept in a local copy and uploaded whole at every `sync()` (the loop calls it
with each checkpoint) and on close.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading

from etils import epath
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

  def __init__(self, workdir: str, enabled: bool = True,
               purge_step: int | None = None):
    """`purge_step`: a resumed run's first step. TensorBoard then hides the
    abandoned attempt's events from that step on, which the resumed run
    logs again (metrics.jsonl keeps both; readers take the last)."""
    self._enabled = enabled
    self._lock = threading.Lock()  # Compile records come from a thread.
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._remote = "://" in workdir
    if not enabled:
      return
    local = self.path
    if self._remote:
      local = os.path.join(tempfile.mkdtemp(prefix="metrics_"), "metrics.jsonl")
      if epath.Path(self.path).exists():
        epath.Path(self.path).copy(local)
    self._local = local
    _drop_partial_last_line(local)
    self._file = open(local, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=purge_step)

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

  def sync(self) -> None:
    """Uploads the records of a remote workdir (local ones are always there)."""
    if self._enabled and self._remote:
      with self._lock:
        epath.Path(self._local).copy(self.path, overwrite=True)
        self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self.sync()
      with self._lock:
        self._file.close()
        self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The records of a workdir's metrics.jsonl, optionally of one kind."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  records = [json.loads(line) for line in text.splitlines() if line.strip()]
  return [r for r in records if kind is None or r["kind"] == kind]
