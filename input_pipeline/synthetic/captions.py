"""Synthetic scenes -> captions, from the scene parameters only.

The captions are what the text ablation varies (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

from input_pipeline.synthetic.scenes import (POSITIONS, SEVERITY_ADJECTIVES,
                                            SEVERITY_ADVERBS, Degradation,
                                            Scene, Vehicle)

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six")


def _position(x: float, width: int) -> int:
  return min(2, int(3 * x / width))


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
  """e.g. 'heavily underexposed and moderately noisy visible image with
  heavy glare from headlights' (the synthetic scenes' wording, with glare;
  real pairs' condition sentences join kinds with ', ' instead:
  `input_pipeline.degradations`)."""
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
