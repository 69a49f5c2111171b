"""Fuse infrared/visible pairs with a trained model and a text prompt.

  python -m textfusion_jax.fuse --checkpoint WORKDIR --ir ir.png --vis vis.png \
      --text "two pedestrians on a dark street" --out fused.png
  python -m textfusion_jax.fuse --checkpoint WORKDIR --ir IR_DIR --vis VIS_DIR \
      --captions captions.jsonl --out OUT_DIR

--checkpoint is a model bundle (`python -m textfusion_jax.export`, e.g. the
shipped pretrained/textfusion-small), verified against its manifest before
anything is loaded, or a training workdir (whose text encoder, if it moved
since training, --text_encoder names). Directories are matched by file
stem. With --captions, each pair uses its own caption (index --caption_index
of its captions.jsonl line; with --caption_split S, of its line tagged
"split": S where it has one); --text gives one prompt for all. Images up to
--tile pixels a side run whole, padded into a few bucket shapes (one
compilation each, whatever the mix of sizes); larger ones are fused in
overlapping tiles, so memory stays bounded. Output: colour PNGs the size of
the visible input, each written atomically. --out may not be an input. A
file whose header cannot be read (not an image at all), or a pair of unequal
sizes, stops the run before anything is fused, naming every such file. A
pair whose pixel data does not decode (a truncated file), or whose output
cannot be written, is skipped; the others are fused, and the skipped ones
are named in one error line (exit status 2). A prompt longer than the
text encoder's limit (77 tokens) is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from absl import flags
from absl import logging

from textfusion_jax import errors
from input_pipeline import degradations
from input_pipeline import image_io
from textfusion_jax import inference
from textfusion_jax import tiling

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A model bundle (python -m textfusion_jax.export) or "
    "a training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder", None, "For a workdir: where its text encoder is now, if "
    "it moved (it must compute the embeddings the run was trained with).")
_IR = flags.DEFINE_string("ir", None, "Infrared image or directory.")
_VIS = flags.DEFINE_string("vis", None, "Visible image or directory.")
_TEXT = flags.DEFINE_string("text", None, "One prompt for every pair.")
_CAPTIONS = flags.DEFINE_string("captions", None,
                                "captions.jsonl with a caption per pair.")
_CAPTION_INDEX = flags.DEFINE_integer("caption_index", 0,
                                      "Which caption of each line to use.",
                                      lower_bound=0)
_CAPTION_SPLIT = flags.DEFINE_string(
    "caption_split", None, "Use the --captions lines tagged with this "
    "\"split\" (else the untagged ones).")
_OUT = flags.DEFINE_string("out", None, "Output PNG (or directory).")
_TILE = flags.DEFINE_integer(
    "tile", inference.DEFAULT_TILE, "Images up to this size run whole; larger"
    " ones in tiles of this size (at least 32; below 256 the result drifts "
    "from the whole-image fusion).")
_OVERLAP = flags.DEFINE_integer("overlap", inference.DEFAULT_OVERLAP,
                                "Tile overlap in pixels (0 to tile / 2).")


def main(argv: Sequence[str]) -> None:
  del argv  # (stray words: refused by errors.run_cli)
  logging.set_verbosity(logging.WARNING)  # orbax/jax info lines are noise here
  for name, value in (("--checkpoint", _CHECKPOINT.value), ("--ir", _IR.value),
                      ("--vis", _VIS.value), ("--out", _OUT.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  if _TEXT.value is not None and not _TEXT.value.strip():
    raise errors.UserError("--text is empty: give a prompt, e.g. "
                           f"{degradations.CLEAN!r} or a scene description")
  if bool(_TEXT.value) == bool(_CAPTIONS.value):
    raise errors.UserError("give exactly one of --text or --captions")
  if _CAPTION_SPLIT.value is not None and not _CAPTIONS.value:
    raise errors.UserError("--caption_split needs --captions")
  tiling.check_tiling(_TILE.value, _OVERLAP.value)
  if _TILE.value < tiling.SMALL_TILE:
    print(f"warning: --tile={_TILE.value}: an image larger than a tile is "
          "fused tile by tile, and the attention of a small tile sees little "
          "of the scene: expect visible differences from the whole-image "
          f"fusion below {tiling.SMALL_TILE} pixels", file=sys.stderr)
  if _OVERLAP.value < tiling.SMALL_OVERLAP:
    print(f"warning: --overlap={_OVERLAP.value}: tiles blended over fewer "
          f"than {tiling.SMALL_OVERLAP} pixels show seams along their borders "
          "in an image larger than a tile (measured: up to 25 levels with no "
          f"overlap; the default is {inference.DEFAULT_OVERLAP})",
          file=sys.stderr)
  pairs = inference.collect_pairs(_IR.value, _VIS.value, _OUT.value)
  sixteen_bit: list[str] = []
  inference.check_sizes(pairs, sixteen_bit)  # before the model loads
  if sixteen_bit:
    print(image_io.sixteen_bit_note(sixteen_bit))
  prompts = ([_TEXT.value] * len(pairs) if _TEXT.value else
             inference.read_captions(_CAPTIONS.value, [p.name for p in pairs],
                                     _CAPTION_INDEX.value,
                                     _CAPTION_SPLIT.value))
  fuser = inference.Fuser.load(_CHECKPOINT.value, _STEP.value,
                               text_encoder_dir=_TEXT_ENCODER.value)
  fuser.encoder.check_fits(prompts, (
      ["--text"] * len(prompts) if _TEXT.value else
      [f"{_CAPTIONS.value}: caption {_CAPTION_INDEX.value} of {p.name!r}"
       for p in pairs]))
  _warn_if_off_grammar(fuser, prompts)
  result = inference.fuse_pairs(fuser, pairs, fuser.encoder.encode(prompts),
                                tile=_TILE.value, overlap=_OVERLAP.value,
                                progress=True)
  if result.seconds:
    warm, first = result.times()
    # (Counted as written: a pair fused but not written is in `failed`.)
    print(f"fused {len(pairs) - len(result.failed)} pair(s) with checkpoint "
          f"step {fuser.step} -> {_OUT.value}; "
          + (f"{1000 * np.mean(warm):.1f} ms/pair once compiled; "
             if warm else "")
          + f"{len(first)} shape(s) compiled, the first pair of each in "
          f"{1000 * np.mean(first):.1f} ms/pair")
  if result.failed:
    raise errors.UserError(f"{len(result.failed)} of {len(pairs)} pair(s) not "
                           "fused or not written: " + "; ".join(result.failed))


def _warn_if_off_grammar(fuser: inference.Fuser, prompts: list[str]) -> None:
  """Once: a model trained on condition sentences met other prompts."""
  if not fuser.trained_on_condition_sentences:
    return
  other = [p for p in prompts if degradations.parse_condition(p) is None]
  if other:
    print(f"warning: {len(other)} prompt(s) are not condition sentences "
          f"(first: {other[0]!r}); this model was trained on prompts such as "
          "'heavily underexposed, slightly noisy visible image' (grammar: "
          "input_pipeline/degradations.py) and fuses others as given",
          file=sys.stderr)


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
