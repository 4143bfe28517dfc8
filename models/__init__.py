"""Models, all with ghost batch norm, built from `config.model` by name.

    model = models.create_model(config)
    variables = model.init(rng, images, train=False)
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])

In training the `batch_stats` the model returns are the step's statistics;
the train step folds them into the running averages with
`update_running_stats(old, new, running_stats_decay(B, m, m_examples))`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.ghost_batch_norm import GhostBatchNorm
from models.ghost_batch_norm import running_stats_decay
from models.ghost_batch_norm import update_running_stats
from models.inception_resnet_v2 import InceptionResNetV2
from models.resnet import ResNet
from models.resnet import ResNet50
from models.resnet import SmallResNet
from models.wide_resnet import WideResNet
from models.wide_resnet import check_depth

MODEL_NAMES = ("small_resnet", "wide_resnet", "resnet50",
               "inception_resnet_v2")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "DTYPES", "GhostBatchNorm", "InceptionResNetV2", "MODEL_NAMES", "ResNet",
    "ResNet50", "SmallResNet", "WideResNet", "create_model", "fuse_relu",
    "resolve_platform_defaults", "running_stats_decay",
    "stem_space_to_depth", "update_running_stats",
]


def create_model(config) -> nn.Module:
  """The linen module named by `config.model.name`, configured from `config`.

  Reads `config.model.*`, `config.dataset.num_classes`, `.mean` and `.std`
  (which normalise uint8 images on the device) and `config.ghost_batch_size`
  (examples per batch norm group).
  """
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(
        f"unknown model.name {m.name!r}; choices: {', '.join(MODEL_NAMES)}")
  if m.dtype not in DTYPES:
    raise ValueError(
        f"unknown model.dtype {m.dtype!r}; choices: {', '.join(DTYPES)}")
  if not isinstance(m.width, int) or m.width < 1:
    raise ValueError(f"model.width must be a positive integer, got {m.width!r}")
  if config.dataset.num_classes < 2:
    raise ValueError(f"dataset.num_classes must be at least 2, got "
                     f"{config.dataset.num_classes}")
  if m.stem_space_to_depth and m.name != "resnet50":
    raise ValueError(
        f"model.stem_space_to_depth applies to resnet50's 7x7/2 stem; "
        f"{m.name} has none: leave it unset or false")
  ghost_batch_size = config.ghost_batch_size
  if not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
    raise ValueError(
        f"ghost_batch_size must be a positive integer, got "
        f"{ghost_batch_size!r}")
  common = dict(
      num_classes=config.dataset.num_classes,
      ghost_batch_size=config.ghost_batch_size, bn_epsilon=m.bn_epsilon,
      bn_fast_variance=m.bn_fast_variance,
      bn_explicit_gradient=m.bn_explicit_gradient,
      bn_fuse_relu=fuse_relu(config),
      pixel_mean=tuple(config.dataset.mean),
      pixel_std=tuple(config.dataset.std),
      dtype=DTYPES[m.dtype])
  if m.name == "inception_resnet_v2":
    return InceptionResNetV2(**common)
  common["width"] = m.width
  if m.name == "small_resnet":
    return SmallResNet(blocks_per_stage=m.blocks_per_stage,
                       zero_init_residual=m.zero_init_residual, **common)
  if m.name == "resnet50":
    return ResNet50(zero_init_residual=m.zero_init_residual,
                    stem_space_to_depth=stem_space_to_depth(config), **common)
  check_depth(m.depth)
  return WideResNet(depth=m.depth, widen_factor=m.widen_factor, **common)


def fuse_relu(config, backend: str | None = None) -> bool:
  """`config.model.bn_fuse_relu`, or where unset: True on GPUs, where it was
  faster, with the written-out gradient (the only one it changes); False
  elsewhere (slower on the CPU; untimed on TPUs, where it needs more
  memory). `backend`: the platform the model will run on (default: JAX's
  default backend)."""
  fuse = config.model.bn_fuse_relu
  if fuse is None:
    return ((backend or jax.default_backend()) == "gpu"
            and config.model.bn_explicit_gradient)
  return fuse


def stem_space_to_depth(config, backend: str | None = None) -> bool:
  """`config.model.stem_space_to_depth`, or where unset: True for ResNet-50
  on GPUs, where its step ran 5% more examples/s with it on an H100; False
  elsewhere (untimed on the CPU and TPUs) and for the other models, which
  have no 7x7/2 stem. `backend`: as fuse_relu's."""
  value = config.model.stem_space_to_depth
  if value is None:
    return (config.model.name == "resnet50"
            and (backend or jax.default_backend()) == "gpu")
  return value


def resolve_platform_defaults(config, backend: str | None = None) -> None:
  """Writes into `config` the value of each model field left unset for the
  platform to choose (`bn_fuse_relu`, `stem_space_to_depth`), as `backend`
  (default: JAX's default backend) resolves it."""
  config.model.bn_fuse_relu = fuse_relu(config, backend)
  config.model.stem_space_to_depth = stem_space_to_depth(config, backend)
