"""Exports a trained workdir as a self-contained, verifiable model bundle.

  python -m textfusion_jax.export --workdir runs/real_pairs --out DIR \
      [--step N] [--report REPORT.md] [--text_encoder DIR]

Writes DIR atomically (see `textfusion_jax.bundle` for the layout):
params.safetensors, config.json, text_encoder/ (the run's CLIP text tower in
Hugging Face format), MODEL_CARD.md and manifest.json. The card is built from
the workdir's run_info.json (command, commit, seed, data fingerprint, wall
time) and the evaluation at the exported step; --report appends a markdown
file (e.g. a comparison table from benchmarks/tno_report.py). Exporting the
same run twice gives byte-identical files.

  python -m textfusion_jax.fuse --checkpoint DIR --ir IR --vis VIS --text ... --out F
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags
from absl import logging

from textfusion_jax import bundle
from textfusion_jax import errors
from textfusion_jax import run_bundle

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_REPORT = flags.DEFINE_string("report", None,
                              "Markdown file appended to MODEL_CARD.md.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the bundle already at --out (once the new "
    "one is complete).")
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder", None, "Where the run's text encoder is now, if it moved "
    "(it must compute the embeddings the run was trained with).")


def main(argv: Sequence[str]) -> None:
  del argv  # (stray words: refused by errors.run_cli)
  logging.set_verbosity(logging.WARNING)
  for name, value in (("--workdir", _WORKDIR.value), ("--out", _OUT.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  path = run_bundle.export_run(_WORKDIR.value, _OUT.value, _STEP.value,
                               _REPORT.value, _TEXT_ENCODER.value,
                               overwrite=_OVERWRITE.value)
  manifest = json.loads((path / bundle.MANIFEST).read_text())
  size = sum(f["size"] for f in manifest["files"].values())
  print(f"wrote {path}: {len(manifest['files'])} files, "
        f"{size / 2**20:.1f} MiB")


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
