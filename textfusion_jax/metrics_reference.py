"""Float64 numpy/scipy oracle of the fusion metrics in `textfusion_jax.metrics`.

A deliberately literal transcription of MMIF-CDDFuse `utils/Evaluator.py` (the
evaluator most fusion papers copy; conventions in `textfusion_jax.metrics` and
ANCHORS.md section 3), computed in float64 with scipy's direct 2-D
convolutions. It serves two purposes:

* the oracle the JAX implementation is tested against, and
* the speed baseline (it costs what the original evaluator costs, ~1 s per
  640x480 triple, most of it in VIF).

It keeps the reference's behaviour exactly, including its 0/0 cases: where the
reference evaluator returns NaN (a correlation with a zero-variance signal,
Qabf with two all-black sources, PSNR with F = IR = VIS = 0) this oracle
returns NaN too. `textfusion_jax.metrics` documents the finite values it
returns instead.

Inputs are float 0..255 grey (H, W) arrays (integer-valued when read from
8-bit files).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal

from textfusion_jax.metrics import METRIC_NAMES

# VIF constants (Sheikh & Bovik pixel-domain VIF, as in the reference).
_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
# Qabf constants (Xydeas & Petrovic).
_QABF_TG, _QABF_KG, _QABF_DG = 0.9994, -15.0, 0.5
_QABF_TA, _QABF_KA, _QABF_DA = 0.9879, -22.0, 0.8
# SSIM: scikit-image defaults with the float data_range of old scikit-image.
_SSIM_WIN, _SSIM_K1, _SSIM_K2, _SSIM_DATA_RANGE = 7, 0.01, 0.03, 2.0


def entropy(img: np.ndarray) -> float:
  """EN: Shannon entropy (bits) of the 256-bin grey-level histogram."""
  levels = np.uint8(np.round(img)).ravel()
  h = np.bincount(levels, minlength=256) / levels.size
  return float(-np.sum(h * np.log2(h + (h == 0))))


def standard_deviation(img: np.ndarray) -> float:
  """SD: population standard deviation."""
  return float(np.std(img))


def spatial_frequency(img: np.ndarray) -> float:
  """SF: sqrt(mean(dx^2) + mean(dy^2)) with forward differences."""
  return float(np.sqrt(np.mean((img[:, 1:] - img[:, :-1])**2) +
                       np.mean((img[1:, :] - img[:-1, :])**2)))


def average_gradient(img: np.ndarray) -> float:
  """AG: mean of sqrt((Gx^2 + Gy^2) / 2), np.gradient-style differences."""
  gy, gx = np.gradient(img)
  return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def _mutual_info_score(a: np.ndarray, b: np.ndarray) -> float:
  """sklearn.metrics.mutual_info_score(a, b) (nats), values used as labels."""
  _, ia = np.unique(a.ravel(), return_inverse=True)
  _, ib = np.unique(b.ravel(), return_inverse=True)
  na, nb = ia.max() + 1, ib.max() + 1
  joint = np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb)
  nzx, nzy = np.nonzero(joint)
  nz = joint[nzx, nzy].astype(np.float64)
  total = nz.sum()
  pi, pj = joint.sum(axis=1), joint.sum(axis=0)
  p = nz / total
  outer = pi[nzx].astype(np.int64) * pj[nzy].astype(np.int64)
  log_outer = -np.log(outer) + math.log(pi.sum()) + math.log(pj.sum())
  mi = p * (np.log(nz) - math.log(total)) + p * log_outer
  mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
  return float(np.clip(mi.sum(), 0.0, None))


def mutual_information(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """MI: MI(F, IR) + MI(F, VIS) in nats."""
  return _mutual_info_score(f, a) + _mutual_info_score(f, b)


def _corr(x: np.ndarray, y: np.ndarray) -> float:
  dx, dy = x - np.mean(x), y - np.mean(y)
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(np.sum(dx * dy) / np.sqrt(np.sum(dx**2) * np.sum(dy**2)))


def correlation_of_differences(f: np.ndarray, a: np.ndarray,
                               b: np.ndarray) -> float:
  """SCD: corr(IR, F - VIS) + corr(VIS, F - IR)."""
  return _corr(a, f - b) + _corr(b, f - a)


def correlation_coefficient(f: np.ndarray, a: np.ndarray,
                            b: np.ndarray) -> float:
  """CC: (corr(IR, F) + corr(VIS, F)) / 2."""
  return (_corr(a, f) + _corr(b, f)) / 2


def mean_squared_error(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """MSE: (MSE(F, IR) + MSE(F, VIS)) / 2 on the 0..255 scale."""
  return float((np.mean((a - f)**2) + np.mean((b - f)**2)) / 2)


def psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """PSNR: 10 log10(max(F)^2 / MSE)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(10 * np.log10(np.max(f)**2 / mean_squared_error(f, a, b)))


def vif_window(scale: int) -> np.ndarray:
  """The reference's normalised MATLAB-style Gaussian window for `scale`."""
  n = 2**(4 - scale + 1) + 1
  sd = n / 5.0
  m = (n - 1.0) / 2.0
  y, x = np.ogrid[-m:m + 1, -m:m + 1]
  h = np.exp(-(x * x + y * y) / (2.0 * sd * sd))
  h[h < np.finfo(h.dtype).eps * h.max()] = 0
  return h / h.sum()


def _vifp(ref: np.ndarray, dist: np.ndarray) -> float:
  """Pixel-domain multi-scale VIF of `dist` against `ref`."""
  num = den = 0.0
  for scale in range(1, 5):
    win = np.rot90(vif_window(scale), 2)
    conv = lambda x, w=win: signal.convolve2d(x, w, mode="valid")
    if scale > 1:
      ref, dist = conv(ref)[::2, ::2], conv(dist)[::2, ::2]
    mu1, mu2 = conv(ref), conv(dist)
    sigma1_sq = conv(ref * ref) - mu1 * mu1
    sigma2_sq = conv(dist * dist) - mu2 * mu2
    sigma12 = conv(ref * dist) - mu1 * mu2
    sigma1_sq[sigma1_sq < 0] = 0
    sigma2_sq[sigma2_sq < 0] = 0
    g = sigma12 / (sigma1_sq + _VIF_EPS)
    sv_sq = sigma2_sq - g * sigma12
    low1 = sigma1_sq < _VIF_EPS
    g[low1] = 0
    sv_sq[low1] = sigma2_sq[low1]
    sigma1_sq[low1] = 0
    low2 = sigma2_sq < _VIF_EPS
    g[low2] = 0
    sv_sq[low2] = 0
    neg = g < 0
    sv_sq[neg] = sigma2_sq[neg]
    g[neg] = 0
    sv_sq[sv_sq <= _VIF_EPS] = _VIF_EPS
    num += np.sum(np.log10(1 + g * g * sigma1_sq / (sv_sq + _VIF_SIGMA_NSQ)))
    den += np.sum(np.log10(1 + sigma1_sq / _VIF_SIGMA_NSQ))
  with np.errstate(invalid="ignore", divide="ignore"):
    vifp = num / den
  return 1.0 if np.isnan(vifp) else float(vifp)


def visual_information_fidelity(f: np.ndarray, a: np.ndarray,
                                b: np.ndarray) -> float:
  """VIF: VIFp(IR, F) + VIFp(VIS, F)."""
  return _vifp(a, f) + _vifp(b, f)


def _qabf_edges(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sobel strength and arctan orientation ('same', zero padded)."""
  h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)
  h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
  sx = signal.convolve2d(img, h3, mode="same")
  sy = signal.convolve2d(img, h1, mode="same")
  g = np.sqrt(sx * sx + sy * sy)
  angle = np.zeros_like(img)
  angle[sx == 0] = math.pi / 2
  nz = sx != 0
  angle[nz] = np.arctan(sy[nz] / sx[nz])
  return g, angle


def _qabf_preservation(a_s: np.ndarray, g_s: np.ndarray, a_f: np.ndarray,
                       g_f: np.ndarray) -> np.ndarray:
  """Per-pixel edge preservation Q^{SF} (with the reference's gA==gF quirk)."""
  ratio = np.zeros_like(a_s)
  gt, eq, lt = g_s > g_f, g_s == g_f, g_s < g_f
  ratio[gt] = g_f[gt] / g_s[gt]
  ratio[eq] = g_f[eq]
  ratio[lt] = g_s[lt] / g_f[lt]
  align = 1 - np.abs(a_s - a_f) / (math.pi / 2)
  q_g = _QABF_TG / (1 + np.exp(_QABF_KG * (ratio - _QABF_DG)))
  q_a = _QABF_TA / (1 + np.exp(_QABF_KA * (align - _QABF_DA)))
  return q_g * q_a


def qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """Qabf: source-edge-weighted mean edge preservation."""
  g_a, ang_a = _qabf_edges(a)
  g_b, ang_b = _qabf_edges(b)
  g_f, ang_f = _qabf_edges(f)
  q_af = _qabf_preservation(ang_a, g_a, ang_f, g_f)
  q_bf = _qabf_preservation(ang_b, g_b, ang_f, g_f)
  with np.errstate(invalid="ignore", divide="ignore"):
    return float(np.sum(q_af * g_a + q_bf * g_b) / np.sum(g_a + g_b))


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
  """skimage.metrics.structural_similarity(x, y) defaults, data_range=2."""
  filt = lambda v: ndimage.uniform_filter(v, size=_SSIM_WIN)
  n = _SSIM_WIN**2
  cov_norm = n / (n - 1)
  ux, uy = filt(x), filt(y)
  vx = cov_norm * (filt(x * x) - ux * ux)
  vy = cov_norm * (filt(y * y) - uy * uy)
  vxy = cov_norm * (filt(x * y) - ux * uy)
  c1 = (_SSIM_K1 * _SSIM_DATA_RANGE)**2
  c2 = (_SSIM_K2 * _SSIM_DATA_RANGE)**2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) *
                                             (vx + vy + c2)))
  pad = (_SSIM_WIN - 1) // 2
  return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


def ssim(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
  """SSIM: ssim(F, IR) + ssim(F, VIS)."""
  return _ssim(f, a) + _ssim(f, b)


def all_metrics(fused: np.ndarray, ir: np.ndarray,
                vis: np.ndarray) -> dict[str, float]:
  """All 12 metrics, keyed by `METRIC_NAMES`, computed in float64."""
  f, a, b = (np.asarray(v, np.float64) for v in (fused, ir, vis))
  values = {
      "EN": entropy(f),
      "SD": standard_deviation(f),
      "SF": spatial_frequency(f),
      "AG": average_gradient(f),
      "MI": mutual_information(f, a, b),
      "SCD": correlation_of_differences(f, a, b),
      "VIF": visual_information_fidelity(f, a, b),
      "Qabf": qabf(f, a, b),
      "SSIM": ssim(f, a, b),
      "CC": correlation_coefficient(f, a, b),
      "PSNR": psnr(f, a, b),
      "MSE": mean_squared_error(f, a, b),
  }
  return {name: values[name] for name in METRIC_NAMES}
