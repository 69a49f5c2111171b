"""Grain training pipeline throughput on LLVIP-size JPGs vs a plain PIL loop.

  python benchmarks/bench_pipeline.py [--data DIR | --generate [--pairs 32] [--ir_rgb]]
      [--batch_size 16] [--crop 256] [--batches 10] [--warmup N]
      [--workers 0,1,2] [--read_threads 2] [--rounds 2] [--no_tfds]
      [--no_cached] [--no_breakdown]

Reports training examples/s of `input_pipeline.pipeline.make_train_dataset`
(random 256x256 crop + flip + caption embedding per example, float32 batches)
with 0, 1 and 2 grain worker processes, over

  * folder: `datasets.PairedFolderSource` reading the ir/ and vi/ JPGs and
    decoding them on the fly (no build step), and
  * tfds:   the same pairs built once with `datasets.build('folders', ...)` to
    an array_record TFDS dataset (the source JPEG bytes kept; the path the
    project recommends for large datasets) and read with `load_source` +
    `RecordSource`; both sources hand the pipeline `image_io.EncodedImage`s,
    so a 256x256 crop decodes the JPEG but converts only its window,
  * tfds, decoded once: the same records through `sources.CachedSource`
    (each record decoded in full on first use and kept in RAM: the
    record-level cache alternative; needs the dataset to fit in memory),

against the simplest alternative, a single-threaded Python loop with PIL
(open both JPGs, convert, random crop, flip, pick a caption embedding, stack),
all in the same run on the same files.

Data: --data DIR (an ir/ + vi/ + captions.jsonl folder), by default the 40
real LLVIP pairs of the shared samples (1280x1024 JPGs) when present,
otherwise (or with --generate) --pairs generated LLVIP-like pairs: 1280x1024
RGB visible + grey infrared JPGs of smooth noise and gradients (~100-300 KB
each, like LLVIP's) with 2 captions per pair, written to a temporary folder.

Caption embeddings come from a cheap deterministic hash -> 512-d embed_fn, so
text encoding is not measured (the pipeline only looks embeddings up).

Timing: each variant's start-up (building the iterator, spawning workers, up
to the first batch) is reported separately; then warm-up batches are taken
and --batches batches are timed. The default warm-up drains every buffer grain
may have filled during start-up (`auto_warmup`): timing right after a single
warm-up batch counts batches prefetched during the seconds of worker start-up
as throughput (a trial run reported 846 examples/s for 2 workers that way,
~200 when drained). Variants run in --rounds interleaved rounds and each one's
best round counts (the median is also shown), so background load on a shared
machine hits them alike. Small datasets are read from the page cache,
so disk I/O is not measured. A per-example cost breakdown (single thread)
follows the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from input_pipeline import datasets
from input_pipeline import layouts
from input_pipeline import pipeline
from input_pipeline import sources
from input_pipeline import synthetic
from input_pipeline.captions import CaptionTable
from input_pipeline import image_io

SHARED_LLVIP = (Path(__file__).resolve().parents[2] / "shared" / "data" /
                "ivf_samples" / "llvip")
WIDTH, HEIGHT = 1280, 1024  # LLVIP frames
EMBED_DIM = 512
_SUBJECTS = ["pedestrian", "cyclist", "car", "bus", "dog", "group of people"]
_PLACES = ["a dark sidewalk", "a crossing", "a parking lot", "a wet road",
           "a bus stop", "a lit storefront"]


# ---------------------------------------------------------------------------
# Data


def _smooth_noise(rng: np.random.Generator, channels: int) -> np.ndarray:
  """(HEIGHT, WIDTH, channels) float in ~[0, 255]: multi-scale smooth noise,
  a gradient and some rectangles ("buildings"), plus fine sensor noise."""
  y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
  base = 60 + 80 * (y / HEIGHT) + 30 * np.sin(x / (90 + 40 * rng.random()))
  out = np.repeat(base[..., None], channels, axis=-1)
  for cells, amp in ((8, 50), (32, 25), (128, 12)):
    low = rng.normal(0, amp, (cells * HEIGHT // WIDTH + 1, cells + 1,
                              channels)).astype(np.float32)
    layer = np.stack([
        np.asarray(Image.fromarray(low[..., c]).resize((WIDTH, HEIGHT),
                                                       Image.BICUBIC))
        for c in range(channels)], axis=-1)
    out += layer
  for _ in range(12):
    top, left = rng.integers(0, HEIGHT - 64), rng.integers(0, WIDTH - 64)
    h, w = rng.integers(32, 300), rng.integers(32, 300)
    out[top:top + h, left:left + w] += rng.normal(0, 40, channels)
  out += rng.normal(0, 4, out.shape).astype(np.float32)
  return np.clip(out, 0, 255)


def generate_pairs(root: Path, num_pairs: int, seed: int = 0,
                   ir_rgb: bool = False) -> Path:
  """Writes LLVIP-like pairs: root/ir/*.jpg (grey, or grey content stored
  as RGB with ir_rgb, as the LLVIP release stores it), root/vi/*.jpg (RGB)
  and root/captions.jsonl (2 captions per pair)."""
  (root / "ir").mkdir(parents=True, exist_ok=True)
  (root / "vi").mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(num_pairs):
    rng = np.random.default_rng([seed, i])
    name = f"{190001 + i:06d}"
    vis = _smooth_noise(rng, 3)
    # Infrared: a darker, smoother scene of warm blobs.
    ir = 0.5 * vis.mean(-1) + 40
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for _ in range(4):
      cy, cx = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
      ir += 90 * np.exp(-((yy - cy) ** 2 / 8000 + (xx - cx) ** 2 / 2500))
    Image.fromarray(vis.astype(np.uint8)).save(root / "vi" / f"{name}.jpg",
                                               quality=90)
    ir_image = Image.fromarray(np.clip(ir, 0, 255).astype(np.uint8))
    if ir_rgb:
      ir_image = ir_image.convert("RGB")
    ir_image.save(root / "ir" / f"{name}.jpg", quality=90)
    subject = _SUBJECTS[i % len(_SUBJECTS)]
    place = _PLACES[(i // len(_SUBJECTS)) % len(_PLACES)]
    lines.append(json.dumps({"name": name, "captions": [
        f"A {subject} on {place} at night.",
        f"A {subject} on {place}; the thermal image shows it as a bright warm "
        f"shape (pair {i})."]}))
  (root / layouts.CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
  return root


def hash_embed(texts: list[str]) -> np.ndarray:
  """Deterministic, cheap stand-in text encoder: sha256(text) -> unit 512-d."""
  out = np.empty((len(texts), EMBED_DIM), np.float32)
  for i, text in enumerate(texts):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(EMBED_DIM)
    out[i] = v / np.linalg.norm(v)
  return out


def folder_pairs(root: Path) -> list[tuple[Path, Path, list[str]]]:
  """(ir path, vi path, captions) per stem, read the simplest way."""
  captions = {}
  captions_file = root / layouts.CAPTIONS_FILE
  if captions_file.is_file():
    for line in captions_file.read_text().splitlines():
      if line.strip():
        obj = json.loads(line)
        captions[obj["name"]] = obj["captions"]
  irs = {p.stem: p for p in (root / "ir").iterdir()}
  vis = {p.stem: p for p in (root / "vi").iterdir()}
  return [(irs[s], vis[s], captions.get(s) or [""])
          for s in sorted(irs.keys() & vis.keys())]


# ---------------------------------------------------------------------------
# Runners: batch iterators, and time_iterator, which times one of them.


def pil_loop(pairs: Sequence[tuple[Path, Path, list[str]]], table: CaptionTable,
             batch_size: int, crop: int, seed: int):
  """The simplest alternative: an infinite generator of batches built in a
  plain single-threaded Python loop with PIL (same outputs as the pipeline:
  float32 vis/ir in [0, 1], the caption's embedding)."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(pairs))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      vis_b, ir_b, emb_b = [], [], []
      for index in order[start:start + batch_size]:
        ir_path, vi_path, _ = pairs[index]
        with Image.open(vi_path) as vi, Image.open(ir_path) as ir:
          vi, ir = vi.convert("RGB"), ir.convert("L")
          left = int(rng.integers(0, vi.width - crop + 1))
          top = int(rng.integers(0, vi.height - crop + 1))
          box = (left, top, left + crop, top + crop)
          vi, ir = vi.crop(box), ir.crop(box)
          if rng.integers(2):
            vi = vi.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ir = ir.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        vis_b.append(np.asarray(vi, np.float32) / np.float32(255))
        ir_b.append(np.asarray(ir, np.float32)[..., None] / np.float32(255))
        caption = int(rng.integers(table.num_captions(index)))
        emb_b.append(table.embedding(index, caption))
      yield {"vis": np.stack(vis_b), "ir": np.stack(ir_b),
             "text_emb": np.stack(emb_b)}


def time_iterator(make: Callable[[], Any], warmup: int,
                  batches: int) -> tuple[float, float]:
  start = time.perf_counter()
  it = make()
  batch = next(it)  # start-up: building the iterator up to the first batch
  startup = time.perf_counter() - start
  for _ in range(warmup - 1):
    batch = next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch["vis"].dtype == np.float32 and batch["vis"].ndim == 4
  close = getattr(it, "close", None)
  if close is not None:
    close()  # stops grain worker processes now, not at garbage collection
  return startup, elapsed


# make_train_dataset's defaults, passed explicitly so auto_warmup matches.
WORKER_BUFFER_SIZE = 2
READ_BUFFER_SIZE = 4


def auto_warmup(workers: int) -> int:
  """Batches that may already be buffered when the first batch arrives,
  plus 2: each process (the main one, or each worker) prefetches up to
  READ_BUFFER_SIZE batches on its read threads, and each worker queues up
  to WORKER_BUFFER_SIZE more. Timing right after one warm-up batch would
  count those (filled during the seconds of start-up) as throughput: a trial
  run reported 846 examples/s for 2 workers that way, ~200 when drained."""
  if workers == 0:
    return READ_BUFFER_SIZE + 2
  return workers * (READ_BUFFER_SIZE + WORKER_BUFFER_SIZE) + 2


def grain_iterator(source: Sequence[Any], table: CaptionTable, args,
                   workers: int) -> Callable[[], Any]:
  def make():
    dataset = pipeline.make_train_dataset(
        source, global_batch_size=args.batch_size, crop_size=args.crop,
        seed=args.seed, caption_table=table, worker_count=workers,
        worker_buffer_size=WORKER_BUFFER_SIZE, read_threads=args.read_threads,
        read_buffer_size=READ_BUFFER_SIZE, shard_by_process=False)
    return iter(dataset)
  return make


# ---------------------------------------------------------------------------
# Per-example cost breakdown (single thread, ms)


def breakdown(pairs, folder_source, tfds_source, crop: int,
              repeats: int = 8) -> list[tuple[str, float]]:
  def ms(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      for i in range(repeats):
        fn(i)
      best = min(best, (time.perf_counter() - start) / repeats)
    return 1e3 * best

  def wrap(f):
    return lambda i=0: f(i % len(pairs))

  def pil_decode(i):
    for path in pairs[i][:2]:
      with Image.open(path) as image:
        image.load()

  record = {k: np.asarray(v) for k, v in pipeline.normalize_record(
      folder_source[0]).items() if k in ("vis", "ir")}  # decoded
  rng = np.random.default_rng(0)
  scenes = synthetic.SyntheticPairs(1000, 128, 128, seed=1)
  scenes[0]  # warm-up (grid caches)
  rgb_frame = np.ascontiguousarray(record["vis"])
  rows = [
      ("synthetic 128x128 scene (SyntheticPairs[i]; target < 15 ms)",
       ms(lambda i=0: scenes[1 + i % 999])),
      ("JPEG decode only, vi + ir (PIL Image.load)", ms(wrap(pil_decode))),
      ("project read_pair (decode + convert + np.asarray + grey/RGB)",
       ms(wrap(lambda i: layouts.read_pair(pairs[i][0], pairs[i][1])))),
      (f"EncodedImage.crop {crop}x{crop}, vi + ir (decode, convert only the "
       "window: what the sources hand the pipeline)",
       ms(wrap(lambda i: [image_io.EncodedImage(p, c).crop(0, 0, crop, crop)
                          for p, c in ((pairs[i][0], 1), (pairs[i][1], 3))]))),
      ("PairedFolderSource[i] + normalize_record (images stay encoded: "
       "headers only)",
       ms(wrap(lambda i: pipeline.normalize_record(folder_source[i])))),
      ("image_io.rgb_to_grey_u8 of a full frame (read_pair does it for IR "
       "JPGs stored as RGB)",
       ms(lambda i=0: image_io.rgb_to_grey_u8(rgb_frame))),
      ("crop + flip + float32 of a decoded record",
       ms(lambda i=0: pipeline._example(  # pylint: disable=protected-access
           pipeline.paired_crop_and_flip(
               {"vis": record["vis"], "ir": record["ir"]}, crop, rng),
           0, 0, CaptionTable(np.zeros((1, 1), np.float32),
                              (np.zeros(1, np.int32),))))),
      ("PIL loop, one example (decode, crop, flip, float32)",
       ms(wrap(lambda i, it=pil_loop(pairs, CaptionTable(
           np.zeros((1, 1), np.float32), tuple(np.zeros(2, np.int32)
                                               for _ in pairs)),
           1, crop, 0): next(it)))),
  ]
  if tfds_source is not None:
    rows.append(("TFDS record fetch + full decode, vi + ir "
                 "(np.asarray of RecordSource[i]'s images)",
                 ms(wrap(lambda i: [np.asarray(tfds_source[i][k])
                                    for k in ("ir", "vis")]))))
  return rows


# ---------------------------------------------------------------------------


flags.DEFINE_string(
    "data", None, "ir/ + vi/ (+ captions.jsonl) folder; default the shared "
    "LLVIP samples when present.")
flags.DEFINE_bool("generate", False, "Use generated LLVIP-like pairs even "
                  "when the shared samples exist.")
flags.DEFINE_integer("pairs", 32, "Pairs to generate.", lower_bound=1)
flags.DEFINE_bool("ir_rgb", False, "Store generated infrared JPGs as RGB "
                  "(grey content), as the LLVIP release does.")
flags.DEFINE_integer("batch_size", 16, "Examples per batch.", lower_bound=1)
flags.DEFINE_integer("crop", 256, "Crop size.", lower_bound=1)
flags.DEFINE_integer("batches", 10, "Timed batches per variant and round.",
                     lower_bound=1)
flags.DEFINE_integer(
    "warmup", None, "Untimed batches before timing (>= 1; the first is "
    "start-up). Default: enough to drain every buffer grain may have filled "
    "during start-up (see auto_warmup); the PIL loop always uses 1.",
    lower_bound=1)
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker_count values.")
flags.DEFINE_integer("read_threads", 2, "grain read threads per process.",
                     lower_bound=1)
flags.DEFINE_integer("rounds", 2, "Interleaved rounds.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of generated pairs and crops.",
                     lower_bound=0)
flags.DEFINE_bool("no_tfds", False, "Skip the TFDS array_record variant.")
flags.DEFINE_bool("no_cached", False, "Skip the decoded-once (CachedSource) "
                  "TFDS variant.")
flags.DEFINE_string(
    "tfds_dir", None, "Where to build (and reuse) the TFDS dataset; default "
    "a temporary folder.")
flags.DEFINE_bool("no_breakdown", False, "Skip the per-stage breakdown.")


def parse_args() -> types.SimpleNamespace:
  """This script's flags as attributes (`args.batch_size`, ...)."""
  names = [f.name for f in flags.FLAGS.get_key_flags_for_module(
      sys.modules[__name__])]
  args = types.SimpleNamespace(**{n: flags.FLAGS[n].value for n in names})
  args.data = Path(args.data) if args.data else None
  args.tfds_dir = Path(args.tfds_dir) if args.tfds_dir else None
  args.worker_counts = [int(w) for w in args.workers if w.strip()]
  return args


def main(argv) -> None:
  del argv
  args = parse_args()
  total_start = time.perf_counter()
  tmp = tempfile.TemporaryDirectory(prefix="bench_pipeline_")
  tmp_root = Path(tmp.name)

  if args.data is not None:
    data, data_desc = args.data, f"{args.data}"
  elif SHARED_LLVIP.is_dir() and not args.generate:
    data, data_desc = SHARED_LLVIP, f"shared LLVIP samples ({SHARED_LLVIP})"
  else:
    start = time.perf_counter()
    data = generate_pairs(tmp_root / "pairs", args.pairs, args.seed,
                          args.ir_rgb)
    data_desc = (f"{args.pairs} generated LLVIP-like pairs (written in "
                 f"{time.perf_counter() - start:.1f} s)")
  pairs = folder_pairs(data)
  sizes, modes = set(), set()
  for pair in pairs:
    for kind, path in zip(("ir", "vi"), pair[:2]):
      with Image.open(path) as image:
        sizes.add(image.size)
        modes.add(f"{kind} {image.mode}")
  kb = [p.stat().st_size / 1024 for pair in pairs for p in pair[:2]]
  vi_kb = np.mean([pair[1].stat().st_size / 1024 for pair in pairs])
  ir_kb = np.mean([pair[0].stat().st_size / 1024 for pair in pairs])

  auto_desc = "auto (" + ", ".join(
      f"{auto_warmup(w)} with {w} workers" for w in args.worker_counts) + ")"
  print("# Grain input pipeline vs PIL loop\n")
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at start "
        f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}, "
        f"Pillow {Image.__version__}")
  print(f"data: {data_desc}: {len(pairs)} pairs, image sizes "
        f"{sorted(sizes)}, modes {sorted(modes)}, mean JPG size vi {vi_kb:.0f} KB, ir {ir_kb:.0f} KB"
        f" (min {min(kb):.0f}, max {max(kb):.0f})")
  print(f"batch {args.batch_size} x {args.crop}x{args.crop} crops, "
        f"{args.batches} timed batches after "
        f"{args.warmup or auto_desc} warm-up batches (PIL loop: 1),"
        f" {args.rounds} interleaved round(s), read_threads="
        f"{args.read_threads}; caption embeddings from a hash -> "
        f"{EMBED_DIM}-d embed_fn (text encoding not measured); one batch is "
        f"{args.batch_size * args.crop ** 2 * 4 / 2**20:.1f} MB of uint8 "
        "pixels (what grain workers ship to the main process, which makes "
        "them float32)\n")
  if len(pairs) < args.batch_size:
    raise SystemExit(f"need at least --batch_size={args.batch_size} pairs")

  # Sources and tables (their set-up time is part of start-up, reported
  # apart from the per-variant iterator start-up).
  start = time.perf_counter()
  folder_source = datasets.PairedFolderSource(data)
  folder_table = CaptionTable.from_source(folder_source, hash_embed)
  folder_setup = time.perf_counter() - start
  pil_table = CaptionTable.from_captions([p[2] for p in pairs], hash_embed)
  setups = {"folder": folder_setup}

  tfds_source = tfds_table = None
  if not args.no_tfds:
    tfds_dir = args.tfds_dir or tmp_root / "tfds"
    try:
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      start = time.perf_counter()
      datasets.build("folders", manual_dir=data, data_dir=tfds_dir)
      build_s = time.perf_counter() - start
      start = time.perf_counter()
      tfds_source = datasets.RecordSource(
          datasets.load_source("folders", "train", tfds_dir))
      tfds_table = CaptionTable.from_source(tfds_source, hash_embed)
      setups["tfds"] = time.perf_counter() - start
      record_mb = sum(f.stat().st_size for f in Path(tfds_dir).rglob(
          "*array_record*")) / 2**20
      jpg_mb = sum(kb) / 1024
      print(f"TFDS build ({len(tfds_source)} pairs -> array_record, source "
            f"JPEG bytes kept): {build_s:.1f} s, {record_mb:.1f} MB of "
            f"records = {record_mb / jpg_mb:.2f}x the JPGs "
            f"({jpg_mb:.1f} MB)\n")
    except Exception as error:  # pylint: disable=broad-except
      print(f"TFDS variant skipped: build/load failed: {error!r}\n")
      tfds_source = None

  # (variant, workers) -> (make iterator, warm-up batches)
  runners: dict[tuple[str, str], tuple[Callable[[], Any], int]] = {
      ("PIL loop (1 thread)", "-"): (
          lambda: pil_loop(pairs, pil_table, args.batch_size, args.crop,
                           args.seed), 1)}
  variants = [("grain, JPG folder (PairedFolderSource)", folder_source,
               folder_table)]
  if tfds_source is not None:
    variants.append(("grain, TFDS array_record (JPEG bytes)", tfds_source,
                     tfds_table))
    if not args.no_cached:
      variants.append(("grain, TFDS, decoded once (CachedSource)",
                       sources.CachedSource(tfds_source), tfds_table))
  for name, source, table in variants:
    for workers in args.worker_counts:
      runners[(name, str(workers))] = (
          grain_iterator(source, table, args, workers),
          args.warmup or auto_warmup(workers))

  results: dict[tuple[str, str], list[tuple[float, float]]] = {
      k: [] for k in runners}
  for round_index in range(args.rounds):
    for key, (make, warmup) in runners.items():
      startup, elapsed = time_iterator(make, warmup, args.batches)
      results[key].append((startup, elapsed))
      print(f"  round {round_index + 1}: {key[0]}, workers {key[1]}: "
            f"start-up {startup:.2f} s, "
            f"{args.batches * args.batch_size / elapsed:.1f} examples/s",
            flush=True)

  examples = args.batches * args.batch_size
  rate = {k: [examples / e for _, e in v] for k, v in results.items()}
  baseline = max(rate[("PIL loop (1 thread)", "-")])
  print("\n| pipeline variant | workers | examples/s (best) | examples/s "
        "(median) | vs PIL loop | start-up s (first batch, best) | rounds |")
  print("|---|---|---|---|---|---|---|")
  for key, rates in rate.items():
    if not rates:
      continue
    startups = [s for s, _ in results[key]]
    print(f"| {key[0]} | {key[1]} | {max(rates):.1f} | "
          f"{statistics.median(rates):.1f} | {max(rates) / baseline:.2f}x | "
          f"{min(startups):.2f} | {len(rates)} |")
  tfds_name = "grain, TFDS array_record (JPEG bytes)"
  per_worker = {w: max(rate[(tfds_name, w)]) for w in ("1", "2")
                if rate.get((tfds_name, w))}
  if len(per_worker) == 2:
    print(f"\nTFDS records, 2 workers vs PIL loop: "
          f"{per_worker['2'] / baseline:.2f}x (target 1.5x); 1 -> 2 workers: "
          f"{per_worker['1']:.0f} -> {per_worker['2']:.0f} examples/s "
          f"({per_worker['2'] / per_worker['1']:.2f}x, "
          f"{per_worker['2'] / 2:.0f} per worker)")
  print("\nSource set-up (scan/open + caption table), once: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in setups.items()))
  print("workers 0 = batches built in the main process by read_threads "
        "threads; workers N = N grain processes, each with read_threads "
        "threads.")

  if not args.no_breakdown:
    print("\nPer-example cost, single thread, best of 3 (ms):\n")
    print("| step | ms |")
    print("|---|---|")
    for name, value in breakdown(pairs, folder_source, tfds_source, args.crop):
      print(f"| {name} | {value:.1f} |")
  print(f"\ntotal benchmark time {time.perf_counter() - total_start:.0f} s,"
        f" load average at end {os.getloadavg()[0]:.2f}")
  tmp.cleanup()


if __name__ == "__main__":
  errors.run_cli(main)
