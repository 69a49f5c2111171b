"""Trains and evaluates a text-guided fusion model (the training CLI).

  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo
  textfusion-train --config configs/demo.py --workdir DIR --config.train.num_steps=50

Parses --config (an ml_collections config file; any field can be overridden
as --config.a.b=value) and --workdir, joins a multi-process job if asked,
then calls `train_loop.train_and_evaluate(config, workdir)`.

Multi-host (every process runs the same command; `distributed.py`):

  python train.py --config C --workdir W --coordinator_address HOST0:1234 \
      --num_processes 2 --process_id {0|1}
  python train.py --config C --workdir W --multihost   # TPU pods, SLURM, MPI

The workdir must be on storage every process sees (a shared filesystem, or
a bucket mounted as one, e.g. with gcsfuse; gs:// URLs are refused): Orbax
writes each checkpoint with all processes.
"""

from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from textfusion_jax import distributed
from textfusion_jax import errors
from textfusion_jax import train_loop

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, logs and eval.")
_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Training config file.",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0 in a multi-process job (with --num_processes "
    "and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0..num_processes-1.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join the job JAX detects from the environment "
    "(Cloud TPU pods, SLURM, Open MPI).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for the coordinator and the other processes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv  # (stray words: refused by errors.run_cli)
  absl_logging.set_verbosity(absl_logging.WARNING)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, auto=_MULTIHOST.value,
                         timeout_s=_INIT_TIMEOUT.value)
  train_loop.train_and_evaluate(_config(), _WORKDIR.value)


def _config():
  # ml_collections defers a config file's load error to the first attribute
  # access (a traceback naming 'config_config'); name the file instead.
  config = _CONFIG.value
  try:
    config.get("train")
  except OSError as error:
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    raise errors.UserError(f"--config {flags.FLAGS['config'].config_filename}"
                           f": cannot load it ({lines[-1]})") from None
  return config


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
