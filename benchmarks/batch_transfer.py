"""An image batch from host pixels to normalised model input on the devices:
float32 normalised on the host (what the input pipeline shipped before)
against uint8 normalised on the devices (what it ships now).

    python benchmarks/batch_transfer.py [--config=configs/imagenet_resnet50.py] \
        [--batch_size=256] [--image_size=224] [--repeats=10]

Both start from the same uint8 pixels in host memory and end with the
float32 model input sharded over the `data` axis of all devices, waited
for. Host float32: the pipeline's former per-channel normalisation on the
host, then `mesh.global_batch`. Device uint8: `mesh.global_batch` of the
pixels, then `models.pixels.model_input` jitted on the devices. Prints
the median milliseconds of each part, the bytes put, and the ratio. On the
CPU: 8 virtual devices unless XLA_FLAGS says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.default_virtual_devices(8)


def host_normalize(pixels, mean, std):
  """(pixels / 255 - mean) / std into a new float32 array, per channel, as
  the input pipeline did before: one multiply-add over each image with the
  channel factors tiled to the image's length."""
  import numpy as np
  std = np.asarray(std, np.float32)
  scale, bias = 1 / (255 * std), -np.asarray(mean, np.float32) / std
  out = pixels.astype(np.float32)
  flat = out.reshape(len(out), -1)
  n = flat.shape[1] // len(scale)
  flat *= np.tile(scale, n)
  flat += np.tile(bias, n)
  return out


def parser() -> argparse.ArgumentParser:
  """This script's flags (tests check gpu_figures.sh's calls against them)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/imagenet_resnet50.py")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=10)
  return p


def main():
  p = parser()
  a = p.parse_args()

  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from models import pixels as pixels_lib
  from trainer import mesh as mesh_lib

  config = common.load_config(a.config,
                              [f"dataset.image_size={a.image_size}"])
  d = config.dataset
  mesh = mesh_lib.make_mesh()
  pixels = np.random.default_rng(0).integers(
      0, 256, (a.batch_size, d.image_size, d.image_size, d.channels),
      dtype=np.uint8)
  normalize = jax.jit(
      functools.partial(pixels_lib.model_input, mean=tuple(d.mean),
                        std=tuple(d.std), dtype=jnp.float32),
      out_shardings=mesh_lib.batch_sharding(mesh))

  def host_float32():
    t0 = time.perf_counter()
    x = host_normalize(pixels, d.mean, d.std)
    t1 = time.perf_counter()
    y = mesh_lib.global_batch(dict(image=x), mesh)["image"]
    jax.block_until_ready(y)
    return t1 - t0, time.perf_counter() - t1, 0.0, y

  def device_uint8():
    t0 = time.perf_counter()
    x = mesh_lib.global_batch(dict(image=pixels), mesh)["image"]
    jax.block_until_ready(x)
    t1 = time.perf_counter()
    y = normalize(x)
    jax.block_until_ready(y)
    return 0.0, t1 - t0, time.perf_counter() - t1, y

  # Same model input either way (up to float rounding).
  np.testing.assert_allclose(np.asarray(host_float32()[3]),
                             np.asarray(device_uint8()[3]), rtol=1e-5,
                             atol=1e-5)
  runs = {name: [] for name in ("host float32", "device uint8")}
  for _ in range(a.repeats):  # Alternating, so noise hits both alike.
    runs["host float32"].append(host_float32()[:3])
    runs["device uint8"].append(device_uint8()[:3])
  print(f"B={a.batch_size}, {d.image_size} px x {d.channels}, "
        f"{mesh.size} {jax.devices()[0].platform} devices; median ms")
  print(f"{'input':<13} {'host':>7} {'put':>7} {'device':>7} {'total':>7} "
        f"{'MB put':>7}")
  totals = {}
  for name, parts in runs.items():
    host, put, device = (float(np.median(x)) for x in zip(*parts))
    totals[name] = float(np.median([sum(x) for x in parts]))
    mb = pixels.size * (4 if name == "host float32" else 1) / 1e6
    print(f"{name:<13} {1000 * host:7.2f} {1000 * put:7.2f} "
          f"{1000 * device:7.2f} {1000 * totals[name]:7.2f} {mb:7.1f}")
  print(f"device uint8 / host float32: "
        f"{totals['device uint8'] / totals['host float32']:.2f}")


if __name__ == "__main__":
  main()
