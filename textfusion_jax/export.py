"""Exports a trained workdir as a self-contained, verifiable model bundle.

  python -m textfusion_jax.export --workdir runs/real_pairs --out DIR \
      [--step N] [--report REPORT.md]

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from textfusion_jax import bundle
from textfusion_jax import checkpointing
from textfusion_jax import errors
from textfusion_jax import evaluation
from textfusion_jax import fusion_baselines
from textfusion_jax import metrics
from textfusion_jax import run_record
from textfusion_jax import text_setup

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_REPORT = flags.DEFINE_string("report", None,
                              "Markdown file appended to MODEL_CARD.md.")

LIMITS = """\
- The text tower is the one named under "Text encoder". With `tiny-random` it
  is a small, randomly initialised CLIP (64-d, 2 layers) trained on nothing:
  real CLIP weights cannot be downloaded where this model was trained. The
  fusion network's text MLPs learned what they could from that tower's
  embeddings of the training captions; paraphrases and unseen words carry
  little meaning for it. Retrain with `--config.text.encoder=DIR` (a local
  Hugging Face CLIP directory) for real language understanding.
- Trained on CPU, for the steps and wall time above, on a few dozen real
  pairs: it is a small model, not a converged one.
- Images are fused on their luma; the visible image's chroma is re-attached
  (colour output). Infrared and visible images must be registered and equal
  in size.
"""


def _params_at(workdir: str, step: int | None) -> tuple[Any, int, Any]:
  from textfusion_jax import fuse  # pylint: disable=g-import-not-at-top
  fuser = fuse.Fuser.from_workdir(workdir, step, with_text_encoder=False)
  return jax.device_get(fuser.params), fuser.step, fuser.config


def _eval_table(workdir: Path, step: int) -> str:
  path = workdir / "eval" / str(step) / "metrics.json"
  if not path.is_file():
    return "_No evaluation was run at this step._\n"
  result = json.loads(path.read_text())
  rows = {m: result[m] for m in evaluation.METHODS if m in result}
  return (f"{result.get('num_images', '?')} held-out images, scored with the "
          "reference evaluator's conventions (`textfusion_jax.metrics`); "
          "trivial rows computed from the sources "
          "(`textfusion_jax.fusion_baselines`); mean_rank over EN, SD, SF, "
          "MI, SCD, VIF, Qabf, SSIM:\n\n" +
          fusion_baselines.markdown_table(rows, metrics.METRIC_NAMES) + "\n")


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def model_card(config: ml_collections.ConfigDict, info: dict[str, Any],
               step: int, eval_table: str, report: str = "") -> str:
  """MODEL_CARD.md text: deterministic for a given run and step."""
  data = info.get("data", {})
  segments = info.get("segments", [])
  commands = "\n".join(
      f"    python {' '.join(s['argv'])}   # steps {s['start_step']}-"
      f"{s['end_step']}, commit {s['commit']}" for s in segments) or (
          "    (not recorded: run_info.json missing)")
  roots = "".join(f"  - `{r}`\n" for r in data.get("roots", []))
  eval_dirs = config.data.get("eval_dir", "") or config.data.get(
      "eval_split", "")
  m = config.model
  return f"""# textfusion-jax fusion model, step {step}

Text-guided infrared-visible image fusion (JAX/Flax NNX): FusionNet with dim
{m.dim}, blocks {tuple(m.num_blocks)}, input stride {m.get('input_stride', 1)}, output rule
`{m.output}` (see `textfusion_jax/model.py`). Fuse a pair:

    python -m textfusion_jax.fuse --checkpoint THIS_DIR --ir IR.png --vis VIS.png \\
        --text "a short description of the scene" --out fused.png

The bundle is checked against manifest.json before anything is loaded.

## Training

- Data: source `{data.get('source', config.data.source)}`, {data.get('files', 0)} files, sha256 of the
  file list and contents `{data.get('sha256', 'unknown')}`
{roots}- Held out for evaluation: `{eval_dirs}`
- Command(s), run from the repository root:

{commands}

- Seed {info.get('seed', config.seed)}, {step} steps, batch {config.train.batch_size}, {config.data.crop_size}x{config.data.crop_size} crops,
  training wall time {_hms(run_record.total_train_seconds(info))}
  ({jax.default_backend()} at export; see the run's metrics.jsonl)
- Text encoder: `{config.text.encoder}` (saved in `text_encoder/`), text_dim {config.model.text_dim}

## Evaluation at step {step}

{eval_table}
{report}
## Limits

{LIMITS}"""


def export(workdir: str, out: str, step: int | None = None,
           report_path: str | None = None) -> Path:
  """Writes the bundle; returns its path."""
  report = ""
  if report_path:
    try:
      report = Path(report_path).read_text()
    except OSError as error:
      raise errors.UserError(f"--report {report_path}: {error.strerror}"
                             ) from None
  params, step, config = _params_at(workdir, step)
  info = run_record.load(workdir)
  card = model_card(config, info, step, _eval_table(Path(workdir), step),
                    report)
  encoder = text_setup.build_text_encoder(config.text)
  bundle_config = ml_collections.ConfigDict(config.to_dict())
  bundle_config.text.encoder = bundle.TEXT_ENCODER
  bundle_config.text.embeddings_dir = ""
  return bundle.write(out, params=params, step=step, config=bundle_config,
                      text_encoder_writer=encoder.save_pretrained,
                      model_card=card)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  for name, value in (("--workdir", _WORKDIR.value), ("--out", _OUT.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  path = export(_WORKDIR.value, _OUT.value, _STEP.value, _REPORT.value)
  manifest = json.loads((path / bundle.MANIFEST).read_text())
  size = sum(f["size"] for f in manifest["files"].values())
  print(f"wrote {path}: {len(manifest['files'])} files, "
        f"{size / 2**20:.1f} MiB")


def run() -> None:
  def guarded(argv):
    with errors.one_line_errors():
      main(argv)
  errors.run_absl_app(guarded, sys.argv)


if __name__ == "__main__":
  run()
