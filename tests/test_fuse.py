"""The fuse command: tiling, single pairs, folders with captions, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from input_pipeline import image_io
from textfusion_jax import inference
from textfusion_jax import tiling

ROOT = Path(__file__).resolve().parents[1]


def test_tiling_reassembles_pointwise_functions_exactly():
  rng = np.random.default_rng(0)
  vis = rng.random((300, 410, 3), np.float32)
  ir = rng.random((300, 410, 1), np.float32)
  calls = []

  def fuse_batch(v, i, valid, means):
    calls.append(v.shape)
    np.testing.assert_allclose(
        means[0], [*vis.mean((0, 1), dtype=np.float64),
                   ir.mean(dtype=np.float64)], rtol=1e-6)
    # Each tile's real-image extent: all of it here, the image is larger.
    assert valid.shape == (3, 2) and np.all(valid == 128)
    return np.maximum(v, i)

  out = tiling.fuse_tiled(fuse_batch, vis, ir, tile=128, overlap=16,
                          batch_size=3)
  np.testing.assert_allclose(out, np.maximum(vis, ir), rtol=1e-6)
  assert {shape for shape in calls} == {(3, 128, 128, 3)}  # one shape only


def test_tiling_small_image_runs_whole_and_crops_back():
  vis = np.ones((37, 53, 3), np.float32) * 0.25
  ir = np.zeros((37, 53, 1), np.float32)
  shapes = []

  def fuse_batch(v, i, valid, means):
    # No means: the model takes its own over `valid`, as in training.
    assert means is None
    shapes.append(v.shape)
    np.testing.assert_array_equal(valid, [[37, 53]])
    return v

  out = tiling.fuse_tiled(fuse_batch, vis, ir, tile=128, pad_multiple=32)
  assert out.shape == (37, 53, 3) and shapes == [(1, 64, 64, 3)]
  np.testing.assert_allclose(out, vis)


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return tiny_workdir


def _fuse(*args):
  return subprocess.run([sys.executable, "-m", "textfusion_jax.fuse", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)),
                        check=False)


def _fuse_here(capsys, *args):
  """`_fuse` in this process: the same `fuse.run()` (flag parsing, one-line
  errors, exit status) without a ~10 s interpreter and JAX start-up. For
  commands that fail."""
  import types  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from textfusion_jax import fuse  # pylint: disable=g-import-not-at-top
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.unparse_flags()  # no value left from an earlier call
  capsys.readouterr()
  try:
    with mock.patch.object(sys, "argv", ["fuse", *args]):
      with pytest.raises(SystemExit) as exit_info:
        fuse.run()
  finally:
    flags.FLAGS.unparse_flags()
    if was_parsed:
      flags.FLAGS.mark_as_parsed()
  return types.SimpleNamespace(returncode=exit_info.value.code,
                               stderr=capsys.readouterr().err)


def _single_error_line(stderr: str) -> str:
  """The one `error:` line a failed command printed, with no traceback."""
  assert "Traceback" not in stderr, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, stderr[-2000:]
  return lines[0]


def _write_pair(root: Path, name: str, size=(40, 30), ir_size=None):
  rng = np.random.default_rng(len(name))
  (root / "ir").mkdir(parents=True, exist_ok=True)
  (root / "vi").mkdir(parents=True, exist_ok=True)
  w, h = ir_size or size
  Image.fromarray(rng.integers(0, 255, (h, w), np.uint8)).save(
      root / "ir" / f"{name}.png")
  w, h = size
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
      root / "vi" / f"{name}.jpg")


def test_fuse_folder_with_captions(workdir, tmp_path):
  _write_pair(tmp_path, "a")
  _write_pair(tmp_path, "b", size=(70, 50))
  captions = tmp_path / "captions.jsonl"
  captions.write_text("\n".join(json.dumps({"name": n, "captions": [t]})
                                for n, t in (("a", "a dark road"),
                                             ("b", "two warm pedestrians"))))
  out = _fuse("--checkpoint", str(workdir), "--ir", str(tmp_path / "ir"),
              "--vis", str(tmp_path / "vi"), "--captions", str(captions),
              "--out", str(tmp_path / "out"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ms/pair" in out.stdout
  a = image_io.read_image(tmp_path / "out" / "a.png")
  b = image_io.read_image(tmp_path / "out" / "b.png")
  assert a.shape == (30, 40, 3) and b.shape == (50, 70, 3)


def test_fuse_single_pair_is_deterministic(workdir, tmp_path):
  _write_pair(tmp_path, "a", size=(64, 48))
  outs = []
  for i in range(2):
    out = _fuse("--checkpoint", str(workdir), "--ir",
                str(tmp_path / "ir" / "a.png"), "--vis",
                str(tmp_path / "vi" / "a.jpg"), "--text", "a person", "--out",
                str(tmp_path / f"o{i}.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    outs.append(image_io.read_image(tmp_path / f"o{i}.png"))
  np.testing.assert_array_equal(outs[0], outs[1])  # deterministic


def test_fuse_large_llvip_pair_in_tiles(workdir, shared_dir, tmp_path):
  llvip = shared_dir / "data" / "ivf_samples" / "llvip"
  out = _fuse("--checkpoint", str(workdir), "--ir", str(llvip / "ir/1.jpg"),
              "--vis", str(llvip / "vi/1.jpg"), "--text",
              "two pedestrians on a dark sidewalk", "--out",
              str(tmp_path / "llvip1.png"), "--tile", "384")
  assert out.returncode == 0, out.stderr[-2000:]
  fused = image_io.read_image(tmp_path / "llvip1.png")
  assert fused.shape == (1024, 1280, 3)


@pytest.mark.parametrize("case", ["size", "unpaired", "no_text", "empty_text",
                                  "bad_jsonl", "out_is_input", "out_is_a_file",
                                  "long_text", "caption_split_only",
                                  "caption_split_without_captions",
                                  "overlap", "text_encoder",
                                  "unquoted_text"])
def test_fuse_bad_input_is_one_line(workdir, tmp_path, case, capsys):
  args = ["--checkpoint", str(workdir), "--out", str(tmp_path / "out")]
  if case in ("out_is_input", "out_is_a_file"):
    _write_pair(tmp_path, "a")
    before = (tmp_path / "vi" / "a.jpg").read_bytes()
    out = _fuse_here(capsys, "--checkpoint", str(workdir), "--ir", str(tmp_path / "ir"),
                "--vis", str(tmp_path / "vi"), "--text", "x", "--out",
                str(tmp_path / ("vi" if case == "out_is_input" else
                                "vi/a.jpg")))
    assert out.returncode != 0
    assert ("overwrite" if case == "out_is_input" else "is a file") in (
        _single_error_line(out.stderr))
    assert (tmp_path / "vi" / "a.jpg").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "vi").iterdir()) == ["a.jpg"]
    return
  if case == "size":
    _write_pair(tmp_path, "a", size=(40, 30), ir_size=(41, 30))
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "x"]
    expect = "a.png"
  elif case == "unpaired":
    _write_pair(tmp_path, "a")
    (tmp_path / "vi" / "a.jpg").rename(tmp_path / "vi" / "b.jpg")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "x"]
    expect = "no visible partner"
  elif case == "no_text":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi")]
    expect = "--text or --captions"
  elif case == "long_text":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "a warm pedestrian on a dark road " * 20]
    expect = "--text is 142 tokens"
  elif case == "empty_text":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "  "]
    expect = "--text is empty"
  elif case == "overlap":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "x", "--tile", "128", "--overlap", "128"]
    expect = "--overlap=128: give 0 <= overlap <= tile / 2"
  elif case == "unquoted_text":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "two", "warm", "pedestrians"]
    expect = "unexpected arguments: warm pedestrians (flags take one word"
  elif case == "text_encoder":
    _write_pair(tmp_path, "a")
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--text", "x", "--text_encoder", str(tmp_path / "no_clip")]
    expect = f"{tmp_path / 'no_clip'}: not a checkpoint directory"
  elif case.startswith("caption_split"):
    _write_pair(tmp_path, "a")
    tagged = tmp_path / "c.jsonl"
    tagged.write_text('{"name": "a", "split": "test", "captions": ["ok"]}\n')
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi")]
    if case == "caption_split_only":
      args += ["--captions", str(tagged)]
      expect = "lines for split(s) test: choose one with --caption_split"
    else:
      args += ["--text", "x", "--caption_split", "test"]
      expect = "--caption_split needs --captions"
  else:
    _write_pair(tmp_path, "a")
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"name": "a", "captions": ["ok"]}\n{broken\n')
    args += ["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
             "--captions", str(bad)]
    expect = "c.jsonl:2"
  out = _fuse_here(capsys, *args)
  assert out.returncode == 2
  assert expect in _single_error_line(out.stderr), out.stderr[-2000:]
  assert not (tmp_path / "out").exists()


def test_fuse_corrupt_pair_fuses_the_others_and_names_it(workdir, tmp_path):
  for name in ("a", "b", "c"):
    _write_pair(tmp_path, name)
  # b's visible image: a valid header, truncated data (passes the size
  # check, fails to decode).
  Image.fromarray(np.random.default_rng(1).integers(
      0, 255, (30, 40, 3), np.uint8)).save(tmp_path / "vi" / "b.png")
  (tmp_path / "vi" / "b.jpg").unlink()
  data = (tmp_path / "vi" / "b.png").read_bytes()
  (tmp_path / "vi" / "b.png").write_bytes(data[:len(data) // 2])
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  old = {n: np.full((30, 40, 3), 7, np.uint8) for n in "abc"}
  for name, image in old.items():
    Image.fromarray(image).save(out_dir / f"{name}.png")
  out = _fuse("--checkpoint", str(workdir), "--ir", str(tmp_path / "ir"),
              "--vis", str(tmp_path / "vi"), "--text", "x", "--out",
              str(out_dir))
  assert out.returncode == 2
  line = _single_error_line(out.stderr)
  assert "1 of 3 pair(s) not fused" in line and "b.png" in line, line
  assert "fused 2 pair(s)" in out.stdout
  for name in "ac":  # fused, although a pair before c failed
    assert not np.array_equal(image_io.read_image(out_dir / f"{name}.png"),
                              old[name])
  np.testing.assert_array_equal(image_io.read_image(out_dir / "b.png"),
                                old["b"])
  assert not [p for p in out_dir.iterdir() if ".tmp" in p.name]


def test_fuse_unknown_checkpoint_is_one_line(tmp_path):
  _write_pair(tmp_path, "a")
  out = _fuse("--checkpoint", str(tmp_path / "nope"), "--ir",
              str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--text",
              "x", "--out", str(tmp_path / "out"))
  assert out.returncode != 0
  assert "nope" in _single_error_line(out.stderr)


def test_fuse_text_dim_mismatch_is_one_line(workdir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from textfusion_jax.text import tiny_clip
  hf_config = tiny_clip.tiny_text_config()
  hf_config.projection_dim = 32
  torch.manual_seed(0)
  model = transformers.CLIPTextModelWithProjection(hf_config)
  clip_dir = tmp_path / "clip32"
  model.save_pretrained(clip_dir)
  tiny_clip.tiny_tokenizer().save_pretrained(clip_dir)
  other = tmp_path / "workdir"
  import shutil
  shutil.copytree(workdir, other)
  saved = json.loads((other / "config.json").read_text())
  saved["text"]["encoder"] = str(clip_dir)
  (other / "config.json").write_text(json.dumps(saved))
  _write_pair(tmp_path, "a")
  out = _fuse("--checkpoint", str(other), "--ir", str(tmp_path / "ir"),
              "--vis", str(tmp_path / "vi"), "--text", "x", "--out",
              str(tmp_path / "out"))
  assert out.returncode != 0
  line = _single_error_line(out.stderr)
  assert "64-d" in line and "32" in line, line


def _textured_pair(root: Path, name: str, size=(96, 64)):
  """A pair with structure (not noise), so fusion visibly differs from a copy."""
  rng = np.random.default_rng(len(name) + 3)
  w, h = size
  y, x = np.mgrid[:h, :w]
  base = 110 + 60 * np.sin(x / 7.0 + len(name)) * np.cos(y / 5.0)
  (root / "ir").mkdir(parents=True, exist_ok=True)
  (root / "vi").mkdir(parents=True, exist_ok=True)
  ir = base.copy()
  ir[h // 4:h // 2, w // 3:w // 2] = 250  # a warm target only the IR sees
  Image.fromarray(np.clip(ir, 0, 255).astype(np.uint8)).save(
      root / "ir" / f"{name}.png")
  vis = base[..., None] * [1.0, 0.85, 0.7] + rng.normal(0, 5, (h, w, 3))
  Image.fromarray(np.clip(vis, 0, 255).astype(np.uint8)).save(
      root / "vi" / f"{name}.png")


def test_fuse_output_is_the_models_forward_pass(workdir, tmp_path):
  """The written PNG is the network's output on that pair, not a copy."""
  import jax  # pylint: disable=g-import-not-at-top
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  _textured_pair(tmp_path, "a")  # 96x64: its own bucket, no padding
  prompt = "a warm person beside a road"
  out = _fuse("--checkpoint", str(workdir), "--ir",
              str(tmp_path / "ir" / "a.png"), "--vis",
              str(tmp_path / "vi" / "a.png"), "--text", prompt, "--out",
              str(tmp_path / "a_fused.png"))
  assert out.returncode == 0, out.stderr[-2000:]
  written = image_io.read_image(tmp_path / "a_fused.png")
  fuser = inference.Fuser.load(str(workdir))
  pair = inference.Pair("a", tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png",
                   tmp_path / "unused.png")
  vis, ir = inference.load_pair(pair)
  emb = fuser.encoder.encode([prompt])
  forward = np.asarray(jax.device_get(fuser.model(  # the module's __call__
      vis[None], ir[None], emb)))[0]
  expected = np.clip(np.rint(forward * 255), 0, 255).astype(np.int32)
  # The fuse path takes the means as whole-image inputs (for tiles): equal
  # up to float rounding, so at most a level on a few pixels.
  difference = np.abs(written.astype(np.int32) - expected)
  assert difference.max() <= 1 and difference.mean() < 0.01
  # ... and that output is a fusion: the IR-only warm target shows.
  vis_u8 = image_io.read_image(tmp_path / "vi" / "a.png")
  assert np.abs(written.astype(int) - vis_u8).mean() > 5
  target = (slice(16, 32), slice(32, 48))
  assert written[target].mean() > vis_u8[target].mean() + 20


def test_a_pair_fuses_to_the_same_pixels_alone_or_in_a_folder(workdir,
                                                             tmp_path):
  """Buckets were planned over the folder: next to a larger pair, a pair
  ran padded to that pair's size and came out different (channel attention
  sees the padding; TNO 1 with the shipped model: 1.7 levels darker on
  average, up to 5)."""
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  _textured_pair(tmp_path / "alone", "a")  # 96x64
  _textured_pair(tmp_path / "folder", "a")
  _textured_pair(tmp_path / "folder", "big", size=(230, 150))
  fuser = inference.Fuser.load(str(workdir))
  fused = {}
  for where in ("alone", "folder"):
    root = tmp_path / where
    pairs = inference.collect_pairs(str(root / "ir"), str(root / "vi"),
                                    str(root / "out"))
    result = inference.fuse_pairs(
        fuser, pairs, fuser.encoder.encode(["a road"] * len(pairs)))
    assert not result.failed
    fused[where] = image_io.read_image(root / "out" / "a.png")
  np.testing.assert_array_equal(fused["alone"], fused["folder"])
  assert inference.bucket_shapes({"a": (64, 96), "big": (150, 230)}, 1536) == {
      "a": (64, 96), "big": (160, 256)}


def test_bucket_sides_lie_on_a_fixed_grid():
  from textfusion_jax import tiling  # pylint: disable=g-import-not-at-top
  sides = {n: tiling.bucket_side(n) for n in (1, 32, 33, 268, 511, 512, 576,
                                              1000, 1024, 1025, 4000)}
  assert sides == {1: 32, 32: 32, 33: 64, 268: 288, 511: 512, 512: 512,
                   576: 576, 1000: 1024, 1024: 1024, 1025: 1152, 4000: 4096}
  for n in range(1, 5000):
    assert n <= tiling.bucket_side(n) <= max(n * 1.125, n + 31), n
  # A smaller --tile bounds the padding too (it is how memory is bounded).
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  assert inference.bucket_shapes({"a": (1030, 1030), "b": (990, 700)},
                                 1100) == {"a": (1088, 1088), "b": (1024, 704)}


PRETRAINED = ROOT / "pretrained" / "textfusion-small"
# Tiled vs whole-image fusion of a 1280x1024 LLVIP pair with the shipped
# model (512-pixel tiles, 64 overlap). Tiles share the image's brightness
# anchor, but channel attention and the pooled token attention see one tile
# only: measured mean 4.3 levels, 99th percentile 12 (LLVIP 1 and 7). A seam
# would show as larger errors along the tile borders.
TILED_MEAN_ABS_LEVELS = 6.0
TILED_P99_ABS_LEVELS = 16.0


def test_tiled_fusion_matches_whole_image_with_the_trained_model(shared_dir):
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  fuser = inference.Fuser.load(str(PRETRAINED))
  llvip = shared_dir / "data" / "ivf_samples" / "llvip"
  vis, ir = inference.load_pair(inference.Pair("1", llvip / "ir" / "1.jpg",
                                     llvip / "vi" / "1.jpg", Path()))
  emb = fuser.encoder.encode(["two pedestrians on a dark sidewalk"])[0]
  whole = fuser.fuse(vis, ir, emb, tile=1536).astype(np.float64)
  tiled = fuser.fuse(vis, ir, emb, tile=512, overlap=64).astype(np.float64)
  diff = np.abs(whole - tiled)
  assert diff.max() > 0  # the tiled path really ran
  assert diff.mean() < TILED_MEAN_ABS_LEVELS, diff.mean()
  assert np.percentile(diff, 99) < TILED_P99_ABS_LEVELS
  # No seams: errors along the tile borders are not worse than elsewhere.
  border_cols = [448, 512, 768, 960]
  assert diff[:, border_cols].mean() < 1.5 * diff.mean() + 1


def test_a_header_past_the_decompression_bomb_limit_is_one_line(
    tmp_path, monkeypatch):
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  from textfusion_jax import errors  # pylint: disable=g-import-not-at-top
  _write_pair(tmp_path, "a")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ir" / "a.png")
  data = bytearray((tmp_path / "ir" / "a.png").read_bytes())
  data[16:24] = struct.pack(">II", 200000, 200000)  # IHDR width, height
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  (tmp_path / "ir" / "a.png").write_bytes(bytes(data))
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  with pytest.raises(errors.UserError, match=r"a.jpg: unreadable \(Image size"
                     r".* raise the limit with TEXTFUSION_MAX_IMAGE_PIXELS="):
    inference.check_sizes(pairs)
  # The way past it (a 40-gigapixel header: only the header is read here).
  monkeypatch.setenv("TEXTFUSION_MAX_IMAGE_PIXELS", "0")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
  image_io._pixel_limit.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(errors.UserError, match=r"a.png is 200000x200000 but"):
      inference.check_sizes(pairs)
    # The limit set is the limit, to the pixel (b.jpg: 40x30).
    _write_pair(tmp_path, "b")
    for limit, readable in ((1200, True), (1199, False)):
      monkeypatch.setenv("TEXTFUSION_MAX_IMAGE_PIXELS", str(limit))
      image_io._pixel_limit.cache_clear()  # pylint: disable=protected-access
      if readable:
        assert image_io.read_image(tmp_path / "vi" / "b.jpg").shape == (
            30, 40, 3)
      else:
        with pytest.raises(image_io.ImageReadError, match=(
            r"b.jpg: cannot decode image \(Image size \(1200 pixels\) "
            r"exceeds the limit of 1199 pixels that TEXTFUSION_MAX_IMAGE_"
            r"PIXELS sets; if the file is trusted, raise the limit")):
          image_io.read_image(tmp_path / "vi" / "b.jpg")
  finally:
    image_io._pixel_limit.cache_clear()  # pylint: disable=protected-access


def test_a_bad_pixel_limit_is_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("TEXTFUSION_MAX_IMAGE_PIXELS", "2e9")
  image_io._pixel_limit.cache_clear()  # pylint: disable=protected-access
  try:
    out = _fuse_here(capsys, "--checkpoint", str(tmp_path), "--ir",
                     str(tmp_path), "--vis", str(tmp_path), "--out",
                     str(tmp_path / "out"), "--text", "x")
  finally:
    image_io._pixel_limit.cache_clear()  # pylint: disable=protected-access
  assert out.returncode == 2
  assert _single_error_line(out.stderr) == (
      "error: TEXTFUSION_MAX_IMAGE_PIXELS='2e9': give a whole number of "
      "pixels (0: no limit)")


def test_wide_inputs_are_noted_and_a_float_visible_image_refused_early(
    tmp_path):
  """fuse scaled a 16-bit image without a word (evaluate names them), and a
  float visible image failed only when its turn came, after the model
  loaded."""
  from textfusion_jax import errors  # pylint: disable=g-import-not-at-top
  _write_pair(tmp_path, "a")
  _write_pair(tmp_path, "b")
  Image.fromarray(np.full((30, 40), 4000, np.uint16)).save(
      tmp_path / "ir" / "a.png")
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  wide = []
  assert inference.check_sizes(pairs, wide) == {"a": (30, 40), "b": (30, 40)}
  assert wide == [str(tmp_path / "ir" / "a.png")]
  assert "1 16-bit image(s) scaled to 8 bits" in image_io.sixteen_bit_note(
      wide)
  # 8-bit values in a 32-bit container are read as they are: no note.
  (tmp_path / "ir" / "a.png").unlink()
  Image.fromarray(np.full((30, 40), 200, np.int32), "I").save(
      tmp_path / "ir" / "a.tif")
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  wide = []
  inference.check_sizes(pairs, wide)
  assert not wide
  (tmp_path / "vi" / "b.jpg").unlink()
  Image.fromarray(np.ones((30, 40), np.float32), "F").save(
      tmp_path / "vi" / "b.tif")
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  with pytest.raises(errors.UserError, match=r"b.tif: float image \(mode F\) "
                     "has no fixed white level"):
    inference.check_sizes(pairs)


def test_single_pair_out_never_replaces_another_pairs_source(tmp_path):
  _write_pair(tmp_path, "a")
  _write_pair(tmp_path, "b")
  before = (tmp_path / "vi" / "b.jpg").read_bytes()
  for victim in (tmp_path / "vi" / "b.jpg", tmp_path / "ir" / "b.png"):
    with pytest.raises(inference.errors.UserError,
                       match=r"is a source image \(its pair is "):
      inference.collect_pairs(str(tmp_path / "ir" / "a.png"),
                              str(tmp_path / "vi" / "a.jpg"), str(victim))
  assert (tmp_path / "vi" / "b.jpg").read_bytes() == before
  # Re-fusing over an earlier output beside both sources is allowed; over
  # another pair's source in that folder (1_ir, 1_vi, 2_vi) it is not.
  same = tmp_path / "same"
  same.mkdir()
  for name in ("1_ir.png", "1_vi.png", "2_ir.png", "2_vi.png"):
    (same / name).write_bytes((tmp_path / "ir" / "a.png").read_bytes())
  image_io.write_png_atomic(same / "fused.png", np.zeros((30, 40), np.uint8))
  pairs = inference.collect_pairs(str(same / "1_ir.png"),
                                  str(same / "1_vi.png"),
                                  str(same / "fused.png"))
  assert [p.out for p in pairs] == [same / "fused.png"]
  before = (same / "2_vi.png").read_bytes()
  with pytest.raises(inference.errors.UserError,
                     match=r"2_vi.png already exists in the folder of --ir "
                     r"or --vis and was not written by textfusion-jax"):
    inference.collect_pairs(str(same / "1_ir.png"), str(same / "1_vi.png"),
                            str(same / "2_vi.png"))
  assert (same / "2_vi.png").read_bytes() == before
  # Two folders whose stems differ (ir/1_ir.png, vi/1_vi.png): another
  # pair's ir/2_ir.png has no partner of its stem, and is still refused.
  for sub in ("ir", "vi"):
    (tmp_path / "sep" / sub).mkdir(parents=True)
    (tmp_path / "sep" / sub / f"1_{sub}.png").write_bytes(before)
  (tmp_path / "sep" / "ir" / "2_ir.png").write_bytes(before)
  with pytest.raises(inference.errors.UserError,
                     match=r"2_ir.png already exists in the folder of"):
    inference.collect_pairs(str(tmp_path / "sep" / "ir" / "1_ir.png"),
                            str(tmp_path / "sep" / "vi" / "1_vi.png"),
                            str(tmp_path / "sep" / "ir" / "2_ir.png"))


def test_the_same_path_as_ir_and_vis_is_refused(tmp_path):
  _write_pair(tmp_path, "a")
  for path, kind in ((tmp_path / "vi", "folder"),
                     (tmp_path / "vi" / "a.jpg", "file")):
    with pytest.raises(inference.errors.UserError,
                       match=rf"are the same {kind}; every image would be "
                       "fused with itself"):
      inference.collect_pairs(str(path), str(path), str(tmp_path / "o.png"))


def test_exif_rotated_images_are_read_upright(tmp_path):
  # Stored 30 wide x 40 high, EXIF orientation 6 (rotate 90 degrees on
  # display): viewers and OpenCV show 40 x 30, the infrared's size.
  _write_pair(tmp_path, "a", size=(40, 30))
  stored = np.random.default_rng(3).integers(0, 255, (40, 30, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "vi" / "a.jpg", exif=exif,
                               quality=100)
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  assert inference.check_sizes(pairs) == {"a": (30, 40)}
  upright = image_io.read_image(tmp_path / "vi" / "a.jpg")
  with Image.open(tmp_path / "vi" / "a.jpg") as raw:
    expected = np.asarray(raw.transpose(Image.Transpose.ROTATE_270))
  np.testing.assert_array_equal(upright, expected)
  encoded = image_io.EncodedImage(tmp_path / "vi" / "a.jpg", channels=3)
  assert encoded.shape == (30, 40, 3)
  np.testing.assert_array_equal(encoded.crop(5, 7, 10, 20),
                                expected[5:15, 7:27])
  np.testing.assert_array_equal(np.asarray(encoded), expected)


def test_images_in_subfolders_are_named_as_not_read(tmp_path, caplog):
  _write_pair(tmp_path, "a")
  (tmp_path / "ir" / "night").mkdir()
  (tmp_path / "ir" / "night" / "b.png").write_bytes(
      (tmp_path / "ir" / "a.png").read_bytes())
  with caplog.at_level("WARNING"):
    assert list(image_io.list_images(tmp_path / "ir")) == ["a"]
  assert any("subfolder(s) night/ hold images that are not read" in
             r.getMessage() for r in caplog.records)


def test_unwritable_out_folder_is_refused_before_the_model_loads(
    tmp_path, monkeypatch):
  # (As root, os.access grants everything: the check is simulated.)
  _write_pair(tmp_path, "a")
  monkeypatch.setattr(inference.os, "access",
                      lambda path, mode: Path(path) != tmp_path)
  with pytest.raises(inference.errors.UserError,
                     match=rf"folder {tmp_path} is not writable"):
    inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                            str(tmp_path / "out"))


def test_pair_collection_errors_name_the_path_before_the_model_loads(
    tmp_path):
  _write_pair(tmp_path, "a")
  with pytest.raises(inference.errors.UserError,
                     match=rf"--ir {tmp_path / 'irx'}: no such file or "
                     "directory"):
    inference.collect_pairs(str(tmp_path / "irx"), str(tmp_path / "vi"),
                            str(tmp_path / "out"))
  # A folder where an output goes would have stopped the run half way.
  (tmp_path / "out" / "a.png").mkdir(parents=True)
  with pytest.raises(inference.errors.UserError,
                     match=rf"--out {tmp_path / 'out' / 'a.png'} is a "
                     "directory"):
    inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                            str(tmp_path / "out"))
  # Natural order, and a stem with a non-decimal digit ('²') still sorts.
  for name in ("10", "9", "2²"):
    _write_pair(tmp_path, name)
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "fused"))
  assert [p.name for p in pairs] == ["2²", "9", "10", "a"]


def test_a_failed_write_is_reported_and_the_other_pairs_are_fused(
    workdir, tmp_path, monkeypatch):
  for name in "abc":
    _write_pair(tmp_path, name)
  fuser = inference.Fuser.load(str(workdir))
  pairs = inference.collect_pairs(str(tmp_path / "ir"), str(tmp_path / "vi"),
                                  str(tmp_path / "out"))
  write = image_io.write_png_atomic

  def full_disk_on_b(path, image):
    if Path(path).name == "b.png":
      raise OSError(28, "No space left on device")
    write(path, image)

  monkeypatch.setattr(inference.image_io, "write_png_atomic", full_disk_on_b)
  result = inference.fuse_pairs(fuser, pairs,
                                fuser.encoder.encode(["x"] * 3))
  assert result.failed == [f"{tmp_path / 'out' / 'b.png'}: cannot write "
                           "(No space left on device)"]
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "a.png", "c.png"]


@pytest.mark.parametrize("raised, status, line", [
    (OSError(28, "No space left on device", "/data/out/1.png"), 2,
     "error: /data/out/1.png: No space left on device"),
    (PermissionError(13, "Permission denied", "/ro/x"), 2,
     "error: /ro/x: Permission denied"),
    (KeyboardInterrupt(), 130,
     "error: interrupted; what was written is complete, rerun to carry on")])
def test_machine_errors_and_ctrl_c_are_one_line(raised, status, line, capsys):
  with pytest.raises(SystemExit) as exit_info:
    with inference.errors.one_line_errors():
      raise raised
  assert exit_info.value.code == status
  assert capsys.readouterr().err.strip() == line


def test_other_os_errors_keep_their_traceback():
  with pytest.raises(OSError):  # a bug, e.g. a bad file descriptor
    with inference.errors.one_line_errors():
      raise OSError(9, "Bad file descriptor")


def test_a_grey_image_may_differ_by_two_levels_between_channels():
  from textfusion_jax import color  # pylint: disable=g-import-not-at-top
  image = np.full((4, 4, 3), 100, np.uint8)
  assert color.is_grey(image) and color.is_grey(image / 255.0)
  image[0, 0, 2] = 102
  assert color.is_grey(image) and color.is_grey(image / 255.0)
  image[0, 0, 2] = 103  # a faint colour is still colour
  assert not color.is_grey(image) and not color.is_grey(image / 255.0)


def test_a_small_overlap_is_warned(capsys, tmp_path):
  """--overlap 0 was taken silently; tiles then met in seams of up to 25
  levels (MSRS 1 in 320-pixel tiles, the shipped model)."""
  out = _fuse_here(capsys, "--checkpoint", str(tmp_path), "--ir",
                   str(tmp_path / "none.png"), "--vis",
                   str(tmp_path / "none.png"), "--text", "a road", "--out",
                   str(tmp_path / "out.png"), "--overlap", "0")
  assert out.returncode == 2
  assert "warning: --overlap=0: tiles blended over fewer than 32" in out.stderr
