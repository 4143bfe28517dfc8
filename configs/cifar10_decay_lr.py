"""CIFAR-10, the paper's "original" schedule: B=128 fixed, ε=0.1 ÷5 at 60/120/160.

    python -m trainer.plan --config=configs/cifar10_decay_lr.py
    python -m trainer.main --config=configs/cifar10_decay_lr.py --workdir=...

Paper: about 80k parameter updates, 94.3% test accuracy (the plan: 78,125).
The smoke variant has one batch size, as decay_lr always does.
"""
from configs import cifar10


def get_config(variant=None):
  config = cifar10.get_cifar10_config()
  config.schedule.kind = "decay_lr"
  return cifar10.smoke(config, variant)
