"""Deterministic synthetic captioned infrared/visible pairs (the default data).

`SyntheticPairs(num_records, height, width, seed)` is a random-access source:
record i is a pure function of (seed, i, height, width), so any process (grain
workers, other hosts) regenerates exactly the same record, and it can be
wrapped by `grain.MapDataset.source`.

Records use the project's common record format (the TFDS real-data builders
produce the same keys; 'vis_clean' exists for synthetic data only):

  'name':      str, "synthetic_{seed}_{i:06d}"
  'ir':        uint8 (H, W, 1) thermal image
  'vis':       uint8 (H, W, 3) degraded visible image (network input)
  'vis_clean': uint8 (H, W, 3) the visible image before degradation (target)
  'captions':  list[str], always 3 captions (see below)

Scene (sampled by `sample_scene`, pure parameters, no pixels):
  * lighting 'day' (ambient light 0.85-1.0) or 'dusk' (0.35-0.55): dusk scenes
    are genuinely darker in 'vis_clean', so darkness in 'vis' alone does not
    tell how much to brighten.
  * sky, textured ground, optional road with dashed centre line and sidewalk,
    buildings on the horizon with window grids (some windows lit), trees,
    street lamps, shadow ellipses on the ground (some cast over people).
  * 0-4 people and 0-3 vehicles (car or van, parked or moving) at random
    places; sizes follow a simple ground-plane perspective (lower = larger).
    Positions are reported as left / centre / right thirds of the image width
    (by the object's horizontal centre).

Visible degradation (`Degradation`; applied in this order to the clean image
in [0, 1]): haze blend x' = (1 - haze) x + haze * AIRLIGHT (a grey-blue);
underexposure x' = gain * x; glare: additive Gaussian blooms at headlights or
lamp heads, peak `glare` (in [0, 1] units) plus a 3x wider halo of 0.3 glare;
sensor noise: Gaussian with std `noise_sigma` (in uint8 levels), partly
shared across channels; then clip and round.
Each kind is drawn independently at a severity level 0 (absent), 1 slightly,
2 moderately, 3 heavily (at least one kind is present) and its parameter is
then drawn inside the level's range; the ranges leave gaps, so the caption
words (`severity_level`) are unambiguous functions of the parameters:

  level        0 (absent)   1 slightly    2 moderately  3 heavily
  gain         [0.85, 1]    [0.50, 0.70]  [0.28, 0.42]  [0.10, 0.20]
  noise_sigma  [0, 1.5]     [3, 6]        [8, 13]       [16, 26]
  haze         0            [0.12, 0.22]  [0.30, 0.42]  [0.50, 0.65]
  glare        0            [0.25, 0.40]  [0.55, 0.75]  [0.90, 1.30]

Caption words: "slightly/moderately/heavily underexposed", "... noisy",
"... hazy", and "slight/moderate/heavy glare from headlights|street lamps".

Thermal image: warm people (heads warmest), moving vehicles' engines and
wheels, lit windows and lamp heads are bright; sky is cold, the road a little
warmer than the ground; trees and shadows are not drawn (invisible in IR);
smooth thermal non-uniformity, fine noise and a slight blur are added.

Captions (derived only from scene parameters, see `scene_captions`). Each
opens with the same condition sentence, "<degradation words> visible image at
dusk|in daylight", because that is what a fusion network cannot read from the
pixels alone: a dark frame may be a dim dusk scene shot correctly or a daylit
scene underexposed, and they need different corrections. Then:
  0: content - setting, people/vehicle counts, kinds and positions.
  1: what stands out warm in the thermal image.
  2: hidden objects - which people are nearly invisible in the degraded visible
     image but bright in infrared, or a statement that none are. A person is
     hidden when they stand against the ground (not in front of a vehicle or
     another person) and the predicted clothes-vs-ground contrast in 'vis' is
     below max(8, 1.5 noise_sigma) uint8 levels at every point of the torso.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

# Severity ranges per degradation kind, indexed by level 0..3 (see docstring).
GAIN_RANGES = ((0.85, 1.0), (0.50, 0.70), (0.28, 0.42), (0.10, 0.20))
NOISE_RANGES = ((0.0, 1.5), (3.0, 6.0), (8.0, 13.0), (16.0, 26.0))
HAZE_RANGES = ((0.0, 0.0), (0.12, 0.22), (0.30, 0.42), (0.50, 0.65))
GLARE_RANGES = ((0.0, 0.0), (0.25, 0.40), (0.55, 0.75), (0.90, 1.30))
# Thresholds halfway in the gaps between consecutive ranges.
_THRESHOLDS = {
    "gain": (0.775, 0.46, 0.24),  # decreasing gain = more severe
    "noise_sigma": (2.25, 7.0, 14.5),
    "haze": (0.06, 0.26, 0.46),
    "glare": (0.12, 0.47, 0.82),
}
SEVERITY_ADVERBS = ("", "slightly", "moderately", "heavily")
SEVERITY_ADJECTIVES = ("", "slight", "moderate", "heavy")
POSITIONS = ("on the left", "in the centre", "on the right")
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")

AIRLIGHT = np.array([0.62, 0.64, 0.68], np.float32)
_GLARE_COLOUR = np.array([1.0, 0.95, 0.8], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_GROUND_TINT = np.array([0.85, 1.0, 0.7], np.float32)
_SIDEWALK = 0.45


def severity_level(kind: str, value: float) -> int:
  """Level 0..3 of a degradation parameter ('gain', 'noise_sigma', ...)."""
  t1, t2, t3 = _THRESHOLDS[kind]
  if kind == "gain":
    return 0 if value >= t1 else 1 if value >= t2 else 2 if value >= t3 else 3
  return 0 if value < t1 else 1 if value < t2 else 2 if value < t3 else 3


@dataclasses.dataclass(frozen=True)
class Person:
  x: float          # horizontal centre (pixels)
  foot_y: float     # row of the feet
  height: float     # pixels
  clothes: tuple[float, float, float]  # RGB albedo
  skin: float       # grey albedo of the head
  shadow: float     # light factor at the torso (1 = not in shadow)
  hidden: bool      # nearly invisible in 'vis' (see module docstring)


@dataclasses.dataclass(frozen=True)
class Vehicle:
  kind: str         # 'car' or 'van'
  x: float          # horizontal centre
  foot_y: float     # row where the wheels touch the road
  length: float
  height: float
  colour: tuple[float, float, float]
  facing: int       # +1 front to the right, -1 to the left
  moving: bool      # moving: headlights on, warm engine and wheels

  @property
  def headlight(self) -> tuple[float, float]:
    """(row, col) of the headlight."""
    return (self.foot_y - 0.45 * self.height,
            self.x + self.facing * 0.47 * self.length)


@dataclasses.dataclass(frozen=True)
class Building:
  x0: int
  x1: int
  top: int
  colour: tuple[float, float, float]
  lit: tuple[tuple[bool, ...], ...]  # window grid, True = lit


@dataclasses.dataclass(frozen=True)
class Tree:
  x: float
  foot_y: float
  height: float


@dataclasses.dataclass(frozen=True)
class Shadow:
  cy: float
  cx: float
  ry: float
  rx: float
  factor: float     # light multiplier inside the ellipse


@dataclasses.dataclass(frozen=True)
class Degradation:
  """Visible-image degradation parameters (ranges in the module docstring)."""
  gain: float
  noise_sigma: float
  haze: float
  glare: float
  glare_source: str  # 'headlights', 'street lamps' or '' (no glare)
  glare_points: tuple[tuple[float, float], ...]  # (row, col) of the blooms

  def levels(self) -> dict[str, int]:
    return {kind: severity_level(kind, getattr(self, kind))
            for kind in ("gain", "noise_sigma", "haze", "glare")}


@dataclasses.dataclass(frozen=True)
class Scene:
  height: int
  width: int
  lighting: str      # 'day' or 'dusk'
  ambient: float
  horizon: int
  road: tuple[int, int] | None  # rows [y0, y1) of the road
  ground_albedo: float
  road_albedo: float
  buildings: tuple[Building, ...]
  trees: tuple[Tree, ...]
  lamps: tuple[tuple[float, float, float], ...]  # (head row, col, foot row)
  shadows: tuple[Shadow, ...]
  people: tuple[Person, ...]
  vehicles: tuple[Vehicle, ...]
  degradation: Degradation


def _position(x: float, width: int) -> int:
  return min(2, int(3 * x / width))


def _ground_scale(scene_h: int, horizon: int, y: float) -> float:
  """Perspective size factor: ~0.1 at the horizon, 1 at the bottom row."""
  near = 0.1 * scene_h
  return (y - horizon + near) / (scene_h - horizon + near)


def _luma(rgb: Sequence[float]) -> float:
  return float(np.dot(_LUMA, rgb))


def _sidewalk_top(road: tuple[int, int]) -> int:
  return road[0] - max(2, (road[1] - road[0]) // 6)


def _ground_luma(row: float, road: tuple[int, int] | None, road_albedo: float,
                 ground_albedo: float) -> float:
  """Mean luma albedo of the ground surface at `row` (below the horizon)."""
  if road is not None and road[0] <= row < road[1]:
    return road_albedo
  if road is not None and _sidewalk_top(road) <= row < road[0]:
    return _SIDEWALK
  return ground_albedo * _luma(_GROUND_TINT)


def _in_ellipse(y: float, x: float, s: Shadow) -> bool:
  return ((y - s.cy) / s.ry) ** 2 + ((x - s.cx) / s.rx) ** 2 <= 1.0


def _sample_buildings(rng: np.random.Generator, h: int, w: int,
                      horizon: int) -> list[Building]:
  """A row of buildings standing on the horizon, with window grids."""
  buildings = []
  x = int(rng.uniform(-0.1, 0.1) * w)
  while x < w:
    bw = int(rng.uniform(0.12, 0.3) * w)
    if rng.random() < 0.8:
      top = max(0, horizon - int(rng.uniform(0.1, 0.28) * h))
      rows = max(1, (horizon - top - 2) // max(3, h // 24))
      cols = max(1, (min(w, x + bw) - max(0, x) - 2) // max(3, w // 24))
      lit = rng.random((rows, cols)) < rng.uniform(0.0, 0.5)
      colour = tuple(float(c) for c in rng.uniform(0.25, 0.6) *
                     rng.uniform(0.8, 1.2, 3))
      buildings.append(Building(max(0, x), min(w, x + bw), top, colour,
                                tuple(map(tuple, lit.tolist()))))
    x += bw + int(rng.uniform(0.0, 0.08) * w)
  return buildings


def _sample_degradation(rng: np.random.Generator, vehicles: list[Vehicle],
                        lamps: list[tuple[float, float, float]]
                        ) -> Degradation:
  """Independent severity levels per kind (at least one > 0), then values."""
  levels = [int(rng.choice(4, p=p)) for p in (
      (0.15, 0.25, 0.3, 0.3), (0.25, 0.25, 0.25, 0.25),
      (0.55, 0.15, 0.15, 0.15), (0.5, 0.17, 0.17, 0.16))]
  if not any(levels):
    levels[0] = int(rng.integers(1, 4))
  gain_l, noise_l, haze_l, glare_l = levels
  moving = [v for v in vehicles if v.moving]
  glare_source, glare_points = "", ()
  if glare_l:
    if moving and rng.random() < 0.75:
      glare_source = "headlights"
      glare_points = tuple(v.headlight for v in moving)
    else:
      glare_source = "street lamps"
      glare_points = tuple((y, x) for y, x, _ in lamps)
  return Degradation(float(rng.uniform(*GAIN_RANGES[gain_l])),
                     float(rng.uniform(*NOISE_RANGES[noise_l])),
                     float(rng.uniform(*HAZE_RANGES[haze_l])),
                     float(rng.uniform(*GLARE_RANGES[glare_l])),
                     glare_source, glare_points)


def sample_scene(seed: int, index: int, height: int, width: int) -> Scene:
  """Scene parameters of record `index`; a pure function of its arguments."""
  rng = np.random.default_rng([seed, index, height, width, 0])
  h, w = height, width
  lighting = "dusk" if rng.random() < 0.45 else "day"
  ambient = float(rng.uniform(0.35, 0.55) if lighting == "dusk"
                  else rng.uniform(0.85, 1.0))
  horizon = int(rng.uniform(0.28, 0.42) * h)
  ground_h = h - horizon
  ground_albedo = float(rng.uniform(0.25, 0.4))
  road_albedo = float(rng.uniform(0.18, 0.28))
  road = None
  if rng.random() < 0.8:
    y0 = horizon + int(rng.uniform(0.3, 0.5) * ground_h)
    road = (y0, min(h, y0 + int(rng.uniform(0.25, 0.4) * ground_h)))

  buildings = _sample_buildings(rng, h, w, horizon)
  trees = []
  for _ in range(rng.integers(0, 4)):
    foot = horizon + rng.uniform(0.02, 0.2) * ground_h
    trees.append(Tree(float(rng.uniform(0, w)), float(foot),
                      float(_ground_scale(h, horizon, foot) * 0.5 * h)))
  lamps = []
  for _ in range(rng.integers(1, 3)):
    foot = horizon + rng.uniform(0.05, 0.25) * ground_h
    tall = _ground_scale(h, horizon, foot) * 0.45 * h
    lamps.append((float(foot - tall), float(rng.uniform(0.05, 0.95) * w),
                  float(foot)))
  shadows = []
  for tree in trees:  # tree shade on the ground
    s = tree.height
    shadows.append(Shadow(tree.foot_y + 0.1 * s, tree.x + 0.3 * s, 0.15 * s,
                          0.5 * s, float(rng.uniform(0.25, 0.5))))

  people_drafts = []
  for _ in range(rng.choice(5, p=(0.2, 0.25, 0.25, 0.18, 0.12))):
    foot = rng.uniform(horizon + 0.3 * ground_h, h - 2)
    tall = min(_ground_scale(h, horizon, foot) * 0.4 * h, foot - horizon - 1)
    px = rng.uniform(0.05, 0.95) * w
    if rng.random() < 0.5:
      clothes = rng.uniform(0.02, 0.1, 3)
    else:
      clothes = rng.uniform(0.5, 0.95, 3)
    if rng.random() < 0.3:  # standing in a dark doorway / under cover
      shadows.append(Shadow(foot - 0.45 * tall, px, 0.65 * tall, 0.4 * tall,
                            float(rng.uniform(0.12, 0.3))))
    people_drafts.append((float(px), float(foot), float(tall),
                          tuple(float(c) for c in clothes),
                          float(rng.uniform(0.3, 0.7))))

  vehicles = []
  if road is not None:
    for _ in range(rng.choice(4, p=(0.25, 0.35, 0.25, 0.15))):
      kind = "van" if rng.random() < 0.3 else "car"
      foot = rng.uniform(road[0] + 0.4 * (road[1] - road[0]), road[1])
      length = _ground_scale(h, horizon, foot) * rng.uniform(0.35, 0.45) * w
      length *= 1.25 if kind == "van" else 1.0
      vh = length * (0.55 if kind == "van" else 0.4)
      colour = tuple(float(c) for c in rng.uniform(0.05, 0.85, 3))
      vehicles.append(Vehicle(kind, float(rng.uniform(0.08, 0.92) * w),
                              float(foot), float(length), float(vh), colour,
                              int(rng.choice((-1, 1))),
                              bool(rng.random() < 0.5)))

  degradation = _sample_degradation(rng, vehicles, lamps)
  gain, noise_sigma, haze = (degradation.gain, degradation.noise_sigma,
                             degradation.haze)

  def light_at(y: float, x: float) -> float:
    return float(np.prod([s.factor for s in shadows if _in_ellipse(y, x, s)]))

  # Boxes (y0, y1, x0, x1, drawing order) of what people may stand in front
  # of; things are drawn by foot row, vehicles before people on a tie.
  behind = [(v.foot_y - v.height, v.foot_y, v.x - v.length / 2,
             v.x + v.length / 2, v.foot_y - 1e-6) for v in vehicles]
  behind += [(f - t, f, x - 0.15 * t, x + 0.15 * t, f)
             for x, f, t, _, _ in people_drafts]
  people = []
  for px, foot, tall, clothes, skin in people_drafts:
    torso = [(y, x) for y in foot - tall * np.array([0.75, 0.6, 0.45])
             for x in px + tall * np.array([-0.12, 0.0, 0.12])]
    # Predicted clothes-vs-ground contrast in 'vis' (uint8 levels) over the
    # torso; hidden only if even the most visible point is below the
    # noise-dependent threshold and the person stands against the ground
    # (not in front of a vehicle or another person, drawn earlier).
    contrast = max(
        abs(_luma(clothes) - _ground_luma(y, road, road_albedo, ground_albedo))
        * ambient * light_at(y, x) * gain * (1 - haze) * 255
        for y, x in torso)
    against_ground = not any(
        f < foot and y0 <= y <= y1 and x0 <= x <= x1
        for y0, y1, x0, x1, f in behind for y, x in torso)
    hidden = against_ground and contrast < max(8.0, 1.5 * noise_sigma)
    people.append(Person(px, foot, tall, clothes, skin,
                         light_at(foot - 0.6 * tall, px), bool(hidden)))
  return Scene(h, w, lighting, ambient, horizon, road, ground_albedo,
               road_albedo, tuple(buildings), tuple(trees), tuple(lamps),
               tuple(shadows), tuple(people), tuple(vehicles), degradation)


# ----------------------------------------------------------------- rendering


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
  c.albedo[hz:] = ground[..., None] * _GROUND_TINT
  c.ir[hz:] = 0.3 + 0.08 * (yy[hz:, :1] - hz) / (h - hz) + 0.3 * texture
  if scene.road is not None:
    y0, y1 = scene.road
    c.rect(_sidewalk_top(scene.road), y0, 0, w, (_SIDEWALK,) * 3, 0.4)
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
    x = x + d.glare * bloom[..., None] * _GLARE_COLOUR
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


# ----------------------------------------------------------------- captions


def _count(n: int, noun: str, plural: str | None = None) -> str:
  if n == 1:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
  return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {plural or noun + 's'}"


def _join(parts: Sequence[str]) -> str:
  parts = [p for p in parts if p]
  if len(parts) <= 1:
    return "".join(parts)
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _group(noun: str, xs: Sequence[float], width: int,
           plural: str | None = None) -> str:
  """e.g. 'three warm pedestrians (two on the left, one on the right)'."""
  if not xs:
    return ""
  counts = [0, 0, 0]
  for x in xs:
    counts[_position(x, width)] += 1
  where = [(n, POSITIONS[i]) for i, n in enumerate(counts) if n]
  if len(where) == 1:
    return f"{_count(len(xs), noun, plural)} {where[0][1]}"
  return (f"{_count(len(xs), noun, plural)} ("
          + ", ".join(f"{_NUMBERS[n]} {pos}" for n, pos in where) + ")")


def _vehicles_phrase(vehicles: Sequence[Vehicle], width: int) -> list[str]:
  """e.g. ['two parked cars on the left', 'a moving van in the centre']."""
  groups: dict[str, list[float]] = {}
  for v in vehicles:
    groups.setdefault(f"{'moving' if v.moving else 'parked'} {v.kind}",
                      []).append(v.x)
  return [_group(noun, xs, width) for noun, xs in groups.items()]


def degradation_phrase(d: Degradation) -> str:
  """e.g. 'heavily underexposed, moderately noisy visible image with heavy
  glare from headlights'."""
  lv = d.levels()
  words = [f"{SEVERITY_ADVERBS[lv[k]]} {name}" for k, name in (
      ("gain", "underexposed"), ("noise_sigma", "noisy"), ("haze", "hazy"))
           if lv[k]]
  text = _join(words) + " visible image" if words else "visible image"
  if lv["glare"]:
    text += (f" with {SEVERITY_ADJECTIVES[lv['glare']]} glare from "
             f"{d.glare_source}")
  return text


def scene_captions(scene: Scene) -> list[str]:
  """The three captions of a scene (see the module docstring)."""
  w = scene.width
  people_x = [p.x for p in scene.people]
  setting = _join([
      "a road" if scene.road else "",
      "buildings" if scene.buildings else "",
      "trees" if scene.trees else ""])
  objects = _join([_group("pedestrian", people_x, w)] +
                  _vehicles_phrase(scene.vehicles, w))
  # The condition leads every caption: CLIP truncates at 77 tokens, so the
  # words the fusion needs most must come first.
  condition = degradation_phrase(scene.degradation)
  condition = (f"{condition[0].upper()}{condition[1:]} "
               f"{'in daylight' if scene.lighting == 'day' else 'at dusk'}")
  content = (f"{condition}. A street scene"
             + (f" with {setting}" if setting else "")
             + f"; {objects or 'the street is empty'}.")

  warm = [_group("warm pedestrian", people_x, w),
          _group("vehicle with a hot engine",
                 [v.x for v in scene.vehicles if v.moving], w,
                 "vehicles with hot engines")]
  if any(any(map(any, b.lit)) for b in scene.buildings):
    warm.append("lit windows")
  warm = [p for p in warm if p]
  thermal = (f"in the thermal image {_join(warm)} stand out" if warm else
             "the thermal image shows only cool surroundings")
  thermal = f"{condition}; {thermal}."

  hidden = [p.x for p in scene.people if p.hidden]
  if hidden:
    n = len(hidden)
    where = _group("pedestrian", hidden, w)
    hidden_text = (f"{where[0].upper()}{where[1:]} {'is' if n == 1 else 'are'}"
                   " nearly invisible in it but bright in infrared.")
  elif scene.people:
    hidden_text = "No pedestrian is lost in it."
  else:
    hidden_text = "There is nobody on the street."
  hidden_text = f"{condition}. {hidden_text}"
  return [content, thermal, hidden_text]


class SyntheticPairs:
  """Random-access source of synthetic captioned IR/visible records.

  Args:
    num_records: number of records (indices 0 .. num_records - 1).
    height, width: image size in pixels (both >= 32).
    seed: dataset seed; record i depends only on (seed, i, height, width).
  """

  def __init__(self, num_records: int, height: int = 128, width: int = 128,
               seed: int = 0):
    if num_records < 0 or height < 32 or width < 32:
      raise ValueError(f"bad SyntheticPairs({num_records}, {height}, {width})")
    self.num_records, self.height, self.width = num_records, height, width
    self.seed = seed

  def __len__(self) -> int:
    return self.num_records

  def _check(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range [0, {self.num_records})")
    return index

  def scene(self, index: int) -> Scene:
    return sample_scene(self.seed, self._check(index), self.height, self.width)

  def captions(self, index: int) -> list[str]:
    """Captions of record `index` without rendering its images."""
    return scene_captions(self.scene(index))

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = self._check(index)
    scene = self.scene(index)
    rng = np.random.default_rng([self.seed, index, self.height, self.width, 1])
    record = render_scene(scene, rng)
    record["name"] = f"synthetic_{self.seed}_{index:06d}"
    record["captions"] = scene_captions(scene)
    return record

  def __repr__(self) -> str:
    return (f"SyntheticPairs(num_records={self.num_records}, "
            f"height={self.height}, width={self.width}, seed={self.seed})")
