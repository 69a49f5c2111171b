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

from typing import Any

import numpy as np
from input_pipeline.errors import UserError
from input_pipeline.synthetic.captions import scene_captions
from input_pipeline.synthetic.render import render_scene
from input_pipeline.synthetic.scenes import AIRLIGHT, Scene, sample_scene

__all__ = ["AIRLIGHT", "Scene", "SyntheticPairs", "render_scene",
           "sample_scene", "scene_captions"]

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
      raise UserError(f"bad SyntheticPairs({num_records}, {height}, {width})")
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
