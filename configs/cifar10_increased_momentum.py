"""CIFAR-10, increased momentum: ε=0.5, m=0.98, B0=3200 (B ∝ ε/(1-m)), cap 5120.

    python -m trainer.plan --config=configs/cifar10_increased_momentum.py

B0 is derived from the reference point (ε=0.1, m=0.9, B=128) at equal noise
scale. Paper: under 2.5k parameter updates, 93.3% (the plan: 2,305).
"""
from configs import cifar10


def get_config(variant=None):
  config = cifar10.get_cifar10_config()
  s = config.schedule
  s.kind = "hybrid"
  s.learning_rate = 0.5
  s.momentum = 0.98
  s.reference_learning_rate = 0.1
  s.reference_momentum = 0.9
  s.max_batch = 5120
  return cifar10.smoke(config, variant, max_batch=256)
