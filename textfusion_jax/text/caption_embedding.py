"""Precomputes CLIP text embeddings of caption files into a caption store.

The library behind `python -m textfusion_jax.text.embed_captions`.
Distinct captions are embedded once, in shards of `shard_size` captions
written atomically to DIR/shards/. A rerun skips every shard already present
and valid (same captions, same encoder, right shape), so an interrupted job
resumes where it stopped. In a multi-host job every process runs the same
command; process p embeds shards p, p + P, p + 2P, ... on its own devices and,
once all processes are done, process 0 writes the store that
`caption_store.CaptionEmbeddings.load(DIR)` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from input_pipeline import caption_files, caption_store, files
from input_pipeline.errors import UserError
from textfusion_jax import bundle

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"


def plan(records: Sequence[caption_files.CaptionRecord]
         ) -> tuple[list[str], dict[str, dict[str, list[int]]]]:
  """Distinct captions in first-seen order, and (store key, name key) ->
  rows (`caption_store.store_key`: the dataset, with '@<source>' for caption
  files other than captions.jsonl; `caption_store.name_key`: the name, as
  '<split>/<name>' for a line tagged with a split)."""
  row_of: dict[str, int] = {}
  index: dict[str, dict[str, list[int]]] = {}
  seen: dict[tuple[str, str], str] = {}
  for record in records:
    dataset = caption_store.store_key(record.dataset, record.source)
    name = caption_store.name_key(record.name, record.split)
    if (dataset, name) in seen:
      raise caption_files.CaptionFileError(
          f"{record.file}:{record.line}: {dataset}/{name} "
          f"already came from {seen[dataset, name]}")
    seen[dataset, name] = f"{record.file}:{record.line}"
    index.setdefault(dataset, {})[name] = [
        row_of.setdefault(text, len(row_of)) for text in record.captions]
  return list(row_of), index


@dataclasses.dataclass(frozen=True)
class _Shard:
  number: int
  start: int  # first row in the table
  texts: list[str]
  key: str  # what it holds: see _shard_key


def _shard_key(encoder_id: str, texts: Sequence[str]) -> str:
  digest = hashlib.sha256(encoder_id.encode())
  for text in texts:
    digest.update(b"\0" + text.encode())
  return digest.hexdigest()


def _shard_path(out: Path, shard: _Shard) -> Path:
  return out / SHARD_DIR / f"{shard.number:06d}.npz"


def _read_shard(out: Path, shard: _Shard,
                dim: int) -> tuple[np.ndarray, int] | None:
  """(embeddings, number truncated) of a finished shard; None if unusable."""
  try:
    with np.load(_shard_path(out, shard)) as f:
      embeddings = f["embeddings"]
      if (str(f["key"]) != shard.key or
          embeddings.shape != (len(shard.texts), dim) or
          embeddings.dtype != np.float32 or
          not np.isfinite(embeddings).all()):
        return None
      return embeddings, int(f["num_truncated"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # absent or damaged


def _write_shard(out: Path, shard: _Shard, embeddings: np.ndarray,
                 num_truncated: int) -> None:
  with files.atomic_path(_shard_path(out, shard)) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, embeddings=embeddings, key=np.array(shard.key),
               num_truncated=np.array(num_truncated))


def _sync_all_processes() -> None:
  multihost_utils.sync_global_devices("textfusion_jax.embed_captions")


# What a store (or an interrupted one) holds; anything else at --out is
# someone else's folder, never written into.
_STORE_ENTRIES = frozenset({SHARD_DIR, caption_store.MANIFEST_FILE,
                            caption_store.TABLE_FILE, caption_store.INDEX_FILE,
                            caption_store.TEXTS_FILE})


def check_out(out: Path) -> None:
  """One line if `out` is a file or a folder other than a caption store's
  (a bundle's manifest.json would be overwritten)."""
  files.check_own_folder(out, _STORE_ENTRIES, "caption store")
  bundle.check_not_inside_a_sealed_folder(out)


def check_replaces(out: Path, encoder, index: dict[str, Any]) -> None:
  """One line if the finished store at `out` would lose something: another
  encoder's (or dtype's) embeddings, or a dataset this run does not embed.
  Updating it for changed captions of the same datasets needs no flag."""
  try:
    manifest = json.loads((out / caption_store.MANIFEST_FILE).read_text())
    old_index = json.loads((out / caption_store.INDEX_FILE).read_text())
  except (OSError, ValueError):
    return  # no finished store (or a broken one): nothing readable to lose
  lost = []
  if (manifest.get("encoder_fingerprint"), manifest.get("compute_dtype")) != (
      encoder.fingerprint, encoder.dtype.name):
    lost.append(f"its embeddings by encoder {manifest.get('encoder')!r} "
                f"({manifest.get('compute_dtype')})")
  dropped = sorted(set(old_index) - set(index))
  if dropped:
    lost.append(f"dataset(s) {', '.join(dropped)}, not in this run's "
                "caption files")
  if lost:
    raise UserError(f"--out {out} is a finished caption store that this run "
                    f"would replace, losing {' and '.join(lost)}; pass "
                    "--overwrite to replace it, or choose a new --out")


def run(encoder, records: Sequence[caption_files.CaptionRecord],
        out: str | os.PathLike, *, batch_size: int = 64,
        shard_size: int = 4096, max_shards: int | None = None,
        process_index: int | None = None, process_count: int | None = None,
        barrier: Callable[[], None] | None = None,
        progress: bool = True, overwrite: bool = False
        ) -> caption_store.CaptionEmbeddings | None:
  """Embeds the captions of `records` with a TextEncoder into store `out`.

  Returns the store on process 0 and None elsewhere. `max_shards` stops after
  embedding that many shards (None if it stopped early), for time-limited
  jobs and for testing resumption. `process_index`/`process_count`/`barrier`
  default to this JAX process, the JAX process count and a global device sync.
  A finished store at `out` is updated for changed captions; one holding
  another encoder's embeddings or other datasets is replaced only if
  `overwrite` (`check_replaces`).
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  out = Path(out)
  check_out(out)
  texts, index = plan(records)
  if not overwrite:
    check_replaces(out, encoder, index)
  # Shards made by another encoder (by its weights, not its path), or in
  # another dtype, are not reused.
  encoder_id = f"{encoder.fingerprint} {encoder.dtype.name}"
  (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
  shards = [_Shard(i, start, texts[start:start + shard_size],
                   _shard_key(encoder_id, texts[start:start + shard_size]))
            for i, start in enumerate(range(0, len(texts), shard_size))]
  dim = encoder.embed_dim

  mine = shards[process_index::process_count]
  todo = [s for s in mine if _read_shard(out, s, dim) is None]
  total = sum(len(s.texts) for s in mine)
  bar = tqdm.tqdm(total=total, initial=total - sum(len(s.texts) for s in todo),
                  unit="caption", desc=f"embed captions [{process_index}]",
                  disable=not progress)
  stopped = False
  with bar:
    for done, shard in enumerate(todo):
      if max_shards is not None and done >= max_shards:
        logger.warning("stopped after %d shard(s) as asked; rerun to resume",
                       done)
        stopped = True
        break
      ids, num_truncated = encoder.tokenize(shard.texts)
      embeddings = encoder.encode_ids(ids, batch_size)
      _write_shard(out, shard, embeddings, num_truncated)
      bar.update(len(shard.texts))

  # Every process meets the barrier, also one that stopped early: the
  # others would wait for it forever.
  if process_count > 1:
    (barrier or _sync_all_processes)()
  if process_index != 0 or stopped:
    return None
  return _assemble(encoder, records, out, texts, index, shards,
                   missing_ok=max_shards is not None)


def _assemble(encoder, records, out: Path, texts: list[str],
              index: dict[str, dict[str, list[int]]],
              shards: list[_Shard], missing_ok: bool = False
              ) -> caption_store.CaptionEmbeddings | None:
  """The store from every shard; None if some are missing and
  `missing_ok` (another process stopped early, as asked)."""
  table = np.zeros((len(texts), encoder.embed_dim), np.float32)
  num_truncated, missing = 0, []
  for shard in shards:
    found = _read_shard(out, shard, encoder.embed_dim)
    if found is None:
      missing.append(str(_shard_path(out, shard)))
      continue
    table[shard.start:shard.start + len(shard.texts)] = found[0]
    num_truncated += found[1]
  if missing and missing_ok:
    logger.warning("%d shard(s) not embedded yet (--max_shards); rerun to "
                   "resume", len(missing))
    return None
  if missing:
    raise RuntimeError(f"{len(missing)} shard(s) missing or invalid after all "
                       f"processes finished: {', '.join(missing[:5])}")
  if num_truncated:
    logger.warning("%d of %d distinct captions exceed %d tokens and were "
                   "truncated", num_truncated, len(texts), encoder.max_length)
  caption_store.write_store(out, table, index, texts, {
      "encoder": encoder.source,
      "encoder_fingerprint": encoder.fingerprint,
      "compute_dtype": encoder.dtype.name,
      "max_length": encoder.max_length,
      "num_captions": sum(len(rows) for names in index.values()
                          for rows in names.values()),
      "num_truncated": num_truncated,
      "sources": [{"dataset": d, "caption_source": c,
                   "file": str(Path(f).resolve())}
                  for d, c, f in dict.fromkeys((r.dataset, r.source, r.file)
                                               for r in records)],
  })
  return caption_store.CaptionEmbeddings.load(out)
