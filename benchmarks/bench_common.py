"""Helpers shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def cost_of(compiled: Any) -> tuple[float, float]:
  """(FLOPs, bytes accessed) from XLA's cost analysis of a compiled step."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def model_flops(lowered: Any) -> float:
  """FLOPs of a lowered (not yet compiled) program, 2 per multiply-add: the
  model FLOPs of MFU. A GPU-compiled program's count omits the convolutions
  XLA hands to cuDNN (an H200 step read 1.06 of its 16.2 TFLOP)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def random_batch(batch_size: int, crop: int, text_dim: int
                 ) -> dict[str, np.ndarray]:
  """A training batch of uniform noise images and Gaussian text embeddings."""
  rng = np.random.default_rng(0)
  return {"vis": rng.random((batch_size, crop, crop, 3), np.float32),
          "ir": rng.random((batch_size, crop, crop, 1), np.float32),
          "text_emb": rng.normal(size=(batch_size, text_dim)).astype(
              np.float32)}


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(best, median) seconds of `fn()` (blocked until ready), after one
  warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)
