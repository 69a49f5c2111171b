"""Caption text embeddings per record: `CaptionTable`.

The table holds one embedding matrix (M, D) float32 and, per record, the rows
of its captions' embeddings, so pipelines attach a caption's embedding with a
table lookup instead of running a text encoder per example. It is built
either by embedding every caption of a source with any `embed_fn`
(`from_source(source, embed_fn)`; identical captions are embedded once) or
from embeddings the records carry under 'text_emb' (shape (num_captions, D);
`from_source(source)`).

`derangement` gives the fixed record permutation without fixed points that the
"does the text matter" ablation uses to pair every image with another
record's captions (`CaptionTable.deranged`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from input_pipeline.caption_files import DEFAULT_SOURCE
from input_pipeline.errors import UserError

EmbedFn = Callable[[list[str]], np.ndarray]


def to_str(value: Any) -> str:
  """str of a caption/name that TFDS may return as bytes or a 0-d array."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def decode_captions(value: Any) -> list[str]:
  """list[str] from a list of str, or TFDS' numpy array of bytes."""
  if isinstance(value, (str, bytes)):
    return [to_str(value)]
  return [to_str(v) for v in value]


# Two encoders embed a caption alike (float32 vs bfloat16, say) above this
# cosine; another encoder's weights give far less.
SAME_EMBEDDING_COSINE = 0.99


def embedding_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of two (N, D) embedding arrays."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, axis=-1) / np.maximum(
      np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def record_captions(source: Sequence[Any], index: int) -> list[str]:
  """Captions of record `index`, without rendering images when the source
  offers a `captions(index)` method (e.g. `SyntheticPairs`)."""
  captions_fn = getattr(source, "captions", None)
  if callable(captions_fn):
    return decode_captions(captions_fn(index))
  return decode_captions(source[index]["captions"])


def record_caption_sources(source: Sequence[Any], index: int) -> list[str]:
  """The caption source of each of record `index`'s captions ('default'
  when the source does not tell)."""
  sources_fn = getattr(source, "caption_sources", None)
  if callable(sources_fn):
    return [to_str(s) for s in sources_fn(index)]
  return [DEFAULT_SOURCE] * len(record_captions(source, index))


def derangement(n: int, seed: int) -> np.ndarray:
  """A seeded permutation p of range(n) with p[i] != i for every i (n >= 2).

  Sattolo's algorithm: a uniformly random single n-cycle, hence no fixed
  points.
  """
  if n < 2:
    raise ValueError(f"a derangement needs at least 2 records, got {n}")
  rng = np.random.default_rng([seed, n])
  perm = np.arange(n)
  for i in range(n - 1, 0, -1):
    j = int(rng.integers(0, i))
    perm[i], perm[j] = perm[j], perm[i]
  return perm


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionTable:
  """Caption embeddings of every record of a source.

  Attributes:
    embeddings: (M, D) float32, one row per distinct caption.
    rows: per record, int32 array of its captions' rows in `embeddings`.
    texts: text of each row of `embeddings`, or None when the embeddings came
      precomputed from the records.
  """
  embeddings: np.ndarray
  rows: tuple[np.ndarray, ...]
  texts: tuple[str, ...] | None = None
  # Caption sources (`caption_files`): per record, each caption's index into
  # `source_names`; with `source_weights` (one per name) a record's caption
  # is drawn by source weight (`caption_probabilities`), else uniformly.
  sources: tuple[np.ndarray, ...] | None = None
  source_names: tuple[str, ...] = ()
  source_weights: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  def num_captions(self, record_index: int) -> int:
    return len(self.rows[record_index])

  def embedding(self, record_index: int, caption_index: int) -> np.ndarray:
    """(D,) float32 embedding of one caption of one record."""
    return self.embeddings[self.rows[record_index][caption_index]]

  def text(self, record_index: int, caption_index: int) -> str | None:
    if self.texts is None:
      return None
    return self.texts[self.rows[record_index][caption_index]]

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (D,) over every (record, caption) pair."""
    used = self.embeddings[np.concatenate(self.rows)].astype(np.float64)
    return (used.mean(0).astype(np.float32),
            used.std(0).astype(np.float32))

  def caption_probabilities(self, record_index: int) -> np.ndarray | None:
    """P(caption) of a record under source weights; None: uniform.

    A source is drawn in proportion to its weight among the sources this
    record has captions from, then one of its captions uniformly.
    """
    if self.source_weights is None:
      return None
    ids = self.sources[record_index]
    counts = np.bincount(ids, minlength=len(self.source_names))
    weights = self.source_weights[ids] / counts[ids]
    return weights / weights.sum()

  def deranged(self, seed: int) -> CaptionTable:
    """Table in which record i gets the captions of record derangement[i]."""
    perm = derangement(len(self.rows), seed)
    return dataclasses.replace(
        self, rows=tuple(self.rows[j] for j in perm),
        sources=(None if self.sources is None else
                 tuple(self.sources[j] for j in perm)))

  def select_sources(self, per_record: Sequence[Sequence[str]],
                     chosen: Sequence[tuple[str, float]],
                     weighted: bool,
                     record_label: Callable[[int], str],
                     dataset_of: Callable[[int], str] = lambda i: "the dataset"
                     ) -> CaptionTable:
    """Keeps the captions of the `chosen` (source, weight) pairs.

    per_record: each record's caption source names, in caption order.
    record_label(i): how errors name record i ('<dataset>/<name>'; called
    only for an error). dataset_of(i): record i's dataset.
    Raises UserError naming the dataset and config.data.caption_sources
    when a chosen source has no captions in a dataset, or a record keeps
    none.
    """
    names = tuple(name for name, _ in chosen)
    found: dict[str, set[str]] = {}
    rows, ids = [], []
    for i, (record_rows, sources) in enumerate(zip(self.rows, per_record)):
      dataset = dataset_of(i)
      found.setdefault(dataset, set()).update(sources)
      keep = [k for k, name in enumerate(sources) if name in names]
      if not keep:
        raise UserError(
            f"config.data.caption_sources: {record_label(i)} has no captions "
            f"from {', '.join(names)} (it has "
            f"{', '.join(sorted(set(sources))) or 'none'})")
      rows.append(record_rows[keep])
      ids.append(np.array([names.index(sources[k]) for k in keep], np.int32))
    for dataset, present in found.items():
      for name in names:
        if name not in present:
          raise UserError(
              f"config.data.caption_sources: {dataset} has no caption source "
              f"{name!r} (its sources: {', '.join(sorted(present))})")
    weights = (np.array([w for _, w in chosen], np.float64) if weighted
               else None)
    return dataclasses.replace(self, rows=tuple(rows), sources=tuple(ids),
                               source_names=names, source_weights=weights)

  @classmethod
  def from_captions(cls, captions: Sequence[Sequence[str]], embed_fn: EmbedFn,
                    chunk_size: int = 256,
                    record_label: Callable[[int], str] | None = None
                    ) -> CaptionTable:
    """Embeds the distinct captions of `captions[record]` in chunks;
    record_label(i) names record i in errors."""
    index: dict[str, int] = {}
    rows = []
    for record in captions:
      if not record:
        label = (record_label or (lambda i: f"record {i}"))(len(rows))
        raise UserError(f"{label} has no captions (no line in its dataset's "
                        "caption files, or an empty list); caption it, or "
                        "leave it out")
      rows.append(np.array([index.setdefault(c, len(index)) for c in record],
                           np.int32))
    texts = list(index)
    chunks = [np.asarray(embed_fn(texts[i:i + chunk_size]), np.float32)
              for i in range(0, len(texts), chunk_size)]
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0),
                                                                np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
      raise ValueError(f"embed_fn returned shape {embeddings.shape} for "
                       f"{len(texts)} captions; expected (N, D)")
    return cls(embeddings, tuple(rows), tuple(texts))

  @classmethod
  def from_record_embeddings(cls,
                             per_record: Sequence[np.ndarray]) -> CaptionTable:
    """From one (num_captions, D) array per record."""
    arrays = [np.asarray(e, np.float32) for e in per_record]
    if not arrays or any(a.ndim != 2 or not len(a) for a in arrays):
      raise ValueError("each record needs a (num_captions >= 1, D) 'text_emb'")
    starts = np.cumsum([0] + [len(a) for a in arrays])
    rows = tuple(np.arange(s, s + len(a), dtype=np.int32)
                 for s, a in zip(starts, arrays))
    return cls(np.concatenate(arrays), rows, None)

  @classmethod
  def from_source(cls, source: Sequence[Any],
                  embed_fn: EmbedFn | None = None,
                  record_label: Callable[[int], str] | None = None
                  ) -> CaptionTable:
    """Embeds every record's captions with `embed_fn`, or, when it is None,
    collects the records' precomputed 'text_emb' arrays."""
    n = len(source)
    if embed_fn is not None:
      return cls.from_captions([record_captions(source, i) for i in range(n)],
                               embed_fn, record_label=record_label)
    return cls.from_record_embeddings([source[i]["text_emb"] for i in range(n)])
