"""Model bundles: export, verification, fusing from them, bad bundles."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from textfusion_jax import bundle
from textfusion_jax import run_bundle
from textfusion_jax import inference
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline.errors import UserError
from textfusion_jax import run_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return tiny_workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  return run_bundle.export_run(str(workdir), str(tmp_path_factory.mktemp("b") / "m"))


def _pair(root: Path, name: str = "a", size=(64, 48)) -> tuple[Path, Path]:
  rng = np.random.default_rng(len(name))
  w, h = size
  y, x = np.mgrid[:h, :w]
  base = 110 + 70 * np.sin(x / 6.0) * np.cos(y / 5.0)
  for sub in ("ir", "vi"):
    (root / sub).mkdir(parents=True, exist_ok=True)
  ir = np.clip(base + rng.normal(0, 25, (h, w)), 0, 255).astype(np.uint8)
  vis = np.clip(base[..., None] * [1.0, 0.8, 0.6] + rng.normal(0, 10, (h, w, 3)),
                0, 255).astype(np.uint8)
  Image.fromarray(ir).save(root / "ir" / f"{name}.png")
  Image.fromarray(vis).save(root / "vi" / f"{name}.png")
  return root / "ir" / f"{name}.png", root / "vi" / f"{name}.png"


def _fuse_cli(*args):
  return subprocess.run([sys.executable, "-m", "textfusion_jax.fuse", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)),
                        check=False)


def test_bundle_layout_and_model_card(exported, workdir):
  files = set(json.loads((exported / "manifest.json").read_text())["files"])
  assert {"params.safetensors", "config.json", "MODEL_CARD.md",
          "text_encoder/config.json", "text_encoder/model.safetensors"} <= files
  card = (exported / "MODEL_CARD.md").read_text()
  info = run_record.load(workdir)
  for fragment in (info["data"]["sha256"], info["segments"][0]["commit"],
                   "Seed 0", "2 steps", "| model |", "| copy_vis |",
                   "mean_rank", "randomly initialised"):
    assert fragment in card, fragment
  assert json.loads((exported / "config.json").read_text())["text"][
      "encoder"] == "text_encoder"
  # A bundle is for sharing: files get the umask's modes, not a temp file's.
  umask = os.umask(0)
  os.umask(umask)
  for name in files:
    assert (exported / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_fusing_from_bundle_equals_workdir_bitwise(exported, workdir,
                                                   tmp_path):
  ir, vis = _pair(tmp_path)
  outs = []
  for source in (exported, workdir):
    out = tmp_path / f"{Path(source).name}.png"
    proc = _fuse_cli("--checkpoint", str(source), "--ir", str(ir), "--vis",
                     str(vis), "--text", "a warm person on a road", "--out",
                     str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(image_io.read_image(out))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_bundle_text_encoder_loads_in_transformers(exported):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from textfusion_jax.text.encoder import TextEncoder  # pylint: disable=g-import-not-at-top
  directory = exported / "text_encoder"
  model = transformers.CLIPTextModelWithProjection.from_pretrained(directory)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  texts = ["a warm person on a dark road", "smoke"]
  with torch.no_grad():
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    theirs = model(**tokens).text_embeds.numpy()
  ours = TextEncoder.from_pretrained(directory).encode(texts)
  np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_exporting_twice_gives_identical_manifests(exported, workdir,
                                                   tmp_path):
  again = run_bundle.export_run(str(workdir), str(tmp_path / "again"))
  assert ((again / "manifest.json").read_bytes() ==
          (exported / "manifest.json").read_bytes())
  # --report must be text: a binary file is one line, and nothing is written.
  binary = tmp_path / "report.png"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
  with pytest.raises(UserError, match=rf"--report {binary}: not UTF-8 text"):
    run_bundle.export_run(str(workdir), str(tmp_path / "third"),
                          report_path=str(binary))
  assert not (tmp_path / "third").exists()


def test_exporting_over_a_bundle_swaps_it_in_one_step(exported, workdir,
                                                     tmp_path, monkeypatch):
  """Re-exporting to an existing bundle never leaves --out missing (a reader
  or a kill between two renames would find no bundle), and leaves no hidden
  temporary or old copy beside it."""
  out = _copy(exported, tmp_path)
  report = tmp_path / "report.md"
  report.write_text("second export's report\n")
  out_present = []
  real_replace = os.replace

  def watched_replace(src, dst):
    real_replace(src, dst)
    out_present.append(out.exists())

  # Another bundle (a shipped model) is not replaced unasked.
  with pytest.raises(UserError, match=rf"--out {out} is already a model "
                     "bundle; pass --overwrite"):
    run_bundle.export_run(str(workdir), str(out))
  # A bundle given as the run to export is named for what it is.
  with pytest.raises(UserError, match=rf"--workdir {out} is already a model "
                     "bundle"):
    run_bundle.export_run(str(out), str(tmp_path / "x"))
  monkeypatch.setattr(files.os, "replace", watched_replace)
  run_bundle.export_run(str(workdir), str(out), report_path=str(report),
                        overwrite=True)
  assert all(out_present), "the bundle was missing between two renames"
  assert "second export's report" in (out / bundle.MODEL_CARD).read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle",
                                                        "report.md"]
  # Something else at --out is refused and kept as it was.
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match=rf"{other} exists and is not a model "
                     "bundle"):
    run_bundle.export_run(str(workdir), str(other))
  assert [p.name for p in other.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_directory_with_and_without_an_exchange(tmp_path, monkeypatch,
                                                        exchange):
  """The one-step swap, and the two-rename fallback (file systems without
  RENAME_EXCHANGE), both leave only the new folder."""
  if not exchange:
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
  for name, text in (("target", "old"), ("new", "new")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "f").write_text(text)
  files.replace_directory(tmp_path / "new", tmp_path / "target")
  assert (tmp_path / "target" / "f").read_text() == "new"
  assert [p.name for p in tmp_path.iterdir()] == ["target"]


def _copy(exported: Path, tmp_path: Path) -> Path:
  target = tmp_path / "bundle"
  shutil.copytree(exported, target)
  return target


@pytest.mark.parametrize("case", ["tampered", "missing", "extra"])
def test_altered_bundles_are_refused_before_anything_is_written(
    exported, tmp_path, case):
  root = _copy(exported, tmp_path)
  if case == "tampered":
    path = root / "params.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    expect = f"{path}: changed since export"
  elif case == "missing":
    path = root / "text_encoder" / "model.safetensors"
    path.unlink()
    expect = f"{path}: listed in"
  else:
    path = root / "text_encoder" / "notes.txt"
    path.write_text("extra")
    expect = f"{path}: not listed in"
  ir, vis = _pair(tmp_path)
  out = tmp_path / "out.png"
  proc = _fuse_cli("--checkpoint", str(root), "--ir", str(ir), "--vis",
                   str(vis), "--text", "x", "--out", str(out))
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
  assert not out.exists()


def test_bundle_whose_config_does_not_fit_its_params(exported, tmp_path):
  root = _copy(exported, tmp_path)
  config = json.loads((root / "config.json").read_text())
  config["model"]["dim"] = 2 * config["model"]["dim"]
  (root / "config.json").write_text(json.dumps(config))
  # A consistent manifest: the bundle is intact but self-contradictory.
  (root / "manifest.json").write_text(json.dumps(bundle.manifest_of(root)))
  with pytest.raises(bundle.BundleError,
                     match=r"params.safetensors: parameters do not fit"):
    inference.Fuser.load(str(root))


def test_bundle_resealed_without_its_text_encoder_is_refused(exported,
                                                             tmp_path):
  root = _copy(exported, tmp_path)
  shutil.rmtree(root / "text_encoder")
  (root / "manifest.json").write_text(json.dumps(bundle.manifest_of(root)))
  with pytest.raises(bundle.BundleError,
                     match=r"does not list text_encoder/config.json"):
    bundle.verify(root)


def test_export_of_a_non_workdir_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "textfusion_jax.export", "--workdir",
       str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error:")
  assert "nope" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "b").exists()


def test_each_pair_is_fused_with_its_own_caption(exported, tmp_path):
  """--captions gives every pair its own prompt (text that matters)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  root = _copy(exported, tmp_path)
  # The 2-step model barely listens to text: give its text modulation
  # weight, then re-seal the bundle.
  params = safetensors.numpy.load_file(root / "params.safetensors")
  rng = np.random.default_rng(0)
  for name in params:
    if name.startswith("modulation.") and name.endswith("out.kernel"):
      params[name] = rng.normal(0, 0.3, params[name].shape).astype(np.float32)
  safetensors.numpy.save_file(params, root / "params.safetensors")
  (root / "manifest.json").write_text(json.dumps(bundle.manifest_of(root)))
  data = tmp_path / "data"
  for name in ("a", "b"):
    _pair(data, name)
  captions = {"a": "a dark road at night", "b": "two warm pedestrians"}
  (data / "captions.jsonl").write_text("\n".join(
      json.dumps({"name": n, "captions": [t]}) for n, t in captions.items()))
  proc = _fuse_cli("--checkpoint", str(root), "--ir", str(data / "ir"),
                   "--vis", str(data / "vi"), "--captions",
                   str(data / "captions.jsonl"), "--out", str(tmp_path / "o"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  fuser = inference.Fuser.load(str(root))
  for name in ("a", "b"):
    vis, ir = inference.load_pair(inference.Pair(name, data / "ir" / f"{name}.png",
                                       data / "vi" / f"{name}.png", Path()))
    own, other = fuser.encoder.encode([captions[name],
                                       captions["b" if name == "a" else "a"]])
    written = image_io.read_image(tmp_path / "o" / f"{name}.png")
    np.testing.assert_array_equal(written, fuser.fuse(vis, ir, own))
    assert np.abs(written.astype(int) -
                  fuser.fuse(vis, ir, other).astype(int)).max() > 0


def test_data_fingerprint_follows_contents_not_location(tmp_path):
  config = tiny.get_config()
  config.data.source = "folder"
  for copy in ("one", "two"):
    _pair(tmp_path / copy / "set", "a")
    (tmp_path / copy / "set" / "captions.jsonl").write_text("{}\n")
  config.data.train_dir = str(tmp_path / "one" / "set")
  first = run_record.data_fingerprint(config)
  config.data.train_dir = str(tmp_path / "two" / "set")
  second = run_record.data_fingerprint(config)
  assert first["sha256"] == second["sha256"] and first["files"] == 3
  (tmp_path / "two" / "set" / "captions.jsonl").write_text("{} \n")
  changed = run_record.data_fingerprint(config)
  assert changed["sha256"] != first["sha256"] and "split" not in changed
  # A slice of the folders trains on other pairs: another fingerprint.
  config.data.train_split = "train[:80%]"
  sliced = run_record.data_fingerprint(config)
  assert sliced["split"] == "train[:80%]"
  assert sliced["sha256"] != changed["sha256"]


def test_the_model_card_names_the_slices_a_run_trained_and_was_scored_on(
    tmp_path):
  """configs/real_pairs_degraded_validation.py trains on 'train[:80%]' of
  folders it also evaluates on ('train[80%:]'): a card without the splits
  would say the model was scored on its own training folders."""
  folder = tmp_path / "set"
  for name in "abcd":
    _pair(folder, name)
  (folder / "captions.jsonl").write_text("{}\n")
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(folder)
  config.data.train_split, config.data.eval_split = "train[:2]", "train[2:]"
  info = run_record.start(tmp_path / "run", config, 0)
  run_record.finish(tmp_path / "run", info, 3, 1.0)
  config.data.train_split = "train[:3]"  # resumed on another slice
  info = run_record.start(tmp_path / "run", config, 3)
  run_record.finish(tmp_path / "run", info, 5, 1.0)
  card = run_bundle.model_card(config, run_record.load(tmp_path / "run"), 5,
                               "")
  assert "- Data: source `folder` at split `train[:2]`, 9 files" in card
  assert f"- Held out for evaluation: `{folder}` at split `train[2:]`" in card
  assert "- Data from step 3: source `folder`, 9 files, sha256 `" in card
  assert ", split `train[:3]`" in card
  # Read whole, a folder is carded as before: no split.
  config.data.train_split, config.data.eval_split = "train", "test"
  info = run_record.start(tmp_path / "whole", config, 0)
  run_record.finish(tmp_path / "whole", info, 1, 1.0)
  card = run_bundle.model_card(config, run_record.load(tmp_path / "whole"),
                               1, "")
  assert "- Data: source `folder`, 9 files" in card
  assert f"- Held out for evaluation: `{folder}`\n" in card


def test_a_full_disk_during_export_is_one_line_and_keeps_the_old_bundle(
    exported, workdir, tmp_path, monkeypatch):
  """safetensors reports a full disk as its own error type, not OSError:
  it was a traceback."""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  out = _copy(exported, tmp_path)
  before = (out / bundle.MANIFEST).read_text()

  def full_disk(*args, **kwargs):
    raise safetensors.SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: "
        "StorageFull, message: \"No space left on device\" })")

  monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
  with pytest.raises(bundle.BundleError, match=rf"{out}: cannot write "
                     r"\(Error while serializing.*No space left"):
    run_bundle.export_run(str(workdir), str(out), overwrite=True)
  assert (out / bundle.MANIFEST).read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_nothing_is_written_inside_a_bundle_or_a_runs_checkpoints(
    exported, workdir, tmp_path):
  """A bundle lists exactly its files: a fused image or a second bundle
  inside one broke it (the next load failed its manifest check), as did an
  export into a run's checkpoints/."""
  copy = tmp_path / "bundle"
  shutil.copytree(exported, copy)
  ir, vis = _pair(tmp_path / "src")
  for out in (copy / "fused.png", copy / "text_encoder" / "x.png", copy):
    with pytest.raises(UserError, match=r"which holds a manifest.json \(a "
                       r"model bundle|holds a manifest.json \(a model bundle"):
      inference.collect_pairs(str(ir), str(vis), str(out))
  with pytest.raises(UserError, match=rf"--out {copy}/v2 is inside {copy}, "
                     r"which holds a manifest.json"):
    run_bundle.export_run(str(workdir), str(copy / "v2"))
  with pytest.raises(UserError, match=r"is inside the training run .*'s "
                     r"checkpoints: choose a path outside it"):
    run_bundle.export_run(str(workdir), str(workdir / "checkpoints" / "9"))
  assert not (workdir / "checkpoints" / "9").exists()
  bundle.verify(copy)  # still whole
  assert sorted(p.name for p in copy.iterdir()) == sorted(
      p.name for p in Path(exported).iterdir())


def test_export_over_a_link_to_a_bundle_is_refused_and_keeps_the_link(
    exported, workdir, tmp_path):
  """Replacing a link swapped the link itself and left a stray link and a
  traceback; the link's bundle was not updated."""
  shutil.copytree(exported, tmp_path / "v1")
  (tmp_path / "latest").symlink_to("v1")
  with pytest.raises(UserError, match=r"--out .*latest is a symbolic link "
                     r"\(to v1\); give the folder itself"):
    run_bundle.export_run(str(workdir), str(tmp_path / "latest"),
                          overwrite=True)
  assert (tmp_path / "latest").is_symlink()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1"]
  bundle.verify(tmp_path / "v1")


def test_the_model_card_shows_a_prompt_the_model_was_trained_on(tmp_path):
  """A degraded model's card shows a condition sentence, not a content
  caption, which is outside its grammar (fuse would warn)."""
  config = tiny.get_config()
  info = run_record.start(tmp_path / "run", config, 0)
  run_record.finish(tmp_path / "run", info, 1, 1.0)
  shown = lambda: run_bundle.model_card(
      config, run_record.load(tmp_path / "run"), 1, "")
  assert '--text "a short description of the scene"' in shown()
  config.data.degradations.enabled = True
  assert ('--text "heavily underexposed, slightly noisy visible image"'
          in shown())
