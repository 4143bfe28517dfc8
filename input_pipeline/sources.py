"""Where examples come from: one small random-access interface.

A source has a length and returns example i as (uint8 image HxWxC, int label);
`read_examples` reads a list of them, in one call where the source can (TFDS's
array_record reader then reads the records in parallel with the GIL
released). Three kinds, chosen by `config.dataset.source`:

* `tfds`: a TFDS dataset by name, read through `tfds.data_source` (array_record
  files prepared in `dataset.data_dir`; TensorFlow is not needed to read them).
* `idx`: Fashion-MNIST from its IDX files in `dataset.idx_dir`.
* `synthetic`: generated from the seed, for smoke runs on a CPU.
* `auto`: TFDS when the dataset is prepared, else the IDX files for
  Fashion-MNIST, else an error saying how to prepare it.
"""
from __future__ import annotations

import re
from typing import Protocol

from etils import epath
import numpy as np

from input_pipeline import idx
from input_pipeline import synthetic
from input_pipeline.errors import DataError

SOURCE_KINDS = ("auto", "tfds", "idx", "synthetic")


class Source(Protocol):
  """Random access to the examples of one split."""

  name: str  # For messages: dataset, split and location.

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """Example `index` as (uint8 image [H, W, C], label)."""
    ...


class FirstExamples:
  """The first `num_examples` examples of `source`."""

  def __init__(self, source: Source, num_examples: int):
    self.source = source
    self.num_examples = num_examples
    self.name = f"first {num_examples} of {source.name}"

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int):
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.name}: index {index} out of range")
    return self.source[index]

  def read_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    bad = [i for i in indices if not 0 <= i < self.num_examples]
    if bad:
      raise IndexError(f"{self.name}: index {bad[0]} out of range")
    return read_examples(self.source, indices)


def read_examples(source: Source, indices: list[int]) -> list[tuple[np.ndarray, int]]:
  """Examples `indices` of `source`: one `read_many` call where the source
  has it, else one access each."""
  read_many = getattr(source, "read_many", None)
  if read_many is not None:
    return read_many(indices)
  return [source[i] for i in indices]


def first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[0] if lines else type(error).__name__


class TfdsSource:
  """One split of a prepared TFDS dataset (array_record), via data_source."""

  def __init__(self, builder, split: str):
    name = builder.info.name
    self.name = f"{name} {split} (TFDS, {builder.data_dir})"
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
      raise DataError(
          f"TFDS dataset {name!r} has features {sorted(features.keys())}, not "
          "'image' and 'label'; only image classification datasets are supported")
    known = list(builder.info.splits)  # Empty when TFDS cannot know them.
    base = re.split(r"[\[+]", split)[0]
    if known and base not in known:
      raise DataError(f"split {split!r} does not exist in {name}; use one of "
                      f"{', '.join(known)} (dataset.train_split / eval_split)")
    try:
      self._source = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      if not builder.is_prepared():
        raise _not_prepared(name, builder.data_dir) from None
      if isinstance(e, NotImplementedError):  # TFDS: no random access format.
        raise DataError(
            f"{name} at {builder.data_dir} is prepared as "
            f"{builder.info.file_format.value}, which has no random access; "
            f"re-prepare it with `tfds build {name} --file_format=array_record`"
        ) from None
      raise DataError(
          f"cannot read {name} split {split!r} from {builder.data_dir}: "
          f"{first_line(e)} (prepare it with `tfds build {name} "
          "--file_format=array_record`)") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    example = self._source[index]
    return example["image"], int(example["label"])

  def read_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    """One batch read: TFDS's array_record source reads the records in
    parallel with the GIL released (one at a time, it holds the GIL)."""
    read = getattr(self._source, "__getitems__", None)
    examples = (read(list(indices)) if read is not None
                else [self._source[i] for i in indices])
    return [(e["image"], int(e["label"])) for e in examples]


def _not_prepared(name: str, where: str) -> DataError:
  return DataError(
      f"{name} is not prepared at {where}; run `tfds build {name} "
      "--file_format=array_record --data_dir=DIR` where TensorFlow and the "
      "internet are available, then set dataset.data_dir=DIR")


def _check_data_dir(data_dir: str | None) -> None:
  if data_dir is None:
    return  # TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets).
  path = epath.Path(data_dir)  # Local or gs:// (with gcsfs installed).
  if not path.is_dir():
    raise DataError(f"dataset.data_dir={data_dir} does not exist; set it to the "
                    "directory that holds the TFDS-prepared datasets")
  if not any(path.iterdir()):
    raise DataError(f"dataset.data_dir={data_dir} is empty; prepare the dataset "
                    "there with `tfds build NAME --file_format=array_record "
                    f"--data_dir={data_dir}`")


def _tfds_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f"dataset.name={name!r} is not a TFDS dataset nor 'synthetic'; use "
        "e.g. 'fashion_mnist', 'cifar10' or 'imagenet2012'") from None


def make_source(config, *, train: bool) -> Source:
  """The whole train (or eval) split named by `config.dataset`."""
  d = config.dataset
  subset = "train" if train else "eval"
  split = d.train_split if train else d.eval_split
  if d.source not in SOURCE_KINDS:
    raise DataError(f"dataset.source={d.source!r} is unknown; use one of "
                    f"{', '.join(SOURCE_KINDS)}")
  if d.source == "synthetic" or (d.source == "auto" and d.name == "synthetic"):
    return synthetic.SyntheticSource(
        seed=config.seed, subset=subset,
        num_examples=d.num_train_examples if train else d.num_eval_examples,
        image_size=d.image_size, channels=d.channels,
        num_classes=d.num_classes, noise=d.synthetic_noise)
  if d.source == "idx":
    return _idx_source(d, split)
  _check_data_dir(d.data_dir)
  builder = _tfds_builder(d.name, d.data_dir)
  if d.source == "auto" and not builder.is_prepared():
    if d.name == "fashion_mnist":
      print(f"input_pipeline: fashion_mnist is not prepared for TFDS at "
            f"{builder.data_dir}; reading the IDX files in {d.idx_dir}")
      return _idx_source(d, split)
    raise _not_prepared(d.name, builder.data_dir)
  return TfdsSource(builder, split)


def _idx_source(d, split: str) -> idx.IdxSource:
  if d.name != "fashion_mnist":
    raise DataError(f"dataset.source='idx' reads Fashion-MNIST only, not "
                    f"dataset.name={d.name!r}; use source='tfds' or 'auto'")
  return idx.IdxSource(d.idx_dir, split)


def train_source(config) -> Source:
  """The first `dataset.num_train_examples` (N) examples of the train split."""
  source = make_source(config, train=True)
  n, available = config.dataset.num_train_examples, len(source)
  if n > available:
    raise DataError(
        f"dataset.num_train_examples={n} exceeds the {available} examples of "
        f"{source.name}; lower it to at most {available}")
  if n <= 0:
    raise DataError(f"dataset.num_train_examples={n} must be positive")
  if n < available:
    print(f"input_pipeline: training on the first {n} of the {available} "
          f"examples of {source.name} (dataset.num_train_examples)")
    return FirstExamples(source, n)
  return source


def eval_source(config) -> Source:
  """The whole eval split, every example scored."""
  source = make_source(config, train=False)
  if not len(source):
    raise DataError(f"{source.name} holds no examples; choose another "
                    "dataset.eval_split (dataset.num_eval_examples if synthetic)")
  return source
