"""Precomputed caption embeddings on disk, and the input pipeline's loader.

A store is a directory written by `textfusion_jax.text.embed_captions`:

  manifest.json    format, version, encoder (path or hub id), dim, counts,
                   source files; written last, so its presence means complete
  embeddings.npy   (num_unique, dim) float32, one row per distinct caption
  index.json       {dataset: {name: [row of caption 0, row of caption 1, ...]}}
                   ('<split>/<name>' for a caption line tagged with a split)
  texts.json       the distinct captions, row order (for inspection only)

Identical captions share a row. `dataset` is the caption file's parent
directory name unless given, e.g. 'llvip'. Caption sources other than
'default' (`caption_files.source_of`: captions_<source>.jsonl) are keyed
'<dataset>@<source>' in index.json (`store_key`), so a store of one source
reads as before. A caption line tagged with a split (`caption_files`) is
keyed '<split>/<name>' (`name_key`; stems hold no '/'); `rows` prefers it to
the untagged line, as the caption files' readers do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from input_pipeline import files
from input_pipeline import captions
from input_pipeline.caption_files import DEFAULT_SOURCE
from input_pipeline.errors import UserError

FORMAT = "textfusion-caption-embeddings"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLE_FILE = "embeddings.npy"
INDEX_FILE = "index.json"
TEXTS_FILE = "texts.json"


def store_key(dataset: str, source: str = DEFAULT_SOURCE) -> str:
  """index.json's key of a dataset's caption source."""
  return dataset if source == DEFAULT_SOURCE else f"{dataset}@{source}"


def name_key(name: str, split: str | None = None) -> str:
  """index.json's key of a pair's captions: the name, or '<split>/<name>'
  for a caption line tagged with a split."""
  return name if split is None else f"{split}/{name}"


def stem_of(key: str) -> str:
  """The pair name of an index key (the inverse of `name_key`'s prefix)."""
  return key.rpartition("/")[2]


class CaptionStoreError(UserError):
  """A caption store is missing, incomplete, inconsistent or lacks a key."""


def _write_json(path: Path, obj: Any) -> None:
  with files.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(obj, ensure_ascii=False))


def write_store(directory: str | os.PathLike, table: np.ndarray,
                index: Mapping[str, Mapping[str, list[int]]],
                texts: list[str], manifest: Mapping[str, Any]) -> None:
  """Writes a complete store; `manifest` gets format/version/dim added."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete until done
  with files.atomic_path(directory / TABLE_FILE) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(table, np.float32))
  _write_json(directory / INDEX_FILE, index)
  _write_json(directory / TEXTS_FILE, texts)
  _write_json(directory / MANIFEST_FILE,
              {"format": FORMAT, "version": VERSION, **manifest,
               "dim": int(table.shape[1]), "num_unique": int(table.shape[0])})


@dataclasses.dataclass(frozen=True)
class CaptionEmbeddings:
  """Embeddings keyed by (dataset, name, caption index)."""
  table: np.ndarray  # (num_unique, dim) float32
  index: Mapping[str, Mapping[str, list[int]]]
  manifest: Mapping[str, Any]
  directory: str = ""

  @classmethod
  def load(cls, directory: str | os.PathLike, *,
           mmap: bool = False) -> CaptionEmbeddings:
    """Loads a store; `mmap` maps the table instead of reading it."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
      raise CaptionStoreError(
          f"{directory}: no {MANIFEST_FILE} (not a caption store, or "
          "embed_captions has not finished)")
    try:
      manifest = json.loads(manifest_path.read_text())
      index = json.loads((directory / INDEX_FILE).read_text())
      table = np.load(directory / TABLE_FILE, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as e:
      raise CaptionStoreError(f"{directory}: unreadable store ({e})") from None
    if not isinstance(manifest, dict):
      raise CaptionStoreError(f"{manifest_path}: not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise CaptionStoreError(
          f"{directory}: not a {FORMAT} v{VERSION} store "
          f"(format={manifest.get('format')!r}, "
          f"version={manifest.get('version')!r})")
    if not all(isinstance(manifest.get(k), int)
               for k in ("num_unique", "dim")):
      raise CaptionStoreError(f"{directory}: {MANIFEST_FILE} lacks integer "
                              "num_unique and dim")
    expected = (manifest["num_unique"], manifest["dim"])
    if table.shape != expected or table.dtype != np.float32:
      raise CaptionStoreError(
          f"{directory}: {TABLE_FILE} is {table.dtype}{table.shape}, the "
          f"manifest says float32{expected}")
    _check_index(index, table.shape[0], directory / INDEX_FILE)
    return cls(table, index, manifest, str(directory))

  @property
  def dim(self) -> int:
    return int(self.table.shape[1])

  @property
  def encoder(self) -> str:
    """The path or hub id of the text encoder that produced the store."""
    return self.manifest["encoder"]

  @functools.cached_property
  def texts(self) -> list[str]:
    """The caption of every table row (texts.json)."""
    path = Path(self.directory) / TEXTS_FILE
    try:
      texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise CaptionStoreError(f"{self.directory}: unreadable {TEXTS_FILE} "
                              f"({e})") from None
    if not isinstance(texts, list) or len(texts) != self.table.shape[0]:
      raise CaptionStoreError(f"{path}: not a list of the table's "
                              f"{self.table.shape[0]} captions")
    return texts

  def first_texts(self, count: int) -> list[str]:
    """The captions of the table's first `count` rows (texts.json)."""
    return list(self.texts[:count])

  def check_current(self, key: str, rows: Sequence[int],
                    captions_now: Sequence[str]) -> str | None:
    """Why `rows` (a pair's, `key` naming it) no longer embed the pair's
    `captions_now` (edited caption files since the store was built), or
    None."""
    stored = [self.texts[r] for r in rows]
    if stored == list(captions_now):
      return None
    if len(stored) != len(captions_now):
      what = (f"holds {len(stored)} caption(s), the caption files now have "
              f"{len(captions_now)}")
    else:
      first = next(i for i, (a, b) in enumerate(zip(stored, captions_now))
                   if a != b)
      what = (f"caption {first} is {stored[first]!r} in the store, "
              f"{captions_now[first]!r} in the caption files")
    return (f"{self.directory}: {key} {what}; the store is stale: rebuild it "
            "with python -m textfusion_jax.text.embed_captions")

  def check_encoder(self, name: str, encoder: Any, count: int = 8) -> None:
    """Raises CaptionStoreError unless `encoder` (configured as `name`)
    embeds the store's first captions as its rows hold them: a store from
    another encoder of the same width would train the model in another
    embedding space than the prompts fuse and export use."""
    texts = self.first_texts(count)
    if not texts:
      return
    cosine = captions.embedding_cosines(encoder.encode(texts),
                                        self.table[:len(texts)])
    if float(cosine.min()) < captions.SAME_EMBEDDING_COSINE:
      raise CaptionStoreError(
          f"{self.directory}: made by encoder {self.encoder!r}, and "
          f"config.text.encoder={name!r} embeds its captions differently "
          f"(cosine {float(cosine.min()):.3f} on its first {len(texts)}); "
          "rebuild it with python -m textfusion_jax.text.embed_captions "
          f"--encoder {name}")

  def check_dim(self, dim: int) -> None:
    """Raises CaptionStoreError unless the embeddings are `dim` wide."""
    if dim != self.dim:
      raise CaptionStoreError(
          f"{self.directory}: embeddings are {self.dim}-dimensional (encoder "
          f"{self.encoder}) but the model expects {dim}")

  def datasets(self) -> list[str]:
    """Every index key: datasets, and '<dataset>@<source>' for other
    caption sources."""
    return sorted(self.index)

  def names(self, dataset: str, source: str = DEFAULT_SOURCE) -> list[str]:
    """The index keys of a dataset's caption source (`name_key`)."""
    return list(self._dataset(store_key(dataset, source)))

  def find(self, dataset: str, name: str, source: str = DEFAULT_SOURCE,
           split: str | None = None) -> list[int] | None:
    """`rows`, or None where the store has no captions for the pair."""
    names = self.index.get(store_key(dataset, source), {})
    for key in ((name_key(name, split), name) if split else (name,)):
      if key in names:
        return list(names[key])
    return None

  def has(self, dataset: str, source: str = DEFAULT_SOURCE) -> bool:
    return store_key(dataset, source) in self.index

  def _dataset(self, key: str) -> Mapping[str, list[int]]:
    try:
      return self.index[key]
    except KeyError:
      raise CaptionStoreError(
          f"{self.directory}: no dataset {key!r} (has "
          f"{', '.join(self.datasets()) or 'none'})") from None

  def rows(self, dataset: str, name: str, source: str = DEFAULT_SOURCE,
           split: str | None = None) -> list[int]:
    """Table rows of `name`'s captions, one per caption index: those of its
    line for `split` where the store has one, else of its untagged line."""
    key = store_key(dataset, source)
    self._dataset(key)  # an unknown dataset: one line naming those it has
    found = self.find(dataset, name, source, split)
    if found is None:
      in_split = "" if split is None else f" (split {split!r})"
      raise CaptionStoreError(
          f"{self.directory}: dataset {key!r} has no captions for "
          f"{name!r}{in_split}")
    return found

  def lookup(self, dataset: str, name: str, caption_index: int,
             split: str | None = None) -> np.ndarray:
    """The (dim,) float32 embedding of one caption (see `rows`)."""
    rows = self.rows(dataset, name, split=split)
    if not 0 <= caption_index < len(rows):
      raise CaptionStoreError(
          f"{self.directory}: {dataset}/{name} has {len(rows)} caption(s), "
          f"no index {caption_index}")
    return np.asarray(self.table[rows[caption_index]])


def _check_index(index: Any, num_rows: int, path: Path) -> None:
  """{dataset: {name: [row, ...]}} with every row in the table; a negative
  row would silently count from the end."""
  if not isinstance(index, dict) or not all(
      isinstance(names, dict) for names in index.values()):
    raise CaptionStoreError(f"{path}: expected {{dataset: {{name: [rows]}}}}")
  for dataset, names in index.items():
    for name, rows in names.items():
      if not isinstance(rows, list) or not all(
          isinstance(r, int) and not isinstance(r, bool) and 0 <= r < num_rows
          for r in rows):
        raise CaptionStoreError(
            f"{path}: {dataset}/{name} has rows {rows!r}; each must be a row "
            f"of the table (0..{num_rows - 1})")
