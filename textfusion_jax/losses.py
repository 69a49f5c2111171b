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
* complementarity: 2 - [corr(IR, Y_f - Y_vis) + corr(Y_vis, Y_f - IR)] per
  crop (Pearson correlations over its pixels), i.e. 2 minus the crop's SCD:
  0 when the fused image carries all of both sources' variation (Y_f = IR +
  Y_vis + c), about 1.1-1.3 for a copy of either source.
* reference: L1 between the fused RGB image and a reference fusion, which
  the train step makes with a frozen trained model (config.train.
  reference_from) from the target visible crop and the prompt "clean visible
  image", or, with config.data.degradations.renamed_reference
  'prompted_fusion', from the true sentence's target, then mapped per
  channel to what the crop's prompt asks for (`train_step.reference_fusion`);
  0 when no reference is given. Degraded training only.

Why the complementarity term: the first three reward copying. Each is a sum
or mean over the two sources, and on real training crops all three fall when
the IR is faded out of the fusion (total -10% at IR gain 0.6 against 1,
visible gain 1; see model.fuse_luma), just as the sum-over-sources metrics
(MI, VIF, SSIM, Qabf) rank a copy of the visible image first. Trained with
them alone, the fusion head halved the IR's share on held-out TNO (CC_ir
0.41 -> 0.28). The complementarity term is lowest with both gains at 1, and
weight 2 keeps both sources in the fusion.

When the data provide a clean visible image (`vis_target`, e.g. for a
low-light or degraded input), it replaces `vis` in every target, SSIM
included: SSIM's luminance and contrast terms against the dark, noisy
recording would pull the output back towards the degradation.

Why the reference term: on a degraded input the other terms are minimised by
another mix of the sources than on the clean pair (the dark, noisy visible
image is trusted less), so the fusion under the true condition sentence
drifted from what the model makes of the clean pair. "The prompt names what
to undo" means: fuse as if the visible image were clean.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from textfusion_jax import color
from textfusion_jax import gaussian
from textfusion_jax.errors import UserError

LOSS_TERMS = ("intensity", "gradient", "ssim", "color", "complementarity",
              "reference")
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def sobel_magnitude(y: jax.Array) -> jax.Array:
  """|Sx| + |Sy| of a (B, H, W, 1) image, edge-padded to keep its size."""
  p = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  # Separable Sobel: a [1, 2, 1] smoothing across a central difference.
  dx = p[:, :, 2:] - p[:, :, :-2]
  dy = p[:, 2:] - p[:, :-2]
  sx = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
  sy = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
  return jnp.abs(sx) + jnp.abs(sy)


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean SSIM of each pair of (B, H, W, 1) images in [0, 1]: shape (B,)."""
  size = min(_SSIM_WINDOW, a.shape[1], a.shape[2])
  batch = a.shape[0]
  # Moments about each image's mean: E[x^2] - E[x]^2 then cancels far less
  # in float32 (a constant image gets exactly zero variance).
  shift_a = jnp.mean(a, axis=(1, 2, 3), keepdims=True)
  shift_b = jnp.mean(b, axis=(1, 2, 3), keepdims=True)
  a, b = a - shift_a, b - shift_b
  # One filter call for the five local moments, stacked along the batch.
  moments = gaussian.filter_valid(
      jnp.concatenate([a, b, a * a, b * b, a * b], axis=0),
      gaussian.window(size, _SSIM_SIGMA))
  mu_a, mu_b, aa, bb, ab = jnp.split(moments, 5, axis=0)
  var_a = aa - mu_a**2
  var_b = bb - mu_b**2
  cov = ab - mu_a * mu_b
  mu_a, mu_b = mu_a + shift_a, mu_b + shift_b
  ssim_map = ((2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2) /
              ((mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)))
  return jnp.mean(ssim_map.reshape(batch, -1), axis=1)


def _correlation(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pearson correlation of each (B, H, W, 1) pair over its pixels; 0 if flat."""
  a = a - jnp.mean(a, axis=(1, 2, 3), keepdims=True)
  b = b - jnp.mean(b, axis=(1, 2, 3), keepdims=True)
  cov = jnp.sum(a * b, axis=(1, 2, 3))
  # Clamped inside the sqrt: its gradient at 0 would be inf (NaN updates on
  # a crop where F - VIS is flat).
  norm_sq = jnp.sum(a * a, axis=(1, 2, 3)) * jnp.sum(b * b, axis=(1, 2, 3))
  return cov / jnp.sqrt(jnp.maximum(norm_sq, 1e-16))


def complementarity(fused_y: jax.Array, ir: jax.Array,
                    vis_y: jax.Array) -> jax.Array:
  """Per-crop 2 - SCD, shape (B,); see the module docstring."""
  return 2.0 - (_correlation(ir, fused_y - vis_y) +
                _correlation(vis_y, fused_y - ir))


def _check_weights(weights: Mapping[str, float]) -> None:
  names = set(weights.keys())
  if names != set(LOSS_TERMS):
    raise UserError(f"loss weights must name exactly {LOSS_TERMS}; missing "
                     f"{sorted(set(LOSS_TERMS) - names)}, unknown "
                     f"{sorted(names - set(LOSS_TERMS))}")


def fusion_loss(fused_rgb: jax.Array, vis: jax.Array, ir: jax.Array,
                weights: Mapping[str, float],
                vis_target: jax.Array | None = None,
                reference: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted fusion loss and its unweighted parts.

  Args:
    fused_rgb: (B, H, W, 3) fused image in [0, 1].
    vis: (B, H, W, 3) visible input in [0, 1].
    ir: (B, H, W, 1) infrared input in [0, 1].
    weights: a weight for each of LOSS_TERMS (`config.loss`, configs/default.py).
    vis_target: optional clean (B, H, W, 3) visible image that replaces `vis`
      in every target (the scene the caption describes, before degradation).
    reference: optional (B, H, W, 3) reference fusion for the 'reference'
      term (its part is 0 without one).

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
      "complementarity": jnp.mean(complementarity(fused_y, ir, vis_y)),
      "reference": (jnp.zeros((), jnp.float32) if reference is None else
                    jnp.mean(jnp.abs(fused_rgb.astype(jnp.float32) -
                                     reference.astype(jnp.float32)))),
  }
  total = sum(weights[name] * parts[name] for name in LOSS_TERMS)
  return jnp.asarray(total, jnp.float32), parts
