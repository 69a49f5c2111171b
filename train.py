"""Trains and evaluates a text-guided fusion model.

  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo
  python train.py --config configs/demo.py --workdir DIR --config.train.num_steps=50
"""

import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from textfusion_jax import errors
from textfusion_jax import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and eval.")
config_flags.DEFINE_config_file("config", None, "Training config file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  with errors.one_line_errors():
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  errors.run_absl_app(main, sys.argv)
