"""Every bad input stops with one line that says what is wrong and what to do."""
import dataclasses
import gzip
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import base
from input_pipeline import DataError
from input_pipeline import eval_batches
from input_pipeline import make_source
from input_pipeline import train_batches
from trainer import plan as plan_lib


def _config(**dataset):
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=16, synthetic=False)
  config.dataset.num_train_examples = 64
  config.schedule.kind = "decay_lr"
  config.dataset.update(dataset)
  return config


def _raises(match, fn, *args, **kwargs) -> str:
  with pytest.raises(DataError, match=match) as error:
    fn(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message and len(message) < 300
  assert isinstance(error.value, ValueError)  # The CLI prints it as one line.
  return message


def _write_idx(path, array, magic=None, extra=b""):
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = bytes([0, 0, 8, array.ndim])
  header = magic + np.array(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes() + extra)


@pytest.fixture
def idx_dir(tmp_path):
  """Well-formed IDX files of 40 train and 10 test 28x28 images."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 40), ("t10k", 10)):
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
               rng.integers(0, 256, (n, 28, 28)))
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
  return tmp_path


def _train(config):
  return train_batches(config, plan_lib.plan_from_config(config))


def test_good_idx_files_load(idx_dir):  # The fixture itself is valid.
  config = _config(source="idx", idx_dir=str(idx_dir), num_train_examples=40)
  config.schedule.batch_size = 8
  config.ghost_batch_size = 8
  with _train(config) as batches:
    assert next(batches)["image"].shape == (8, 28, 28, 1)


def test_missing_data_dir():
  _raises(r"^dataset.data_dir=/no/such/dir does not exist; set it to",
          make_source, _config(data_dir="/no/such/dir", source="tfds"), train=True)


def test_empty_data_dir(tmp_path):
  _raises(rf"^dataset.data_dir={tmp_path} is empty; prepare the dataset there",
          make_source, _config(data_dir=str(tmp_path)), train=True)


def test_dataset_not_prepared_in_data_dir(tmp_path):
  (tmp_path / "other").mkdir()
  _raises(r"^cifar10 is not prepared at .*; run `tfds build cifar10 "
          r"--file_format=array_record",
          make_source, _config(name="cifar10", data_dir=str(tmp_path)), train=True)


def test_unknown_dataset_name():
  _raises(r"^dataset.name='fashion_mnits' is not a TFDS dataset nor 'synthetic'",
          make_source, _config(name="fashion_mnits", source="tfds"), train=True)


def test_unknown_source_kind():
  _raises(r"^dataset.source='files' is unknown; use one of auto, tfds, idx",
          make_source, _config(source="files"), train=True)


def test_idx_split_that_does_not_exist(idx_dir):
  config = _config(source="idx", idx_dir=str(idx_dir), eval_split="validation")
  _raises(r"^split 'validation' does not exist in the Fashion-MNIST IDX files; "
          r"use one of train, test", eval_batches, config, 8)


def test_missing_idx_dir():
  _raises(r"^dataset.idx_dir=/no/idx does not exist",
          make_source, _config(source="idx", idx_dir="/no/idx"), train=True)


def test_idx_dir_without_the_files(tmp_path):
  _raises(r"holds no train-images-idx3-ubyte\[.gz\]",
          make_source, _config(source="idx", idx_dir=str(tmp_path)), train=True)


def test_idx_bad_magic(idx_dir):
  _write_idx(idx_dir / "train-images-idx3-ubyte.gz", np.zeros((40, 28, 28)),
             magic=b"\x00\x00\x08\x01")
  _raises(r"train-images-idx3-ubyte.gz has bad magic 0x00000801 \(want 0x00000803",
          make_source, _config(source="idx", idx_dir=str(idx_dir)), train=True)


def test_idx_wrong_length(idx_dir):
  _write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.arange(10), extra=b"\0")
  _raises(r"t10k-labels-idx1-ubyte.gz holds 11 data bytes but its header says 10",
          make_source, _config(source="idx", idx_dir=str(idx_dir)), train=False)


def test_idx_truncated_gzip(idx_dir):
  path = idx_dir / "train-labels-idx1-ubyte.gz"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _raises(r"train-labels-idx1-ubyte.gz is corrupt or truncated",
          make_source, _config(source="idx", idx_dir=str(idx_dir)), train=True)


def test_idx_image_and_label_counts_differ(idx_dir):
  _write_idx(idx_dir / "train-labels-idx1-ubyte.gz", np.arange(39) % 10)
  _raises(r"holds 40 images but .*train-labels-idx1-ubyte.gz 39 labels",
          make_source, _config(source="idx", idx_dir=str(idx_dir)), train=True)


def test_more_train_examples_than_the_split(idx_dir):
  config = _config(source="idx", idx_dir=str(idx_dir), num_train_examples=64)
  _raises(r"^dataset.num_train_examples=64 exceeds the 40 examples of fashion_mnist "
          r"IDX train .*; lower it to at most 40", _train, config)


def test_batch_larger_than_the_dataset():
  config = _config(source="synthetic", image_size=16)
  plan = plan_lib.plan_from_config(config)
  stage = dataclasses.replace(plan.stages[-1], batch_size=128)  # N is 64.
  bad = dataclasses.replace(plan, stages=plan.stages[:-1] + (stage,))
  _raises(r"^global batch B=128 exceeds the N=64 training examples "
          r"\(dataset.num_train_examples\); lower the batch or raise N",
          train_batches, config, bad)


def test_plan_for_another_dataset_size():
  config = _config(source="synthetic", image_size=16)
  plan = plan_lib.plan_from_config(config)
  config.dataset.num_train_examples = 8
  _raises(r"^the plan is for 64 training examples but dataset.num_train_examples=8",
          train_batches, config, plan)


def test_batch_not_divisible_by_processes():
  config = _config(source="synthetic", image_size=16)
  _raises(r"^global batch B=16 does not split over process_count=3 processes",
          train_batches, config, plan_lib.plan_from_config(config), process_count=3)


def test_eval_batch_not_divisible_by_processes():
  config = _config(source="synthetic", image_size=16)
  _raises(r"^eval batch 10 must be a positive multiple of process_count=4",
          eval_batches, config, 10, process_count=4)


def test_start_not_at_a_step():
  config = _config(source="synthetic", image_size=16)
  _raises(r"^start_examples=5 is not where a step of the plan starts",
          train_batches, config, plan_lib.plan_from_config(config), start_examples=5)


def test_image_size_mismatch(idx_dir):
  config = _config(source="idx", idx_dir=str(idx_dir), num_train_examples=40,
                   image_size=32)
  config.schedule.batch_size = 8
  config.ghost_batch_size = 8
  _raises(r"has an image of shape \(28, 28, 1\), not 32x32x1; set "
          r"dataset.image_size/channels to match", _train, config)


@pytest.mark.parametrize("worker_processes", [0, 2])  # Threads; processes.
def test_label_outside_num_classes_surfaces_from_a_worker(idx_dir,
                                                          worker_processes):
  config = _config(source="idx", idx_dir=str(idx_dir), num_train_examples=40,
                   num_classes=5, num_workers=2,
                   worker_processes=worker_processes)
  config.schedule.batch_size = 8
  config.ghost_batch_size = 8
  batches = _train(config)
  _raises(r"has label [5-9], outside dataset.num_classes=5", list, batches)


def test_unknown_augment():
  _raises(r"^dataset.augment='autoaugment' is unknown; use one of none, "
          r"pad_crop_flip, inception", eval_batches,
          _config(source="synthetic", augment="autoaugment"), 8)


def test_mean_std_per_channel():
  _raises(r"^dataset.mean=\(0.5, 0.5, 0.5\) and dataset.std=\(0.5,\) need one value "
          r"per channel \(dataset.channels=1\)", eval_batches,
          _config(source="synthetic", mean=(0.5, 0.5, 0.5), std=(0.5,)), 8)



class _PngRecords:
  """A TFDS data source of PNG records decoded by the dataset's own image
  feature, as array_record data is; record 3 is `bad`."""

  def __init__(self, builder, bad):
    self.feature = builder.info.features["image"]
    self.good, self.bad = self._png((32, 32, 3)), bad

  @staticmethod
  def _png(shape):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()

  def __len__(self):
    return 8

  def __getitem__(self, index):
    data = self.good
    if index == 3:
      data = self.good[:40] if self.bad == "corrupt" else self._png(self.bad)
    return {"image": self.feature.decode_example_np(data), "label": 1}


class _BatchPngRecords(_PngRecords):
  """The same with TFDS's batch read (`__getitems__`), which decodes every
  record of the batch and so fails as a whole on one bad record."""

  def __init__(self, builder, bad):
    super().__init__(builder, bad)
    self.batch_reads = []

  def __getitems__(self, keys):
    self.batch_reads.append(list(keys))
    return [self[k] for k in keys]


@pytest.mark.parametrize("records", [_PngRecords, _BatchPngRecords])
@pytest.mark.parametrize("bad,match", [
    ("corrupt", r"^cifar10 train .* example 3 cannot be read: "),
    ((30, 32, 3), r"^cifar10 train .* example 3 has an image of shape \(30, 32, 3\), "
                  r"not 32x32x3; set dataset.image_size/channels to match")])
def test_bad_record_names_the_example(bad, match, records):
  config = _tfds_config()
  with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **_:
                              records(builder, bad)):
    batches = _train(config)
    _raises(match, list, batches)


def _tfds_config():
  config = _config(name="cifar10", source="tfds", num_train_examples=8,
                   image_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                   num_workers=2)
  config.schedule.batch_size = 8
  config.ghost_batch_size = 8
  return config


def test_tfds_examples_are_read_a_task_at_a_time():
  """Where the TFDS source reads batches, each worker's task reads its rows
  in one call (array_record then reads them in parallel, GIL released)."""
  config = _tfds_config()
  made = []
  def source(builder, split, **_):
    del split
    made.append(_BatchPngRecords(builder, (32, 32, 3)))
    return made[-1]
  with tfds.testing.mock_data(as_data_source_fn=source):
    batches = list(_train(config))
  (records,) = made
  reads = records.batch_reads
  assert len(batches) > 1
  assert [len(r) for r in reads] == [4] * (2 * len(batches))  # 2 workers.
  # B = N: every batch holds each example once (tasks may interleave).
  assert sorted(sum(reads, [])) == sorted(list(range(8)) * len(batches))
