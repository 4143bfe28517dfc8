"""CIFAR-10, increased initial learning rate: ε=0.5, B0=640 (B ∝ ε), cap 5120.

    python -m trainer.plan --config=configs/cifar10_increased_lr.py

B0 is derived from the reference point (ε=0.1, m=0.9, B=128) at equal noise
scale. Paper: under 6.5k parameter updates, 94.5% (the plan: 6,407).
"""
from configs import cifar10


def get_config(variant=None):
  config = cifar10.get_cifar10_config()
  s = config.schedule
  s.kind = "hybrid"
  s.learning_rate = 0.5
  s.reference_learning_rate = 0.1
  s.reference_momentum = 0.9
  s.max_batch = 5120
  return cifar10.smoke(config, variant, max_batch=256)
