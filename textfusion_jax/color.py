"""RGB <-> YCbCr conversion in JAX for float images in [0, 1].

Convention: full-range BT.601 (JPEG), the one Text-IF's colour loss and
OpenCV's BGR2GRAY use:

  Y  =       0.299    R + 0.587    G + 0.114    B
  Cb = 0.5 - 0.168736 R - 0.331264 G + 0.5      B
  Cr = 0.5 + 0.5      R - 0.418688 G - 0.081312 B

Cb and Cr carry a +0.5 offset so that every channel of an in-gamut image lies
in [0, 1]. The inverse uses the exact matrix inverse, so a round trip is exact
to float rounding. Channels are last: (..., 3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Rows give Y, Cb, Cr as weights of R, G, B.
RGB_TO_YCBCR = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
], dtype=np.float64)
_YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR)
_OFFSET = np.array([0.0, 0.5, 0.5])


def _matmul(x: jax.Array, matrix: jax.Array) -> jax.Array:
  # 'highest' because TPUs otherwise round float32 matmul inputs to bfloat16,
  # which would put ~1e-3 errors into colours and losses.
  return jnp.matmul(x, matrix, precision=jax.lax.Precision.HIGHEST)


def rgb_to_ycbcr(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> (..., 3) Y, Cb, Cr in [0, 1]."""
  matrix = jnp.asarray(RGB_TO_YCBCR.T, rgb.dtype)
  return _matmul(rgb, matrix) + jnp.asarray(_OFFSET, rgb.dtype)


def ycbcr_to_rgb(ycbcr: jax.Array) -> jax.Array:
  """(..., 3) Y, Cb, Cr in [0, 1] -> (..., 3) RGB (not clipped)."""
  matrix = jnp.asarray(_YCBCR_TO_RGB.T, ycbcr.dtype)
  return _matmul(ycbcr - jnp.asarray(_OFFSET, ycbcr.dtype), matrix)


def rgb_to_y(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB -> (..., 1) luma Y, the grey level the fusion losses use."""
  weights = jnp.asarray(RGB_TO_YCBCR[0], rgb.dtype)
  return jnp.sum(rgb * weights, axis=-1, keepdims=True)


# Channels this close everywhere hold no visible colour (a grey frame with
# sensor or conversion noise), which a fusion must not tint.
GREY_TOLERANCE_LEVELS = 2


def is_grey(rgb: np.ndarray) -> bool:
  """Whether an (..., 3) image (uint8, or float in [0, 1]) is grey: its
  channels differ by at most GREY_TOLERANCE_LEVELS of 255 anywhere."""
  rgb = np.asarray(rgb)
  scale = 1.0 if np.issubdtype(rgb.dtype, np.integer) else 255.0
  spread = np.ptp(rgb.astype(np.float32), axis=-1)
  return bool(spread.max(initial=0.0) * scale
              <= GREY_TOLERANCE_LEVELS + 1e-3)
