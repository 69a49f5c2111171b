"""Where infrared-visible pairs live on disk, and which of them are usable.

A `Layout` says where a dataset keeps its infrared and visible folders under a
root folder (the TFDS manual dir). `scan` finds every pair (an infrared and a
visible file with the same stem), attaches captions and optional text
embeddings, and validates the whole folder before anything is built. It
returns the usable pairs and every `Problem` it found; `resolve` then either
raises one `BadDataError` listing all of them (on_bad_data='error') or logs
them as skipped (on_bad_data='skip'). Nothing is dropped silently.

`read_pair` decodes one pair by the project's conventions (textfusion_jax
image_io):

* infrared -> (H, W, 1) uint8. 16-bit frames are stretched per image
  ('minmax' rule: v8 = round(255 (v - min) / (max - min))), because raw thermal
  frames seldom span the 16-bit range; colour-stored frames (e.g. LLVIP and
  RoadScene JPGs) are reduced with the BGR2GRAY weights.
* visible -> (H, W, 3) uint8. Grey frames are replicated to 3 channels and
  16-bit frames scaled by the 'full' rule (v8 = round(v16 * 255 / 65535)).

Side files in the root, all optional:

* `captions.jsonl`: one JSON object per line, {"name": stem, "captions":
  [text, ...]}, optionally with "split": name when stems repeat across splits
  (a line without "split" applies to that stem in every split). Pairs without
  a line get no captions.
* `captions_<source>.jsonl`: more caption sources in the same format (e.g.
  one per captioning model); a pair's captions are those of every source
  file, `captions.jsonl` ('default') first, each tagged with its source.
* `splits.json`: {split: [stems]} dividing an undivided layout ('folders',
  'm3fd', 'roadscene', 'tno'); without it every pair is in 'train'.
* text embeddings (only when given): a caption store written by
  `python -m textfusion_jax.text.embed_captions`; the pair `stem` gets rows
  `CaptionEmbeddings.load(store).rows(dataset, stem, source, split)`, one per
  caption, where `dataset` defaults to the captions file's folder name
  (embed_captions' default key).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from input_pipeline import image_io
from input_pipeline import caption_files
from input_pipeline import caption_store
from input_pipeline.errors import UserError

OnBadData = Literal["error", "skip"]
CAPTIONS_FILE = "captions.jsonl"
SPLITS_FILE = "splits.json"
DEFAULT_SPLIT = "train"
# tfds reads "a+b" and "a[:10]" as split arithmetic, so split names stay plain.
_SPLIT_NAME = re.compile(r"^\w+$")
_NO_SPLIT = "(not yet split)"

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")


class LayoutError(UserError, FileNotFoundError):
  """The root folder does not have a layout's folders (or a named file)."""


class BadDataError(UserError):
  """The folder has bad data and on_bad_data is 'error'."""

  def __init__(self, message: str, problems: list[Problem]):
    super().__init__(message)
    self.problems = problems


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a dataset keeps its pairs, relative to its root folder.

  Attributes:
    ir_dir: folder of infrared images; '{split}' is replaced by a split name.
    vi_dir: folder of visible images, likewise.
    description: the expected layout in words (shown in errors and docs).
    splits: the splits that have their own folders. Empty when the folders
      hold one undivided set: then a split file divides it, else it is all
      'train'.
    discover_splits: every `<root>/<name>/` holding ir_dir or vi_dir for
      split=<name> is a split (the generic `<root>/<split>/{ir,vi}` layout).
  """
  ir_dir: str
  vi_dir: str
  description: str
  splits: tuple[str, ...] = ()
  discover_splits: bool = False

  @property
  def undivided(self) -> bool:
    return not self.splits and not self.discover_splits


_NO_OFFICIAL_SPLIT = (
    " No official split: <root>/splits.json ({split: [stems]}) or a split "
    "file passed explicitly divides the pairs, else every pair is in "
    "'train'.")

LAYOUTS: dict[str, Layout] = {
    "folders": Layout(
        "ir", "vi",
        "Generic: <root>/ir/ and <root>/vi/, files paired by stem, optional "
        "<root>/captions.jsonl." + _NO_OFFICIAL_SPLIT),
    "split_folders": Layout(
        "{split}/ir", "{split}/vi",
        "Generic with split folders: <root>/<split>/ir/ and <root>/<split>/vi/"
        " for every split folder (split names: letters, digits, '_'), "
        "optional <root>/captions.jsonl.",
        discover_splits=True),
    "llvip": Layout(
        "infrared/{split}", "visible/{split}",
        "LLVIP as released (bupt-ai-cz.github.io/LLVIP): "
        "<root>/infrared/{train,test}/ and <root>/visible/{train,test}/ "
        "(JPG, e.g. 010001.jpg); Annotations/ is not used.",
        splits=("train", "test")),
    "msrs": Layout(
        "{split}/ir", "{split}/vi",
        "MSRS as released (github.com/Linfeng-Tang/MSRS): "
        "<root>/{train,test}/ir/ and <root>/{train,test}/vi/ (PNG); label "
        "folders are not used.",
        splits=("train", "test")),
    "m3fd": Layout(
        "Ir", "Vis",
        "M3FD as released (github.com/JinyuanLiu-CV/TarDAL): the root is "
        "M3FD_Fusion/ (300 pairs) or M3FD_Detection/ (4200 pairs; its "
        "Annotation/ is not used), holding <root>/Ir/ and <root>/Vis/ with "
        "identical file names." + _NO_OFFICIAL_SPLIT),
    "roadscene": Layout(
        "cropinfrared", "crop_LR_visible",
        "RoadScene as released (github.com/hanna-xu/RoadScene): "
        "<root>/cropinfrared/ and <root>/crop_LR_visible/ (221 aligned pairs, "
        "JPG, FLIR_xxxxx.jpg); crop_HR_visible/ is a higher-resolution copy "
        "at other sizes and is not used." + _NO_OFFICIAL_SPLIT),
    "tno": Layout(
        "ir", "vi",
        "TNO (figshare 'TNO Image Fusion Dataset') has no single official "
        "folder layout; this config expects the pairs as redistributed in "
        "fusion repositories: <root>/ir/ and <root>/vi/, files paired by stem "
        "(convert BMP/TIF as you like; PNG keeps them lossless)."
        + _NO_OFFICIAL_SPLIT),
}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad file or line, and the pair it keeps out of the dataset if any."""
  kind: str
  files: tuple[str, ...]
  detail: str
  split: str | None = None
  name: str | None = None  # the pair left out; None when no pair is lost

  def __str__(self) -> str:
    return f"[{self.kind}] {', '.join(self.files)}: {self.detail}"


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
  """A usable infrared/visible pair with its captions (and embeddings)."""
  name: str
  split: str
  ir: Path
  vi: Path
  captions: tuple[str, ...] = ()
  text_emb: np.ndarray | None = None  # (len(captions), D) float32
  caption_sources: tuple[str, ...] = ()  # per caption, its source's name


@dataclasses.dataclass(frozen=True)
class PairImages:
  """A decoded pair: ir (H, W, 1) and vis (H, W, 3) uint8, with provenance."""
  ir: np.ndarray
  vis: np.ndarray
  ir_was_16bit: bool
  vis_was_grey: bool


@dataclasses.dataclass(frozen=True)
class Scan:
  """What `scan` found: usable pairs per split, and every problem."""
  root: Path
  splits: dict[str, list[Pair]]
  problems: list[Problem]

  def report(self, on_bad_data: OnBadData) -> dict:
    """A JSON-able report: pairs kept per split, and every problem."""
    return {
        "root": str(self.root),
        "on_bad_data": on_bad_data,
        "pairs": {split: len(pairs) for split, pairs in self.splits.items()},
        "problems": [dataclasses.asdict(p) for p in self.problems],
    }


IR_16BIT_RULE = "minmax"  # raw thermal frames seldom span 16 bits
VIS_16BIT_RULE = "full"


def read_pair(ir_path: str | os.PathLike,
              vi_path: str | os.PathLike) -> PairImages:
  """Decodes a pair by the module's conventions; raises ImageReadError."""
  ir, ir_info = image_io.read_image_with_info(ir_path, IR_16BIT_RULE)
  vis, vis_info = image_io.read_image_with_info(vi_path, VIS_16BIT_RULE)
  return PairImages(ir=image_io.as_grey_u8(ir)[..., None],
                    vis=image_io.as_rgb_u8(vis),
                    ir_was_16bit=ir_info.was_16bit,
                    vis_was_grey=vis_info.was_grey)


def map_ordered(fn: Callable[[_T], _R], items: Iterable[_T],
                workers: int | None = None) -> Iterator[_R]:
  """Yields fn(item) in order, computed on threads a bounded window ahead.

  Pillow and zlib release the GIL while decoding and encoding, so threads use
  every core; the window keeps only a few decoded images in memory.
  """
  workers = workers or os.cpu_count() or 1
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window = collections.deque(
        pool.submit(fn, item) for item in itertools.islice(items, 2 * workers))
    while window:
      result = window.popleft().result()
      for item in itertools.islice(items, 1):
        window.append(pool.submit(fn, item))
      yield result


def locate(root: str | os.PathLike, layout: Layout, *,
           split_file: str | os.PathLike | None = None,
           captions: str | os.PathLike | None = None,
           text_emb: str | os.PathLike | None = None
           ) -> dict[str, tuple[Path, Path]]:
  """Maps split (or _NO_SPLIT) -> (ir folder, vi folder) under `root`.

  Raises one LayoutError naming every missing folder and every missing file
  that was asked for explicitly, with the expected layout.
  """
  root = Path(root)
  if not root.is_dir():
    raise LayoutError(f"{root}: no such folder. Expected: {layout.description}")
  if layout.discover_splits:
    names = sorted(
        d.name for d in root.iterdir() if d.is_dir() and any(
            (root / pattern.format(split=d.name)).is_dir()
            for pattern in (layout.ir_dir, layout.vi_dir)))
  else:
    names = list(layout.splits) or [_NO_SPLIT]
  missing = []
  if not names:
    missing += [f"{p.format(split='<split>')}/"
                for p in (layout.ir_dir, layout.vi_dir)]
  groups = {}
  for name in names:
    dirs = tuple(root / p.format(split=name)
                 for p in (layout.ir_dir, layout.vi_dir))
    missing += [f"{d.relative_to(root)}/" for d in dirs if not d.is_dir()]
    groups[name] = dirs
  if split_file is not None and not layout.undivided:
    raise LayoutError(f"{root}: a split file was given, but this layout's "
                      f"splits are folders. Expected: {layout.description}")
  missing += [str(f) for f in (split_file, captions, text_emb)
              if f is not None and not Path(f).exists()]
  if missing:
    raise LayoutError(
        f"{root} does not have the expected layout; missing: "
        f"{', '.join(missing)}. Expected: {layout.description}")
  bad_names = [n for n in names if n != _NO_SPLIT and not _SPLIT_NAME.match(n)]
  if bad_names:
    raise LayoutError(f"{root}: split folder names may only hold letters, "
                      f"digits and '_': {', '.join(bad_names)}")
  return groups


def _check_file(path: Path, decode: bool, rule: str
                ) -> tuple[int, int] | Problem:
  """(height, width) of an image file, or the Problem that makes it unusable.

  decode=False only reads the header (cheap), so truncated pixel data is
  found later, when the image is read; decode=True reads it by `rule`, the
  16-bit rule `read_pair` uses for that source (infrared may be float).
  """
  try:
    if path.stat().st_size == 0:
      return Problem("empty_file", (str(path),), "empty file (0 bytes)")
    if decode:
      return image_io.read_image_with_info(path, rule)[0].shape[:2]
    with image_io.open_image(path) as image:
      image_io.check_mode(image.mode, rule, str(path))
      return image_io.upright_size(image_io.check_readable(image, str(path)))
  except (image_io.ImageReadError, *image_io.DECODE_ERRORS) as error:
    detail = image_io.describe_error(error).removeprefix(f"{path}: ")
    return Problem("unreadable_image", (str(path),), detail)


def _pair_stems(root: Path, groups: dict[str, tuple[Path, Path]]
                ) -> tuple[dict[str, dict[str, tuple[Path, Path]]],
                           list[Problem]]:
  """Per group, stem -> (ir, vi) paths; files without a partner are problems."""
  paired, problems = {}, []
  for group, (ir_dir, vi_dir) in groups.items():
    ir_files = image_io.list_images(ir_dir)
    vi_files = image_io.list_images(vi_dir)
    split = None if group == _NO_SPLIT else group
    for files, other in ((ir_files, vi_dir), (vi_files, ir_dir)):
      for stem in sorted(files.keys() - (ir_files.keys() & vi_files.keys())):
        problems.append(Problem(
            "unpaired", (str(files[stem]),),
            f"no image with stem {stem!r} in {other.relative_to(root)}/",
            split))
    paired[group] = {stem: (ir_files[stem], vi_files[stem])
                     for stem in sorted(ir_files.keys() & vi_files.keys())}
  return paired, problems


def _check_images(paired: dict[str, dict[str, tuple[Path, Path]]],
                  decode: bool) -> list[Problem]:
  """Every file of every pair is readable, and each pair's sizes agree."""
  jobs = [(group, stem, paths) for group, stems in paired.items()
          for stem, paths in stems.items()]
  checks = map_ordered(
      lambda job: tuple(_check_file(path, decode, rule) for path, rule in
                        zip(job[2], (IR_16BIT_RULE, VIS_16BIT_RULE))), jobs)
  problems = []
  for (group, stem, (ir, vi)), (ir_size, vi_size) in zip(jobs, checks):
    split = None if group == _NO_SPLIT else group
    bad = [c for c in (ir_size, vi_size) if isinstance(c, Problem)]
    problems += [dataclasses.replace(p, split=split, name=stem) for p in bad]
    if not bad and ir_size != vi_size:
      problems.append(Problem(
          "size_mismatch", (str(ir), str(vi)),
          f"infrared is {ir_size[1]}x{ir_size[0]} but visible is "
          f"{vi_size[1]}x{vi_size[0]} (width x height)", split, stem))
  return problems


def _read_split_file(path: Path, stems: Iterable[str]
                     ) -> tuple[dict[str, list[str]], list[Problem]]:
  """Divides `stems` by a {split: [stems]} file; mismatches are problems."""
  try:
    listing = json.loads(path.read_text())
    if not isinstance(listing, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v)
        for v in listing.values()):
      raise UserError("expected a JSON object {split: [stem, ...]}")
  except ValueError as error:
    raise LayoutError(f"{path}: malformed split file ({error})") from None
  bad_names = [n for n in listing if not _SPLIT_NAME.match(n)]
  if bad_names:
    raise LayoutError(f"{path}: split names may only hold letters, digits "
                      f"and '_': {', '.join(bad_names)}")
  stems = set(stems)
  where = collections.defaultdict(list)
  for split, listed in listing.items():
    for stem in listed:
      where[stem].append(split)
  problems = []
  for stem in sorted(where.keys() - stems):
    problems.append(Problem("split_file", (str(path),),
                            f"lists {stem!r} (in {', '.join(where[stem])}), "
                            "but there is no such pair"))
  for stem in sorted(s for s in stems if len(where.get(s, ())) > 1):
    problems.append(Problem("split_file", (str(path),),
                            f"lists {stem!r} more than once (in "
                            f"{', '.join(where[stem])})", name=stem))
  for stem in sorted(stems - where.keys()):
    problems.append(Problem("split_file", (str(path),),
                            f"does not list the pair {stem!r}", name=stem))
  # A stem listed twice stays listed; its problem keeps it out everywhere.
  splits = {split: list(dict.fromkeys(s for s in listed if s in stems))
            for split, listed in listing.items()}
  return splits, problems


def _read_captions(path: Path, pairs: set[tuple[str, str]], stems: set[str]
                   ) -> tuple[dict[tuple[str | None, str], tuple[str, ...]],
                              list[Problem]]:
  """Parses captions.jsonl into (split or None, stem) -> captions.

  `pairs` holds every (split, stem); `stems` every paired stem, including
  those a split file failed to place. The lines are checked by
  `caption_files.parse_lines` (whose reader stops at the first bad line; a
  build lists them all).
  """
  captions, problems = {}, []
  for line in caption_files.parse_lines(path):
    if not isinstance(line, caption_files.CaptionLine):
      number, detail = line
      problems.append(Problem("malformed_caption", (f"{path}:{number}",),
                              detail))
      continue
    key = (line.split, line.name)
    if (key not in pairs) if line.split is not None else (
        line.name not in stems):
      in_split = f" in split {line.split!r}" if line.split is not None else ""
      problems.append(Problem("caption_without_pair",
                              (f"{path}:{line.number}",),
                              f"captions for {line.name!r}, but there is no "
                              f"such pair{in_split}"))
      continue
    captions[key] = line.captions
  return captions, problems


def _attach_text_emb(path: Path, dataset: str, pairs: list[Pair],
                     stems: set[str]) -> tuple[list[Pair], list[Problem]]:
  """Adds each usable pair's embedding rows from a caption store.

  A pair whose row count differs from its caption count is a problem (left
  out), and so are rows for a stem not among the paired `stems` (reported
  only).
  """
  store = caption_store.CaptionEmbeddings.load(path, mmap=True)
  if pairs and not any(store.has(dataset, s) for pair in pairs
             for s in pair.caption_sources):
    # (Else every pair would be "no rows", and skipping would drop them all.)
    raise LayoutError(f"{path}: the caption store has no dataset "
                      f"{dataset!r} (has {', '.join(store.datasets())}); "
                      "name the store's key with --text_emb_dataset")
  names = set(store.names(dataset)) if store.has(dataset) else set()
  where = (f"{path}[{dataset}]",)
  problems = [Problem("text_emb", where,
                      f"rows for {key!r}, but there is no such pair")
              for key in sorted(names)
              if caption_store.stem_of(key) not in stems]
  out = []
  for pair in pairs:
    sources = list(dict.fromkeys(pair.caption_sources))
    # Per source, the line for the pair's split if the store has one, else
    # the untagged line: the rule `scan` reads the caption files by.
    found = {s: store.find(dataset, pair.name, s, pair.split)
             for s in sources}
    missing = [s for s, rows in found.items() if rows is None]
    if missing:
      problems.append(Problem(
          "text_emb", where, f"no rows for {pair.name!r} (caption source(s) "
          f"{', '.join(missing)})", pair.split, pair.name))
      continue
    rows = [row for s in sources for row in found[s]]
    stale = store.check_current(
        repr(pair.name), rows,
        [c for s in sources for c, cs in zip(pair.captions,
                                             pair.caption_sources) if cs == s])
    if stale:
      problems.append(Problem("text_emb", where, stale, pair.split,
                              pair.name))
      continue
    emb = np.asarray(store.table[rows], np.float32).reshape(len(rows),
                                                            store.dim)
    out.append(dataclasses.replace(pair, text_emb=emb))
  return out, problems


def caption_source_files(root: Path, captions: str | os.PathLike | None,
                         caption_sources: Sequence[str] | None
                         ) -> list[tuple[str, Path]]:
  """(source, file) of the caption files to read: the one file `captions`,
  or the named `caption_sources` (each must exist), or every captions*.jsonl
  in `root`."""
  if captions is not None:
    return [(caption_files.source_of(captions), Path(captions))]
  if caption_sources is None:
    return [(source, root / caption_files.file_of(source))
            for source in caption_files.find_sources(root)]
  out = []
  for source in caption_sources:
    path = root / caption_files.file_of(source)
    if not path.is_file():
      raise LayoutError(
          f"{root}: caption source {source!r} has no file {path.name} "
          "(config.data.caption_sources)")
    out.append((source, path))
  return out


def scan(root: str | os.PathLike, layout: Layout, *,
         captions: str | os.PathLike | None = None,
         split_file: str | os.PathLike | None = None,
         text_emb: str | os.PathLike | None = None,
         text_emb_dataset: str | None = None,
         decode: bool = True,
         caption_sources: Sequence[str] | None = None) -> Scan:
  """Finds and validates every pair under `root`; see the module docstring.

  Args:
    root: the dataset's root folder (the TFDS manual dir).
    layout: where the folders are.
    captions: one captions file; default every `<root>/captions*.jsonl`
      (`caption_files.source_of` names their sources), or the files of
      `caption_sources` when given.
    split_file: split file for undivided layouts; default `<root>/splits.json`
      if present.
    text_emb: a caption store of precomputed caption embeddings; none default.
    text_emb_dataset: the store's dataset key; default the captions file's
      folder name (or the root's name without captions).
    decode: fully decode every image (finds truncated files; what builds do)
      instead of reading headers only.
    caption_sources: the caption sources to read (see `captions`).
  """
  root = Path(root)
  caption_paths = caption_source_files(root, captions, caption_sources)
  if split_file is None and layout.undivided and (root / SPLITS_FILE).is_file():
    split_file = root / SPLITS_FILE
  groups = locate(root, layout, split_file=split_file, captions=captions,
                  text_emb=text_emb)
  paired, problems = _pair_stems(root, groups)
  problems += _check_images(paired, decode)

  all_stems = {stem for stems in paired.values() for stem in stems}
  if split_file is not None:
    by_split, split_problems = _read_split_file(
        Path(split_file), paired[_NO_SPLIT])
    problems += split_problems
    everything = paired[_NO_SPLIT]
    paired = {split: {s: everything[s] for s in stems}
              for split, stems in by_split.items()}
  else:
    paired = {(DEFAULT_SPLIT if g == _NO_SPLIT else g): stems
              for g, stems in paired.items()}

  texts: dict[tuple[str | None, str], tuple[tuple[str, str], ...]] = {}
  for source, path in caption_paths:
    found, caption_problems = _read_captions(
        path, {(s, stem) for s, stems in paired.items() for stem in stems},
        all_stems)
    problems += caption_problems
    for key, captions_of_pair in found.items():
      texts[key] = texts.get(key, ()) + tuple((source, c)
                                              for c in captions_of_pair)

  # A problem that names a pair (and no split, or its split) keeps it out.
  dropped = {(p.split, p.name) for p in problems if p.name is not None}
  def pair(split: str, stem: str, ir: Path, vi: Path) -> Pair:
    # Per source, a split-specific line wins over one for every split.
    tagged = texts.get((split, stem), ())
    tagged_sources = {source for source, _ in tagged}
    tagged += tuple(t for t in texts.get((None, stem), ())
                    if t[0] not in tagged_sources)
    order = [source for source, _ in caption_paths]
    tagged = tuple(sorted(tagged, key=lambda t: order.index(t[0])))
    return Pair(stem, split, ir, vi, tuple(c for _, c in tagged),
                caption_sources=tuple(s for s, _ in tagged))

  pairs = [
      pair(split, stem, ir, vi)
      for split, stems in paired.items()
      for stem, (ir, vi) in sorted(stems.items())
      if (None, stem) not in dropped and (split, stem) not in dropped]
  if text_emb is not None:
    if text_emb_dataset is None:
      text_emb_dataset = (caption_files.default_dataset(caption_paths[0][1])
                          if caption_paths else caption_files.dataset_key(root))
    pairs, emb_problems = _attach_text_emb(Path(text_emb), text_emb_dataset,
                                           pairs, all_stems)
    problems += emb_problems
  splits = {split: [p for p in pairs if p.split == split] for split in paired}
  return Scan(root, splits, problems)


def resolve(found: Scan, on_bad_data: OnBadData) -> None:
  """Raises one BadDataError listing every problem, or logs them as skipped."""
  if on_bad_data not in ("error", "skip"):
    raise UserError(f"on_bad_data must be 'error' or 'skip', not "
                     f"{on_bad_data!r}")
  if not found.problems:
    return
  listing = "\n".join(f"  {p}" for p in found.problems)
  if on_bad_data == "error":
    raise BadDataError(
        f"{len(found.problems)} bad-data problem(s) under {found.root} "
        f"(fix or remove these files; a build with "
        f"`build_dataset --on_bad_data=skip` leaves them out):\n{listing}",
        found.problems)
  _logger.warning("Skipped %d bad-data problem(s) under %s:\n%s",
                  len(found.problems), found.root, listing)
