"""Config -> record sources and their caption embedding tables.

Sources (config.data.source):
  synthetic  the embedded generator (`input_pipeline.synthetic`); eval scenes
             use another seed, so they are held out.
  folder     paired folders (ir/, vi/, captions.jsonl) read directly; several
             roots are joined with ','. Record names are '<root name>/<stem>'.
  tfds       a built `ivf_pairs` TFDS dataset read with tfds.data_source.
  mixture    config.data.mixture's (source, weight) pairs, each source a
             folder or 'tfds:<name>[@<data_dir>]' (default data dir
             config.data.tfds_data_dir), sampled in proportion to the
             weights (grain's MapDataset.mix); records are named
             '<dataset>/<name>', the dataset being the folder's name, the
             data dir's name, or else the TFDS config's.
             Eval: each TFDS source's config.data.eval_split where built,
             plus config.data.eval_dir; metrics.json reports each dataset.
Caption embeddings come from a precomputed store (config.text.embeddings_dir,
written by `textfusion_jax.text.embed_captions`) or are computed once at
startup with the text encoder the caller builds (`create_datasets`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging as _log

from input_pipeline import image_io
from input_pipeline.caption_files import dataset_key
from input_pipeline.captions import CaptionTable
from input_pipeline.captions import SAME_EMBEDDING_COSINE
from input_pipeline.captions import embedding_cosines
from input_pipeline.captions import record_caption_sources
from input_pipeline.captions import record_captions
from input_pipeline.errors import UserError
from input_pipeline.layouts import DEFAULT_SPLIT, SPLITS_FILE

# Eval scenes are drawn from a disjoint seed stream.
_EVAL_SEED_OFFSET = 1_000_003


class ConcatSource(Sequence):
  """Several sources as one; names become '<dataset>/<name>'."""

  def __init__(self, sources: Sequence[tuple[str, Sequence[Any]]]):
    names = [name for name, _ in sources]
    if len(set(names)) != len(names):
      raise UserError(f"dataset names repeat in {names}: give each source "
                      "its own folder or TFDS name")
    for name, source in sources:
      if not len(source):
        raise UserError(f"dataset {name} has no pairs")
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for _, s in self._sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def parts(self) -> list[tuple[str, Sequence[Any]]]:
    return list(self._sources)

  def part_names(self) -> list[str]:
    return [name for name, _ in self._sources]

  def part_offsets(self) -> list[int]:
    return [int(o) for o in self._offsets[:-1]]

  def part_lengths(self) -> list[int]:
    return [len(s) for _, s in self._sources]

  def locate(self, index: int) -> tuple[str, int]:
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self._sources[part][0], index - int(self._offsets[part])

  def _part(self, index: int) -> tuple[str, Sequence[Any], int]:
    dataset, local = self.locate(index)
    return dataset, dict(self._sources)[dataset], local

  def dataset_and_name(self, index: int) -> tuple[str, str]:
    dataset, part, local = self._part(index)
    return dataset, part.record_name(local)

  def record_split(self, index: int) -> str | None:
    """The split a record was read from (None where its part cannot say)."""
    _, part, local = self._part(index)
    return part.record_split(local) if hasattr(part, "record_split") else None

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    dataset, part, local = self._part(index)
    record = dict(part[local])
    record["name"] = f"{dataset}/{record['name']}"
    return record

  def captions(self, index: int) -> list[str]:
    _, part, local = self._part(index)
    return list(part.captions(local))

  def caption_sources(self, index: int) -> list[str]:
    _, part, local = self._part(index)
    return record_caption_sources(part, local)


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
      # Decoded in full once, rather than re-decoding a crop every visit.
      self._cache[index] = {
          k: np.asarray(v) if isinstance(v, image_io.EncodedImage) else v
          for k, v in self._source[index].items()}
    return self._cache[index]

  @property
  def uncached(self) -> Sequence[Any]:
    """The source itself: what reads only captions or embeddings goes
    there, rather than decoding (and keeping) every image."""
    return self._source

  def __getattr__(self, name: str) -> Any:  # captions(), dataset_and_name()
    if name.startswith("_"):  # e.g. while unpickling in a grain worker
      raise AttributeError(name)
    return getattr(self._source, name)


def _split_roots(roots: str) -> list[Path]:
  """config.data.train_dir / eval_dir: folders joined with ','."""
  return [Path(r.strip()) for r in roots.split(",") if r.strip()]


def folder_split(root: str | Path, split: str, slice_undivided: bool = True
                 ) -> str:
  """The split of the folder `root` that a config split reads.

  A folder divided by its splits.json is read at `split`. An undivided one
  is all DEFAULT_SPLIT ('train'): read whole, unless `slice_undivided` and
  `split` slices that split ('train[:80%]', 'train[80%:]': a validation
  split of a folder; config.data.source 'folder').
  """
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  if (Path(root) / SPLITS_FILE).is_file():
    return split
  slices_all = all(base == DEFAULT_SPLIT
                   for base in datasets.base_splits(split))
  return split if slice_undivided and slices_all else DEFAULT_SPLIT


def _folder_parts(roots: str, field: str, split: str = DEFAULT_SPLIT,
                  slice_undivided: bool = True
                  ) -> list[tuple[str, Sequence[Any]]]:
  """Each folder of `roots` at `folder_split(folder, split, ...)`."""
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  paths = _split_roots(roots)
  if not paths:
    raise UserError(f"config.data.{field} is empty but config.data.source is"
                     " 'folder'")
  return [(dataset_key(p), datasets.PairedFolderSource(
      p, split=folder_split(p, split, slice_undivided))) for p in paths]


def _folder_source(roots: str, field: str,
                   split: str = DEFAULT_SPLIT) -> ConcatSource:
  return ConcatSource(_folder_parts(roots, field, split))


MixtureEntry = tuple[str, float]


def weighted_names(value: Any, field: str, example: str
                   ) -> list[tuple[str, float]]:
  """(name, weight) pairs of a config field, weights finite and >= 0; pairs
  of weight 0 are dropped. Each mistake is one line naming the field and
  the entry."""
  if not isinstance(value, (list, tuple)):
    raise UserError(f"{field}={value!r}: give (name, weight) pairs, e.g. "
                    f"{example}")
  entries = []
  for entry in value:
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or
        not isinstance(entry[0], str) or not entry[0]):
      raise UserError(f"{field}: entry {entry!r} is not a (name, weight) "
                      f"pair, e.g. {example}")
    name, weight = entry
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight < 0):
      raise UserError(f"{field}: {name}: weight {weight!r} must be a finite "
                      "number >= 0")
    if weight > 0:
      entries.append((name, float(weight)))
  if value and not entries:
    raise UserError(f"{field}: every weight is 0; nothing to train on")
  # grain scales the weights by 100 / the smallest into integers: 1e-310
  # overflowed that, and a weight under 1e-9 of the largest is never drawn.
  largest = max((weight for _, weight in entries), default=0.0)
  for name, weight in entries:
    if weight < largest * 1e-9:
      raise UserError(f"{field}: {name}: weight {weight!r} is under 1e-9 of "
                      f"the largest ({largest!r}); give 0 to drop it")
  return entries


def check_mixture(mixture: Any) -> list[MixtureEntry]:
  """config.data.mixture as (source, weight) pairs, weights checked; entries
  of weight 0 are dropped."""
  entries = weighted_names(
      mixture, "config.data.mixture",
      "(('tfds:ivf_pairs/llvip', 3), ('/data/msrs', 1))")
  if not entries and not mixture:
    raise UserError("config.data.mixture is empty but config.data.source is "
                    "'mixture'")
  return entries


def _mixture_part(spec: str, config: ml_collections.ConfigDict
                  ) -> tuple[str, Sequence[Any], Sequence[Any] | None]:
  """(dataset name, training source, eval source or None) of one entry."""
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  data = config.data
  if spec.startswith("tfds:"):
    name, _, data_dir = spec[len("tfds:"):].partition("@")
    if not (data_dir or data.tfds_data_dir):
      raise UserError(f"config.data.mixture: {spec}: no data dir; write "
                      "'tfds:<name>@<data_dir>' or set "
                      "config.data.tfds_data_dir")
    label = Path(data_dir).name if data_dir else name.rpartition("/")[2]
    data_dir = data_dir or data.tfds_data_dir
    train = datasets.RecordSource(datasets.load_source(
        name, data.train_split, data_dir), data.train_split)
    try:
      evaluation = datasets.RecordSource(datasets.load_source(
          name, data.eval_split, data_dir), data.eval_split)
    except (KeyError, ValueError):  # built without that split
      evaluation = None
    return label, train, evaluation
  path = Path(spec)
  if not path.is_dir():
    raise UserError(f"config.data.mixture: {spec}: no such folder (a source "
                    "is a folder with ir/ and vi/, or 'tfds:<name>')")
  return dataset_key(path), datasets.PairedFolderSource(path), None


def check_compatible(parts: Sequence[tuple[str, Sequence[Any]]]) -> None:
  """One line naming the datasets if their first records disagree on image
  channels or on the width of stored text embeddings."""
  seen: dict[str, tuple[str, Any]] = {}
  for name, source in parts:
    record = source[0]
    found = {"ir channels": np.shape(record["ir"])[-1],
             "vis channels": np.shape(record["vis"])[-1]}
    if "text_emb" in record:
      found["text dimension"] = np.shape(record["text_emb"])[-1]
    for field, value in found.items():
      first = seen.setdefault(field, (name, value))
      if first[1] != value:
        raise UserError(f"config.data.mixture: {name} has {field} {value} but "
                        f"{first[0]} has {first[1]}")


def _mixture_sources(config: ml_collections.ConfigDict
                     ) -> tuple[Sequence[Any], Sequence[Any], list[float]]:
  entries = check_mixture(config.data.mixture)
  parts = [(spec, weight, *_mixture_part(spec, config))
           for spec, weight in entries]
  check_compatible([(name, train) for _, _, name, train, _ in parts])
  train = ConcatSource([(name, train) for _, _, name, train, _ in parts])
  evals = [(name, ev) for _, _, name, _, ev in parts if ev is not None]
  if config.data.eval_dir:
    # eval_split slices the TFDS sources; the held-out folders are read
    # whole (or at their own splits.json's split), as before.
    evals += _folder_parts(config.data.eval_dir, "eval_dir",
                           config.data.eval_split, slice_undivided=False)
  if not evals:
    raise UserError("config.data.mixture: no eval data: no TFDS source has "
                    f"the split {config.data.eval_split!r} and "
                    "config.data.eval_dir is empty")
  return train, ConcatSource(evals), [w for _, w, *_ in parts]


def mixture_weights(config: ml_collections.ConfigDict) -> list[float] | None:
  """The training mix's weights, in ConcatSource part order (None if the
  source is not a mixture)."""
  if config.data.source != "mixture":
    return None
  return [w for _, w in check_mixture(config.data.mixture)]


def _warn_if_evaluated_on_training_pairs(train: ConcatSource,
                                        evaluation: ConcatSource) -> None:
  """Pairs both trained on and evaluated (a folder in train_dir and eval_dir,
  read whole or at overlapping splits) are not held out."""
  def pair_files(source: ConcatSource) -> dict[Path, str]:
    return {Path(pair.ir).resolve(): name for name, part in source.parts()
            for pair in getattr(part, "pairs", ())}
  trained = pair_files(train)
  shared: dict[str, int] = {}
  for path, name in pair_files(evaluation).items():
    if path in trained:
      shared[name] = shared.get(name, 0) + 1
  for name, count in sorted(shared.items()):
    _log.warning("%s: %d evaluated pairs are trained on too (config.data."
                 "train_dir and eval_dir both read them): their scores are "
                 "not held out", name, count)


# TNO is the field's held-out test set (the README's tables score it).
_HELD_OUT_NAME = re.compile(r"(?:^|[^a-z0-9])tno(?:[^a-z0-9]|$)")


def _names_tno(spec: str) -> bool:
  """Whether a folder's name, or a TFDS build's dataset or config name
  ('tfds:ivf_pairs/tno@DIR', 'ivf_pairs/tno/2.0.0'), says TNO."""
  if spec.startswith("tfds:"):
    name = spec[len("tfds:"):].split("@")[0]
    return any(_HELD_OUT_NAME.search(part.lower())
               for part in name.split("/"))
  return bool(_HELD_OUT_NAME.search(Path(spec).name.lower()))


def _warn_if_training_on_tno(data: ml_collections.ConfigDict) -> None:
  """Said, not refused: a user may hold another TNO split of their own."""
  if data.source == "mixture":
    specs = [str(spec) for spec, _ in check_mixture(data.mixture)]
  elif data.source == "folder":
    specs = [str(path) for path in _split_roots(data.train_dir)]
  elif data.source == "tfds":
    specs = ["tfds:" + str(data.tfds_name)]
  else:
    specs = []
  for spec in specs:
    if _names_tno(spec):
      _log.warning("%s is trained on, and its name says TNO: TNO is the "
                   "held-out test set that fusion methods are compared on, "
                   "so its scores would not be comparable", spec)


def make_sources(config: ml_collections.ConfigDict
                 ) -> tuple[Sequence[Any], Sequence[Any]]:
  data = config.data
  _warn_if_training_on_tno(data)
  if data.source == "mixture":
    train, evaluation, _ = _mixture_sources(config)
    return (CachedSource(train) if data.cache_in_memory else train,
            evaluation)
  if data.source == "synthetic":
    from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
    return (synthetic.SyntheticPairs(data.train_size, data.image_height,
                                     data.image_width, seed=config.seed),
            synthetic.SyntheticPairs(data.eval_size, data.image_height,
                                     data.image_width,
                                     seed=config.seed + _EVAL_SEED_OFFSET))
  if data.source == "folder":
    train = _folder_source(data.train_dir, "train_dir", data.train_split)
    evaluation = _folder_source(data.eval_dir, "eval_dir", data.eval_split)
    _warn_if_evaluated_on_training_pairs(train, evaluation)
    return (CachedSource(train) if data.cache_in_memory else train,
            evaluation)
  if data.source == "tfds":
    from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
    return tuple(
        datasets.RecordSource(datasets.load_source(
            data.tfds_name, split, data.tfds_data_dir), split)
        for split in (data.train_split, data.eval_split))
  raise UserError(f"config.data.source={data.source!r}: use 'synthetic', "
                   "'folder', 'tfds' or 'mixture'")


def _table_from_store(source: Sequence[Any], store: Any,
                      chosen: Sequence[str] = (), first_only: bool = False
                      ) -> tuple[CaptionTable, list[list[str]]]:
  """The table of `source` from a caption store, and each record's caption
  source per row.

  Reads only the `chosen` caption sources (empty: all), or with `first_only`
  only caption 0's source, so the store need not hold the others (e.g. a
  caption file added after it was built that config.data.caption_sources
  leaves out).
  """
  if not hasattr(source, "dataset_and_name"):
    raise UserError("config.text.embeddings_dir needs config.data.source="
                     "'folder' or 'mixture' (store keys are <dataset>/<name>)")
  rows, per_record = [], []
  for i in range(len(source)):
    dataset, name = source.dataset_and_name(i)
    split = source.record_split(i)
    record_rows, record_sources = [], []
    sources_now = record_caption_sources(source, i)
    captions_now = record_captions(source, i)
    wanted = [s for s in dict.fromkeys(sources_now)
              if not chosen or s in chosen]
    for caption_source in wanted[:1] if first_only else wanted:
      found = store.rows(dataset, name, caption_source, split)
      stale = store.check_current(
          f"{dataset}/{name} ({caption_source})", found,
          [c for c, s in zip(captions_now, sources_now) if s == caption_source])
      if stale:
        raise UserError(stale)
      record_rows += found
      record_sources += [caption_source] * len(found)
    if not record_rows and sources_now:
      raise UserError(
          f"config.data.caption_sources: {dataset}/{name} has no captions "
          f"from {', '.join(chosen)} (it has "
          f"{', '.join(sorted(set(sources_now)))})")
    if not record_rows:
      raise UserError(
          f"{dataset}/{name}: no captions (no line in the dataset's caption "
          "files, or an empty list), so the store has no embedding for it; "
          "caption it, or leave it out of the folder")
    rows.append(np.asarray(record_rows, np.int32))
    per_record.append(record_sources)
  return (CaptionTable(np.asarray(store.table, np.float32), tuple(rows)),
          per_record)


def check_caption_sources(value: Any) -> list[tuple[str, float]]:
  """config.data.caption_sources as (source, weight) pairs (weight 0
  drops a source); empty: every caption, uniformly."""
  return weighted_names(value or (), "config.data.caption_sources",
                        "(('default', 1), ('blip', 3))")


def _caption_sampling(config: ml_collections.ConfigDict) -> bool:
  """Whether captions are drawn by source weight."""
  sampling = config.data.get("caption_sampling", "uniform")
  if sampling not in ("uniform", "weighted"):
    raise UserError(f"config.data.caption_sampling={sampling!r}: use "
                    "'uniform' or 'weighted'")
  return sampling == "weighted"


def _record_label(source: Sequence[Any]) -> Callable[[int], str]:
  """How errors name a record: '<dataset>/<stem>', or for one build its
  index and stem (read only when an error names it)."""
  if hasattr(source, "dataset_and_name"):
    return lambda i: "/".join(source.dataset_and_name(i))
  if hasattr(source, "record_name"):
    return lambda i: f"record {i} ({source.record_name(i)!r})"
  return lambda i: f"record {i}"


def _dataset_of(source: Sequence[Any]) -> Callable[[int], str]:
  if hasattr(source, "dataset_and_name"):
    return lambda i: source.dataset_and_name(i)[0]
  return lambda i: "the dataset"


class TextEncoderLike(Protocol):
  """What caption embedding needs of a text encoder (duck-typed, so this
  package never imports the model code)."""
  embed_dim: int
  fingerprint: str  # what it computes (`textfusion_jax.text.encoder`)

  def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


def _baked_table(source: Sequence[Any], encoder: TextEncoderLike
                 ) -> CaptionTable | None:
  """The caption embeddings the records carry ('text_emb', copied from a
  caption store by `build_dataset --text_emb`), so that a large dataset is
  not embedded again at every start; None (embed the captions) when they
  are absent, incomplete, or not what `encoder` makes of the first record's
  captions of each part (a store from another encoder: each build of a
  mixture may come from its own)."""
  if not len(source):
    return None
  firsts = (source.part_offsets() if hasattr(source, "part_offsets")
            else [0])
  for first in firsts:
    record = source[first]
    if "text_emb" not in record:
      return None
    baked = np.asarray(record["text_emb"], np.float32)
    captions = record_captions(source, first)
    if (baked.ndim != 2 or baked.shape[0] != len(captions) or
        not len(baked) or baked.shape[1] != encoder.embed_dim):
      return None
    probe = encoder.encode(captions, batch_size=len(baked))
    if float(embedding_cosines(probe, baked).min()) < SAME_EMBEDDING_COSINE:
      label = (f" of {source.locate(first)[0]}" if hasattr(source, "locate")
               else "")
      _log.warning("the records' caption embeddings%s were made by another "
                   "text encoder than config.text.encoder; embedding the "
                   "captions", label)
      return None
  try:
    return CaptionTable.from_source(source)
  except (ValueError, KeyError):  # a record without captions or embeddings
    return None  # (e.g. a mixture of a build with them and a folder)


def same_text_encoder(a: str, b: str) -> bool:
  """The same hub id or name, or the same local directory."""
  if a == b:
    return True
  return Path(a).is_dir() and Path(b).is_dir() and (
      Path(a).resolve() == Path(b).resolve())


def make_caption_tables(config: ml_collections.ConfigDict,
                        make_encoder: Callable[[], TextEncoderLike],
                        *sources: Sequence[Any]
                        ) -> tuple[CaptionTable, ...]:
  """One CaptionTable per source, then the embedding width.

  The first source is the training source: config.data.caption_sources
  selects its captions and config.data.caption_sampling how they are drawn.

  From the precomputed store `config.text.embeddings_dir`, or else by
  embedding every caption once with `make_encoder()`.
  """
  # A mixture of builds with baked embeddings read every record for them:
  # through the cache, that decoded every image at startup, in a process
  # that may never train on them (grain's workers keep their own caches).
  sources = tuple(getattr(s, "uncached", s) for s in sources)
  chosen = check_caption_sources(config.data.get("caption_sources", ()))
  weighted = _caption_sampling(config)
  if weighted and not chosen:
    raise UserError("config.data.caption_sampling='weighted' needs "
                    "config.data.caption_sources (source, weight) pairs")
  if config.text.embeddings_dir:
    from input_pipeline.caption_store import CaptionEmbeddings  # pylint: disable=g-import-not-at-top
    store = CaptionEmbeddings.load(config.text.embeddings_dir)
    store.check_dim(config.model.text_dim)
    # By contents, not by name: the folder config.text.encoder names may
    # hold other weights than when the store was made.
    encoder = make_encoder()
    if store.manifest.get("encoder_fingerprint") != encoder.fingerprint:
      store.check_encoder(config.text.encoder, encoder)
    # Training reads the chosen caption sources; eval sets read caption 0.
    built = [_table_from_store(sources[0], store, [n for n, _ in chosen])]
    built += [_table_from_store(s, store, first_only=True)
              for s in sources[1:]]
    dim = store.dim
  else:
    encoder = make_encoder()

    def embed(texts: list[str]) -> np.ndarray:
      return encoder.encode(texts, batch_size=config.text.batch_size)

    def table_of(source: Sequence[Any]) -> CaptionTable:
      baked = _baked_table(source, encoder)
      return (CaptionTable.from_source(source, embed, _record_label(source))
              if baked is None else baked)

    built = [(table_of(s), [record_caption_sources(s, i)
                            for i in range(len(s))])
             for s in sources]
    dim = encoder.embed_dim
  if not chosen:
    return (*(table for table, _ in built), dim)
  # The training source (the first) draws among the chosen caption sources;
  # eval sets keep their own captions (caption 0), as they may have others.
  (table, per_record), *others = built
  table = table.select_sources(per_record, chosen, weighted,
                               _record_label(sources[0]),
                               _dataset_of(sources[0]))
  return (table, *(t for t, _ in others), dim)
