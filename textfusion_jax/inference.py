"""Fusing pairs with a trained model: pairing files, buckets, the `Fuser`.

The library behind `python -m textfusion_jax.fuse` (and benchmarks): no
command-line flags here.

* `collect_pairs`, `check_sizes`, `read_captions`, `load_pair`: files to
  checked float pairs, with one-line errors naming the files.
* `bucket_shapes`: the padded shape each pair runs at, from its own size
  on a fixed grid (one compilation per shape); larger images run in tiles.
* `Fuser`: a model from a bundle (verified against its manifest first) or a
  training workdir; `fuse` returns the uint8 colour image.
* `fuse_pairs`: fuse files to files, each output written atomically; a pair
  that does not decode or cannot be written is skipped and reported, the
  others still fused.

The fusion rule's image means are taken over each image's own pixels, not
its padding; channel attention does see the mirror padding (a pair fused
padded to another size differs by a few levels), which is why a pair's
bucket comes from its own size alone: fused alone or among others, the
same pixels (tests/test_fuse.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from textfusion_jax import bundle
from textfusion_jax import checkpointing
from textfusion_jax import color
from textfusion_jax import errors
from input_pipeline import image_io
from textfusion_jax import model as model_lib
from textfusion_jax import run_record
from textfusion_jax import sharding as sharding_lib
from textfusion_jax.text import encoder as text_encoder
from textfusion_jax.text import hf_checkpoint
from textfusion_jax import tiling
from textfusion_jax import train_step
from input_pipeline import caption_files

# Images up to this many pixels a side run whole; larger ones in tiles.
DEFAULT_TILE = 1536
DEFAULT_OVERLAP = 64


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  ir: Path
  vis: Path
  out: Path


def collect_pairs(ir: str, vis: str, out: str) -> list[Pair]:
  """Single files, or two directories matched by stem (all problems listed)."""
  ir_path, vis_path, out_path = Path(ir), Path(vis), Path(out)
  for flag, path in (("--ir", ir_path), ("--vis", vis_path)):
    if not path.exists():
      raise errors.UserError(f"{flag} {path}: no such file or directory")
  if ir_path.is_dir() != vis_path.is_dir():
    raise errors.UserError(f"--ir {ir} and --vis {vis} must both be files or "
                           "both directories")
  if ir_path.resolve() == vis_path.resolve():
    raise errors.UserError(
        f"--ir {ir} and --vis {vis} are the same "
        f"{'folder' if ir_path.is_dir() else 'file'}; every image would be "
        "fused with itself")
  _check_out(ir_path, vis_path, out_path)
  if not ir_path.is_dir():
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
  # Before the model loads: a folder in an output's place would stop the
  # run half way.
  problems += [f"--out {out_path / s}.png is a directory" for s in ir_files
               if (out_path / f"{s}.png").is_dir()]
  if problems:
    raise errors.UserError("; ".join(problems))
  return [Pair(s, ir_files[s], vis_files[s], out_path / f"{s}.png")
          for s in sorted(ir_files, key=natural_key)]


def _check_out(ir: Path, vis: Path, out: Path) -> None:
  """Refuses an --out that would overwrite an input or cannot be written."""
  bundle.check_not_inside_a_sealed_folder(out, itself_too=True)
  for flag, path in (("--ir", ir), ("--vis", vis)):
    if out.resolve() == path.resolve():
      raise errors.UserError(f"--out {out} is the {flag} input; fusing would "
                             "overwrite it: choose another path")
  # One pair's --out may be another pair's source image: ir/2.png beside
  # vi/2.png, or 2_vi.png beside 1_ir.png and 1_vi.png. Only the mark this
  # project writes into its PNGs tells an earlier output from a source.
  in_a_source_folder = out.is_file() and out.parent.resolve() in (
      ir.parent.resolve(), vis.parent.resolve())
  if not ir.is_dir() and in_a_source_folder:
    for folder, other in ((ir.parent, vis.parent), (vis.parent, ir.parent)):
      if out.parent.resolve() == folder.resolve() != other.resolve():
        partner = image_io.list_images(other).get(out.stem)
        if partner is not None:
          raise errors.UserError(
              f"--out {out} is a source image (its pair is {partner}); "
              "fusing would overwrite it: choose another path")
    if not image_io.written_here(out):
      raise errors.UserError(
          f"--out {out} already exists in the folder of --ir or --vis and "
          "was not written by textfusion-jax (it may be another pair's "
          "source image): choose a new path")
  folder = ir.is_dir()
  if out.exists() and out.is_dir() != folder:
    raise errors.UserError(
        f"--out {out} exists and is {'a file' if folder else 'a directory'}; "
        f"give {'a directory' if folder else 'a .png file path'}")
  existing = next(p for p in (out if folder else out.parent, *out.parents)
                  if p.exists())
  if not existing.is_dir():
    raise errors.UserError(f"--out {out}: {existing} is a file, not a "
                           "directory")
  if not os.access(existing, os.W_OK | os.X_OK):  # before the model loads
    raise errors.UserError(f"--out {out}: folder {existing} is not writable")


def natural_key(stem: str) -> tuple:
  # isdecimal, not isdigit: '²' is a digit that int() refuses.
  return tuple(int(t) if t.isdecimal() else t for t in
               re.split(r"(\d+)", stem))


def read_captions(path: str, names: Sequence[str], index: int,
                  split: str | None = None) -> list[str]:
  """The `index`-th caption of each pair from a captions.jsonl.

  A pair's line for `split` wins over its untagged line; lines tagged with
  another split are not used. A pair that has only lines for other splits is
  named in the error with those splits.
  """
  lines = caption_files.read_caption_file(path, dataset="")
  by_name = {r.name: r.captions for r in lines if r.split is None}
  by_name.update({r.name: r.captions for r in lines
                  if split is not None and r.split == split})
  problems = [n for n in names if len(by_name.get(n, ())) <= index]
  if problems:
    other = sorted({r.split for r in lines if r.name in problems and
                    r.name not in by_name and r.split is not None})
    hint = (f" (it has lines for split(s) {', '.join(other)}: choose one "
            "with --caption_split)" if other else "")
    raise errors.UserError(
        f"{path}: no caption {index} for pair(s) {', '.join(problems)}"
        + (f" in split {split!r}" if split is not None else "") + hint)
  return [by_name[n][index] for n in names]


def check_sizes(pairs: Sequence[Pair], sixteen_bit: list[str] | None = None
                ) -> dict[str, tuple[int, int]]:
  """Pair name -> (H, W) from headers; one error listing every mismatch or
  unreadable file. Files of more than 8 bits are appended to
  `sixteen_bit`."""
  mismatched, unreadable = [], []
  sizes = {}
  for pair in pairs:
    try:
      with (image_io.open_image(pair.ir) as ir,
            image_io.open_image(pair.vis) as vis):
        image_io.check_mode(vis.mode, "full", str(pair.vis))  # (as read)
        if sixteen_bit is not None:
          sixteen_bit += [str(path) for path, image in
                          ((pair.ir, ir), (pair.vis, vis))
                          if image_io.is_wide(image)]
        (ir_h, ir_w), (vis_h, vis_w) = (image_io.upright_size(ir),
                                        image_io.upright_size(vis))
        if (ir_h, ir_w) != (vis_h, vis_w):
          mismatched.append(f"{pair.ir} is {ir_w}x{ir_h} but "
                            f"{pair.vis} is {vis_w}x{vis_h}")
        sizes[pair.name] = (vis_h, vis_w)
    except image_io.ImageReadError as error:
      unreadable.append(str(error))
    except image_io.DECODE_ERRORS as error:
      unreadable.append(f"{pair.ir} / {pair.vis}: unreadable "
                        f"({image_io.describe_error(error)})")
  problems = unreadable + (["; ".join(mismatched) + " (pairs must be "
                            "registered and equal in size)"]
                           if mismatched else [])
  if problems:
    raise errors.UserError("; ".join(problems))
  return sizes


def bucket_shapes(sizes: dict[str, tuple[int, int]], tile: int
                  ) -> dict[str, tuple[int, int] | None]:
  """Name -> padded shape to run whole (None: tiled): each side on
  `tiling.bucket_side`'s fixed grid, so a pair's output never depends on
  the other pairs in its folder, in a handful of shapes in all. A side is
  never padded past `tile` (rounded down to 32) unless it is larger
  itself: a smaller --tile is how a user bounds memory."""

  def side(n: int) -> int:
    return min(tiling.bucket_side(n), max(-(-n // 32) * 32, tile // 32 * 32))

  return {name: (side(h), side(w)) if max(h, w) <= tile else None
          for name, (h, w) in sizes.items()}


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


def check_text_width(config: Any, encoder: text_encoder.TextEncoder,
                     source: str) -> None:
  """CheckpointError unless `encoder` gives the model's embedding width."""
  if encoder.embed_dim != config.model.text_dim:
    raise checkpointing.CheckpointError(
        f"checkpoint {source} expects {config.model.text_dim}-d text "
        f"embeddings but encoder {encoder.source!r} gives "
        f"{encoder.embed_dim}")


def run_text_encoder(workdir: str, config: Any,
                     text_encoder_dir: str | None = None
                     ) -> text_encoder.TextEncoder:
  """The text encoder a training run was trained with, checked.

  `config.text.encoder` (the run's saved config, left unchanged) unless
  `text_encoder_dir` replaces it: the same encoder copied elsewhere after the
  run moved to another machine. Either must give the run's embedding width
  and, when run_info.json recorded one, its fingerprint (same weights, same
  tokenizer); a replacement that cannot be checked so is warned about.
  """
  text_config = config.text
  info = run_record.load(workdir)
  if text_encoder_dir is not None:
    if not text_encoder_dir.strip():
      raise errors.UserError("--text_encoder is empty: give the directory (or "
                             "hub id) of the run's text encoder")
    text_config = ml_collections.ConfigDict(config.text.to_dict())
    text_config.encoder = text_encoder_dir
    if "fingerprint" not in info.get("text_encoder", {}):
      logging.warning(
          "%s: run_info.json records no text encoder fingerprint (a run from "
          "before they were recorded): cannot check that --text_encoder %s "
          "computes the embeddings the run was trained with", workdir,
          text_encoder_dir)
  try:
    encoder = text_encoder.from_config(text_config)
  except hf_checkpoint.CheckpointError as error:
    if text_encoder_dir is not None:
      raise
    raise hf_checkpoint.CheckpointError(
        f"{hf_checkpoint.first_line(error)} (the text encoder {workdir} was "
        "trained with; if it moved, `fuse` and `export` take its new place "
        "with --text_encoder)") from None
  check_text_width(config, encoder, workdir)
  run_record.check_text_encoder(info, encoder.fingerprint, text_config.encoder,
                                workdir)
  return encoder


class Fuser:
  """A trained model, from a bundle or a training workdir, ready to fuse."""

  def __init__(self, config: Any, params: Any,
               encoder: text_encoder.TextEncoder, *, step: int,
               source: str):
    self.config = config
    self.step = step
    self.source = source
    self.encoder = encoder
    check_text_width(config, encoder, source)
    self.mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
    replicated = sharding_lib.replicated(self.mesh)
    self.params = jax.device_put(params, replicated)
    graphdef = model_lib.abstract_model(config.model)[0]
    self._graphdef = graphdef

    def apply(params, vis, ir, text_emb, valid_size, source_means):
      return nnx.merge(graphdef, params)(vis, ir, text_emb, valid_size,
                                         source_means)

    self._apply = jax.jit(apply, out_shardings=replicated)

  @property
  def trained_on_condition_sentences(self) -> bool:
    """Trained with captioned degradations (`input_pipeline.degradations`)."""
    spec = self.config.data.get("degradations")
    return bool(spec and spec.get("enabled"))

  @property
  def model(self) -> model_lib.FusionNet:
    """The network itself (an nnx module holding the parameters)."""
    return nnx.merge(self._graphdef, self.params)

  @classmethod
  def load(cls, path: str, step: int | None = None, *,
           text_encoder_dir: str | None = None) -> Fuser:
    """A bundle (verified first) or a training workdir; `text_encoder_dir`
    replaces a workdir's recorded encoder (see `run_text_encoder`)."""
    if (Path(path) / bundle.PARAMS).exists() and not bundle.is_bundle(path):
      raise bundle.BundleError(f"{path}: has {bundle.PARAMS} but no "
                               f"{bundle.MANIFEST}; not a complete bundle")
    if bundle.is_bundle(path):
      for flag, value in (("--step", step),
                          ("--text_encoder", text_encoder_dir)):
        if value is not None:
          raise errors.UserError(f"{flag} is for training workdirs; {path} "
                                 "is a bundle of one step with its own text "
                                 "encoder")
      return cls.from_bundle(path)
    return cls.from_workdir(path, step, text_encoder_dir=text_encoder_dir)

  @classmethod
  def from_bundle(cls, root: str) -> Fuser:
    manifest = bundle.verify(root)
    config = bundle.load_config(root)
    _, like = model_lib.abstract_model(config.model)
    params = bundle.load(root, nnx.to_pure_dict(like))
    return cls(config, params, text_encoder.from_config(config.text),
               step=int(manifest.get("step", 0)), source=str(root))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *,
                   text_encoder_dir: str | None = None) -> Fuser:
    config = checkpointing.load_saved_config(workdir)
    encoder = run_text_encoder(workdir, config, text_encoder_dir)
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
    trainer = train_step.ShardedTrainer(config, mesh)
    manager = checkpointing.make_manager(
        workdir, save_interval_steps=1, max_to_keep=None, async_save=False,
        create=False)
    state, step = checkpointing.restore(manager, trainer.abstract_state(),
                                        step=step)
    return cls(config, state.params, encoder, step=step, source=str(workdir))

  def fuse(self, vis: np.ndarray, ir: np.ndarray, text_emb: np.ndarray, *,
           tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
           pad_to: tuple[int, int] | None = None) -> np.ndarray:
    """Fused RGB uint8 (H, W, 3) for one pair (float inputs in [0, 1]).

    An image no larger than `tile` runs whole, padded to `pad_to` (its
    bucket from `bucket_shapes`; by default the bucket it gets on its own,
    as when the fuse command is given that one pair); larger ones run in
    overlapping tiles. A grey visible image (equal channels) gives a grey
    fusion: the fused luma in all three channels.
    """
    if pad_to is None and max(vis.shape[:2]) <= tile:
      pad_to = bucket_shapes({"pair": vis.shape[:2]}, tile)["pair"]

    def fuse_batch(vis_tiles, ir_tiles, valid_sizes, means):
      emb = np.repeat(text_emb[None], vis_tiles.shape[0], axis=0)
      return np.asarray(self._apply(self.params, vis_tiles, ir_tiles, emb,
                                    valid_sizes, means))

    fused = tiling.fuse_tiled(fuse_batch, vis, ir, tile=tile, overlap=overlap,
                              batch_size=1, pad_to=pad_to)
    if color.is_grey(vis):
      # A grey visible image has no colour to keep: the text-driven
      # correction's per-channel gains would only tint it.
      fused = np.repeat(fused @ color.RGB_TO_YCBCR[0][:, None], 3, axis=-1)
    return np.clip(np.rint(fused * 255.0), 0, 255).astype(np.uint8)




@dataclasses.dataclass(frozen=True)
class FusedPairs:
  seconds: list[float]  # per fused pair
  failed: list[str]  # one line per pair not decoded or not written
  compiled: list[bool]  # per fused pair: the first of its shape (compiles)

  def times(self) -> tuple[list[float], list[float]]:
    """(seconds of the pairs whose shape was compiled already, seconds of
    the first pair of each shape, compilation included)."""
    warm = [t for t, c in zip(self.seconds, self.compiled) if not c]
    return warm, [t for t, c in zip(self.seconds, self.compiled) if c]


def fuse_pairs(fuser: Fuser, pairs: Sequence[Pair], embeddings: np.ndarray, *,
               tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
               progress: bool = False) -> FusedPairs:
  """Fuses each pair under its row of `embeddings` into `pair.out`.

  Headers were checked up front (`check_sizes`); a file whose data is
  corrupt, or an output that cannot be written (a full disk), fails here.
  The other pairs are still fused, so an output folder is not left half old
  and half new, and every failure is returned.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  shapes = bucket_shapes(check_sizes(pairs), tile)
  seconds, failed, compiled, seen = [], [], [], set()
  for pair, emb in tqdm(list(zip(pairs, embeddings)), unit="pair",
                        disable=not progress):
    try:
      vis, ir = load_pair(pair)
    except errors.UserError as error:
      failed.append(str(error))
      continue
    start = time.perf_counter()
    fused = fuser.fuse(vis, ir, emb, tile=tile, overlap=overlap,
                       pad_to=shapes[pair.name])
    seconds.append(time.perf_counter() - start)
    shape = shapes[pair.name] or ("tiles", tile)  # tiles share one shape
    compiled.append(shape not in seen)
    seen.add(shape)
    try:
      image_io.write_png_atomic(pair.out, fused)
    except OSError as error:
      failed.append(f"{pair.out}: cannot write "
                    f"({error.strerror or error})")
  return FusedPairs(seconds, failed, compiled)
