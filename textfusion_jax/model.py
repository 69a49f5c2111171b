"""FusionNet: text-guided infrared-visible image fusion, and its presets.

Architecture (after Text-IF, CVPR 2024; see ../shared/ANCHORS.md beside the checkout):

* Text-guided input correction (config.text_vis_affine): a text MLP gives a
  per-channel gain and shift of the visible image, vis <- g vis + beta, before
  the encoder and as the base of the output residual. A caption
  such as "heavily underexposed, slightly hazy ... at dusk" fixes the gain and
  airlight that the pixels alone leave ambiguous (a dim dusk scene shot
  correctly looks like an underexposed daylit one), and undoing gain and haze
  is exactly a per-channel affine map. Zero-initialised: starts as identity.
  g = m + (1 - m) exp(gamma) with m = config.text_vis_min_gain (0.5), so it
  can brighten freely but never suppress the visible image below m: left
  unbounded, training learned g of 0.07-0.3, erasing the noisy visible image
  (the cheapest way to cut the gradient loss) and taking brightness from the
  IR, so the caption could not steer brightness.
* Two Restormer encoders, one per modality (visible RGB, IR grey), each a
  3x3 patch embedding then `len(num_blocks)` levels of transformer blocks
  (channel-wise MDTA attention + FFN), with conv + pixel-unshuffle between
  levels. Level l has dim * 2**l channels at 1/2**l resolution.
* Cross-domain attention at every level: IR queries attend to visible
  keys/values and vice versa. Shallow levels use transposed (channel-wise)
  attention; the coarsest level full token attention through
  `jax.nn.dot_product_attention`, then a 1x1 fusion conv and one spatial
  self-attention. Shallow levels merge the two streams with a 1x1 conv into a
  skip connection.
* Decoder: at each level the features are modulated by the text embedding,
  x <- (1 + gamma) x + beta (an MLP per level, last layer zero-initialised),
  then (below the coarsest level) concatenated with the fused skip, reduced by
  a 1x1 conv (not at the finest level, which keeps 2 * dim channels as in
  Restormer) and passed through transformer blocks; conv + pixel-shuffle
  upsamples between levels. Refinement blocks and a 3x3 output conv follow.
* Output, config.output:
  'fusion' (default): the head predicts, per pixel, log-gains a, b and a
    residual r, and the fused luma is
      Y = exp(b) (Y_vis - mean Y_vis) + exp(a) (IR - mean IR)
          + (mean Y_vis + mean IR) / 2 + r
    with the means over the image; the visible CbCr is re-attached. The
    untrained net (a = b = r = 0) returns the sum of both sources' contrast
    around their average brightness, so it fuses from the first step: a
    person warm only in the IR is already there, and training shapes where
    each source's detail goes. Heads that start from the visible image
    ('rgb', 'ycbcr') never left it in CPU-sized training on real pairs, and
    a blend w IR + (1 - w) VIS keeps the structure of the mean rule, whose SCD
    (1.59 on TNO) no weighting can raise.
  With config.vis_smoothing_sigmas (e.g. (1, 2, 4)) the head also predicts,
    per pixel, softmax weights over the corrected visible image and its
    Gaussian-blurred copies, and the rule (and the re-attached CbCr) uses
    that mix in place of the visible image. The visible term passes the
    input's pixels through a gain, so without it the noise that a prompt
    names reaches the output unless the residual cancels it pixel by pixel:
    on degraded TNO pairs the stage-2 model kept the grain, and with the
    noise removed from its input (the same prompts less the noise words)
    true prompts won Qabf and SSIM against shuffled ones, which they lose
    with it. The blurred copies give an edge-aware smoothing for the price of
    a few head channels. The weights start near the image itself
    (exp(-_SMOOTHING_LOGIT_OFFSET) per blurred copy).
  'rgb': an RGB residual on the visible image; 'ycbcr': a Y residual on the
    visible luma with the visible CbCr re-attached.
  All are clipped to [0, 1] and returned in float32.
* config.input_stride s > 1 runs the network at 1/s resolution: the sources
  are pixel-unshuffled into s*s times the channels (FFDNet's reversible
  downsampling) and the head's output is pixel-shuffled back, so the output
  rule still acts on every full-resolution pixel.
* Any H, W: inputs are reflect-padded to a multiple of s * 2**(levels - 1)
  and the output is cropped back. Padded pixels take part in attention (as in
  Restormer's test-time padding).

Logical sharding axes. Every parameter is created with
`nnx.with_partitioning` and one of these names per dimension (None: small,
replicate); `nnx.get_partition_spec(nnx.state(model))` returns them, and the
training config maps them to mesh axes by rules:

  'conv_h', 'conv_w'  spatial dims of 3x3 conv kernels.
  'channels_in'       input features of conv / dense kernels.
  'channels_out'      output features of conv / dense kernels.
  'text_embed'        text-embedding input dim of the modulation MLPs.
  None                biases, LayerNorm scales, attention temperatures, and
                      the size-1 input dim of depthwise kernels.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
from flax import nnx

from textfusion_jax import color
from textfusion_jax import gaussian
from textfusion_jax import layers
from textfusion_jax.errors import UserError

OUTPUT_MODES = ("fusion", "rgb", "ycbcr")
_HEAD_CHANNELS = {"fusion": 3, "rgb": 3, "ycbcr": 1}
# Bounds of the fusion head's log-gains: gains stay in [e^-4, e^1].
_LOG_GAIN_RANGE = (-4.0, 1.0)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FFN_KINDS = ("gdfn", "dense")
ATTENTION_IMPLS = (None, "xla", "cudnn")  # jax.nn.dot_product_attention's
_HEAD_INIT_SCALE = 1e-4  # Variance multiplier of the output conv's init.
# Logit handicap of each blurred visible copy, so the untrained head keeps
# (at 3 copies) 87% of the sharp image.
_SMOOTHING_LOGIT_OFFSET = 3.0


def model_config(preset: str) -> ml_collections.ConfigDict:
  """Returns a fresh ConfigDict for 'tiny', 'small', 'base' or 'large'.

  tiny:  unit tests (82,290 parameters with 512-d text).
  small: the CPU demo and the shipped model (2,750,905 parameters with 512-d
         text, 2,177,465 with the 64-d tiny text tower; half resolution,
         trains at 96x96, batch 8, on 2 CPU cores).
  base:  Text-IF's sizes (dim 48, blocks 2/2/2/2, heads 1/2/4/8, FFN x2,
         its dense-conv FFN): 64,776,402 parameters (Text-IF: 63.8 M; 0.5 M
         of ours are the text-guided visible correction's MLP).
  large: base at twice the width (dim 96): 253,484,850 parameters, for
         sharded training and scaling studies (docs/scaling.md).
  tests/test_model.py pins these counts.
  """
  c = ml_collections.ConfigDict()
  # Channels of the first level (at 1/input_stride resolution); level l has
  # dim * 2**l.
  c.dim = 48
  # Transformer blocks per level (encoders, decoder); length = level count.
  c.num_blocks = (2, 2, 2, 2)
  # Attention heads per level; the finest decoder level uses heads[0].
  c.heads = (1, 2, 4, 8)
  # FFN hidden width as a multiple of the channels.
  c.ffn_expansion = 2.0
  # 'gdfn' (Restormer, gated depthwise) or 'dense' (Text-IF's full 3x3 conv).
  c.ffn = "dense"
  # Transformer blocks at full resolution after the decoder.
  c.refinement_blocks = 4
  # Text MLP scales/shifts the visible input per channel (undoes captioned
  # exposure and haze; see the module docstring).
  c.text_vis_affine = True
  # Floor of that gain (see the module docstring); None leaves it unbounded.
  c.text_vis_min_gain = 0.5
  # Width of the text embedding (CLIP ViT-B/32: 512).
  c.text_dim = 512
  # Hidden width of each modulation MLP (Text-IF: 2 * text_dim).
  c.text_hidden = 1024
  # 'fusion': gains on both sources' contrast + residual (see module doc);
  # 'rgb': RGB residual on the visible image; 'ycbcr': Y residual + vis CbCr.
  c.output = "fusion"
  # 'fusion' only: blur sigmas (full-resolution pixels) of smoothed copies of
  # the corrected visible image the head mixes in per pixel (see the module
  # docstring); () uses the image as it is.
  c.vis_smoothing_sigmas = ()
  # Compute dtype, 'float32' or 'bfloat16'; params and output stay float32.
  c.dtype = "float32"
  # dot_product_attention implementation: None (XLA) or 'cudnn' (GPU, bf16);
  # a placeholder, so --config.model.attention_impl=cudnn overrides it.
  c.attention_impl = config_dict.placeholder(str)
  # Keys/values of the coarsest level's token attention are average-pooled
  # to at most this many positions (0: never); a 96x96 crop has 144.
  c.max_kv_tokens = 256
  # Recompute each transformer block's activations in the backward pass
  # instead of storing them: training memory for about a third more compute
  # (large crops or batches per device; same parameters, and the same
  # gradients up to rounding).
  c.remat = False
  # The network runs at 1/input_stride resolution: the sources enter
  # pixel-unshuffled (FFDNet's reversible downsampling) and the head's output
  # is pixel-shuffled back, so every pixel keeps its own output.
  c.input_stride = 1
  if preset == "base":
    pass
  elif preset == "large":
    # Twice base's width: for scaling studies (docs/scaling.md), sharded
    # with FSDP.
    c.dim = 96
    c.text_hidden = 2048
  elif preset == "small":
    # XLA:CPU time grows with the op count and the full-resolution width, so
    # few blocks at half resolution (input_stride 2: a 768x576 pair in 0.5 s
    # on 2 cores, against 1.1 s for dim 8 at full resolution); the wider text
    # MLPs add parameters almost for free.
    c.dim = 16
    c.input_stride = 2
    c.num_blocks = (1, 1, 1, 2)
    c.ffn = "gdfn"
    c.refinement_blocks = 0
    c.text_hidden = 256
  elif preset == "tiny":
    # text_dim stays 512 so that tests can feed real CLIP embeddings. Two
    # levels, the fewest the U-Net takes: XLA:CPU compile time grows with the
    # op count, and the suite compiles the train step for many variants
    # (13.7 s against 22.0 s with three levels, on 2 cores).
    c.dim = 8
    c.num_blocks = (1, 1)
    c.heads = (1, 2)
    c.ffn = "gdfn"
    c.refinement_blocks = 1
    c.text_hidden = 32
  else:
    raise UserError(f"unknown preset {preset!r}; use one of {PRESETS}")
  return c


PRESETS = ("tiny", "small", "base", "large")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first inconsistent config.model field."""

  def whole(field: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise UserError(f"config.model.{field}={value!r}: must be a whole "
                      f"number >= {least}")

  for field, least in (("dim", 2), ("input_stride", 1), ("text_hidden", 1),
                       ("refinement_blocks", 0), ("max_kv_tokens", 0)):
    whole(field, config.get(field, least), least)
  if not isinstance(config.get("remat", False), bool):
    raise UserError(f"config.model.remat={config.remat!r}: must be True or "
                    "False")
  for field in ("num_blocks", "heads"):
    values = tuple(config[field])
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1
           for v in values):
      raise UserError(f"config.model.{field}={values}: each must be a whole "
                      "number >= 1")
  expansion = config.ffn_expansion
  if isinstance(expansion, bool) or not (
      isinstance(expansion, (int, float)) and expansion > 0
      and math.isfinite(expansion)):
    raise UserError(f"config.model.ffn_expansion={expansion!r}: must be > 0")
  if config.ffn not in FFN_KINDS:
    raise UserError(f"config.model.ffn={config.ffn!r}: must be one of "
                    f"{FFN_KINDS}")
  if config.get("attention_impl") not in ATTENTION_IMPLS:
    raise UserError(f"config.model.attention_impl={config.attention_impl!r}"
                    f": must be one of {ATTENTION_IMPLS}")
  if config.get("attention_impl") == "cudnn" and config.dtype == "float32":
    raise UserError("config.model.attention_impl='cudnn' needs "
                    "config.model.dtype='bfloat16' (cuDNN's fused attention "
                    "has no float32 kernel)")
  min_gain = config.get("text_vis_min_gain")
  if min_gain is not None and (
      isinstance(min_gain, bool) or not isinstance(min_gain, (int, float))
      or not 0 <= min_gain < 1):
    # m >= 1 makes m + (1 - m) exp(gamma) fall below 0 for gamma > 0.
    raise UserError(f"config.model.text_vis_min_gain={min_gain!r}: must be "
                    ">= 0 and < 1 (or None: unbounded)")
  levels = len(config.num_blocks)
  if levels < 2:
    raise UserError(f"config.model.num_blocks={tuple(config.num_blocks)}: "
                    "needs at least 2 levels")
  if config.dim % 2:
    raise UserError(f"config.model.dim={config.dim} must be even "
                    "(downsampling halves, then pixel-unshuffles the channels)")
  if len(config.heads) != levels:
    raise UserError(f"config.model.heads={tuple(config.heads)} has "
                    f"{len(config.heads)} entries, config.model.num_blocks "
                    f"{levels}")
  for level, heads in enumerate(config.heads):
    channels = config.dim * 2**level
    if channels % heads:
      raise UserError(f"config.model.heads={tuple(config.heads)}: level "
                      f"{level}'s {channels} channels (config.model.dim="
                      f"{config.dim}) do not split into {heads} heads")
  if 2 * config.dim % config.heads[0]:
    raise UserError(f"config.model.heads={tuple(config.heads)}: 2 * dim = "
                    f"{2 * config.dim} must split into heads[0] heads")
  if config.output not in OUTPUT_MODES:
    raise UserError(f"config.model.output={config.output!r}: must be one of "
                    f"{OUTPUT_MODES}")
  sigmas = tuple(config.get("vis_smoothing_sigmas", ()) or ())
  try:
    positive = all(float(s) > 0 for s in sigmas)
  except (TypeError, ValueError):
    positive = False
  if sigmas and config.output != "fusion":
    raise UserError(f"config.model.vis_smoothing_sigmas={sigmas} needs "
                    f"config.model.output='fusion', got {config.output!r}")
  if not positive:
    raise UserError(f"config.model.vis_smoothing_sigmas={sigmas}: each sigma "
                    "must be > 0")
  if config.dtype not in COMPUTE_DTYPES:
    raise UserError(f"config.model.dtype={config.dtype!r}: must be one of "
                    f"{tuple(COMPUTE_DTYPES)}")


class Encoder(nnx.Module):
  """Patch embedding, then one stack of transformer blocks per level."""

  def __init__(self, in_channels: int, config: ml_collections.ConfigDict, *,
               rngs: nnx.Rngs):
    dtype = COMPUTE_DTYPES[config.dtype]
    self.embed = layers.conv3x3(in_channels, config.dim, dtype=dtype,
                                rngs=rngs)
    self.levels = nnx.List()
    self.downs = nnx.List()
    for level, (blocks, heads) in enumerate(zip(config.num_blocks,
                                                config.heads)):
      channels = config.dim * 2**level
      if level:
        self.downs.append(layers.Downsample(channels // 2, dtype=dtype,
                                           rngs=rngs))
      self.levels.append(_blocks(blocks, channels, heads, config, rngs))

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns the features of every level, finest first."""
    features = [self.levels[0](self.embed(x))]
    for down, level in zip(self.downs, self.levels[1:]):
      features.append(level(down(features[-1])))
    return features


def _blocks(count: int, channels: int, heads: int,
            config: ml_collections.ConfigDict, rngs: nnx.Rngs
            ) -> nnx.Sequential:
  return nnx.Sequential(*[
      layers.TransformerBlock(channels, heads, config.ffn_expansion,
                              config.ffn, dtype=COMPUTE_DTYPES[config.dtype],
                              rngs=rngs, remat=config.get("remat", False))
      for _ in range(count)])


class FusionNet(nnx.Module):
  """Fuses a visible and an IR image under a text embedding.

  __call__(vis, ir, text_emb): vis (B, H, W, 3) and ir (B, H, W, 1) floats in
  [0, 1], text_emb (B, text_dim) (or (1, text_dim), shared by the batch).
  Returns the fused (B, H, W, 3) RGB image, float32 in [0, 1].
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(config)
    self.output = config.output
    self.smoothing_sigmas = tuple(
        float(s) for s in config.get("vis_smoothing_sigmas", ()) or ())
    self.dtype = COMPUTE_DTYPES[config.dtype]
    self.num_levels = len(config.num_blocks)
    dtype = self.dtype
    dims = [config.dim * 2**level for level in range(self.num_levels)]
    deepest = self.num_levels - 1

    self.vis_correction = (
        layers.TextModulation(config.text_dim, config.text_hidden, 3,
                              rngs=rngs,
                              min_gain=config.get("text_vis_min_gain"))
        if config.get("text_vis_affine", False) else None)
    self.stride = config.get("input_stride", 1)
    self.vis_encoder = Encoder(3 * self.stride**2, config, rngs=rngs)
    self.ir_encoder = Encoder(self.stride**2, config, rngs=rngs)

    # Cross-domain attention and stream merging, finest level first.
    # cuDNN is a GPU kernel for the same math: a model trained with it
    # still fuses on a CPU or TPU, through XLA.
    attention_impl = (None if config.attention_impl == "cudnn" and
                      jax.default_backend() != "gpu"
                      else config.attention_impl)
    self.cross = nnx.List([
        layers.CrossDomainAttention(
            dims[level], config.heads[level],
            "token" if level == deepest else "channel", dtype=dtype,
            rngs=rngs, implementation=attention_impl,
            max_kv_tokens=config.get("max_kv_tokens"))
        for level in range(self.num_levels)])
    self.merge = nnx.List([
        layers.pointwise(2 * dims[level], dims[level], dtype=dtype, rngs=rngs)
        for level in range(self.num_levels)])
    self.deep_attention = layers.SpatialSelfAttention(
        dims[deepest], config.heads[deepest], dtype=dtype, rngs=rngs,
        implementation=attention_impl,
        max_kv_tokens=config.get("max_kv_tokens"))

    # Decoder, finest level first; the finest works at 2 * dim channels.
    dec_dims = [2 * dims[0]] + dims[1:]
    self.modulation = nnx.List([
        layers.TextModulation(config.text_dim, config.text_hidden, dims[level],
                              rngs=rngs)
        for level in range(self.num_levels)])
    self.ups = nnx.List([
        layers.Upsample(dec_dims[level + 1], dtype=dtype, rngs=rngs)
        for level in range(deepest)])
    self.reduce = nnx.List([
        layers.pointwise(2 * dims[level], dims[level], dtype=dtype, rngs=rngs)
        for level in range(1, deepest)])
    self.decoder = nnx.List([
        _blocks(config.num_blocks[level], dec_dims[level],
                config.heads[level], config, rngs)
        for level in range(self.num_levels)])
    self.refinement = _blocks(config.refinement_blocks, dec_dims[0],
                              config.heads[0], config, rngs)
    # Small output weights: the untrained net returns its output rule's base
    # (residual std ~0.02 instead of ~1.5) while every weight still gets a
    # gradient from the first step.
    self.head = layers.conv3x3(dec_dims[0],
                               (_HEAD_CHANNELS[config.output] +
                                len(self.smoothing_sigmas)) * self.stride**2,
                               dtype=dtype,
                               rngs=rngs, init_scale=_HEAD_INIT_SCALE)

  def __call__(self, vis: jax.Array, ir: jax.Array, text_emb: jax.Array,
               valid_size: jax.Array | None = None,
               source_means: jax.Array | None = None) -> jax.Array:
    """Fused RGB; the optional arguments serve padded images and tiles.

    valid_size: (B, 2) ints, each image's (h, w) at the top left of padded
      inputs; the fusion rule's means then skip the padding.
    source_means: (B, 4) mean R, G, B of the visible image and mean IR over
      the whole image, for a tile of it: the rule then anchors every tile
      at the image's brightness, not the tile's.
    """
    if vis.shape[-1] != 3 or ir.shape[-1] != 1 or vis.shape[:3] != ir.shape[:3]:
      raise ValueError(f"expected vis (B, H, W, 3) and ir (B, H, W, 1), got "
                       f"{vis.shape} and {ir.shape}")
    height, width = vis.shape[1:3]
    vis = vis.astype(jnp.float32)
    means = None
    if source_means is not None:
      source_means = jnp.asarray(source_means, jnp.float32)[:, None, None, :]
      mean_rgb = source_means[..., :3]
    if self.vis_correction is not None:
      vis = self.vis_correction(vis, text_emb)
      if source_means is not None:
        # The correction is affine per channel: it maps means to means.
        mean_rgb = self.vis_correction(mean_rgb, text_emb)
    if source_means is not None:
      means = (color.rgb_to_y(mean_rgb), source_means[..., 3:])
    multiple = self.stride * 2**(self.num_levels - 1)
    vis_pad = _pad_to_multiple(vis, multiple)
    ir_pad = _pad_to_multiple(ir.astype(jnp.float32), multiple)
    if self.stride > 1:
      vis_pad = layers.pixel_unshuffle(vis_pad, self.stride)
      ir_pad = layers.pixel_unshuffle(ir_pad, self.stride)

    vis_feats = self.vis_encoder(vis_pad.astype(self.dtype))
    ir_feats = self.ir_encoder(ir_pad.astype(self.dtype))
    skips = []
    for cross, merge, v, i in zip(self.cross, self.merge, vis_feats,
                                  ir_feats):
      v, i = cross(v, i)
      skips.append(merge(jnp.concatenate([v, i], axis=-1)))

    deepest = self.num_levels - 1
    x = self.deep_attention(skips[deepest])
    x = self.decoder[deepest](self.modulation[deepest](x, text_emb))
    for level in reversed(range(deepest)):
      x = self.modulation[level](self.ups[level](x), text_emb)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      if level:
        x = self.reduce[level - 1](x)
      x = self.decoder[level](x)
    head = self.head(self.refinement(x)).astype(jnp.float32)
    if self.stride > 1:
      head = layers.pixel_shuffle(head, self.stride)
    return self._to_rgb(head[:, :height, :width], vis,
                        ir.astype(jnp.float32), valid_size, means)

  def _to_rgb(self, head: jax.Array, vis: jax.Array, ir: jax.Array,
              valid_size: jax.Array | None,
              means: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    if self.output == "rgb":
      return jnp.clip(vis + head, 0.0, 1.0)
    if self.smoothing_sigmas:
      head, logits = jnp.split(head, [_HEAD_CHANNELS[self.output]], axis=-1)
      vis = smooth_visible(vis, logits, self.smoothing_sigmas)
    ycbcr = color.rgb_to_ycbcr(vis)
    if self.output == "ycbcr":
      y = ycbcr[..., :1] + head
    else:
      y = fuse_luma(ycbcr[..., :1], ir, *jnp.split(head, 3, axis=-1),
                    valid_size=valid_size, means=means)
    y = jnp.clip(y, 0.0, 1.0)
    rgb = color.ycbcr_to_rgb(jnp.concatenate([y, ycbcr[..., 1:]], axis=-1))
    return jnp.clip(rgb, 0.0, 1.0)


def smooth_visible(vis: jax.Array, logits: jax.Array,
                   sigmas: tuple[float, ...]) -> jax.Array:
  """Per-pixel softmax mix of `vis` (B, H, W, C) and its blurs by `sigmas`.

  logits: (B, H, W, len(sigmas)), one per blurred copy; the sharp image's
  logit is fixed at 0 and each copy's is handicapped by
  _SMOOTHING_LOGIT_OFFSET.
  """
  copies = [vis] + [gaussian.blur(vis, s) for s in sigmas]
  weights = jax.nn.softmax(jnp.concatenate(
      [jnp.zeros_like(logits[..., :1]), logits - _SMOOTHING_LOGIT_OFFSET],
      axis=-1), axis=-1)
  return sum(weights[..., k:k + 1] * copy for k, copy in enumerate(copies))


def masked_mean(x: jax.Array, valid_size: jax.Array | None) -> jax.Array:
  """(B, 1, 1, C) mean of (B, H, W, C) `x` over each image's valid pixels.

  `valid_size` (B, 2) ints: each image's own (h, w) at the top left of a
  padded array (None: all pixels).
  """
  if valid_size is None:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  size = jnp.asarray(valid_size, jnp.int32)[:, None, None, :]
  rows = jax.lax.broadcasted_iota(jnp.int32, x.shape[:3] + (1,), 1)
  cols = jax.lax.broadcasted_iota(jnp.int32, x.shape[:3] + (1,), 2)
  mask = ((rows < size[..., :1]) & (cols < size[..., 1:])).astype(jnp.float32)
  count = jnp.sum(mask, axis=(1, 2), keepdims=True)
  return jnp.sum(x * mask, axis=(1, 2), keepdims=True) / count


def fuse_luma(y_vis: jax.Array, ir: jax.Array, log_gain_ir: jax.Array,
              log_gain_vis: jax.Array, residual: jax.Array,
              valid_size: jax.Array | None = None,
              means: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """The 'fusion' output rule (module docstring), (B, H, W, 1) each.

  `valid_size` (B, 2) ints: each image's own (h, w) at the top left of a
  padded array; the means are then over those pixels only, so padding an
  image (into a bucket) does not shift its brightness. `means`, (mean visible
  luma, mean IR) each (B, 1, 1, 1), overrides both: a tile takes its whole
  image's.
  """
  if means is not None:
    mean_vis, mean_ir = means
  else:
    mean_vis = masked_mean(y_vis, valid_size)
    mean_ir = masked_mean(ir, valid_size)
  gain_ir = jnp.exp(jnp.clip(log_gain_ir, *_LOG_GAIN_RANGE))
  gain_vis = jnp.exp(jnp.clip(log_gain_vis, *_LOG_GAIN_RANGE))
  return (gain_vis * (y_vis - mean_vis) + gain_ir * (ir - mean_ir) +
          0.5 * (mean_vis + mean_ir) + residual)


def fold_text_standardization(params: dict, mean: jax.Array,
                              std: jax.Array, min_std_fraction: float = 0.1
                              ) -> dict:
  """Folds (e - mean) / std into the first layer of every text MLP.

  A data-dependent init for the parameter dict of a FusionNet: afterwards
  hidden(e) = W^T (e - mean) / std + b, so the MLPs see standardized caption
  embeddings. Captions of one domain share a large common component and
  differ by little (the demo's tiny text tower on the synthetic captions:
  per-dimension std 0.11 against a mean norm of 1.27), which otherwise leaves
  the zero-initialised (gamma, beta) a weak, slow-to-learn signal. Nothing extra is stored: the checkpoint holds the folded weights.

  Dimensions whose std is below `min_std_fraction` of the mean std are scaled
  as if at that floor, so unseen captions cannot blow up a near-constant
  dimension; if every caption is the same, only the mean is removed.
  """
  std = jnp.asarray(std, jnp.float32)
  floor = min_std_fraction * jnp.mean(std)
  inv_std = jnp.where(floor > 0, 1.0 / jnp.maximum(std, floor), 1.0)
  mean = jnp.asarray(mean, jnp.float32)

  def fold(hidden: dict) -> dict:
    kernel = hidden["kernel"] * inv_std[:, None]
    return {"kernel": kernel, "bias": hidden["bias"] - mean @ kernel}

  params = dict(params)
  params["modulation"] = {level: {**mlp, "hidden": fold(mlp["hidden"])}
                          for level, mlp in params["modulation"].items()}
  if "vis_correction" in params:
    mlp = params["vis_correction"]
    params["vis_correction"] = {**mlp, "hidden": fold(mlp["hidden"])}
  return params


def _pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
  """Pads H and W at the bottom/right up to a multiple, mirroring the image.

  'reflect' needs at least 2 pixels along an axis; a 1-pixel axis is
  edge-padded.
  """
  for axis in (1, 2):
    size = x.shape[axis]
    extra = -size % multiple
    if extra:
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, extra)
      x = jnp.pad(x, widths, mode="reflect" if size > 1 else "edge")
  return x


def build(config: ml_collections.ConfigDict, rng: jax.Array) -> FusionNet:
  """A FusionNet with parameters drawn from `rng`, unsharded.

  Shardings come from the caller's jit out_shardings, not from eager
  per-variable device puts.
  """
  with nnx.use_eager_sharding(False):
    return FusionNet(config, rngs=nnx.Rngs(params=rng))


def abstract_model(config: ml_collections.ConfigDict
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract parameter state) without allocating parameters."""
  model = nnx.eval_shape(lambda: build(config, jax.random.key(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))):
    raise ValueError("FusionNet holds non-parameter state; plain parameter "
                     "dicts would drop it")
  return graphdef, params


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (works on nnx.eval_shape'd models too)."""
  return sum(math.prod(p.shape)
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
