"""Building blocks of the fusion network: Restormer-style layers, channels last.

Every activation is NHWC. Modules take `dtype` (the compute dtype, e.g.
bfloat16) and keep their parameters in float32. Every parameter is created
through `annotated`, which attaches logical sharding axis names (documented in
`textfusion_jax.model`) with `nnx.with_partitioning`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import math

import jax
import jax.numpy as jnp
from flax import nnx

PARAM_DTYPE = jnp.float32
_LAYER_NORM_EPS = 1e-5  # Restormer's WithBias_LayerNorm.


def annotated(init: Callable, axes: Sequence[str | None]) -> Callable:
  """Wraps an initializer so its Variable carries logical axis names `axes`.

  Eager sharding (flax's default) needs a mesh in context; without one (CPU
  tests, the demo, nnx.eval_shape) the names stay metadata only, for
  `nnx.get_partition_spec` and a later sharded `jax.jit`. Under
  `jax.set_mesh(...)` plus `nnx.logical_axis_rules(...)` parameters are placed
  on creation instead.
  """
  eager = (nnx.using_eager_sharding() and
           not jax.sharding.get_abstract_mesh().empty)
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=eager)


def pointwise(in_features: int, out_features: int, *, dtype: jnp.dtype,
              rngs: nnx.Rngs, use_bias: bool = False,
              zero_init: bool = False) -> nnx.Linear:
  """1x1 convolution as a Dense layer over the channel axis."""
  kernel_init = (nnx.initializers.zeros_init() if zero_init else
                 nnx.initializers.lecun_normal())
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      param_dtype=PARAM_DTYPE,
      kernel_init=annotated(kernel_init, ("channels_in", "channels_out")),
      bias_init=annotated(nnx.initializers.zeros_init(), (None,)),
      rngs=rngs)


def _shifted_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 3x3 'SAME' conv as a sum of 9 shifted, scaled copies."""
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = jnp.zeros_like(x)
  for i in range(3):
    for j in range(3):
      out = out + padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
  return out


@jax.custom_vjp
def _depthwise_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _shifted_taps(x, kernel)


def _depthwise_cpu_fwd(x, kernel):
  return _shifted_taps(x, kernel), (x, kernel)


def _depthwise_cpu_bwd(residuals, grad):
  x, kernel = residuals
  # d/dx: correlation with the flipped kernel, i.e. the same shifted sum.
  dx = _shifted_taps(grad, kernel[::-1, ::-1])
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def tap_grad(tap):
    window = jax.lax.dynamic_slice(padded, (0, tap // 3, tap % 3, 0), x.shape)
    return jnp.sum(window * grad, axis=(0, 1, 2), dtype=jnp.float32)

  # A loop, not 9 unrolled sums: XLA:CPU fuses sibling reductions over shared
  # inputs into one multi-output kernel that runs ~7x slower.
  dk = jax.lax.map(tap_grad, jnp.arange(9))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_cpu.defvjp(_depthwise_cpu_fwd, _depthwise_cpu_bwd)


def _depthwise_conv(lhs, rhs, window_strides, padding, **kwargs):
  """`lax.conv_general_dilated` for nnx.Conv, faster for depthwise on CPU.

  XLA:CPU runs grouped convolutions ~20x slower (forward) than the same
  result built from 9 shifted multiply-adds; GPUs and TPUs have native
  depthwise kernels, so they keep the lax op.
  """
  shifted_ok = (jax.default_backend() == "cpu" and tuple(window_strides) ==
                (1, 1) and padding == "SAME" and rhs.shape[:3] == (3, 3, 1) and
                kwargs.get("preferred_element_type") is None)
  if shifted_ok:
    return _depthwise_cpu(lhs, rhs)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                      **kwargs)


def conv3x3(in_features: int, out_features: int, *, dtype: jnp.dtype,
            rngs: nnx.Rngs, depthwise: bool = False,
            init_scale: float = 1.0) -> nnx.Conv:
  """3x3 'SAME' convolution without bias; `depthwise` gives one filter/channel.

  Kernels are LeCun-normal with their variance multiplied by `init_scale`.
  """
  if depthwise and in_features != out_features:
    raise ValueError("a depthwise conv keeps the channel count")
  groups = in_features if depthwise else 1
  # A depthwise kernel's input dim has size 1: nothing to shard there.
  in_axis = None if depthwise else "channels_in"
  return nnx.Conv(
      in_features, out_features, kernel_size=(3, 3), padding="SAME",
      feature_group_count=groups, use_bias=False, dtype=dtype,
      param_dtype=PARAM_DTYPE,
      conv_general_dilated=(_depthwise_conv if depthwise else
                            jax.lax.conv_general_dilated),
      kernel_init=annotated(
          nnx.initializers.variance_scaling(init_scale, "fan_in",
                                            "truncated_normal"),
          ("conv_h", "conv_w", in_axis, "channels_out")),
      rngs=rngs)


def layer_norm(channels: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over channels (statistics are float32 even in bfloat16)."""
  return nnx.LayerNorm(
      channels, epsilon=_LAYER_NORM_EPS, dtype=dtype, param_dtype=PARAM_DTYPE,
      scale_init=annotated(nnx.initializers.ones_init(), (None,)),
      bias_init=annotated(nnx.initializers.zeros_init(), (None,)),
      rngs=rngs)


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C*f*f) -> (B, H*f, W*f, C) in torch.PixelShuffle's order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // factor**2, factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * factor, w * factor, c // factor**2)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
  """Inverse of `pixel_shuffle`: (B, H*f, W*f, C) -> (B, H, W, C*f*f)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // factor, w // factor, c * factor**2)


# Floor of the mean square per pixel in `_l2_normalize_pixels` (an RMS of
# 1e-3). An absolute floor of 1e-24 (torch's F.normalize) multiplies the
# gradient of an all-zero feature, e.g. of an all-black crop at init, by
# 1e12; global-norm clipping then turns the whole update toward it.
_NORMALIZE_MEAN_SQUARE_FLOOR = 1e-6


def _l2_normalize_pixels(x: jax.Array) -> jax.Array:
  """Unit L2 norm over the pixel axis 1, computed in float32.

  A sum of squares over ~1e5 pixels loses too much in bfloat16.
  """
  x32 = x.astype(jnp.float32)
  sum_sq = jnp.sum(x32 * x32, axis=1, keepdims=True)
  floor = _NORMALIZE_MEAN_SQUARE_FLOOR * x.shape[1]
  return (x32 * jax.lax.rsqrt(jnp.maximum(sum_sq, floor))).astype(x.dtype)


class QKVProjection(nnx.Module):
  """Queries, keys and values by a 1x1 conv, optionally then a 3x3 depthwise.

  Self-attention uses one C -> 3C projection (Restormer's qkv layout, one op
  fewer per block); cross-attention (`cross=True`) projects queries from `x`
  and keys/values from `context`. Returns (q, k, v), each (B, H, W, C).
  """

  def __init__(self, channels: int, *, cross: bool, depthwise: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    def projection(width: int) -> nnx.Sequential:
      parts = [pointwise(channels, width, dtype=dtype, rngs=rngs)]
      if depthwise:
        parts.append(conv3x3(width, width, depthwise=True, dtype=dtype,
                             rngs=rngs))
      return nnx.Sequential(*parts)

    self.cross = cross
    if cross:
      self.q = projection(channels)
      self.kv = projection(2 * channels)
    else:
      self.qkv = projection(3 * channels)

  def __call__(self, x: jax.Array, context: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.cross != (context is not None):
      raise ValueError("pass `context` exactly when built with cross=True")
    if self.cross:
      k, v = jnp.split(self.kv(context), 2, axis=-1)
      return self.q(x), k, v
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    return q, k, v


class ChannelAttention(nnx.Module):
  """Transposed multi-head attention over channels (Restormer's MDTA).

  q, k and v come from a 1x1 conv followed by a 3x3 depthwise conv. Each head
  compares its d channels through L2-normalised (over pixels) q and k, scaled
  by a learnt per-head temperature, so the attention map is d x d and the cost
  is linear in the pixel count. With `cross=True`, queries come from `x` and
  keys/values from `context` (cross attention between modalities).
  """

  def __init__(self, channels: int, heads: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs, cross: bool = False):
    if channels % heads:
      raise ValueError(f"{channels} channels do not split into {heads} heads")
    self.heads = heads
    self.qkv = QKVProjection(channels, cross=cross, depthwise=True,
                             dtype=dtype, rngs=rngs)
    self.temperature = nnx.Param(
        annotated(nnx.initializers.ones_init(), (None,))(
            rngs.params(), (heads,), PARAM_DTYPE))
    self.proj = pointwise(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None
              ) -> jax.Array:
    b, h, w, c = x.shape
    q, k, v = (t.reshape(b, -1, self.heads, c // self.heads)
               for t in self.qkv(x, context))
    logits = jnp.einsum("bnhd,bnhe->bhde", _l2_normalize_pixels(q),
                        _l2_normalize_pixels(k),
                        preferred_element_type=jnp.float32)
    logits = logits * self.temperature[...][:, None, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhde,bnhe->bnhd", attn, v)
    return self.proj(out.reshape(b, h, w, c))


class TokenAttention(nnx.Module):
  """Multi-head attention between H*W query tokens and (pooled) key tokens.

  Runs through `jax.nn.dot_product_attention` in its (B, L, heads, head_dim)
  layout, so `implementation='cudnn'` gives GPUs the fused flash kernel
  (bfloat16 only); None lets JAX pick (XLA today). `cross` as in
  `ChannelAttention`.

  Keys and values are average-pooled to at most `max_kv_tokens` positions
  (spatial-reduction attention, as PVT): full attention at 1/8 resolution is
  quadratic in pixels, 6912^2 logits per head for a 768x576 image, which
  took ~20 s on 2 CPU cores. The projections are linear, so pooling their
  outputs equals projecting pooled features. Feature maps of at most
  `max_kv_tokens` positions (a 96x96 training crop has 144) attend in full.
  """

  def __init__(self, channels: int, heads: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs, cross: bool = False,
               implementation: str | None = None,
               max_kv_tokens: int | None = None):
    if channels % heads:
      raise ValueError(f"{channels} channels do not split into {heads} heads")
    self.heads = heads
    self.implementation = implementation
    self.max_kv_tokens = max_kv_tokens
    self.qkv = QKVProjection(channels, cross=cross, depthwise=False,
                             dtype=dtype, rngs=rngs)
    self.proj = pointwise(channels, channels, use_bias=True, dtype=dtype,
                          rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None
              ) -> jax.Array:
    b, h, w, c = x.shape
    q, k, v = self.qkv(x, context)
    factor = kv_pool_factor(h, w, self.max_kv_tokens)
    if factor > 1:
      k, v = avg_pool(k, factor), avg_pool(v, factor)
    q, k, v = (t.reshape(b, -1, self.heads, c // self.heads)
               for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v,
                                       implementation=self.implementation)
    return self.proj(out.reshape(b, h, w, c))


def kv_pool_factor(height: int, width: int, max_tokens: int | None) -> int:
  """Smallest integer f with ceil(h / f) * ceil(w / f) <= max_tokens."""
  if not max_tokens or height * width <= max_tokens:
    return 1
  factor = max(2, math.isqrt(height * width // max_tokens))
  while -(-height // factor) * -(-width // factor) > max_tokens:
    factor += 1
  return factor


def avg_pool(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, C) mean over factor x factor windows, edge-padded to fit."""
  b, h, w, c = x.shape
  pad_h, pad_w = -h % factor, -w % factor
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  x = x.reshape(b, (h + pad_h) // factor, factor, (w + pad_w) // factor,
                factor, c)
  return jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x.dtype)


class FeedForward(nnx.Module):
  """Position-wise feed-forward with a 3x3 conv, in one of two forms.

  'gdfn':  Restormer's gated-dconv FFN: 1x1 C->2h, 3x3 depthwise,
           gelu(a) * b, 1x1 h->C.
  'dense': the FFN of Text-IF's released code: 1x1 C->h, full 3x3 conv h->h,
           gelu, 1x1 h->C (no gate). Its full conv holds about three quarters
           of Text-IF's 63.8 M parameters.
  h = int(C * expansion).
  """

  def __init__(self, channels: int, expansion: float, kind: str, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    hidden = int(channels * expansion)
    if kind == "gdfn":
      inner = 2 * hidden
    elif kind == "dense":
      inner = hidden
    else:
      raise ValueError(f"unknown FFN kind {kind!r}; use 'gdfn' or 'dense'")
    self.gated = kind == "gdfn"
    self.project_in = pointwise(channels, inner, dtype=dtype, rngs=rngs)
    self.conv = conv3x3(inner, inner, depthwise=self.gated, dtype=dtype,
                        rngs=rngs)
    self.project_out = pointwise(hidden, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.project_in(x))
    if self.gated:
      a, b = jnp.split(x, 2, axis=-1)
      x = jax.nn.gelu(a, approximate=False) * b
    else:
      x = jax.nn.gelu(x, approximate=False)
    return self.project_out(x)


class TransformerBlock(nnx.Module):
  """Restormer block: x + MDTA(LN(x)), then x + FFN(LN(x))."""

  def __init__(self, channels: int, heads: int, ffn_expansion: float,
               ffn_kind: str, *, dtype: jnp.dtype, rngs: nnx.Rngs,
               remat: bool = False):
    self.norm1 = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.attn = ChannelAttention(channels, heads, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.ffn = FeedForward(channels, ffn_expansion, ffn_kind, dtype=dtype,
                           rngs=rngs)
    # Rematerialisation: the backward pass recomputes the block's inner
    # activations instead of keeping them, so only its input is stored.
    self.remat = remat

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat:
      return _rematerialised_forward(self, x)
    return self._forward(x)

  def _forward(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.ffn(self.norm2(x))


# The block keeps no state it updates, so no variables are written back
# (graph_updates=True would refuse a block called inside a plain JAX
# transform, e.g. `jax.jit(lambda x: block(x))`).
_rematerialised_forward = nnx.remat(TransformerBlock._forward,
                                    graph_updates=False)


class SpatialSelfAttention(nnx.Module):
  """Pre-norm residual full-token self-attention: x + Attn(LN(x))."""

  def __init__(self, channels: int, heads: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs, implementation: str | None = None,
               max_kv_tokens: int | None = None):
    self.norm = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.attn = TokenAttention(channels, heads, dtype=dtype, rngs=rngs,
                               implementation=implementation,
                               max_kv_tokens=max_kv_tokens)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.attn(self.norm(x))


class CrossDomainAttention(nnx.Module):
  """IR queries attend to visible keys/values and visible queries to IR.

  kind='channel' uses transposed attention (linear in pixels, for the shallow
  levels); kind='token' full token attention (for the coarsest level). Each
  stream is pre-normalised and gets the attended result as a residual.
  """

  def __init__(self, channels: int, heads: int, kind: str, *,
               dtype: jnp.dtype, rngs: nnx.Rngs,
               implementation: str | None = None,
               max_kv_tokens: int | None = None):
    if kind == "channel":
      make = lambda: ChannelAttention(channels, heads, dtype=dtype, rngs=rngs,
                                      cross=True)
    elif kind == "token":
      make = lambda: TokenAttention(channels, heads, dtype=dtype, rngs=rngs,
                                    cross=True, implementation=implementation,
                                    max_kv_tokens=max_kv_tokens)
    else:
      raise ValueError(f"unknown attention kind {kind!r}")
    self.norm_vis = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.norm_ir = layer_norm(channels, dtype=dtype, rngs=rngs)
    self.vis_from_ir = make()
    self.ir_from_vis = make()

  def __call__(self, vis: jax.Array, ir: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    vis_n, ir_n = self.norm_vis(vis), self.norm_ir(ir)
    return (vis + self.vis_from_ir(vis_n, ir_n),
            ir + self.ir_from_vis(ir_n, vis_n))


class Downsample(nnx.Module):
  """Halves H and W, doubles C: 3x3 conv C->C/2, then pixel-unshuffle by 2."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels // 2, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return pixel_unshuffle(self.conv(x), 2)


class Upsample(nnx.Module):
  """Doubles H and W, halves C: 3x3 conv C->2C, then pixel-shuffle by 2."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, 2 * channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return pixel_shuffle(self.conv(x), 2)


class TextModulation(nnx.Module):
  """FiLM from the text embedding: x <- (1 + gamma) * x + beta, per channel.

  An MLP text_dim -> hidden (LeakyReLU) -> 2C gives (gamma, beta), as Text-IF's
  FeatureWiseAffine. Its last layer starts at zero, so an untrained model
  ignores the text. The MLP and the affine run in float32: with bfloat16,
  1 + gamma would round away gammas below ~4e-3.
  """

  def __init__(self, text_dim: int, hidden: int, channels: int, *,
               rngs: nnx.Rngs, min_gain: float | None = None):
    # With min_gain m the scale is m + (1 - m) exp(gamma) instead of
    # 1 + gamma: still 1 at init, but never below m.
    self.min_gain = min_gain
    self.hidden = nnx.Linear(
        text_dim, hidden, param_dtype=PARAM_DTYPE,
        kernel_init=annotated(nnx.initializers.lecun_normal(),
                              ("text_embed", "channels_out")),
        bias_init=annotated(nnx.initializers.zeros_init(), (None,)),
        rngs=rngs)
    self.out = pointwise(hidden, 2 * channels, use_bias=True, zero_init=True,
                         dtype=PARAM_DTYPE, rngs=rngs)

  def __call__(self, x: jax.Array, text_emb: jax.Array) -> jax.Array:
    params = self.out(jax.nn.leaky_relu(self.hidden(
        text_emb.astype(jnp.float32))))
    gamma, beta = jnp.split(params[:, None, None, :], 2, axis=-1)
    if self.min_gain is None:
      scale = 1.0 + gamma
    else:
      scale = self.min_gain + (1.0 - self.min_gain) * jnp.exp(gamma)
    return (scale * x.astype(jnp.float32) + beta).astype(x.dtype)
