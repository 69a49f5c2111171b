"""Caption embedding throughput: JAX `TextEncoder` vs PyTorch CLIP (HF).

  python benchmarks/bench_text.py [--num_captions 512] [--batch_size 64]
      [--dtype float32|bfloat16] [--repeats 3] [--torch_attention sdpa|eager]
      [--checkpoint DIR] [--no_torch]

Both run the CLIP ViT-B/32 text architecture (width 512, 12 layers, 8 heads,
MLP 2048, projection 512, vocab 49408) with the same random weights (written
once as an HF checkpoint that both load), on the same captions, batch size and
thread count, end to end from strings (tokenization included), on the GPU when
there is one. PyTorch runs as a user would: eval(), inference_mode,
padding='longest' per batch in caption order. It is also timed on the
length-sorted batches that the JAX encoder forms, which tells the gain from
sorting apart from the gain of the model itself.

Captions are the shared sample captions when present (otherwise a few built-in
ones), cycled in a fixed shuffled order. Tokens come from the tiny built-in BPE
(the real CLIP vocabulary cannot be downloaded here; its lengths on these
captions are similar), unless --checkpoint names a real CLIP directory. The
runners are timed in interleaved rounds and the best round of each counts, so
background load on a shared machine hits them alike; the JAX first call
(compiling each bucket length) is reported separately.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from input_pipeline import caption_files
from textfusion_jax.text import tiny_clip
from textfusion_jax.text.encoder import TextEncoder

SHARED_SAMPLES = (Path(__file__).resolve().parents[2] / "shared" / "data" /
                  "ivf_samples")
FALLBACK_CAPTIONS = [
    "Two pedestrians walk past a traffic light pole on a dark sidewalk at "
    "night.",
    "A car drives along a wet road; the thermal image shows its warm engine "
    "and tyres clearly.",
    "A person stands near a fence behind trees.",
    "Several cyclists ride across an intersection while a bus waits at the "
    "red light; in the infrared image the riders stand out as bright "
    "figures against the cold street.",
]


def load_captions(n: int) -> list[str]:
  texts = [c for p in sorted(SHARED_SAMPLES.glob("*/captions.jsonl"))
           for r in caption_files.read_caption_file(p) for c in r.captions]
  texts = texts or FALLBACK_CAPTIONS
  order = np.random.default_rng(0).permutation(n) % len(texts)
  return [texts[i] for i in order]


def jax_runner(directory, captions, args):
  encoder = TextEncoder.from_pretrained(directory, dtype=args.dtype)
  start = time.perf_counter()
  encoder.encode(captions, args.batch_size)  # compiles the buckets it meets
  print(f"jax first call, compiling included: "
        f"{time.perf_counter() - start:.1f} s")
  return lambda: encoder.encode(captions, args.batch_size)


def torch_runner(directory, captions, args, sort: bool):
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.CLIPTextModelWithProjection.from_pretrained(
      directory, attn_implementation=args.torch_attention,
      dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32,
  ).to(device).eval()
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  order = np.arange(len(captions))
  if sort:  # the JAX encoder's batches: sorted by token length
    lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
  ordered = [captions[i] for i in order]

  def run():
    outputs = []
    with torch.inference_mode():
      for start in range(0, len(ordered), args.batch_size):
        batch = tokenizer(ordered[start:start + args.batch_size],
                          padding="longest", truncation=True, max_length=77,
                          return_tensors="pt").to(device)
        outputs.append(model(**batch).text_embeds.float())
      embeddings = torch.cat(outputs).cpu().numpy()
    result = np.empty_like(embeddings)
    result[order] = embeddings
    return result

  run()  # warm-up
  return run


flags.DEFINE_integer("num_captions", 512, "Captions embedded per round.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Captions per call.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Interleaved rounds (best is kept).",
                     lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype.")
flags.DEFINE_enum("torch_attention", "sdpa", ["sdpa", "eager"],
                  "transformers attn_implementation.")
flags.DEFINE_string("checkpoint", None, "A real CLIP checkpoint directory "
                    "instead of random ViT-B/32 text weights.")
flags.DEFINE_bool("no_torch", False, "Skip the PyTorch baseline.")


def main(argv) -> None:
  del argv
  args = types.SimpleNamespace(**{
      f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(
          sys.modules[__name__])})

  captions = load_captions(args.num_captions)
  tokenizer = tiny_clip.tiny_tokenizer()
  lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
  print(f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{len(captions)} captions, {np.mean(lengths):.1f} tokens mean, "
        f"{max(lengths)} max; batch {args.batch_size}, {args.dtype}")

  runners = {}
  with tempfile.TemporaryDirectory() as tmp:
    directory = (Path(args.checkpoint) if args.checkpoint else
                 tiny_clip.save_random_vit_b32_text(tmp))
    runners["jax"] = jax_runner(directory, captions, args)
    try:
      import torch
    except ImportError:
      torch = None
      print("pytorch is not installed: JAX only")
    if torch is not None and not args.no_torch:
      torch.set_num_threads(len(os.sched_getaffinity(0)))  # as XLA uses
      print(f"pytorch {torch.__version__}, attention="
            f"{args.torch_attention}, {torch.get_num_threads()} threads")
      runners["pytorch"] = torch_runner(directory, captions, args, sort=False)
      runners["pytorch, sorted"] = torch_runner(directory, captions, args,
                                                sort=True)

    # Interleaved rounds, best of each: background load hits all alike.
    best = dict.fromkeys(runners, float("inf"))
    results = {}
    for _ in range(args.repeats):
      for name, run in runners.items():
        start = time.perf_counter()
        results[name] = run()
        best[name] = min(best[name], time.perf_counter() - start)

  rates = {name: len(captions) / seconds for name, seconds in best.items()}
  print(f"best of {args.repeats} interleaved rounds:")
  for name, rate in rates.items():
    print(f"  {name:16s} {rate:8.1f} captions/s")
  if "pytorch" in rates:
    error = np.abs(results["jax"] - results["pytorch"]).max()
    print(f"  max |jax - pytorch| = {error:.2e}")
    print(f"  speed-up: {rates['jax'] / rates['pytorch']:.2f}x vs pytorch in "
          f"caption order (as users run it), "
          f"{rates['jax'] / rates['pytorch, sorted']:.2f}x vs pytorch on the "
          "same length-sorted batches")


if __name__ == "__main__":
  errors.run_cli(main)
