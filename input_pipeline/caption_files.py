"""Reading caption files: one JSON object per line, {"name", "captions"}.

The format of `<dataset>/captions.jsonl` in the sample data: `name` is the
image file stem, `captions` a list of any number of non-empty strings, and an
optional `split` names the split the line is for, where a stem repeats across
splits (datasets that number each split's frames from 1); a line without it
is for the stem in every split. A (split, name) appears once per file.
Every problem is reported as one line naming the file and line number.

Caption sources: a dataset may have several caption files, one per source
(hand-written, or a captioning model's): `captions.jsonl` is the source
'default', `captions_<name>.jsonl` the source `<name>` (`source_of`,
`file_of`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from absl import logging as _log
from input_pipeline.errors import UserError


class CaptionFileError(UserError):
  """A caption file is missing or has a malformed line."""


DEFAULT_SOURCE = "default"
# Letters, digits, '_', '-' and '.' (blip-2, v1.5), so a model's name fits.
_SOURCE_FILE = re.compile(r"^captions(?:_(\w[\w.-]*))?\.jsonl$")


def source_of(path: str | os.PathLike) -> str:
  """The caption source a file holds: 'default' for captions.jsonl, NAME for
  captions_NAME.jsonl, else the file's stem."""
  match = _SOURCE_FILE.match(Path(path).name)
  if not match:
    return Path(path).stem
  if match.group(1) == DEFAULT_SOURCE:
    # Would be read as captions.jsonl's source, and itself never.
    raise UserError(f"{path}: the {DEFAULT_SOURCE!r} caption source is "
                    "captions.jsonl; rename this file (captions_NAME.jsonl "
                    f"with another NAME)")
  return match.group(1) or DEFAULT_SOURCE


def file_of(source: str) -> str:
  """The file name of a caption source (the inverse of `source_of`)."""
  return ("captions.jsonl" if source == DEFAULT_SOURCE else
          f"captions_{source}.jsonl")


_SKIPPED: set[Path] = set()  # (each said once per process)


def find_sources(root: str | os.PathLike) -> list[str]:
  """The caption sources with a file directly in `root`, default first.

  A `captions_*.jsonl` whose source name is not allowed is refused by name
  rather than skipped: its captions would silently go unused. Another
  `captions*.jsonl` (captions-old.jsonl, perhaps a kept copy) is skipped
  with a warning."""
  found = []
  for path in sorted(Path(root).glob("captions*.jsonl")):
    if _SOURCE_FILE.match(path.name):
      found.append(source_of(path))
    elif path.name.startswith("captions_"):
      raise CaptionFileError(
          f"{path}: not a caption source name (captions_NAME.jsonl, NAME "
          "letters, digits, '_', '-' or '.', starting with a letter, digit "
          "or '_'); rename it")
    elif path not in _SKIPPED:  # captions-old.jsonl may be a kept copy
      _SKIPPED.add(path)
      suggested = f"captions_{path.name[len('captions'):].lstrip('-.')}"
      if (not _SOURCE_FILE.match(suggested) or
          suggested == f"captions_{DEFAULT_SOURCE}.jsonl"):
        suggested = "captions_NAME.jsonl"
      _log.warning("%s is not read: caption files are captions.jsonl and "
                   "captions_NAME.jsonl (rename it %s to use its captions)",
                   path, suggested)
  return sorted(found, key=lambda s: (s != DEFAULT_SOURCE, s))


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
  dataset: str
  name: str
  captions: tuple[str, ...]
  file: str
  line: int
  source: str = DEFAULT_SOURCE
  split: str | None = None  # None: the line is for the stem in every split


def dataset_key(folder: str | os.PathLike) -> str:
  """A dataset folder's key in caption stores: its name as written, with '.'
  and '..' worked out but symlinks not followed, so a store made through a
  link is keyed as training through the same link reads it."""
  return Path(os.path.abspath(folder)).name


def default_dataset(path: str | os.PathLike) -> str:
  """The dataset key of a caption file: its folder's (`dataset_key`)."""
  return dataset_key(Path(os.path.abspath(path)).parent)


@dataclasses.dataclass(frozen=True)
class CaptionLine:
  """One parsed line: its number, and the pair (split, name) it captions."""
  number: int
  name: str
  captions: tuple[str, ...]
  split: str | None


def parse_line(text: str) -> tuple[str | None, str, tuple[str, ...]]:
  """(split, name, captions) of one line; ValueError says what is wrong
  (callers add the file and line)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed JSON ({e.msg})") from None
  if not isinstance(obj, dict):
    raise ValueError("expected a JSON object")
  name, captions, split = obj.get("name"), obj.get("captions"), obj.get("split")
  if not isinstance(name, str) or not name:
    raise ValueError(f"'name' must be a non-empty string, got {name!r}")
  if split is not None and not (isinstance(split, str) and split):
    raise ValueError(f"'split' must be a non-empty string, got {split!r}")
  if not isinstance(captions, list):
    raise ValueError(f"'captions' of {name!r} must be a list")
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise ValueError(f"caption {i} of {name!r} is not a string: "
                       f"{caption!r}")
    if not caption.strip():
      raise ValueError(f"caption {i} of {name!r} is empty")
  return split, name, tuple(captions)


def parse_lines(path: str | os.PathLike
                ) -> Iterator[CaptionLine | tuple[int, str]]:
  """Each non-blank line of a caption file, in order: a CaptionLine, or
  (line number, what is wrong) for a malformed line or a second line for
  the same (split, name). An unreadable file raises CaptionFileError."""
  path = Path(path)
  try:
    # Lines end at '\n' only: str.splitlines would also split at U+2028
    # or U+0085, which JSON keeps unescaped inside a caption.
    lines = path.read_text(encoding="utf-8").split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise CaptionFileError(f"{path}: cannot read ({e})") from None
  first_line: dict[tuple[str | None, str], int] = {}
  for number, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    try:
      split, name, captions = parse_line(text)
    except ValueError as e:
      yield number, str(e)
      continue
    if (split, name) in first_line:
      in_split = "" if split is None else f" in split {split!r}"
      yield number, (f"name {name!r}{in_split} already appeared on line "
                     f"{first_line[split, name]}")
      continue
    first_line[split, name] = number
    yield CaptionLine(number, name, captions, split)


def read_caption_file(path: str | os.PathLike,
                      dataset: str | None = None) -> list[CaptionRecord]:
  """The records of one caption file, in file order (blank lines skipped);
  the first bad line raises CaptionFileError naming the file and line."""
  path = Path(path)
  dataset = default_dataset(path) if dataset is None else dataset
  records = []
  for line in parse_lines(path):
    if not isinstance(line, CaptionLine):
      raise CaptionFileError(f"{path}:{line[0]}: {line[1]}")
    records.append(CaptionRecord(dataset, line.name, line.captions,
                                 str(path), line.number, source_of(path),
                                 line.split))
  return records


def read_caption_files(
    files: Sequence[tuple[str | None, str | os.PathLike]]
) -> list[CaptionRecord]:
  """The records of (dataset or None for the default, path) pairs, in order."""
  return [record for dataset, path in files
          for record in read_caption_file(path, dataset)]
