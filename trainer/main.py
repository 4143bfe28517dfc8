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
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() with no arguments (TPU pods "
                  "find their peers by themselves).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs elsewhere.")
flags.DEFINE_integer("num_processes", None, "Processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = cli.config()
  if not cli.FLAGS.workdir:
    cli.fail("--workdir is required")
  from trainer import distributed  # Imports JAX; after the cheap checks.
  cli.run_or_exit(distributed.initialize, multihost=cli.FLAGS.multihost,
                  coordinator_address=cli.FLAGS.coordinator_address,
                  num_processes=cli.FLAGS.num_processes,
                  process_id=cli.FLAGS.process_id)
  from trainer import loop
  try:
    try:
      cli.run_or_exit(loop.train_and_evaluate, config, cli.FLAGS.workdir,
                      cli.FLAGS.allow_config_change)
    except loop.RUN_ERRORS as e:
      cli.fail(str(e))
  except BaseException as e:  # pylint: disable=broad-except
    distributed.exit_now_if_others_wait(e)
    raise


if __name__ == "__main__":
  cli.run(main)
