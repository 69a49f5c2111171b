"""Scalars and images to TensorBoard event files plus a metrics JSONL.

clu.metric_writers needs TensorFlow; tensorboardX writes the same event
format without it. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
  """Writes to `<workdir>/tensorboard/` and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | Path):
    self._enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
      self._jsonl = open(Path(workdir) / "metrics.jsonl", "a",
                         encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for key, value in clean.items():
      self._tb.add_scalar(key, value, step)
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else str(v))
                   for k, v in clean.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

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
