"""ImageNet ResNet-50 v1.5, the 30-minute pod run: B 8192 → 81920, then ε decays.

    python -m trainer.plan --config=configs/imagenet_resnet50.py --num_devices=256
    ./launch_tpu.sh ... --config=configs/imagenet_resnet50.py

Linear scaling rule: ε = 0.1 × B0/256 = 3.2, reached by Goyal et al.'s
gradual warm-up, linear from ε = 0.1 (the rule's ε at B=256) over 5 epochs.
B grows 10× at epoch 30 to the 81920 cap; ε then falls 10× at epochs 60 and
80.
Target: 76% top-1 (the paper: 76.1% in under 30 minutes on a TPU pod).
"""
from configs import imagenet


def get_config(variant=None):
  config = imagenet.get_imagenet_config()
  config.schedule.learning_rate = 0.1
  config.schedule.linear_scaling_batch = 256
  config.schedule.warmup_start_learning_rate = 0.1
  return imagenet.smoke(config, variant)
