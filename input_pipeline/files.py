"""Atomic file writes: a reader never sees a half-written file.

The one helper every writer in both packages uses (eval PNGs and JSON,
configs, run records, caption stores, score tables).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling of `path` that replaces it on success.

  The parent folder is created. On an exception `path` keeps its old
  contents (or stays absent) and the temporary file is removed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def unwritable_reason(path: str | os.PathLike, flag: str) -> str | None:
  """Why `path` cannot take a new file (a folder is there, or its parent is
  missing or read-only), naming `flag`; None if it can. Checked before
  long work, so that the work is not lost at the end."""
  path = Path(path)
  if path.is_dir():
    return f"{flag} {path} is a folder; give a file path"
  if not path.parent.is_dir():
    return f"{flag} {path}: folder {path.parent} does not exist"
  if not os.access(path.parent, os.W_OK):
    return f"{flag} {path}: folder {path.parent} is not writable"
  return None
