"""Augmentation recipes, normalisation and the synthetic source."""
import numpy as np
import pytest

from configs import base
from input_pipeline import augment
from input_pipeline import sources


def _dataset(**overrides):
  config = base.get_base_config()
  base.shrink_for_smoke(config, batch_size=16)
  config.dataset.update(overrides)
  return config


def test_pad_crop_flip_is_a_window_of_the_padded_image():
  d = _dataset(image_size=6, crop_padding=2, random_flip=True).dataset
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (6, 6, 1), dtype=np.uint8) for _ in range(64)]
  draws = rng.random((64, augment.num_draws(d)))
  out = augment.train_images(d, images, draws)
  seen = set()
  for image, u, got in zip(images, draws, out):
    dy, dx, flip = int(u[0] * 5), int(u[1] * 5), u[2] < 0.5
    want = np.pad(image, ((2, 2), (2, 2), (0, 0)))[dy:dy + 6, dx:dx + 6]
    np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)
    seen.add((dy, dx, flip))
  assert len(seen) > 30  # Offsets and flips all get used.


def test_inception_boxes_respect_area_and_aspect():
  d = _dataset(augment="inception", image_size=8, channels=3).dataset
  rng = np.random.default_rng(1)
  sizes = np.array([[300, 400]] * 500)
  boxes = augment._inception_boxes(d, sizes, rng.random((500, augment.num_draws(d))))
  left, top, right, bottom = boxes.T
  w, h = right - left, bottom - top
  assert (left >= 0).all() and (top >= 0).all()
  assert (right <= 400).all() and (bottom <= 300).all()
  area = w * h / (300 * 400)
  assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
  aspect = w / h
  assert aspect.min() > 0.75 - 0.05 and aspect.max() < 4 / 3 + 0.05
  assert np.ptp(left) > 100 and np.ptp(area) > 0.5  # Really random.


def test_inception_falls_back_to_the_centre_box():
  d = _dataset(augment="inception", image_size=8, channels=1).dataset
  sizes = np.array([[10, 1000]])  # No allowed aspect fits: all tries fail.
  (box,) = augment._inception_boxes(d, sizes, np.full((1, augment.num_draws(d)), 0.99))
  np.testing.assert_array_equal(box, [493, 0, 506, 10])  # 10 high, 13 wide.


def test_inception_output_shape_and_constant_image():
  d = _dataset(augment="inception", image_size=8, channels=3).dataset
  images = [np.full((30 + k, 20, 3), 77, np.uint8) for k in range(5)]
  out = augment.train_images(d, images, np.random.default_rng(2).random((5, 41)))
  assert out.shape == (5, 8, 8, 3) and out.dtype == np.uint8
  assert (out == 77).all()


def test_inception_resizes_its_box_and_nothing_outside_it():
  """An image dark left of column 40 and bright from it: a box drawn inside
  the bright part comes out bright everywhere (the resize reads the box,
  not its surroundings); the same box shifted left of it comes out dark."""
  image = np.zeros((60, 80, 3), np.uint8)
  image[:, 40:] = 200
  bright = augment._resize(image, (40, 10, 80, 50), 8)
  dark = augment._resize(image, (0, 10, 40, 50), 8)
  assert bright.shape == dark.shape == (8, 8, 3)
  assert (bright == 200).all() and (dark == 0).all()
  gray = augment._resize(image[:, :, :1], (40, 0, 60, 60), 5)
  assert gray.shape == (5, 5, 1) and (gray == 200).all()


@pytest.mark.parametrize("size,channels", [(8, 3), (7, 3), (7, 1)])
def test_inception_flips_exactly_the_drawn_rows(size, channels):
  """The flip (OpenCV's, in place in the output row) mirrors the unflipped
  crop, in the rows whose flip draw is below 1/2 and in no other."""
  d = _dataset(augment="inception", image_size=size, channels=channels).dataset
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (40 + k, 50, channels), dtype=np.uint8)
            for k in range(16)]
  draws = rng.random((16, augment.num_draws(d)))
  flipped = augment.train_images(d, images, draws)
  d.random_flip = False
  plain = augment.train_images(d, images, draws)
  flips = draws[:, -1] < 0.5
  assert 0 < flips.sum() < 16
  np.testing.assert_array_equal(flipped[flips], plain[flips][:, :, ::-1])
  np.testing.assert_array_equal(flipped[~flips], plain[~flips])


@pytest.mark.parametrize("recipe", augment.AUGMENTS)
def test_images_are_written_into_the_given_rows(recipe):
  """With `out` (the batch's rows), train and eval images land there, the
  same pixels as without it; an `out` of another shape is refused."""
  d = _dataset(augment=recipe, image_size=8, channels=3).dataset
  rng = np.random.default_rng(4)
  side = 8 if recipe != "inception" else 20
  images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            for _ in range(3)]
  draws = rng.random((3, augment.num_draws(d)))
  for make, args in ((augment.train_images, (draws,)),
                     (augment.eval_images, ())):
    rows = np.zeros((5, 8, 8, 3), np.uint8)[1:4]
    got = make(d, images, *args, out=rows)
    assert got is rows and rows.any()
    np.testing.assert_array_equal(rows, make(d, images, *args))
    with pytest.raises(ValueError, match=r"out is uint8 \(3, 8, 8, 1\), not "
                       r"uint8 \(3, 8, 8, 3\)"):
      make(d, images, *args, out=np.zeros((3, 8, 8, 1), np.uint8))


def test_eval_takes_the_centred_square():
  """A frame of zeros around a 200-valued centre: the centred square of
  half the shorter side lies inside the centre."""
  d = _dataset(augment="inception", image_size=8, channels=3).dataset
  d.eval_crop_fraction = 0.5
  image = np.zeros((41, 61, 3), np.uint8)
  image[10:31, 20:41] = 200  # Centred 21 x 21; the square is 20 x 20.
  (out,) = augment.eval_images(d, [image])
  assert out.shape == (8, 8, 3) and (out == 200).all()
  image[10:31, 20:41][0, 0] = 0  # Its corner pixel is inside the square.
  assert augment.eval_images(d, [image])[0, 0, 0, 0] < 200


def test_synthetic_source_is_deterministic_and_seeded():
  config = _dataset(image_size=16)
  a, b = sources.make_source(config, train=True), sources.make_source(config, train=True)
  np.testing.assert_array_equal(a[7][0], b[7][0])
  assert a[7][0].shape == (16, 16, 1) and a[7][0].dtype == np.uint8
  config.seed = 1
  c = sources.make_source(config, train=True)
  assert not np.array_equal(a[7][0], c[7][0])
  assert len(a) == 2048 and len(sources.make_source(config, train=False)) == 512


def test_synthetic_labels_are_learnable():
  """Class means of the train split classify the eval split well."""
  config = _dataset(image_size=16)
  train = sources.make_source(config, train=True)
  evals = sources.make_source(config, train=False)
  x = np.stack([train[i][0] for i in range(1024)]).reshape(1024, -1).astype(float)
  y = np.array([train[i][1] for i in range(1024)])
  means = np.stack([x[y == c].mean(0) for c in range(10)])
  xe = np.stack([evals[i][0] for i in range(256)]).reshape(256, -1).astype(float)
  ye = np.array([evals[i][1] for i in range(256)])
  predicted = np.argmin(((xe[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (predicted == ye).mean() > 0.9
  assert len(np.unique(y)) == 10 and np.bincount(y).min() > 60  # Balanced.
  noisy = [(x[y == c] - means[c]).std() for c in range(10)]
  assert min(noisy) > 0.5 * config.dataset.synthetic_noise  # Not trivial.


@pytest.mark.parametrize("kind", augment.AUGMENTS)
def test_every_recipe_yields_image_size(kind):
  d = _dataset(augment=kind, image_size=16).dataset
  source = sources.make_source(_dataset(augment=kind, image_size=16), train=True)
  images = [source[i][0] for i in range(4)]
  draws = np.random.default_rng(0).random((4, augment.num_draws(d)))
  train = augment.train_images(d, images, draws)
  assert train.shape == (4, 16, 16, 1) and train.dtype == np.uint8
  assert augment.eval_images(d, images).shape == (4, 16, 16, 1)
  if kind == "none":
    np.testing.assert_array_equal(train, np.stack(images))
  else:
    assert not np.array_equal(train, np.stack(images))
