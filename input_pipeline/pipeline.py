"""Grain training and evaluation pipelines over random-access record sources.

A source is any sequence-like object (`__len__`, `__getitem__`) of records in
the project's common format: {'name': str, 'ir': uint8 (H, W[, 1]),
'vis': uint8 (H, W, 3), 'captions': list[str], optional 'vis_clean': uint8
(H, W, 3) and optional 'text_emb': (num_captions, D)}; e.g.
`input_pipeline.synthetic.SyntheticPairs` or `tfds.data_source(...)`, whose
bytes strings and numpy string arrays `normalize_record` turns into str.
Images may also be `image_io.EncodedImage`s (what the folder and TFDS
sources give): a training crop then decodes the file and converts only its
window to numpy, which for a 256x256 crop of a 1280x1024 JPEG is most of the
per-example cost saved.

Training batches (`make_train_dataset`, per JAX process, b = global batch /
shard count):
  'vis'           float32 (b, crop, crop, 3) in [0, 1]
  'ir'            float32 (b, crop, crop, 1) in [0, 1]
  'vis_clean'     float32 (b, crop, crop, 3), only if the source has it
  'text_emb'      float32 (b, D)   embedding of the sampled caption
  'caption_index' int32 (b,)       which caption of the record was used
  'record_index'  int32 (b,)       index of the record in the source
  with a DegradationSpec also 'condition_index' int32 (b,) and
  'text_emb_clean' float32 (b, D), the embedding of "clean visible image";
  with its renamed_reference 'prompted_fusion' also 'reference_vis' float32
  (b, crop, crop, 3), the true target (what the reference model fuses),
  and 'reference_affine' float32 (b, 2, 3), the scale and offset that take
  that fusion to what the prompt asks for (`degradations.prompted_affine`)

Example e of epoch k is built from record r = shuffle_k(e): its crop window,
flip and caption are pure functions of (seed, k, r), so they do not depend on
the number of processes or workers. A mixture (`mixture_weights`) gives each
part of a `sources.ConcatSource` its own reshuffled epochs and draws from
them in proportion to the weights (grain's `MapDataset.mix`), again a pure
function of the position. The global stream (shuffled epochs, one
after the other) is split round-robin over processes (process p takes global
positions p, p + P, ...), so the union of the P per-process batches of a step
is the global batch a single process would have produced.

Checkpointing: training checkpoints store only the number of examples seen
(`checkpointing.save`'s data position); the stream is a pure function of the
position, so `train_iter_at` rebuilds it there exactly, whatever the
worker count. (`iter(dataset)` is also a `grain.DatasetIterator` whose
`get_state()` / `set_state()` resume exactly, but that state's layout
depends on `worker_count`.)

Evaluation batches (`make_eval_batches`) use whole images, group records of
equal size and pad the last batch of each size, adding 'name' (list[str]) and
'valid' bool (B,); padded rows are zero with record_index -1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from input_pipeline import captions as captions_lib
from input_pipeline import degradations
from input_pipeline import image_io
from input_pipeline.captions import CaptionTable
from input_pipeline.errors import UserError

_IMAGE_KEYS = ("vis", "ir", "vis_clean", "reference_vis")
# Streams of the per-(seed, epoch, record) random draws, kept apart so that
# e.g. changing the crop size does not change which captions are sampled.
_SHUFFLE_STREAM, _CAPTION_STREAM, _CROP_STREAM, _DEGRADE_STREAM = 0, 1, 2, 3
_RENAME_STREAM = 4
_CLEAN_ROW = degradations.levels_index((0, 0, 0))


@dataclasses.dataclass(frozen=True)
class DegradationSpec:
  """Degrade each training crop's visible image (`input_pipeline.degradations`).

  level_probs: probabilities of levels 0..3, per kind, drawn independently.
  condition_table: (64, D) embeddings of the 64 condition sentences, in
    `degradations.all_levels()` order; an example's text embedding is the row
    of its levels, so the prompt names exactly what was done to its input.
  renamed_prob: share of crops prompted with another level of one of
    `renamed_kinds` (`degradations.rename_one_level`) and trained toward what
    that prompt asks for (`degradations.prompted_target`).
  wiener_target: train toward what of the clean crop survives the
    degradation (`degradations.wiener_target`), of kind `wiener_kind`;
    not where a renamed prompt names less noise (its target keeps noise).
  renamed_max_kinds: a renamed prompt changes 1 to this many of
    `renamed_kinds` (`degradations.rename_levels`).
  renamed_reference: what the stage-2 reference model is asked to match on
    a renamed crop (`degradations.RENAMED_REFERENCES`, module docstring
    there): 'prompted_fusion' adds 'reference_vis' and 'reference_affine'
    to every example.
  """
  level_probs: tuple[float, ...]
  condition_table: np.ndarray
  renamed_prob: float = 0.0
  wiener_target: bool = False
  wiener_kind: str = "contrast"
  renamed_kinds: tuple[str, ...] = degradations.DEFAULT_RENAMED_KINDS
  renamed_reference: str = "fuse_prompted_target"
  renamed_max_kinds: int = 1

  def __post_init__(self):
    # Checked here, not at the first renamed crop inside a grain worker.
    object.__setattr__(self, "renamed_kinds", degradations.check_renamed_kinds(
        self.renamed_kinds, "renamed_kinds"))
    degradations.check_renamed_reference(self.renamed_reference,
                                         self.renamed_kinds,
                                         "renamed_reference")
    degradations.check_renamed_max_kinds(self.renamed_max_kinds,
                                         self.renamed_kinds,
                                         "renamed_max_kinds")


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """Common-format record with str name/captions and (H, W, C) uint8 images."""
  out = {"name": captions_lib.to_str(record.get("name", "")),
         "captions": captions_lib.decode_captions(record["captions"])}
  for key in _IMAGE_KEYS:
    if key not in record:
      continue
    image = record[key]
    if isinstance(image, image_io.EncodedImage):  # decoded when cropped
      out[key] = image
      continue
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"record {out['name']!r}: {key!r} must be uint8, got "
                       f"{image.dtype}")
    out[key] = image[..., None] if image.ndim == 2 else image
  if out["vis"].shape[-1] != 3 or out["ir"].shape[-1] != 1:
    raise ValueError(f"record {out['name']!r}: expected vis (H, W, 3) and ir "
                     f"(H, W, 1), got {out['vis'].shape} and {out['ir'].shape}")
  shapes = {out[k].shape[:2] for k in _IMAGE_KEYS if k in out}
  if len(shapes) != 1:
    raise ValueError(f"record {out['name']!r}: image sizes differ: {shapes}")
  if "text_emb" in record:
    out["text_emb"] = np.asarray(record["text_emb"], np.float32)
  return out


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed, *keys])


def sample_caption_index(seed: int, epoch: int, record_index: int,
                         num_captions: int,
                         probabilities: np.ndarray | None = None) -> int:
  """The caption a record uses in an epoch: a pure function of the args
  (uniform, or by `probabilities`: `CaptionTable.caption_probabilities`)."""
  rng = _rng(seed, _CAPTION_STREAM, epoch, record_index)
  if probabilities is None:
    return int(rng.integers(num_captions))
  return int(rng.choice(num_captions, p=probabilities))


def paired_crop_and_flip(images: Mapping[str, np.ndarray], crop_size: int,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One random crop window and horizontal flip applied to every image.

  Images smaller than the crop are first reflection-padded (centred) to at
  least crop_size on each side. `image_io.EncodedImage`s are decoded here,
  converting only the window.
  """
  h, w = next(iter(images.values())).shape[:2]
  pad_h, pad_w = max(0, crop_size - h), max(0, crop_size - w)
  top = int(rng.integers(0, max(h, crop_size) - crop_size + 1))
  left = int(rng.integers(0, max(w, crop_size) - crop_size + 1))
  flip = bool(rng.integers(2))
  out = {}
  for key, image in images.items():
    if isinstance(image, image_io.EncodedImage):
      if not (pad_h or pad_w):  # decode, convert only the window
        image = image.crop(top, left, crop_size, crop_size)
        out[key] = image[:, ::-1] if flip else image
        continue
      image = np.asarray(image)
    if pad_h or pad_w:
      mode = "reflect" if min(h, w) > 1 else "edge"
      image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2),
                             (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode)
    image = image[top:top + crop_size, left:left + crop_size]
    out[key] = image[:, ::-1] if flip else image
  return out


def _example(images: Mapping[str, np.ndarray], record_index: int,
             caption_index: int, table: CaptionTable,
             as_float: bool = True) -> dict[str, Any]:
  """One example; images float32 in [0, 1], or uint8 if not `as_float`."""
  example = {k: (np.asarray(v, np.float32) / np.float32(255) if as_float
                 else np.asarray(v, np.uint8))
             for k, v in images.items()}
  example["text_emb"] = table.embedding(record_index, caption_index)
  example["caption_index"] = np.int32(caption_index)
  example["record_index"] = np.int32(record_index)
  return example


class _WithEpoch:
  """map_with_index transform of one source's repeated shuffle: (position in
  that stream, local index) -> (record index in the whole source, epoch of
  that source)."""

  def __init__(self, offset: int, length: int):
    self._offset, self._length = offset, length

  def __call__(self, position: int, local_index: int) -> tuple[int, int]:
    return self._offset + int(local_index), position // self._length


class _TrainExample:
  """map transform: (record index, epoch) -> one cropped, flipped,
  captioned example (float images, or uint8 for the main process to
  convert)."""

  def __init__(self, source: Sequence[Any], table: CaptionTable,
               crop_size: int, seed: int,
               degradation: DegradationSpec | None = None,
               as_float: bool = True):
    self._source, self._table = source, table
    self._crop_size, self._seed = crop_size, seed
    self._degradation = degradation
    self._as_float = as_float

  def __call__(self, index_and_epoch: tuple[int, int]) -> dict[str, Any]:
    record_index, epoch = index_and_epoch
    record = normalize_record(self._source[record_index])
    caption = sample_caption_index(
        self._seed, epoch, record_index,
        self._table.num_captions(record_index),
        self._table.caption_probabilities(record_index))
    images = paired_crop_and_flip(
        {k: record[k] for k in _IMAGE_KEYS if k in record}, self._crop_size,
        _rng(self._seed, _CROP_STREAM, epoch, record_index))
    if self._degradation is None:
      return _example(images, record_index, caption, self._table,
                      self._as_float)
    # The clean crop becomes the target; the prompt names the degradation.
    rng = _rng(self._seed, _DEGRADE_STREAM, epoch, record_index)
    spec = self._degradation
    levels = degradations.sample_levels(rng, spec.level_probs)
    params = degradations.draw_parameters(levels, rng)
    clean = images["vis"]
    images["vis"] = degradations.apply(clean, params, rng)
    images["vis_clean"], named = clean, levels
    rename = _rng(self._seed, _RENAME_STREAM, epoch, record_index)
    if spec.renamed_prob and rename.random() < spec.renamed_prob:
      named = degradations.rename_levels(levels, rename, spec.renamed_kinds,
                                         spec.renamed_max_kinds)
      images["vis_clean"] = degradations.prompted_target(
          clean, params, levels, named, images["vis"])
    # A target that keeps unnamed noise is not shrunk as if it were gone.
    if spec.wiener_target and named[1] >= levels[1]:
      images["vis_clean"] = degradations.wiener_target(
          images["vis_clean"], clean, params, spec.wiener_kind)
    if spec.renamed_reference == "prompted_fusion":
      # The true sentence's target; the prompt's difference is applied to
      # the reference's fusion of it (reference_affine).
      images["reference_vis"] = (
          images["vis_clean"] if named == levels else
          degradations.wiener_target(clean, clean, params, spec.wiener_kind)
          if spec.wiener_target else clean)
    example = _example(images, record_index, caption, self._table,
                       self._as_float)
    row = degradations.levels_index(named)
    example["text_emb"] = self._degradation.condition_table[row]
    example["text_emb_clean"] = self._degradation.condition_table[_CLEAN_ROW]
    example["condition_index"] = np.int32(row)
    if spec.renamed_reference == "prompted_fusion":
      example["reference_affine"] = np.stack(
          degradations.prompted_affine(params, levels, named))
    return example


def _images_to_float(batch: dict[str, Any]) -> dict[str, Any]:
  """uint8 image arrays of a batch -> float32 in [0, 1]."""
  return {k: (np.asarray(v, np.float32) / np.float32(255)
              if k in _IMAGE_KEYS else v) for k, v in batch.items()}


def _select_table(table: CaptionTable, num_records: int, shuffle: bool,
                  derangement_seed: int) -> CaptionTable:
  if len(table) != num_records:
    raise ValueError(f"caption table has {len(table)} records, source has "
                     f"{num_records}")
  return table.deranged(derangement_seed) if shuffle else table


def _mark_flags_parsed() -> None:
  # Grain reads its absl-flag-backed config when it starts worker processes;
  # under pytest or a non-absl main nobody has parsed the flags.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_dataset(
    source: Sequence[Any],
    *,
    global_batch_size: int,
    crop_size: int,
    seed: int,
    caption_table: CaptionTable,
    shuffle_captions_across_pairs: bool = False,
    derangement_seed: int = 0,
    degradation: DegradationSpec | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    read_buffer_size: int = 4,
    shard_by_process: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    start_batch: int = 0,
    mixture_weights: Sequence[float] | None = None,
) -> grain.IterDataset:
  """Infinite, checkpointable dataset of this process's training batches.

  Args:
    source: random-access source of common-format records.
    global_batch_size: batch size summed over all shards (processes).
    crop_size: side of the square random crop.
    seed: seeds the per-epoch shuffles, crops, flips and caption choices.
    caption_table: caption embeddings of every record of `source`.
    shuffle_captions_across_pairs: pair record i with the captions of record
      derangement(derangement_seed)[i] (the "does text matter" ablation).
    derangement_seed: seed of that fixed derangement (share it with eval).
    degradation: degrade each crop's visible image and prompt with the
      condition sentence instead of the record's captions ('vis_clean' then
      holds the target: the clean crop, or what a renamed prompt asks for,
      or its Wiener target; 'condition_index' the sentence's row; module
      docstring for the keys a renamed_reference adds).
    worker_count: grain worker processes (0: produce in this process).
    worker_buffer_size: batches each worker prefetches.
    read_threads, read_buffer_size: threads building batches in each process
      and how many batches they prefetch.
    shard_by_process: split the stream over JAX processes; ignored when
      `shard_options` is given (e.g. to simulate several processes).
    shard_options: explicit shard index/count.
    start_batch: skip this many batches. Batch k of every shard is its part
      of global batch k, so `examples seen / global_batch_size` resumes at
      the same global position for any shard (process) count.
    mixture_weights: sample the parts of `source` (a `sources.ConcatSource`)
      in these proportions, each part reshuffled on its own epochs (grain's
      MapDataset.mix); None: one shuffle over all records.

  Returns:
    A grain IterDataset; `iter()` of it yields the batch dicts described in
    the module docstring and supports get_state()/set_state().
  """
  num_records = len(source)
  if num_records == 0:
    raise UserError("empty source")
  if shard_options is None:
    shard_options = (grain.sharding.ShardByJaxProcess() if shard_by_process
                     else grain.sharding.NoSharding())
  shards = shard_options.shard_count
  if global_batch_size % shards:
    raise UserError(f"global batch {global_batch_size} is not divisible by "
                     f"{shards} shards")
  table = _select_table(caption_table, num_records,
                        shuffle_captions_across_pairs, derangement_seed)
  # Shuffling indices (not records) keeps the record index at hand.
  def shuffled(offset: int, length: int, *stream: int) -> grain.MapDataset:
    shuffle_seed = int(np.random.SeedSequence([_SHUFFLE_STREAM, seed, *stream])
                       .generate_state(1)[0])
    return (grain.MapDataset.range(length).shuffle(seed=shuffle_seed)
            .repeat().map_with_index(_WithEpoch(offset, length)))

  if mixture_weights is None:
    ds = shuffled(0, num_records)
  else:
    # Each part of a ConcatSource reshuffles on its own epochs; the mix
    # draws from them in proportion to the weights, a pure function of the
    # position (so resume stays exact).
    offsets, lengths = source.part_offsets(), source.part_lengths()
    if len(mixture_weights) != len(lengths):
      raise ValueError(f"{len(mixture_weights)} mixture weights for "
                       f"{len(lengths)} parts")
    ds = grain.MapDataset.mix(
        [shuffled(o, n, 1 + i) for i, (o, n) in enumerate(zip(offsets,
                                                              lengths))],
        [float(w) for w in mixture_weights])
  # Worker processes ship uint8 batches, a quarter of float32's bytes; the
  # main process converts them (in-process read threads convert per example).
  ds = ds.map(_TrainExample(source, table, crop_size, seed, degradation,
                            as_float=worker_count == 0))
  ds = ds[shard_options.shard_index::shards]
  ds = ds.batch(global_batch_size // shards, drop_remainder=True)
  if start_batch:
    ds = ds[start_batch:]
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    _mark_flags_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count,
                                     per_worker_buffer_size=worker_buffer_size))
    it_ds = it_ds.map(_images_to_float)
  return it_ds


def _stack(examples: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
  """Stacks examples, zero-padding to batch_size with valid=False rows."""
  pad = batch_size - len(examples)
  batch = {}
  for key in examples[0]:
    if key == "name":
      batch[key] = [e[key] for e in examples] + [""] * pad
      continue
    values = np.stack([e[key] for e in examples])
    if pad:
      filler = -1 if key == "record_index" else 0
      values = np.concatenate(
          [values, np.full((pad,) + values.shape[1:], filler, values.dtype)])
    batch[key] = values
  batch["valid"] = np.arange(batch_size) < len(examples)
  return batch


def make_eval_batches(
    source: Sequence[Any],
    *,
    batch_size: int,
    caption_table: CaptionTable,
    caption_index: int = 0,
    shuffle_captions_across_pairs: bool = False,
    derangement_seed: int = 0,
    max_records: int | None = None,
) -> Iterator[dict[str, Any]]:
  """Deterministic full-image evaluation batches of the first records.

  Records are read in order; records of equal size are batched together, a
  batch is yielded when full, and the partial batches left at the end follow
  (ordered by their first record), padded to `batch_size` (see 'valid'), so
  jitted code sees one shape per image size. A record with fewer captions than
  `caption_index + 1` uses caption `caption_index % num_captions` (reported
  in 'caption_index').

  Yields:
    dicts with the training keys at full size, plus 'name' (list[str]) and
    'valid' bool (batch_size,).
  """
  num_records = len(source)
  table = _select_table(caption_table, num_records,
                        shuffle_captions_across_pairs, derangement_seed)
  if max_records is not None:
    num_records = min(num_records, max_records)
  pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
  seen: set[str] = set()
  for index in range(num_records):
    record = normalize_record(source[index])
    if record["name"] in seen:
      # Results and images are keyed by name: one would replace the other.
      raise UserError(
          f"eval record {index} is named {record['name']!r} like an earlier "
          "one (a split expression such as 'train+test' may join pairs of "
          "one name); evaluate one split (config.data.eval_split)")
    seen.add(record["name"])
    example = _example({k: record[k] for k in _IMAGE_KEYS if k in record},
                       index, caption_index % table.num_captions(index), table)
    example["name"] = record["name"]
    group = pending.setdefault(record["vis"].shape[:2], [])
    group.append(example)
    if len(group) == batch_size:
      yield _stack(pending.pop(record["vis"].shape[:2]), batch_size)
  for group in pending.values():
    yield _stack(group, batch_size)
