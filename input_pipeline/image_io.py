"""Image reading and writing shared by evaluation, fusion and dataset building.

Conventions (cited by `textfusion_jax.metrics` and the dataset builders):

* Files are decoded with Pillow. PNG, JPG/JPEG, BMP and TIFF are accepted.
* Grey images come back as (H, W) uint8, colour images as (H, W, 3) uint8 RGB
  (an alpha channel is dropped; palette images are converted to RGB).
* 16-bit images are reduced to 8 bits by one of two documented rules:
    - ``"full"``:   v8 = round(v16 * 255 / 65535)  (keeps absolute levels; used
      for fused outputs and visible images),
    - ``"minmax"``: v8 = round(255 * (v16 - min) / (max - min)) per image (used
      for raw thermal frames, which seldom span the 16-bit range; a constant
      image maps to 0).
  `read_image` reports which rule was applied through `ImageInfo.was_16bit`.
* Colour -> grey follows OpenCV's BGR2GRAY: Y = 0.299 R + 0.587 G + 0.114 B,
  rounded to the nearest integer (the convention of the evaluator most fusion
  papers copy).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from input_pipeline import files
from input_pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SixteenBitRule = Literal["full", "minmax"]


class ImageReadError(UserError):
  """An image file is missing, empty, truncated or not an image."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What `read_image` found out about a file while decoding it."""
  path: str
  was_16bit: bool
  was_grey: bool


def list_images(directory: str | os.PathLike) -> dict[str, Path]:
  """Maps file stem -> path for every image file directly inside `directory`.

  Raises ImageReadError naming the directory if it does not exist, and naming
  both files if two images share a stem (e.g. `1.png` and `1.jpg`).
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise ImageReadError(f"{directory}: not a directory")
  by_stem: dict[str, Path] = {}
  for path in sorted(directory.iterdir()):
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
      continue
    if path.stem in by_stem:
      raise ImageReadError(
          f"{directory}: two images share the stem {path.stem!r}: "
          f"{by_stem[path.stem].name} and {path.name}")
    by_stem[path.stem] = path
  return by_stem


def sixteen_to_eight_bit(values: np.ndarray,
                         rule: SixteenBitRule = "full") -> np.ndarray:
  """Reduces a 16-bit array to uint8 by the documented `rule`."""
  values = values.astype(np.float64)
  if rule == "full":
    scaled = values * (255.0 / 65535.0)
  elif rule == "minmax":
    low, high = values.min(), values.max()
    scaled = (np.zeros_like(values) if high <= low else
              (values - low) * (255.0 / (high - low)))
  else:
    raise ValueError(f"unknown 16-bit rule {rule!r}; use 'full' or 'minmax'")
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image_with_info(
    path: str | os.PathLike,
    sixteen_bit_rule: SixteenBitRule = "full") -> tuple[np.ndarray, ImageInfo]:
  """Decodes `path` to uint8 (H, W) grey or (H, W, 3) RGB, with an ImageInfo."""
  path = Path(path)
  try:
    if path.stat().st_size == 0:
      raise ImageReadError(f"{path}: empty file (0 bytes)")
    with Image.open(path) as image:
      image.load()
      mode = image.mode
      if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image)
        was_16bit = True
        if mode == "I" and array.max(initial=0) <= 255 and array.min(
            initial=0) >= 0:
          # 8-bit content stored in a 32-bit container (some BMP/TIFF writers).
          array, was_16bit = array.astype(np.uint8), False
        else:
          array = sixteen_to_eight_bit(array, sixteen_bit_rule)
        return array, ImageInfo(str(path), was_16bit, True)
      if mode in ("L", "1"):
        # convert() copies even when the mode already matches.
        grey = image if mode == "L" else image.convert("L")
        return np.asarray(grey), ImageInfo(str(path), False, True)
      if mode == "LA":
        return np.asarray(image.getchannel(0)), ImageInfo(str(path), False, True)
      array = np.asarray(image if mode == "RGB" else image.convert("RGB"))
      return array, ImageInfo(str(path), False, False)
  except ImageReadError:
    raise
  except FileNotFoundError:
    raise ImageReadError(f"{path}: file not found") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise ImageReadError(f"{path}: cannot decode image ({error})") from None


def read_image(path: str | os.PathLike,
               sixteen_bit_rule: SixteenBitRule = "full") -> np.ndarray:
  """Decodes `path` to uint8 (H, W) grey or (H, W, 3) RGB."""
  return read_image_with_info(path, sixteen_bit_rule)[0]


def rgb_to_grey_u8(rgb: np.ndarray) -> np.ndarray:
  """Y = 0.299 R + 0.587 G + 0.114 B of RGB uint8, rounded: (..., 3) -> (...).

  Exact in integers, ties to even: the same levels as the metrics' on-device
  `metrics.rgb_to_grey`, so a PNG scored from disk and the same image scored
  in training agree. (The reference evaluator's float32 OpenCV conversion
  rounds 0.005 % of all RGB triples, exact ties, the other way.)
  """
  scaled = rgb.astype(np.int32) @ np.array([299, 587, 114], np.int32)
  quotient, remainder = np.divmod(scaled, 1000)
  round_up = (remainder > 500) | ((remainder == 500) & (quotient % 2 == 1))
  return np.clip(quotient + round_up, 0, 255).astype(np.uint8)


def as_grey_u8(image: np.ndarray) -> np.ndarray:
  """Grey (H, W) uint8 view of a grey, (H, W, 1) or RGB uint8 image."""
  if image.ndim == 3 and image.shape[-1] == 1:
    return image[..., 0]
  if image.ndim == 3:
    return rgb_to_grey_u8(image)
  return image


def as_rgb_u8(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 view of a grey or colour image (grey is replicated)."""
  if image.ndim == 2:
    return np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 image as PNG via a temporary file and an atomic rename.

  A crash mid-write therefore never leaves a truncated PNG at `path`.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  with files.atomic_path(path) as tmp:
    Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
