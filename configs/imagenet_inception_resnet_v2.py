"""ImageNet Inception-ResNet-V2, the paper's schedule (Smith et al. 2018, §5.3).

    python -m trainer.plan --config=configs/imagenet_inception_resnet_v2.py

ε=3, m=0.9, ghost batch 32; B 8192 → 81920 at epoch 30, then ε ÷10 at 60 and
80. Paper: under 6k parameter updates against 14k for decaying ε (plan: 5,631).
"""
from configs import imagenet


def get_config(variant=None):
  config = imagenet.get_imagenet_config()
  config.model.name = "inception_resnet_v2"
  config.dataset.image_size = 299
  config.schedule.learning_rate = 3.0
  return imagenet.smoke(config, variant)
