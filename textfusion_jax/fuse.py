"""Fuse infrared/visible pairs with a trained model and a text prompt.

  python -m textfusion_jax.fuse --checkpoint WORKDIR --ir ir.png --vis vis.png \
      --text "two pedestrians on a dark street" --out fused.png
  python -m textfusion_jax.fuse --checkpoint WORKDIR --ir IR_DIR --vis VIS_DIR \
      --captions captions.jsonl --out OUT_DIR

--checkpoint is a model bundle (`python -m textfusion_jax.export`, e.g. the
shipped pretrained/textfusion-small), verified against its manifest before
anything is loaded, or a training workdir. Directories are matched by file
stem. With --captions, each pair uses its own caption (index --caption-index
of its captions.jsonl line); --text gives one prompt for all. Images up to
--tile pixels a side run whole, padded into a few bucket shapes (one
compilation each, whatever the mix of sizes); larger ones are fused in
overlapping tiles, so memory stays bounded. Output: colour PNGs the size of
the visible input, each written atomically.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from absl import logging
from flax import nnx
from tqdm import tqdm

from textfusion_jax import bundle
from textfusion_jax import checkpointing
from textfusion_jax import errors
from textfusion_jax import image_io
from textfusion_jax import model as model_lib
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import text_setup
from textfusion_jax import tiling
from textfusion_jax import training
from textfusion_jax.text import caption_files

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A model bundle (python -m textfusion_jax.export) or "
    "a training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_IR = flags.DEFINE_string("ir", None, "Infrared image or directory.")
_VIS = flags.DEFINE_string("vis", None, "Visible image or directory.")
_TEXT = flags.DEFINE_string("text", None, "One prompt for every pair.")
_CAPTIONS = flags.DEFINE_string("captions", None,
                                "captions.jsonl with a caption per pair.")
_CAPTION_INDEX = flags.DEFINE_integer("caption_index", 0,
                                      "Which caption of each line to use.")
_OUT = flags.DEFINE_string("out", None, "Output PNG (or directory).")
_TILE = flags.DEFINE_integer(
    "tile", 1536, "Images up to this size run whole; larger ones in tiles of "
    "this size.")
_OVERLAP = flags.DEFINE_integer("overlap", 64, "Tile overlap in pixels.")


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  ir: Path
  vis: Path
  out: Path


def collect_pairs(ir: str, vis: str, out: str) -> list[Pair]:
  """Single files, or two directories matched by stem (all problems listed)."""
  ir_path, vis_path, out_path = Path(ir), Path(vis), Path(out)
  if ir_path.is_dir() != vis_path.is_dir():
    raise errors.UserError(f"--ir {ir} and --vis {vis} must both be files or "
                           "both directories")
  if not ir_path.is_dir():
    for path in (ir_path, vis_path):
      if not path.exists():
        raise errors.UserError(f"{path}: file not found")
    if out_path.suffix.lower() != ".png":
      raise errors.UserError(f"--out {out} must end in .png for a single pair")
    return [Pair(vis_path.stem, ir_path, vis_path, out_path)]
  ir_files, vis_files = image_io.list_images(ir_path), image_io.list_images(
      vis_path)
  problems = [f"{ir_path / s}.* has no visible partner in {vis_path}"
              for s in sorted(set(ir_files) - set(vis_files))]
  problems += [f"{vis_path / s}.* has no infrared partner in {ir_path}"
               for s in sorted(set(vis_files) - set(ir_files))]
  if not ir_files and not vis_files:
    problems.append(f"no images in {ir_path} or {vis_path}")
  if problems:
    raise errors.UserError("; ".join(problems))
  return [Pair(s, ir_files[s], vis_files[s], out_path / f"{s}.png")
          for s in sorted(ir_files, key=_natural_key)]


def _natural_key(stem: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in
               __import__("re").split(r"(\d+)", stem))


def read_captions(path: str, names: Sequence[str], index: int) -> list[str]:
  """The `index`-th caption of each pair from a captions.jsonl."""
  by_name = {r.name: r.captions
             for r in caption_files.read_caption_file(path, dataset="")}
  problems = [n for n in names if len(by_name.get(n, ())) <= index]
  if problems:
    raise errors.UserError(
        f"{path}: no caption {index} for pair(s) {', '.join(problems)}")
  return [by_name[n][index] for n in names]


def check_sizes(pairs: Sequence[Pair]) -> dict[str, tuple[int, int]]:
  """Pair name -> (H, W) from headers; one error listing every mismatch."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  problems = []
  sizes = {}
  for pair in pairs:
    try:
      with Image.open(pair.ir) as ir, Image.open(pair.vis) as vis:
        if ir.size != vis.size:
          problems.append(f"{pair.ir} is {ir.size[0]}x{ir.size[1]} but "
                          f"{pair.vis} is {vis.size[0]}x{vis.size[1]}")
        sizes[pair.name] = (vis.size[1], vis.size[0])
    except OSError as error:
      problems.append(f"{pair.ir} / {pair.vis}: unreadable ({error})")
  if problems:
    raise errors.UserError("; ".join(problems) + " (pairs must be registered "
                           "and equal in size)")
  return sizes


def bucket_shapes(sizes: dict[str, tuple[int, int]], tile: int
                  ) -> dict[str, tuple[int, int] | None]:
  """Name -> padded shape to run whole (None: tiled), few shapes in all."""
  whole = {n: s for n, s in sizes.items() if max(s) <= tile}
  cost = tiling.COMPILE_COST_PIXELS.get(jax.default_backend(),
                                        tiling.DEFAULT_COMPILE_COST_PIXELS)
  shapes: dict[str, tuple[int, int] | None] = {n: None for n in sizes}
  for shape, names in tiling.plan_buckets(whole, 1, cost).items():
    shapes.update({n: shape for n in names})
  return shapes


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
  """(vis RGB float (H, W, 3), ir float (H, W, 1)) in [0, 1]."""
  vis = image_io.as_rgb_u8(image_io.read_image(pair.vis))
  ir = image_io.as_grey_u8(image_io.read_image(pair.ir, "minmax"))
  if vis.shape[:2] != ir.shape[:2]:
    raise errors.UserError(
        f"{pair.ir} is {ir.shape[1]}x{ir.shape[0]} but {pair.vis} is "
        f"{vis.shape[1]}x{vis.shape[0]}; pairs must be registered and equal"
        " in size")
  return (vis.astype(np.float32) / 255.0,
          ir[..., None].astype(np.float32) / 255.0)


class Fuser:
  """A trained model, from a bundle or a training workdir, ready to fuse."""

  def __init__(self, config: Any, params: Any, encoder: Any, *, step: int,
               source: str):
    self.config = config
    self.step = step
    self.source = source
    self.encoder = encoder
    if encoder is not None and encoder.embed_dim != config.model.text_dim:
      raise checkpointing.CheckpointError(
          f"checkpoint {source} expects {config.model.text_dim}-d text "
          f"embeddings but encoder {config.text.encoder!r} gives "
          f"{encoder.embed_dim}")
    self.mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
    replicated = sharding_lib.replicated(self.mesh)
    self.params = jax.device_put(params, replicated)
    graphdef = model_lib.abstract_model(config.model)[0]

    def apply(params, vis, ir, text_emb):
      return nnx.merge(graphdef, params)(vis, ir, text_emb)

    self._apply = jax.jit(apply, out_shardings=replicated)

  @classmethod
  def load(cls, path: str, step: int | None = None) -> Fuser:
    """A bundle (verified first) or a training workdir."""
    if bundle.is_bundle(path):
      if step is not None:
        raise errors.UserError(f"--step is for training workdirs; {path} is "
                               "a bundle of one step")
      return cls.from_bundle(path)
    return cls.from_workdir(path, step)

  @classmethod
  def from_bundle(cls, root: str) -> Fuser:
    manifest = bundle.verify(root)
    config = bundle.load_config(root)
    _, like = model_lib.abstract_model(config.model)
    params = bundle.load(root, nnx.to_pure_dict(like))
    return cls(config, params, text_setup.build_text_encoder(config.text),
               step=int(manifest.get("step", 0)), source=str(root))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *,
                   with_text_encoder: bool = True) -> Fuser:
    config = checkpointing.load_saved_config(workdir)
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
    trainer = training.ShardedTrainer(config, mesh)
    manager = checkpointing.make_manager(
        workdir, save_interval_steps=1, max_to_keep=None, async_save=False)
    state, step = checkpointing.restore(manager, trainer.abstract_state(),
                                        step=step)
    encoder = (text_setup.build_text_encoder(config.text)
               if with_text_encoder else None)
    return cls(config, state.params, encoder, step=step, source=str(workdir))

  def fuse(self, vis: np.ndarray, ir: np.ndarray, text_emb: np.ndarray, *,
           tile: int = _TILE.default, overlap: int = _OVERLAP.default,
           pad_to: tuple[int, int] | None = None) -> np.ndarray:
    """Fused RGB uint8 (H, W, 3) for one pair (float inputs in [0, 1]).

    An image no larger than `tile` runs whole, padded to `pad_to` (its
    bucket from `bucket_shapes`) or to a multiple of 64; larger ones run in
    overlapping tiles.
    """

    def fuse_batch(vis_tiles, ir_tiles):
      emb = np.repeat(text_emb[None], vis_tiles.shape[0], axis=0)
      return np.asarray(self._apply(self.params, vis_tiles, ir_tiles, emb))

    fused = tiling.fuse_tiled(fuse_batch, vis, ir, tile=tile, overlap=overlap,
                              batch_size=1, pad_to=pad_to)
    return np.clip(np.rint(fused * 255.0), 0, 255).astype(np.uint8)


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax/jax info lines are noise here
  for name, value in (("--checkpoint", _CHECKPOINT.value), ("--ir", _IR.value),
                      ("--vis", _VIS.value), ("--out", _OUT.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  if bool(_TEXT.value) == bool(_CAPTIONS.value):
    raise errors.UserError("give exactly one of --text or --captions")
  pairs = collect_pairs(_IR.value, _VIS.value, _OUT.value)
  shapes = bucket_shapes(check_sizes(pairs), _TILE.value)
  prompts = ([_TEXT.value] * len(pairs) if _TEXT.value else
             read_captions(_CAPTIONS.value, [p.name for p in pairs],
                           _CAPTION_INDEX.value))
  fuser = Fuser.load(_CHECKPOINT.value, _STEP.value)
  embeddings = fuser.encoder.encode(prompts)
  timings = []
  for pair, emb in tqdm(list(zip(pairs, embeddings)), unit="pair"):
    vis, ir = load_pair(pair)
    start = time.perf_counter()
    fused = fuser.fuse(vis, ir, emb, tile=_TILE.value, overlap=_OVERLAP.value,
                       pad_to=shapes[pair.name])
    timings.append(time.perf_counter() - start)
    image_io.write_png_atomic(pair.out, fused)
  steady = timings[1:] or timings
  print(f"fused {len(pairs)} pair(s) with checkpoint step {fuser.step} -> "
        f"{_OUT.value}; {1000 * np.mean(steady):.1f} ms/pair "
        f"(first, with compilation: {1000 * timings[0]:.1f} ms)")


def run() -> None:
  def guarded(argv):
    with errors.one_line_errors():
      main(argv)
  errors.run_absl_app(guarded, sys.argv)


if __name__ == "__main__":
  run()
