"""Default: a small ResNet on Fashion-MNIST, increasing the batch on a CPU.

Run:  python -m trainer.main --config=configs/fashion_mnist.py --workdir=/tmp/fm
Plan: python -m trainer.plan --config=configs/fashion_mnist.py
B 128 → 256 → 512 → 1024 at epochs 4, 7, 9 of 10 (noise ÷2 each), ε=0.1.
"""
from configs import base


def get_config(variant=None):
  config = base.get_base_config()
  config.model.width = 8  # ~20k parameters: 10 epochs fit in minutes on 2 cores.
  config.dataset.augment = "none"
  # Measured on 2 cores with 8 virtual devices: host-accumulated micro-batches
  # of 16 per device run B=1024 faster per example than B=128 runs unsplit
  # (README, benchmarks/train_step.py).
  config.max_device_batch = 16
  if base.check_variant(variant):
    base.shrink_for_smoke(config, batch_size=64, synthetic=False)
  return config
