"""Default: a small ResNet on Fashion-MNIST, increasing the batch on a CPU.

Run:  python -m trainer.main --config=configs/fashion_mnist.py --workdir=/tmp/fm
Plan: python -m trainer.plan --config=configs/fashion_mnist.py
B 128 → 256 → 512 → 1024 at epochs 4, 7, 9 of 10 (noise ÷2 each), ε=0.1.
"""
from configs import base


def get_config(variant=None):
  config = base.get_base_config()
  if base.check_variant(variant):
    base.shrink_for_smoke(config, batch_size=64, synthetic=False)
  return config
