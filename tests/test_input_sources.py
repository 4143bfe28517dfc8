"""Sources: TFDS (mocked and a real prepared one), the IDX files, the choice."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from input_pipeline import DataError
from input_pipeline import eval_batches
from input_pipeline import make_source
from input_pipeline import sources
from input_pipeline import train_batches
from trainer import plan as plan_lib

IDX_DIR = base.FASHION_MNIST_IDX_DIR
HAS_IDX = os.path.isfile(os.path.join(IDX_DIR, "train-images-idx3-ubyte.gz"))


class InputPipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """12 train and 5 test 8x8 images; example v is all v, label v % 3.

  Images are stored as raw tensors: encoding PNGs would need TensorFlow.
  """
  VERSION = tfds.core.Version("1.0.0")
  # A one-part module name keeps TFDS from looking for this file as a package
  # resource (which needs the importlib_resources backport).
  __module__ = "input_pipeline_test_builder"

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12),
            "test": self._generate_examples(5, offset=100)}

  def _generate_examples(self, n, offset=0):
    for v in range(offset, offset + n):
      yield v, {"image": np.full((8, 8, 1), v, np.uint8), "label": v % 3}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  InputPipelineTestImages(data_dir=data_dir,
                          file_format="array_record").download_and_prepare()
  return data_dir


def _rgb_pixels(v):
  """Example v's 6x6 RGB image: each channel a different value, so that a
  swapped channel order shows."""
  return np.broadcast_to(np.array([v, 100 + v, 200 + v], np.uint8), (6, 6, 3))


class InputPipelineTestPngs(tfds.core.GeneratorBasedBuilder):
  """8 train examples stored as PNG files (encoded here, so TFDS keeps the
  bytes without TensorFlow), decoded by TFDS's image feature when read, as
  a prepared ImageNet's JPEGs are."""
  VERSION = tfds.core.Version("1.0.0")
  __module__ = "input_pipeline_test_builder"  # As above.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    for v in range(8):
      png = io.BytesIO()
      Image.fromarray(_rgb_pixels(v)).save(png, format="PNG")
      png.seek(0)
      yield v, {"image": png, "label": v % 3}


def test_prepared_pngs_decode_to_their_pixels(tmp_path):
  """The real TFDS path with encoded images: array_record records read a
  task at a time, decoded by TFDS, the first 6 of 8 examples (N)."""
  InputPipelineTestPngs(data_dir=str(tmp_path),
                        file_format="array_record").download_and_prepare()
  config = _small_config("input_pipeline_test_pngs", 6, 4, data_dir=str(tmp_path),
                         image_size=6, channels=3, num_classes=3,
                         mean=(0.5,) * 3, std=(0.25,) * 3, num_workers=2)
  source = sources.train_source(config)
  assert isinstance(source, sources.FirstExamples)
  firsts = [source[i] for i in range(6)]  # TFDS shuffles when preparing.
  for image, label in firsts:
    v = int(image[0, 0, 0])
    np.testing.assert_array_equal(image, _rgb_pixels(v))
    assert label == v % 3
  plan = plan_lib.plan_from_config(config)
  with train_batches(config, plan) as batches:
    stream = list(batches)
  images = np.concatenate([b["image"] for b in stream])
  labels = np.concatenate([b["label"] for b in stream])
  for image, label in zip(images, labels):
    v = int(image[0, 0, 0])
    np.testing.assert_array_equal(image, _rgb_pixels(v))
    assert label == v % 3
  first_values = sorted(int(image[0, 0, 0]) for image, _ in firsts)
  assert sorted(int(i[0, 0, 0]) for i in images[:6]) == first_values


def _small_config(name, num_train_examples, batch_size, **dataset):
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=batch_size, synthetic=False)
  config.schedule.kind = "decay_lr"  # One batch size: tiny N.
  config.ghost_batch_size = 4
  config.dataset.update({"name": name, "num_train_examples": num_train_examples,
                         "augment": "none", **dataset})
  return config


def test_auto_reads_a_prepared_tfds_dataset(prepared_dir):
  config = _small_config("input_pipeline_test_images", 12, 4, data_dir=prepared_dir,
                         image_size=8, num_classes=3, source="auto")
  assert isinstance(make_source(config, train=True), sources.TfdsSource)
  plan = plan_lib.plan_from_config(config)
  with train_batches(config, plan) as batches:
    stream = list(batches)
  values = np.concatenate([b["image"][:, 0, 0, 0].astype(np.int64) for b in stream])
  labels = np.concatenate([b["label"] for b in stream])
  np.testing.assert_array_equal(labels, values % 3)
  for epoch in range(len(values) // 12):
    assert sorted(values[epoch * 12:(epoch + 1) * 12]) == list(range(12))
  with eval_batches(config, 4) as batches:
    evals = list(batches)
  mask = np.concatenate([b["mask"] for b in evals])
  values = np.concatenate([b["image"][:, 0, 0, 0].astype(np.int64) for b in evals])
  stored = make_source(config, train=False)  # TFDS shuffles when preparing.
  np.testing.assert_array_equal(values[mask == 1],
                                [stored[i][0][0, 0, 0] for i in range(5)])
  assert sorted(values[mask == 1]) == list(range(100, 105))


def test_tfds_split_that_does_not_exist(prepared_dir):
  config = _small_config("input_pipeline_test_images", 12, 4, data_dir=prepared_dir,
                         image_size=8, num_classes=3, eval_split="validation")
  with pytest.raises(DataError, match=r"^split 'validation' does not exist in "
                     r"input_pipeline_test_images; use one of train, test"):
    eval_batches(config, 4)


def test_fewer_train_examples_prints_a_notice(prepared_dir, capsys):
  config = _small_config("input_pipeline_test_images", 8, 4, data_dir=prepared_dir,
                         image_size=8, num_classes=3)
  source = sources.train_source(config)
  assert len(source) == 8
  assert "training on the first 8 of the 12 examples" in capsys.readouterr().out


def test_more_train_examples_than_the_split(prepared_dir):
  config = _small_config("input_pipeline_test_images", 16, 4, data_dir=prepared_dir,
                         image_size=8, num_classes=3)
  with pytest.raises(DataError, match=r"num_train_examples=16 exceeds the 12 "
                     r"examples of input_pipeline_test_images train"):
    train_batches(config, plan_lib.plan_from_config(config))


def test_mock_fashion_mnist_through_tfds(capsys):
  config = _small_config("fashion_mnist", 32, 8, source="tfds")
  plan = plan_lib.plan_from_config(config)
  with tfds.testing.mock_data(num_examples=40):
    with train_batches(config, plan) as batches:
      first = next(batches)
    reference = tfds.data_source("fashion_mnist", split="train")
    order = sources.train_source(config)  # The same first 32 mock examples.
    assert "first 32 of the 40" in capsys.readouterr().out
    examples = {(reference[i]["image"].tobytes(), int(reference[i]["label"]))
                for i in range(32)}
  assert first["image"].shape == (8, 28, 28, 1)
  pixels = first["image"]  # The source's uint8 pixels, as they are.
  for image, label in zip(pixels, first["label"]):
    assert (image.tobytes(), int(label)) in examples
  assert len(order) == 32


def test_mock_cifar10_with_pad_crop_flip():
  config = _small_config("cifar10", 16, 8, source="tfds", image_size=32, channels=3,
                         mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                         augment="pad_crop_flip", crop_padding=4)
  plan = plan_lib.plan_from_config(config)
  with tfds.testing.mock_data(num_examples=16):
    with train_batches(config, plan) as batches:
      stream = list(batches)
    with eval_batches(config, 12) as batches:
      evals = list(batches)
  assert stream[0]["image"].shape == (8, 32, 32, 3)
  assert len(stream) == plan.total_updates
  assert np.concatenate([b["mask"] for b in evals]).sum() == 16


@pytest.mark.skipif(not HAS_IDX, reason=f"no Fashion-MNIST IDX files in {IDX_DIR} "
                    "(Debian package dataset-fashion-mnist)")
def test_fashion_mnist_idx_files():
  config = _small_config("fashion_mnist", 60_000, 8, source="idx")
  train, test = make_source(config, train=True), make_source(config, train=False)
  assert (len(train), len(test)) == (60_000, 10_000)
  image, label = train[0]
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8
  assert label == 9 and test[0][1] == 9  # Ankle boots open both files.
  assert image.max() == 255
  labels = np.array([train[i][1] for i in range(0, 60_000, 7)])
  assert np.bincount(labels, minlength=10).min() > 700  # Balanced classes.


@pytest.mark.skipif(not HAS_IDX, reason=f"no Fashion-MNIST IDX files in {IDX_DIR}")
def test_auto_falls_back_to_idx_for_fashion_mnist(tmp_path, capsys):
  (tmp_path / "unrelated").mkdir()  # A data_dir without fashion_mnist.
  config = _small_config("fashion_mnist", 256, 64, source="auto",
                         data_dir=str(tmp_path))
  plan = plan_lib.plan_from_config(config)
  with train_batches(config, plan) as batches:
    batch = next(batches)
  out = capsys.readouterr().out
  assert "reading the IDX files" in out and "first 256 of the 60000" in out
  assert batch["image"].shape == (64, 28, 28, 1)
  assert batch["image"].dtype == np.uint8  # The model normalises them.
  source = make_source(config, train=True)
  first = {source[i][0].tobytes(): source[i][1] for i in range(256)}
  pixels = batch["image"]
  assert [first[p.tobytes()] for p in pixels] == list(batch["label"])


def test_dataset_prepared_without_random_access(prepared_dir, tmp_path):
  """A TFDS dataset prepared as tfrecord (TFDS's default) cannot be indexed."""
  version = os.path.join("input_pipeline_test_images", "1.0.0")
  shutil.copytree(os.path.join(prepared_dir, version), tmp_path / version)
  info_path = tmp_path / version / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  config = _small_config("input_pipeline_test_images", 12, 4, data_dir=str(tmp_path),
                         image_size=8, num_classes=3)
  with pytest.raises(DataError, match=r"^input_pipeline_test_images at .* is "
                     r"prepared as tfrecord, which has no random access; "
                     r"re-prepare it with `tfds build input_pipeline_test_images "
                     r"--file_format=array_record`$"):
    make_source(config, train=True)
