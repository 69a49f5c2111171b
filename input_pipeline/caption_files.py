"""Reading caption files: one JSON object per line, {"name", "captions"}.

The format of `<dataset>/captions.jsonl` in the sample data: `name` is the
image file stem, `captions` a list of any number of non-empty strings. Every
problem is reported as one line naming the file and line number.

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
from typing import Sequence
from input_pipeline.errors import UserError


class CaptionFileError(UserError):
  """A caption file is missing or has a malformed line."""


DEFAULT_SOURCE = "default"
_SOURCE_FILE = re.compile(r"^captions(?:_(\w+))?\.jsonl$")


def source_of(path: str | os.PathLike) -> str:
  """The caption source a file holds: 'default' for captions.jsonl, NAME for
  captions_NAME.jsonl, else the file's stem."""
  match = _SOURCE_FILE.match(Path(path).name)
  if not match:
    return Path(path).stem
  return match.group(1) or DEFAULT_SOURCE


def file_of(source: str) -> str:
  """The file name of a caption source (the inverse of `source_of`)."""
  return ("captions.jsonl" if source == DEFAULT_SOURCE else
          f"captions_{source}.jsonl")


def find_sources(root: str | os.PathLike) -> list[str]:
  """The caption sources with a file directly in `root`, default first."""
  found = [source_of(p) for p in sorted(Path(root).glob("captions*.jsonl"))
           if _SOURCE_FILE.match(p.name)]
  return sorted(found, key=lambda s: (s != DEFAULT_SOURCE, s))


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
  dataset: str
  name: str
  captions: tuple[str, ...]
  file: str
  line: int
  source: str = DEFAULT_SOURCE


def default_dataset(path: str | os.PathLike) -> str:
  """The dataset key of a caption file: its parent directory's name."""
  return Path(path).resolve().parent.name


def read_caption_file(path: str | os.PathLike,
                      dataset: str | None = None) -> list[CaptionRecord]:
  """The records of one caption file, in file order (blank lines skipped)."""
  path = Path(path)
  dataset = default_dataset(path) if dataset is None else dataset
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise CaptionFileError(f"{path}: cannot read ({e})") from None
  records, first_line = [], {}
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise CaptionFileError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise CaptionFileError(f"{where}: expected a JSON object")
    name, captions = obj.get("name"), obj.get("captions")
    if not isinstance(name, str) or not name:
      raise CaptionFileError(f"{where}: 'name' must be a non-empty string, "
                             f"got {name!r}")
    if not isinstance(captions, list):
      raise CaptionFileError(f"{where}: 'captions' must be a list")
    for i, caption in enumerate(captions):
      if not isinstance(caption, str):
        raise CaptionFileError(
            f"{where}: caption {i} of {name!r} is not a string: {caption!r}")
      if not caption.strip():
        raise CaptionFileError(f"{where}: caption {i} of {name!r} is empty")
    if name in first_line:
      raise CaptionFileError(
          f"{where}: name {name!r} already appeared on line {first_line[name]}")
    first_line[name] = number
    records.append(CaptionRecord(dataset, name, tuple(captions), str(path),
                                 number, source_of(path)))
  return records


def read_caption_files(
    files: Sequence[tuple[str | None, str | os.PathLike]]
) -> list[CaptionRecord]:
  """The records of (dataset or None for the default, path) pairs, in order."""
  return [record for dataset, path in files
          for record in read_caption_file(path, dataset)]
