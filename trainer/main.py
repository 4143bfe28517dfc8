"""Train and evaluate one experiment.

    python -m trainer.main --config=configs/fashion_mnist.py --workdir=/tmp/fm \
        [--config.schedule.decay_factor=4 ...]

Resumes from the workdir's latest checkpoint when there is one.
"""
from absl import flags
from absl import logging

from trainer import cli

flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir whose recorded config differs from --config.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = cli.config()
  if not cli.FLAGS.workdir:
    cli.fail("--workdir is required")
  from trainer import loop  # Imports JAX; after the cheap checks.
  try:
    cli.run_or_exit(loop.train_and_evaluate, config, cli.FLAGS.workdir,
                    cli.FLAGS.allow_config_change)
  except loop.RUN_ERRORS as e:
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main)
