"""CIFAR-10, hybrid: B grows 128 → 640 → 3200 → 5120 (cap), then ε falls.

    python -m trainer.plan --config=configs/cifar10_hybrid.py

At the cap ε is chosen so that the noise scale still falls 5× per milestone.
"""
from configs import cifar10


def get_config(variant=None):
  config = cifar10.get_cifar10_config()
  config.schedule.kind = "hybrid"
  config.schedule.max_batch = 5120
  return cifar10.smoke(config, variant, max_batch=256)
