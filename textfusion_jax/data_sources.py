"""Config -> record sources, caption embedding tables and grain iterators.

Sources (config.data.source):
  synthetic  the embedded generator (`input_pipeline.synthetic`); eval scenes
             use another seed, so they are held out.
  folder     paired folders (ir/, vi/, captions.jsonl) read directly; several
             roots are joined with ','. Record names are '<root name>/<stem>'.
  tfds       a built `ivf_pairs` TFDS dataset read with tfds.data_source.
Caption embeddings come from a precomputed store (config.text.embeddings_dir,
written by `textfusion_jax.text.embed_captions`) or are computed once at
startup with the configured text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from input_pipeline import pipeline
from input_pipeline.captions import CaptionTable
from textfusion_jax import text_setup

# Eval scenes are drawn from a disjoint seed stream.
_EVAL_SEED_OFFSET = 1_000_003


class ConcatSource(Sequence):
  """Several folder sources as one; names become '<dataset>/<stem>'."""

  def __init__(self, sources: Sequence[tuple[str, Sequence[Any]]]):
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for _, s in self._sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def locate(self, index: int) -> tuple[str, int]:
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self._sources[part][0], index - int(self._offsets[part])

  def dataset_and_name(self, index: int) -> tuple[str, str]:
    dataset, local = self.locate(index)
    part = dict(self._sources)[dataset]
    return dataset, part.pairs[local].name

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    dataset, local = self.locate(index)
    record = dict(dict(self._sources)[dataset][local])
    record["name"] = f"{dataset}/{record['name']}"
    return record

  def captions(self, index: int) -> list[str]:
    dataset, local = self.locate(index)
    return list(dict(self._sources)[dataset].pairs[local].captions)


class CachedSource(Sequence):
  """Keeps decoded records in memory: small real datasets decode once.

  Built lazily per process (grain workers each hold their own copy).
  """

  def __init__(self, source: Sequence[Any]):
    self._source = source
    self._cache: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    if index not in self._cache:
      self._cache[index] = self._source[index]
    return self._cache[index]

  def __getattr__(self, name: str) -> Any:  # captions(), dataset_and_name()
    return getattr(self._source, name)


def _folder_source(roots: str, field: str) -> ConcatSource:
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  paths = [Path(r) for r in roots.split(",") if r.strip()]
  if not paths:
    raise ValueError(f"config.data.{field} is empty but config.data.source is"
                     " 'folder'")
  return ConcatSource([(p.name, datasets.PairedFolderSource(p))
                       for p in paths])


def make_sources(config: ml_collections.ConfigDict
                 ) -> tuple[Sequence[Any], Sequence[Any]]:
  data = config.data
  if data.source == "synthetic":
    from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
    return (synthetic.SyntheticPairs(data.train_size, data.image_height,
                                     data.image_width, seed=config.seed),
            synthetic.SyntheticPairs(data.eval_size, data.image_height,
                                     data.image_width,
                                     seed=config.seed + _EVAL_SEED_OFFSET))
  if data.source == "folder":
    train = _folder_source(data.train_dir, "train_dir")
    return (CachedSource(train) if data.cache_in_memory else train,
            _folder_source(data.eval_dir, "eval_dir"))
  if data.source == "tfds":
    from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
    return tuple(
        datasets.RecordSource(datasets.load_source(
            data.tfds_name, split, data.tfds_data_dir))
        for split in (data.train_split, data.eval_split))
  raise ValueError(f"config.data.source={data.source!r}: use 'synthetic', "
                   "'folder' or 'tfds'")


def _table_from_store(source: Sequence[Any], store: Any) -> CaptionTable:
  if not hasattr(source, "dataset_and_name"):
    raise ValueError("config.text.embeddings_dir needs config.data.source="
                     "'folder' (store keys are <dataset>/<name>)")
  rows = tuple(np.asarray(store.rows(*source.dataset_and_name(i)), np.int32)
               for i in range(len(source)))
  return CaptionTable(np.asarray(store.table, np.float32), rows)


def make_caption_tables(config: ml_collections.ConfigDict,
                        *sources: Sequence[Any]
                        ) -> tuple[CaptionTable, ...]:
  """One CaptionTable per source, then the embedding width."""
  if config.text.embeddings_dir:
    from textfusion_jax.text.caption_store import CaptionEmbeddings  # pylint: disable=g-import-not-at-top
    store = CaptionEmbeddings.load(config.text.embeddings_dir)
    store.check_dim(config.model.text_dim)
    tables = [_table_from_store(s, store) for s in sources]
    return (*tables, store.dim)
  encoder = text_setup.build_text_encoder(config.text)

  def embed(texts: list[str]) -> np.ndarray:
    return encoder.encode(texts, batch_size=config.text.batch_size)

  tables = [CaptionTable.from_source(s, embed) for s in sources]
  return (*tables, encoder.embed_dim)


def make_train_iterator(config: ml_collections.ConfigDict,
                        source: Sequence[Any], table: CaptionTable) -> Any:
  dataset = pipeline.make_train_dataset(
      source, global_batch_size=config.train.batch_size,
      crop_size=config.data.crop_size, seed=config.seed, caption_table=table,
      shuffle_captions_across_pairs=config.data.shuffle_captions_across_pairs,
      worker_count=config.data.worker_count,
      worker_buffer_size=config.data.prefetch_buffer_size)
  return iter(dataset)


def make_eval_batches_fn(config: ml_collections.ConfigDict,
                         source: Sequence[Any], table: CaptionTable
                         ) -> Callable[[], Iterator[dict[str, Any]]]:
  def batches():
    return pipeline.make_eval_batches(
        source, batch_size=config.eval.batch_size, caption_table=table,
        shuffle_captions_across_pairs=config.data.shuffle_captions_across_pairs,
        max_records=config.eval.max_images or None)
  return batches
