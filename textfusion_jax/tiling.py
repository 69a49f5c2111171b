"""Overlapping-tile inference, so image size never bounds device memory.

An image is cut into fixed-size tiles (one compiled shape for every image),
each tile is fused, and overlaps are blended with separable linear ramps so
no seams show. Images no larger than one tile run whole, padded to a given
bucket shape (`bucket_side`: a fixed grid of sizes, a handful of compiled
shapes for any mix of sizes) or to a multiple of `pad_multiple`.
`plan_buckets` groups images for scoring, whose metrics skip the padding.

Every tile is anchored at the whole image's mean brightness (the fusion
rule's means are passed in), but the network's channel attention sees only
its tile, so a tiled result differs a little from the whole-image one
(tests/test_fuse.py states the tolerance); tiles only serve images too large
to run whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from textfusion_jax.errors import UserError

# fuse_batch(vis (N, t, t, 3), ir (N, t, t, 1), valid (N, 2) ints,
#            means (N, 4) or None) -> fused: `valid` is each tile's (h, w) of
# real image at its top left, `means` the whole image's mean R, G, B and IR
# for tiles, None for an image run whole (the model then takes its own means
# over `valid`, as in training and evaluation).
FuseFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None],
                  np.ndarray]


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


def pad_bottom_right(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """(..., H, W, C) padded at the bottom/right to (height, width), mirroring
  the image as the model's own padding does (a 1-pixel axis repeats)."""
  pad_h, pad_w = height - images.shape[-3], width - images.shape[-2]
  if pad_h == 0 and pad_w == 0:
    return images
  widths = [(0, 0)] * (images.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
  return np.pad(images, widths, mode="reflect"
                if min(images.shape[-3:-1]) > 1 else "edge")


_SIZE_STEP = 32  # buckets start from sizes rounded up to this
_SIZES_PER_OCTAVE = 8  # `bucket_side`'s grid above 256 pixels


def bucket_side(n: int) -> int:
  """`n` pixels rounded up on a fixed grid: multiples of 32 below 512, then
  8 sizes per octave (multiples of 64 below 1024, of 128 below 2048, ...),
  so at most 12.5 % padding per side and a handful of shapes for any mix
  of sizes. Fixed, so the shape a model runs an image at (and so its
  output: channel attention sees the padding) depends on that image
  alone, never on the other images fused with it."""
  step = max(_SIZE_STEP, (1 << (max(n, 1).bit_length() - 1))
             // _SIZES_PER_OCTAVE)
  return -(-n // step) * step


def plan_buckets(sizes: Mapping[str, tuple[int, int]], batch_size: int,
                 compile_cost_pixels: float
                 ) -> dict[tuple[int, int], list[str]]:
  """Groups names into padded bucket shapes (H, W) -> names.

  Starts from sizes rounded up to a multiple of 32 and greedily merges the
  two buckets whose merge saves the most, while a merge's extra padding costs
  less than one compilation (`compile_cost_pixels`). Batches are padded to
  `batch_size`, which the cost also counts.
  """
  groups: dict[tuple[int, int], list[str]] = {}
  for name, (h, w) in sorted(sizes.items()):
    key = (-(-h // _SIZE_STEP) * _SIZE_STEP, -(-w // _SIZE_STEP) * _SIZE_STEP)
    groups.setdefault(key, []).append(name)

  def cost(shape: tuple[int, int], count: int) -> float:
    padded = math.ceil(count / batch_size) * batch_size
    return compile_cost_pixels + padded * shape[0] * shape[1]

  buckets = list(groups.items())
  while len(buckets) > 1:
    best = None
    for i in range(len(buckets)):
      for j in range(i + 1, len(buckets)):
        (si, ni), (sj, nj) = buckets[i], buckets[j]
        merged = (max(si[0], sj[0]), max(si[1], sj[1]))
        gain = (cost(si, len(ni)) + cost(sj, len(nj)) -
                cost(merged, len(ni) + len(nj)))
        if best is None or gain > best[0]:
          best = (gain, i, j, merged)
    gain, i, j, merged = best
    if gain <= 0:
      break
    names = buckets[i][1] + buckets[j][1]
    buckets = [b for k, b in enumerate(buckets) if k not in (i, j)]
    buckets.append((merged, names))
  return {shape: sorted(names) for shape, names in buckets}


# Below this tile size a tiled fusion visibly drifts from the whole-image
# one: each tile's channel attention pools only its own window.
SMALL_TILE = 256
# Below this overlap, neighbouring tiles (each with its own attention) meet
# too abruptly: seams show.
SMALL_OVERLAP = 32


def check_tiling(tile: int, overlap: int) -> None:
  """UserError unless tiles of `tile` pixels overlapping by `overlap` cover
  an image: tile >= 32 (the model's coarsest level) and 0 <= overlap <=
  tile / 2."""
  if tile < 32:
    raise UserError(f"--tile={tile}: give at least 32 pixels")
  if not 0 <= overlap <= tile / 2:
    raise UserError(f"--overlap={overlap}: give 0 <= overlap <= tile / 2 "
                    f"(= {tile / 2:g} for --tile={tile})")


def fuse_tiled(fuse_batch: FuseFn, vis: np.ndarray, ir: np.ndarray, *,
               tile: int = 1536, overlap: int = 64, batch_size: int = 1,
               pad_multiple: int = 64,
               pad_to: tuple[int, int] | None = None) -> np.ndarray:
  """Fuses one (H, W, 3) / (H, W, 1) float pair with bounded memory.

  `fuse_batch(vis_tiles, ir_tiles, valid_sizes, means) -> fused_tiles` runs
  the model on (N, t, t, C) arrays (see FuseFn); N is always `batch_size`
  (the last group is padded) so the compiled shape never changes. An image
  no larger than a tile runs whole, mirror-padded to `pad_to` (its bucket)
  or else to multiples of `pad_multiple`. Needs 0 <= overlap <= tile / 2:
  each pixel is then blended from tiles that cover it.
  """
  check_tiling(tile, overlap)
  height, width = vis.shape[:2]
  if height <= tile and width <= tile:
    if pad_to is not None and (pad_to[0] < height or pad_to[1] < width):
      raise ValueError(f"bucket {pad_to} is smaller than the image "
                       f"{(height, width)}")
    padded_h, padded_w = pad_to or (-(-height // pad_multiple) * pad_multiple,
                                    -(-width // pad_multiple) * pad_multiple)
    out = fuse_batch(pad_bottom_right(vis, padded_h, padded_w)[None],
                     pad_bottom_right(ir, padded_h, padded_w)[None],
                     np.array([[height, width]], np.int32), None)
    return out[0, :height, :width]

  # A tile sees only its window: it takes the whole image's means. (A model
  # with `vis_smoothing_sigmas` means its smoothed visible image in training;
  # the unsmoothed image's mean stands in for it here.)
  means = np.concatenate([vis.reshape(-1, 3).mean(0, dtype=np.float64),
                          ir.reshape(-1, 1).mean(0, dtype=np.float64)]
                         ).astype(np.float32)[None]

  # Pad so every tile fits inside the image.
  full_h, full_w = max(height, tile), max(width, tile)
  vis_p = pad_bottom_right(vis, full_h, full_w)
  ir_p = pad_bottom_right(ir, full_h, full_w)
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
    valid = np.array([[min(tile, height - y), min(tile, width - x)]
                      for y, x in padded], np.int32)
    fused = fuse_batch(vis_tiles, ir_tiles, valid,
                       np.repeat(means, batch_size, axis=0))
    for (y, x), fused_tile in zip(group, fused):
      accumulated[y:y + tile, x:x + tile] += fused_tile * weight_tile[..., None]
      total_weight[y:y + tile, x:x + tile, 0] += weight_tile
  return (accumulated / total_weight)[:height, :width]
