"""Overlapping-tile inference, so image size never bounds device memory.

An image is cut into fixed-size tiles (one compiled shape for every image),
each tile is fused, and overlaps are blended with separable linear ramps so
no seams show. Images no larger than one tile run whole, padded to a multiple
of `pad_multiple` (a few compiled shapes at most).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FuseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _starts(length: int, tile: int, stride: int) -> list[int]:
  if length <= tile:
    return [0]
  starts = list(range(0, length - tile, stride))
  return starts + [length - tile]


def _ramp(tile: int, overlap: int) -> np.ndarray:
  """1-D weights: rises over `overlap` pixels at both ends, never zero."""
  weights = np.ones(tile, np.float32)
  if overlap > 0:
    rise = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
    weights[:overlap] = rise
    weights[-overlap:] = rise[::-1]
  return weights


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
  pad_h, pad_w = height - image.shape[0], width - image.shape[1]
  if pad_h == 0 and pad_w == 0:
    return image
  return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect"
                if min(image.shape[:2]) > 1 else "edge")


def fuse_tiled(fuse_batch: FuseFn, vis: np.ndarray, ir: np.ndarray, *,
               tile: int = 512, overlap: int = 32, batch_size: int = 4,
               pad_multiple: int = 64) -> np.ndarray:
  """Fuses one (H, W, 3) / (H, W, 1) float pair with bounded memory.

  `fuse_batch(vis_tiles, ir_tiles) -> fused_tiles` runs the model on
  (N, t, t, C) arrays; N is always `batch_size` (the last group is padded) so
  the compiled shape never changes.
  """
  height, width = vis.shape[:2]
  if height <= tile and width <= tile:
    padded_h = -(-height // pad_multiple) * pad_multiple
    padded_w = -(-width // pad_multiple) * pad_multiple
    out = fuse_batch(_pad_to(vis, padded_h, padded_w)[None],
                     _pad_to(ir, padded_h, padded_w)[None])
    return out[0, :height, :width]

  # Pad so every tile fits inside the image.
  full_h, full_w = max(height, tile), max(width, tile)
  vis_p, ir_p = _pad_to(vis, full_h, full_w), _pad_to(ir, full_h, full_w)
  stride = tile - overlap
  corners = [(y, x) for y in _starts(full_h, tile, stride)
             for x in _starts(full_w, tile, stride)]
  weight_tile = _ramp(tile, overlap)[:, None] * _ramp(tile, overlap)[None, :]
  accumulated = np.zeros((full_h, full_w, 3), np.float32)
  total_weight = np.zeros((full_h, full_w, 1), np.float32)
  for first in range(0, len(corners), batch_size):
    group = corners[first:first + batch_size]
    padded = group + [group[-1]] * (batch_size - len(group))
    vis_tiles = np.stack([vis_p[y:y + tile, x:x + tile] for y, x in padded])
    ir_tiles = np.stack([ir_p[y:y + tile, x:x + tile] for y, x in padded])
    fused = fuse_batch(vis_tiles, ir_tiles)
    for (y, x), fused_tile in zip(group, fused):
      accumulated[y:y + tile, x:x + tile] += fused_tile * weight_tile[..., None]
      total_weight[y:y + tile, x:x + tile, 0] += weight_tile
  return (accumulated / total_weight)[:height, :width]
