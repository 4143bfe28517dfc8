"""Shared settings of the ImageNet experiments (TFDS imagenet2012 in data_dir).

90 epochs, the noise scale divided by 10 at epochs 30, 60 and 80, ghost batch
32, 5 epochs of gradual warm-up (Goyal et al. 2017), bf16 compute.
"""
from configs import base


def get_imagenet_config():
  config = base.get_base_config()
  d = config.dataset
  d.name = "imagenet2012"
  d.source = "tfds"
  d.train_split = "train"
  d.eval_split = "validation"
  d.num_train_examples = 1_281_167
  d.num_eval_examples = 50_000
  d.num_classes = 1000
  d.image_size = 224
  d.channels = 3
  d.mean = (0.485, 0.456, 0.406)
  d.std = (0.229, 0.224, 0.225)
  d.augment = "inception"
  d.random_flip = True
  d.prefetch_batches = 2
  # Worker processes, not threads: one process's threads are bounded by the
  # GIL at 2,600-3,900 ImageNet examples/s (README, Input pipeline), below
  # what one accelerator's step consumes. With 0, num_workers threads.
  d.worker_processes = 16
  d.num_workers = 16
  config.model.name = "resnet50"
  config.model.width = 64
  config.model.dtype = "bfloat16"
  config.ghost_batch_size = 32
  # Must divide each stage's per-device batch when that exceeds it: 320 splits
  # B=81920 over 128 or 256 devices into whole micro-batches.
  config.max_device_batch = 320
  config.optimizer.name = "momentum"
  config.optimizer.weight_decay = 1e-4
  s = config.schedule
  s.kind = "hybrid"
  s.num_epochs = 90.0
  s.milestones_epochs = (30.0, 60.0, 80.0)
  s.decay_factor = 10.0
  s.batch_size = 8192
  s.momentum = 0.9
  s.max_batch = 81920
  s.warmup_epochs = 5.0
  config.eval_every_epochs = 5.0
  config.eval_batch_size = 1024  # A multiple of every pod slice's core count.
  config.log_every_steps = 50
  return config


def smoke(config, variant):
  """Smoke variant: hybrid B 64 → 128 → 256 (cap), synthetic 16 px images."""
  if base.check_variant(variant):
    base.shrink_for_smoke(config, batch_size=64, max_batch=256)
    config.dataset.num_classes = 10
    config.dataset.augment = "pad_crop_flip"
  return config
