"""Data for textfusion-jax: sources, caption embeddings and grain pipelines.

`create_datasets(config, make_encoder)` is the one entry point for training.
This package never imports `textfusion_jax` (tests/test_layout.py checks it);
the model code imports it.

  sources         config -> record sources (synthetic, folders, TFDS, mixtures)
  pipeline        grain train iterator and eval batches
  captions        per-pair caption choice and the caption embedding table
  caption_files   reading captions.jsonl files
  caption_store   precomputed caption embeddings on disk
  image_io        image reading and atomic PNG writing
  files           atomic file writes
  layouts         folder layouts of the public datasets
  datasets        paired-folder and TFDS record sources, the TFDS builder
  build_dataset   the CLI that builds TFDS datasets
  synthetic       the embedded synthetic scene generator
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
from input_pipeline.errors import UserError


class TextDimError(UserError):
  """The caption embeddings do not have the width the model expects."""


@dataclasses.dataclass
class Datasets:
  # Iterator of this process's batches from global batch k on (a grain
  # iterator: checkpointable too); batch k is a pure function of (config, k).
  train_iter_at: Callable[[int], Iterator[Mapping[str, Any]]]
  eval_batches: Callable[[], Iterator[Mapping[str, Any]]]
  text_dim: int
  text_stats: tuple[np.ndarray, np.ndarray]  # train caption embedding mean, std
  # The text encoder's `fingerprint` (what it computes; None for an encoder
  # without one): the run records it, so that a changed checkpoint folder
  # is not taken for the one it trained with.
  text_encoder_fingerprint: str | None = None


def create_datasets(config: ml_collections.ConfigDict,
                    make_encoder: Callable[[], Any]) -> Datasets:
  """Train iterator, eval batches and caption statistics for `config`.

  make_encoder: builds the text encoder (`.encode(texts, batch_size)`,
  `.embed_dim`, `.fingerprint`), at most once. Precomputed captions (a
  store, or embeddings baked into the records) are checked against it.
  """
  # pylint: disable=g-import-not-at-top
  import functools
  from input_pipeline import pipeline
  from input_pipeline import sources
  make_encoder = functools.cache(make_encoder)  # built at most once
  degrade = bool(config.data.get("degradations") and
                 config.data.degradations.enabled)
  if degrade and config.data.source == "synthetic":
    raise UserError("config.data.degradations.enabled needs real pairs "
                    "(config.data.source 'folder' or 'tfds'): synthetic "
                    "scenes come degraded and captioned already")
  reference = config.get("loss", {}).get("reference", 0.0)
  if reference and not degrade:
    raise UserError(f"config.loss.reference={reference!r} needs "
                    "config.data.degradations.enabled=True: the reference is "
                    "the fusion of the clean crop under \"clean visible "
                    "image\"")
  train_source, eval_source = sources.make_sources(config)
  if config.data.shuffle_captions_across_pairs:
    for split, source in (("train", train_source), ("eval", eval_source)):
      if len(source) < 2:  # a derangement moves every caption elsewhere
        raise UserError(
            f"config.data.shuffle_captions_across_pairs needs at least 2 "
            f"{split} pairs to give each another's captions; the {split} "
            f"data has {len(source)}")
  if degrade:
    # Every prompt is a condition sentence: the pairs' own captions are
    # neither embedded nor needed (a pair may have none).
    degradation, table_train, table_eval = _degradation_prompts(
        config, make_encoder(), len(train_source), len(eval_source))
    text_dim = table_train.dim
    table = degradation.condition_table.astype(np.float64)
    text_stats = (table.mean(0).astype(np.float32),
                  table.std(0).astype(np.float32))
  else:
    table_train, table_eval, text_dim = sources.make_caption_tables(
        config, make_encoder, train_source, eval_source)
    degradation, text_stats = None, table_train.statistics()
  if text_dim != config.model.text_dim:
    raise TextDimError(
        f"config.model.text_dim={config.model.text_dim} but the text encoder "
        f"{config.text.encoder!r} gives {text_dim}-d embeddings")
  shuffle_captions = config.data.shuffle_captions_across_pairs

  def train_iter_at(start_batch: int) -> Iterator[dict[str, Any]]:
    return iter(pipeline.make_train_dataset(
        train_source, global_batch_size=config.train.batch_size,
        crop_size=config.data.crop_size, seed=config.seed,
        caption_table=table_train,
        shuffle_captions_across_pairs=shuffle_captions,
        degradation=degradation, worker_count=config.data.worker_count,
        worker_buffer_size=config.data.prefetch_buffer_size,
        start_batch=start_batch,
        mixture_weights=sources.mixture_weights(config)))

  def eval_batches() -> Iterator[dict[str, Any]]:
    return pipeline.make_eval_batches(
        eval_source, batch_size=config.eval.batch_size,
        caption_table=table_eval,
        shuffle_captions_across_pairs=shuffle_captions,
        max_records=config.eval.max_images or None)

  return Datasets(train_iter_at=train_iter_at, eval_batches=eval_batches,
                  text_dim=text_dim, text_stats=text_stats,
                  text_encoder_fingerprint=getattr(make_encoder(),
                                                   "fingerprint", None))


def _degradation_prompts(config: ml_collections.ConfigDict, encoder: Any,
                         num_train: int, num_eval: int
                         ) -> tuple[Any, Any, Any]:
  """The 64 condition sentences embedded for training, and train and eval
  tables that prompt every pair with "clean visible image" (a training
  crop's prompt is then replaced by its condition sentence)."""
  # pylint: disable=g-import-not-at-top
  from input_pipeline import degradations
  from input_pipeline import pipeline
  from input_pipeline.captions import CaptionTable
  probs = degradations.check_level_probs(
      config.data.degradations.level_probs,
      "config.data.degradations.level_probs")
  sentences = [degradations.condition_sentence(levels)
               for levels in degradations.all_levels()]
  table = np.asarray(encoder.encode(sentences,
                                    batch_size=config.text.batch_size),
                     np.float32)
  renamed_prob = config.data.degradations.get("renamed_prob", 0.0)
  if (not isinstance(renamed_prob, (int, float)) or
      not 0.0 <= renamed_prob <= 1.0):
    raise UserError(f"config.data.degradations.renamed_prob={renamed_prob!r}:"
                    " give a probability in [0, 1]")
  wiener_target = config.data.degradations.get("wiener_target", False)
  if not isinstance(wiener_target, bool):
    raise UserError("config.data.degradations.wiener_target="
                    f"{wiener_target!r}: give True or False")
  wiener_kind = config.data.degradations.get("wiener_kind", "contrast")
  if wiener_kind not in degradations.WIENER_KINDS:
    raise UserError(f"config.data.degradations.wiener_kind={wiener_kind!r}: "
                    f"one of {', '.join(degradations.WIENER_KINDS)}")
  if wiener_kind != "contrast" and not wiener_target:
    raise UserError(f"config.data.degradations.wiener_kind={wiener_kind!r} "
                    "needs config.data.degradations.wiener_target=True")
  renamed_kinds = degradations.check_renamed_kinds(
      config.data.degradations.get("renamed_kinds",
                                   degradations.DEFAULT_RENAMED_KINDS),
      "config.data.degradations.renamed_kinds")
  renamed_reference = degradations.check_renamed_reference(
      config.data.degradations.get("renamed_reference",
                                   "fuse_prompted_target"),
      renamed_kinds, "config.data.degradations.renamed_reference")
  if renamed_reference == "prompted_fusion" and not (
      renamed_prob and config.loss.get("reference", 0.0)):
    # It would only add an image to every batch.
    raise UserError("config.data.degradations.renamed_reference="
                    "'prompted_fusion' changes nothing without "
                    "config.data.degradations.renamed_prob > 0 and "
                    "config.loss.reference > 0")
  renamed_max_kinds = degradations.check_renamed_max_kinds(
      config.data.degradations.get("renamed_max_kinds", 1), renamed_kinds,
      "config.data.degradations.renamed_max_kinds")
  spec = pipeline.DegradationSpec(tuple(probs), table, float(renamed_prob),
                                  wiener_target, wiener_kind, renamed_kinds,
                                  renamed_reference, renamed_max_kinds)
  clean = table[degradations.levels_index((0, 0, 0))][None]

  def clean_table(count: int) -> CaptionTable:
    return CaptionTable(clean, tuple(np.zeros(1, np.int32)
                                     for _ in range(count)),
                        (degradations.CLEAN,))

  return spec, clean_table(num_train), clean_table(num_eval)
