"""Scores folders of fused images with the 12 fusion metrics.

  python -m textfusion_jax.evaluate --ir DIR --vis DIR --fused DIR \
      [--fused DIR2 ...] [--baselines] [--json OUT] [--csv OUT] [--batch_size 8]
  textfusion-evaluate ...   (the same, once the package is installed)

Images are matched by file stem; --baselines adds the trivial fusions
(copy_vis, copy_ir, rule_mean, rule_max) as rows. Prints a markdown table
with mean ranks and the per-source parts; --json / --csv write everything.
See `textfusion_jax.score_folders` for the conventions. Bad input ends with
one `error:` line listing every problem and exit status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import flags
from absl import logging

from textfusion_jax import errors
from textfusion_jax import score_folders

_IR = flags.DEFINE_string("ir", None, "Folder of infrared images.")
_VIS = flags.DEFINE_string("vis", None, "Folder of visible images.")
_FUSED = flags.DEFINE_multi_string(
    "fused", [], "Folder of fused images (repeat for more methods).")
_BASELINES = flags.DEFINE_bool(
    "baselines", False, "Add rows for copy_vis, copy_ir, rule_mean and "
    "rule_max, computed from --ir and --vis.")
_JSON = flags.DEFINE_string("json", None, "Write results as JSON here.")
_CSV = flags.DEFINE_string("csv", None, "Write results as CSV here.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per device call.",
                                   lower_bound=1)


def main(argv: Sequence[str]) -> None:
  del argv  # (stray words: refused by errors.run_cli)
  for name, value in (("--ir", _IR.value), ("--vis", _VIS.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  logging.set_verbosity(logging.WARNING)  # jax's backend info lines are noise
  optional = lambda value: Path(value) if value else None
  score_folders.score_and_report(
      Path(_IR.value), Path(_VIS.value), [Path(f) for f in _FUSED.value],
      _BASELINES.value, optional(_JSON.value), optional(_CSV.value),
      _BATCH_SIZE.value)


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
