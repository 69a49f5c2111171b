"""CPU/GPU inference speed of `fuse`: ms per pair and compiled shapes.

  python benchmarks/bench_fuse.py [--checkpoint pretrained/textfusion-small]
      [--rounds 5]

With the given model (a bundle or workdir), in one process:

1. a 768x576 pair (a synthetic scene, the size of the issue's TNO target):
   the whole image in its bucket (the fuse command's path) against the
   512-pixel tiles of the old default (4 tiles for one image), best and
   median of --rounds after compilation;
2. the bucket plan for every size in ../shared/data/ivf_samples (LLVIP,
   MSRS, RoadScene, TNO): how many shapes get compiled for that mix of sizes,
   and how much padding they cost.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from textfusion_jax import inference

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ivf_samples"
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", str(Path(__file__).resolve().parents[1] / "pretrained" /
                      "textfusion-small"), "Model bundle or training workdir.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per path.",
                               lower_bound=1)


def scene(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:height, :width]
  base = 0.45 + 0.25 * np.sin(x / 23.0) * np.cos(y / 17.0)
  vis = np.clip(base[..., None] * [1.0, 0.9, 0.8] +
                rng.normal(0, 0.03, (height, width, 3)), 0, 1)
  ir = np.clip(base[..., None] * 0.6 + rng.normal(0, 0.03, (height, width, 1)),
               0, 1)
  ir[height // 3:height // 2, width // 2:width // 2 + 40] = 0.95
  return vis.astype(np.float32), ir.astype(np.float32)


def timed(fn, rounds: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, times


def main(argv):
  del argv
  fuser = inference.Fuser.load(_CHECKPOINT.value)
  vis, ir = scene(576, 768)
  emb = fuser.encoder.encode(["a warm person beside a road"])[0]
  shape = inference.bucket_shapes({"x": (576, 768)}, 1536)["x"]
  paths = {
      f"whole image, bucket {shape[1]}x{shape[0]} (fuse default)":
          lambda: fuser.fuse(vis, ir, emb, pad_to=shape),
      "512x512 tiles, overlap 32 (old default)":
          lambda: fuser.fuse(vis, ir, emb, tile=512, overlap=32),
  }
  print(f"model {_CHECKPOINT.value} (step {fuser.step}); 768x576 pair; "
        f"{jax.device_count()} {jax.default_backend()} device(s)\n")
  print("| path | first call (compile) s | ms/pair best | ms/pair median |")
  print("|---|---|---|---|")
  best = {}
  for name, fn in paths.items():
    first, times = timed(fn, _ROUNDS.value)
    best[name] = min(times)
    print(f"| {name} | {first:.1f} | {1000 * min(times):.0f} | "
          f"{1000 * statistics.median(times):.0f} |")
  names = list(best)
  print(f"\nwhole image is {best[names[1]] / best[names[0]]:.2f}x faster than "
        "the old tiles")

  if SAMPLES.is_dir():
    from PIL import Image  # pylint: disable=g-import-not-at-top
    sizes = {}
    for path in sorted(SAMPLES.glob("*/vi/*")):
      with Image.open(path) as image:
        sizes[f"{path.parts[-3]}/{path.stem}"] = (image.height, image.width)
    shapes = inference.bucket_shapes(sizes, 1536)
    buckets = {s for s in shapes.values() if s is not None}
    pixels = sum(h * w for h, w in sizes.values())
    padded = sum(shapes[n][0] * shapes[n][1] for n in sizes)
    print(f"\n{len(sizes)} shared sample pairs of {len(set(sizes.values()))} "
          f"distinct sizes -> {len(buckets)} compiled shapes "
          f"({sorted(buckets)}), padding +{100 * (padded / pixels - 1):.0f}% "
          "pixels")


if __name__ == "__main__":
  errors.run_cli(main)
