"""Tests of the synthetic captioned IR/visible generator."""

import dataclasses
import re

import numpy as np
import pytest

from input_pipeline import synthetic

_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4,
           "five": 5}
_LUMA = np.array([0.299, 0.587, 0.114])
_THIRD = {"on the left": 0, "in the centre": 1, "on the right": 2}
# The documented parameter ranges of levels 1..3 (module docstring).
_DOCUMENTED = {
    "underexposed": ("gain", [(0.85, 1.0), (0.50, 0.70), (0.28, 0.42),
                              (0.10, 0.20)]),
    "noisy": ("noise_sigma", [(0, 1.5), (3, 6), (8, 13), (16, 26)]),
    "hazy": ("haze", [(0, 0), (0.12, 0.22), (0.30, 0.42), (0.50, 0.65)]),
    "glare": ("glare", [(0, 0), (0.25, 0.40), (0.55, 0.75), (0.90, 1.30)]),
}
_LEVEL = {"slightly": 1, "moderately": 2, "heavily": 3, "slight": 1,
          "moderate": 2, "heavy": 3}


def _render(source, scene, index):
  """Renders `scene` with the rendering noise of record `index`."""
  rng = np.random.default_rng(
      [source.seed, index, source.height, source.width, 1])
  return synthetic.render_scene(scene, rng)


def _drawn_people(source, scene, index):
  """(full render, person, render without them, pixels they cover) for each
  person visible in the clean image, after checking each is warm in the
  infrared however dark in the visible image."""
  full = _render(source, scene, index)
  for k, person in enumerate(scene.people):
    without = _render(source, dataclasses.replace(
        scene, people=scene.people[:k] + scene.people[k + 1:]), index)
    drawn = np.any(full["vis_clean"] != without["vis_clean"], axis=-1)
    if drawn.sum() < 10:  # hidden behind nearer objects
      continue
    assert full["ir"][drawn].mean() > full["ir"].mean() + 30
    yield full, person, without, drawn


def _counts_by_third(phrase_match) -> list[int]:
  """Counts per image third from a parsed 'N nouns (where...)' phrase."""
  counts = [0, 0, 0]
  if phrase_match.group("single"):
    counts[_THIRD[phrase_match.group("single")]] = _NUMBER[
        phrase_match.group("n")]
  else:
    for n, where in re.findall(r"(\w+) (on the left|in the centre|on the "
                               r"right)", phrase_match.group("several")):
      counts[_THIRD[where]] += _NUMBER[n]
  return counts


def _parse_group(text: str, noun: str):
  return re.search(
      rf"\b(?P<n>an?|one|two|three|four|five) {noun}s?"
      r"(?: (?P<single>on the left|in the centre|on the right)| \((?P<several>"
      r"[^)]*)\))", text)


def test_records_are_deterministic_random_access():
  a = synthetic.SyntheticPairs(20, 64, 80, seed=5)
  b = synthetic.SyntheticPairs(200, 64, 80, seed=5)  # other length, same i
  for i in (0, 7, 19):
    ra, rb = a[i], b[i]
    assert ra.keys() == rb.keys()
    for key in ("ir", "vis", "vis_clean"):
      np.testing.assert_array_equal(ra[key], rb[key])
    assert ra["captions"] == rb["captions"] == a.captions(i)
    assert ra["name"] == rb["name"] == f"synthetic_5_{i:06d}"
  other_seed = synthetic.SyntheticPairs(20, 64, 80, seed=6)[7]
  assert not np.array_equal(other_seed["vis_clean"], a[7]["vis_clean"])
  assert not np.array_equal(a[8]["vis_clean"], a[7]["vis_clean"])
  with pytest.raises(IndexError):
    a[20]


def test_record_format():
  source = synthetic.SyntheticPairs(6, 48, 72, seed=0)
  assert len(source) == 6
  for record in (source[i] for i in range(len(source))):
    assert set(record) == {"name", "ir", "vis", "vis_clean", "captions"}
    assert record["ir"].shape == (48, 72, 1)
    assert record["vis"].shape == record["vis_clean"].shape == (48, 72, 3)
    for key in ("ir", "vis", "vis_clean"):
      assert record[key].dtype == np.uint8
    assert record["ir"].std() > 5 and record["vis_clean"].std() > 5
    assert len(record["captions"]) >= 2
    assert all(isinstance(c, str) and c for c in record["captions"])


def test_people_captions_match_drawn_people():
  source = synthetic.SyntheticPairs(40, 96, 96, seed=2)
  with_people = 0
  for i in range(len(source)):
    scene = source.scene(i)
    content, condition, hidden = source.captions(i)
    if not scene.people:
      assert "pedestrian" not in content + condition + hidden
      assert "nobody" in hidden
      continue
    with_people += 1
    thirds = [0, 0, 0]
    for _, p, _, drawn in _drawn_people(source, scene, i):
      # The third the caption uses overlaps the drawn columns.
      third = min(2, int(3 * p.x / 96))
      cols = np.nonzero(drawn)[1]
      assert cols.min() < (third + 1) * 32 and cols.max() >= third * 32
      thirds[third] += 1
    for caption, noun in ((content, "pedestrian"),
                          (condition, "warm pedestrian")):
      parsed = _parse_group(caption, noun)
      assert parsed, caption
      counts = _counts_by_third(parsed)
      assert sum(counts) == len(scene.people), caption
      assert all(c >= t for c, t in zip(counts, thirds)), (caption, thirds)
  assert with_people >= 20


def test_vehicle_captions_match_drawn_vehicles():
  source = synthetic.SyntheticPairs(40, 96, 96, seed=3)
  heat = []
  for i in range(len(source)):
    scene = source.scene(i)
    content, condition, _ = source.captions(i)
    words = re.findall(r"\b(an?|one|two|three) (moving|parked) (car|van)s?",
                       content)
    counted = {}
    for n, state, kind in words:
      counted[(state, kind)] = counted.get((state, kind), 0) + _NUMBER[n]
    expected = {}
    for v in scene.vehicles:
      key = ("moving" if v.moving else "parked", v.kind)
      expected[key] = expected.get(key, 0) + 1
    assert counted == expected, content
    assert ("hot engine" in condition) == any(v.moving for v in scene.vehicles)
    full = _render(source, scene, i)
    for k, v in enumerate(scene.vehicles):
      if not v.moving:
        continue
      others = list(scene.vehicles)
      del others[k]
      without = _render(source, dataclasses.replace(scene,
                                                    vehicles=tuple(others)), i)
      drawn = np.any(full["vis_clean"] != without["vis_clean"], axis=-1)
      others.insert(k, dataclasses.replace(v, moving=False))
      parked = _render(source, dataclasses.replace(scene,
                                                   vehicles=tuple(others)), i)
      if drawn.sum() > 20:  # not hidden behind nearer objects
        heat.append((full["ir"][drawn].astype(float) -
                     parked["ir"][drawn].astype(float)).mean())
  # A running vehicle is warmer in infrared than the same vehicle parked.
  assert len(heat) >= 10 and min(heat) > 10, heat


def test_degradation_words_follow_documented_ranges():
  source = synthetic.SyntheticPairs(400, 64, 64, seed=4)
  seen = set()
  for i in range(len(source)):
    d = source.scene(i).degradation
    condition = source.captions(i)[1].split(";")[0].lower()
    found = {kind: _LEVEL[adverb] for adverb, kind in re.findall(
        r"(slightly|moderately|heavily) (underexposed|noisy|hazy)", condition)}
    glare = re.search(r"(slight|moderate|heavy) glare from (headlights|street "
                      r"lamps)", condition)
    if glare:
      found["glare"] = _LEVEL[glare.group(1)]
      assert glare.group(2) == d.glare_source
    assert found, "every visible image is degraded somehow"
    for word, (attribute, ranges) in _DOCUMENTED.items():
      level = found.get(word, 0)
      low, high = ranges[level]
      assert low - 1e-9 <= getattr(d, attribute) <= high + 1e-9, (
          condition, d)
      seen.add((word, level))
  # Every kind of degradation occurs at every severity.
  assert seen == {(w, lv) for w in _DOCUMENTED for lv in range(4)}


def test_degradation_parameters_match_pixels():
  """vis = gain * ((1 - haze) clean + haze airlight) + glare + noise."""
  source = synthetic.SyntheticPairs(120, 64, 64, seed=5)
  yy, xx = np.mgrid[:64, :64]
  checked = sloped = glared = 0
  for i in range(len(source)):
    d = source.scene(i).degradation
    record = source[i]
    clean = record["vis_clean"].astype(float)
    vis = record["vis"].astype(float)
    airlight = d.gain * d.haze * 255 * synthetic.AIRLIGHT
    expected = d.gain * (1 - d.haze) * clean + airlight
    if d.glare:
      near = np.min([(yy - gy) ** 2 + (xx - gx) ** 2
                     for gy, gx in d.glare_points], axis=0) < 9
      if near.any():  # brighter there, up to saturation
        assert (vis - expected)[near].mean() > 0.3 * min(
            255 * d.glare, (255 - expected[near]).mean())
        glared += 1
      continue
    # Pixels whose expected value is far from 0 and 255, so clipping does not
    # bias the statistics.
    usable = ((expected > 3 * d.noise_sigma + 2) &
              (expected < 253 - 3 * d.noise_sigma))
    if usable.sum() < 300:
      continue
    residual = (vis - expected)[usable]
    assert abs(residual.mean()) < 2.0
    assert abs(residual.std() - d.noise_sigma) < 0.1 * d.noise_sigma + 1.0
    spread = clean[usable].std()
    if spread > 20:  # enough spread to pin down the slope
      slope = np.polyfit(clean[usable], (vis - airlight)[usable], 1)[0]
      # 4 standard errors of the least-squares slope, plus rounding.
      tolerance = 4 * d.noise_sigma / (spread * np.sqrt(usable.sum())) + 0.01
      assert abs(slope - d.gain * (1 - d.haze)) < tolerance
      sloped += 1
    checked += 1
  assert checked >= 30 and sloped >= 20 and glared >= 20


def test_hidden_people_are_dark_in_visible_but_warm_in_ir():
  source = synthetic.SyntheticPairs(120, 96, 96, seed=6)
  ratio = {True: [], False: []}
  for i in range(len(source)):
    scene = source.scene(i)
    if not scene.people:
      continue
    for full, p, without, _ in _drawn_people(source, scene, i):
      rows = slice(int(round(p.foot_y - 0.75 * p.height)),
                   int(round(p.foot_y - 0.45 * p.height)))
      cols = slice(int(round(p.x - 0.12 * p.height)),
                   int(round(p.x + 0.12 * p.height)))
      luma = [r["vis"][rows, cols].astype(float) @ _LUMA
              for r in (full, without)]
      threshold = max(8.0, 1.5 * scene.degradation.noise_sigma)
      ratio[p.hidden].append(abs((luma[0] - luma[1]).mean()) / threshold)
  assert len(ratio[True]) >= 20 and len(ratio[False]) >= 20
  # Captioned as hidden => measured contrast in 'vis' is around or below the
  # noise threshold (the prediction ignores ground texture and glare).
  assert np.quantile(ratio[True], 0.9) < 1.0 and max(ratio[True]) < 1.5
  assert np.median(ratio[False]) > 3 * np.median(ratio[True])


def test_trees_and_shadows_are_invisible_in_ir():
  source = synthetic.SyntheticPairs(30, 64, 64, seed=7)
  changed = 0
  for i in range(len(source)):
    scene = source.scene(i)
    if not scene.trees:
      continue
    bare = dataclasses.replace(scene, trees=(), shadows=())
    full, without = _render(source, scene, i), _render(source, bare, i)
    np.testing.assert_array_equal(full["ir"], without["ir"])
    changed += not np.array_equal(full["vis_clean"], without["vis_clean"])
  assert changed >= 10


def test_scenes_vary_in_lighting_and_content():
  source = synthetic.SyntheticPairs(120, 48, 48, seed=8)
  brightness = {"day": [], "dusk": []}
  people = vehicles = 0
  for i in range(len(source)):
    scene = source.scene(i)
    brightness[scene.lighting].append(source[i]["vis_clean"].mean())
    people += bool(scene.people)
    vehicles += bool(scene.vehicles)
  assert len(brightness["day"]) > 30 and len(brightness["dusk"]) > 30
  # Dusk scenes are genuinely darker targets.
  assert np.mean(brightness["dusk"]) < 0.8 * np.mean(brightness["day"])
  assert 40 < people < 120 and 40 < vehicles < 120
