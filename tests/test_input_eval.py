"""Eval batches score the whole split: padded and masked, never dropped."""
import numpy as np
import pytest

from configs import base
from input_pipeline import eval_batches
from input_pipeline import sources


def _config(num_eval_examples=100):
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=16)
  config.dataset.num_eval_examples = num_eval_examples
  config.dataset.image_size = 8
  return config


def _expected(config):
  source = sources.eval_source(config)
  images = np.stack([source[i][0] for i in range(len(source))])
  return images, np.array([source[i][1] for i in range(len(source))])


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("num_examples,batch", [(100, 32), (96, 32), (5, 32)])
def test_eval_covers_every_example_once(process_count, num_examples, batch):
  config = _config(num_examples)
  per_process = []
  for p in range(process_count):
    with eval_batches(config, batch, process_index=p,
                      process_count=process_count) as batches:
      per_process.append(list(batches))
  assert {len(b) for b in per_process} == {-(-num_examples // batch)}
  images, labels, masks = [], [], []
  for slices in zip(*per_process):
    for s in slices:
      assert s["image"].shape == (batch // process_count, 8, 8, 1)
      assert s["mask"].dtype == np.float32 and s["label"].dtype == np.int32
      assert s["image"].dtype == np.uint8
      images.append(s["image"])
      labels.append(s["label"])
      masks.append(s["mask"])
  mask = np.concatenate(masks)
  # Real rows first, in split order; then only padding.
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < num_examples)
  want_images, want_labels = _expected(config)
  np.testing.assert_array_equal(np.concatenate(images)[:num_examples], want_images)
  np.testing.assert_array_equal(np.concatenate(labels)[:num_examples], want_labels)
  assert not np.concatenate(images)[num_examples:].any()  # Padding is zeros.


def test_eval_inception_is_a_centre_crop_resize():
  config = _config(4)
  config.dataset.augment = "inception"
  config.dataset.eval_crop_fraction = 1.0
  with eval_batches(config, 4) as batches:
    (batch,) = list(batches)
  want, _ = _expected(config)  # A full-image crop at the same size is identity.
  np.testing.assert_allclose(batch["image"], want, atol=1e-6)

