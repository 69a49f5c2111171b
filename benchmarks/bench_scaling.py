"""Scaling figures for docs/scaling.md: weak scaling and FSDP memory.

  python benchmarks/bench_scaling.py [--out runs/scaling.md] [--quick]

Each part runs in a child process whose fake CPU device count is fixed by
XLA_FLAGS before JAX starts:

1. weak scaling: the small preset, 64x64 crops, 2 images per device, data
   parallel over 1, 2, 4 and 8 devices: ms per step and images/s (these
   devices share this machine's CPU cores, so the curve shows the code's
   overhead, not a cluster's speed-up);
2. memory: the train step of the base and large presets at 256x256, bfloat16,
   one image per device, compiled on 8 devices with mesh data=8/f x fsdp=f
   for f = 1, 2, 4, 8; per device, from `compiled.memory_analysis()`: the
   arguments (parameter and optimizer-state shards plus the batch shard) and
   XLA's temporaries (activations; CPU-compiled, so only indicative of a
   GPU's), beside the analytic state size 12 bytes/param / f (float32
   params, Adam mu and nu).

--quick runs only the base preset at f = 1 and 8 (for a smoke test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from input_pipeline import files  # pylint: disable=wrong-import-position
from textfusion_jax import errors  # pylint: disable=wrong-import-position

_OUT = flags.DEFINE_string("out", None, "Also write the tables here.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer variants (smoke test).")
_WORKER = flags.DEFINE_enum("worker", None, ["weak", "memory"],
                            "Internal: run one part in this process.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Internal: device count.")

STATE_BYTES_PER_PARAM = 12  # float32 params + Adam mu + nu


def _config(preset: str, per_device_batch: int, crop: int, dtype: str):
  # pylint: disable=g-import-not-at-top
  import jax
  from configs import default
  from textfusion_jax import model as model_lib
  config = default.get_config()
  config.model = model_lib.model_config(preset)
  config.model.dtype = dtype
  config.model.text_dim = 512
  config.train.batch_size = per_device_batch * jax.device_count()
  config.data.crop_size = crop
  return config


def _compile(config, mesh_shape):
  # pylint: disable=g-import-not-at-top
  import jax
  from bench_common import random_batch
  from textfusion_jax import sharding as sharding_lib
  from textfusion_jax import train_step
  mesh = sharding_lib.make_mesh(mesh_shape)
  trainer = train_step.ShardedTrainer(config, mesh)
  with jax.set_mesh(mesh):
    state = trainer.abstract_state()
    batch = random_batch(config.train.batch_size, config.data.crop_size,
                         config.model.text_dim)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=trainer.batch_sharding)
             for k, v in batch.items()}
    rng = jax.random.key(1)
    return trainer, mesh, trainer.jitted_train_step.lower(
        state, batch, rng, None).compile()


def weak_worker() -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  from bench_common import random_batch, time_calls
  from textfusion_jax import sharding as sharding_lib
  from textfusion_jax import train_step
  config = _config("small", 2, 64, "float32")
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  trainer = train_step.ShardedTrainer(config, mesh)
  with jax.set_mesh(mesh):
    holder = {"state": trainer.init_state(jax.random.key(0))}
    batch = sharding_lib.global_batch(
        random_batch(config.train.batch_size, 64, 512),
        trainer.batch_sharding)
    rng = jax.random.key(1)

    def step():
      holder["state"], metrics = trainer.jitted_train_step(
          holder["state"], batch, rng, None)
      return metrics.loss.compute()

    best, median = time_calls(step, 5)
  return {"devices": jax.device_count(),
          "batch": config.train.batch_size, "best_s": best,
          "median_s": median}


def memory_worker(quick: bool) -> list[dict]:
  # pylint: disable=g-import-not-at-top
  import jax
  from flax import nnx
  from bench_common import cost_of
  from textfusion_jax import model as model_lib
  rows = []
  presets = ("base",) if quick else ("base", "large")
  for preset in presets:
    config = _config(preset, 1, 256, "bfloat16")
    params = model_lib.count_params(nnx.eval_shape(
        lambda c=config.model: model_lib.FusionNet(c, rngs=nnx.Rngs(0))))
    for fsdp in ((1, 8) if quick else (1, 2, 4, 8)):
      start = time.perf_counter()
      _, _, compiled = _compile(config, {"data": jax.device_count() // fsdp,
                                         "fsdp": fsdp})
      memory = compiled.memory_analysis()
      rows.append({"preset": preset, "params": params, "fsdp": fsdp,
                   "flops": cost_of(compiled)[0],
                   "argument_bytes": memory.argument_size_in_bytes,
                   "temp_bytes": memory.temp_size_in_bytes,
                   "compile_s": time.perf_counter() - start})
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def _child(worker: str, devices: int, *extra: str) -> object:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run(
      [sys.executable, __file__, f"--worker={worker}", f"--devices={devices}",
       *extra], env=env, capture_output=True, text=True, timeout=3600,
      check=False)
  if out.returncode:
    raise SystemExit(f"{worker} on {devices} devices failed:\n"
                     f"{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv) -> None:
  del argv
  if _WORKER.value == "weak":
    print(json.dumps(weak_worker()))
    return
  if _WORKER.value == "memory":
    print(json.dumps(memory_worker(_QUICK.value)))
    return
  files.check_writable({"--out": _OUT.value})
  lines = [f"CPU: {os.cpu_count()} cores; fake devices "
           "(--xla_force_host_platform_device_count) share them.", "",
           "Weak scaling (small preset, 64x64, 2 images per device, float32, "
           "mesh data=N):", "",
           "| devices | global batch | ms/step (median) | images/s | "
           "efficiency vs 1 device |", "|---|---|---|---|---|"]
  weak = [_child("weak", n) for n in ((1, 8) if _QUICK.value else
                                      (1, 2, 4, 8))]
  base_rate = weak[0]["batch"] / weak[0]["median_s"]
  for row in weak:
    rate = row["batch"] / row["median_s"]
    lines.append(f"| {row['devices']} | {row['batch']} | "
                 f"{1e3 * row['median_s']:.0f} | {rate:.1f} | "
                 f"{rate / base_rate / row['devices']:.2f} |")
  lines += ["", "Memory per device of the train step (256x256, bfloat16, 1 "
            "image per device, 8 devices, mesh data=8/f x fsdp=f; "
            "compiled.memory_analysis() on CPU):", "",
            "| preset | params | fsdp | state 12 B/param / f (GB) | "
            "arguments (GB) | temporaries (GB) | GFLOP per device-step |",
            "|---|---|---|---|---|---|---|"]
  for row in _child("memory", 8, *(["--quick"] if _QUICK.value else [])):
    lines.append(
        f"| {row['preset']} | {row['params'] / 1e6:.1f} M | {row['fsdp']} | "
        f"{STATE_BYTES_PER_PARAM * row['params'] / row['fsdp'] / 1e9:.3f} | "
        f"{row['argument_bytes'] / 1e9:.3f} | {row['temp_bytes'] / 1e9:.3f} | "
        f"{row['flops'] / 1e9:.1f} |")
  text = "\n".join(lines)
  print(text)
  if _OUT.value:
    files.write_text_atomic(_OUT.value, text + "\n")


if __name__ == "__main__":
  errors.run_cli(main)
