"""A training run -> a model bundle: parameters, text tower and model card.

The library behind `python -m textfusion_jax.export` (see `bundle` for the
format). Exporting the same run twice gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from input_pipeline import degradations
from input_pipeline import files
from input_pipeline.layouts import DEFAULT_SPLIT
from textfusion_jax import bundle
from textfusion_jax import errors
from textfusion_jax import evaluators
from textfusion_jax import fusion_baselines
from textfusion_jax import metrics
from textfusion_jax import run_record
from textfusion_jax.text import encoder as text_encoder

TINY_TEXT_LIMIT = """\
- The text tower is a small, randomly initialised CLIP (64-d, 2 layers)
  trained on nothing: real CLIP weights could not be downloaded where this
  model was trained. The fusion network's text MLPs learned what they could
  from that tower's embeddings of the training captions; paraphrases and
  unseen words carry little meaning for it. Retrain with
  `--config.text.encoder=DIR` (a local Hugging Face CLIP directory) for real
  language understanding.
"""
LIMITS = """\
- Trained for the steps and on the data above; check the evaluation before
  relying on it for other kinds of scenes.
- Infrared and visible images must be registered and equal in size.
"""


def _params_at(workdir: str, step: int | None, text_encoder_dir: str | None
               ) -> tuple[Any, int, Any, text_encoder.TextEncoder]:
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  fuser = inference.Fuser.from_workdir(workdir, step,
                                       text_encoder_dir=text_encoder_dir)
  return jax.device_get(fuser.params), fuser.step, fuser.config, fuser.encoder


def _eval_table(workdir: Path, step: int) -> str:
  path = workdir / "eval" / str(step) / "metrics.json"
  if not path.is_file():
    return "_No evaluation was run at this step._\n"
  result = files.read_json_numbers(path)
  rows = {m: result[m] for m in evaluators.METHODS if m in result}
  return (f"{result.get('num_images', '?')} held-out images, scored with the "
          "reference evaluator's conventions (`textfusion_jax.metrics`); "
          "trivial rows computed from the sources "
          "(`textfusion_jax.fusion_baselines`); mean_rank over EN, SD, SF, "
          "MI, SCD, VIF, Qabf, SSIM:\n\n" +
          fusion_baselines.markdown_table(rows, metrics.METRIC_NAMES) + "\n")


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _split_of(data: dict[str, Any]) -> str | None:
  """The training split a data fingerprint records, where it says which
  pairs were read (a mixture's folders are read whole whatever it says)."""
  return data.get("split") if data.get("source") in ("folder", "tfds") else None


def _sliced(source: str, eval_dir: str, eval_split: str) -> str:
  """'` at split `X' (inside the card's backticks) where a folder source's
  eval folders are read at a split, not whole."""
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top
  roots = [r.strip() for r in eval_dir.split(",") if r.strip()]
  if source == "folder" and any(sources.folder_split(root, eval_split) !=
                                DEFAULT_SPLIT for root in roots):
    return f"` at split `{eval_split}"
  return ""


def example_prompt(config: ml_collections.ConfigDict) -> str:
  """The card's `--text`: a condition sentence for a model trained on them
  (content captions are outside its grammar and make `fuse` warn)."""
  if config.data.get("degradations", {}).get("enabled"):
    return degradations.condition_sentence((3, 1, 0))
  return "a short description of the scene"


def model_card(config: ml_collections.ConfigDict, info: dict[str, Any],
               step: int, eval_table: str, report: str = "") -> str:
  """MODEL_CARD.md text: deterministic for a given run and step."""
  data = info.get("data", {})
  segments = info.get("segments", [])
  def steps(s: dict[str, Any]) -> str:
    if s.get("interrupted"):
      return (f"steps {s['start_step']}-{s['end_step']} (killed: time not "
              "recorded)" if run_record.trained(s)
              else "killed before its first checkpoint")
    if s.get("running"):
      return "still running, or killed"
    return (f"steps {s['start_step']}-{s['end_step']}" if run_record.trained(s)
            else "evaluation only")

  commands = "\n".join(
      f"    python {' '.join(s['argv'])}   # {steps(s)}, commit {s['commit']}"
      for s in segments) or "    (not recorded: run_info.json missing)"
  changes = "".join(
      f"- Data from step {s['start_step']}: source "
      f"`{s['data'].get('source')}`, {s['data'].get('files', 0)} files, "
      f"sha256 `{s['data'].get('sha256', 'unknown')}`" +
      (f", split `{_split_of(s['data'])}`" if _split_of(s["data"]) else "") +
      "".join(f"\n  - `{r}`" for r in s["data"].get("roots", [])) + "\n"
      for s in segments if "data" in s and run_record.trained(s))
  roots = "".join(f"  - `{r}`\n" for r in data.get("roots", []))
  eval_dirs = config.data.get("eval_dir", "") or config.data.get(
      "eval_split", "")
  eval_dirs += _sliced(config.data.source, config.data.get("eval_dir", ""),
                       config.data.get("eval_split", ""))
  at_split = f" at split `{_split_of(data)}`" if _split_of(data) else ""
  m = config.model
  return f"""# textfusion-jax fusion model, step {step}

Text-guided infrared-visible image fusion (JAX/Flax NNX): FusionNet with dim
{m.dim}, blocks {tuple(m.num_blocks)}, input stride {m.get('input_stride', 1)}, output rule
`{m.output}` (see `textfusion_jax/model.py`). Fuse a pair:

    python -m textfusion_jax.fuse --checkpoint THIS_DIR --ir IR.png --vis VIS.png \\
        --text "{example_prompt(config)}" --out fused.png

The bundle is checked against manifest.json before anything is loaded.

## Training

- Data: source `{data.get('source', config.data.source)}`{at_split}, {data.get('files', 0)} files, sha256 of the
  file list and contents `{data.get('sha256', 'unknown')}`
{roots}{changes}- Held out for evaluation: `{eval_dirs}`
- Command(s), run from the repository root:

{commands}

- Seed {info.get('seed', config.seed)}, {step} steps, batch {config.train.batch_size}, {config.data.crop_size}x{config.data.crop_size} crops,
  training loop wall time {_hms(run_record.total_train_seconds(info))} (see the run's
  metrics.jsonl for steps/s)
- Text encoder: `{config.text.encoder}` (saved in `text_encoder/`), text_dim {config.model.text_dim}

## Evaluation at step {step}

{eval_table}
{report}
## Limits

{TINY_TEXT_LIMIT if config.text.encoder == text_encoder.TINY_RANDOM else ""}{LIMITS}"""


def export_run(workdir: str, out: str, step: int | None = None,
               report_path: str | None = None,
               text_encoder_dir: str | None = None,
               overwrite: bool = False) -> Path:
  """Writes the bundle; returns its path. `text_encoder_dir` replaces the
  run's recorded text encoder (`inference.run_text_encoder`); `overwrite`
  lets it replace an existing bundle at `out`."""
  if bundle.is_bundle(workdir):
    raise errors.UserError(f"--workdir {workdir} is already a model bundle "
                           "(copy it to share it); export takes a training "
                           "workdir")
  bundle.check_out(out, overwrite)
  report = ""
  if report_path:
    try:
      report = Path(report_path).read_text(encoding="utf-8")
    except OSError as error:
      raise errors.UserError(f"--report {report_path}: {error.strerror}"
                             ) from None
    except UnicodeDecodeError:
      raise errors.UserError(f"--report {report_path}: not UTF-8 text (a "
                             "markdown file is expected)") from None
  params, step, config, encoder = _params_at(workdir, step, text_encoder_dir)
  card = model_card(config, run_record.load(workdir), step,
                    _eval_table(Path(workdir), step), report)
  bundle_config = ml_collections.ConfigDict(config.to_dict())
  bundle_config.text.encoder = bundle.TEXT_ENCODER
  bundle_config.text.embeddings_dir = ""
  return bundle.write(out, params=params, step=step, config=bundle_config,
                      text_encoder_writer=encoder.save_pretrained,
                      model_card=card, overwrite=overwrite)
