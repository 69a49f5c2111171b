"""Hugging Face CLIP text weight names <-> `ClipTextTower` parameters.

One table drives both directions: loading a checkpoint (`load_hf_tensors`) and
writing one (`to_hf_tensors`). The keys are those of both HF forms:
`CLIPTextModelWithProjection` and `CLIPModel` store the text tower under
`text_model.` and the projection as `text_projection.weight`.

HF `nn.Linear` weights are (out, in); NNX kernels are (in..., out...), with
attention kernels split into (heads, head_dim) as `ClipAttention` keeps them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from textfusion_jax.text import clip_text

# Keys an HF text checkpoint may hold that carry no parameter.
IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids"})
TEXT_PREFIXES = ("text_model.", "text_projection.")


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_key: str
  path: tuple[str | int, ...]  # attribute path of the nnx.Param
  # Linear kernels: how many leading NNX dims are the input (HF stores the
  # transpose of the flattened kernel). None: same values, HF shape below.
  in_dims: int | None
  flat_in_hf: bool = False  # attention biases: (heads, head_dim) vs (hidden,)


def entries(config: clip_text.ClipTextConfig) -> list[Entry]:
  """Every parameter of the tower and its HF key."""
  table = [
      Entry("text_model.embeddings.token_embedding.weight",
            ("token_embedding", "embedding"), None),
      Entry("text_model.embeddings.position_embedding.weight",
            ("position_embedding", "embedding"), None),
      Entry("text_model.final_layer_norm.weight",
            ("final_layer_norm", "scale"), None),
      Entry("text_model.final_layer_norm.bias",
            ("final_layer_norm", "bias"), None),
      Entry("text_projection.weight", ("text_projection", "kernel"), 1),
  ]
  for i in range(config.num_hidden_layers):
    hf, path = f"text_model.encoder.layers.{i}.", ("layers", i)
    for norm in ("layer_norm1", "layer_norm2"):
      table.append(Entry(f"{hf}{norm}.weight", path + (norm, "scale"), None))
      table.append(Entry(f"{hf}{norm}.bias", path + (norm, "bias"), None))
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      module = path + ("self_attn", proj)
      in_dims = 2 if proj == "out_proj" else 1
      table.append(Entry(f"{hf}self_attn.{proj}.weight", module + ("kernel",),
                         in_dims))
      table.append(Entry(f"{hf}self_attn.{proj}.bias", module + ("bias",),
                         None, flat_in_hf=proj != "out_proj"))
    for fc in ("fc1", "fc2"):
      module = path + ("mlp", fc)
      table.append(Entry(f"{hf}mlp.{fc}.weight", module + ("kernel",), 1))
      table.append(Entry(f"{hf}mlp.{fc}.bias", module + ("bias",), None))
  return table


def _variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def _to_nnx(tensor: np.ndarray, entry: Entry,
            shape: tuple[int, ...]) -> np.ndarray:
  if entry.in_dims is not None:
    tensor = tensor.T
  return tensor.reshape(shape)


def _to_hf(value: np.ndarray, entry: Entry) -> np.ndarray:
  if entry.in_dims is not None:
    fan_in = math.prod(value.shape[:entry.in_dims])
    return value.reshape(fan_in, -1).T
  return value.reshape(-1) if entry.flat_in_hf else value


def text_keys(keys) -> set[str]:
  """The keys of a checkpoint that belong to the text tower."""
  return {k for k in keys if k.startswith(TEXT_PREFIXES)} - IGNORED_KEYS


def load_hf_tensors(model: clip_text.ClipTextTower,
                    tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Sets every parameter of `model` from HF-named `tensors` (float32).

  Raises ValueError naming `source` and the keys if a text-tower weight is
  missing, unexpected for the config, or of the wrong size.
  """
  table = entries(model.config)
  wanted = {e.hf_key for e in table}
  missing = sorted(wanted - set(tensors))
  if missing:
    raise ValueError(
        f"{source}: checkpoint lacks {len(missing)} text-tower weight(s): "
        f"{_shorten(missing)} (expected a CLIPModel or "
        "CLIPTextModelWithProjection checkpoint)")
  unexpected = sorted(text_keys(tensors) - wanted)
  if unexpected:
    raise ValueError(
        f"{source}: checkpoint has text-tower weight(s) the config does not "
        f"describe: {_shorten(unexpected)}")
  for entry in table:
    variable = _variable(model, entry.path)
    tensor = np.asarray(tensors[entry.hf_key])
    expected = _to_hf(np.empty(variable.shape, np.float32), entry).shape
    if tensor.shape != expected:
      raise ValueError(
          f"{source}: {entry.hf_key} has shape {tuple(tensor.shape)}; the "
          f"config implies {expected}")
    value = _to_nnx(tensor.astype(np.float32), entry, variable.shape)
    variable.set_value(jnp.asarray(value))


def to_hf_tensors(model: clip_text.ClipTextTower) -> dict[str, np.ndarray]:
  """The tower's parameters under HF names and layouts (float32 numpy)."""
  return {
      e.hf_key: _to_hf(np.asarray(_variable(model, e.path).get_value(),
                                  np.float32),
                       e)
      for e in entries(model.config)
  }


def _shorten(keys: list[str], limit: int = 6) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit
                  else "")
