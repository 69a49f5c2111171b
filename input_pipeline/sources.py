"""Config -> record sources and their caption embedding tables.

Sources (config.data.source):
  synthetic  the embedded generator (`input_pipeline.synthetic`); eval scenes
             use another seed, so they are held out.
  folder     paired folders (ir/, vi/, captions.jsonl) read directly; several
             roots are joined with ','. Record names are '<root name>/<stem>'.
  tfds       a built `ivf_pairs` TFDS dataset read with tfds.data_source.
Caption embeddings come from a precomputed store (config.text.embeddings_dir,
written by `textfusion_jax.text.embed_captions`) or are computed once at
startup with the text encoder the caller builds (`create_datasets`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np

from input_pipeline.captions import CaptionTable
from input_pipeline.errors import UserError

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
    raise UserError(f"config.data.{field} is empty but config.data.source is"
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
  raise UserError(f"config.data.source={data.source!r}: use 'synthetic', "
                   "'folder' or 'tfds'")


def _table_from_store(source: Sequence[Any], store: Any) -> CaptionTable:
  if not hasattr(source, "dataset_and_name"):
    raise UserError("config.text.embeddings_dir needs config.data.source="
                     "'folder' (store keys are <dataset>/<name>)")
  rows = tuple(np.asarray(store.rows(*source.dataset_and_name(i)), np.int32)
               for i in range(len(source)))
  return CaptionTable(np.asarray(store.table, np.float32), rows)


class TextEncoderLike(Protocol):
  """What caption embedding needs of a text encoder (duck-typed, so this
  package never imports the model code)."""
  embed_dim: int

  def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


def make_caption_tables(config: ml_collections.ConfigDict,
                        make_encoder: Callable[[], TextEncoderLike],
                        *sources: Sequence[Any]
                        ) -> tuple[CaptionTable, ...]:
  """One CaptionTable per source, then the embedding width.

  From the precomputed store `config.text.embeddings_dir`, or else by
  embedding every caption once with `make_encoder()`.
  """
  if config.text.embeddings_dir:
    from input_pipeline.caption_store import CaptionEmbeddings  # pylint: disable=g-import-not-at-top
    store = CaptionEmbeddings.load(config.text.embeddings_dir)
    store.check_dim(config.model.text_dim)
    tables = [_table_from_store(s, store) for s in sources]
    return (*tables, store.dim)
  encoder = make_encoder()

  def embed(texts: list[str]) -> np.ndarray:
    return encoder.encode(texts, batch_size=config.text.batch_size)

  tables = [CaptionTable.from_source(s, embed) for s in sources]
  return (*tables, encoder.embed_dim)
