"""`TextEncoder`: captions -> CLIP text embeddings, jitted and batched.

Captions are tokenized by the checkpoint's own CLIPTokenizer, sorted by token
length, and run in fixed-size batches padded to a small set of bucket lengths,
so that only a handful of shapes are ever compiled and short captions do not
pay for 77 positions. With a mesh, each batch is split over its 'data' axis.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import functools
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from textfusion_jax.text import clip_text, hf_checkpoint, weight_map
from input_pipeline.errors import UserError

logger = logging.getLogger(__name__)

# Padded lengths compiled for; max_position_embeddings is always added last.
# Multiples of 8 waste few positions on sorted batches and tile well on GPUs.
DEFAULT_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64)
DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: this process's devices).

  Process-local by default: `encode` gathers its results to this host, so in a
  multi-host job each process encodes its own captions on its own devices.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def check_texts(texts: Sequence[Any]) -> list[str]:
  """`texts` as a list, or ValueError naming the first empty/non-str entry."""
  if isinstance(texts, str):
    raise UserError("encode() takes a list of captions, not one string")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise UserError(f"caption {i} is not a string: {text!r}")
    if not text.strip():
      raise UserError(f"caption {i} is empty: {text!r}")
  return texts


# Module-level so that encoders with equal towers share compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State,
             input_ids: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(input_ids)


class TextEncoder:
  """A CLIP text tower with its tokenizer; see `encode`.

  With a `mesh`, parameters are placed by `clip_text.AXIS_RULES` (replicated
  unless the mesh has a 'model' axis) and each batch is split over 'data'.
  """

  def __init__(self, model: clip_text.ClipTextTower, tokenizer: Any, *,
               source: str, mesh: jax.sharding.Mesh | None = None,
               buckets: Sequence[int] = DEFAULT_BUCKETS):
    self.model = model
    self.tokenizer = tokenizer
    self.source = source  # The path or hub id it came from (for manifests).
    self.mesh = mesh
    config = model.config
    if len(tokenizer) > config.vocab_size:
      raise ValueError(
          f"{source}: the tokenizer has {len(tokenizer)} tokens but the model "
          f"only {config.vocab_size} embeddings")
    eos = config.eos_token_id
    if eos != clip_text.LEGACY_EOS_TOKEN_ID and eos != tokenizer.eos_token_id:
      # Pooling looks for this id: with none in a row, every text would be
      # pooled at its first token and embed the same.
      raise ValueError(
          f"{source}: config eos_token_id {eos} is not the tokenizer's "
          f"end-of-text id {tokenizer.eos_token_id}, so every text would embed "
          f"the same; set \"eos_token_id\": {tokenizer.eos_token_id} in "
          "config.json")
    # Before sharding, while every weight is on this host.
    self.fingerprint = fingerprint(model, tokenizer)
    self.max_length = config.max_position_embeddings
    self.buckets = sorted({b for b in buckets if b < self.max_length} |
                          {self.max_length})
    pad = tokenizer.pad_token_id
    self._pad_id = tokenizer.eos_token_id if pad is None else pad
    if mesh is not None:
      if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs a {DATA_AXIS!r} axis for the batch; "
                         f"it has {mesh.axis_names}")
      clip_text.shard_model(model, mesh)
      self._batch_sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    else:
      self._batch_sharding = None
    self._graphdef, self._state = nnx.split(model)

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *,
                      dtype: Any = jnp.float32,
                      mesh: jax.sharding.Mesh | None = None,
                      buckets: Sequence[int] = DEFAULT_BUCKETS) -> TextEncoder:
    """Loads an HF `CLIPModel` or `CLIPTextModelWithProjection` checkpoint.

    `path_or_hub_id` is a local directory (config.json, tokenizer files,
    model.safetensors or pytorch_model.bin) or a hub id, downloaded through
    huggingface_hub. `dtype` is the compute dtype (parameters stay float32).
    Raises hf_checkpoint.CheckpointError (a ValueError) with a one-line reason.
    """
    directory = hf_checkpoint.resolve(path_or_hub_id)
    try:
      config = hf_checkpoint.load_config(directory)
      tokenizer = hf_checkpoint.load_tokenizer(directory)
      tensors = hf_checkpoint.load_text_tensors(directory)
      # Abstract init: every parameter is then set from the checkpoint.
      model = nnx.eval_shape(
          lambda: clip_text.ClipTextTower(config, dtype=dtype))
      weight_map.load_hf_tensors(model, tensors, str(directory))
      return cls(model, tokenizer, source=str(path_or_hub_id), mesh=mesh,
                 buckets=buckets)
    except hf_checkpoint.CheckpointError:
      raise
    except ValueError as error:  # config values, weight names or shapes
      raise hf_checkpoint.CheckpointError(
          f"{directory}: not a usable CLIP text checkpoint "
          f"({hf_checkpoint.first_line(error)})") from error

  @classmethod
  def tiny_random(cls, seed: int = 0, *, dtype: Any = jnp.float32,
                  mesh: jax.sharding.Mesh | None = None,
                  legacy_eos: bool = False) -> TextEncoder:
    """A tiny random tower (64 wide, 2 layers) with a built-in tokenizer."""
    # pylint: disable=g-import-not-at-top
    from textfusion_jax.text import tiny_clip
    config = clip_text.ClipTextConfig.from_hf(
        tiny_clip.tiny_text_config(legacy_eos=legacy_eos))
    model = clip_text.random_tower(config, dtype=dtype, seed=seed)
    return cls(model, tiny_clip.tiny_tokenizer(), mesh=mesh,
               source=f"tiny_random(seed={seed})")

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes a Hugging Face `CLIPTextModelWithProjection` directory.

    config.json, the tokenizer files and model.safetensors (float32, HF
    names), without torch; `from_pretrained` and transformers both load it,
    and `from_pretrained` gives back bitwise the same embeddings.
    """
    hf_checkpoint.save(nnx.merge(self._graphdef, self._state),
                       self.tokenizer, directory)

  @property
  def embed_dim(self) -> int:
    return self.model.config.projection_dim

  @property
  def dtype(self) -> np.dtype:
    """The compute dtype (parameters and outputs are float32)."""
    return self.model.dtype

  def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Token ids per text, truncated to max_length, and how many were cut.

    Truncation keeps the first max_length - 1 tokens and the final
    end-of-text, as the tokenizer's own truncation=True does.
    """
    if not texts:  # the fast tokenizer fails on an empty batch
      return [], 0
    # verbose=False: over-long inputs are expected and reported below.
    ids = self.tokenizer(list(texts), add_special_tokens=True,
                         verbose=False)["input_ids"]
    num_truncated = 0
    for i, row in enumerate(ids):
      if len(row) > self.max_length:
        ids[i] = row[:self.max_length - 1] + row[-1:]
        num_truncated += 1
    return ids, num_truncated

  def check_fits(self, texts: Sequence[str], what: Sequence[str]) -> None:
    """Raises UserError naming the first text (described by `what`) longer
    than max_length tokens: typed prompts are refused, not truncated."""
    if not texts:
      return
    ids = self.tokenizer(list(texts), add_special_tokens=True,
                         verbose=False)["input_ids"]
    for text, row, name in zip(texts, ids, what):
      if len(row) > self.max_length:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UserError(f"{name} is {len(row)} tokens ({shown!r}); the text "
                        f"encoder takes at most {self.max_length}: shorten it")

  def encode(self, texts: Sequence[str], batch_size: int = 64, *,
             warn_truncated: bool = True) -> np.ndarray:
    """Projected (not normalised) embeddings, float32 (len(texts), embed_dim).

    The same values as HF `get_text_features` / `text_embeds`. Captions longer
    than max_length tokens are truncated and counted in one warning. Raises
    ValueError naming the index of an empty or non-string caption.
    """
    texts = check_texts(texts)
    ids, num_truncated = self.tokenize(texts)
    if num_truncated and warn_truncated:
      logger.warning("%d of %d captions exceed %d tokens and were truncated",
                     num_truncated, len(texts), self.max_length)
    return self.encode_ids(ids, batch_size)

  def encode_ids(self, ids: Sequence[Sequence[int]],
                 batch_size: int = 64) -> np.ndarray:
    """`encode` for token ids that are already at most max_length long."""
    if batch_size < 1:
      raise UserError(f"batch_size must be positive, got {batch_size}")
    out = np.zeros((len(ids), self.embed_dim), np.float32)
    if not ids:
      return out
    if self.mesh is not None:  # every device gets an equal slice
      shards = self.mesh.shape[DATA_AXIS]
      batch_size = -(-batch_size // shards) * shards
    lengths = np.array([len(row) for row in ids])
    if lengths.max() > self.max_length or lengths.min() < 1:
      i = int(np.argmax((lengths > self.max_length) | (lengths < 1)))
      raise UserError(f"token sequence {i} has {lengths[i]} ids; the model "
                       f"takes 1 to {self.max_length}")
    # Sorting by length makes each batch's padded length close to its rows'.
    order = np.argsort(lengths, kind="stable")
    pending = []
    for start in range(0, len(ids), batch_size):
      rows = order[start:start + batch_size]
      width = self.buckets[bisect.bisect_left(self.buckets,
                                              lengths[rows].max())]
      batch = np.full((batch_size, width), self._pad_id, np.int32)
      for r, i in enumerate(rows):
        batch[r, :lengths[i]] = ids[i]
      batch = (jax.device_put(batch, self._batch_sharding)
               if self._batch_sharding is not None else batch)
      # Dispatch is asynchronous: prepare the next batch while this one runs.
      pending.append((rows, _forward(self._graphdef, self._state, batch)))
    for rows, result in pending:
      out[rows] = np.asarray(result)[:len(rows)]
    return out


TINY_RANDOM = "tiny-random"
# Fixed, so training, evaluation and the fuse command embed identically.
TINY_RANDOM_SEED = 0
# config.text.dtype -> the tower's compute dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def fingerprint(model: clip_text.ClipTextTower, tokenizer: Any) -> str:
  """What a tower computes, whatever path it came from: the sha256 of its
  weights (float32, HF names) and its tokenizer (vocabulary and merges).
  Caption stores, their shards and training runs record it, so a checkpoint
  folder whose contents changed is not taken for the one they used."""
  digest = hashlib.sha256()
  for name, tensor in sorted(weight_map.to_hf_tensors(model).items()):
    digest.update(f"{name} {tensor.shape}\n".encode())
    digest.update(memoryview(np.ascontiguousarray(tensor, np.float32)))
  # The fields and tables that decide the output, in a canonical form: the
  # tokenizer's serialised state also holds its current truncation and
  # padding, and its layout changes between library versions.
  c = model.config
  model_json = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  digest.update(json.dumps({
      "config": [c.vocab_size, c.hidden_size, c.intermediate_size,
                 c.num_hidden_layers, c.num_attention_heads,
                 c.max_position_embeddings, c.projection_dim, c.eos_token_id,
                 c.hidden_act, float(c.layer_norm_eps)],
      "vocab": sorted(model_json["vocab"].items()),
      "merges": [m if isinstance(m, str) else " ".join(m)
                 for m in model_json["merges"]],
      "special": [tokenizer.bos_token, tokenizer.eos_token,
                  tokenizer.pad_token, tokenizer.unk_token],
  }).encode())
  return digest.hexdigest()[:32]


def from_config(text_config: Any, mesh: jax.sharding.Mesh | None = None
                ) -> TextEncoder:
  """The encoder `config.text` names (its `encoder` and `dtype`):
  'tiny-random' (no download), a local Hugging Face CLIP directory, or a hub
  id."""
  dtype = DTYPES.get(text_config.dtype)
  if dtype is None:
    raise UserError(f"config.text.dtype={text_config.dtype!r}: must be one of "
                    f"{', '.join(DTYPES)}")
  if text_config.encoder == TINY_RANDOM:
    return TextEncoder.tiny_random(TINY_RANDOM_SEED, dtype=dtype, mesh=mesh)
  return TextEncoder.from_pretrained(text_config.encoder, dtype=dtype,
                                     mesh=mesh)
