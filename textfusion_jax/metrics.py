"""Image-fusion quality metrics in JAX (jit- and vmap-safe, float32).

The twelve metrics follow MMIF-CDDFuse `utils/Evaluator.py`, the evaluator
most infrared-visible fusion papers since 2023 copy, quirks included, so the
numbers are comparable with those papers. Inputs are grey images as float
arrays on the 0..255 scale, F (fused), A (= IR) and B (= VIS), all (H, W) with
H, W >= `MIN_SIZE`. Files are read as 8-bit and colour is turned to grey by
OpenCV's rule Y = 0.299 R + 0.587 G + 0.114 B, rounded (`rgb_to_grey` here,
`image_io.as_grey_u8` on the host); a colour fused image is scored on that
grey. Below, mean(.) is over all pixels and corr(x, y) is Pearson's
correlation sum(dx dy) / sqrt(sum(dx^2) sum(dy^2)) with d = x - mean(x).

Copying one source unchanged maxes its half of MI, VIF, Qabf and SSIM (sums
over the two sources) and outranks most published methods on them; SCD and CC
punish copying. Score methods beside the trivial fusions of
`textfusion_jax.fusion_baselines` (which gives the numbers), and use the
per-source parts (`SOURCE_PART_NAMES`, below) to see which source a method
keeps.

Single-image metrics (of F):

* EN: Shannon entropy, in bits, of the 256-bin histogram of round(F).
* SD: population standard deviation.
* SF: sqrt(mean(dx^2) + mean(dy^2)), dx and dy forward differences
  (each mean over its own (H, W-1) or (H-1, W) differences).
* AG: mean of sqrt((Gx^2 + Gy^2) / 2), Gx and Gy as numpy.gradient: central
  differences (x[i+1] - x[i-1]) / 2 inside, one-sided x[1] - x[0] and
  x[-1] - x[-2] at the borders.

Metrics against the sources:

* MI: MI(F, A) + MI(F, B) in nats, MI(X, Y) = H(X) + H(Y) - H(X, Y) from the
  exact joint histogram of integer grey levels, each pair's probabilities
  being counts / (H W) (sklearn's mutual_info_score, clipped at 0).
* SCD: corr(A, F - B) + corr(B, F - A).
* VIF: VIFp(A, F) + VIFp(B, F), the pixel-domain VIF of Sheikh and Bovik:
  scales 1..4, Gaussian window of N = 2^(5 - scale) + 1 taps with sd N / 5
  (normalised to sum 1; MATLAB's zeroing of taps below eps * max never
  triggers for these sizes, so the window is exactly separable), 'valid'
  filtering, and before scales 2..4 the images are filtered ('valid') with
  that scale's window and subsampled [::2, ::2]. Per pixel, with local
  (population-weighted) variances s1 (reference), s2 (fused) and covariance
  s12: s1, s2 clamped at 0; g = s12 / (s1 + eps); sv = s2 - g s12; where
  s1 < eps: g = 0, sv = s2, s1 = 0; where s2 < eps: g = 0, sv = 0; where
  g < 0: sv = s2, g = 0; sv = max(sv, eps) (sv <= eps -> eps).
  VIFp = sum log10(1 + g^2 s1 / (sv + 2)) / sum log10(1 + s1 / 2), sums over
  pixels and scales, sigma_n^2 = 2, eps = 1e-10; a 0/0 ratio (a reference
  with no local variance anywhere) counts as 1.
* Qabf: Xydeas-Petrovic edge preservation. Sobel responses Sx, Sy by 2-D
  convolution ('same', zero padded) with [[-1,0,1],[-2,0,2],[-1,0,1]] and
  [[1,2,1],[0,0,0],[-1,-2,-1]]; strength g = sqrt(Sx^2 + Sy^2); orientation
  a = arctan(Sy / Sx) (arctan, not arctan2), pi/2 where Sx == 0. Per source
  S: G = gF / gS where gS > gF, gS / gF where gS < gF and, a quirk kept from
  the reference, gF where gS == gF; Aa = 1 - |aS - aF| / (pi / 2);
  Q = 0.9994 / (1 + exp(-15 (G - 0.5))) * 0.9879 / (1 + exp(-22 (Aa - 0.8)));
  Qabf = sum(Q_A gA + Q_B gB) / sum(gA + gB).
* SSIM: ssim(F, A) + ssim(F, B), each scikit-image's default
  structural_similarity: 7x7 uniform window, sample (N - 1) covariances,
  K1 = 0.01, K2 = 0.03 and data_range = 2 (old scikit-image's assumption for
  float input; it makes C1, C2 negligible on the 0..255 scale, hence SSIM
  sums near 1), averaged over the (H - 6) x (W - 6) windows inside the image.
* CC: (corr(A, F) + corr(B, F)) / 2.
* Per-source parts: MI_ir = MI(F, A), VIF_ir = VIFp(A, F), SSIM_ir =
  ssim(F, A), CC_ir = corr(A, F), Qabf_ir = sum(Q_A gA) / sum(gA + gB) (A's
  share of Qabf's weighted sum); _vis likewise with B. MI, VIF, SSIM and Qabf
  are the sums of their two parts, CC is their mean.
* MSE: (mean((A - F)^2) + mean((B - F)^2)) / 2 on the 0..255 scale.
* PSNR: 10 log10(max(F)^2 / MSE), also on the 0..255 scale (peak = max(F),
  not 255).

Zero-variance inputs. Where the reference is finite this module gives the
same value (e.g. a constant F: EN = SD = SF = AG = 0, MI = 0 up to float32
round-off (~5e-7), VIF = 0; a constant source: its VIFp = 1). Where the
reference divides 0 by 0 and returns NaN, we return a finite, documented
value instead: a correlation with a zero-variance signal (CC, SCD terms) is
0; Qabf with no source edges at all is 0; PSNR with MSE = 0 is +inf. PSNR of
an all-black F (max(F) = 0) is -inf, as in the reference. Nothing returns
NaN.

Padded batches. `all_metrics` and `batched_all_metrics` take an optional valid
size (h, w) per image: the image then occupies the top-left h x w of the
array, the rest is ignored, and the results equal those of the cropped image.
The sizes may be traced values, so images of different sizes can share one
compiled bucket shape (see `textfusion_jax.score_folders`).

Precision. Everything runs in float32 and is tested against a float64 oracle
(`textfusion_jax.metrics_reference`) and the reference evaluator's values to
1e-3 relative error per image and 1e-4 on means (observed: ~1e-6, and 2e-4
where the reference's own float32 SSIM is noisy). Local
(co)variances are computed with a separable two-level merge about each
window's centre (law of total variance) instead of E[x^2] - E[x]^2, which in
float32 would cancel catastrophically on the 0..255 scale; flat windows thus
get exactly zero variance, as VIF's eps tests need. Global means are taken
about a pixel of the image so that constant images give exactly zero
deviations. EN and MI bin round(x) clipped to 0..255 (identical to the
reference for integer input; for non-integer fused values, as in training,
they score the 8-bit image that saving would produce, whereas the other
metrics use the values as given; `to_grey_levels` rounds first).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from input_pipeline.errors import UserError

METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM",
                "CC", "PSNR", "MSE")
# Per-source parts of the paired metrics: X_ir compares F with IR, X_vis with
# VIS. MI, VIF, SSIM and Qabf are the sums of their parts, CC their mean.
PAIRED_METRICS = ("MI", "VIF", "SSIM", "CC", "Qabf")
SOURCE_PART_NAMES = tuple(f"{m}_{s}" for m in PAIRED_METRICS
                          for s in ("ir", "vis"))
ALL_METRIC_NAMES = METRIC_NAMES + SOURCE_PART_NAMES

# VIF's coarsest scale needs 41 pixels: 'valid' filters of 17, then 9 and
# stride 2, 5 and stride 2, 3 and stride 2 must leave at least one window.
MIN_SIZE = 41

_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
_QABF_TG, _QABF_KG, _QABF_DG = 0.9994, -15.0, 0.5
_QABF_TA, _QABF_KA, _QABF_DA = 0.9879, -22.0, 0.8
_SSIM_WIN, _SSIM_K1, _SSIM_K2, _SSIM_DATA_RANGE = 7, 0.01, 0.03, 2.0
_LEVELS = 256

Array = jax.Array
Size = int | Array

# --------------------------------------------------------------------------
# Grey conversion.


def rgb_to_grey(rgb: Array) -> Array:
  """OpenCV BGR2GRAY of 8-bit RGB (..., 3) -> float32 grey levels (...).

  Y = 0.299 R + 0.587 G + 0.114 B rounded to the nearest integer, evaluated
  exactly in integers (299 R + 587 G + 114 B) / 1000 with ties to even, as
  `image_io.rgb_to_grey_u8` does on the host. The reference evaluator's
  float32 OpenCV conversion rounds 904 of the 2^24 RGB triples (exact ties)
  the other way (checked exhaustively against opencv-python 4.10).
  """
  rgb = jnp.clip(jnp.round(jnp.asarray(rgb, jnp.float32)), 0, 255)
  rgb = rgb.astype(jnp.int32)
  scaled = 299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]
  quotient, remainder = scaled // 1000, scaled % 1000
  round_up = (remainder > 500) | ((remainder == 500) & (quotient % 2 == 1))
  return (quotient + round_up).astype(jnp.float32)


def to_grey_levels(image: Array) -> Array:
  """Rounds and clips float values to the 0..255 levels an 8-bit file holds.

  Apply to a network's fused output to score exactly what saving it as an
  8-bit image and evaluating the file would score.
  """
  return jnp.clip(jnp.round(jnp.asarray(image, jnp.float32)), 0, 255)


# --------------------------------------------------------------------------
# Valid regions, masks and sums.


class _Region(NamedTuple):
  """Valid top-left extent (h, w) of a possibly padded (H, W) array."""
  h: Size
  w: Size

  def shrink(self, by: int) -> _Region:
    """Extent of the 'valid' outputs of a `by + 1`-tap window."""
    return _Region(self.h - by, self.w - by)

  def subsample(self, taps: int) -> _Region:
    """Extent after a 'valid' `taps` filter and [::2, ::2]."""
    return _Region((self.h - taps + 2) // 2, (self.w - taps + 2) // 2)

  def mask(self, shape: tuple[int, ...]) -> Array:
    rows = jnp.arange(shape[-2])[:, None] < self.h
    cols = jnp.arange(shape[-1])[None, :] < self.w
    return rows & cols

  def count(self) -> Array:
    return jnp.asarray(self.h * self.w, jnp.float32)


def _total(x: Array) -> Array:
  return jnp.sum(x, axis=(-2, -1))


def _masked_sums(terms: Sequence[Array], region: _Region) -> list[Array]:
  """Sums over the valid region of same-shape (..., H, W) images."""
  mask = region.mask(terms[0].shape)
  return [_total(jnp.where(mask, t, 0.0)) for t in terms]


def _masked_mean(x: Array, region: _Region) -> Array:
  return _masked_sums([x], region)[0] / region.count()


def _safe_ratio(num: Array, den: Array, default: float) -> Array:
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), default)


def _check_images(*images: Array, min_size: int = 1) -> tuple[Array, ...]:
  """float32 copies of same-shape (H, W) images (checked at trace time)."""
  arrays = tuple(jnp.asarray(x, jnp.float32) for x in images)
  shape = arrays[0].shape
  if len(shape) != 2:
    raise UserError(f"expected grey (H, W) images, got shape {shape}; use "
                     "jax.vmap or batched_all_metrics for batches")
  if any(x.shape != shape for x in arrays):
    raise UserError("F, IR and VIS differ in shape: "
                     f"{[tuple(x.shape) for x in arrays]}")
  if min(shape) < min_size:
    raise UserError(f"images of {shape[0]}x{shape[1]} are too small: these "
                     f"metrics need at least {min_size}x{min_size} pixels")
  return arrays


def _full(x: Array) -> _Region:
  return _Region(x.shape[-2], x.shape[-1])


# --------------------------------------------------------------------------
# Histograms.


def _grey_levels_int(x: Array) -> Array:
  return jnp.clip(jnp.round(x), 0, _LEVELS - 1).astype(jnp.int32)


def _entropy_nats(counts: Array, total: Array) -> Array:
  """Shannon entropy (nats) of integer `counts` summing to `total`."""
  counts = counts.astype(jnp.float32)
  safe = jnp.where(counts > 0, counts, 1.0)
  # H = log(N) - sum(n log n) / N avoids per-bin divisions.
  return jnp.log(total) - jnp.sum(counts * jnp.log(safe)) / total


def _histogram(index: Array, length: int, valid: Array) -> Array:
  """Exact integer counts of `index` over [0, length), skipping ~valid."""
  index = jnp.where(valid, index, length).ravel()  # extra bin for padding
  return jnp.zeros(length + 1, jnp.int32).at[index].add(1)[:length]


def _joint_histograms(f: Array, a: Array, b: Array,
                      region: _Region) -> tuple[Array, Array]:
  """Exact 256x256 joint histograms of (F, A) and (F, B), one scatter-add."""
  lf, la, lb = (_grey_levels_int(x) for x in (f, a, b))
  pairs = _LEVELS * _LEVELS
  index = jnp.stack([lf * _LEVELS + la, pairs + lf * _LEVELS + lb])
  valid = jnp.broadcast_to(region.mask(f.shape), index.shape)
  counts = _histogram(index, 2 * pairs, valid)
  return (counts[:pairs].reshape(_LEVELS, _LEVELS),
          counts[pairs:].reshape(_LEVELS, _LEVELS))


def _mi_from_joint(joint: Array, total: Array) -> Array:
  """MI (nats) of a joint histogram, clipped at 0 like sklearn."""
  mi = (_entropy_nats(joint.sum(axis=1), total) +
        _entropy_nats(joint.sum(axis=0), total) -
        _entropy_nats(joint, total))
  return jnp.maximum(mi, 0.0)


# --------------------------------------------------------------------------
# Separable filters and windowed moments.


def _take(x: Array, start: int, size: int, axis: int, stride: int = 1):
  return jax.lax.slice_in_dim(x, start, start + stride * (size - 1) + 1,
                              stride, axis=axis)


def _filter_valid(x: Array, taps: Sequence[float], axis: int,
                  stride: int = 1) -> Array:
  """'valid' 1-D correlation along `axis`, keeping every `stride`-th output."""
  size = (x.shape[axis] - len(taps)) // stride + 1
  return sum(w * _take(x, k, size, axis, stride) for k, w in enumerate(taps))


def _filter2d_valid(x: Array, taps: Sequence[float], stride: int = 1) -> Array:
  """Separable 'valid' 2-D filter with window outer(taps, taps)."""
  return _filter_valid(_filter_valid(x, taps, -1, stride), taps, -2, stride)


def _merge_pass(means: Sequence[Array], variances: Sequence[Array] | None,
                covariances: Sequence[Array] | None,
                pairs: Sequence[tuple[int, int]], taps: Sequence[float],
                axis: int):
  """One separable pass of windowed weighted moments along `axis`.

  Each output window combines the `len(taps)` input cells' means, variances
  and covariances by the law of total (co)variance, with the cell means taken
  relative to the window's centre cell (exact zeros for flat windows, no
  E[x^2] - E[x]^2 cancellation). `variances`/`covariances` None means the
  inputs are single pixels (zero within-cell spread).
  """
  n, centre = len(taps), len(taps) // 2
  size = means[0].shape[axis] - n + 1
  anchors = [_take(m, centre, size, axis) for m in means]
  devs = [[_take(m, k, size, axis) - c for k in range(n)]
          for m, c in zip(means, anchors)]
  shifts = [sum(w * d for w, d in zip(taps, dv)) for dv in devs]
  out_means = [c + s for c, s in zip(anchors, shifts)]
  out_vars = [sum(w * d * d for w, d in zip(taps, dv)) - s * s
              for dv, s in zip(devs, shifts)]
  out_covs = [
      sum(w * di * dj for w, di, dj in zip(taps, devs[i], devs[j])) -
      shifts[i] * shifts[j] for i, j in pairs
  ]
  if variances is not None:
    out_vars = [v + _filter_valid(vin, taps, axis)
                for v, vin in zip(out_vars, variances)]
    out_covs = [c + _filter_valid(cin, taps, axis)
                for c, cin in zip(out_covs, covariances)]
  return out_means, out_vars, out_covs


def _local_moments(images: Sequence[Array], pairs: Sequence[tuple[int, int]],
                   taps: Sequence[float]):
  """'valid' windowed means, variances and pair covariances.

  The window is outer(taps, taps) with taps summing to 1; moments are
  population moments under those weights.
  """
  first = _merge_pass(images, None, None, pairs, taps, -1)
  return _merge_pass(*first, pairs, taps, -2)


# --------------------------------------------------------------------------
# Metric kernels on float32 images with a valid region (shared by the public
# single-metric functions and `all_metrics`).


def _centred(images: Sequence[Array], region: _Region) -> Array:
  """(k, H, W) deviations from each image's mean, zero outside `region`.

  Means are taken about one of the pixels so that a constant image has
  exactly its value as mean and deviations of exactly zero (see the
  zero-variance rules).
  """
  pivots = jnp.stack([x[..., 0, 0] for x in images])[:, None, None]
  shifted = jnp.stack(images) - pivots
  means = jnp.stack(_masked_sums(list(shifted), region)) / region.count()
  mask = region.mask(shifted.shape)
  return jnp.where(mask, shifted - means[:, None, None], 0.0)


def _correlation(dx: Array, dy: Array) -> Array:
  """Pearson correlation of centred images; 0 if either has no variance."""
  sxy, sxx, syy = (_total(p) for p in (dx * dy, dx * dx, dy * dy))
  return _safe_ratio(sxy, jnp.sqrt(sxx) * jnp.sqrt(syy), 0.0)


def _sd(df: Array, region: _Region) -> Array:
  return jnp.sqrt(_total(df * df) / region.count())


def _global_stats(f: Array, a: Array, b: Array,
                  region: _Region) -> dict[str, Array]:
  """SD, CC and SCD from one set of centred images."""
  # F - B and F - A are centred on their own means (not as dF - dB) so that
  # a constant difference gives exactly zero deviations, as in the reference.
  df, da, db, d_fb, d_fa = _centred([f, a, b, f - b, f - a], region)
  cc_ir, cc_vis = _correlation(da, df), _correlation(db, df)
  return {
      "SD": _sd(df, region),
      "CC": (cc_ir + cc_vis) / 2,
      "CC_ir": cc_ir,
      "CC_vis": cc_vis,
      "SCD": _correlation(da, d_fb) + _correlation(db, d_fa),
  }


def _en(f: Array, region: _Region) -> Array:
  counts = _histogram(_grey_levels_int(f), _LEVELS, region.mask(f.shape))
  return _entropy_nats(counts, region.count()) / math.log(2)


def _mi(f: Array, a: Array, b: Array, region: _Region) -> Array:
  joint_a, joint_b = _joint_histograms(f, a, b, region)
  total = region.count()
  return _mi_from_joint(joint_a, total) + _mi_from_joint(joint_b, total)


def _sum_of_parts(name: str, part_ir: Array, part_vis: Array
                  ) -> dict[str, Array]:
  return {name: part_ir + part_vis, f"{name}_ir": part_ir,
          f"{name}_vis": part_vis}


def _sf(f: Array, region: _Region) -> Array:
  dx = f[:, 1:] - f[:, :-1]
  dy = f[1:, :] - f[:-1, :]
  (sum_x,) = _masked_sums([dx * dx], _Region(region.h, region.w - 1))
  (sum_y,) = _masked_sums([dy * dy], _Region(region.h - 1, region.w))
  return jnp.sqrt(sum_x / (region.h * (region.w - 1)) + sum_y /
                  ((region.h - 1) * region.w))


def _gradient(x: Array, axis: int, length: Size) -> Array:
  """numpy.gradient along `axis` of a signal with `length` valid samples."""
  n = x.shape[axis]
  nxt = jnp.concatenate([_take(x, 1, n - 1, axis), _take(x, n - 1, 1, axis)],
                        axis=axis)
  prev = jnp.concatenate([_take(x, 0, 1, axis), _take(x, 0, n - 1, axis)],
                         axis=axis)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim + axis)
  return jnp.where(index == 0, nxt - x,
                   jnp.where(index == length - 1, x - prev, (nxt - prev) / 2))


def _ag(f: Array, region: _Region) -> Array:
  gx, gy = _gradient(f, -1, region.w), _gradient(f, -2, region.h)
  return _masked_mean(jnp.sqrt((gx * gx + gy * gy) / 2), region)


def _vif_taps(scale: int) -> tuple[float, ...]:
  """1-D factor of the reference's Gaussian window (taps sum to 1)."""
  n = 2**(5 - scale) + 1
  sd = n / 5.0
  x = np.arange(n) - (n - 1) / 2
  g = np.exp(-x * x / (2 * sd * sd))
  # MATLAB's fspecial zeroes 2-D taps below eps * max; the smallest 2-D tap
  # is the corner g[0]^2, so if that survives the window is exactly the
  # outer product of the normalised 1-D taps.
  assert g[0]**2 >= np.finfo(np.float64).eps * g.max()**2
  return tuple(float(v) for v in g / g.sum())


def _vifp_integrands(s1: Array, s2: Array,
                     s12: Array) -> tuple[Array, Array]:
  """Per-pixel numerator and denominator terms, the reference's rules."""
  eps = _VIF_EPS
  s1 = jnp.maximum(s1, 0.0)
  s2 = jnp.maximum(s2, 0.0)
  g = s12 / (s1 + eps)
  sv = s2 - g * s12
  low1 = s1 < eps
  g = jnp.where(low1, 0.0, g)
  sv = jnp.where(low1, s2, sv)
  s1 = jnp.where(low1, 0.0, s1)
  low2 = s2 < eps
  g = jnp.where(low2, 0.0, g)
  sv = jnp.where(low2, 0.0, sv)
  negative = g < 0
  sv = jnp.where(negative, s2, sv)
  g = jnp.where(negative, 0.0, g)
  sv = jnp.where(sv <= eps, eps, sv)
  # log10(1 + x) as log1p: exact for the tiny x of near-flat windows.
  num = jnp.log1p(g * g * s1 / (sv + _VIF_SIGMA_NSQ)) / math.log(10)
  den = jnp.log1p(s1 / _VIF_SIGMA_NSQ) / math.log(10)
  return num, den


def _vif(f: Array, a: Array, b: Array, region: _Region) -> Array:
  return sum(_vif_parts(f, a, b, region))


def _vif_parts(f: Array, a: Array, b: Array,
               region: _Region) -> tuple[Array, Array]:
  """(VIFp(A, F), VIFp(B, F))."""
  images = [a, b, f]
  num = [0.0, 0.0]
  den = [0.0, 0.0]
  for scale in range(1, 5):
    taps = _vif_taps(scale)
    if scale > 1:
      images = [_filter2d_valid(x, taps, stride=2) for x in images]
      region = region.subsample(len(taps))
    _, (va, vb, vf), covs = _local_moments(images, ((0, 2), (1, 2)), taps)
    valid = region.shrink(len(taps) - 1)
    for i, (v_src, cov) in enumerate(((va, covs[0]), (vb, covs[1]))):
      n_i, d_i = _masked_sums(_vifp_integrands(v_src, vf, cov), valid)
      num[i] = num[i] + n_i
      den[i] = den[i] + d_i
  # den == 0 implies num == 0: the reference's NaN ratio, counted as 1.
  return tuple(_safe_ratio(n, d, 1.0) for n, d in zip(num, den))


def _arctan(t: Array) -> Array:
  """float32 arctan (Cephes atanf, ~1e-7 abs error); XLA's is ~20x slower."""
  at = jnp.abs(t)
  big = at > 2.414213562373095  # tan(3 pi / 8)
  mid = at > 0.4142135623730950  # tan(pi / 8)
  x = jnp.where(big, -1.0 / jnp.where(big, at, 1.0),
                jnp.where(mid, (at - 1.0) / (at + 1.0), at))
  offset = jnp.where(big, math.pi / 2, jnp.where(mid, math.pi / 4, 0.0))
  z = x * x
  poly = ((((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1)
           * z - 3.33329491539e-1) * z * x + x)
  return jnp.copysign(offset + poly, t)


def _edges(x: Array) -> tuple[Array, Array]:
  """Sobel strength and arctan orientation, 'same' with zero padding."""
  p = jnp.pad(x, 1)
  # convolve2d flips the kernels: Sx = col(j-1) - col(j+1) of the [1, 2, 1]
  # vertical smoothing, Sy = row(i+1) - row(i-1) of the horizontal one.
  v = p[:-2, :] + 2 * p[1:-1, :] + p[2:, :]
  h = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
  sx, sy = v[:, :-2] - v[:, 2:], h[2:, :] - h[:-2, :]
  strength = jnp.sqrt(sx * sx + sy * sy)
  nonzero = sx != 0
  angle = jnp.where(nonzero, _arctan(sy / jnp.where(nonzero, sx, 1.0)),
                    math.pi / 2)
  return strength, angle


def _edge_preservation(g_s: Array, a_s: Array, g_f: Array,
                       a_f: Array) -> Array:
  ratio = jnp.where(g_s > g_f, g_f / jnp.where(g_s > 0, g_s, 1.0),
                    jnp.where(g_s == g_f, g_f,
                              g_s / jnp.where(g_f > 0, g_f, 1.0)))
  align = 1 - jnp.abs(a_s - a_f) / (math.pi / 2)
  q_g = _QABF_TG / (1 + jnp.exp(_QABF_KG * (ratio - _QABF_DG)))
  q_a = _QABF_TA / (1 + jnp.exp(_QABF_KA * (align - _QABF_DA)))
  return q_g * q_a


def _qabf(f: Array, a: Array, b: Array, region: _Region) -> Array:
  return sum(_qabf_parts(f, a, b, region))


def _qabf_parts(f: Array, a: Array, b: Array,
                region: _Region) -> tuple[Array, Array]:
  """Each source's share of Qabf: sum(Q_S g_S) / sum(g_A + g_B)."""
  # Zero the padding: 'same' convolution then sees the zeros it pads with.
  mask = region.mask(f.shape)
  (g_f, a_f), (g_a, a_a), (g_b, a_b) = (_edges(jnp.where(mask, x, 0.0))
                                        for x in (f, a, b))
  num_a, num_b, den = _masked_sums(
      [_edge_preservation(g_a, a_a, g_f, a_f) * g_a,
       _edge_preservation(g_b, a_b, g_f, a_f) * g_b, g_a + g_b], region)
  return _safe_ratio(num_a, den, 0.0), _safe_ratio(num_b, den, 0.0)


def _ssim(f: Array, a: Array, b: Array, region: _Region) -> Array:
  return sum(_ssim_parts(f, a, b, region))


def _ssim_parts(f: Array, a: Array, b: Array,
                region: _Region) -> tuple[Array, Array]:
  """(ssim(F, A), ssim(F, B))."""
  taps = (1.0 / _SSIM_WIN,) * _SSIM_WIN
  (mf, ma, mb), (vf, va, vb), (cfa, cfb) = _local_moments(
      [f, a, b], ((0, 1), (0, 2)), taps)
  n = _SSIM_WIN * _SSIM_WIN
  cov_norm = n / (n - 1)  # sample covariance, as scikit-image
  c1 = (_SSIM_K1 * _SSIM_DATA_RANGE)**2
  c2 = (_SSIM_K2 * _SSIM_DATA_RANGE)**2
  maps = [((2 * mf * ms + c1) * (2 * cov_norm * cfs + c2) /
           ((mf * mf + ms * ms + c1) * (cov_norm * (vf + vs) + c2)))
          for ms, vs, cfs in ((ma, va, cfa), (mb, vb, cfb))]
  valid = region.shrink(_SSIM_WIN - 1)
  sum_a, sum_b = _masked_sums(maps, valid)
  return sum_a / valid.count(), sum_b / valid.count()


def _mse(f: Array, a: Array, b: Array, region: _Region) -> Array:
  sum_a, sum_b = _masked_sums([(a - f)**2, (b - f)**2], region)
  return (sum_a + sum_b) / (2 * region.count())


def _psnr_from_mse(f: Array, mse_value: Array, region: _Region) -> Array:
  peak = jnp.max(jnp.where(region.mask(f.shape), f, -jnp.inf))
  ratio = peak * peak / jnp.where(mse_value > 0, mse_value, 1.0)
  return jnp.where(mse_value > 0, 10 * jnp.log10(ratio), jnp.inf)


# --------------------------------------------------------------------------
# Public API: one function per metric, and all twelve at once.


def en(fused: Array) -> Array:
  """EN: entropy (bits) of the 256-bin grey-level histogram of F."""
  (f,) = _check_images(fused)
  return _en(f, _full(f))


def sd(fused: Array) -> Array:
  """SD: population standard deviation of F."""
  (f,) = _check_images(fused)
  region = _full(f)
  return _sd(_centred([f], region)[0], region)


def sf(fused: Array) -> Array:
  """SF: spatial frequency of F (forward differences)."""
  (f,) = _check_images(fused, min_size=2)
  return _sf(f, _full(f))


def ag(fused: Array) -> Array:
  """AG: average gradient of F (numpy.gradient differences)."""
  (f,) = _check_images(fused, min_size=2)
  return _ag(f, _full(f))


def mi(fused: Array, ir: Array, vis: Array) -> Array:
  """MI: MI(F, IR) + MI(F, VIS) in nats, from exact joint histograms."""
  f, a, b = _check_images(fused, ir, vis)
  return _mi(f, a, b, _full(f))


def scd(fused: Array, ir: Array, vis: Array) -> Array:
  """SCD: corr(IR, F - VIS) + corr(VIS, F - IR)."""
  f, a, b = _check_images(fused, ir, vis)
  return _global_stats(f, a, b, _full(f))["SCD"]


def vif(fused: Array, ir: Array, vis: Array) -> Array:
  """VIF: VIFp(IR, F) + VIFp(VIS, F), multi-scale pixel-domain VIF."""
  f, a, b = _check_images(fused, ir, vis, min_size=MIN_SIZE)
  return _vif(f, a, b, _full(f))


def qabf(fused: Array, ir: Array, vis: Array) -> Array:
  """Qabf: Xydeas-Petrovic gradient-based edge preservation."""
  f, a, b = _check_images(fused, ir, vis)
  return _qabf(f, a, b, _full(f))


def ssim(fused: Array, ir: Array, vis: Array) -> Array:
  """SSIM: ssim(F, IR) + ssim(F, VIS), scikit-image defaults, data_range 2."""
  f, a, b = _check_images(fused, ir, vis, min_size=_SSIM_WIN)
  return _ssim(f, a, b, _full(f))


def cc(fused: Array, ir: Array, vis: Array) -> Array:
  """CC: (corr(IR, F) + corr(VIS, F)) / 2."""
  f, a, b = _check_images(fused, ir, vis)
  return _global_stats(f, a, b, _full(f))["CC"]


def psnr(fused: Array, ir: Array, vis: Array) -> Array:
  """PSNR: 10 log10(max(F)^2 / MSE) in dB (0..255 scale)."""
  f, a, b = _check_images(fused, ir, vis)
  region = _full(f)
  return _psnr_from_mse(f, _mse(f, a, b, region), region)


def mse(fused: Array, ir: Array, vis: Array) -> Array:
  """MSE: (MSE(F, IR) + MSE(F, VIS)) / 2 (0..255 scale)."""
  f, a, b = _check_images(fused, ir, vis)
  return _mse(f, a, b, _full(f))


def _check_concrete_size(size: tuple[Size, Size] | Array,
                         shape: tuple[int, ...]) -> None:
  """A size given as plain numbers must fit the arrays and be scorable (a
  traced one is the caller's duty): past the array, EN came out 12.4 bits."""
  if isinstance(size, jax.core.Tracer) or any(
      isinstance(v, jax.core.Tracer) for v in size):
    return
  h, w = (int(v) for v in size)
  if not (MIN_SIZE <= h <= shape[0] and MIN_SIZE <= w <= shape[1]):
    raise UserError(f"size=({h}, {w}) must lie within the {shape[0]}x"
                     f"{shape[1]} arrays and be at least {MIN_SIZE} pixels "
                     "each way")


def all_metrics(fused: Array, ir: Array, vis: Array,
                size: tuple[Size, Size] | Array | None = None
               ) -> dict[str, Array]:
  """All twelve metrics of one (H, W) triple and their per-source parts.

  Keyed by `ALL_METRIC_NAMES`: the twelve `METRIC_NAMES`, then
  `SOURCE_PART_NAMES` (e.g. MI_ir = MI(F, IR), Qabf_vis = the VIS share of
  Qabf's edge-weighted sum).

  `size` = (h, w), possibly traced, scores only the top-left h x w of padded
  arrays (h, w >= MIN_SIZE is the caller's duty then); None scores it all.
  Shares the intermediate work: F's histogram (EN) is a marginal of the joint
  histograms (MI), SD/CC/SCD share the centred images, PSNR reuses MSE.
  Works under jax.jit and jax.vmap.
  """
  f, a, b = _check_images(fused, ir, vis, min_size=MIN_SIZE)
  if size is not None:
    _check_concrete_size(size, f.shape)
  region = _full(f) if size is None else _Region(size[0], size[1])
  # Zero the padding so that nothing computed from it can be inf or NaN.
  mask = region.mask(f.shape)
  f, a, b = (jnp.where(mask, x, 0.0) for x in (f, a, b))
  joint_a, joint_b = _joint_histograms(f, a, b, region)
  count = region.count()
  mse_value = _mse(f, a, b, region)
  values = {
      "EN": _entropy_nats(joint_a.sum(axis=1), count) / math.log(2),
      "SF": _sf(f, region),
      "AG": _ag(f, region),
      **_sum_of_parts("MI", _mi_from_joint(joint_a, count),
                      _mi_from_joint(joint_b, count)),
      **_sum_of_parts("VIF", *_vif_parts(f, a, b, region)),
      **_sum_of_parts("Qabf", *_qabf_parts(f, a, b, region)),
      **_sum_of_parts("SSIM", *_ssim_parts(f, a, b, region)),
      "PSNR": _psnr_from_mse(f, mse_value, region),
      "MSE": mse_value,
      **_global_stats(f, a, b, region),
  }
  return {name: values[name] for name in ALL_METRIC_NAMES}


# XLA:CPU's default scheduler overlaps independent kernels at the price of ~4x
# the temporary memory (56 MB for a 640x480 triple), and an arena that large
# is mmapped and page-faulted afresh on every call: ~2x slower here. Pass
# these to jax.jit when jitting `all_metrics` for a CPU.
COMPILER_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _batched(fused, ir, vis, sizes, one_at_a_time: bool):
  args = (fused, ir, vis)
  if sizes is not None:
    args += (jnp.asarray(sizes, jnp.int32),)
  if one_at_a_time:
    return jax.lax.map(lambda triple: all_metrics(*triple), args)
  return jax.vmap(all_metrics)(*args)


# On a CPU one image after the other keeps the working set in cache (and the
# arena small); accelerators take the whole batch at once.
_batched_cpu = jax.jit(functools.partial(_batched, one_at_a_time=True),
                       compiler_options=COMPILER_OPTIONS)
_batched_accelerator = jax.jit(functools.partial(_batched, one_at_a_time=False))


def batched_all_metrics(fused: Array, ir: Array, vis: Array,
                        sizes: Array | None = None) -> dict[str, Array]:
  """Jitted `all_metrics` over a batch: (B, H, W) -> {name: (B,) values}.

  Inputs may be uint8 (converted on device). `sizes`, if given, is (B, 2)
  int: each image's valid (h, w) at the top left of zero-padded arrays.
  Compiled once per (B, H, W) and backend.
  """
  if jax.default_backend() == "cpu":
    return _batched_cpu(fused, ir, vis, sizes)
  return _batched_accelerator(fused, ir, vis, sizes)
