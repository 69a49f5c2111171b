"""Synthetic scenes: their parameters and how they are sampled (no pixels).

See the package docstring (`input_pipeline.synthetic`) for the scene model
and the degradation levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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

AIRLIGHT = np.array([0.62, 0.64, 0.68], np.float32)
GLARE_COLOUR = np.array([1.0, 0.95, 0.8], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
GROUND_TINT = np.array([0.85, 1.0, 0.7], np.float32)
SIDEWALK = 0.45


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


def _ground_scale(scene_h: int, horizon: int, y: float) -> float:
  """Perspective size factor: ~0.1 at the horizon, 1 at the bottom row."""
  near = 0.1 * scene_h
  return (y - horizon + near) / (scene_h - horizon + near)


def _luma(rgb: Sequence[float]) -> float:
  return float(np.dot(_LUMA, rgb))


def sidewalk_top(road: tuple[int, int]) -> int:
  return road[0] - max(2, (road[1] - road[0]) // 6)


def _ground_luma(row: float, road: tuple[int, int] | None, road_albedo: float,
                 ground_albedo: float) -> float:
  """Mean luma albedo of the ground surface at `row` (below the horizon)."""
  if road is not None and road[0] <= row < road[1]:
    return road_albedo
  if road is not None and sidewalk_top(road) <= row < road[0]:
    return SIDEWALK
  return ground_albedo * _luma(GROUND_TINT)


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
