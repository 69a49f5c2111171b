"""All 12 fusion metrics per 640x480 triple: JAX (jitted) vs the numpy oracle.

  python benchmarks/bench_metrics.py [--batch_size 8] [--rounds 5]
      [--gpu_batch_sizes 32,64]

Times `metrics.all_metrics` under jax.jit on one (480, 640) triple and
`metrics.batched_all_metrics` on a batch, against the float64 numpy/scipy
oracle (`metrics_reference`, the cost of the evaluator most papers copy),
all in the same run on the same images: the MSRS triple msrs_1 of the shared
fixtures when present, otherwise synthetic images. Compilation is reported
separately. Runners are timed in interleaved rounds, one sample each per
round (the mean of 5 calls for the JAX runners, one call for numpy); each
one's best round counts (median also shown), so background load on a
shared machine hits them alike. On a GPU it also reports batched throughput
(triples/s) at the --gpu_batch_sizes.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from input_pipeline import image_io
from textfusion_jax import metrics
from textfusion_jax import metrics_reference

FIXTURES = (Path(__file__).resolve().parents[2] / "shared" / "fixtures" /
            "metrics")
HEIGHT, WIDTH = 480, 640


def load_triple() -> tuple[tuple[np.ndarray, ...], str]:
  paths = [FIXTURES / d / "msrs_1.png" for d in ("fused_mean", "ir", "vi")]
  if all(p.is_file() for p in paths):
    return (tuple(image_io.as_grey_u8(image_io.read_image(p)) for p in paths),
            "fixture msrs_1 (fused_mean, ir, vi)")
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:HEIGHT, :WIDTH]
  images = tuple(
      np.clip(128 + 80 * np.sin(x / (9 + k)) * np.cos(y / (7 + k)) +
              rng.normal(0, 12, (HEIGHT, WIDTH)), 0, 255).astype(np.uint8)
      for k in range(3))
  return images, "synthetic"


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def first_call(fn) -> float:
  """Seconds of the first call (trace + compile + run), minus a warm run."""
  total = timed(fn)
  return total - timed(fn)


_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Triples per batched "
                                   "call.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (best is kept).",
                               lower_bound=1)
_GPU_BATCH_SIZES = flags.DEFINE_list(
    "gpu_batch_sizes", ["32", "64"], "Extra batch sizes timed on an "
    "accelerator.")


def main(argv) -> None:
  del argv
  args = types.SimpleNamespace(batch_size=_BATCH_SIZE.value,
                               rounds=_ROUNDS.value,
                               gpu_batch_sizes=_GPU_BATCH_SIZES.value)

  (fused, ir, vis), source = load_triple()
  backend = jax.default_backend()
  print(f"device: {jax.devices()[0].device_kind} ({backend}), "
        f"{os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}, "
        f"jax {jax.__version__}")
  print(f"images: {source}, {fused.shape[1]}x{fused.shape[0]}; "
        f"load average at start {os.getloadavg()[0]:.1f}")

  on_device = [jax.device_put(x) for x in (fused, ir, vis)]
  single = jax.jit(metrics.all_metrics,
                   compiler_options=metrics.COMPILER_OPTIONS)
  run_single = lambda: jax.block_until_ready(single(*on_device))
  batch = [jax.device_put(np.broadcast_to(x, (args.batch_size,) + x.shape))
           for x in (fused, ir, vis)]
  run_batched = lambda: jax.block_until_ready(
      metrics.batched_all_metrics(*batch))
  run_numpy = lambda: metrics_reference.all_metrics(fused, ir, vis)

  print(f"compile: single {first_call(run_single):.2f} s, batched "
        f"(B={args.batch_size}) {first_call(run_batched):.2f} s")

  runners = {"jax single": (run_single, 1),
             f"jax batched B={args.batch_size}": (run_batched, args.batch_size),
             "numpy oracle": (run_numpy, 1)}
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, (fn, per_call) in runners.items():
      # One sample per runner and round (the mean of a few calls for the
      # fast ones), so that best and median are over the same counts.
      repeats = 1 if name == "numpy oracle" else 5
      times[name].append(
          sum(timed(fn) for _ in range(repeats)) / repeats / per_call)
  best = {name: min(t) for name, t in times.items()}
  for name, t in times.items():
    print(f"{name:22s} best round {1e3 * best[name]:8.1f} ms/triple   "
          f"median round {1e3 * statistics.median(t):8.1f} ms/triple")
  numpy_best = best["numpy oracle"]
  print(f"speedup vs numpy (best rounds): single "
        f"{numpy_best / best['jax single']:.1f}x, batched "
        f"{numpy_best / best[f'jax batched B={args.batch_size}']:.1f}x")
  print(f"load average at end {os.getloadavg()[0]:.1f}")

  if backend == "gpu":
    for size in (int(s) for s in args.gpu_batch_sizes):
      data = [jax.device_put(np.broadcast_to(x, (size,) + x.shape))
              for x in (fused, ir, vis)]
      run = lambda d=data: jax.block_until_ready(
          metrics.batched_all_metrics(*d))
      compile_s = first_call(run)
      seconds = min(timed(run) for _ in range(10))
      print(f"gpu batched B={size}: {size / seconds:8.1f} triples/s "
            f"({1e3 * seconds / size:.2f} ms/triple, "
            f"compile {compile_s:.1f} s)")


if __name__ == "__main__":
  errors.run_cli(main)
