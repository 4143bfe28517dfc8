"""Every field the framework reads, with the Fashion-MNIST defaults.

Experiment files import `get_base_config()` and override what differs; the
trainer never invents a default of its own. Durations carry their unit in the
name (`_epochs`, `_steps`, `_examples`).
"""
from ml_collections import config_dict

placeholder = config_dict.placeholder

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"


def get_base_config() -> config_dict.ConfigDict:
  """The default experiment: a small ResNet on Fashion-MNIST, growing B."""
  config = config_dict.ConfigDict()
  config.seed = 0

  config.dataset = config_dict.ConfigDict(dict(
      # A TFDS name ('fashion_mnist', 'cifar10', 'imagenet2012') or 'synthetic'.
      name="fashion_mnist",
      # 'auto': TFDS when prepared in data_dir, else the IDX files (Fashion-MNIST
      # only); 'tfds', 'idx' or 'synthetic' force one source.
      source="auto",
      data_dir=placeholder(str),  # TFDS data_dir; None = TFDS's default.
      idx_dir=FASHION_MNIST_IDX_DIR,  # Debian's dataset-fashion-mnist files.
      train_split="train",
      eval_split="test",
      # N of the paper's noise scale: the first N examples of the train split.
      num_train_examples=60_000,
      num_eval_examples=10_000,  # Used by the synthetic source only.
      num_classes=10,
      image_size=28,  # Side of the square image the model sees (pixels).
      channels=1,
      mean=(0.2860,),  # Per-channel normalisation on [0, 1] pixels.
      std=(0.3530,),
      # 'none' | 'pad_crop_flip' (CIFAR style) | 'inception' (ImageNet style).
      augment="pad_crop_flip",
      crop_padding=4,  # Pixels of padding for 'pad_crop_flip'.
      random_flip=True,
      # 'inception' train crop: a random box covering this fraction of the
      # image area, with width/height in this range, resized to image_size.
      inception_area_range=(0.08, 1.0),
      inception_aspect_range=(3 / 4, 4 / 3),
      # 'inception' eval: the centred square of this fraction of the shorter
      # side, resized to image_size (0.875: 224 from a 256 resize).
      eval_crop_fraction=0.875,
      # 'synthetic' source: std of the per-pixel noise on the class pattern
      # (0-255 pixel units); larger makes the labels harder to learn.
      synthetic_noise=48.0,
      prefetch_batches=2,  # Batches prepared ahead of the step, per process.
      num_workers=1,  # Host threads decoding and augmenting; 0 = in the caller.
      # Worker processes decoding and augmenting instead (spawned, each
      # with its own source; one thread each hands them the tasks): for
      # hosts whose threads the GIL would hold back (README, Input
      # pipeline). 0: threads only.
      worker_processes=0,
  ))

  config.model = config_dict.ConfigDict(dict(
      # 'small_resnet' | 'wide_resnet' | 'resnet50' | 'inception_resnet_v2'
      name="small_resnet",
      # Channels of the stem and first stage (64 for ResNet-50; 16 for
      # wide_resnet, whose groups are width * widen_factor * (1, 2, 4)).
      # Not used by inception_resnet_v2.
      width=16,
      blocks_per_stage=1,  # Used by small_resnet only (3 stages).
      depth=16,  # Used by wide_resnet only (16 for WRN-16-4).
      widen_factor=4,  # Used by wide_resnet only.
      # Zero scale on the last batch norm of each residual branch, so blocks
      # start as the identity (small_resnet, resnet50; WRN is pre-activation).
      zero_init_residual=True,
      bn_epsilon=1e-5,  # 1e-3 in Keras' Inception-ResNet-V2.
      # Batch norm variance as E[x²] - E[x]² in one pass over the
      # activations (as Flax's BatchNorm), or as E[(x - E[x])²] after
      # the mean, a second pass.
      bn_fast_variance=True,
      # Train through the batch norm gradient written out (one reduction
      # and one elementwise pass over the activations) or through JAX's
      # autodiff of the forward pass; the same values.
      bn_explicit_gradient=True,
      # With it, take the ReLU after a batch norm (and a ResNet block's skip
      # add before that ReLU) inside the norm's gradient, which recomputes
      # the ReLU's mask from its input: no separate pass over the
      # activations for the ReLU's gradient. Same outputs, gradients to
      # float32 rounding. None: on for GPUs, off on the CPU and TPUs (2.7%
      # more ResNet-50 examples/s on an H200, 4-8% fewer for the small
      # model on the CPU; on a TPU untimed, and 1.6 GiB more per v5e chip;
      # README, "Performance on one GPU").
      bn_fuse_relu=placeholder(bool),
      # ResNet-50's 7x7/2 stem conv over 3 channels computed as a 4x4/1
      # conv over 2x2 blocks of pixels, 12 channels padded to 16
      # (models/space_to_depth.py): the same parameter, outputs to float
      # rounding. None: on for ResNet-50 on GPUs (5% more examples/s on an
      # H100), off on the CPU and TPUs (untimed there) and for the other
      # models, which have no such stem (README, "Performance on one GPU").
      stem_space_to_depth=placeholder(bool),
      dtype="float32",  # Compute dtype; parameters stay float32.
  ))
  # Batch norm statistics are taken over groups of this many examples, in
  # every stage, so their noise does not shrink as the global batch grows.
  config.ghost_batch_size = 16
  # Running averages forget at a per-example rate: an example's weight
  # decays by `bn_momentum` every `bn_momentum_examples` examples.
  config.bn_momentum = 0.9
  config.bn_momentum_examples = 128
  # Largest per-device share computed at once; a larger share is split into
  # micro-batches of this size whose gradients are summed before one update.
  # benchmarks/train_step.py --max_device_batch=64,128,256 times sizes on a
  # machine to find the fastest.
  config.max_device_batch = 256
  # Where micro-batches are summed. 'host': two compiled functions
  # (accumulate one micro-batch on each device, apply the update) called by
  # the host k times and once per step; every stage past max_device_batch
  # reuses them, so growing B compiles nothing and keeps the examples/s of
  # the micro-batch size. 'compiled': one step per batch size with the
  # micro-batch loop inside (no host round trips, one compile per stage).
  config.accumulation = "host"
  # 2: the host dispatches step t+1 before it reads step t's metrics, so it
  # prepares and copies the next batch while the devices compute; 1: it
  # reads each step's metrics before the next. None: 2 on GPUs and TPUs,
  # 1 on the CPU (README, Training, "One step ahead", says why).
  config.steps_in_flight = placeholder(int)
  # Weight averaging: 'ema' keeps an exponential moving average of the
  # parameters spanning ~ema_horizon_epochs of examples (per-step decay
  # exp(-B / (horizon * N)), the same window at every batch size) and
  # evaluates it beside the raw weights, with batch-norm statistics
  # recomputed for the averaged weights on ema_bn_batches batches of
  # ema_bn_batch_size training examples (rounded down to whole ghost batches
  # on every device)
  # training examples. 'none' turns it off.
  config.weight_average = "none"
  config.ema_horizon_epochs = 0.25
  config.ema_bn_batches = 4
  config.ema_bn_batch_size = 1024
  # The moving averages behind `grad_noise_scale` (host accumulation on 2+
  # devices; trainer/noise_scale.py) span about this many epochs of examples
  # (per-step decay exp(-B / (horizon * N))).
  config.noise_scale_horizon_epochs = 0.1
  # 'compiled' only: micro-batches per iteration of the loop; 0 unrolls it
  # fully (XLA:CPU ran a looped step ~12x slower). A positive value bounds
  # compile time when a stage needs very many micro-batches.
  config.micro_batch_unroll = 0

  config.optimizer = config_dict.ConfigDict(dict(
      name="momentum",  # 'sgd' | 'momentum' | 'nesterov' | 'adam'
      weight_decay=5e-4,
      adam_b2=0.999,
      adam_eps=1e-8,
  ))

  config.schedule = config_dict.ConfigDict(dict(
      # 'decay_lr' | 'increase_batch' | 'hybrid' | 'adaptive'
      kind="increase_batch",
      num_epochs=10.0,
      milestones_epochs=(4.0, 7.0, 9.0),
      # The noise scale g falls by this factor at every milestone.
      decay_factor=2.0,
      # B0 (examples). With the reference_* fields set, B0 is instead
      # batch_size * (learning_rate / reference_learning_rate)
      #            * (1 - reference_momentum) / (1 - momentum),
      # the paper's B ∝ ε/(1-m) at constant noise scale.
      batch_size=128,
      learning_rate=0.1,  # ε after warm-up, at B0.
      momentum=0.9,
      reference_learning_rate=placeholder(float),
      reference_momentum=placeholder(float),
      # Linear scaling rule: ε = learning_rate * B0 / linear_scaling_batch.
      linear_scaling_batch=placeholder(int),
      # Cap on the global batch (examples); hybrid decays ε once B reaches it.
      max_batch=placeholder(int),
      # Linear warm-up of ε over these epochs of examples seen, from
      # warmup_start_learning_rate (Goyal et al. start at the ε of the
      # linear scaling rule's reference batch; 0 starts from nothing).
      warmup_epochs=0.0,
      warmup_start_learning_rate=0.0,
      # kind='adaptive' (trainer/adaptive.py; milestones and decay_factor
      # unused): every `adaptive_every_epochs` the batch grows to the largest
      # B0 * adaptive_growth**j not above adaptive_scale * B_simple (the
      # measured gradient noise scale), capped by max_batch; it never
      # shrinks. ε stays at learning_rate ('constant', the paper's rule) or
      # grows with B ('linear': learning_rate * B / B0).
      adaptive_every_epochs=0.25,
      adaptive_scale=1.0,
      adaptive_growth=2,
      adaptive_lr_rule="constant",
  ))

  config.eval_every_epochs = 1.0
  config.eval_batch_size = 1000  # Global; the split's tail is padded, masked.
  config.log_every_steps = 20
  # Checkpoints: every this many updates and at every stage boundary.
  config.checkpoint_every_steps = 500
  config.checkpoint_every_minutes = 0.0  # Also save after this long; 0 = off.
  config.checkpoints_to_keep = 3
  # Persistent XLA compilation cache; None = $JAX_COMPILATION_CACHE_DIR if
  # set, else <workdir>/compilation_cache.
  config.compilation_cache_dir = placeholder(str)
  # Also keep the compiled train-step functions in <that>/programs, so a
  # second launch of this config loads them without tracing
  # (trainer/program_cache.py says what the key covers).
  config.program_cache = True
  return config


def check_variant(variant: str | None, known=("smoke",)) -> bool:
  """True for the smoke variant; rejects unknown `config.py:<variant>` args."""
  if variant in (None, ""):
    return False
  if variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; known: {', '.join(known)}")
  return True


def shrink_for_smoke(config, *, batch_size: int, max_batch: int | None = None,
                     synthetic: bool = True) -> None:
  """Shrinks `config` in place to a run of well under a minute on 2 CPU cores.

  Keeps the schedule kind and the number of milestones; batch sizes, epochs
  and the model become tiny. Ghost batches of 8 on 8 virtual devices need
  global batches that are multiples of 64.
  """
  config.dataset.num_train_examples = 2048
  config.dataset.num_eval_examples = 512
  config.dataset.worker_processes = 0  # Threads: nothing to spawn.
  if synthetic:
    config.dataset.source = "synthetic"
    config.dataset.image_size = 16
    config.dataset.augment = "pad_crop_flip"
    config.dataset.crop_padding = 2
  config.model.name = "small_resnet"
  config.model.width = 8
  config.model.dtype = "float32"
  config.ghost_batch_size = 8
  config.max_device_batch = 64
  s = config.schedule
  milestones = len(s.milestones_epochs)
  s.num_epochs = float(milestones + 1)
  s.milestones_epochs = tuple(float(i + 1) for i in range(milestones))
  s.decay_factor = 2.0
  s.batch_size = batch_size
  s.reference_learning_rate = None
  s.reference_momentum = None
  s.linear_scaling_batch = None
  s.max_batch = max_batch
  s.warmup_epochs = min(s.warmup_epochs, 0.5)
  # Without linear scaling ε0 is learning_rate: start below it, still rising.
  s.warmup_start_learning_rate = min(s.warmup_start_learning_rate,
                                     s.learning_rate / 2)
  config.eval_every_epochs = 1.0
  config.eval_batch_size = 256
  config.log_every_steps = 5
  config.checkpoint_every_steps = 20


def unknown_fields(config, base=None, prefix="") -> list[tuple[str, list[str]]]:
  """(field, its known siblings) for each field of `config` that
  get_base_config() lacks: a typo in a config file (`--config.x` overrides
  are checked by ml_collections itself)."""
  base = get_base_config() if base is None else base
  out = []
  for key, value in config.items():
    if key not in base:
      out.append((prefix + key, list(base.keys())))
    elif isinstance(value, config_dict.ConfigDict) and isinstance(
        base[key], config_dict.ConfigDict):
      out += unknown_fields(value, base[key], f"{prefix}{key}.")
  return out
