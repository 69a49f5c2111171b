"""Everything worth timing on an accelerator, in one short run, as one table.

  python benchmarks/accelerator_suite.py            # one GPU: ~10 minutes
  # ... or in two calls, under a 10-minute command limit (H200: ~2.5 + ~7.5):
  python benchmarks/accelerator_suite.py --parts=inference,metrics,text
  python benchmarks/accelerator_suite.py --parts=train
  python benchmarks/accelerator_suite.py --smoke    # CPU, tiny preset: about 2 min
  [--out RESULTS.md] [--peak_tflops 989] [--parts=train]
  [--train_batch_sizes=8,32:remat] [--train_repeats=20]

On the GPU machine pipe its output through nothing that buffers it (or
`grep --line-buffered`): a run stopped at its limit keeps only what was
printed. On an H200 each training batch size spent ~70 s initialising the
state, ~2 minutes compiling and ~23 s in its first step (cause not measured);
the other parts together take ~2.5 minutes.

Measures, on the first device, with random weights and data (speed does not
depend on them):

1. training: the base preset (Text-IF's sizes) at 256x256 in bfloat16,
   batch 8, and batch 32 with `model.remat` (without it the step would hold
   ~4 x 26.9 GB of temporaries, more than an 80 GB card): ms per step,
   images/s, the compiled program's temporary memory, and MFU = model FLOPs
   per second over the device's peak dense bf16 rate. Model FLOPs are XLA's
   count of the lowered step without remat, with XLA's attention
   (`bench_common.model_flops`), 2 per multiply-add, as Text-IF's torch
   count;
2. inference: 480x640 and 1024x1280, batch 1, bfloat16, attention through
   cuDNN's fused kernel on GPUs: ms per image and the device's peak memory;
3. the 12 fusion metrics (`metrics.batched_all_metrics`) on 640x480 triples
   in batches: triples/s;
4. the CLIP ViT-B/32 text tower (random weights, HF format): captions/s of
   our Flax encoder against transformers' PyTorch model on the same device.

Text-IF's figures on one H100 (../shared/ANCHORS.md: PyTorch 2.11, bf16
autocast) are printed beside ours. `--smoke` shrinks every part (tiny
preset, small images, few repeats; training batch 2 with remat unless
--train_batch_sizes is given) so the script itself is tested on CPU.

Runs on the GPU machine's stack (Python 3.12, jax 0.11.2 + CUDA, flax 0.12.10,
torch 2.11) as well as on the pinned one. It needs neither grain nor
TensorFlow; ml_collections and clu are missing there and travel as wheels
(`--print_wheels` prints the commands).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from input_pipeline import files
from textfusion_jax import errors

_SMOKE = flags.DEFINE_bool("smoke", False, "CPU-sized run of every part.")
_OUT = flags.DEFINE_string("out", None, "Also write the table here.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense bf16 TFLOP/s of "
                           "the device (default: looked up by device kind).")
_TRAIN_BATCHES = flags.DEFINE_list(
    "train_batch_sizes", ["8", "32:remat"], "Batch sizes the training part "
    "times, each compiling its own step; ':remat' sets config.model.remat "
    "(on an H200 the batch-8 step held 26.9 GB of temporaries: batch 32 "
    "without remat would not fit an 80 GB card).")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 20, "Timed training "
                                      "steps per batch size.")
_PARTS = flags.DEFINE_list("parts", ["inference", "metrics", "text", "train"],
                           "Parts to run, in this order (e.g. --parts=train "
                           "to measure only training).")
_PRINT_WHEELS = flags.DEFINE_bool("print_wheels", False, "Print how to carry "
                                  "the missing packages, then exit.")

# Wheels the GPU machine lacks (pure Python); their other needs are there.
WHEELS = ("ml_collections==1.1.0", "clu==0.0.12")
# Peak dense bf16 TFLOP/s by device kind (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0,
                    "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
                    "TPU v6 lite": 918.0, "TPU v6e": 918.0}
# Text-IF on one H100 80GB, bf16 autocast (../shared/ANCHORS.md).
ANCHORS = {"train b8": "25.9 img/s", "infer 480x640": "47.7 ms",
           "infer 1024x1280": "229 ms (6.9 GB peak)"}


def print_wheels() -> None:
  names = " ".join(WHEELS)
  print("echo /.whl/ >> .git/info/exclude\n"
        "python3 -m pip download --no-deps --only-binary=:all: "
        "--python-version 3.12 --implementation cp --platform "
        f"manylinux_2_17_x86_64 -d .whl {names}\n"
        "# then, in the device command (carry: .whl):\n"
        "python3 -m pip install -q --no-index --no-deps --target /tmp/site "
        ".whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH")


def check_imports() -> None:
  missing = []
  for module in ("ml_collections", "clu", "optax", "flax", "transformers"):
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise SystemExit(f"missing {', '.join(missing)}; carry the wheels "
                     f"{', '.join(WHEELS)} (--print_wheels shows how)")


def peak_tflops(device: jax.Device) -> float | None:
  if _PEAK.value:
    return _PEAK.value
  matches = [v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind]
  return matches[0] if matches else None


def peak_memory_gb(device: jax.Device) -> float | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 1e9


def model_config(smoke: bool, on_gpu: bool):
  # pylint: disable=g-import-not-at-top
  from textfusion_jax import model as model_lib
  config = model_lib.model_config("tiny" if smoke else "base")
  config.dtype = "bfloat16"
  config.text_dim = 512  # CLIP ViT-B/32
  config.attention_impl = "cudnn" if on_gpu else None
  return config


def train_rows(smoke: bool, on_gpu: bool, peak: float | None) -> list[tuple]:
  # pylint: disable=g-import-not-at-top
  from bench_common import model_flops, random_batch, time_calls
  from configs import default
  from textfusion_jax import sharding as sharding_lib
  from textfusion_jax import train_step
  rows = []
  crop = 64 if smoke else 256
  for spec in (("2:remat",) if smoke and not _TRAIN_BATCHES.present
               else _TRAIN_BATCHES.value):
    size, _, option = spec.partition(":")
    if not size.isdigit() or option not in ("", "remat"):
      raise errors.UserError(f"--train_batch_sizes: {spec!r} is not SIZE or "
                             "SIZE:remat")
    batch_size = int(size)
    config = default.get_config()
    config.model = model_config(smoke, on_gpu)
    config.model.remat = option == "remat"
    config.train.batch_size, config.data.crop_size = batch_size, crop
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    trainer = train_step.ShardedTrainer(config, mesh)
    # Model FLOPs: the step without remat (its recomputation is not model
    # work) and with XLA's attention (a cuDNN custom call counts as 0).
    plain = config.copy_and_resolve_references()
    plain.model.remat, plain.model.attention_impl = False, None
    plain_trainer = (trainer if plain.to_json() == config.to_json() else
                     train_step.ShardedTrainer(plain, mesh))
    with jax.set_mesh(mesh):
      init_start = time.perf_counter()
      state = jax.block_until_ready(trainer.init_state(jax.random.key(0)))
      print(f"  train batch {batch_size}: state initialised in "
            f"{time.perf_counter() - init_start:.0f} s", flush=True)
      batch = sharding_lib.global_batch(
          random_batch(batch_size, crop, 512), trainer.batch_sharding)
      rng = jax.random.key(1)
      compile_start = time.perf_counter()
      lowered = trainer.jitted_train_step.lower(state, batch, rng, None)
      compiled = lowered.compile()
      memory = compiled.memory_analysis()
      temp_gb = (memory.temp_size_in_bytes / 1e9 if memory is not None
                 else float("nan"))
      print(f"  train batch {batch_size}{' (remat)' * config.model.remat}: "
            f"compiled in {time.perf_counter() - compile_start:.0f} s; "
            f"{temp_gb:.1f} GB of temporaries", flush=True)
      flops = model_flops(
          lowered if plain_trainer is trainer else
          plain_trainer.jitted_train_step.lower(state, batch, rng, None))
      holder = {"state": state}

      def step():
        holder["state"], metrics = compiled(holder["state"], batch, rng, None)
        return metrics.loss.compute()

      first_start = time.perf_counter()
      jax.block_until_ready(step())
      print(f"  train batch {batch_size}: first step "
            f"{time.perf_counter() - first_start:.1f} s", flush=True)
      best, median = time_calls(step, 2 if smoke else _TRAIN_REPEATS.value)
    mfu = (f"{100 * flops / median / (peak * 1e12):.1f} %" if peak else "n/a")
    anchor = ANCHORS["train b8"] if batch_size == 8 else ""
    rows.append(row := (f"train {crop}x{crop}, batch {batch_size}, bf16"
                 f"{', remat' * config.model.remat}",
                 f"{1e3 * median:.1f} ms/step (best {1e3 * best:.1f}); "
                 f"{batch_size / median:.1f} img/s; {flops / 1e9:.1f} "
                 f"model GFLOP/step; MFU {mfu}; {temp_gb:.1f} GB "
                 "temporaries", anchor))
    print(f"  {row[0]}: {row[1]}", flush=True)  # before the next compile
  return rows


def inference_rows(smoke: bool, on_gpu: bool) -> list[tuple]:
  # pylint: disable=g-import-not-at-top
  from bench_common import time_calls
  from flax import nnx
  from textfusion_jax import model as model_lib
  from textfusion_jax import train_step
  rows = []
  config = model_config(smoke, on_gpu)
  model = model_lib.build(config, jax.random.key(0))
  graphdef = nnx.graphdef(model)
  params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                          jax.devices()[0])
  apply = jax.jit(lambda p, v, i, t: train_step.apply(graphdef, p, v, i, t))
  sizes = ((96, 128),) if smoke else ((480, 640), (1024, 1280))
  rng = np.random.default_rng(0)
  for height, width in sizes:
    vis = jnp.asarray(rng.random((1, height, width, 3), np.float32))
    ir = jnp.asarray(rng.random((1, height, width, 1), np.float32))
    text = jnp.asarray(rng.normal(size=(1, 512)).astype(np.float32))
    best, median = time_calls(lambda: apply(params, vis, ir, text),
                              2 if smoke else 10)
    memory = peak_memory_gb(jax.devices()[0])
    compiled = apply.lower(params, vis, ir, text).compile().memory_analysis()
    program_gb = ((compiled.temp_size_in_bytes +
                   compiled.argument_size_in_bytes +
                   compiled.output_size_in_bytes) / 1e9
                  if compiled is not None else float("nan"))
    peak_text = (f"device peak so far {memory:.2f} GB" if memory is not None
                 else "device peak n/a")
    rows.append((f"inference {height}x{width}, batch 1, bf16"
                 f"{', cuDNN attention' if on_gpu else ''}",
                 f"{1e3 * median:.1f} ms (best {1e3 * best:.1f}); program "
                 f"{program_gb:.2f} GB (args + temp + out); {peak_text}",
                 ANCHORS.get(f"infer {height}x{width}", "")))
  return rows


def metric_rows(smoke: bool) -> list[tuple]:
  # pylint: disable=g-import-not-at-top
  from bench_common import time_calls
  from textfusion_jax import metrics
  batch = 2 if smoke else 32
  height, width = (120, 160) if smoke else (480, 640)
  rng = np.random.default_rng(0)
  triple = [jnp.asarray(rng.integers(0, 256, (batch, height, width),
                                     dtype=np.uint8)) for _ in range(3)]
  best, median = time_calls(lambda: metrics.batched_all_metrics(*triple),
                            2 if smoke else 10)
  return [(f"12 metrics, {width}x{height} triples, batches of {batch}",
           f"{batch / median:.1f} triples/s (best {batch / best:.1f})", "")]


CAPTIONS = [
    "Two pedestrians walk past a traffic light pole on a dark sidewalk.",
    "A car drives along a wet road; the thermal image shows its warm engine.",
    "A person stands near a fence behind trees.",
    "heavily underexposed, slightly noisy visible image",
    "Several cyclists ride across an intersection while a bus waits at the "
    "red light; in the infrared image the riders stand out as bright figures.",
]


def text_rows(smoke: bool) -> list[tuple]:
  # pylint: disable=g-import-not-at-top
  from bench_common import time_calls
  from textfusion_jax.text import tiny_clip
  from textfusion_jax.text.encoder import TextEncoder
  count, batch = (32, 16) if smoke else (4096, 256)
  captions = [CAPTIONS[i % len(CAPTIONS)] + f" ({i})" for i in range(count)]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # The smoke run takes the tiny tower through the same code.
    directory = (tiny_clip.save_tiny_random_clip(tmp) if smoke else
                 tiny_clip.save_random_vit_b32_text(tmp))
    encoder = TextEncoder.from_pretrained(directory, dtype="bfloat16")
    _, median = time_calls(lambda: encoder.encode(captions, batch), 1 if smoke
                           else 3)
    ours = count / median
    try:
      import torch
      import transformers
    except ImportError:
      torch = None
    theirs = "torch not installed"
    if torch is not None:
      device = "cuda" if torch.cuda.is_available() else "cpu"
      model = transformers.CLIPTextModelWithProjection.from_pretrained(
          directory, dtype=torch.bfloat16).to(device).eval()
      tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)

      def run_torch():
        with torch.inference_mode():
          out = [model(**tokenizer(captions[i:i + batch], padding="longest",
                                   truncation=True, max_length=77,
                                   return_tensors="pt").to(device)
                       ).text_embeds.float().cpu()
                 for i in range(0, count, batch)]
        return np.asarray(torch.cat(out))

      _, torch_median = time_calls(run_torch, 1 if smoke else 3)
      theirs = (f"PyTorch (transformers, {device}) {count / torch_median:.0f}"
                f" captions/s; ratio {ours * torch_median / count:.2f}x")
  tower = "tiny CLIP (smoke)" if smoke else "CLIP ViT-B/32"
  rows.append((f"{tower} text, bf16, {count} captions, batch {batch}, "
               "tokenization included", f"{ours:.0f} captions/s", theirs))
  return rows


def main(argv) -> None:
  del argv
  if _PRINT_WHEELS.value:
    print_wheels()
    return
  logging.set_verbosity(logging.WARNING)
  files.check_writable({"--out": _OUT.value})
  check_imports()
  smoke = _SMOKE.value
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  peak = peak_tflops(device)
  start = time.perf_counter()
  header = (f"device: {device.device_kind} ({device.platform}); jax "
            f"{jax.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores; peak bf16 "
            f"{f'{peak:g} TFLOP/s' if peak else 'unknown'}"
            f"{'; --smoke (tiny preset, CPU sizes)' if smoke else ''}")
  print(header, flush=True)
  rows = []

  def table() -> str:
    lines = [header, "", "| work | textfusion-jax | Text-IF on one H100 "
             "(bf16) / baseline |", "|---|---|---|"]
    lines += [f"| {work} | {ours} | {anchor} |" for work, ours, anchor in rows]
    lines.append(f"\ntotal {time.perf_counter() - start:.0f} s")
    return "\n".join(lines)

  # Inference first: the device's peak memory then reads per size.
  parts = {"inference": lambda: inference_rows(smoke, on_gpu),
           "metrics": lambda: metric_rows(smoke),
           "text": lambda: text_rows(smoke),
           "train": lambda: train_rows(smoke, on_gpu, peak)}
  unknown = sorted(set(_PARTS.value) - set(parts))
  if unknown:
    raise errors.UserError(f"--parts: unknown {', '.join(unknown)} (choose "
                           f"from {', '.join(parts)})")
  for name, part in ((n, p) for n, p in parts.items() if n in _PARTS.value):
    part_start = time.perf_counter()
    # Training prints each row as it is measured (its batch sizes take
    # minutes each); the other parts' rows are printed here.
    printed = name == "train"
    try:
      part_rows = part()
    except Exception as error:  # pylint: disable=broad-except
      # An out-of-memory part must not cost the other parts' figures (device
      # time is scarce): it becomes a row of its own.
      first = (str(error).strip().splitlines() or [""])[0][:200]
      part_rows = [(f"{name} (failed)", f"{type(error).__name__}: {first}",
                    "")]
      printed = False
    for row in () if printed else part_rows:
      print(f"  {row[0]}: {row[1]}", flush=True)
    print(f"  ({time.perf_counter() - part_start:.0f} s, compiling "
          "included)", flush=True)
    rows += part_rows
    if _OUT.value:  # after every part: a killed run keeps what it measured
      files.write_text_atomic(_OUT.value, table() + "\n")
  print("\n" + table())
  if any(work.endswith("(failed)") for work, _, _ in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  errors.run_cli(main)
