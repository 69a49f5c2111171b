r"""Precomputes CLIP text embeddings of caption files into a caption store.

  python -m textfusion_jax.text.embed_captions --encoder PATH_OR_HUB_ID \
      --captions data/llvip/captions.jsonl --captions data/msrs/captions.jsonl \
      --out DIR [--batch_size 64] [--shard_size 4096] [--overwrite]
  textfusion-embed-captions ...   (the same, once the package is installed)

Distinct captions are embedded once, in shards written atomically; a rerun
resumes. In a multi-host job (--distributed) every process runs the same
command. See `textfusion_jax.text.caption_embedding`.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from input_pipeline import caption_files
from textfusion_jax import distributed
from textfusion_jax import errors
from textfusion_jax.text import caption_embedding

_ENCODER = flags.DEFINE_string(
    "encoder", None, "CLIP checkpoint directory, Hugging Face hub id, or "
    "'tiny-random' (the configs' built-in encoder).")
_CAPTIONS = flags.DEFINE_multi_string(
    "captions", [], "A captions.jsonl file (repeat for more).")
_DATASET = flags.DEFINE_multi_string(
    "dataset", [], "Dataset key per --captions file, in order (default: the "
    "file's parent directory name).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Captions per device "
                                   "call.", lower_bound=1)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Captions per shard.",
                                   lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype.")
_MAX_SHARDS = flags.DEFINE_integer(
    "max_shards", None, "Stop after embedding this many shards.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a finished caption store at --out that holds "
    "another encoder's embeddings or datasets this run does not embed (a "
    "store of the same encoder and datasets is updated without it).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the multi-host job JAX detects (Cloud TPU "
    "pod, SLURM, Open MPI) first: run the same command on every host.")

logger = logging.getLogger(caption_embedding.__name__)


def main(argv: Sequence[str]) -> None:
  del argv  # (stray words: refused by errors.run_cli)
  for name, value in (("--encoder", _ENCODER.value),
                      ("--captions", _CAPTIONS.value), ("--out", _OUT.value)):
    if not value:
      raise errors.UserError(f"{name} is required")
  if _DATASET.value and len(_DATASET.value) != len(_CAPTIONS.value):
    raise errors.UserError("--dataset needs one name per --captions file")
  logging.basicConfig(format="%(levelname)s %(message)s")
  logger.setLevel(logging.INFO)  # our progress notes, not every library's
  datasets = _DATASET.value or [None] * len(_CAPTIONS.value)
  # Before a large encoder loads.
  caption_embedding.check_out(Path(_OUT.value))
  if _DISTRIBUTED.value:
    distributed.initialize(
        auto=True, auto_flag="--distributed",
        auto_remedy="run it inside such a job, or drop --distributed")
  # pylint: disable=g-import-not-at-top
  from textfusion_jax.text import encoder as encoder_lib
  # Caption files first: a bad line should not wait for a large encoder.
  records = caption_files.read_caption_files(
      list(zip(datasets, _CAPTIONS.value)))
  encoder = encoder_lib.from_config(
      types.SimpleNamespace(encoder=_ENCODER.value, dtype=_DTYPE.value),
      mesh=encoder_lib.data_mesh())
  store = caption_embedding.run(
      encoder, records, _OUT.value, batch_size=_BATCH_SIZE.value,
      shard_size=_SHARD_SIZE.value, max_shards=_MAX_SHARDS.value,
      overwrite=_OVERWRITE.value)
  if store is not None:
    logger.info("wrote %d distinct caption embeddings (dim %d) to %s",
                store.table.shape[0], store.dim, _OUT.value)


def run() -> None:
  errors.run_cli(main)


if __name__ == "__main__":
  run()
