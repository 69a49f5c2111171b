"""Reading Hugging Face CLIP checkpoint directories (or hub ids).

A checkpoint directory holds config.json (a `CLIPConfig` or a
`CLIPTextConfig`), the tokenizer files (tokenizer.json, or vocab.json plus
merges.txt) and the weights as model.safetensors or pytorch_model.bin, either
possibly sharded with a `*.index.json`. Only text-tower weights are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from textfusion_jax.text import clip_text, weight_map
from input_pipeline.errors import UserError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
_HUB_PATTERNS = ["*.json", "*.txt"]


class CheckpointError(UserError):
  """A checkpoint directory or hub id cannot be used as a CLIP text encoder."""


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
  """A local directory for `path_or_hub_id`, downloading a hub id if needed."""
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  text = str(path_or_hub_id)
  if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
    raise CheckpointError(f"{text}: not a checkpoint directory")
  return _download(text)


# The weight files a hub download takes: repos such as LAION's also hold
# open_clip_model.safetensors, a second copy of every weight.
_HUB_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json",
                    "model-*-of-*.safetensors"]
_HUB_TORCH = ["pytorch_model.bin", "pytorch_model.bin.index.json",
              "pytorch_model-*-of-*.bin"]


def _download(hub_id: str) -> Path:
  # pylint: disable=g-import-not-at-top
  import huggingface_hub
  try:
    directory = Path(huggingface_hub.snapshot_download(
        hub_id, allow_patterns=_HUB_PATTERNS + _HUB_SAFETENSORS))
    if not _weight_files(directory):
      directory = Path(huggingface_hub.snapshot_download(
          hub_id, allow_patterns=_HUB_PATTERNS + _HUB_TORCH))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{hub_id}: no such local directory, and cannot fetch {hub_id!r} "
        f"from the Hugging Face hub ({first_line(e)}); pass a local "
        "directory with config.json, the tokenizer files and "
        "model.safetensors or pytorch_model.bin instead") from None
  return directory


def load_config(directory: Path) -> clip_text.ClipTextConfig:
  """The tower config from config.json of either HF CLIP form."""
  # pylint: disable=g-import-not-at-top
  import transformers
  config_path = directory / CONFIG_FILE
  try:
    config_json = json.loads(config_path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{config_path}: unreadable config ({e})") from None
  if not isinstance(config_json, dict):
    raise CheckpointError(f"{config_path}: not a config (a JSON object "
                          f"expected, got {type(config_json).__name__})")
  model_type = config_json.get("model_type")
  try:
    if model_type == "clip":
      config = transformers.CLIPConfig.from_pretrained(directory)
      return clip_text.ClipTextConfig.from_hf(config.text_config,
                                              config.projection_dim)
    if model_type == "clip_text_model":
      return clip_text.ClipTextConfig.from_hf(
          transformers.CLIPTextConfig.from_pretrained(directory))
  except Exception as error:  # pylint: disable=broad-except
    # transformers validates fields with its own exception types; a null or
    # zero where a number belongs fails as TypeError or ZeroDivisionError.
    raise CheckpointError(f"{config_path}: unusable config values "
                          f"({first_line(error)[:200]})") from None
  raise CheckpointError(f"{config_path}: model_type {model_type!r} is not a "
                        "CLIP model ('clip' or 'clip_text_model')")


def load_tokenizer(directory: Path) -> Any:
  """The transformers CLIPTokenizer saved in `directory`."""
  # pylint: disable=g-import-not-at-top
  import transformers
  # transformers silently builds an empty-vocab tokenizer when the files are
  # missing, so check for them first.
  has_files = ((directory / "tokenizer.json").is_file() or
               ((directory / "vocab.json").is_file() and
                (directory / "merges.txt").is_file()))
  if not has_files:
    raise CheckpointError(
        f"{directory}: no tokenizer (expected tokenizer.json, or vocab.json "
        "and merges.txt)")
  try:
    return transformers.CLIPTokenizer.from_pretrained(directory)
  except Exception as error:  # pylint: disable=broad-except
    # tokenizers raises a bare Exception for a broken vocabulary, json a
    # ValueError for a cut-off file: either way the files are unusable.
    raise CheckpointError(f"{directory}: unusable tokenizer files "
                          f"({first_line(error)[:200]})") from None


def _weight_files(directory: Path) -> list[Path]:
  """The files holding the weights, preferring safetensors."""
  for name in (SAFETENSORS_FILE, TORCH_FILE):
    if (directory / name).is_file():
      return [directory / name]
    index = directory / f"{name}.index.json"
    if index.is_file():
      try:
        weight_map_ = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map_.values()))
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a weight index (expected JSON "
                              "with a 'weight_map' of name -> file)") from None
      missing = [f for f in shards if not (directory / f).is_file()]
      if missing:
        raise CheckpointError(f"{index} names shards that are missing: "
                              f"{', '.join(missing)}")
      return [directory / f for f in shards]
  return []


def load_text_tensors(directory: Path) -> dict[str, np.ndarray]:
  """Text-tower tensors (HF names -> float32 arrays) of a checkpoint."""
  files = _weight_files(directory)
  if not files:
    raise CheckpointError(
        f"{directory}: no weights ({SAFETENSORS_FILE} or {TORCH_FILE}, or a "
        "sharded *.index.json)")
  tensors = {}
  for file in files:
    if file.suffix == ".safetensors":
      tensors.update(_read_safetensors(file))
    else:
      tensors.update(_read_torch(file))
  return tensors


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  # pylint: disable=g-import-not-at-top
  import safetensors
  try:
    with safetensors.safe_open(file, framework="numpy") as f:
      return {k: f.get_tensor(k).astype(np.float32)
              for k in weight_map.text_keys(f.keys())}
  except (safetensors.SafetensorError, OSError, ValueError) as error:
    raise CheckpointError(f"{file}: unreadable safetensors file "
                          f"({first_line(error)})") from None


def _read_torch(file: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"{file}: reading a .bin checkpoint needs torch (pip install torch), "
        "or convert it to model.safetensors") from None
  import pickle  # pylint: disable=g-import-not-at-top
  with open(file, "rb") as handle:
    head = handle.read(64)
  # torch.save writes a zip archive (PK) or, before torch 1.6, a pickle
  # (protocol 2+ starts with 0x80); a clone without git-lfs leaves a pointer.
  if head.startswith(b"version https://git-lfs"):
    raise CheckpointError(f"{file}: a git-lfs pointer, not the weights "
                          "(git lfs pull, or download the file itself)")
  if not head.startswith((b"PK", b"\x80")):
    raise CheckpointError(f"{file}: not a PyTorch weights file (neither a "
                          "zip archive nor a pickle)")
  try:
    # weights_only: the unpickler builds tensors and containers only, and
    # refuses (without running it) anything else a pickle asks for.
    state = torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise CheckpointError(
        f"{file}: refused: the pickle asks for more than tensors, which a "
        f"weights file never needs ({first_line(error)[:200]})") from None
  except (RuntimeError, EOFError, OSError, ValueError) as error:
    raise CheckpointError(f"{file}: unreadable PyTorch weights file "
                          f"({first_line(error)[:200]})") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{file}: expected a state dict of tensors, got "
                          f"{type(state).__name__}")
  keys = weight_map.text_keys(state.keys())
  for key in keys:
    if not isinstance(state[key], torch.Tensor):
      raise CheckpointError(f"{file}: {key} is not a tensor (a "
                            f"{type(state[key]).__name__})")
  return {k: state[k].float().numpy() for k in keys}


def first_line(error: BaseException) -> str:
  """The first line of an error's message (its type's name if empty)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def save(model: clip_text.ClipTextTower, tokenizer: Any,
         directory: str | os.PathLike) -> None:
  """Writes a Hugging Face `CLIPTextModelWithProjection` directory.

  config.json, the tokenizer files and model.safetensors (float32, HF
  names), without torch; `load_*` here and transformers both read it back.
  """
  # pylint: disable=g-import-not-at-top
  import safetensors.numpy
  import transformers
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  c = model.config
  transformers.CLIPTextConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, projection_dim=c.projection_dim,
      num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads,
      max_position_embeddings=c.max_position_embeddings,
      hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
      bos_token_id=tokenizer.bos_token_id,
      pad_token_id=tokenizer.pad_token_id, eos_token_id=c.eos_token_id,
      architectures=["CLIPTextModelWithProjection"]
  ).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  tensors = {k: np.ascontiguousarray(v) for k, v in
             weight_map.to_hf_tensors(model).items()}
  # transformers only loads safetensors files whose metadata names a format.
  path = os.path.join(directory, SAFETENSORS_FILE)
  try:
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  except safetensors.SafetensorError as error:  # e.g. a full disk
    raise CheckpointError(f"{path}: cannot write ({first_line(error)})"
                          ) from None
