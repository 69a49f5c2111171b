"""Unsupervised fusion losses (after Text-IF) on float images in [0, 1].

All terms compare luma Y (BT.601, `textfusion_jax.color`) or chroma, are
computed in float32, and are means over pixels and the batch:

* intensity: L1 between fused Y and max(IR, visible Y), pixel-wise.
* gradient:  L1 between |grad fused Y| and max(|grad IR|, |grad visible Y|).
  |grad| is the Sobel magnitude |Sx| + |Sy| (Text-IF's L_Grad), with edge
  (replicate) padding so borders get no false edges.
* ssim:      1 - mean(SSIM(fused Y, IR), SSIM(fused Y, visible Y)). SSIM uses
  a Gaussian window (11x11, sigma 1.5; shrunk to the image if smaller),
  'valid' filtering, K1 = 0.01, K2 = 0.03 and data range 1.
* color:     L1 between fused and visible Cb plus the same for Cr (a sum of
  two means, as Text-IF's L_color, so its weight 12 carries over).

When the data provide a clean visible image (`vis_target`, e.g. for a
low-light or degraded input), it replaces `vis` in every target, SSIM
included: SSIM's luminance and contrast terms against the dark, noisy
recording would pull the output back towards the degradation.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from textfusion_jax import color

LOSS_TERMS = ("intensity", "gradient", "ssim", "color")
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def default_loss_weights() -> ml_collections.ConfigDict:
  """Weights of the loss terms (Text-IF's defaults where it has one)."""
  w = ml_collections.ConfigDict()
  w.intensity = 1.0  # L1 of fused Y to max(IR, visible Y).
  w.gradient = 10.0  # L1 of Sobel magnitudes to the sources' maximum.
  w.ssim = 1.0  # 1 - SSIM, averaged over IR and visible Y.
  w.color = 12.0  # CbCr L1 to the visible image (Text-IF: 12).
  return w


def sobel_magnitude(y: jax.Array) -> jax.Array:
  """|Sx| + |Sy| of a (B, H, W, 1) image, edge-padded to keep its size."""
  p = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  # Separable Sobel: a [1, 2, 1] smoothing across a central difference.
  dx = p[:, :, 2:] - p[:, :, :-2]
  dy = p[:, 2:] - p[:, :-2]
  sx = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
  sy = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
  return jnp.abs(sx) + jnp.abs(sy)


def _gaussian_window(size: int) -> np.ndarray:
  offsets = np.arange(size) - (size - 1) / 2
  window = np.exp(-offsets**2 / (2 * _SSIM_SIGMA**2))
  return window / window.sum()


def _gaussian_filter(x: jax.Array, size: int) -> jax.Array:
  """'valid' separable Gaussian filter of (N, H, W, 1) images."""
  window = jnp.asarray(_gaussian_window(size), x.dtype)
  dn = ("NHWC", "HWIO", "NHWC")
  # 'highest': TPUs would otherwise round the filter inputs to bfloat16.
  conv = lambda v, k: jax.lax.conv_general_dilated(
      v, k, (1, 1), "VALID", dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  x = conv(x, window.reshape(size, 1, 1, 1))
  return conv(x, window.reshape(1, size, 1, 1))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean SSIM of each pair of (B, H, W, 1) images in [0, 1]: shape (B,)."""
  size = min(_SSIM_WINDOW, a.shape[1], a.shape[2])
  batch = a.shape[0]
  # One filter call for the five local moments, stacked along the batch.
  moments = _gaussian_filter(
      jnp.concatenate([a, b, a * a, b * b, a * b], axis=0), size)
  mu_a, mu_b, aa, bb, ab = jnp.split(moments, 5, axis=0)
  var_a = aa - mu_a**2
  var_b = bb - mu_b**2
  cov = ab - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2) /
              ((mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)))
  return jnp.mean(ssim_map.reshape(batch, -1), axis=1)


def _check_weights(weights: Mapping[str, float]) -> None:
  names = set(weights.keys())
  if names != set(LOSS_TERMS):
    raise ValueError(f"loss weights must name exactly {LOSS_TERMS}; missing "
                     f"{sorted(set(LOSS_TERMS) - names)}, unknown "
                     f"{sorted(names - set(LOSS_TERMS))}")


def fusion_loss(fused_rgb: jax.Array, vis: jax.Array, ir: jax.Array,
                weights: Mapping[str, float],
                vis_target: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted fusion loss and its unweighted parts.

  Args:
    fused_rgb: (B, H, W, 3) fused image in [0, 1].
    vis: (B, H, W, 3) visible input in [0, 1].
    ir: (B, H, W, 1) infrared input in [0, 1].
    weights: a weight for each of LOSS_TERMS (e.g. `default_loss_weights()`).
    vis_target: optional clean (B, H, W, 3) visible image that replaces `vis`
      in every target (the scene the caption describes, before degradation).

  Returns:
    (total, parts): the float32 scalar sum of weight * part, and a dict of the
    unweighted float32 scalar parts keyed by LOSS_TERMS.
  """
  _check_weights(weights)
  vis = (vis if vis_target is None else vis_target).astype(jnp.float32)
  fused = color.rgb_to_ycbcr(fused_rgb.astype(jnp.float32))
  source = color.rgb_to_ycbcr(vis)
  ir = ir.astype(jnp.float32)
  fused_y, vis_y = fused[..., :1], source[..., :1]

  grad_target = jnp.maximum(sobel_magnitude(ir), sobel_magnitude(vis_y))
  parts = {
      "intensity": jnp.mean(jnp.abs(fused_y - jnp.maximum(ir, vis_y))),
      "gradient": jnp.mean(jnp.abs(sobel_magnitude(fused_y) - grad_target)),
      "ssim": 1.0 - 0.5 * jnp.mean(ssim(fused_y, ir) +
                                   ssim(fused_y, vis_y)),
      "color": 2.0 * jnp.mean(jnp.abs(fused[..., 1:] - source[..., 1:])),
  }
  total = sum(weights[name] * parts[name] for name in LOSS_TERMS)
  return jnp.asarray(total, jnp.float32), parts
