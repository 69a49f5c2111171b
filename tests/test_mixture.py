"""Weighted mixtures of datasets: sampling, exact resume, per-dataset eval,
bad input."""

import io
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from input_pipeline import create_datasets
from input_pipeline import datasets
from input_pipeline import image_io
from input_pipeline import pipeline
from input_pipeline import sources
from input_pipeline.captions import CaptionTable
from input_pipeline.errors import UserError
from tests.test_train import _write_folder_dataset
from textfusion_jax import train_loop
from textfusion_jax.text import encoder as text_encoder


def _with_generated_captions(folder: Path, names: str) -> Path:
  """Adds the caption source 'gen' (captions_gen.jsonl, 2 per pair)."""
  (folder / "captions_gen.jsonl").write_text("".join(
      json.dumps({"name": n, "captions": [f"generated {n} a",
                                          f"generated {n} b"]}) + "\n"
      for n in names))
  return folder


def _tfds_dataset(folder: Path, data_dir: Path, config_name: str,
                  names: str, seed: int) -> str:
  """A 'folders' build with train/test splits and two caption sources."""
  _with_generated_captions(_write_folder_dataset(folder, names, seed), names)
  (folder / "splits.json").write_text(json.dumps(
      {"train": list(names[:-2]), "test": list(names[-2:])}))
  datasets.build(config_name, manual_dir=folder, data_dir=data_dir)
  return f"tfds:ivf_pairs/{config_name}"


@pytest.fixture(scope="module")
def mixture_config(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixture")
  data_dir = root / "tfds"
  big = _tfds_dataset(root / "a", data_dir, "folders", "abcdefghij", 0)
  small = _with_generated_captions(
      _write_folder_dataset(root / "msrs", "pqrs", 1), "pqrs")
  config = tiny.get_config()
  config.data.source = "mixture"
  config.data.mixture = ((big, 3.0), (str(small), 1.0))
  config.data.tfds_data_dir = str(data_dir)
  config.data.caption_sources = (("default", 1.0), ("gen", 3.0))
  config.data.caption_sampling = "weighted"
  config.data.eval_dir = str(_write_folder_dataset(root / "held", "xy", 2))
  config.train.batch_size = 4
  config.eval.batch_size = 1
  config.eval.pad_multiple = 32
  return config


def _datasets(config):
  return create_datasets(config, lambda: text_encoder.from_config(config.text))



def test_builds_and_folders_keep_every_caption_source(mixture_config):
  data_dir = mixture_config.data.tfds_data_dir
  record = datasets.RecordSource(datasets.load_source("folders", "train",
                                                      data_dir))[0]
  assert record["caption_sources"] == ["default", "gen", "gen"]
  name = record["name"]
  assert record["captions"] == [f"scene {name}", f"generated {name} a",
                                f"generated {name} b"]
  folder = datasets.PairedFolderSource(mixture_config.data.mixture[1][0])
  assert folder.caption_sources(0) == ["default", "gen", "gen"]


def test_captions_are_drawn_by_source_weight():
  table = CaptionTable(np.eye(4, dtype=np.float32),
                       (np.array([0, 1, 2]), np.array([3])))
  table = table.select_sources([["default", "gen", "gen"], ["gen"]],
                               [("default", 1.0), ("gen", 3.0)], True,
                               lambda i: f"d/{i}")
  np.testing.assert_allclose(table.caption_probabilities(0),
                             [0.25, 0.375, 0.375])
  np.testing.assert_allclose(table.caption_probabilities(1), [1.0])
  draws = [pipeline.sample_caption_index(0, epoch, 0, 3,
                                         table.caption_probabilities(0))
           for epoch in range(2000)]
  assert abs(np.mean(np.array(draws) == 0) - 0.25) < 0.03
  uniform = CaptionTable(np.eye(4, dtype=np.float32),
                         (np.array([0, 1, 2]), np.array([3])))
  assert uniform.caption_probabilities(0) is None


def test_mixture_samples_by_weight_and_resumes_exactly(mixture_config):
  """Two datasets (TFDS and a folder) at 3:1, each with two caption
  sources drawn 1:3."""
  inputs = _datasets(mixture_config)
  stream = inputs.train_iter_at(0)
  batches = [next(stream) for _ in range(60)]
  index = np.concatenate([b["record_index"] for b in batches])
  # ConcatSource order: the 8 training records of 'folders', then 'msrs'.
  share = np.mean(index < 8)
  assert 0.68 <= share <= 0.82, share  # weights 3:1
  assert set(index[index >= 8]) == {8, 9, 10, 11}
  # Caption 0 is the 'default' source's; 1 and 2 are 'gen' (weight 3 of 4).
  captions = np.concatenate([b["caption_index"] for b in batches])
  assert 0.65 <= np.mean(captions > 0) <= 0.85
  resumed = inputs.train_iter_at(37)
  for expected in batches[37:41]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_weight_zero_drops_a_source(mixture_config):
  config = mixture_config.copy_and_resolve_references()
  config.data.mixture = (config.data.mixture[0][0], 1.0), (
      config.data.mixture[1][0], 0)
  stream = _datasets(config).train_iter_at(0)
  index = np.concatenate([next(stream)["record_index"] for _ in range(10)])
  assert index.max() < 8


def test_each_dataset_is_evaluated_apart(mixture_config, tmp_path):
  config = mixture_config.copy_and_resolve_references()
  config.train.num_steps = 2
  train_loop.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "eval" / "2" / "metrics.json").read_text())
  per = saved["per_dataset"]
  # The TFDS source's test split and the eval_dir folder.
  assert {k: v["num_images"] for k, v in per.items()} == {"folders": 2,
                                                         "held": 2}
  assert saved["num_images"] == 4
  for method in ("model", "copy_vis"):
    mean = np.mean([per[d][method]["EN"] for d in per])
    assert saved[method]["EN"] == pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize("weight, message", [
    (-1.0, "weight -1.0 must be a finite number >= 0"),
    (float("nan"), "weight nan must be a finite number >= 0"),
    ("3", "weight '3' must be a finite number >= 0"),
])
def test_bad_weights_name_the_source(weight, message):
  with pytest.raises(UserError, match=r"config.data.mixture: /data/msrs: " +
                     message.replace("(", r"\(")):
    sources.check_mixture((("tfds:ivf_pairs/llvip", 1.0),
                           ("/data/msrs", weight)))
  with pytest.raises(UserError, match="every weight is 0"):
    sources.check_mixture((("/data/msrs", 0),))


def test_a_missing_caption_source_names_the_dataset(mixture_config):
  config = mixture_config.copy_and_resolve_references()
  config.data.caption_sources = (("default", 1.0), ("blip", 1.0))
  with pytest.raises(UserError, match=r"config.data.caption_sources: folders "
                     r"has no caption source 'blip' \(its sources: default, "
                     r"gen\)"):
    _datasets(config)
  config.data.caption_sources = (("gen", -2),)
  with pytest.raises(UserError, match="gen: weight -2 must be"):
    _datasets(config)


def test_missing_folder_and_mismatched_sources_give_one_line(mixture_config,
                                                             tmp_path):
  config = mixture_config.copy_and_resolve_references()
  config.data.mixture = ((str(tmp_path / "nowhere"), 1.0),)
  with pytest.raises(UserError, match=r"nowhere: no such folder"):
    _datasets(config)
  config.data.mixture = (("tfds:ivf_pairs/folders", 1.0),)
  config.data.tfds_data_dir = ""
  with pytest.raises(UserError, match=r"tfds:ivf_pairs/folders: no data dir"):
    _datasets(config)
  grey = {"ir": np.zeros((4, 4, 1), np.uint8), "vis": np.zeros((4, 4, 3),
                                                               np.uint8)}
  with pytest.raises(UserError, match="b has vis channels 1 but a has 3"):
    sources.check_compatible([("a", [grey]), ("b", [dict(grey, vis=grey["ir"])])])
  with pytest.raises(UserError, match="b has text dimension 8 but a has 4"):
    sources.check_compatible([
        ("a", [dict(grey, text_emb=np.zeros((1, 4)))]),
        ("b", [dict(grey, text_emb=np.zeros((2, 8)))])])


def test_a_folder_with_splits_is_evaluated_on_its_eval_split(tmp_path):
  """eval_dir used to be read at its 'train' split: the model was scored on
  the pairs it trained on, and the test pairs were never used."""
  folder = _write_folder_dataset(tmp_path / "d", "abcdef", 0)
  (folder / "splits.json").write_text(json.dumps(
      {"train": list("abcd"), "test": ["e", "f"]}))
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = str(folder)
  train, evaluation = sources.make_sources(config)
  assert [train.dataset_and_name(i)[1] for i in range(len(train))] == list(
      "abcd")
  assert [evaluation.dataset_and_name(i)[1]
          for i in range(len(evaluation))] == ["e", "f"]
  config.data.eval_split = "val"
  with pytest.raises(UserError, match=r"d: no split 'val'; splits: test, "
                     "train"):
    sources.make_sources(config)


def test_a_slice_of_undivided_folders_holds_out_the_rest(tmp_path):
  """train_split 'train[:80%]' and eval_split 'train[80%:]' divide folders
  that have no splits.json (configs/real_pairs_degraded_validation.py);
  before, an undivided folder was read whole at any split, so every
  validation pair was trained on."""
  a = _write_folder_dataset(tmp_path / "a", "abcdefghij", 0)
  b = _write_folder_dataset(tmp_path / "b", "klmno", 1)
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = config.data.eval_dir = f"{a},{b}"
  config.data.train_split = "train[:80%]"
  config.data.eval_split = "train[80%:]"
  names = lambda source: [source.dataset_and_name(i)
                          for i in range(len(source))]
  said = []
  with mock.patch.object(sources._log, "warning",
                         lambda *args: said.append(args)):
    train, evaluation = sources.make_sources(config)
    assert names(train) == ([("a", n) for n in "abcdefgh"] +
                            [("b", n) for n in "klmn"])
    assert names(evaluation) == [("a", "i"), ("a", "j"), ("b", "o")]
    assert not said
    # Overlapping slices: each folder's shared pairs are counted.
    config.data.eval_split = "train[-3:]"
    sources.make_sources(config)
    assert [(args[1], args[2]) for args in said] == [("a", 1), ("b", 2)]
    assert "not held out" in said[0][0]
    # A split an undivided folder does not slice reads it whole, as before.
    config.data.eval_split = "test"
    assert len(sources.make_sources(config)[1]) == 15
  for bad, message in (("train[:80%", r"a: split 'train\[:80%': Error "
                        "parsing split"),
                       ("train[:20]", r"a: split 'train\[:20\]': Requested "
                        r"slice \[:20\] incompatible with 10 examples"),
                       ("train[:1shard]", r"a: split 'train\[:1shard\]': "),
                       ("train[5:2]", r"a: split 'train\[5:2\]' selects no "
                        r"pairs \(splits: train 10\)"),
                       ("val[:5]", None)):
    config.data.eval_split = bad
    if message is None:  # not a slice of 'train': the folder is read whole
      assert len(sources.make_sources(config)[1]) == 15
      continue
    with pytest.raises(UserError, match=message) as raised:
      sources.make_sources(config)
    assert "\n" not in str(raised.value)


def test_a_mixture_slices_its_tfds_data_not_its_eval_folders(tmp_path):
  """eval_split slices a mixture's TFDS sources; its eval_dir is held out
  whole, as before folders could be sliced."""
  held = _write_folder_dataset(tmp_path / "held", "abcde", 0)
  config = tiny.get_config()
  config.data.source = "mixture"
  config.data.mixture = ((str(_write_folder_dataset(tmp_path / "t", "xy",
                                                    1)), 1.0),)
  config.data.eval_dir = str(held)
  config.data.train_split = "train[:90%]"
  config.data.eval_split = "train[90%:]"
  assert len(sources.make_sources(config)[1]) == 5


def test_the_validation_config_holds_out_a_fifth_of_each_folder(shared_dir):
  """configs/real_pairs_degraded_validation.py: 80 pairs to train both
  stages on, 20 others to choose changes on; TNO in neither."""
  del shared_dir
  from configs import real_pairs_degraded_validation as validation  # pylint: disable=g-import-not-at-top
  names = lambda source: {source.dataset_and_name(i)
                          for i in range(len(source))}
  for stage in ("stage1", "refine"):
    config = validation.get_config(stage)
    train, evaluation = sources.make_sources(config)
    assert (len(train), len(evaluation)) == (80, 20)
    assert not names(train) & names(evaluation)
    assert {d for d, _ in names(train) | names(evaluation)} == {
        "llvip", "msrs", "roadscene"}
  assert config.train.init_from == validation.FIRST_STAGE
  assert config.loss.reference > 0
  with pytest.raises(ValueError, match=r"^real_pairs_degraded_validation.py:"
                     "stage2: no such stage; use stage1 or refine$"):
    validation.get_config("stage2")


def test_training_on_a_folder_named_tno_is_warned(tmp_path):
  """TNO is the held-out test set; training on it was noticed only when the
  same folder was also the eval folder."""
  tno = _write_folder_dataset(tmp_path / "TNO_Image_Fusion", "ab", 0)
  other = _write_folder_dataset(tmp_path / "tnoise", "cd", 1)
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.eval_dir = str(_write_folder_dataset(tmp_path / "e", "ef", 2))
  said = []
  with mock.patch.object(sources._log, "warning",
                         lambda *args: said.append(args)):
    config.data.train_dir = str(other)
    sources.make_sources(config)
    assert not said  # 'tnoise' is no TNO
    config.data.train_dir = f"{other},{tno}"
    sources.make_sources(config)
    config.data.source = "mixture"
    config.data.train_dir = ""
    config.data.mixture = ((str(other), 1.0), (str(tno), 1.0))
    sources.make_sources(config)
  assert [args[1] for args in said] == [str(tno)] * 2
  assert "held-out test set" in said[0][0]
  # TFDS builds by dataset or config name, not by their data_dir.
  for spec, named in (("tfds:ivf_pairs/tno@/data/tfds", True),
                      ("tfds:ivf_pairs/tno/2.0.0", True),
                      ("tfds:ivf_pairs/llvip@/data/TNO", False),
                      ("data/tno", True), ("tfds:tnoise", False)):
    assert sources._names_tno(spec) == named, spec  # pylint: disable=protected-access


def test_mixture_fields_outside_a_mixture_and_tiny_weights_are_refused():
  config = tiny.get_config()
  config.data.mixture = (("/data/msrs", 1.0),)
  with pytest.raises(UserError, match=r"config.data.mixture is set but "
                     r"config.data.source='synthetic': a mixture is read "
                     r"only with config.data.source='mixture'"):
    train_loop.check_config(config)
  # grain scales weights to integers by the smallest: 1e-310 overflowed.
  with pytest.raises(UserError, match=r"/data/tno: weight 1e-310 is under "
                     r"1e-9 of the largest \(1.0\); give 0 to drop it"):
    sources.check_mixture((("/data/msrs", 1.0), ("/data/tno", 1e-310)))


def test_shuffled_captions_need_two_pairs_on_each_side(tmp_path):
  """A 1-pair eval folder trained to the end, then failed with a traceback
  at the final evaluation."""
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = str(_write_folder_dataset(tmp_path / "t", "abc", 0))
  config.data.eval_dir = str(_write_folder_dataset(tmp_path / "e", "p", 1))
  config.data.shuffle_captions_across_pairs = True
  with pytest.raises(UserError, match=r"shuffle_captions_across_pairs needs "
                     r"at least 2 eval pairs .* the eval data has 1$"):
    _datasets(config)


def test_eval_records_of_one_name_are_refused():
  """'train+test' of a build whose splits reuse stems: the second record's
  results and image replaced the first's."""
  records = [{"vis": np.zeros((8, 8, 3), np.uint8),
              "ir": np.zeros((8, 8, 1), np.uint8), "name": name,
              "captions": ["x"]} for name in ("1", "2", "1")]
  table = CaptionTable(embeddings=np.zeros((1, 4), np.float32),
                       rows=(np.zeros(1, np.int32),) * 3)
  with pytest.raises(UserError, match=r"eval record 2 is named '1' like an "
                     r"earlier one"):
    list(pipeline.make_eval_batches(records, batch_size=2,
                                    caption_table=table))


class _BakedPart(list):
  def captions(self, index):
    return self[index]["captions"]

  def record_name(self, index):
    return self[index]["name"]


class _Encoder:
  embed_dim = 4

  def __init__(self, sign):
    self.sign = sign

  def encode(self, texts, batch_size):
    del batch_size
    return np.stack([self.sign * np.array([len(t), 1.0, 2.0, 3.0],
                                          np.float32) for t in texts])


def test_a_mixture_part_embedded_by_another_encoder_is_embedded_again(
    caplog):
  """Only the first record of the whole mixture was compared: the second
  build's records kept another encoder's embeddings without a word."""
  ours, other = _Encoder(1.0), _Encoder(-1.0)

  def part(encoder, names):
    return _BakedPart({"name": n, "captions": [f"scene {n}"],
                       "text_emb": encoder.encode([f"scene {n}"], 1),
                       "vis": np.zeros((8, 8, 3), np.uint8),
                       "ir": np.zeros((8, 8, 1), np.uint8)} for n in names)

  mixed = sources.ConcatSource([("a", part(ours, "12")),
                                ("b", part(other, "34"))])
  assert sources._baked_table(mixed, ours) is None  # pylint: disable=protected-access
  assert "embeddings of b were made by another text encoder" in caplog.text


def test_baked_embeddings_are_read_without_decoding_cached_images():
  """With cache_in_memory, reading a mixture's baked embeddings went through
  the cache: every image was decoded (and kept) at startup."""
  ours = _Encoder(1.0)
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
  png = buffer.getvalue()
  decoded = []

  class CountedImage(image_io.EncodedImage):
    def __array__(self, *args, **kwargs):
      decoded.append(1)
      return super().__array__(*args, **kwargs)

  part = _BakedPart({"name": n, "captions": [f"scene {n}"],
                     "text_emb": ours.encode([f"scene {n}"], 1),
                     "vis": CountedImage(png, 3),
                     "ir": np.zeros((8, 8, 1), np.uint8)} for n in "1234")
  cached = sources.CachedSource(sources.ConcatSource([("a", part)]))
  config = tiny.get_config()
  config.model.text_dim = 4
  table, dim = sources.make_caption_tables(config, lambda: ours, cached)
  assert dim == 4 and len(table.rows) == 4
  assert not decoded
  assert cached[0]["vis"].shape == (8, 8, 3) and decoded  # (the cache works)


def test_the_data_fingerprint_covers_mixtures_and_short_tfds_names(
    mixture_config, tmp_path):
  """A mixture's fingerprint hashed only its config (rewriting every image
  left it unchanged), and a TFDS config given by its short name hashed no
  file at all (the empty hash)."""
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  config = mixture_config.copy_and_resolve_references()
  extra = _write_folder_dataset(tmp_path / "extra", "uv", 3)
  config.data.mixture = (config.data.mixture[0], (str(extra), 1.0))
  first = run_record.data_fingerprint(config)
  assert str(extra) in first["roots"] and first["files"] > 5
  (extra / "captions.jsonl").write_text("{}\n")
  assert run_record.data_fingerprint(config)["sha256"] != first["sha256"]
  config.data.source = "tfds"
  config.data.tfds_name = "folders"
  short = run_record.data_fingerprint(config)
  config.data.tfds_name = "ivf_pairs/folders"
  assert run_record.data_fingerprint(config) == short
  assert short["files"] > 0


@pytest.mark.parametrize("captions, caption_sources", [
    ([], ()), (["scene b"], (("gen", 1),))])
def test_a_tfds_record_without_captions_is_named_by_its_stem(
    captions, caption_sources):
  """A build's record was named 'record 1', which the user cannot find."""
  records = [{"name": "0001", "captions": ["scene a", "gen a"],
              "caption_sources": ["default", "gen"]},
             {"name": "0002", "captions": captions,
              "caption_sources": ["default"] * len(captions)}]
  for record in records:  # (images are not read here)
    record.update(ir=b"", vis=b"", text_emb_dim=0, text_emb_flat=[])
  config = tiny.get_config()
  config.model.text_dim = 4
  config.data.caption_sources = caption_sources
  with pytest.raises(UserError, match=r"record 1 \('0002'\) has no captions"):
    sources.make_caption_tables(config, lambda: _Encoder(1.0),
                                datasets.RecordSource(records))
