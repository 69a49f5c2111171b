"""Trains and evaluates a text-guided fusion model (the training CLI).

  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo
  textfusion-train --config configs/demo.py --workdir DIR --config.train.num_steps=50

Parses --config (an ml_collections config file; any field can be overridden
as --config.a.b=value) and --workdir, then calls
`train_loop.train_and_evaluate(config, workdir)`.
"""

from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from textfusion_jax import errors
from textfusion_jax import train_loop

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, logs and eval.")
_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Training config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
