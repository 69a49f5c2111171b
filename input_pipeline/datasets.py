"""TFDS builders for infrared-visible pairs, and random-access sources of them.

`IvfPairs` (TFDS name 'ivf_pairs') builds array_record datasets from a folder
given as the TFDS manual dir, without TensorFlow. Its configs are the layouts
of `layouts.LAYOUTS`: 'folders' and 'split_folders' (generic), 'llvip',
'msrs', 'm3fd', 'roadscene' and 'tno'; each config's description states the
layout it expects. Build with `build(...)` or
`python -m input_pipeline.build_dataset`; read with `load_source(...)`.

Stored features (version 2.0.0):

  'name':          the pair's file stem
  'ir', 'vis':     encoded image bytes: an 8-bit JPEG source's own bytes
                   (no re-encoding: the same pixels on decode, a fraction
                   of a PNG's size), else a PNG of the converted uint8
                   image (lossless sources, 16-bit infrared, palettes).
                   Decoded by `to_record` as uint8 ir (H, W, 1) and vis
                   (H, W, 3), by `layouts.read_pair`'s rules; grey visible
                   images are replicated
  'vis_was_grey':  bool
  'ir_was_16bit':  bool; 16-bit infrared is stretched per image ('minmax')
  'captions':      list of text, possibly empty: every caption file's
                   (captions.jsonl, captions_<source>.jsonl) unless the
                   build names one
  'caption_sources': list of text, each caption's source ('default', ...)
  'text_emb_flat': float32 (num_captions * D,), the caption embeddings
                   flattened, and
  'text_emb_dim':  int32 D, 0 when the build had no embeddings. tfds 4.9
                   cannot decode an empty tensor with two unknown dimensions,
                   hence flat; `to_record` restores 'text_emb' (num_captions,
                   D). The other name keeps raw records from offering a
                   'text_emb' of the wrong shape.

The project's common record format (`to_record`, `RecordSource`,
`PairedFolderSource`) is {'name': str, 'ir': uint8 (H, W, 1), 'vis': uint8
(H, W, 3), 'captions': list[str]} plus 'text_emb' float32 (num_captions, D)
when the dataset has embeddings; the two sources here give the images as
`image_io.EncodedImage`s (array-like; a crop decodes only what it needs).

Bad data (see layouts.py) is validated for the whole folder before anything is
written. Every build writes `bad_data_report.json` next to its records (pairs
per split, and each problem skipped with on_bad_data='skip'). tfds writes into
a temporary `incomplete.*` folder and renames it when complete, so a failed or
killed build never leaves a dataset that loads (a killed build's
`incomplete.*` folder stays behind; delete it by hand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from input_pipeline import caption_store
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline import layouts
from input_pipeline.errors import UserError

NAME = "ivf_pairs"
REPORT_FILE = "bad_data_report.json"


@dataclasses.dataclass(eq=False)
class IvfPairsConfig(tfds.core.BuilderConfig):
  """A BuilderConfig that names a folder layout."""
  layout: layouts.Layout | None = None


def _png(image: np.ndarray) -> bytes:
  # Encoded here with Pillow: tfds encodes numpy images with TensorFlow.
  # zlib level 1 encoded a 640x480 RGB frame ~5x faster than Pillow's
  # default level 6 (52 vs 268 ms here) for ~20% more bytes: it matters for
  # large sets such as LLVIP (15k pairs of 1280x1024).
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(
      buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def _jpeg_mode(path: Path) -> str | None:
  """The mode of an 8-bit grey or RGB JPEG at `path` (header only), else
  None."""
  with image_io.open_image(path) as image:
    if image.format == "JPEG" and image.mode in ("L", "RGB"):
      return image.mode
  return None


def _encode(pair: layouts.Pair) -> dict[str, Any]:
  """The stored example of one pair (see the module docstring).

  8-bit JPEGs keep their own bytes (decoding them gives the same pixels, at
  a fraction of a PNG's size); their flags come from the header, so a build
  decodes them once, in the validation pass. Other files are stored as PNGs
  of `layouts.read_pair`'s uint8 images (lossless sources, 16-bit infrared,
  palettes).
  """
  ir_mode, vis_mode = _jpeg_mode(Path(pair.ir)), _jpeg_mode(Path(pair.vi))
  if ir_mode and vis_mode:
    ir, vis = Path(pair.ir).read_bytes(), Path(pair.vi).read_bytes()
    vis_was_grey, ir_was_16bit = vis_mode == "L", False
  else:
    images = layouts.read_pair(pair.ir, pair.vi)
    ir = (Path(pair.ir).read_bytes() if ir_mode else
          _png(images.ir[..., 0]))
    vis = Path(pair.vi).read_bytes() if vis_mode else _png(images.vis)
    vis_was_grey, ir_was_16bit = images.vis_was_grey, images.ir_was_16bit
  emb = pair.text_emb
  return {
      "name": pair.name,
      "ir": ir,
      "vis": vis,
      "vis_was_grey": vis_was_grey,
      "ir_was_16bit": ir_was_16bit,
      "captions": list(pair.captions),
      "caption_sources": list(pair.caption_sources),
      "text_emb_flat": (np.zeros(0, np.float32) if emb is None else
                        emb.reshape(-1)),
      "text_emb_dim": 0 if emb is None else emb.shape[1],
  }


class IvfPairs(tfds.core.GeneratorBasedBuilder):
  """Infrared-visible image pairs with captions, from a folder layout.

  Keyword arguments beyond tfds's (they matter only when building):
    on_bad_data: 'error' (default) raises one error listing every problem;
      'skip' leaves the bad pairs out and writes `bad_data_report.json`.
    captions: captions file; default `<manual_dir>/captions.jsonl` if present.
    split_file: {split: [stems]} JSON for undivided layouts; default
      `<manual_dir>/splits.json` if present.
    text_emb: a caption store (textfusion_jax.text.embed_captions) to take
      each pair's caption embeddings from.
    text_emb_dataset: the store's dataset key; default the captions file's
      folder name, as embed_captions defaults it.
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "Images stored encoded (JPEG sources keep their bytes, others "
               "PNG) and decoded by RecordSource; 1.0.0 stored PNG images.",
  }
  BUILDER_CONFIGS = [
      IvfPairsConfig(name=name, description=layout.description, layout=layout)
      for name, layout in layouts.LAYOUTS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the dataset's root folder as the manual dir. Expected layout per "
      "config:\n" + "\n".join(f"  {name}: {layout.description}"
                              for name, layout in layouts.LAYOUTS.items()))

  def __init__(self, *, on_bad_data: layouts.OnBadData = "error",
               captions: str | os.PathLike | None = None,
               split_file: str | os.PathLike | None = None,
               text_emb: str | os.PathLike | None = None,
               text_emb_dataset: str | None = None,
               file_format: str = "array_record", **kwargs: Any):
    super().__init__(file_format=file_format, **kwargs)
    self._options = dict(captions=captions, split_file=split_file,
                         text_emb=text_emb, text_emb_dataset=text_emb_dataset)
    self._on_bad_data = on_bad_data
    # tfds re-creates builders from _original_state when unpickling.
    self._original_state.update(self._options, on_bad_data=on_bad_data,
                                file_format=file_format)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # tfds finds a packaged builder's code (to look for checksum files beside
    # it) with the importlib_resources backport, which is not a dependency
    # here; this builder downloads nothing, so it has no checksums to find.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs reads metadata files
    # from this package's folder, which holds unrelated modules.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(doc="source file stem"),
            "ir": tfds.features.Tensor(
                shape=(), dtype=np.object_,
                doc="encoded image: source JPEG bytes, or PNG (uint8 grey)"),
            "vis": tfds.features.Tensor(
                shape=(), dtype=np.object_,
                doc="encoded image: source JPEG bytes, or PNG (uint8 RGB)"),
            "vis_was_grey": tfds.features.Scalar(np.bool_),
            "ir_was_16bit": tfds.features.Scalar(np.bool_),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "caption_sources": tfds.features.Sequence(tfds.features.Text()),
            "text_emb_flat": tfds.features.Tensor(shape=(None,),
                                                  dtype=np.float32),
            "text_emb_dim": tfds.features.Scalar(np.int32),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    found = layouts.scan(dl_manager.manual_dir, self.builder_config.layout,
                         decode=True, **self._options)
    layouts.resolve(found, self._on_bad_data)
    if not any(found.splits.values()):
      raise layouts.BadDataError(
          f"{found.root}: no usable pairs to build", found.problems)
    # self.data_dir is tfds's temporary folder here: the report is renamed
    # into place together with the records.
    report = found.report(self._on_bad_data)
    report["source"] = build_source(dl_manager.manual_dir, self._options,
                                    self._on_bad_data)
    (epath.Path(self.data_dir) / REPORT_FILE).write_text(
        json.dumps(report, indent=1))
    # A split left empty by skipping is in the report but not written: tfds
    # fails to write a split without examples.
    return {split: self._generate_examples(pairs)
            for split, pairs in found.splits.items() if pairs}

  def _generate_examples(self, pairs: list[layouts.Pair]):
    for pair, example in zip(pairs, layouts.map_ordered(_encode, pairs)):
      yield pair.name, example


def _config_name(name_or_config: str) -> str:
  """'llvip' or 'ivf_pairs/llvip' -> 'llvip', checked against the configs."""
  name, _, config = name_or_config.rpartition("/")
  if name not in ("", NAME) or config not in layouts.LAYOUTS:
    raise UserError(
        f"unknown dataset {name_or_config!r}; use one of "
        f"{', '.join(f'{NAME}/{c}' for c in layouts.LAYOUTS)} (or the config "
        "name alone)")
  return config


def build_source(manual_dir: Any, options: Mapping[str, Any],
                 on_bad_data: str) -> dict[str, Any]:
  """What a build was made from (recorded in its report): the folders and
  files as absolute paths, and the bad-data rule."""
  absolute = lambda p: None if p is None else str(
      Path(os.fspath(p)).absolute())
  paths = [manual_dir, *(v for k, v in sorted(options.items())
                         if k != "text_emb_dataset" and v is not None)]
  return {"manual_dir": absolute(manual_dir),
          **{k: (v if k == "text_emb_dataset" else absolute(v))
             for k, v in sorted(options.items())},
          "on_bad_data": on_bad_data,
          "files": files_digest(paths)}


def files_digest(paths: Sequence[Any]) -> dict[str, Any]:
  """The count and a digest of every file under `paths`, for the price of
  a stat per file: an image or caption line changed, added or removed after
  a build changes it. Files are named relative to their root (however the
  root was spelt), symlinked folders are followed, and hidden entries and
  builds (an `ivf_pairs/` folder: --data_dir may lie inside --manual_dir)
  are left out. A caption store counts by its contents, not its times: a
  rerun of embed_captions that changes nothing rewrites it."""
  digest, count = hashlib.sha256(), 0
  for i, root in enumerate(paths):
    root = Path(os.fspath(root))
    for path in _files_under(root):
      relative = path.relative_to(root) if path != root else Path(path.name)
      stat = path.stat()
      if root.is_dir() and (root / caption_store.MANIFEST_FILE).is_file():
        stamp = (hashlib.sha256(path.read_bytes()).hexdigest()
                 if path.suffix == ".json" else str(stat.st_size))
      else:
        stamp = f"{stat.st_size}\t{stat.st_mtime_ns}"
      digest.update(f"{i}\t{relative}\t{stamp}\n".encode())
      count += 1
  return {"count": count, "sha256": digest.hexdigest()[:32]}


def _files_under(root: Path) -> list[Path]:
  if root.is_file():
    return [root]
  found, seen = [], set()
  for folder, subfolders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:  # a link back up the tree
      subfolders[:] = []
      continue
    seen.add(real)
    subfolders[:] = sorted(d for d in subfolders
                           if not d.startswith(".") and d != NAME)
    found += [Path(folder) / n for n in sorted(names)
              if not n.startswith(".")]
  return found


def _check_reused_build(builder: IvfPairs, wanted: dict[str, Any]) -> None:
  """An existing build is reused only for the same sources: a changed
  --manual_dir or option would otherwise be ignored without a word."""
  try:
    recorded = json.loads(report_path(builder).read_text()).get("source")
  except (OSError, ValueError):
    recorded = None
  if recorded is None:  # (builds before this record)
    return
  if "files" not in recorded:  # (builds before file digests)
    wanted = {k: v for k, v in wanted.items() if k != "files"}
  if recorded == wanted:
    return
  changed = [f"{key} {recorded.get(key)!r} -> {wanted.get(key)!r}"
             for key in sorted(set(recorded) | set(wanted))
             if recorded.get(key) != wanted.get(key) and key != "files"]
  if not changed:
    was, now = recorded["files"]["count"], wanted["files"]["count"]
    sources = ", ".join(str(recorded[k]) for k in (
        "manual_dir", "captions", "split_file", "text_emb") if recorded.get(k))
    raise UserError(
        f"{NAME}/{builder.builder_config.name} in {builder.data_dir} was "
        f"built before the files it was made from ({sources}) changed "
        f"({was} files then, {now} now, or some were rewritten); pass "
        "--overwrite to rebuild it")
  raise UserError(
      f"{NAME}/{builder.builder_config.name} is already built in "
      f"{builder.data_dir} from other sources ({'; '.join(changed)}); pass "
      "--overwrite to rebuild it, or use another --data_dir")


def build(dataset: str, *, manual_dir: str | os.PathLike,
          data_dir: str | os.PathLike,
          on_bad_data: layouts.OnBadData = "error",
          captions: str | os.PathLike | None = None,
          split_file: str | os.PathLike | None = None,
          text_emb: str | os.PathLike | None = None,
          text_emb_dataset: str | None = None,
          overwrite: bool = False) -> IvfPairs:
  """Builds `dataset` (a config name or 'ivf_pairs/<config>') into data_dir.

  An existing complete build is reused unless overwrite=True, which builds
  anew beside it and swaps the new one in once complete (a failed rebuild
  leaves the old build as it was); reusing one
  made from other sources (folder, caption/split/embedding files, bad-data
  rule) is an error.
  """
  config = _config_name(dataset)
  data_dir = os.path.expanduser(os.fspath(data_dir))
  # Checked before tfds runs, so a wrong folder gets our error (every missing
  # folder) rather than tfds's generic manual-dir message.
  layouts.locate(manual_dir, layouts.LAYOUTS[config], split_file=split_file,
                 captions=captions, text_emb=text_emb)

  def builder_in(root: str | os.PathLike) -> IvfPairs:
    return IvfPairs(config=config, data_dir=root, on_bad_data=on_bad_data,
                    captions=captions, split_file=split_file,
                    text_emb=text_emb, text_emb_dataset=text_emb_dataset)

  builder = builder_in(data_dir)
  if not overwrite and builder.is_prepared():
    _check_reused_build(builder, build_source(
        manual_dir, dict(captions=captions, split_file=split_file,
                         text_emb=text_emb, text_emb_dataset=text_emb_dataset),
        on_bad_data))
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir),
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if not (overwrite and builder.is_prepared()):
    builder.download_and_prepare(download_config=download_config)
    return builder
  # A rebuild is made beside the old build and swapped in only once it is
  # complete: a bad split file or caption line must not cost the old one.
  Path(data_dir).mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=data_dir))
  try:
    fresh = builder_in(staging)
    fresh.download_and_prepare(download_config=download_config)
    files.replace_directory(os.fspath(fresh.data_dir),
                            os.fspath(builder.data_dir))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return builder_in(data_dir)  # reads the swapped-in build afresh


def report_path(builder: IvfPairs) -> Path:
  """Where a build's bad-data report lies (next to its records)."""
  return Path(os.fspath(builder.data_dir)) / REPORT_FILE


def built_folder(name_or_config: str, data_dir: str | os.PathLike) -> Path:
  """Where `build` puts the dataset `name_or_config` ('llvip' or
  'ivf_pairs/llvip') under `data_dir`."""
  return (Path(os.path.expanduser(os.fspath(data_dir))) / NAME /
          _config_name(name_or_config))


def load_source(name_or_config: str, split: str,
                data_dir: str | os.PathLike) -> Sequence[dict[str, Any]]:
  """The built split as a tfds random-access source of raw tfds records.

  Raises FileNotFoundError if the dataset was not (completely) built.
  Wrap in `RecordSource` for the project's common record format.
  """
  config = _config_name(name_or_config)
  # Config strings such as llvip.py's '~/tensorflow_datasets' reach no shell.
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not IvfPairs(config=config, data_dir=data_dir).is_prepared():
    folder = Path(os.fspath(data_dir)) / NAME / config
    old = sorted(p.name for p in folder.glob("*.*.*") if p.is_dir() and
                 re.fullmatch(r"\d+\.\d+\.\d+", p.name) and
                 p.name != str(IvfPairs.VERSION))
    if old:
      raise FileNotFoundError(
          f"{NAME}/{config} in {data_dir} has format version(s) "
          f"{', '.join(old)}, this code reads {IvfPairs.VERSION}; rebuild it "
          f"with: python -m input_pipeline.build_dataset --dataset "
          f"{NAME}/{config} --manual_dir DIR --data_dir {data_dir}")
    raise FileNotFoundError(
        f"{NAME}/{config} is not built in {data_dir}; build it with: python "
        f"-m input_pipeline.build_dataset --dataset {NAME}/{config} "
        f"--manual_dir DIR --data_dir {data_dir}")
  builder = IvfPairs(config=config, data_dir=data_dir)
  # A split expression ('train[:90%]', 'train+test') names built splits.
  if any(base not in builder.info.splits for base in base_splits(split)):
    raise MissingSplitError(
        f"{NAME}/{config} in {data_dir} has no split {split!r} (it has "
        f"{', '.join(sorted(builder.info.splits))}); set "
        "config.data.train_split / eval_split, or divide the pairs with a "
        "splits.json when building")
  return tfds.data_source(f"{NAME}/{config}", split=split, data_dir=data_dir,
                          download=False)


class MissingSplitError(UserError, KeyError):
  """A built dataset lacks the split asked for."""
  __str__ = Exception.__str__  # KeyError's would quote the message


def base_splits(split: str) -> list[str]:
  """The built splits a tfds split expression reads: 'train[:90%]+test'
  -> ['train', 'test']."""
  return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _text(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def to_record(example: Mapping[str, Any]) -> dict[str, Any]:
  """A raw tfds record -> the project's common record format (images as
  `image_io.EncodedImage`, decoded when cropped or read)."""
  captions = [_text(c) for c in example["captions"]]
  name = _text(example["name"])
  record = {"name": name, "captions": captions,
            "caption_sources": [_text(c) for c in example["caption_sources"]]}
  for key, channels in (("ir", 1), ("vis", 3)):
    # Stored images are 8-bit already (16-bit infrared reduced when built).
    record[key] = image_io.EncodedImage(bytes(example[key]), channels,
                                        name=f"record {name!r} {key!r}")
  dim = int(example["text_emb_dim"])
  if dim:
    record["text_emb"] = np.asarray(example["text_emb_flat"],
                                    np.float32).reshape(-1, dim)
  return record


class RecordSource(Sequence):
  """A random-access source of raw tfds records, in the common format.

  `split`: the split the records were built as (a caption store's lines
  tagged with a split are looked up by it).
  """

  def __init__(self, source: Sequence[Mapping[str, Any]],
               split: str | None = None):
    self._source = source
    # A slice of one split ('train[:90%]') is still that split; records of
    # 'train+test' cannot say which they came from.
    bases = base_splits(split) if split is not None else []
    self._split = bases[0] if len(bases) == 1 else None

  def __len__(self) -> int:
    return len(self._source)

  def record_name(self, index: int) -> str:
    return _text(self._source[index]["name"])

  def record_split(self, index: int) -> str | None:
    del index
    return self._split

  def captions(self, index: int) -> list[str]:
    return [_text(c) for c in self._source[index]["captions"]]

  def caption_sources(self, index: int) -> list[str]:
    return [_text(c) for c in self._source[index]["caption_sources"]]

  def __getitem__(self, index: int) -> dict[str, Any]:
    # tfds raises ValueError out of range; Sequence iteration needs IndexError.
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    return to_record(self._source[index % len(self)])


def select_pairs(splits: Mapping[str, Sequence[layouts.Pair]], split: str,
                 root: str | os.PathLike) -> list[layouts.Pair]:
  """The pairs a split name or tfds split expression reads from a folder.

  'train' is a split; 'train[:80%]', 'train[80%:]', 'train[:8]' and
  'train+test' slice and join splits in their stem order, with tfds's
  rounding, so complementary percent slices share no pair.
  """
  if split in splits:
    return list(splits[split])
  names = ", ".join(sorted(splits))
  unknown = [base for base in base_splits(split) if base not in splits]
  if unknown:
    raise UserError(f"{root}: no split {unknown[0]!r}; splits: {names}")
  sizes = {name: types.SimpleNamespace(num_examples=len(pairs))
           for name, pairs in splits.items()}
  try:
    reads = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  except (ValueError, AssertionError, AttributeError) as e:
    # AttributeError: a shard slice ('train[:1shard]') asks for shard sizes,
    # which a folder does not have.
    reason = "; ".join(line.strip() for line in str(e).splitlines()
                       if line.strip()) or type(e).__name__
    raise UserError(f"{root}: split {split!r}: {reason}") from None
  pairs = [pair for read in reads
           for pair in splits[read.splitname][read.from_:read.to]]
  if not pairs:
    raise UserError(f"{root}: split {split!r} selects no pairs (splits: "
                    + ", ".join(f"{n} {len(p)}" for n, p in
                                sorted(splits.items())) + ")")
  return pairs


class PairedFolderSource(Sequence):
  """Pairs read straight from a folder, no build; common-format records.

  Validates like a build (layouts.scan) when created, but by default reads
  only image headers, so a file truncated inside its pixel data raises
  ImageReadError when its image is decoded (cropped or read);
  check_images=True decodes every image up front instead. caption_sources:
  the caption files to read (`layouts.caption_source_files`). Records are
  ordered by split, then stem.
  """

  def __init__(self, root: str | os.PathLike, *, layout: str = "folders",
               split: str = layouts.DEFAULT_SPLIT,
               on_bad_data: layouts.OnBadData = "error",
               captions: str | os.PathLike | None = None,
               split_file: str | os.PathLike | None = None,
               text_emb: str | os.PathLike | None = None,
               text_emb_dataset: str | None = None,
               check_images: bool = False,
               caption_sources: Sequence[str] | None = None):
    found = layouts.scan(root, layouts.LAYOUTS[_config_name(layout)],
                         captions=captions, split_file=split_file,
                         text_emb=text_emb, text_emb_dataset=text_emb_dataset,
                         decode=check_images, caption_sources=caption_sources)
    layouts.resolve(found, on_bad_data)
    self.pairs = select_pairs(found.splits, split, root)

  def __len__(self) -> int:
    return len(self.pairs)

  def record_name(self, index: int) -> str:
    return self.pairs[index].name

  def record_split(self, index: int) -> str:
    return self.pairs[index].split

  def captions(self, index: int) -> list[str]:
    return list(self.pairs[index].captions)

  def caption_sources(self, index: int) -> list[str]:
    return list(self.pairs[index].caption_sources)

  def __getitem__(self, index: int) -> dict[str, Any]:
    pair = self.pairs[index]
    # Decoded when used (layouts.read_pair's rules): a training crop
    # converts only its window.
    record = {"name": pair.name,
              "ir": image_io.EncodedImage(pair.ir, 1, layouts.IR_16BIT_RULE),
              "vis": image_io.EncodedImage(pair.vi, 3, layouts.VIS_16BIT_RULE),
              "captions": list(pair.captions),
              "caption_sources": list(pair.caption_sources)}
    if pair.text_emb is not None:
      record["text_emb"] = pair.text_emb
    return record
