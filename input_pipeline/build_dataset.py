r"""Builds an infrared-visible pair dataset to array_record (no TensorFlow).

  python -m input_pipeline.build_dataset --dataset ivf_pairs/llvip \
      --manual_dir ~/data/LLVIP --data_dir ~/tensorflow_datasets \
      [--on_bad_data error|skip] [--captions FILE] [--split_file FILE] \
      [--text_emb STORE_DIR [--text_emb_dataset KEY]] [--overwrite]

--dataset is a config of `ivf_pairs` (the prefix is optional): folders,
split_folders, llvip, msrs, m3fd, roadscene or tno; --list_configs prints the
layout each expects. Read the result with
`input_pipeline.datasets.load_source(name, split, data_dir)`.

Exit status 2 with `error: ...` on stderr when the folder does not match the
layout (every missing folder is named) or, with --on_bad_data=error, when it
holds bad data (every bad file is named).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from input_pipeline import datasets
from input_pipeline import image_io
from input_pipeline import layouts
from input_pipeline.errors import UserError

_DATASET = flags.DEFINE_string(
    "dataset", None, "Config to build: 'ivf_pairs/<config>' or '<config>'.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "The dataset's root folder, in the config's layout.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where tfds datasets are written.")
_ON_BAD_DATA = flags.DEFINE_enum(
    "on_bad_data", "error", ["error", "skip"],
    "error: list every bad file and build nothing; skip: leave bad pairs "
    f"out and write {datasets.REPORT_FILE} beside the records.")
_CAPTIONS = flags.DEFINE_string(
    "captions", None, f"Captions file (default <manual_dir>/"
    f"{layouts.CAPTIONS_FILE} if present).")
_SPLIT_FILE = flags.DEFINE_string(
    "split_file", None, "{split: [stems]} JSON for layouts without split "
    f"folders (default <manual_dir>/{layouts.SPLITS_FILE} if present, else "
    "all pairs are 'train').")
_TEXT_EMB = flags.DEFINE_string(
    "text_emb", None, "Caption store of precomputed caption embeddings "
    "(written by python -m textfusion_jax.text.embed_captions).")
_TEXT_EMB_DATASET = flags.DEFINE_string(
    "text_emb_dataset", None, "The store's dataset key (default: the "
    "captions file's folder name, as embed_captions defaults it).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rebuild an existing build (beside it; the old one "
    "is replaced only once the new one is complete).")
_LIST_CONFIGS = flags.DEFINE_bool(
    "list_configs", False, "Print each config's expected layout and exit.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}",
          file=sys.stderr)
    sys.exit(2)
  # tfds's own progress notes (e.g. "Variant folder ... has no
  # dataset_info.json" before every first build) would bury the outcome.
  absl_logging.set_verbosity(absl_logging.ERROR)
  if _LIST_CONFIGS.value:
    for name, layout in layouts.LAYOUTS.items():
      print(f"{datasets.NAME}/{name}: {layout.description}")
    return
  missing = [f"--{f.name}" for f in (_DATASET, _MANUAL_DIR, _DATA_DIR)
             if f.value is None]
  if missing:
    print(f"error: missing {', '.join(missing)} (see --help)",
          file=sys.stderr)
    sys.exit(2)
  try:
    image_io.apply_pixel_limit()  # a bad value: one line, not every image
    builder = datasets.build(
        _DATASET.value, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
        on_bad_data=_ON_BAD_DATA.value, captions=_CAPTIONS.value,
        split_file=_SPLIT_FILE.value, text_emb=_TEXT_EMB.value,
        text_emb_dataset=_TEXT_EMB_DATASET.value, overwrite=_OVERWRITE.value)
  except (UserError, FileNotFoundError) as error:  # bad layout, data, files
    # Multi-line on purpose: a bad-data error lists one file per line.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except OSError as error:  # e.g. a --data_dir that cannot be written
    where = f"{error.filename}: " if error.filename else ""
    print(f"error: {where}{error.strerror or error}", file=sys.stderr)
    sys.exit(2)
  report = json.loads(datasets.report_path(builder).read_text())
  counts = ", ".join(f"{split} {n}" for split, n in report["pairs"].items())
  print(f"{builder.name}/{builder.builder_config.name} at {builder.data_dir}: "
        f"pairs per split: {counts}")
  if report["problems"]:
    print(f"skipped {len(report['problems'])} bad-data problem(s), listed in "
          f"{datasets.report_path(builder)}:")
    for problem in report["problems"]:
      print(f"  {layouts.Problem(**problem)}")


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with a flag mistake as one `error:` line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
