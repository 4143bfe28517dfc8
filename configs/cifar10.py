"""Shared settings of the paper's CIFAR-10 experiments (Smith et al. 2018, §5.1).

Wide ResNet 16-4, ghost batch 128, 200 epochs, the noise scale divided by 5 at
epochs 60, 120 and 160. The experiment files pick the schedule.
"""
from configs import base


def get_cifar10_config():
  config = base.get_base_config()
  d = config.dataset
  d.name = "cifar10"
  d.source = "tfds"
  d.num_train_examples = 50_000
  d.num_eval_examples = 10_000
  d.num_classes = 10
  d.image_size = 32
  d.channels = 3
  d.mean = (0.4914, 0.4822, 0.4465)
  d.std = (0.2470, 0.2435, 0.2616)
  d.augment = "pad_crop_flip"
  d.crop_padding = 4
  d.random_flip = True
  config.model.name = "wide_resnet"
  config.model.depth = 16
  config.model.widen_factor = 4
  config.ghost_batch_size = 128
  config.max_device_batch = 512
  config.optimizer.name = "momentum"
  config.optimizer.weight_decay = 5e-4
  s = config.schedule
  s.num_epochs = 200.0
  s.milestones_epochs = (60.0, 120.0, 160.0)
  s.decay_factor = 5.0
  s.batch_size = 128
  s.learning_rate = 0.1
  s.momentum = 0.9
  config.eval_every_epochs = 5.0
  config.log_every_steps = 100
  return config


def smoke(config, variant, *, max_batch=None):
  """Applies the smoke variant: same schedule kind, synthetic CIFAR-shaped data."""
  if base.check_variant(variant):
    base.shrink_for_smoke(config, batch_size=64, max_batch=max_batch)
  return config
