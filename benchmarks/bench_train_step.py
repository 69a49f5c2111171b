"""Cost of one train step: XLA's FLOP and byte counts, and measured time.

  python benchmarks/bench_train_step.py [--config configs/real_pairs.py]
      [--steps 10] [--config.data.crop_size=96 ...]

Compiles the sharded train step of the config's model at its batch size and
crop, prints `compiled.cost_analysis()` (GFLOP and GB of memory traffic per
step), then times `--steps` steps on random data after a warm-up step (best
and median of the per-step times) and the achieved GFLOP/s. Any config field
can be overridden on the command line as in train.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from bench_common import cost_of
from bench_common import random_batch
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs" /
                  "real_pairs.py"), "Training config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  trainer = train_step.ShardedTrainer(config, mesh)
  with jax.set_mesh(mesh):
    state = trainer.init_state(jax.random.key(0))
    batch = sharding_lib.global_batch(
        random_batch(config.train.batch_size, config.data.crop_size,
                     config.model.text_dim), trainer.batch_sharding)
    rng = jax.random.key(1)
    step_fn = trainer.jitted_train_step
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng, None).compile()
    compile_s = time.perf_counter() - start
    flops, bytes_accessed = cost_of(compiled)
    state, metrics = step_fn(state, batch, rng, None)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch, rng, None)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  best, median = min(times), statistics.median(times)
  print(f"model {config.model.dim}-dim, blocks {tuple(config.model.num_blocks)}"
        f", ffn {config.model.ffn}, output {config.model.output}; batch "
        f"{config.train.batch_size} x {config.data.crop_size}^2; "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  print("| GFLOP/step | GB accessed/step | compile s | ms/step best | "
        "ms/step median | GFLOP/s (best) | images/s (best) |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {flops / 1e9:.2f} | {bytes_accessed / 1e9:.2f} | {compile_s:.1f} "
        f"| {1000 * best:.0f} | {1000 * median:.0f} | "
        f"{flops / 1e9 / best:.1f} | "
        f"{config.train.batch_size / best:.1f} |")


if __name__ == "__main__":
  errors.run_cli(main)
