"""Tests of the grain training/eval pipelines and the caption table."""

import hashlib
import itertools

import grain
import jax
import numpy as np
import pytest
from etils import epath

from input_pipeline import pipeline
from input_pipeline.captions import CaptionTable, derangement
from input_pipeline.synthetic import SyntheticPairs

_DIM = 8


def _embed(texts):
  """Deterministic stand-in text encoder: a hash-seeded vector per text."""
  return np.stack([np.random.default_rng(
      list(hashlib.sha256(t.encode()).digest()[:8])).standard_normal(_DIM)
                   for t in texts]).astype(np.float32)


def _take(dataset, n):
  iterator = iter(dataset)
  try:
    return list(itertools.islice(iterator, n))
  finally:
    iterator.close()


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _PairedSource:
  """Records whose ir / vis_clean are derived from vis pixel by pixel, with
  sizes below and above the crop size."""

  def __init__(self, sizes):
    rng = np.random.default_rng(0)
    self.records = []
    for i, (h, w) in enumerate(sizes):
      vis = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      self.records.append({"name": f"r{i}", "vis": vis, "ir": vis[..., :1],
                           "vis_clean": 255 - vis,
                           "captions": [f"caption {i} a", f"caption {i} b"]})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.fixture(scope="module")
def synthetic_source():
  return SyntheticPairs(12, 40, 48, seed=0)


@pytest.fixture(scope="module")
def synthetic_table(synthetic_source):
  return CaptionTable.from_source(synthetic_source, _embed)


def _train(source, table, **kwargs):
  options = dict(global_batch_size=4, crop_size=32, seed=3,
                 caption_table=table, shard_by_process=False)
  options.update(kwargs)
  return pipeline.make_train_dataset(source, **options)


def test_caption_table_dedups_and_maps_records():
  calls = []

  def embed(texts):
    calls.append(list(texts))
    return _embed(texts)

  captions = [["a dark road", "noisy"], ["noisy", "a person"], ["a dark road"]]
  table = CaptionTable.from_captions(captions, embed, chunk_size=2)
  assert sorted(itertools.chain(*calls)) == ["a dark road", "a person",
                                             "noisy"]
  assert table.embeddings.shape == (3, _DIM) and len(table) == 3
  for r, texts in enumerate(captions):
    assert table.num_captions(r) == len(texts)
    for c, text in enumerate(texts):
      assert table.text(r, c) == text
      np.testing.assert_array_equal(table.embedding(r, c), _embed([text])[0])


def test_caption_table_statistics_weight_every_record_caption():
  # Record 0 uses row 'a' twice; statistics count it twice (as sampling does).
  table = CaptionTable.from_captions([["a", "a"], ["b"]], lambda texts: np.array(
      [[1.0, 4.0] if t == "a" else [4.0, 4.0] for t in texts], np.float32))
  mean, std = table.statistics()
  np.testing.assert_allclose(mean, [2.0, 4.0])
  np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0])


def test_caption_table_from_precomputed_record_embeddings():
  records = [{"text_emb": np.full((k, 4), r, np.float32)}
             for r, k in enumerate((2, 3, 1))]
  table = CaptionTable.from_source(records)
  assert [table.num_captions(r) for r in range(3)] == [2, 3, 1]
  np.testing.assert_array_equal(table.embedding(1, 2), np.full(4, 1.0))
  assert table.text(0, 0) is None


def test_caption_table_from_synthetic_source_uses_all_captions(
    synthetic_source, synthetic_table):
  for r in range(len(synthetic_source)):
    texts = synthetic_source[r]["captions"]
    assert [synthetic_table.text(r, c) for c in range(len(texts))] == texts


def test_train_batch_format(synthetic_source, synthetic_table):
  batches = _take(_train(synthetic_source, synthetic_table), 3)
  for batch in batches:
    assert set(batch) == {"vis", "ir", "vis_clean", "text_emb",
                          "caption_index", "record_index"}
    assert batch["vis"].shape == batch["vis_clean"].shape == (4, 32, 32, 3)
    assert batch["ir"].shape == (4, 32, 32, 1)
    assert batch["text_emb"].shape == (4, _DIM)
    for key in ("vis", "ir", "vis_clean", "text_emb"):
      assert batch[key].dtype == np.float32
    for key in ("vis", "ir", "vis_clean"):
      assert 0 <= batch[key].min() and batch[key].max() <= 1
    assert batch["caption_index"].dtype == batch["record_index"].dtype == (
        np.int32)
    for r, c, emb in zip(batch["record_index"], batch["caption_index"],
                         batch["text_emb"]):
      np.testing.assert_array_equal(emb, synthetic_table.embedding(r, c))


def _find_window(image, crop):
  """(top, left, flipped) of `crop` in `image`, or None."""
  size = crop.shape[0]
  for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
    for top in range(image.shape[0] - size + 1):
      for left in range(image.shape[1] - size + 1):
        if np.array_equal(image[top:top + size, left:left + size], candidate):
          return top, left, flipped
  return None


def test_crops_are_paired_and_reflection_padded():
  source = _PairedSource([(20, 28), (40, 50), (32, 45), (50, 40)] * 2)
  table = CaptionTable.from_source(source, _embed)
  flips, windows = set(), set()
  for batch in _take(_train(source, table, crop_size=32), 8):
    vis = np.rint(batch["vis"] * 255)
    np.testing.assert_array_equal(np.rint(batch["ir"] * 255), vis[..., :1])
    np.testing.assert_array_equal(np.rint(batch["vis_clean"] * 255),
                                  255 - vis)
    for r, crop in zip(batch["record_index"], vis.astype(np.uint8)):
      image = source[r]["vis"]
      h, w = image.shape[:2]
      pad_h, pad_w = max(0, 32 - h), max(0, 32 - w)
      padded = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2),
                              (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
                      mode="reflect")
      found = _find_window(padded, crop)
      assert found is not None, f"crop of record {r} is not a window"
      windows.add((int(r), found[:2]))
      flips.add(found[2])
  assert flips == {False, True}
  assert len(windows) > 12  # windows vary across epochs and records


def test_epochs_reshuffle_and_resample_captions(synthetic_source,
                                                synthetic_table):
  n, epochs = len(synthetic_source), 8
  batches = _take(_train(synthetic_source, synthetic_table), n * epochs // 4)
  records = np.concatenate([b["record_index"] for b in batches])
  captions = np.concatenate([b["caption_index"] for b in batches])
  orders = records.reshape(epochs, n)
  for order in orders:  # every epoch visits every record once
    assert sorted(order) == list(range(n))
  assert len({tuple(o) for o in orders}) == epochs
  per_record = {r: set() for r in range(n)}
  for position, (r, c) in enumerate(zip(records, captions)):
    epoch = position // n
    assert c == pipeline.sample_caption_index(3, epoch, r, 3)
    per_record[r].add(int(c))
  assert all(len(seen) >= 2 for seen in per_record.values())


def test_seed_changes_the_stream(synthetic_source, synthetic_table):
  a = _take(_train(synthetic_source, synthetic_table, seed=1), 3)
  b = _take(_train(synthetic_source, synthetic_table, seed=2), 3)
  assert not all(np.array_equal(x["record_index"], y["record_index"])
                 for x, y in zip(a, b))


def test_default_sharding_follows_jax_processes(synthetic_source,
                                                synthetic_table):
  assert jax.process_count() == 1
  default = _take(_train(synthetic_source, synthetic_table,
                         shard_by_process=True), 2)
  for a, b in zip(default, _take(_train(synthetic_source, synthetic_table), 2)):
    _assert_batches_equal(a, b)


def test_process_shards_partition_the_global_batch(synthetic_source,
                                                   synthetic_table):
  steps = 5
  whole = _take(_train(synthetic_source, synthetic_table,
                       global_batch_size=8), steps)
  shards = [_take(_train(synthetic_source, synthetic_table,
                         global_batch_size=8,
                         shard_options=grain.sharding.ShardOptions(p, 2)),
                  steps) for p in range(2)]
  for step in range(steps):
    for p in range(2):
      part = shards[p][step]
      assert part["vis"].shape[0] == 4
      # Process p holds global positions p, p + 2, ... of the step's batch.
      _assert_batches_equal(part, {k: v[p::2] for k, v in whole[step].items()})
  with pytest.raises(ValueError, match="divisible"):
    _train(synthetic_source, synthetic_table, global_batch_size=6,
           shard_options=grain.sharding.ShardOptions(0, 4))


def test_shuffle_captions_across_pairs(synthetic_source, synthetic_table):
  n = len(synthetic_source)
  perm = derangement(n, 0)
  assert sorted(perm) == list(range(n)) and np.all(perm != np.arange(n))
  assert not np.array_equal(perm, derangement(n, 1))
  plain = _take(_train(synthetic_source, synthetic_table), 6)
  ablated = _take(_train(synthetic_source, synthetic_table,
                         shuffle_captions_across_pairs=True), 6)
  mismatched = 0
  for a, b in zip(plain, ablated):
    # Same images, records and caption choices; only the captions' owner
    # changes.
    for key in ("vis", "ir", "vis_clean", "record_index", "caption_index"):
      np.testing.assert_array_equal(a[key], b[key])
    for r, c, emb in zip(b["record_index"], b["caption_index"], b["text_emb"]):
      np.testing.assert_array_equal(emb,
                                    synthetic_table.embedding(perm[r], c))
      mismatched += not np.array_equal(emb, synthetic_table.embedding(r, c))
  assert mismatched == 6 * 4


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_checkpoint_is_exact(synthetic_source, synthetic_table,
                                         worker_count, tmp_path):
  def make():
    return _train(synthetic_source, synthetic_table, worker_count=worker_count)

  handler = grain.checkpoint.CheckpointHandler()
  iterator = iter(make())
  for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
    next(iterator)
  handler.save(epath.Path(tmp_path), item=iterator)
  expected = [next(iterator) for _ in range(4)]
  iterator.close()
  assert not np.array_equal(expected[0]["vis"], expected[1]["vis"])

  restored = handler.restore(epath.Path(tmp_path), item=iter(make()))
  try:
    for want in expected:
      _assert_batches_equal(next(restored), want)
  finally:
    restored.close()


def _tfds_like_record(i, h, w):
  """A record as tfds.data_source returns it: bytes strings, 2-D ir."""
  rng = np.random.default_rng(i)
  return {"name": f"img{i}".encode(),
          "vis": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          "ir": rng.integers(0, 256, (h, w), dtype=np.uint8),
          "captions": np.array([f"rec {i} first".encode(),
                                f"rec {i} second".encode()], dtype=object)}


def test_eval_batches_group_sizes_and_pad():
  sizes = [(32, 40), (24, 24), (32, 40), (32, 40), (40, 32), (32, 40),
           (24, 24), (32, 40)]
  source = [_tfds_like_record(i, h, w) for i, (h, w) in enumerate(sizes)]
  table = CaptionTable.from_source(source, _embed)
  batches = list(pipeline.make_eval_batches(source, batch_size=3,
                                            caption_table=table,
                                            caption_index=3))
  got = [(b["vis"].shape[1:3], list(b["record_index"]), list(b["valid"]))
         for b in batches]
  # Full batches as they fill up, then the partial ones by first record.
  assert got == [
      ((32, 40), [0, 2, 3], [True] * 3),
      ((24, 24), [1, 6, -1], [True, True, False]),
      ((40, 32), [4, -1, -1], [True, False, False]),
      ((32, 40), [5, 7, -1], [True, True, False]),
  ]
  for batch in batches:
    b = len(batch["valid"])
    assert batch["ir"].shape == batch["vis"].shape[:3] + (1,)
    assert batch["text_emb"].shape == (b, _DIM)
    assert batch["vis"].dtype == np.float32 and "vis_clean" not in batch
    for row, (r, ok) in enumerate(zip(batch["record_index"], batch["valid"])):
      if not ok:
        assert batch["name"][row] == "" and not batch["vis"][row].any()
        continue
      assert batch["name"][row] == f"img{r}"
      np.testing.assert_array_equal(np.rint(batch["vis"][row] * 255),
                                    source[r]["vis"])
      np.testing.assert_array_equal(np.rint(batch["ir"][row, ..., 0] * 255),
                                    source[r]["ir"])
      # Caption 3 of a 2-caption record wraps to caption 1.
      assert batch["caption_index"][row] == 1
      np.testing.assert_array_equal(batch["text_emb"][row],
                                    _embed([f"rec {r} second"])[0])
  first = list(pipeline.make_eval_batches(source, batch_size=3,
                                          caption_table=table, max_records=2))
  assert sorted(r for b in first for r in b["record_index"] if r >= 0) == [0,
                                                                           1]


def test_eval_batches_with_shuffled_captions(synthetic_source,
                                             synthetic_table):
  perm = derangement(len(synthetic_source), 0)
  for batch in pipeline.make_eval_batches(
      synthetic_source, batch_size=5, caption_table=synthetic_table,
      shuffle_captions_across_pairs=True):
    assert batch["vis_clean"].shape == (5, 40, 48, 3)
    for r, emb, ok in zip(batch["record_index"], batch["text_emb"],
                          batch["valid"]):
      if ok:
        np.testing.assert_array_equal(emb,
                                      synthetic_table.embedding(perm[r], 0))


def test_normalize_record_rejects_mismatched_images():
  record = _tfds_like_record(0, 8, 8)
  record["ir"] = record["ir"][:4]
  with pytest.raises(ValueError, match="sizes differ"):
    pipeline.normalize_record(record)
  with pytest.raises(ValueError, match="caption table has"):
    _train([_tfds_like_record(0, 8, 8)], CaptionTable.from_captions(
        [["a"], ["b"]], _embed))


def test_worker_processes_do_not_change_the_stream(synthetic_source,
                                                   synthetic_table):
  inline = _take(_train(synthetic_source, synthetic_table), 4)
  workers = _take(_train(synthetic_source, synthetic_table, worker_count=2), 4)
  for a, b in zip(inline, workers):
    _assert_batches_equal(a, b)
