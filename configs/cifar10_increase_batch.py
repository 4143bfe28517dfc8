"""CIFAR-10, increasing batch: ε=0.1 fixed, B 128 → 640 → 3200 → 16000.

    python -m trainer.plan --config=configs/cifar10_increase_batch.py

Paper: about 29k parameter updates, 94.4% test accuracy (the plan: 28,876).
"""
from configs import cifar10


def get_config(variant=None):
  config = cifar10.get_cifar10_config()
  config.schedule.kind = "increase_batch"
  return cifar10.smoke(config, variant)
