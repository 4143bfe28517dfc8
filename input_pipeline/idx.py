"""Fashion-MNIST from its IDX files (as installed by Debian's
dataset-fashion-mnist), for machines where TFDS has not prepared it."""
from __future__ import annotations

import functools
import gzip
import os
import zlib

import numpy as np

from input_pipeline.errors import DataError

# Split name -> file prefix, as published by Zalando Research.
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


def _find(idx_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(idx_dir, name)
    if os.path.isfile(path):
      return path
  raise DataError(
      f"dataset.idx_dir={idx_dir} holds no {stem}[.gz]; point dataset.idx_dir "
      "at the Fashion-MNIST IDX files (Debian: apt install dataset-fashion-mnist)")


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is corrupt or truncated ({e}); reinstall the "
                    "IDX files") from None


def parse_idx(data: bytes, path: str, ndim: int) -> np.ndarray:
  """The uint8 array of an IDX file's bytes; DataError if they are not one."""
  if len(data) < 4 + 4 * ndim:
    raise DataError(f"{path} is truncated: {len(data)} bytes hold no IDX "
                    "header; reinstall the IDX files")
  if data[0:2] != b"\0\0" or data[2] != _UBYTE or data[3] != ndim:
    raise DataError(
        f"{path} has bad magic 0x{data[:4].hex()} (want 0x0000080{ndim}, "
        f"unsigned bytes with {ndim} dimensions); it is not an IDX file of this kind")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
  body = len(data) - 4 - 4 * ndim
  if body != int(np.prod(dims)):
    raise DataError(f"{path} holds {body} data bytes but its header says "
                    f"{'x'.join(map(str, dims))}; the file is truncated or "
                    "corrupt, reinstall it")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load(idx_dir: str, split: str, _stamp) -> tuple[np.ndarray, np.ndarray]:
  prefix = SPLIT_PREFIXES[split]
  image_path = _find(idx_dir, f"{prefix}-images-idx3-ubyte")
  label_path = _find(idx_dir, f"{prefix}-labels-idx1-ubyte")
  images = parse_idx(_read_bytes(image_path), image_path, 3)
  labels = parse_idx(_read_bytes(label_path), label_path, 1)
  if len(images) != len(labels):
    raise DataError(f"{image_path} holds {len(images)} images but {label_path} "
                    f"{len(labels)} labels; reinstall the IDX files")
  return images[..., None], labels  # HxW -> HxWx1.


class IdxSource:
  """Random access to one split of the IDX files, held in memory."""

  def __init__(self, idx_dir: str, split: str):
    if split not in SPLIT_PREFIXES:
      raise DataError(
          f"split {split!r} does not exist in the Fashion-MNIST IDX files; "
          f"use one of {', '.join(SPLIT_PREFIXES)}")
    if not os.path.isdir(idx_dir):
      raise DataError(
          f"dataset.idx_dir={idx_dir} does not exist; point it at the "
          "Fashion-MNIST IDX files (Debian: apt install dataset-fashion-mnist)")
    stamp = tuple(os.stat(os.path.join(idx_dir, f)).st_mtime_ns
                  for f in sorted(os.listdir(idx_dir)))  # Reload on change.
    self.images, self.labels = _load(idx_dir, split, stamp)
    self.name = f"fashion_mnist IDX {split} ({idx_dir})"
    if not len(self.labels):
      raise DataError(f"{self.name} holds no examples; reinstall the IDX files")

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int):
    return self.images[index], int(self.labels[index])
