"""Captioned visible-image degradations for real pairs, and their grammar.

The synthetic generator's degradation model (`input_pipeline.synthetic`),
applied to a real, clean visible image in [0, 1], in this order:

  haze           x' = (1 - haze) x + haze * AIRLIGHT (a grey-blue)
  underexposure  x' = gain * x
  noise          x' = x + sigma / 255 * (0.8 n_shared + 0.6 n_channel), with
                 standard normal n shared by the channels and per channel

then clipped and rounded to 8 bits. Each kind is drawn independently at a
level 0 (absent) to 3, then its parameter uniformly inside the level's range
(the same ranges as the synthetic data, with gaps, so the words are
unambiguous functions of the parameters):

  level        0 (absent)   1 slightly    2 moderately  3 heavily
  gain         [0.85, 1]    [0.50, 0.70]  [0.28, 0.42]  [0.10, 0.20]
  noise_sigma  [0, 1.5]     [3, 6]        [8, 13]       [16, 26]
  haze         0            [0.12, 0.22]  [0.30, 0.42]  [0.50, 0.65]

Condition sentence (what a user types as the prompt):

  sentence   := terms " visible image" | "clean visible image"
  terms      := term (", " term)*          at most one term per kind, in
                                           the order underexposed, noisy, hazy
  term       := adverb " " kind
  adverb     := "slightly" | "moderately" | "heavily"      (levels 1, 2, 3)
  kind       := "underexposed" | "noisy" | "hazy"

e.g. "heavily underexposed, slightly noisy visible image"; an undegraded
input is "clean visible image". `parse_condition` reads the sentence back
(case and surrounding spaces ignored); there are 4^3 = 64 sentences.

Draws are pure functions of (seed, epoch, record): the pipeline passes a
generator seeded by them, so data order and resume stay exact.

Prompt-following targets (config.data.degradations.renamed_prob): a share of
training crops is prompted with another sentence, whose level of one kind is
changed (`rename_one_level`; the kinds in config.data.degradations.
renamed_kinds, by default underexposure and haze, so noise keeps its true
level; config.data.degradations.renamed_max_kinds > 1 changes up to that
many kinds at once, `rename_levels`), and the target is what that sentence
asks for (`prompted_target`): the degraded crop with the named gain and haze
undone instead of the true ones. Trained only on true sentences, the network
learned to read brightness from the pixels (real scenes are mostly well
exposed) and half-ignored the words; with renamed prompts the words decide
how far it corrects. When noise may be renamed too, a sentence that names
less noise than the input holds asks for the unnamed share to stay: the
crop's own noise times 1 - named sigma / true sigma (nearly all of it when
the sentence names no noise: level 0's sigma is at most 1.5), then the named
gain and haze undone as for the rest of the image, so brightening amplifies
the noise it keeps, as brightening the input itself would (clipped to 8 bits
like it). One that names more noise than there is asks for the clean crop,
as the true sentence does. With Wiener targets (below), a target that keeps
noise is not shrunk: the gain is for noise that was removed.

What the stage-2 reference model is asked to match on a renamed crop
(config.data.degradations.renamed_reference): by default
('fuse_prompted_target') its fusion of the prompted target, the infrared and
"clean visible image". A prompted target darker than the clean crop then
gives a fusion that leans on the infrared (the intensity and gradient terms
take the brighter, sharper source), so a wrong sentence's fusion came out
nearer a copy of the infrared, which MI, VIF and Qabf (summed over the
sources) reward. With 'prompted_fusion' the reference fuses the true
sentence's target (the clean crop, or its Wiener target) and the
named-versus-true gain and haze are applied to that fusion
(`prompted_affine`): a wrong sentence asks for the same fusion, mis-exposed
or hazed as the sentence says, so the words still decide the brightness and
the balance of the sources stays the true one's. Noise cannot be renamed
then (an affine map cannot put noise back).

Wiener targets (config.data.degradations.wiener_target): the target's
contrast around its per-channel mean is scaled by the Wiener gain of the
degraded input, S / (S + N): S the clean crop's luma variance times
(gain (1 - haze))^2, N the luma noise variance (0.8^2 + 0.6^2 * sum of the
squared luma weights, times sigma^2) plus 8-bit rounding (1/12); all in grey
levels squared (`wiener_gain`). A gain and a haze rescale signal and noise
alike, so undoing them (under the true or a renamed prompt) leaves S / N as
it is. Where noise buries the visible detail (heavily underexposed and
noisy: N/S of 1 or more), the clean crop asks for detail the input no longer
holds; an L1 loss then pulls the output to its conditional mean, flat and
washed out, with the infrared's contrast diluted in it. The shrunk target
keeps the brightness and colour that the prompt restores, asks for only the
share of visible contrast that survives, and so leaves the infrared's detail
at full strength where the visible image has lost its own. Measured (README):
a stage trained toward it lifted the true and the shuffled prompts' fusions
alike, so it is off by default.

With wiener_kind='contrast_squared' the contrast is scaled by the gain
squared: the visible image's share of the fusion falls with the share of its
contrast that survives, so the fusion leans further on the infrared.

Spectral Wiener targets (wiener_kind='spectral'; 'contrast' above is the
default): the same S / (S + N), but per spatial frequency (`wiener_filter`):
S the clean crop's luma power per orthonormal DCT coefficient, smoothed over
7x7 neighbouring coefficients (one coefficient's power is a single noisy
draw, and keeps speckle), N the noise variance as above; so the
target keeps the large-scale brightness and contrast that survive any noise
and loses only the fine detail that the noise buries. A whole-crop gain also
flattens the shapes a noisy input still shows.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import scipy.fft
from scipy import ndimage

from input_pipeline.errors import UserError
from input_pipeline.synthetic import scenes

# (parameter, word, ranges per level), in the sentence's order.
KINDS = (("gain", "underexposed", scenes.GAIN_RANGES),
         ("noise_sigma", "noisy", scenes.NOISE_RANGES),
         ("haze", "hazy", scenes.HAZE_RANGES))
ADVERBS = scenes.SEVERITY_ADVERBS  # ("", "slightly", "moderately", "heavily")
CLEAN = "clean visible image"
NUM_LEVELS = 4

Levels = tuple[int, int, int]  # (underexposure, noise, haze), each 0..3


def all_levels() -> list[Levels]:
  """Every level triple, in `levels_index` order."""
  return list(itertools.product(range(NUM_LEVELS), repeat=len(KINDS)))


def levels_index(levels: Levels) -> int:
  """Row of `levels` in `all_levels()` (and in a condition table)."""
  check_levels(levels, "levels")
  index = 0
  for level in levels:
    index = index * NUM_LEVELS + level
  return index


def check_levels(levels: Sequence[int], field: str) -> Levels:
  if (len(levels) != len(KINDS) or
      any(not isinstance(l, (int, np.integer)) or not 0 <= l < NUM_LEVELS
          for l in levels)):
    raise UserError(f"{field}={tuple(levels)!r}: give one level 0..3 for each "
                    "of underexposure, noise and haze")
  return tuple(int(l) for l in levels)


def condition_sentence(levels: Levels) -> str:
  """The prompt that names `levels` (grammar in the module docstring)."""
  levels = check_levels(levels, "levels")
  terms = [f"{ADVERBS[level]} {word}"
           for level, (_, word, _) in zip(levels, KINDS) if level]
  return ", ".join(terms) + " visible image" if terms else CLEAN


_TERM = re.compile(r"^(slightly|moderately|heavily) (underexposed|noisy|hazy)$")


def parse_condition(text: str) -> Levels | None:
  """The levels a condition sentence names, or None if `text` is not one."""
  text = " ".join(text.strip().lower().split())
  if text == CLEAN:
    return (0, 0, 0)
  if not text.endswith(" visible image"):
    return None
  levels = [0] * len(KINDS)
  order = [word for _, word, _ in KINDS]
  last = -1
  for term in text[:-len(" visible image")].split(", "):
    match = _TERM.match(term)
    if not match:
      return None
    kind = order.index(match.group(2))
    if kind <= last:  # repeated or out of order
      return None
    levels[kind], last = ADVERBS.index(match.group(1)), kind
  return tuple(levels)


def mentions_condition_words(text: str) -> bool:
  """Whether `text` uses any word of the grammar (for a one-time warning)."""
  words = set(re.findall(r"[a-z]+", text.lower()))
  return bool(words & {"underexposed", "noisy", "hazy", "clean"})


def sample_levels(rng: np.random.Generator,
                  level_probs: Sequence[float]) -> Levels:
  """Each kind's level drawn independently with probabilities `level_probs`."""
  return tuple(int(rng.choice(NUM_LEVELS, p=level_probs)) for _ in KINDS)


def check_level_probs(level_probs: Sequence[float], field: str) -> np.ndarray:
  try:
    probs = np.asarray(level_probs, np.float64)
  except (TypeError, ValueError):
    probs = np.zeros(0)
  if (probs.shape != (NUM_LEVELS,) or not np.all(np.isfinite(probs)) or
      np.any(probs < 0) or not np.isclose(probs.sum(), 1.0)):
    raise UserError(f"{field}={level_probs!r}: give 4 probabilities "
                    "(levels 0, 1, 2, 3) that sum to 1")
  return probs / probs.sum()


Parameters = tuple[float, float, float]  # (gain, noise_sigma, haze)


def draw_parameters(levels: Levels, rng: np.random.Generator) -> Parameters:
  """Each kind's parameter, uniform inside its level's range."""
  levels = check_levels(levels, "levels")
  return tuple(float(rng.uniform(*ranges[level]))
               for level, (_, _, ranges) in zip(levels, KINDS))


def _haze_and_gain(x: np.ndarray, gain: float, haze: float) -> np.ndarray:
  if haze:
    x = x * (1 - haze) + haze * scenes.AIRLIGHT
  return x * gain


def degrade(vis_u8: np.ndarray, levels: Levels,
            rng: np.random.Generator) -> np.ndarray:
  """The visible uint8 image (H, W, 3) degraded at `levels`, as uint8."""
  return apply(vis_u8, draw_parameters(levels, rng), rng)


def apply(vis_u8: np.ndarray, params: Parameters,
          rng: np.random.Generator) -> np.ndarray:
  """`vis_u8` degraded with explicit `params` (noise drawn from `rng`)."""
  gain, sigma, haze = params
  x = _haze_and_gain(np.asarray(vis_u8, np.float32) / np.float32(255), gain,
                     haze)
  if sigma:
    h, w, _ = x.shape
    shared = rng.standard_normal((h, w, 1), dtype=np.float32)
    own = rng.standard_normal((h, w, 3), dtype=np.float32)
    # 0.8^2 + 0.6^2 = 1 keeps the per-channel std equal to sigma.
    x = x + sigma / 255.0 * (0.8 * shared + 0.6 * own)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


_LUMA_WEIGHTS = np.asarray((0.299, 0.587, 0.114), np.float32)
# Luma noise std per unit of `apply`'s per-channel sigma: the shared part
# (0.8) passes whole, the per-channel part (0.6) through the luma weights.
_LUMA_NOISE_STD = float(np.sqrt(0.8**2 + 0.6**2 * np.sum(
    np.square(_LUMA_WEIGHTS))))


def _signal_scale(gain: float, haze: float) -> float:
  """What underexposure and haze multiply the visible signal's power by."""
  return (gain * (1.0 - haze))**2


def _luma_noise_variance(sigma: float) -> float:
  """The degraded luma's noise variance, 8-bit rounding included, in grey
  levels squared."""
  return (_LUMA_NOISE_STD * sigma)**2 + 1.0 / 12.0


def wiener_gain(clean_u8: np.ndarray, params: Parameters) -> float:
  """S / (S + N) for `clean_u8` degraded with `params` (module docstring)."""
  gain, sigma, haze = params
  rgb = np.asarray(clean_u8, np.float32)
  luma = rgb @ _LUMA_WEIGHTS
  signal = float(luma.var()) * _signal_scale(gain, haze)
  return signal / (signal + _luma_noise_variance(sigma))


WIENER_KINDS = ("contrast", "contrast_squared", "spectral")
# DCT coefficients (per side) averaged into the spectral filter's signal power.
_SPECTRUM_SMOOTHING = 7


def wiener_filter(clean_u8: np.ndarray, params: Parameters,
                  image_u8: np.ndarray | None = None) -> np.ndarray:
  """`image_u8` (default `clean_u8`; (H, W, 3)) filtered per spatial
  frequency by S / (S + N) of `clean_u8` degraded under `params` (module
  docstring), as uint8."""
  gain, sigma, haze = params
  x = np.asarray(clean_u8, np.float32)
  image = x if image_u8 is None else np.asarray(image_u8, np.float32)
  if image.shape != x.shape:
    raise ValueError(f"image of shape {image.shape} filtered by a clean "
                     f"image of shape {x.shape}")
  # An orthonormal DCT-II is the Fourier transform of the symmetrically
  # extended image (no jumps at the borders to spread power everywhere),
  # and gives white noise its variance in every coefficient.
  dct = lambda a: scipy.fft.dctn(a, type=2, norm="ortho", axes=(0, 1))
  signal = ndimage.uniform_filter(dct(x @ _LUMA_WEIGHTS)**2,
                                  _SPECTRUM_SMOOTHING, mode="mirror")
  signal *= _signal_scale(gain, haze)
  keep = signal / (signal + _luma_noise_variance(sigma))
  keep[0, 0] = 1.0  # the mean is known whatever the noise
  filtered = scipy.fft.idctn(dct(image) * keep[..., None], type=2,
                             norm="ortho", axes=(0, 1))
  return np.clip(np.rint(filtered), 0, 255).astype(np.uint8)


def wiener_target(target_u8: np.ndarray, clean_u8: np.ndarray,
                  params: Parameters, kind: str) -> np.ndarray:
  """`target_u8` reduced to what of `clean_u8` survives its degradation
  under `params`: contrast scaled by `wiener_gain` ('contrast') or by its
  square ('contrast_squared'), or filtered by `wiener_filter` ('spectral')."""
  if kind in ("contrast", "contrast_squared"):
    factor = wiener_gain(clean_u8, params)
    return shrink_contrast(target_u8,
                           factor**2 if kind == "contrast_squared" else factor)
  if kind == "spectral":
    return wiener_filter(clean_u8, params, target_u8)
  raise ValueError(f"Wiener target kind {kind!r}: one of {WIENER_KINDS}")


def shrink_contrast(image_u8: np.ndarray, factor: float) -> np.ndarray:
  """`image_u8` (H, W, C) with its contrast around each channel's mean
  scaled by `factor` in [0, 1], as uint8."""
  if not 0.0 <= factor <= 1.0:
    raise ValueError(f"contrast factor {factor} outside [0, 1]")
  x = np.asarray(image_u8, np.float32)
  mean = x.mean(axis=(0, 1), keepdims=True)
  return np.clip(np.rint(mean + factor * (x - mean)), 0, 255).astype(np.uint8)


def renamed_parameters(params: Parameters, levels: Levels,
                       named: Levels) -> Parameters:
  """`params` moved from `levels`' ranges to `named`'s, at the same relative
  position inside each range (the middle when a range is a single value)."""
  out = []
  for p, level, new, (_, _, ranges) in zip(params, levels, named, KINDS):
    (lo, hi), (new_lo, new_hi) = ranges[level], ranges[new]
    u = (p - lo) / (hi - lo) if hi > lo else 0.5
    out.append(new_lo + u * (new_hi - new_lo))
  return tuple(out)


KIND_WORDS = tuple(word for _, word, _ in KINDS)
# What config.data.degradations.renamed_kinds defaults to.
DEFAULT_RENAMED_KINDS = ("underexposed", "hazy")


def check_renamed_kinds(kinds: Sequence[str], field: str) -> tuple[str, ...]:
  """`kinds`, distinct KIND_WORDS, in KIND_WORDS order (so the draws do not
  depend on how a config lists them); a UserError naming `field`."""
  if (isinstance(kinds, str) or not isinstance(kinds, Sequence) or
      not kinds or any(kind not in KIND_WORDS for kind in kinds) or
      len(set(kinds)) != len(kinds)):
    raise UserError(f"{field}={kinds!r}: give distinct kinds out of "
                    f"{', '.join(KIND_WORDS)}")
  return tuple(kind for kind in KIND_WORDS if kind in kinds)


def rename_one_level(levels: Levels, rng: np.random.Generator,
                     kinds: Sequence[str] = DEFAULT_RENAMED_KINDS) -> Levels:
  """`levels` with the level of one of `kinds` (equally likely) replaced by
  one of the other three levels. One kind at a time keeps the asked-for
  image within reach: renaming both underexposure and haze can ask to remove
  more airlight than a dark image has (an all-black target)."""
  levels = list(check_levels(levels, "levels"))
  positions = [KIND_WORDS.index(kind)
               for kind in check_renamed_kinds(kinds, "kinds")]
  # int(u * n) draws as `0 if u < 0.5 else 2` did for the default kinds.
  kind = positions[int(rng.random() * len(positions))]
  others = [l for l in range(NUM_LEVELS) if l != levels[kind]]
  levels[kind] = others[int(rng.integers(len(others)))]
  return tuple(levels)


def check_renamed_max_kinds(value: int, kinds: Sequence[str],
                            field: str) -> int:
  """`value` if it is an int in [1, len(kinds)]; a UserError naming `field`."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or
      not 1 <= value <= len(kinds)):
    raise UserError(f"{field}={value!r}: give a whole number from 1 to "
                    f"{len(kinds)} (the renamed kinds: {', '.join(kinds)})")
  return int(value)


def rename_levels(levels: Levels, rng: np.random.Generator,
                  kinds: Sequence[str] = DEFAULT_RENAMED_KINDS,
                  max_kinds: int = 1) -> Levels:
  """`levels` with 1 to `max_kinds` (equally likely) distinct `kinds` each
  replaced by another level. A wrong sentence a user types (or a shuffled
  one) usually differs in several kinds at once; with `max_kinds` 1 this is
  `rename_one_level`, draw for draw. Renaming underexposure and haze
  together can ask for more airlight removed than a dark crop holds (a
  black target; `rename_one_level`)."""
  if max_kinds == 1:
    return rename_one_level(levels, rng, kinds)
  check_levels(levels, "levels")
  kinds = check_renamed_kinds(kinds, "kinds")
  check_renamed_max_kinds(max_kinds, kinds, "max_kinds")
  count = 1 + int(rng.integers(max_kinds))
  renamed = list(levels)
  for kind in rng.choice(len(kinds), count, replace=False):
    position = KIND_WORDS.index(kinds[int(kind)])
    others = [l for l in range(NUM_LEVELS) if l != levels[position]]
    renamed[position] = others[int(rng.integers(len(others)))]
  return tuple(renamed)


def prompted_target(vis_u8: np.ndarray, params: Parameters, levels: Levels,
                    named: Levels,
                    degraded_u8: np.ndarray | None = None) -> np.ndarray:
  """What a prompt naming `named` asks for when the input `degraded_u8` was
  degraded with `params` at `levels`: the image with the *named*
  underexposure and haze undone (parameters renamed by
  `renamed_parameters`), as uint8. Equals `vis_u8` (up to rounding) when the
  named levels are the true ones, so it generalises the clean target: a
  prompt that claims heavier underexposure than the truth asks for a
  brighter image, a lighter one for a darker image. A prompt that names less
  noise than the truth keeps the input's noise times 1 - named sigma / true
  sigma (linear in sigma; `degraded_u8` is needed when the noise levels
  differ), and undoing the named gain and haze then scales that noise as it
  scales the image; one that names more asks for no noise, as the true
  prompt does.
  """
  gain, sigma, haze = params
  named_gain, named_sigma, named_haze = renamed_parameters(params, levels,
                                                           named)
  x = _haze_and_gain(np.asarray(vis_u8, np.float32) / np.float32(255), gain,
                     haze)
  if named[1] != levels[1]:
    if degraded_u8 is None:
      raise ValueError(f"named noise level {named[1]} != true {levels[1]} "
                       "needs the degraded image")
    # Level ranges are disjoint and ordered: a lower named level has a
    # smaller sigma, and the true one (level >= 1) is at least 3.
    if named[1] < levels[1]:
      noise = np.asarray(degraded_u8, np.float32) / np.float32(255) - x
      x = x + np.float32(1.0 - named_sigma / sigma) * noise
  x = (x / named_gain - named_haze * scenes.AIRLIGHT) / (1 - named_haze)
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# What config.data.degradations.renamed_reference may be (module docstring).
RENAMED_REFERENCES = ("fuse_prompted_target", "prompted_fusion")


def check_renamed_reference(value: str, kinds: Sequence[str],
                            field: str) -> str:
  """`value` if it is one of RENAMED_REFERENCES and fits the renamed `kinds`;
  a UserError naming `field` otherwise."""
  if value not in RENAMED_REFERENCES:
    raise UserError(f"{field}={value!r}: give one of "
                    f"{', '.join(RENAMED_REFERENCES)}")
  if value == "prompted_fusion" and "noisy" in kinds:
    # A gain and an offset cannot put back the noise a sentence leaves.
    raise UserError(f"{field}='prompted_fusion' cannot keep the noise a "
                    "renamed sentence leaves: drop 'noisy' from "
                    f"{field.replace('renamed_reference', 'renamed_kinds')}")
  return value


def prompted_affine(params: Parameters, levels: Levels,
                    named: Levels) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 (3,) each: the per-channel map x -> scale * x
  + offset that takes a clean image (in [0, 1]) to what a sentence naming
  `named` asks for when the truth is `levels` with `params`: the true haze
  and gain applied, then the named ones undone (`prompted_target` without
  noise and rounding). The identity when `named` equals `levels`."""
  gain, _, haze = params
  named_gain, _, named_haze = renamed_parameters(params, levels, named)
  airlight = scenes.AIRLIGHT.astype(np.float64)
  scale = gain * (1 - haze) / (named_gain * (1 - named_haze))
  offset = (gain * haze / named_gain - named_haze) * airlight / (
      1 - named_haze)
  return (np.full(3, scale, np.float32), offset.astype(np.float32))
