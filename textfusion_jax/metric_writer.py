"""Scalars and images to TensorBoard event files plus a metrics JSONL.

clu.metric_writers needs TensorFlow; tensorboardX writes the same event
format without it. Only process 0 writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from input_pipeline import files


class MetricWriter:
  """Writes to `<workdir>/tensorboard/` and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | Path, start_step: int = 0, *,
               replace_evaluation: bool = False):
    """start_step: the step a run resumes from. Lines a crashed run logged
    after it (steps it will log again) are dropped from metrics.jsonl, and
    with `replace_evaluation` (an evaluation-only run) its evaluation at
    start_step too, which this run writes anew. TensorBoard is told to hide
    the crashed run's events after start_step (a purge marker)."""
    self._enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)
      self._jsonl_path = Path(workdir) / "metrics.jsonl"
      _drop_after(self._jsonl_path, start_step, replace_evaluation)
      self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for key, value in clean.items():
      self._tb.add_scalar(key, value, step)
    record = {"step": int(step)}
    record.update(clean)
    try:
      self._jsonl.write(files.json_text(record) + "\n")
      self._jsonl.flush()
    except OSError as error:  # a full disk: name the file
      if error.filename:
        raise
      raise OSError(error.errno, error.strerror,
                    str(self._jsonl_path)) from error

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 (N, H, W, C)."""
    if not self._enabled:
      return
    for key, batch in images.items():
      self._tb.add_images(key, np.asarray(batch), step, dataformats="NHWC")

  def flush(self) -> None:
    if self._enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def _drop_after(path: Path, step: int, evaluation_too: bool = False) -> None:
  """Rewrites the JSONL at `path` (atomically) without records past `step`
  (and, `evaluation_too`, without its evaluation at `step`)."""
  if not path.exists():
    return
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

  def keep(line: str) -> bool:
    try:
      record = json.loads(line)
      at = int(record["step"])
    except (ValueError, KeyError, TypeError):
      return False  # a torn last line from a crash
    if evaluation_too and at == step and any(
        k.startswith("eval/") for k in record):
      return False
    return at <= step

  kept = [line for line in lines if keep(line)]
  if len(kept) != len(lines):
    files.write_text_atomic(path, "".join(kept))
