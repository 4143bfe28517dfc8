"""Augmentation, from `config.dataset` (normalisation is the model's first
operation on the devices: models/pixels.py).

`augment` names the recipe:

* `'none'`: images are used as they are (they must be image_size square).
* `'pad_crop_flip'` (CIFAR): pad by `crop_padding` zero pixels, take a random
  image_size crop, flip left-right with probability 1/2 (`random_flip`).
  Eval images are used as they are.
* `'inception'` (ImageNet): a random box of `inception_area_range` of the area
  and `inception_aspect_range` width/height (10 tries, else the centre box of
  the nearest allowed aspect), resized to image_size (bicubic, not
  antialiased, as Flax's ImageNet example's tf.image.resize), then the flip.
  Eval: the centred square of `eval_crop_fraction` of the shorter side
  (whole pixels), resized to image_size.

Resizing is OpenCV's: 0.3 ms to bring a crop of half an ImageNet-sized image
to 224 px, against 2.1 ms for PIL's antialiased bicubic (README, Input
pipeline). It releases the GIL, so the pipeline's worker threads resize in
parallel; OpenCV's own thread pool is switched off so that those threads are
the only parallelism.

Every random number comes in `draws`, a row per example drawn from
(seed, epoch, example index) by the caller: this file holds no generator.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from input_pipeline.errors import DataError

AUGMENTS = ("none", "pad_crop_flip", "inception")
_INCEPTION_TRIES = 10  # As TF's sample_distorted_bounding_box and torchvision.


def check_config(d) -> None:
  """Raises DataError naming the first bad field of `config.dataset`."""
  def require(ok, message):
    if not ok:
      raise DataError(message)
  require(d.augment in AUGMENTS,
          f"dataset.augment={d.augment!r} is unknown; use one of {', '.join(AUGMENTS)}")
  require(d.image_size > 0, f"dataset.image_size={d.image_size} must be positive")
  require(d.channels > 0, f"dataset.channels={d.channels} must be positive")
  require(len(d.mean) == d.channels and len(d.std) == d.channels,
          f"dataset.mean={tuple(d.mean)} and dataset.std={tuple(d.std)} need one "
          f"value per channel (dataset.channels={d.channels})")
  require(all(s > 0 for s in d.std), f"dataset.std={tuple(d.std)} must be positive")
  require(d.crop_padding >= 0,
          f"dataset.crop_padding={d.crop_padding} must not be negative")
  lo, hi = d.inception_area_range
  require(0 < lo <= hi <= 1, f"dataset.inception_area_range={(lo, hi)} must "
          "satisfy 0 < low <= high <= 1")
  lo, hi = d.inception_aspect_range
  require(0 < lo <= hi, f"dataset.inception_aspect_range={(lo, hi)} must "
          "satisfy 0 < low <= high")
  require(0 < d.eval_crop_fraction <= 1, f"dataset.eval_crop_fraction="
          f"{d.eval_crop_fraction} must be in (0, 1]")
  if d.augment == "inception":
    require(d.channels in (1, 3), f"dataset.augment='inception' resizes 1- or "
            f"3-channel images, not dataset.channels={d.channels}")


def num_draws(d) -> int:
  """Uniform numbers each train example needs."""
  if d.augment == "pad_crop_flip":
    return 3  # dy, dx, flip.
  if d.augment == "inception":
    return 4 * _INCEPTION_TRIES + 1  # (area, aspect, y, x) per try, flip.
  return 0


def check_image(d, image: np.ndarray, where: str) -> None:
  """DataError unless `image` fits the recipe (sizes are fixed but for
  'inception', which resizes)."""
  size, c = d.image_size, d.channels
  fixed = d.augment != "inception"
  if (image.ndim != 3 or image.shape[2] != c
      or (fixed and image.shape[:2] != (size, size))):
    want = f"{size}x{size}x{c}" if fixed else f"HxWx{c}"
    hint = ("set dataset.image_size/channels to match or use "
            "augment='inception', which resizes") if fixed else (
                "set dataset.channels to match")
    raise DataError(f"{where} has an image of shape {image.shape}, not {want}; {hint}")


def train_images(d, images: list[np.ndarray], draws: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [n, S, S, C] augmented train images, written into `out` when
  given (the batch's own rows: no copy); `draws` is [n, num_draws]."""
  out = _output(d, len(images), out)
  if d.augment == "inception":
    _inception_train(d, images, draws, out)
  elif d.augment == "pad_crop_flip":
    out[...] = _pad_crop_flip(np.stack(images), draws, d.crop_padding,
                              d.random_flip)
  else:
    np.stack(images, out=out)
  return out


def eval_images(d, images: list[np.ndarray],
                out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [n, S, S, C] eval images (no randomness), written into `out`
  when given."""
  out = _output(d, len(images), out)
  if d.augment != "inception":
    np.stack(images, out=out)
    return out
  for k, image in enumerate(images):
    h, w = image.shape[:2]
    side = max(1, round(min(h, w) * d.eval_crop_fraction))
    top, left = (h - side) // 2, (w - side) // 2
    _resize(image, (left, top, left + side, top + side), d.image_size, out[k])
  return out


def _output(d, n: int, out: np.ndarray | None) -> np.ndarray:
  shape = (n, d.image_size, d.image_size, d.channels)
  if out is None:
    return np.empty(shape, np.uint8)
  if out.shape != shape or out.dtype != np.uint8:
    raise ValueError(f"out is {out.dtype} {out.shape}, not uint8 {shape}")
  return out


def _pad_crop_flip(batch, draws, padding: int, random_flip: bool):
  n, h, w, _ = batch.shape
  if padding:
    padded = np.pad(batch, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    span = 2 * padding + 1
    dy = np.minimum((draws[:, 0] * span).astype(np.int64), span - 1)
    dx = np.minimum((draws[:, 1] * span).astype(np.int64), span - 1)
    rows = dy[:, None] + np.arange(h)  # [n, h]
    cols = dx[:, None] + np.arange(w)  # [n, w]
    batch = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if random_flip:
    flip = draws[:, 2] < 0.5
    batch[flip] = batch[flip, :, ::-1]
  return batch


def _inception_boxes(d, sizes: np.ndarray, draws: np.ndarray) -> np.ndarray:
  """[n, 4] boxes (left, top, right, bottom) of the random crops, whole
  pixels (as floats)."""
  t = _INCEPTION_TRIES
  h, w = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)
  (a_lo, a_hi), (r_lo, r_hi) = d.inception_area_range, d.inception_aspect_range
  area = h * w * (a_lo + (a_hi - a_lo) * draws[:, :t])
  log_r_lo, log_r_hi = math.log(r_lo), math.log(r_hi)
  aspect = np.exp(log_r_lo + (log_r_hi - log_r_lo) * draws[:, t:2 * t])
  cw, ch = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
  ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
  first = np.argmax(ok, axis=1)
  rows = np.arange(len(sizes))
  cw, ch = cw[rows, first], ch[rows, first]
  top = np.floor(draws[rows, 2 * t + first] * (h[:, 0] - ch + 1))
  left = np.floor(draws[rows, 3 * t + first] * (w[:, 0] - cw + 1))
  boxes = np.stack([left, top, left + cw, top + ch], axis=1)
  # No try fitted: the centred box of the whole image, aspect clamped.
  h, w = h[:, 0], w[:, 0]
  fw = np.where(w / h > r_hi, np.rint(h * r_hi), w)
  fh = np.where(w / h < r_lo, np.rint(w / r_lo), h)
  fallback = np.stack([(w - fw) // 2, (h - fh) // 2,
                       (w - fw) // 2 + fw, (h - fh) // 2 + fh], axis=1)
  return np.where(ok.any(axis=1)[:, None], boxes, fallback)


def _inception_train(d, images, draws, out):
  """Each image's crop resized into its row of `out`, then flipped there:
  OpenCV does both with the GIL released, so worker threads run them in
  parallel (numpy's masked flip of the whole batch, with the copies of the
  crops into it, took 0.46 ms per example in a profile)."""
  sizes = np.array([image.shape[:2] for image in images])
  boxes = _inception_boxes(d, sizes, draws)
  flip = (draws[:, 4 * _INCEPTION_TRIES] < 0.5) & bool(d.random_flip)
  for k, image in enumerate(images):
    _resize(image, tuple(boxes[k]), d.image_size, out[k])
    if flip[k]:
      _cv2().flip(out[k], 1, dst=out[k])  # 1: about the vertical axis.


@functools.cache
def _cv2():
  """OpenCV, imported at the first resize (only 'inception' resizes), with
  its own thread pool switched off."""
  import cv2  # pylint: disable=import-outside-toplevel
  cv2.setNumThreads(1)
  return cv2


def _resize(image: np.ndarray, box, size: int,
            out: np.ndarray | None = None) -> np.ndarray:
  """The `box` (left, top, right, bottom; whole pixels) of `image` resized
  to size x size, into `out` ([size, size, C] uint8, C-contiguous) when
  given."""
  cv2 = _cv2()
  left, top, right, bottom = (int(b) for b in box)
  if out is None:
    out = np.empty((size, size, image.shape[2]), np.uint8)
  cv2.resize(image[top:bottom, left:right], (size, size), dst=out,
             interpolation=cv2.INTER_CUBIC)
  return out
