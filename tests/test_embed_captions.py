"""Caption embedding at scale: the embed_captions CLI and the caption store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from input_pipeline import caption_files
from input_pipeline.errors import UserError
from textfusion_jax.text import caption_embedding, tiny_clip
from input_pipeline.caption_store import (CaptionEmbeddings,
                                               CaptionStoreError)
from textfusion_jax.text.encoder import TextEncoder

SHARED_SAMPLES = (Path(__file__).resolve().parents[2] / "shared" / "data" /
                  "ivf_samples")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny_clip.save_tiny_random_clip(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(tiny_dir):
  return TextEncoder.from_pretrained(tiny_dir)


class CountingEncoder:
  """A TextEncoder that records how many captions it was asked to embed."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def encode_ids(self, ids, batch_size=64):
    self.calls.append(len(ids))
    return self.inner.encode_ids(ids, batch_size)


def _write_jsonl(path: Path, records) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(
      (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


def _run(encoder, files, out, **kwargs):
  """caption_embedding.run on (dataset, path) pairs, read afresh, quietly."""
  return caption_embedding.run(encoder, caption_files.read_caption_files(files),
                            out, progress=False, **kwargs)


def _folder_config_with_store(root, store, tiny_dir, encoder):
  """The tiny config training and evaluating on folder `root` with the
  caption store `store` made by the tiny CLIP in `tiny_dir`."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.text_dim = encoder.embed_dim
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(root)
  config.text.embeddings_dir = str(store)
  config.text.encoder = str(tiny_dir)  # the store's: not re-embedded
  return config


def _assert_matches_direct_encode(store, encoder, files):
  keys, captions = [], []
  for dataset, path in files:
    for record in caption_files.read_caption_file(path, dataset):
      assert len(store.rows(dataset, record.name)) == len(record.captions)
      for i, caption in enumerate(record.captions):
        keys.append((dataset, record.name, i))
        captions.append(caption)
  for key, expected in zip(keys, encoder.encode(captions, batch_size=16)):
    got = store.lookup(*key)
    assert got.shape == (encoder.embed_dim,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess:
  """`python -m textfusion_jax.text.embed_captions ARGS` in a subprocess."""
  root = Path(__file__).resolve().parents[1]
  return subprocess.run(
      [sys.executable, "-m", "textfusion_jax.text.embed_captions", *args],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(root)})


def test_cli_on_shared_samples(tiny_dir, encoder, tmp_path, capsys):
  files = sorted(SHARED_SAMPLES.glob("*/captions.jsonl"))
  if not files:
    pytest.skip(f"no shared sample captions under {SHARED_SAMPLES}")
  out = tmp_path / "store"
  proc = _cli("--encoder", str(tiny_dir), "--out", str(out),
              *(f"--captions={f}" for f in files), "--batch_size", "16",
              "--shard_size", "64")
  assert proc.returncode == 0, proc.stderr
  assert "embed captions" in proc.stderr  # the progress bar
  store = CaptionEmbeddings.load(out)
  assert store.datasets() == sorted(p.parent.name for p in files)
  assert store.encoder == str(tiny_dir) and store.dim == encoder.embed_dim
  store.check_dim(encoder.embed_dim)
  _assert_matches_direct_encode(
      store, encoder, [(p.parent.name, p) for p in files])


def test_duplicates_are_embedded_once(encoder, tmp_path):
  a = _write_jsonl(tmp_path / "day" / "captions.jsonl", [
      {"name": "1", "captions": ["a red car", "a red car", "two people"]},
      {"name": "2", "captions": ["two people"]},
      {"name": "3", "captions": []},
  ])
  b = _write_jsonl(tmp_path / "night" / "captions.jsonl", [
      {"name": "1", "captions": ["a red car", "a dark road at night"]},
  ])
  counting = CountingEncoder(encoder)
  files = [("day", a), ("night", b)]
  store = _run(counting, files, tmp_path / "out", shard_size=3)
  assert sum(counting.calls) == 3 and store.table.shape == (3, 64)
  assert store.manifest["num_captions"] == 6
  assert store.rows("day", "1") == [0, 0, 1]
  assert store.rows("night", "1")[0] == 0 and store.rows("day", "3") == []
  _assert_matches_direct_encode(store, encoder, files)


def test_interrupted_run_resumes_without_redoing_shards(encoder, tmp_path):
  captions = [f"scene number {i} with a person near a car" for i in range(10)]
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl", [
      {"name": str(i), "captions": captions[2 * i:2 * i + 2]}
      for i in range(5)])
  files, out = [("set", path)], tmp_path / "out"

  first = CountingEncoder(encoder)
  assert _run(first, files, out, shard_size=2, max_shards=2) is None
  assert first.calls == [2, 2]
  assert not (out / "manifest.json").exists()
  finished = sorted((out / "shards").glob("*.npz"))
  assert len(finished) == 2
  before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

  second = CountingEncoder(encoder)
  store = _run(second, files, out, shard_size=2)
  assert second.calls == [2, 2, 2]  # only the three missing shards
  stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
  assert stats == before
  np.testing.assert_allclose(store.table, encoder.encode(captions), atol=1e-6)

  # A damaged shard is redone; a finished job redoes nothing.
  finished[1].write_bytes(finished[1].read_bytes()[:100])
  third = CountingEncoder(encoder)
  store = _run(third, files, out, shard_size=2)
  assert third.calls == [2]
  np.testing.assert_allclose(store.table, encoder.encode(captions), atol=1e-6)
  fourth = CountingEncoder(encoder)
  _run(fourth, files, out, shard_size=2)
  assert fourth.calls == []

  # Changed captions invalidate only the shards whose captions changed.
  captions[9] = "a changed caption"
  _write_jsonl(path, [{"name": str(i), "captions": captions[2 * i:2 * i + 2]}
                      for i in range(5)])
  fifth = CountingEncoder(encoder)
  store = _run(fifth, files, out, shard_size=2)
  assert fifth.calls == [2]
  np.testing.assert_allclose(store.lookup("set", "4", 1),
                             encoder.encode(["a changed caption"])[0],
                             atol=1e-6)


def test_processes_embed_disjoint_shards(encoder, tmp_path):
  captions = [f"caption {i} of a thermal image" for i in range(7)]
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl", [
      {"name": str(i), "captions": [c]} for i, c in enumerate(captions)])
  files, out, barriers = [("set", path)], tmp_path / "out", []
  worker = CountingEncoder(encoder)
  assert _run(worker, files, out, shard_size=2, process_index=1,
              process_count=2, barrier=lambda: barriers.append(1)) is None
  assert worker.calls == [2, 1]  # shards 1 and 3 of 0..3
  chief = CountingEncoder(encoder)
  store = _run(chief, files, out, shard_size=2, process_index=0,
               process_count=2, barrier=lambda: barriers.append(0))
  assert chief.calls == [2, 2] and barriers == [1, 0]
  np.testing.assert_allclose(store.table, encoder.encode(captions), atol=1e-6)


@pytest.mark.parametrize("line,message", [
    ('{"name": "b", "captions": ["ok"', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"name": "b", "captions": ["ok", ""]}', "caption 1 of 'b' is empty"),
    ('{"name": "b", "captions": ["ok", 3]}',
     "caption 1 of 'b' is not a string: 3"),
    ('{"name": "b", "captions": "ok"}', "'captions' of 'b' must be a list"),
    ('{"name": "b", "captions": ["ok"], "split": ""}',
     "'split' must be a non-empty string"),
    ('{"captions": ["ok"]}', "'name' must be a non-empty string"),
    ('{"name": "a", "captions": ["again"]}', "name 'a' already appeared on "
     "line 1"),
])
def test_bad_caption_lines_name_file_and_line(tiny_dir, tmp_path, capsys,
                                              line, message):
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl", [
      {"name": "a", "captions": ["fine"]}, "", line])
  with pytest.raises(caption_files.CaptionFileError,
                     match=f"{path}:3: {message}"):
    caption_files.read_caption_file(path)
  proc = _cli("--encoder", str(tiny_dir), "--captions", str(path),
              "--out", str(tmp_path / "out"))
  rc, err = proc.returncode, proc.stderr.strip().splitlines()
  assert rc == 2 and err[-1].startswith(f"error: {path}:3: ")


def test_cli_rejects_encoder_without_tokenizer(tiny_dir, tmp_path, capsys):
  directory = tmp_path / "no_tokenizer"
  directory.mkdir()
  for name in ("config.json", "model.safetensors"):
    (directory / name).write_bytes((tiny_dir / name).read_bytes())
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl",
                      [{"name": "a", "captions": ["fine"]}])
  proc = _cli("--encoder", str(directory), "--captions", str(path),
              "--out", str(tmp_path / "out"))
  rc, err = proc.returncode, proc.stderr.strip().splitlines()
  assert rc == 2 and "no tokenizer" in err[-1] and str(directory) in err[-1]


def test_store_errors(encoder, tmp_path):
  with pytest.raises(CaptionStoreError, match="no manifest.json"):
    CaptionEmbeddings.load(tmp_path)
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl",
                      [{"name": "a", "captions": ["fine", "also fine"]}])
  store = _run(encoder, [("custom", path)], tmp_path / "out")
  assert store.datasets() == ["custom"]
  with pytest.raises(CaptionStoreError, match="expects 512"):
    store.check_dim(512)
  with pytest.raises(CaptionStoreError, match="no dataset 'set'"):
    store.rows("set", "a")
  with pytest.raises(CaptionStoreError, match="no captions for 'b'"):
    store.rows("custom", "b")
  with pytest.raises(CaptionStoreError, match="has 2 caption"):
    store.lookup("custom", "a", 2)
  mapped = CaptionEmbeddings.load(tmp_path / "out", mmap=True)
  np.testing.assert_array_equal(mapped.lookup("custom", "a", 1),
                                store.lookup("custom", "a", 1))
  # Hand-edited JSON of the wrong shape: one line naming the file.
  (tmp_path / "out" / "texts.json").write_text('["fine"]')
  with pytest.raises(CaptionStoreError, match=r"texts.json: not a list of "
                     "the table's 2 captions"):
    CaptionEmbeddings.load(tmp_path / "out").texts  # pylint: disable=expression-not-assigned
  (tmp_path / "out" / "manifest.json").write_text("[1, 2]")
  with pytest.raises(CaptionStoreError, match=r"manifest.json: not a JSON "
                     "object"):
    CaptionEmbeddings.load(tmp_path / "out")


def test_caption_sources_are_keyed_apart_and_feed_training(encoder, tiny_dir,
                                                            tmp_path):
  """captions.jsonl and captions_gen.jsonl of one dataset: one store, keys
  'set' and 'set@gen'; training reads both sources' rows from it."""
  # pylint: disable=g-import-not-at-top
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  root = _write_folder_dataset(tmp_path / "set", "ab", 0)
  _write_jsonl(root / "captions_gen.jsonl",
               [{"name": n, "captions": [f"gen {n} 1", f"gen {n} 2"]}
                for n in "ab"])
  files = [(None, root / "captions.jsonl"), (None, root / "captions_gen.jsonl")]
  store = _run(encoder, files, tmp_path / "store")
  assert store.datasets() == ["set", "set@gen"]
  assert len(store.rows("set", "a")) == 1
  assert len(store.rows("set", "a", "gen")) == 2
  manifest_sources = {s["caption_source"] for s in store.manifest["sources"]}
  assert manifest_sources == {"default", "gen"}
  config = _folder_config_with_store(root, tmp_path / "store",
                                     tiny_dir, encoder)
  config.data.caption_sources = (("gen", 1.0),)
  train_source, _ = sources.make_sources(config)
  table, _, dim = sources.make_caption_tables(config, lambda: encoder,
                                              train_source, train_source)
  assert dim == encoder.embed_dim and table.source_names == ("gen",)
  expected = encoder.encode(["gen a 1", "gen a 2"])
  np.testing.assert_allclose(table.embeddings[table.rows[0]], expected,
                             rtol=1e-5, atol=1e-6)
  # Caption files edited after embedding: the store is refused as stale, by
  # name, rather than giving pairs other captions' embeddings.
  _write_jsonl(root / "captions_gen.jsonl",
               [{"name": "a", "captions": ["gen a 1", "gen a 2", "gen a 3"]},
                {"name": "b", "captions": ["gen b 1", "gen b 2"]}])
  train_source, _ = sources.make_sources(config)
  with pytest.raises(UserError, match=r"set/a \(gen\) holds 2 caption\(s\), "
                     "the caption files now have 3; the store is stale"):
    sources.make_caption_tables(config, lambda: encoder, train_source,
                                train_source)


def test_store_needs_only_the_caption_sources_it_is_read_for(
    encoder, tiny_dir, tmp_path):
  """A caption file added after the store was built, and left out by
  config.data.caption_sources, is not required in the store: training reads
  the chosen sources, eval sets caption 0. Choosing only that new source
  still fails, naming the missing source."""
  # pylint: disable=g-import-not-at-top
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  root = _write_folder_dataset(tmp_path / "set", "ab", 0)
  _run(encoder, [(None, root / "captions.jsonl")], tmp_path / "store")
  _write_jsonl(root / "captions_gen.jsonl",
               [{"name": n, "captions": [f"gen {n}"]} for n in "ab"])
  config = _folder_config_with_store(root, tmp_path / "store",
                                     tiny_dir, encoder)
  config.data.caption_sources = (("default", 1.0),)
  train_source, eval_source = sources.make_sources(config)
  table, table_eval, _ = sources.make_caption_tables(
      config, lambda: encoder, train_source, eval_source)
  assert table.source_names == ("default",)
  default_a = sources.record_captions(train_source, 0)[0]
  for t in (table, table_eval):
    np.testing.assert_allclose(t.embedding(0, 0), encoder.encode([default_a])[0],
                               rtol=1e-5, atol=1e-6)
  config.data.caption_sources = (("gen", 1.0),)
  with pytest.raises(UserError, match=r"store: no dataset 'set@gen' \(has set\)"):
    sources.make_caption_tables(config, lambda: encoder, train_source)


def test_store_from_another_encoder_is_refused(encoder, tiny_dir, tmp_path):
  """Same width, other weights: training on it would put the model in
  another embedding space than its prompts; named the same way through
  another path, the same encoder passes."""
  # pylint: disable=g-import-not-at-top
  from configs import tiny
  from input_pipeline import caption_store
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  root = _write_folder_dataset(tmp_path / "set", "ab", 0)
  _run(encoder, [(None, root / "captions.jsonl")], tmp_path / "store")
  config = tiny.get_config()
  config.model.text_dim = encoder.embed_dim
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(root)
  config.text.embeddings_dir = str(tmp_path / "store")
  train_source, _ = sources.make_sources(config)
  other_dir = tiny_clip.save_tiny_random_clip(tmp_path / "other", seed=1)
  copy_dir = tmp_path / "copy"
  shutil.copytree(tiny_dir, copy_dir)
  for name, refused in ((str(other_dir), True), (str(copy_dir), False)):
    config.text.encoder = name
    make = lambda name=name: TextEncoder.from_pretrained(name)
    if refused:
      with pytest.raises(caption_store.CaptionStoreError,
                         match=r"config.text.encoder=.*other.* embeds its "
                         r"captions differently \(cosine"):
        sources.make_caption_tables(config, make, train_source)
    else:
      sources.make_caption_tables(config, make, train_source)


def test_records_carrying_embeddings_are_not_embedded_again(encoder, tmp_path):
  """Records built with a caption store's rows (`build_dataset --text_emb`,
  or a folder source given one) use them: only one record's captions are
  embedded, as a probe; from another encoder, every caption is embedded."""
  # pylint: disable=g-import-not-at-top
  from configs import tiny
  from input_pipeline import datasets
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  root = _write_folder_dataset(tmp_path / "set", "abc", 0)
  store = _run(encoder, [(None, root / "captions.jsonl")], tmp_path / "store")
  source = datasets.PairedFolderSource(root, text_emb=tmp_path / "store")
  config = tiny.get_config()
  config.model.text_dim = encoder.embed_dim
  class Counting(CountingEncoder):
    def encode(self, texts, batch_size=64):
      self.calls.append(len(texts))
      return self.inner.encode(texts, batch_size)

  counting = Counting(encoder)
  table, dim = sources.make_caption_tables(config, lambda: counting, source)
  assert counting.calls == [1] and dim == encoder.embed_dim
  for i, name in enumerate(source.record_name(k) for k in range(3)):
    np.testing.assert_array_equal(table.embedding(i, 0),
                                  store.table[store.rows("set", name)[0]])
  other = Counting(TextEncoder.from_pretrained(
      tiny_clip.save_tiny_random_clip(tmp_path / "other", seed=1)))
  table, _ = sources.make_caption_tables(config, lambda: other, source)
  assert other.calls == [1, 3]  # the probe, then every caption
  np.testing.assert_allclose(table.embedding(0, 0),
                             other.inner.encode([source.captions(0)[0]])[0],
                             rtol=1e-5, atol=1e-6)


def _write_split_pairs(root: Path) -> None:
  """split_folders layout: train/ and test/ both hold a pair named '1'."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, names in (("train", ("1", "2")), ("test", ("1",))):
    for name in names:
      for kind, channels in (("ir", 1), ("vi", 3)):
        path = root / split / kind / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, channels), np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else
                        pixels).save(path)


def test_captions_tagged_with_a_split_keep_their_own_embeddings(
    encoder, tmp_path):
  """A stem in two splits, captioned per split ("split": name) and for
  every split (no "split"): the store, a folder source, the training table
  and fuse each take the line of the pair's split, else the untagged one."""
  # pylint: disable=g-import-not-at-top
  from input_pipeline import datasets
  from input_pipeline import sources
  from textfusion_jax import inference
  root = tmp_path / "set"
  _write_split_pairs(root)
  captions = _write_jsonl(root / "captions.jsonl", [
      {"name": "1", "split": "train", "captions": ["a day road"]},
      {"name": "1", "split": "test", "captions": ["a night road", "rain"]},
      {"name": "2", "captions": ["a field"]},
      {"name": "2", "split": "train", "captions": ["a meadow"]},
  ])
  records = caption_files.read_caption_file(captions)
  assert [(r.split, r.name) for r in records] == [
      ("train", "1"), ("test", "1"), (None, "2"), ("train", "2")]
  store = _run(encoder, [("set", captions)], tmp_path / "store")
  table = {text: row for row, text in enumerate(
      ["a day road", "a night road", "rain", "a field", "a meadow"])}
  assert store.rows("set", "1", split="test") == [table["a night road"],
                                                  table["rain"]]
  assert store.rows("set", "2", split="train") == [table["a meadow"]]
  assert store.rows("set", "2", split="test") == [table["a field"]]
  assert store.rows("set", "2") == [table["a field"]]
  with pytest.raises(CaptionStoreError, match=r"no captions for '1' \(split "
                     r"'val'\)"):
    store.rows("set", "1", split="val")

  # A folder source, and a TFDS build (embeddings baked into its records):
  # each split's pair, its own captions and rows.
  want = {"train": {"1": ["a day road"], "2": ["a meadow"]},
          "test": {"1": ["a night road", "rain"]}}
  data_dir = tmp_path / "tfds"
  datasets.build("split_folders", manual_dir=root, data_dir=data_dir,
                 text_emb=store.directory)
  for split, names in want.items():
    built = datasets.RecordSource(
        datasets.load_source("split_folders", split, data_dir), split)
    for source in (datasets.PairedFolderSource(
        root, layout="split_folders", split=split, text_emb=store.directory),
                   built):
      got = {r["name"]: r for r in source}
      assert sorted(got) == sorted(names)
      for name, texts in names.items():
        assert got[name]["captions"] == texts
        np.testing.assert_allclose(got[name]["text_emb"],
                                   encoder.encode(texts), atol=1e-6)
    # Training's table from the store (config.text.embeddings_dir), for a
    # folder and for a TFDS part of a mixture.
    for part in (datasets.PairedFolderSource(root, layout="split_folders",
                                             split=split), built):
      concat = sources.ConcatSource([("set", part)])
      caption_table, _ = sources._table_from_store(concat, store)
      for i in range(len(concat)):
        texts = names[concat.dataset_and_name(i)[1]]
        np.testing.assert_allclose(
            caption_table.embeddings[caption_table.rows[i]],
            encoder.encode(texts), atol=1e-6)

  # fuse --captions: the line of --caption_split, else the untagged one.
  assert inference.read_captions(str(captions), ["1"], 1, "test") == ["rain"]
  assert inference.read_captions(str(captions), ["1", "2"], 0, "test") == [
      "a night road", "a field"]
  assert inference.read_captions(str(captions), ["2"], 0) == ["a field"]
  with pytest.raises(inference.errors.UserError,
                     match=r"no caption 0 for pair\(s\) 1 \(it has lines "
                     r"for split\(s\) test, train: choose one with "
                     r"--caption_split\)"):
    inference.read_captions(str(captions), ["1", "2"], 0)


def test_a_pair_without_captions_is_named_not_a_traceback(encoder, tiny_dir,
                                                          tmp_path):
  """With a store (or without), a folder pair that has no caption line is
  one error naming the dataset and pair; a mixture of a build whose records
  carry embeddings with a folder whose records do not embeds the captions."""
  # pylint: disable=g-import-not-at-top
  from configs import tiny
  from input_pipeline import datasets
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  root = _write_folder_dataset(tmp_path / "set", "ab", 0)
  _run(encoder, [(None, root / "captions.jsonl")], tmp_path / "store")
  lines = (root / "captions.jsonl").read_text().splitlines()
  (root / "captions.jsonl").write_text(lines[0] + "\n")  # b loses its line
  config = tiny.get_config()
  config.model.text_dim = encoder.embed_dim
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(root)
  config.text.encoder = str(tiny_dir)
  train_source, _ = sources.make_sources(config)
  make = lambda: encoder
  for store in (str(tmp_path / "store"), ""):
    config.text.embeddings_dir = store
    with pytest.raises(sources.UserError, match=r"set/b.* no captions"):
      sources.make_caption_tables(config, make, train_source)

  # Embeddings baked into a build's records, then a folder without them.
  other = _write_folder_dataset(tmp_path / "other", "cd", 1)
  _run(encoder, [(None, other / "captions.jsonl")], tmp_path / "store2")
  datasets.build("folders", manual_dir=other, data_dir=tmp_path / "tfds",
                 text_emb=tmp_path / "store2")
  built = datasets.RecordSource(
      datasets.load_source("folders", "train", tmp_path / "tfds"), "train")
  assert "text_emb" in built[0]
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  mixed = sources.ConcatSource([("other", built), (
      "set", datasets.PairedFolderSource(root))])
  assert sources._baked_table(mixed, encoder) is None  # embeds them instead
  with pytest.raises(datasets.MissingSplitError,
                     match=r"^ivf_pairs/folders in .* has no split 'test' "
                     r"\(it has train\)"):
    datasets.load_source("folders", "test", tmp_path / "tfds")
  # Split expressions name built splits; a slice is still its split.
  sliced = datasets.RecordSource(
      datasets.load_source("folders", "train[:1]", tmp_path / "tfds"),
      "train[:1]")
  assert len(sliced) == 1 and sliced.record_split(0) == "train"
  with pytest.raises(datasets.MissingSplitError, match="no split 'train"):
    datasets.load_source("folders", "train[:1]+val", tmp_path / "tfds")
  with pytest.raises(sources.UserError, match="dataset empty has no pairs"):
    sources.ConcatSource([("set", built), ("empty", [])])
  # A folder named through '.' is keyed by its real name, as stores are.
  assert sources._folder_parts(str(root / "."), "train_dir")[0][0] == "set"


def test_a_caption_may_hold_unicode_line_separators(tmp_path):
  path = tmp_path / "set" / "captions.jsonl"
  path.parent.mkdir()
  path.write_text(json.dumps({"name": "a", "captions": ["left\u2028right",
                                                       "x\u0085y"]},
                             ensure_ascii=False) + "\n", encoding="utf-8")
  (record,) = caption_files.read_caption_file(path)
  assert record.captions == ("left\u2028right", "x\u0085y")


def test_an_encoder_folder_with_new_weights_is_not_the_old_encoder(tmp_path):
  """Shards and stores name the encoder by what it computes: after its
  folder is overwritten with other weights, a rerun embeds again, and a
  store from the old weights is checked (and refused) for training."""
  # pylint: disable=g-import-not-at-top
  from configs import tiny
  from input_pipeline import caption_store
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  clip = tiny_clip.save_tiny_random_clip(tmp_path / "clip", seed=0)
  old = TextEncoder.from_pretrained(clip)
  root = _write_folder_dataset(tmp_path / "set", "ab", 0)
  files = [(None, root / "captions.jsonl")]
  store = _run(old, files, tmp_path / "store")
  assert store.manifest["encoder_fingerprint"] == old.fingerprint
  shutil.rmtree(clip)
  tiny_clip.save_tiny_random_clip(clip, seed=1)
  new = CountingEncoder(TextEncoder.from_pretrained(clip))
  assert new.fingerprint != old.fingerprint and new.source == old.source
  config = tiny.get_config()
  config.model.text_dim = old.embed_dim
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(root)
  config.text.encoder = str(clip)
  config.text.embeddings_dir = str(tmp_path / "store")
  train_source, _ = sources.make_sources(config)
  with pytest.raises(caption_store.CaptionStoreError,
                     match="embeds its captions differently"):
    sources.make_caption_tables(config, lambda: new, train_source)
  with pytest.raises(UserError, match="losing its embeddings by encoder"):
    _run(new, files, tmp_path / "store")
  rerun = _run(new, files, tmp_path / "store", overwrite=True)
  assert sum(new.calls) >= 2  # the old shards were not reused
  np.testing.assert_allclose(rerun.table, new.encode(
      json.loads((tmp_path / "store" / "texts.json").read_text())), atol=1e-6)


def test_a_process_that_stops_early_still_meets_the_others(encoder, tmp_path):
  """--max_shards on a multi-process job: a process with fewer shards to do
  than another must not leave the others waiting at the barrier."""
  captions = [f"caption {i} of a thermal image" for i in range(6)]
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl", [
      {"name": str(i), "captions": [c]} for i, c in enumerate(captions)])
  files, out, barriers = [("set", path)], tmp_path / "out", []
  # Shards 0, 2 for process 0 and 1 for process 1 (shard_size 2).
  for index in (1, 0):
    assert _run(CountingEncoder(encoder), files, out, shard_size=2,
                max_shards=1, process_index=index, process_count=2,
                barrier=lambda index=index: barriers.append(index)) is None
  assert barriers == [1, 0]  # both met it, the one that stopped too
  # A rerun finishes the rest and assembles.
  for index in (1, 0):
    store = _run(CountingEncoder(encoder), files, out, shard_size=2,
                 process_index=index, process_count=2, barrier=lambda: None)
  np.testing.assert_allclose(store.table, encoder.encode(captions), atol=1e-6)


def test_damaged_store_index_and_misnamed_source_file_are_named(tmp_path):
  from input_pipeline import caption_files  # pylint: disable=g-import-not-at-top
  from input_pipeline import caption_store  # pylint: disable=g-import-not-at-top
  table = np.eye(3, dtype=np.float32)
  for index, message in (({"set": {"a": [-1]}}, r"set/a has rows \[-1\]"),
                         ({"set": {"a": [3]}}, r"set/a has rows \[3\]"),
                         ({"set": ["a"]}, "expected")):
    caption_store.write_store(tmp_path / "store", table, index,
                              ["x", "y", "z"], {"encoder": "test"})
    with pytest.raises(caption_store.CaptionStoreError, match=message):
      caption_store.CaptionEmbeddings.load(tmp_path / "store")
  (tmp_path / "captions.jsonl").write_text("")
  (tmp_path / "captions_default.jsonl").write_text("")
  with pytest.raises(caption_files.UserError,
                     match=r"captions_default.jsonl: the 'default' caption "
                     "source is captions.jsonl"):
    caption_files.find_sources(tmp_path)


def test_source_names_may_hold_dashes_and_dots_and_bad_ones_are_named(
    tmp_path):
  """A captioning model's name (blip-2, v1.5) is a source; a captions_*
  file whose name is no source is refused by name, never skipped, and
  another captions*.jsonl is skipped with a warning naming it."""
  for name in ("captions.jsonl", "captions_blip-2.jsonl",
               "captions_v1.5.jsonl", "captions-old.jsonl"):
    (tmp_path / name).write_text("")
  with mock.patch.object(caption_files._log, "warning") as warning:
    assert caption_files.find_sources(tmp_path) == ["default", "blip-2",
                                                    "v1.5"]
    caption_files.find_sources(tmp_path)  # said once
  (message, path, suggested), _ = warning.call_args
  assert "is not read" in message and path.name == "captions-old.jsonl"
  assert suggested == "captions_old.jsonl" and warning.call_count == 1
  for name, suggested in (("captions-default.jsonl", "captions_NAME.jsonl"),
                          ("captions-a b.jsonl", "captions_NAME.jsonl")):
    (tmp_path / name).write_text("")
    with mock.patch.object(caption_files._log, "warning") as warning:
      caption_files.find_sources(tmp_path)
    assert warning.call_args[0][2] == suggested
    (tmp_path / name).unlink()
  assert caption_files.file_of("blip-2") == "captions_blip-2.jsonl"
  (tmp_path / "captions_a b.jsonl").write_text("")
  with pytest.raises(UserError, match=r"captions_a b.jsonl: not a caption "
                     "source name"):
    caption_files.find_sources(tmp_path)


def test_a_dataset_reached_through_a_symlink_keeps_the_links_name(
    encoder, tiny_dir, tmp_path):
  """Embedding and training both key a dataset by the folder name they are
  given: a store made through a symlink is read through it."""
  # pylint: disable=g-import-not-at-top
  from input_pipeline import sources
  from tests.test_train import _write_folder_dataset
  real = _write_folder_dataset(tmp_path / "real_name", "ab", 0)
  link = tmp_path / "link_name"
  link.symlink_to(real, target_is_directory=True)
  store = _run(encoder, [(None, link / "captions.jsonl")], tmp_path / "store")
  assert store.datasets() == ["link_name"]
  config = _folder_config_with_store(link, tmp_path / "store",
                                     tiny_dir, encoder)
  train_source, _ = sources.make_sources(config)
  table, _, _ = sources.make_caption_tables(config, lambda: encoder,
                                            train_source, train_source)
  assert len(table.rows) == 2
  # '.' inside the path is worked out; the key is still the link's name.
  assert caption_files.dataset_key(link / ".") == "link_name"
  assert caption_files.default_dataset(link / "captions.jsonl") == "link_name"


def test_distributed_outside_a_detected_job_is_one_line(tmp_path):
  """--distributed where JAX detects no job (it was a ValueError traceback)."""
  out = _cli("--encoder", str(tmp_path / "none"), "--captions",
             str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "store"),
             "--distributed")
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --distributed: JAX detected no multi-process job"), out.stderr
  assert not (tmp_path / "store").exists()


def test_out_that_is_a_file_or_another_folder_is_refused(encoder, tmp_path):
  """--out used to overwrite a bundle's manifest.json, and a file was a
  NotADirectoryError traceback. A store (or an interrupted one) is fine."""
  files = [(None, _write_jsonl(tmp_path / "set" / "captions.jsonl",
                               [{"name": "a", "captions": ["x"]}]))]
  (tmp_path / "notes.json").write_text("{}")
  with pytest.raises(UserError, match=r"notes.json is a file; give a folder "
                     "for the caption store"):
    _run(encoder, files, tmp_path / "notes.json")
  other = tmp_path / "bundle"
  other.mkdir()
  (other / "manifest.json").write_text("{}")
  (other / "params.safetensors").write_text("")
  with pytest.raises(UserError, match=r"holds files that are not a "
                     r"caption store's \(params.safetensors\)"):
    _run(encoder, files, other)
  assert (other / "manifest.json").read_text() == "{}"
  _run(encoder, files, tmp_path / "store")
  assert _run(encoder, files, tmp_path / "store").rows("set", "a") == [0]


def test_tiny_clip_writes_only_a_new_empty_or_clip_folder(tmp_path):
  root = Path(__file__).resolve().parents[1]

  def tiny_clip(out):
    return subprocess.run(
        [sys.executable, "-m", "textfusion_jax.text.tiny_clip", str(out)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)})

  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  (run / "run_info.json").write_text("{}")
  (tmp_path / "f.json").write_text("{}")
  for out, expected in ((run, "holds files that are not a CLIP text "
                         "model's (run_info.json)"),
                        (tmp_path / "f.json", "is a file")):
    proc = tiny_clip(out)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
  assert (run / "config.json").read_text() == "{}"

  # Another CLIP model there (real weights, say) is replaced only with
  # --overwrite; a rerun of the same command keeps the folder as it is.
  clip = tmp_path / "clip"
  assert tiny_clip(clip).returncode == 0
  weights = (clip / "model.safetensors").read_bytes()
  inode = (clip / "model.safetensors").stat().st_ino
  assert tiny_clip(clip).returncode == 0
  assert (clip / "model.safetensors").stat().st_ino == inode

  def seed_5(*extra):
    return subprocess.run(
        [sys.executable, "-m", "textfusion_jax.text.tiny_clip", str(clip),
         "--seed", "5", *extra], cwd=root, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(root)})

  proc = seed_5()
  assert proc.returncode == 2 and "already holds another CLIP text model; " \
      "pass --overwrite" in proc.stderr, proc.stderr
  assert (clip / "model.safetensors").read_bytes() == weights
  proc = seed_5("--overwrite")
  assert proc.returncode == 0, proc.stderr
  assert (clip / "model.safetensors").read_bytes() != weights
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
  (tmp_path / "manifest.json").write_text("{}")
  bundle_text = tmp_path / "text_encoder"
  proc = tiny_clip(bundle_text)
  assert proc.returncode == 2 and "which holds a manifest.json (a model bundle" \
      in proc.stderr, proc.stderr


def test_a_store_is_replaced_only_with_overwrite_when_it_would_lose(
    encoder, tmp_path):
  a = _write_jsonl(tmp_path / "a" / "captions.jsonl",
                   [{"name": "1", "captions": ["a red car"]}])
  b = _write_jsonl(tmp_path / "b" / "captions.jsonl",
                   [{"name": "1", "captions": ["two people"]}])
  out = tmp_path / "store"
  _run(encoder, [("a", a), ("b", b)], out)
  with pytest.raises(UserError, match=r"would replace, losing dataset\(s\) "
                     r"b, not in this run's caption files; pass --overwrite"):
    _run(encoder, [("a", a)], out)
  other = TextEncoder.tiny_random(7)
  with pytest.raises(UserError, match=r"losing its embeddings by encoder "):
    _run(other, [("a", a), ("b", b)], out)
  assert CaptionEmbeddings.load(out).datasets() == ["a", "b"]
  # Changed captions of the same datasets update it without the flag.
  _write_jsonl(a, [{"name": "1", "captions": ["a blue car"]}])
  assert _run(encoder, [("a", a), ("b", b)], out).datasets() == ["a", "b"]
  assert _run(encoder, [("a", a)], out, overwrite=True).datasets() == ["a"]


def test_cli_embeds_with_the_configs_tiny_random_encoder(tmp_path):
  """The encoder name training's errors suggest (config.text.encoder's
  default) works here too, and matches what training embeds."""
  path = _write_jsonl(tmp_path / "set" / "captions.jsonl",
                      [{"name": "a", "captions": ["a red car"]}])
  proc = _cli("--encoder", "tiny-random", f"--captions={path}", "--out",
              str(tmp_path / "store"))
  assert proc.returncode == 0, proc.stderr
  store = CaptionEmbeddings.load(tmp_path / "store")
  expected = TextEncoder.tiny_random(0).encode(["a red car"])
  np.testing.assert_allclose(store.lookup("set", "a", 0), expected[0],
                             atol=1e-5)
