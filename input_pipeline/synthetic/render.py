"""Synthetic scenes -> pixels: clean visible, degraded visible, thermal.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from input_pipeline.synthetic.scenes import (AIRLIGHT, GLARE_COLOUR, GROUND_TINT,
                                            SIDEWALK, Degradation, Person,
                                            Scene, Shadow, Vehicle,
                                            sidewalk_top)

@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return yy, xx


def _smooth_noise(rng: np.random.Generator, h: int, w: int,
                  cells: int) -> np.ndarray:
  """Unit-scale bilinear value noise with ~`cells` blobs across the image."""
  coarse = rng.standard_normal((cells + 2, cells + 2), dtype=np.float32)
  fy = np.linspace(0, cells, h, dtype=np.float32)
  fx = np.linspace(0, cells, w, dtype=np.float32)
  y0, x0 = fy.astype(np.int32), fx.astype(np.int32)
  ty, tx = (fy - y0)[:, None], (fx - x0)[None, :]
  top = coarse[y0][:, x0] * (1 - tx) + coarse[y0][:, x0 + 1] * tx
  bottom = coarse[y0 + 1][:, x0] * (1 - tx) + coarse[y0 + 1][:, x0 + 1] * tx
  return top * (1 - ty) + bottom * ty


def _box(y0: float, y1: float, x0: float, x1: float, h: int,
         w: int) -> tuple[slice, slice] | None:
  r0, r1 = max(0, int(round(y0))), min(h, int(round(y1)))
  c0, c1 = max(0, int(round(x0))), min(w, int(round(x1)))
  if r0 >= r1 or c0 >= c1:
    return None
  return slice(r0, r1), slice(c0, c1)


class _Canvas:
  """Paints shapes into the visible albedo/emission and the thermal image.

  A value of None for one of the images leaves that image unpainted (e.g.
  trees are absent from the thermal image).
  """

  def __init__(self, h: int, w: int):
    self.h, self.w = h, w
    self.albedo = np.zeros((h, w, 3), np.float32)
    self.light = np.ones((h, w), np.float32)
    self.emission = np.zeros((h, w, 3), np.float32)
    self.ir = np.zeros((h, w), np.float32)

  def _paint(self, box, mask, vis, ir, emissive: bool) -> None:
    where = ... if mask is None else mask
    if vis is not None:
      if emissive:
        self.emission[box][where] = vis
      else:  # an opaque surface hides light sources behind it (e.g. sky)
        self.albedo[box][where] = vis
        self.emission[box][where] = 0.0
    if ir is not None:
      self.ir[box][where] = ir

  def rect(self, y0, y1, x0, x1, vis, ir, emissive=False) -> None:
    box = _box(y0, y1, x0, x1, self.h, self.w)
    if box is not None:
      self._paint(box, None, vis, ir, emissive)

  def ellipse(self, cy, cx, ry, rx, vis, ir, emissive=False) -> None:
    box = _box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1, self.h, self.w)
    if box is None:
      return
    yy, xx = _grid(self.h, self.w)
    mask = (((yy[box] - cy) / max(ry, 0.5)) ** 2 +
            ((xx[box] - cx) / max(rx, 0.5)) ** 2) <= 1.0
    self._paint(box, mask, vis, ir, emissive)

  def shade(self, s: Shadow, min_row: int) -> None:
    box = _box(max(s.cy - s.ry, min_row), s.cy + s.ry + 1, s.cx - s.rx,
               s.cx + s.rx + 1, self.h, self.w)
    if box is None:
      return
    yy, xx = _grid(self.h, self.w)
    mask = (((yy[box] - s.cy) / s.ry) ** 2 +
            ((xx[box] - s.cx) / s.rx) ** 2) <= 1.0
    self.light[box][mask] *= s.factor


def _draw_background(c: _Canvas, scene: Scene, rng: np.random.Generator):
  h, w, hz = scene.height, scene.width, scene.horizon
  yy, _ = _grid(h, w)
  t = (yy[:hz, :1] / max(hz, 1))[..., None]
  if scene.lighting == "day":
    top, low = np.array([0.45, 0.62, 0.9]), np.array([0.75, 0.82, 0.92])
  else:
    top, low = np.array([0.22, 0.2, 0.42]), np.array([0.95, 0.55, 0.35])
  # The sky is a light source, so it stays brighter than the ground at dusk.
  c.emission[:hz] = (top * (1 - t) + low * t) * min(1.0, scene.ambient * 1.6)
  c.ir[:hz] = (0.06 + 0.1 * t[..., 0])
  texture = _smooth_noise(rng, h - hz, w, 6) * 0.05 + rng.standard_normal(
      (h - hz, w), dtype=np.float32) * 0.03
  ground = scene.ground_albedo + texture
  c.albedo[hz:] = ground[..., None] * GROUND_TINT
  c.ir[hz:] = 0.3 + 0.08 * (yy[hz:, :1] - hz) / (h - hz) + 0.3 * texture
  if scene.road is not None:
    y0, y1 = scene.road
    c.rect(sidewalk_top(scene.road), y0, 0, w, (SIDEWALK,) * 3, 0.4)
    road = scene.road_albedo + texture[y0 - hz:y1 - hz] * 0.5
    c.albedo[y0:y1] = road[..., None]
    c.ir[y0:y1] = 0.45 + 0.3 * texture[y0 - hz:y1 - hz]
    mid, dash = (y0 + y1) / 2, max(4, w // 16)
    for x in range(0, w, 2 * dash):
      c.rect(mid - 0.7, mid + 0.7, x, x + dash, (0.85, 0.85, 0.8), None)


def _draw_buildings(c: _Canvas, scene: Scene, rng: np.random.Generator):
  yy, xx = _grid(c.h, c.w)
  lit_colour = np.array([1.0, 0.85, 0.45], np.float32)
  for b in scene.buildings:
    c.rect(b.top, scene.horizon, b.x0, b.x1, b.colour,
           float(rng.uniform(0.3, 0.4)))
    rows, cols = len(b.lit), len(b.lit[0])
    box = _box(b.top + 1, scene.horizon - 1, b.x0 + 1, b.x1 - 1, c.h, c.w)
    if box is None:
      continue
    pitch_y = max(1, (scene.horizon - 2 - b.top) // rows)
    pitch_x = max(1, (b.x1 - b.x0 - 2) // cols)
    ly = (yy[box] - (b.top + 1)).astype(np.int32)
    lx = (xx[box] - (b.x0 + 1)).astype(np.int32)
    window = ((ly % pitch_y < pitch_y // 2 + 1) &
              (lx % pitch_x < pitch_x // 2 + 1))
    row = np.minimum(ly // pitch_y, rows - 1)
    col = np.minimum(lx // pitch_x, cols - 1)
    lit = np.asarray(b.lit, bool)[row, col] & window
    c.albedo[box][window & ~lit] = (0.12, 0.14, 0.18)
    c.emission[box][lit] = lit_colour
    c.ir[box][lit] = 0.75


def _draw_trees_and_lamps(c: _Canvas, scene: Scene):
  for t in scene.trees:
    s = t.height
    c.rect(t.foot_y - 0.45 * s, t.foot_y, t.x - 0.05 * s, t.x + 0.05 * s,
           (0.25, 0.17, 0.1), None)
    c.ellipse(t.foot_y - 0.65 * s, t.x, 0.35 * s, 0.28 * s,
              (0.1, 0.28, 0.08), None)
  for y, x, foot in scene.lamps:
    c.rect(y, foot, x - 0.6, x + 0.6, (0.3, 0.3, 0.32), None)
    c.ellipse(y, x, 1.2, 1.6, (1.0, 0.9, 0.6), 0.6, emissive=True)


def _draw_vehicle(c: _Canvas, v: Vehicle):
  x0, x1 = v.x - v.length / 2, v.x + v.length / 2
  base = v.foot_y - 0.18 * v.height
  body_ir = 0.55 if v.moving else 0.38
  c.rect(v.foot_y - 0.6 * v.height, base, x0, x1, v.colour, body_ir)
  cab0 = x0 + (0.25 if v.kind == "car" else 0.05) * v.length
  cab1 = x1 - (0.25 if v.kind == "car" else 0.05) * v.length
  c.rect(v.foot_y - v.height, v.foot_y - 0.6 * v.height, cab0, cab1, v.colour,
         body_ir)
  c.rect(v.foot_y - 0.93 * v.height, v.foot_y - 0.62 * v.height,
         cab0 + 0.05 * v.length, cab1 - 0.05 * v.length, (0.15, 0.2, 0.3), 0.2)
  front = x1 if v.facing > 0 else x0
  engine0, engine1 = sorted((front, front - v.facing * 0.3 * v.length))
  if v.moving:
    c.rect(v.foot_y - 0.6 * v.height, base, engine0, engine1, None, 0.85)
  r = 0.2 * v.height
  for wx in (x0 + 0.2 * v.length, x1 - 0.2 * v.length):
    c.ellipse(v.foot_y - r, wx, r, r, (0.05, 0.05, 0.05),
              0.8 if v.moving else 0.36)
  hy, hx = v.headlight
  tail = x0 + 0.02 * v.length if v.facing > 0 else x1 - 0.02 * v.length
  if v.moving:
    c.ellipse(hy, hx, 0.06 * v.height + 0.5, 0.03 * v.length + 0.5,
              (1.0, 0.95, 0.8), 0.7, emissive=True)
    c.ellipse(hy, tail, 0.05 * v.height + 0.5, 0.02 * v.length + 0.5,
              (0.8, 0.05, 0.05), None, emissive=True)


def _draw_person(c: _Canvas, p: Person):
  s, x, f = p.height, p.x, p.foot_y
  c.rect(f - 0.42 * s, f, x - 0.11 * s, x - 0.02 * s, p.clothes, 0.82)
  c.rect(f - 0.42 * s, f, x + 0.02 * s, x + 0.11 * s, p.clothes, 0.82)
  c.rect(f - 0.8 * s, f - 0.4 * s, x - 0.15 * s, x + 0.15 * s, p.clothes,
         0.85)
  c.ellipse(f - 0.89 * s, x, 0.1 * s + 0.3, 0.08 * s + 0.3, (p.skin,) * 3,
            0.96)


def _blur3(x: np.ndarray) -> np.ndarray:
  p = np.pad(x, 1, mode="edge")
  x = (p[:-2] + p[1:-1] + p[2:]) / 3
  return (x[:, :-2] + x[:, 1:-1] + x[:, 2:]) / 3


def _to_u8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def degrade(clean: np.ndarray, d: Degradation,
            rng: np.random.Generator) -> np.ndarray:
  """Degraded visible image in [0, 1] from a clean float image in [0, 1]."""
  h, w, _ = clean.shape
  x = clean * (1 - d.haze) + d.haze * AIRLIGHT if d.haze else clean
  x = x * d.gain
  if d.glare:
    yy, xx = _grid(h, w)
    radius = 0.04 * (h + w) * (0.5 + d.glare)
    bloom = np.zeros((h, w), np.float32)
    for gy, gx in d.glare_points:
      r2 = (yy - gy) ** 2 + (xx - gx) ** 2
      bloom += np.exp(-r2 / radius ** 2) + 0.3 * np.exp(-r2 / (3 * radius) ** 2)
    x = x + d.glare * bloom[..., None] * GLARE_COLOUR
  if d.noise_sigma:
    sigma = d.noise_sigma / 255.0
    shared = rng.standard_normal((h, w, 1), dtype=np.float32)
    own = rng.standard_normal((h, w, 3), dtype=np.float32)
    # 0.8^2 + 0.6^2 = 1 keeps the per-channel std equal to sigma.
    x = x + sigma * (0.8 * shared + 0.6 * own)
  return x


def render_scene(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
  """Renders 'vis_clean', 'vis' and 'ir' (uint8) of a scene."""
  h, w = scene.height, scene.width
  c = _Canvas(h, w)
  _draw_background(c, scene, rng)
  _draw_buildings(c, scene, rng)
  _draw_trees_and_lamps(c, scene)
  for s in scene.shadows:
    c.shade(s, scene.horizon)
  # Far objects first so nearer ones occlude them.
  things = [(v.foot_y, 0, v) for v in scene.vehicles]
  things += [(p.foot_y, 1, p) for p in scene.people]
  for _, kind, thing in sorted(things, key=lambda t: t[:2]):
    (_draw_vehicle if kind == 0 else _draw_person)(c, thing)
  clean = np.clip(c.albedo * (c.light * scene.ambient)[..., None] +
                  c.emission, 0, 1)
  ir = c.ir + 0.03 * _smooth_noise(rng, h, w, 3)
  ir = _blur3(ir) + rng.standard_normal((h, w), dtype=np.float32) * 0.012
  ir = ir * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
  return {
      "vis_clean": _to_u8(clean),
      "vis": _to_u8(degrade(clean, scene.degradation, rng)),
      "ir": _to_u8(ir)[..., None],
  }
