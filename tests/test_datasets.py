"""Tests of the TFDS pair builders, layouts and sources (input_pipeline)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets
from input_pipeline import layouts
from input_pipeline import image_io
from input_pipeline import caption_store

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "data" / "ivf_samples"


# ------------------------------------------------------------------ fixtures


@dataclasses.dataclass
class Want:
  """What one pair must read back as (computed here, not by the library)."""
  ir: np.ndarray
  vis: np.ndarray
  ir_was_16bit: bool = False
  vis_was_grey: bool = False
  captions: tuple[str, ...] = ()


def _grey_of_rgb(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.float64)
  return np.rint(rgb @ [0.299, 0.587, 0.114]).astype(np.uint8)


def _add_pair(root: Path, ir_path: str, vi_path: str, size: tuple[int, int],
              seed: int, ir_kind: str = "grey8",
              vis_kind: str = "rgb") -> Want:
  """Writes a random pair and returns what it must read back as.

  ir_kind: grey8 | grey16 (a 16-bit PNG) | rgb (colour-stored, e.g. JPG).
  vis_kind: rgb | grey. The file format follows the path's suffix.
  """
  rng = np.random.default_rng(seed)
  h, w = size
  ir_file, vi_file = root / ir_path, root / vi_path
  for f in (ir_file, vi_file):
    f.parent.mkdir(parents=True, exist_ok=True)
  if ir_kind == "grey16":
    raw = rng.integers(1000, 40000, (h, w)).astype(np.uint16)
    Image.fromarray(raw).save(ir_file)
    lo, hi = float(raw.min()), float(raw.max())
    ir = np.rint((raw - lo) * 255.0 / (hi - lo)).astype(np.uint8)
  elif ir_kind == "rgb":
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(ir_file)
    ir = _grey_of_rgb(np.asarray(Image.open(ir_file).convert("RGB")))
  else:
    Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)).save(ir_file)
    ir = np.asarray(Image.open(ir_file))
  if vis_kind == "grey":
    Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)).save(vi_file)
    vis = np.repeat(np.asarray(Image.open(vi_file))[..., None], 3, axis=-1)
  else:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(vi_file)
    vis = np.asarray(Image.open(vi_file).convert("RGB"))
  assert ir.shape == (h, w) and vis.shape == (h, w, 3)
  return Want(ir[..., None], vis, ir_was_16bit=ir_kind == "grey16",
              vis_was_grey=vis_kind == "grey")


def _write_captions(root: Path, wants: dict[str, dict[str, Want]],
                    captions: dict[str, tuple[str, ...]]) -> None:
  with (root / "captions.jsonl").open("a") as f:
    for name, texts in captions.items():
      f.write(json.dumps({"name": name, "captions": list(texts)}) + "\n")
      for split in wants.values():
        if name in split:
          split[name].captions = texts


def _folders(root: Path) -> dict[str, dict[str, Want]]:
  train = {
      "a": _add_pair(root, "ir/a.png", "vi/a.png", (16, 16), 1),
      "b": _add_pair(root, "ir/b.png", "vi/b.png", (24, 20), 2,
                     ir_kind="grey16", vis_kind="grey"),
      "c": _add_pair(root, "ir/c.png", "vi/c.png", (40, 32), 3),
  }
  wants = {"train": train}
  _write_captions(root, wants, {"a": ("a person", "a warm person"),
                                "b": ("x", "y", "z")})
  return wants


def _split_folders(root: Path) -> dict[str, dict[str, Want]]:
  return {
      "day": {"d1": _add_pair(root, "day/ir/d1.png", "day/vi/d1.png",
                              (16, 24), 4),
              "d2": _add_pair(root, "day/ir/d2.png", "day/vi/d2.png",
                              (32, 40), 5, vis_kind="grey")},
      "night_2": {"n1": _add_pair(root, "night_2/ir/n1.png",
                                  "night_2/vi/n1.png", (20, 16), 6,
                                  ir_kind="grey16")},
  }


def _llvip(root: Path) -> dict[str, dict[str, Want]]:
  # LLVIP ships JPGs, its infrared frames stored as 3-channel JPG.
  (root / "Annotations").mkdir(parents=True)
  (root / "Annotations" / "010001.xml").write_text("<annotation/>")
  wants = {
      "train": {n: _add_pair(root, f"infrared/train/{n}.jpg",
                             f"visible/train/{n}.jpg", s, i, ir_kind="rgb")
                for i, (n, s) in enumerate([("010001", (16, 16)),
                                            ("010002", (32, 40))])},
      "test": {"190001": _add_pair(root, "infrared/test/190001.jpg",
                                   "visible/test/190001.jpg", (24, 32), 9,
                                   ir_kind="rgb")},
  }
  _write_captions(root, wants, {"190001": ("night street",)})
  return wants


def _msrs(root: Path) -> dict[str, dict[str, Want]]:
  (root / "train" / "Segmentation_labels").mkdir(parents=True)
  return {
      "train": {"00001D": _add_pair(root, "train/ir/00001D.png",
                                    "train/vi/00001D.png", (16, 32), 10),
                "00002N": _add_pair(root, "train/ir/00002N.png",
                                    "train/vi/00002N.png", (24, 24), 11)},
      "test": {"00003N": _add_pair(root, "test/ir/00003N.png",
                                   "test/vi/00003N.png", (40, 32), 12)},
  }


def _m3fd(root: Path) -> dict[str, dict[str, Want]]:
  # No official split: a splits.json in the root divides the pairs.
  (root / "Annotation").mkdir(parents=True)
  (root / "Annotation" / "00000.xml").write_text("<annotation/>")
  pairs = {n: _add_pair(root, f"Ir/{n}.png", f"Vis/{n}.png", s, 13 + i)
           for i, (n, s) in enumerate([("00000", (16, 20)),
                                       ("00001", (24, 16)),
                                       ("00002", (32, 40))])}
  (root / "splits.json").write_text(
      json.dumps({"train": ["00000", "00002"], "val": ["00001"]}))
  return {"train": {n: pairs[n] for n in ("00000", "00002")},
          "val": {"00001": pairs["00001"]}}


def _roadscene(root: Path) -> dict[str, dict[str, Want]]:
  # crop_HR_visible/ holds other sizes and must not be read.
  (root / "crop_HR_visible").mkdir(parents=True)
  Image.new("RGB", (64, 48)).save(root / "crop_HR_visible" / "FLIR_00006.jpg")
  return {"train": {
      n: _add_pair(root, f"cropinfrared/{n}.jpg", f"crop_LR_visible/{n}.jpg",
                   s, 16 + i, ir_kind="rgb")
      for i, (n, s) in enumerate([("FLIR_00006", (16, 16)),
                                  ("FLIR_00018", (32, 24))])}}


def _tno(root: Path) -> dict[str, dict[str, Want]]:
  return {"train": {
      "Kaptein_1123": _add_pair(root, "ir/Kaptein_1123.png",
                                "vi/Kaptein_1123.png", (32, 40), 20,
                                ir_kind="grey16", vis_kind="grey"),
      "bench": _add_pair(root, "ir/bench.bmp", "vi/bench.bmp", (16, 24), 21,
                         vis_kind="grey"),
  }}


CONFIG_FIXTURES: dict[str, Callable[[Path], dict[str, dict[str, Want]]]] = {
    "folders": _folders, "split_folders": _split_folders, "llvip": _llvip,
    "msrs": _msrs, "m3fd": _m3fd, "roadscene": _roadscene, "tno": _tno,
}


def _assert_source_matches(source, want: dict[str, Want]) -> None:
  records = {r["name"]: r for r in source}
  assert sorted(records) == sorted(want)
  for name, expected in want.items():
    record = records[name]
    assert set(record) == {"name", "ir", "vis", "captions", "caption_sources"}
    assert record["caption_sources"] == ["default"] * len(record["captions"])
    assert record["ir"].dtype == np.uint8 and record["vis"].dtype == np.uint8
    np.testing.assert_array_equal(record["ir"], expected.ir, err_msg=name)
    np.testing.assert_array_equal(record["vis"], expected.vis, err_msg=name)
    assert record["captions"] == list(expected.captions)


# ------------------------------------------------------------- named configs


def test_every_config_is_a_named_layout_with_a_description():
  configs = {c.name: c for c in datasets.IvfPairs.BUILDER_CONFIGS}
  assert set(configs) == set(CONFIG_FIXTURES)
  for name, config in configs.items():
    assert config.layout is layouts.LAYOUTS[name]
    assert "<root>/" in config.description


@pytest.mark.parametrize("config", sorted(CONFIG_FIXTURES))
def test_named_config_builds_and_reads_back_exactly(tmp_path, config):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  wants = CONFIG_FIXTURES[config](root)
  builder = datasets.build(config, manual_dir=root, data_dir=data_dir)
  assert builder.is_prepared()
  assert set(builder.info.splits) == set(wants)
  assert builder.info.file_format.value == "array_record"
  for split, want in wants.items():
    raw = datasets.load_source(f"ivf_pairs/{config}", split, data_dir)
    assert len(raw) == len(want)
    for example in raw:
      expected = want[example["name"].decode()]
      assert example["ir_was_16bit"] == expected.ir_was_16bit
      assert example["vis_was_grey"] == expected.vis_was_grey
      assert example["text_emb_dim"] == 0
    _assert_source_matches(datasets.RecordSource(raw), want)
    # The folder source reads the same records without a build.
    _assert_source_matches(
        datasets.PairedFolderSource(root, layout=config, split=split), want)
  report = json.loads(datasets.report_path(builder).read_text())
  assert report["problems"] == []
  assert report["pairs"] == {s: len(w) for s, w in wants.items()}


def test_record_source_is_a_sequence(tmp_path):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  _folders(root)
  datasets.build("folders", manual_dir=root, data_dir=data_dir)
  source = datasets.RecordSource(
      datasets.load_source("folders", "train", data_dir))
  assert len(list(source)) == 3
  assert source[-1]["name"] == source[2]["name"]
  with pytest.raises(IndexError):
    source[3]


def test_jpeg_sources_keep_their_bytes_and_decode_to_the_same_pixels(
    tmp_path):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  wants = {
      # LLVIP stores grey infrared as RGB JPEGs.
      "j1": _add_pair(root, "ir/j1.jpg", "vi/j1.jpg", (40, 48), 50,
                      ir_kind="rgb"),
      "j2": _add_pair(root, "ir/j2.jpg", "vi/j2.jpg", (32, 40), 51,
                      vis_kind="grey"),
      "p16": _add_pair(root, "ir/p16.png", "vi/p16.jpg", (24, 32), 52,
                       ir_kind="grey16"),
  }
  datasets.build("folders", manual_dir=root, data_dir=data_dir)
  raw = datasets.load_source("folders", "train", data_dir)
  by_name = {r["name"].decode(): r for r in raw}
  for name in ("j1", "j2"):
    for key, folder in (("ir", "ir"), ("vis", "vi")):
      assert bytes(by_name[name][key]) == (root / folder /
                                           f"{name}.jpg").read_bytes()
  assert bytes(by_name["p16"]["vis"]) == (root / "vi/p16.jpg").read_bytes()
  # 16-bit infrared is reduced when built and stored as an 8-bit PNG.
  assert bytes(by_name["p16"]["ir"]).startswith(b"\x89PNG")
  for name, want in wants.items():
    assert by_name[name]["vis_was_grey"] == want.vis_was_grey, name
    assert by_name[name]["ir_was_16bit"] == want.ir_was_16bit, name
  for name, want in wants.items():
    expected = layouts.read_pair(*(root / folder / f"{name}.{ext}"
                                   for folder, ext in (
                                       ("ir", "png" if name == "p16" else
                                        "jpg"), ("vi", "jpg"))))
    np.testing.assert_array_equal(expected.ir, want.ir)
  _assert_source_matches(datasets.RecordSource(raw), wants)
  # A crop decodes to the same window as the whole image.
  for source in (datasets.RecordSource(raw), datasets.PairedFolderSource(root)):
    for record in source:
      for key in ("ir", "vis"):
        whole = np.asarray(record[key])
        np.testing.assert_array_equal(record[key].crop(3, 5, 16, 20),
                                      whole[3:19, 5:25])


# ------------------------------------------------------ shared sample folders


@pytest.mark.parametrize("subset", ["tno", "msrs"])
def test_builds_shared_samples_with_captions(tmp_path, subset):
  root = SAMPLES / subset
  if not root.is_dir():
    pytest.skip(f"shared samples not available at {root}")
  datasets.build("folders", manual_dir=root, data_dir=tmp_path)
  records = {r["name"]: r for r in datasets.RecordSource(
      datasets.load_source("folders", "train", tmp_path))}
  lines = [json.loads(l) for l in (root / "captions.jsonl").read_text()
           .splitlines()]
  assert len(records) == len(lines) == 20
  for line in lines:
    record = records[line["name"]]
    assert record["captions"] == line["captions"]
    with Image.open(next((root / "ir").glob(f"{line['name']}.*"))) as ir:
      assert ir.mode == "L"  # so the stored pixels must be the file's
      np.testing.assert_array_equal(record["ir"][..., 0], np.asarray(ir))
    with Image.open(next((root / "vi").glob(f"{line['name']}.*"))) as vi:
      vis = np.asarray(vi.convert("RGB"))
      assert vi.mode in ("L", "RGB")
      np.testing.assert_array_equal(record["vis"], vis)


# ----------------------------------------------------------------- bad data


@dataclasses.dataclass
class Bad:
  """A bad-data case: what every report must name, and what survives."""
  named: list[str]  # substrings the error and the report must contain
  kinds: list[str]
  kept: dict[str, set[str]]
  build_kwargs: dict = dataclasses.field(default_factory=dict)


def _good(root: Path) -> None:
  for i, name in enumerate(("g1", "g2", "g3")):
    _add_pair(root, f"ir/{name}.png", f"vi/{name}.png", (16, 20), 30 + i)
  with (root / "captions.jsonl").open("a") as f:
    for name in ("g1", "g2", "g3"):
      f.write(json.dumps({"name": name, "captions": [f"{name} text"]}) + "\n")


def _caption_lines(root: Path) -> int:
  return len((root / "captions.jsonl").read_text().splitlines())


def _unpaired(root: Path) -> Bad:
  _add_pair(root, "ir/only_ir.png", "spare/x.png", (16, 16), 40)
  _add_pair(root, "spare/y.png", "vi/only_vi.png", (16, 16), 41)
  return Bad([str(root / "ir/only_ir.png"), str(root / "vi/only_vi.png")],
             ["unpaired", "unpaired"], {"train": {"g1", "g2", "g3"}})


def _size_mismatch(root: Path) -> Bad:
  _add_pair(root, "ir/odd.png", "spare/odd.png", (16, 16), 42)
  _add_pair(root, "spare/odd2.png", "vi/odd.png", (16, 24), 43)
  return Bad([f"{root / 'ir/odd.png'}, {root / 'vi/odd.png'}"],
             ["size_mismatch"], {"train": {"g1", "g2", "g3"}})


def _truncated(root: Path) -> Bad:
  _add_pair(root, "ir/trunc.png", "vi/trunc.png", (32, 32), 44)
  data = (root / "vi/trunc.png").read_bytes()
  (root / "vi/trunc.png").write_bytes(data[: len(data) // 2])
  return Bad([str(root / "vi/trunc.png")], ["unreadable_image"],
             {"train": {"g1", "g2", "g3"}})


def _corrupt(root: Path) -> Bad:
  _add_pair(root, "ir/junk.png", "vi/junk.png", (16, 16), 45)
  (root / "ir/junk.png").write_bytes(b"this is not a png" * 10)
  return Bad([str(root / "ir/junk.png")], ["unreadable_image"],
             {"train": {"g1", "g2", "g3"}})


def _huge_header(root: Path) -> Bad:
  """A header that claims 200000 x 200000 pixels: Pillow's decompression-bomb
  guard raises, which is no OSError."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  _add_pair(root, "ir/huge.png", "vi/huge.png", (16, 16), 47)
  data = bytearray((root / "ir/huge.png").read_bytes())
  data[16:24] = struct.pack(">II", 200000, 200000)  # IHDR width, height
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  (root / "ir/huge.png").write_bytes(bytes(data))
  return Bad([str(root / "ir/huge.png")], ["unreadable_image"],
             {"train": {"g1", "g2", "g3"}})


def _zero_byte(root: Path) -> Bad:
  _add_pair(root, "ir/empty.png", "vi/empty.png", (16, 16), 46)
  (root / "vi/empty.png").write_bytes(b"")
  return Bad([str(root / "vi/empty.png")], ["empty_file"],
             {"train": {"g1", "g2", "g3"}})


def _caption_for_missing_pair(root: Path) -> Bad:
  line = _caption_lines(root) + 1
  with (root / "captions.jsonl").open("a") as f:
    f.write(json.dumps({"name": "ghost", "captions": ["boo"]}) + "\n")
  return Bad([f"captions.jsonl:{line}", "'ghost'"], ["caption_without_pair"],
             {"train": {"g1", "g2", "g3"}})


def _malformed_captions(root: Path) -> Bad:
  first = _caption_lines(root) + 1
  with (root / "captions.jsonl").open("a") as f:
    f.write("not json at all\n")
    f.write(json.dumps({"name": "g1"}) + "\n")
    f.write(json.dumps(["g2", "captions"]) + "\n")
    f.write(json.dumps({"name": "g2", "captions": ["again"]}) + "\n")
  return Bad([f"captions.jsonl:{first + i}" for i in range(4)],
             ["malformed_caption"] * 4, {"train": {"g1", "g2", "g3"}})


def _split_file(root: Path) -> Bad:
  (root / "splits.json").write_text(json.dumps(
      {"train": ["g1"], "test": ["g2", "ghost"], "val": ["g1"]}))
  return Bad([str(root / "splits.json"), "'ghost'", "'g3'", "'g1'"],
             ["split_file"] * 3, {"test": {"g2"}})


def _write_store(path: Path, dataset: str, table: np.ndarray,
                 rows: dict[str, list[int]],
                 texts: list[str] | None = None) -> Path:
  caption_store.write_store(path, table, {dataset: rows},
                            texts or [f"t{i}" for i in range(len(table))],
                            {"encoder": "test"})
  return path


def _text_emb(root: Path) -> Bad:
  _add_pair(root, "ir/g4.png", "vi/g4.png", (16, 20), 40)
  with (root / "captions.jsonl").open("a") as f:
    f.write(json.dumps({"name": "g4", "captions": ["g4 text"]}) + "\n")
  # The store's key defaults to the captions file's folder name, 'src'.
  store = _write_store(root.parent / "store", "src",
                       np.eye(5, dtype=np.float32),
                       {"g1": [0, 1, 2],  # g1 has 1 caption, not 3
                        "g3": [3],
                        "g4": [4],  # edited since: "g4 text" in the files
                        "stray": [0]},  # g2: none
                       ["g1 text", "x", "y", "g3 text", "g4 old text"])
  return Bad(["'g1'", "'g2'", "'stray'", "caption 0 is 'g4 old text' in the "
              "store, 'g4 text' in the caption files; the store is stale"],
             ["text_emb"] * 4, {"train": {"g3"}}, {"text_emb": store})


BAD_CASES = {
    "unpaired": _unpaired, "size_mismatch": _size_mismatch,
    "truncated": _truncated, "corrupt": _corrupt, "zero_byte": _zero_byte,
    "huge_header": _huge_header,
    "caption_for_missing_pair": _caption_for_missing_pair,
    "malformed_captions": _malformed_captions, "split_file": _split_file,
    "text_emb": _text_emb,
}


def _kept(data_dir: Path, splits) -> dict[str, set[str]]:
  return {split: {r["name"] for r in datasets.RecordSource(
      datasets.load_source("folders", split, data_dir))} for split in splits}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_error_names_every_bad_file_and_builds_nothing(
    tmp_path, case):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  _good(root)
  bad = BAD_CASES[case](root)
  with pytest.raises(layouts.BadDataError) as error:
    datasets.build("folders", manual_dir=root, data_dir=data_dir,
                   **bad.build_kwargs)
  for named in bad.named:
    assert named in str(error.value)
  assert sorted(p.kind for p in error.value.problems) == sorted(bad.kinds)
  assert not datasets.IvfPairs(config="folders",
                               data_dir=data_dir).is_prepared()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_skip_reports_every_bad_file_and_keeps_the_rest(
    tmp_path, case, caplog):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  _good(root)
  bad = BAD_CASES[case](root)
  with caplog.at_level(logging.WARNING, logger=layouts.__name__):
    builder = datasets.build("folders", manual_dir=root, data_dir=data_dir,
                             on_bad_data="skip", **bad.build_kwargs)
  report = json.loads(datasets.report_path(builder).read_text())
  assert report["on_bad_data"] == "skip"
  listed = "\n".join(str(layouts.Problem(**p)) for p in report["problems"])
  for named in bad.named:
    assert named in listed
    assert named in caplog.text
  assert sorted(p["kind"] for p in report["problems"]) == sorted(bad.kinds)
  assert _kept(data_dir, bad.kept) == bad.kept


def test_all_bad_data_at_once_is_one_error_and_one_report(tmp_path):
  root = tmp_path / "src"
  _good(root)
  cases = [fn(root) for name, fn in BAD_CASES.items()
           if name not in ("split_file", "text_emb")]
  named = [n for case in cases for n in case.named]
  with pytest.raises(layouts.BadDataError) as error:
    datasets.build("folders", manual_dir=root, data_dir=tmp_path / "a")
  assert len(error.value.problems) == sum(len(c.kinds) for c in cases) == 12
  assert all(n in str(error.value) for n in named)
  builder = datasets.build("folders", manual_dir=root,
                           data_dir=tmp_path / "b", on_bad_data="skip")
  report = datasets.report_path(builder).read_text()
  assert len(json.loads(report)["problems"]) == 12
  assert _kept(tmp_path / "b", ["train"]) == {"train": {"g1", "g2", "g3"}}


def test_folder_source_validates_like_the_builder(tmp_path):
  root = tmp_path / "src"
  _good(root)
  _unpaired(root)
  with pytest.raises(layouts.BadDataError, match="only_ir.png"):
    datasets.PairedFolderSource(root)
  source = datasets.PairedFolderSource(root, on_bad_data="skip")
  assert [r["name"] for r in source] == ["g1", "g2", "g3"]
  assert source[0]["captions"] == ["g1 text"]


def test_folder_source_finds_truncated_pixels_on_read_or_when_asked(tmp_path):
  root = tmp_path / "src"
  _good(root)
  _truncated(root)  # the header is intact; the pixel data is cut
  source = datasets.PairedFolderSource(root)  # headers only
  assert [p.name for p in source.pairs] == ["g1", "g2", "g3", "trunc"]
  record = source[3]  # images decode when used
  with pytest.raises(image_io.ImageReadError, match="trunc.png"):
    np.asarray(record["vis"])
  with pytest.raises(image_io.ImageReadError, match="trunc.png"):
    record["vis"].crop(0, 0, 8, 8)
  with pytest.raises(layouts.BadDataError, match="trunc.png"):
    datasets.PairedFolderSource(root, check_images=True)


# ------------------------------------------------------------------ layouts


EXPECTED_FOLDERS = {
    "folders": ["ir/", "vi/"],
    "split_folders": ["<split>/ir/", "<split>/vi/"],
    "llvip": ["infrared/train/", "visible/train/", "infrared/test/",
              "visible/test/"],
    "msrs": ["train/ir/", "train/vi/", "test/ir/", "test/vi/"],
    "m3fd": ["Ir/", "Vis/"],
    "roadscene": ["cropinfrared/", "crop_LR_visible/"],
    "tno": ["ir/", "vi/"],
}


@pytest.mark.parametrize("config", sorted(EXPECTED_FOLDERS))
def test_missing_layout_lists_every_missing_folder(tmp_path, config):
  root = tmp_path / "src"
  (root / "unrelated").mkdir(parents=True)
  with pytest.raises(layouts.LayoutError) as error:
    datasets.build(config, manual_dir=root, data_dir=tmp_path / "data")
  message = str(error.value)
  assert message.count("missing: ") == 1
  listed = message.split("missing: ")[1].split(". Expected")[0].split(", ")
  assert listed == EXPECTED_FOLDERS[config]
  assert layouts.LAYOUTS[config].description in message


def test_partly_missing_layout_names_only_what_is_missing(tmp_path):
  root = tmp_path / "src"
  _add_pair(root, "infrared/train/1.jpg", "visible/train/1.jpg", (16, 16), 0)
  (root / "infrared" / "test").mkdir()
  with pytest.raises(layouts.LayoutError,
                     match=r"missing: visible/test/\. Expected"):
    datasets.build("llvip", manual_dir=root, data_dir=tmp_path / "data")
  with pytest.raises(layouts.LayoutError, match="no such folder"):
    datasets.build("llvip", manual_dir=tmp_path / "nope",
                   data_dir=tmp_path / "data")
  with pytest.raises(layouts.LayoutError, match="split file"):
    datasets.build("llvip", manual_dir=root, data_dir=tmp_path / "data",
                   split_file=root / "x.json")


def test_split_folder_layout_names_a_half_split(tmp_path):
  root = tmp_path / "src"
  _add_pair(root, "a/ir/1.png", "a/vi/1.png", (16, 16), 0)
  (root / "b" / "ir").mkdir(parents=True)
  with pytest.raises(layouts.LayoutError, match=r"missing: b/vi/\."):
    layouts.scan(root, layouts.LAYOUTS["split_folders"])


# ---------------------------------------------------------- text embeddings


def test_text_embeddings_round_trip(tmp_path):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  wants = _folders(root)["train"]  # a: 2 captions, b: 3, c: none
  table = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
  store = _write_store(tmp_path / "store", "mine", table,
                       {"a": [0, 1], "b": [2, 3, 4]},
                       ["a person", "a warm person", "x", "y", "z"])
  rows = {"a": table[:2], "b": table[2:], "c": np.zeros((0, 8), np.float32)}
  options = {"text_emb": store, "text_emb_dataset": "mine"}
  datasets.build("folders", manual_dir=root, data_dir=data_dir, **options)
  raw = datasets.load_source("folders", "train", data_dir)
  assert "text_emb" not in raw[0]  # only the adapter offers the (N, D) view
  for source in (datasets.RecordSource(raw),
                 datasets.PairedFolderSource(root, **options)):
    records = {r["name"]: r for r in source}
    assert sorted(records) == sorted(wants)
    for name, record in records.items():
      assert record["text_emb"].dtype == np.float32
      np.testing.assert_array_equal(record["text_emb"], rows[name])
      assert len(record["captions"]) == len(rows[name])


# ------------------------------------------------------------------ atomicity


def test_failed_build_leaves_nothing_loadable_and_rebuilds(
    tmp_path, monkeypatch):
  root, data_dir = tmp_path / "src", tmp_path / "data"
  _folders(root)
  real_encode = datasets._encode

  def failing_encode(pair):
    if pair.name == "c":  # the last record, after the others were written
      raise RuntimeError("disk on fire")
    return real_encode(pair)

  monkeypatch.setattr(datasets, "_encode", failing_encode)
  with pytest.raises(RuntimeError, match="disk on fire"):
    datasets.build("folders", manual_dir=root, data_dir=data_dir)
  assert not datasets.IvfPairs(config="folders",
                               data_dir=data_dir).is_prepared()
  with pytest.raises(FileNotFoundError, match="not built"):
    datasets.load_source("folders", "train", data_dir)
  assert not list((data_dir / "ivf_pairs" / "folders").iterdir())
  monkeypatch.setattr(datasets, "_encode", real_encode)
  datasets.build("folders", manual_dir=root, data_dir=data_dir)
  assert len(datasets.load_source("folders", "train", data_dir)) == 3


_KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from input_pipeline import datasets
    root, data_dir, marker = map(Path, sys.argv[1:])
    real_encode = datasets._encode
    def slow_encode(pair):
      if pair.name == "b":  # the second record: the first is being written
        marker.write_text("generating")
        time.sleep(120)
      return real_encode(pair)
    datasets._encode = slow_encode
    datasets.build("folders", manual_dir=root, data_dir=data_dir)
""")


def test_killed_build_leaves_nothing_loadable_and_rebuilds(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root, data_dir, marker = tmp_path / "src", tmp_path / "data", tmp_path / "m"
  _folders(root)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  process = subprocess.Popen(
      [sys.executable, "-c", _KILLED_BUILD, str(root), str(data_dir),
       str(marker)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while not marker.exists():
      assert process.poll() is None, process.stderr.read().decode()
      assert time.monotonic() < deadline, "build never reached generation"
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  config_dir = data_dir / "ivf_pairs" / "folders"
  # Killed mid-generation: only tfds's temporary folder exists.
  assert [p.name.startswith("incomplete.") for p in config_dir.iterdir()] == [
      True]
  assert not datasets.IvfPairs(config="folders",
                               data_dir=data_dir).is_prepared()
  with pytest.raises(FileNotFoundError, match="not built"):
    datasets.load_source("folders", "train", data_dir)
  with pytest.raises(KeyError, match="not been generated"):
    tfds.data_source("ivf_pairs/folders", split="train", data_dir=data_dir,
                     download=False)
  datasets.build("folders", manual_dir=root, data_dir=data_dir)
  _assert_source_matches(datasets.RecordSource(
      datasets.load_source("folders", "train", data_dir)),
                         _folders(tmp_path / "again")["train"])


# ------------------------------------------------------------------------ CLI


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "input_pipeline.build_dataset", *args], cwd=REPO,
      env=dict(os.environ, PYTHONPATH=str(REPO), **env), capture_output=True,
      text=True, timeout=120)


def test_cli_error_and_skip(tmp_path):
  root = tmp_path / "src"
  _good(root)
  _unpaired(root)
  common = ["--dataset", "ivf_pairs/folders", "--manual_dir", str(root)]
  failed = _cli(*common, "--data_dir", str(tmp_path / "a"))
  assert failed.returncode == 2
  assert "only_ir.png" in failed.stderr and "only_vi.png" in failed.stderr
  assert not (tmp_path / "a" / "ivf_pairs" / "folders" / "1.0.0").exists()
  built = _cli(*common, "--data_dir", str(tmp_path / "b"),
               "--on_bad_data", "skip")
  assert built.returncode == 0, built.stderr
  assert "train 3" in built.stdout
  assert "only_ir.png" in built.stdout and "only_vi.png" in built.stdout
  assert len(datasets.load_source("folders", "train", tmp_path / "b")) == 3
  # Flag mistakes, missing flags and an unwritable --data_dir: one line each.
  blocker = tmp_path / "file"
  blocker.write_text("")
  # A bad pixel limit made every image an unreadable-image problem.
  for args, message, env in (
      ((*common, "--data_dir", "x", "--bogus=1"),
       "Unknown command line flag 'bogus'", {}),
      (("--dataset", "folders"), "missing --manual_dir, --data_dir", {}),
      ((*common, "--data_dir", str(blocker / "sub")), str(blocker), {}),
      ((*common, "--data_dir", str(tmp_path / "c")),
       "TEXTFUSION_MAX_IMAGE_PIXELS='-5': give a whole number",
       {"TEXTFUSION_MAX_IMAGE_PIXELS": "-5"})):
    out = _cli(*args, **env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_a_build_in_an_older_format_asks_for_a_rebuild(tmp_path):
  (tmp_path / "ivf_pairs" / "folders" / "1.0.0").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"format version\(s\) 1.0.0, "
                     r"this code reads 2.0.0; rebuild it"):
    datasets.load_source("folders", "train", tmp_path)


def test_float_and_32_bit_images_are_stretched_or_refused_by_name(tmp_path):
  """A radiometric float thermal frame (kelvin) is stretched like 16-bit
  infrared; where no rule applies the file is named (Pillow's own convert
  would clip it to a constant image)."""
  kelvin = 280 + 30 * np.random.default_rng(0).random((40, 48))
  Image.fromarray(kelvin.astype(np.float32), "F").save(tmp_path / "f.tif")
  grey, info = image_io.read_image_with_info(tmp_path / "f.tif", "minmax")
  np.testing.assert_array_equal(
      grey, image_io.sixteen_to_eight_bit(kelvin.astype(np.float32),
                                          "minmax"))
  assert grey.min() == 0 and grey.max() == 255 and info.was_16bit
  crop = image_io.EncodedImage(tmp_path / "f.tif", 1, "minmax").crop(
      3, 5, 8, 9)
  np.testing.assert_array_equal(crop[..., 0], grey[3:11, 5:14])
  with pytest.raises(image_io.ImageReadError,
                     match=r"f.tif: float image \(mode F\) has no fixed"):
    image_io.read_image_with_info(tmp_path / "f.tif", "full")
  wide = (np.arange(40 * 48).reshape(40, 48) * 100).astype(np.int32)
  Image.fromarray(wide, "I").save(tmp_path / "i.tif")
  with pytest.raises(image_io.ImageReadError,
                     match=r"i.tif: 32-bit values 0..191900 exceed 16 bits"):
    image_io.read_image_with_info(tmp_path / "i.tif", "full")
  assert image_io.read_image_with_info(tmp_path / "i.tif", "minmax")[0].max(
      ) == 255
  # A float visible image is found by a header-only scan (before training
  # starts; it failed at its first crop), a float infrared one is not.
  root = tmp_path / "float_vis"
  for name, (ir, vi) in {"a": ("ir/a.tif", "vi/a.png"),
                         "b": ("ir/b.png", "vi/b.tif")}.items():
    _add_pair(root, ir, vi, (40, 48), 1)
    (root / ("vi" if name == "b" else "ir") / f"{name}.tif").write_bytes(
        (tmp_path / "f.tif").read_bytes())
  scan = layouts.scan(root, layouts.LAYOUTS["folders"], decode=False)
  assert [(p.kind, p.name) for p in scan.problems] == [
      ("unreadable_image", "b")]
  assert "float image (mode F) has no fixed" in scan.problems[0].detail
  # As infrared, both are usable when a build decodes every image up front.
  root = tmp_path / "set"
  for name in ("f", "i"):
    _add_pair(tmp_path / "scratch", f"ir/{name}.png", f"vi/{name}.png",
              (40, 48), 1)
    (root / "ir").mkdir(parents=True, exist_ok=True)
    (root / "vi").mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{name}.tif").rename(root / "ir" / f"{name}.tif")
    (tmp_path / "scratch" / "vi" / f"{name}.png").rename(
        root / "vi" / f"{name}.png")
  scan = layouts.scan(root, layouts.LAYOUTS["folders"], decode=True)
  assert not scan.problems, scan.problems
  assert sorted(p.name for p in scan.splits["train"]) == ["f", "i"]


def _png_16bit_grey_alpha(grey: np.ndarray) -> bytes:
  """A 16-bit grey+alpha PNG (colour type 4), which Pillow cannot write."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))

  h, w = grey.shape
  pixels = np.stack([grey.astype(">u2"), np.full((h, w), 65535, ">u2")], -1)
  raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
  return (b"\x89PNG\r\n\x1a\n" +
          chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_grey_alpha_png_is_refused_by_name(tmp_path):
  """Pillow opens a 16-bit grey+alpha PNG as 8-bit RGBA of each value's low
  byte: noise that would be trained on without a word."""
  grey = (np.arange(40 * 48).reshape(40, 48) * 20 + 1000).astype(np.uint16)
  path = tmp_path / "ir.png"
  path.write_bytes(_png_16bit_grey_alpha(grey))
  message = r"ir.png: 16-bit grey\+alpha PNG is not supported"
  with pytest.raises(image_io.ImageReadError, match=message):
    image_io.read_image_with_info(path, "minmax")
  with pytest.raises(image_io.ImageReadError, match=message):
    image_io.EncodedImage(path, 1, "minmax").crop(0, 0, 8, 8)
  with pytest.raises(image_io.ImageReadError, match=r"<bytes>: 16-bit grey"):
    image_io.EncodedImage(path.read_bytes(), 1, "minmax").shape
  # A build reading headers only names it as an unreadable image.
  root = tmp_path / "set"
  _add_pair(root, "ir/a.png", "vi/a.png", (40, 48), 1)
  (root / "ir" / "a.png").write_bytes(path.read_bytes())
  scan = layouts.scan(root, layouts.LAYOUTS["folders"], decode=False)
  assert [p.kind for p in scan.problems] == ["unreadable_image"]
  assert "16-bit grey+alpha" in scan.problems[0].detail


def test_a_build_is_reused_only_for_the_same_sources(tmp_path):
  root, other, data_dir = tmp_path / "src", tmp_path / "other", tmp_path / "d"
  _folders(root)
  _folders(other)
  (other / "ir" / "c.png").unlink()
  (other / "vi" / "c.png").unlink()
  datasets.build("folders", manual_dir=root, data_dir=data_dir)
  datasets.build("folders", manual_dir=root, data_dir=data_dir)  # reused
  # The same folder with a pair removed since: not reused (it would train on
  # the old pairs without a word).
  moved = {p: p.read_bytes() for p in (root / "ir" / "c.png",
                                       root / "vi" / "c.png")}
  for path in moved:
    path.unlink()
  with pytest.raises(datasets.UserError,
                     match=r"ivf_pairs/folders in .* was built before the "
                     rf"files it was made from \({root}\) changed \(7 files "
                     r"then, 5 now"):
    datasets.build("folders", manual_dir=root, data_dir=data_dir)
  for path, data in moved.items():
    path.write_bytes(data)
    os.utime(path, ns=(0, 0))
  with pytest.raises(datasets.UserError, match="or some were rewritten"):
    datasets.build("folders", manual_dir=root, data_dir=data_dir)
  with pytest.raises(datasets.UserError,
                     match=r"ivf_pairs/folders is already built in .* from "
                     rf"other sources \(manual_dir '{root}' -> '{other}'\); "
                     "pass --overwrite"):
    datasets.build("folders", manual_dir=other, data_dir=data_dir)
  assert len(datasets.load_source("folders", "train", data_dir)) == 3
  # A rebuild that fails (a malformed split file) leaves the old build.
  bad_split = tmp_path / "splits.json"
  bad_split.write_text("not json")
  with pytest.raises(datasets.UserError, match="malformed split file"):
    datasets.build("folders", manual_dir=other, data_dir=data_dir,
                   split_file=bad_split, overwrite=True)
  assert len(datasets.load_source("folders", "train", data_dir)) == 3
  datasets.build("folders", manual_dir=other, data_dir=data_dir,
                 overwrite=True)
  assert len(datasets.load_source("folders", "train", data_dir)) == 2
  assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]


def test_a_data_dir_under_home_may_be_written_with_a_tilde(tmp_path,
                                                           monkeypatch):
  """configs/llvip.py's default '~/tensorflow_datasets' reaches no shell."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  _folders(tmp_path / "src")
  datasets.build("folders", manual_dir=tmp_path / "src",
                 data_dir="~/tensorflow_datasets")
  assert (tmp_path / "home" / "tensorflow_datasets" / "ivf_pairs").is_dir()
  assert len(datasets.load_source("folders", "train",
                                  "~/tensorflow_datasets")) == 3


def test_the_build_digest_follows_files_not_spelling_or_times(tmp_path,
                                                              monkeypatch):
  """A relative --manual_dir is the same source as its absolute path; a
  symlinked ir/ is followed; a caption store rewritten unchanged (an
  embed_captions rerun) is the same store."""
  _folders(tmp_path / "src")
  monkeypatch.chdir(tmp_path)
  assert datasets.files_digest(["src"]) == datasets.files_digest(
      [tmp_path / "src"])
  linked = tmp_path / "linked"
  linked.mkdir()
  os.symlink(tmp_path / "src" / "ir", linked / "ir")
  os.symlink(linked, linked / "ir_loop")  # a cycle is walked once
  before = datasets.files_digest([linked])
  assert before["count"] == 3
  (tmp_path / "src" / "ir" / "d.png").write_bytes(b"x")
  assert datasets.files_digest([linked])["count"] == 4
  store = tmp_path / "store"
  store.mkdir()
  (store / "manifest.json").write_text('{"a": 1}')
  (store / "table.npy").write_bytes(b"1234")
  digest = datasets.files_digest([store])
  for name in ("manifest.json", "table.npy"):
    data = (store / name).read_bytes()
    (store / name).unlink()
    (store / name).write_bytes(data)
    os.utime(store / name, ns=(1, 1))
  assert datasets.files_digest([store]) == digest
  (store / "manifest.json").write_text('{"a": 2}')
  assert datasets.files_digest([store]) != digest
