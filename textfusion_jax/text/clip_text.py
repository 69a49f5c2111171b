"""The CLIP text tower with its projection, in Flax NNX.

Matches Hugging Face `CLIPTextModelWithProjection` (and the text half of
`CLIPModel.get_text_features`): token + position embeddings, pre-LayerNorm
causal transformer layers, final LayerNorm, end-of-text pooling and a bias-free
projection.

Parameters are float32 and annotated with logical axis names, so a mesh can
shard them through a rule table (see `AXIS_RULES` / `shard_model`):

  'vocab'  token-embedding rows             'embed'  the residual width
  'mlp'    the MLP's hidden width           'heads'  attention heads
  'kv'     the per-head width               'proj'   the projection output
  None     never sharded (position rows)

`dtype` is the compute dtype of the matmul inputs and attention. Matmuls
accumulate and return float32, and the residual stream, LayerNorm statistics,
softmax and the returned embedding stay float32, so bfloat16 costs little
accuracy (and on CPUs with bf16 dot instructions runs much faster).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Mesh axis for each logical axis. Only the mesh axes that exist in a given
# mesh are used; the rest is replicated. The text tower is small (63M params
# for ViT-B/32), so by default everything is replicated over 'data' and only an
# optional 'model' axis splits the MLP and the attention heads.
AXIS_RULES: dict[str, str | None] = {
    "vocab": None, "embed": None, "mlp": "model", "heads": "model",
    "kv": None, "proj": None,
}

# HF `hidden_act` names -> functions (as in transformers.activations.ACT2FN).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Pre-transformers#24773 CLIP configs carry eos_token_id = 2; HF keeps pooling
# those at argmax(input_ids) (end-of-text has the largest id in CLIP's vocab).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """The hyper-parameters the tower needs, named as in HF CLIPTextConfig."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  projection_dim: int
  eos_token_id: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                       f"supported: {', '.join(sorted(ACTIVATIONS))}")
    if self.num_hidden_layers < 1:
      raise ValueError("the text tower needs at least one layer")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")

  @classmethod
  def from_hf(cls, text_config: Any,
              projection_dim: int | None = None) -> ClipTextConfig:
    """From a transformers CLIPTextConfig (`projection_dim` overrides its own,
    as CLIPModel's top-level projection_dim does)."""
    eos = text_config.eos_token_id
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f"CLIP pooling needs a single eos_token_id, got {eos}")
      eos = eos[0]
    return cls(
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        max_position_embeddings=text_config.max_position_embeddings,
        projection_dim=(projection_dim if projection_dim is not None else
                        text_config.projection_dim),
        eos_token_id=int(eos),
        hidden_act=text_config.hidden_act,
        layer_norm_eps=float(text_config.layer_norm_eps))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def _init(names: tuple[str | None, ...], base=None):
  return nnx.with_partitioning(base or nnx.initializers.normal(0.02), names)


_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


def _dense(dtype) -> dict[str, Any]:
  """Linear-layer dtypes: `dtype` inputs, float32 parameters and results."""
  return dict(dtype=dtype, param_dtype=jnp.float32,
              preferred_element_type=jnp.float32)


def _layer_norm(config: ClipTextConfig, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
      param_dtype=jnp.float32, scale_init=_init(("embed",), _ONES),
      bias_init=_init(("embed",), _ZEROS), rngs=rngs)


def _take_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x[b, positions[b]] for each b, keeping a length-1 sequence axis."""
  return jnp.take_along_axis(x, positions[:, None, None], axis=1)


class ClipAttention(nnx.Module):
  """Causal multi-head self-attention; q/k/v kernels are (embed, heads, kv)."""

  def __init__(self, config: ClipTextConfig, dtype, rngs: nnx.Rngs):
    heads, head_dim = config.num_attention_heads, config.head_dim

    def in_proj():
      return nnx.LinearGeneral(
          config.hidden_size, (heads, head_dim), **_dense(dtype),
          kernel_init=_init(("embed", "heads", "kv")),
          bias_init=_init(("heads", "kv"), _ZEROS), rngs=rngs)

    self.q_proj, self.k_proj, self.v_proj = in_proj(), in_proj(), in_proj()
    self.out_proj = nnx.LinearGeneral(
        (heads, head_dim), config.hidden_size, axis=(-2, -1), **_dense(dtype),
        kernel_init=_init(("heads", "kv", "embed")),
        bias_init=_init(("embed",), _ZEROS), rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array,
               query_positions: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D), or (B, 1, D) at `query_positions` (B,)."""
    if query_positions is None:
      queries = x
      # Padding sits after end-of-text, and the causal mask already keeps
      # every real position (so the pooled one) from attending to it.
      mask, causal = None, True
    else:
      queries = _take_rows(x, query_positions)
      keys = jnp.arange(x.shape[1])[None, :] <= query_positions[:, None]
      mask, causal = keys[:, None, None, :], False
    q, k, v = (proj(y).astype(self.dtype) for proj, y in (
        (self.q_proj, queries), (self.k_proj, x), (self.v_proj, x)))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return self.out_proj(out)


class ClipMlp(nnx.Module):

  def __init__(self, config: ClipTextConfig, dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(
        config.hidden_size, config.intermediate_size, **_dense(dtype),
        kernel_init=_init(("embed", "mlp")),
        bias_init=_init(("mlp",), _ZEROS), rngs=rngs)
    self.fc2 = nnx.Linear(
        config.intermediate_size, config.hidden_size, **_dense(dtype),
        kernel_init=_init(("mlp", "embed")),
        bias_init=_init(("embed",), _ZEROS), rngs=rngs)
    self.activation = ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.activation(self.fc1(x)))


class ClipLayer(nnx.Module):
  """Pre-LayerNorm transformer layer (HF CLIPEncoderLayer)."""

  def __init__(self, config: ClipTextConfig, dtype, rngs: nnx.Rngs):
    self.layer_norm1 = _layer_norm(config, dtype, rngs)
    self.self_attn = ClipAttention(config, dtype, rngs)
    self.layer_norm2 = _layer_norm(config, dtype, rngs)
    self.mlp = ClipMlp(config, dtype, rngs)

  def __call__(self, x: jax.Array,
               query_positions: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D), or (B, 1, D) at `query_positions` (B,)."""
    attended = self.self_attn(self.layer_norm1(x), query_positions)
    if query_positions is not None:
      x = _take_rows(x, query_positions)
    x = x + attended  # float32: the projections return float32
    return x + self.mlp(self.layer_norm2(x))


class ClipTextTower(nnx.Module):
  """input_ids (B, T) int -> projected text embedding (B, projection_dim).

  T may be anything up to max_position_embeddings; pad after end-of-text with
  any id no larger than the end-of-text id (the pad does not change the
  result).
  """

  def __init__(self, config: ClipTextConfig, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.dtype = jnp.dtype(dtype)
    # Shardings are applied by `shard_model` from the logical names; creating
    # variables must not need a mesh in scope.
    with nnx.use_eager_sharding(False):
      self.token_embedding = nnx.Embed(
          config.vocab_size, config.hidden_size, param_dtype=jnp.float32,
          embedding_init=_init(("vocab", "embed")), rngs=rngs)
      self.position_embedding = nnx.Embed(
          config.max_position_embeddings, config.hidden_size,
          param_dtype=jnp.float32, embedding_init=_init((None, "embed")),
          rngs=rngs)
      self.layers = nnx.List([ClipLayer(config, self.dtype, rngs)
                              for _ in range(config.num_hidden_layers)])
      self.final_layer_norm = _layer_norm(config, self.dtype, rngs)
      self.text_projection = nnx.Linear(
          config.hidden_size, config.projection_dim, use_bias=False,
          **_dense(self.dtype), kernel_init=_init(("embed", "proj")),
          rngs=rngs)

  def pool_positions(self, input_ids: jax.Array) -> jax.Array:
    """Index of each row's end-of-text token, by HF CLIPTextModel's rule."""
    if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
      return jnp.argmax(input_ids, axis=-1)
    # First end-of-text: the pad token may equal it.
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    x = self.token_embedding(input_ids)
    x = x + self.position_embedding.embedding[...][:length]
    *layers, last = self.layers
    for layer in layers:
      x = layer(x)
    # Only the pooled position's output is used, so the last layer computes
    # just that position (its keys and values still come from every one),
    # and the final LayerNorm, being per position, follows the pooling.
    pooled = last(x, self.pool_positions(input_ids))[:, 0]
    pooled = self.final_layer_norm(pooled)
    return self.text_projection(pooled).astype(jnp.float32)


def random_tower(config: ClipTextConfig, *, dtype: Any = jnp.float32,
                 seed: int = 0, std: float = 0.02) -> ClipTextTower:
  """A tower with N(0, std) weights, unit LayerNorm scales and zero biases.

  Drawn with numpy into an abstract tower: on CPU, XLA compiles each
  differently shaped jax.random call separately (~0.5 s each), which would
  dominate building a tiny test model.
  """
  model = nnx.eval_shape(lambda: ClipTextTower(config, dtype=dtype))
  rng = np.random.default_rng(seed)
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param):
      continue
    shape = variable.shape
    if path[-1] == "scale":
      value = np.ones(shape, np.float32)
    elif path[-1] == "bias":
      value = np.zeros(shape, np.float32)
    else:
      value = rng.normal(0.0, std, shape).astype(np.float32)
    variable.set_value(jnp.asarray(value))
  return model


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                rules: dict[str, str | None] | None = None) -> None:
  """Places every parameter of `model` on `mesh` by its logical axis names.

  A logical axis whose rule names a mesh axis that `mesh` lacks, or one whose
  size the mesh axis does not divide, is replicated.
  """
  rules = AXIS_RULES if rules is None else rules
  for _, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Variable):
      continue
    names = variable.get_metadata().get("out_sharding") or ()
    axes = []
    for i, size in enumerate(variable.shape):
      axis = rules.get(names[i]) if i < len(names) and names[i] else None
      if axis not in mesh.axis_names or size % mesh.shape[axis]:
        axis = None
      axes.append(axis)
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*axes))
    variable.set_value(jax.device_put(variable.get_value(), sharding))
