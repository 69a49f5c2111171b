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
  Single-channel 32-bit integer images follow the same rules (values past
  16 bits only with "minmax"); float (mode F) images only with "minmax".
  Only single-channel 16-bit images: Pillow opens a 48-bit colour PNG as
  8-bit RGB by keeping each value's high byte (at most one level below the
  "full" rule), and `was_16bit` is then False.
* A JPEG's EXIF orientation is applied (as viewers and OpenCV's imread
  do), so a rotated phone JPEG is read upright.
* Colour -> grey follows OpenCV's BGR2GRAY: Y = 0.299 R + 0.587 G + 0.114 B,
  rounded to the nearest integer (the convention of the evaluator most fusion
  papers copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
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
  skipped = []
  for path in sorted(directory.iterdir()):
    if path.is_dir() and _holds_images(path):
      skipped.append(path.name)
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
      continue
    if path.stem in by_stem:
      raise ImageReadError(
          f"{directory}: two images share the stem {path.stem!r}: "
          f"{by_stem[path.stem].name} and {path.name}")
    by_stem[path.stem] = path
  if skipped:
    logging.warning("%s: subfolder(s) %s hold images that are not read; only "
                    "images directly inside %s are", directory,
                    ", ".join(f"{n}/" for n in skipped), directory)
  return by_stem


def _holds_images(directory: Path) -> bool:
  try:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in directory.iterdir())
  except OSError:
    return False


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


# Single-channel modes wider than 8 bits: 16-bit, 32-bit integer, float.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _reduce_wide(array: np.ndarray, mode: str, rule: SixteenBitRule,
                 name: str) -> np.ndarray:
  """A wide single-channel array -> uint8 by `rule`, or ImageReadError where
  the rule does not apply: a float image has no white level to keep
  ('full'), and 32-bit integers beyond 16 bits would saturate."""
  check_mode(mode, rule, name)
  if mode == "F":
    if not np.isfinite(array).all():
      raise ImageReadError(f"{name}: float image with NaN or infinite values")
  elif rule == "full" and (array.min(initial=0) < 0 or
                           array.max(initial=0) > 65535):
    raise ImageReadError(
        f"{name}: 32-bit values {int(array.min())}..{int(array.max())} exceed "
        "16 bits; save it as 8- or 16-bit")
  return sixteen_to_eight_bit(array, rule)


def sixteen_bit_note(names: Sequence[str]) -> str:
  """The line that tells which inputs were reduced to 8 bits, and how."""
  return (f"note: {len(names)} 16-bit image(s) scaled to 8 bits (infrared: "
          "v8 = round(255 (v - min) / (max - min)) per image; others: v8 = "
          "round(v16 * 255 / 65535)): " + ", ".join(names))


def is_wide(image: Image.Image) -> bool:
  """Whether an opened image is read as more than 8 bits per pixel (16-bit,
  32-bit or float grey): from its header, but a 32-bit image is decoded,
  since 8-bit values in that container are read as they are."""
  if image.mode == "I":
    low, high = image.getextrema()
    return low < 0 or high > 255
  return image.mode in _WIDE_MODES


def check_mode(mode: str, rule: SixteenBitRule, name: str) -> None:
  """Refuses a pixel mode that `rule` cannot reduce, from the header alone
  (so a folder check finds it before training starts)."""
  if mode == "F" and rule != "minmax":
    raise ImageReadError(
        f"{name}: float image (mode F) has no fixed white level; only "
        "infrared inputs, stretched per image, may be float: save it as "
        "8- or 16-bit")


def check_readable(image: Image.Image, name: str) -> Image.Image:
  """Refuses, before decoding, what Pillow opens but decodes wrongly."""
  if image.format == "PNG" and any(
      getattr(tile, "args", None) == "LA;16B" for tile in image.tile):
    # Pillow opens it as RGBA holding each value's low byte: noise.
    image.close()
    raise ImageReadError(f"{name}: 16-bit grey+alpha PNG is not supported "
                         "(Pillow misreads it); save it without the alpha "
                         "channel")
  return image


# EXIF orientations 5-8 swap width and height (a phone's portrait JPEG).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(image: Image.Image) -> int:
  # JPEG (and MPO) only: their EXIF sits in the header, where a PNG's may
  # follow the pixels (Pillow decodes the whole image to find it), and
  # Pillow's TIFF reader applies the orientation itself.
  if image.format not in ("JPEG", "MPO"):
    return 1
  return image.getexif().get(0x0112, 1)


def upright_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) as shown upright, from an opened image's header."""
  width, height = image.size
  if _orientation(image) in _TRANSPOSED_ORIENTATIONS:
    return width, height
  return height, width


def _upright(image: Image.Image) -> Image.Image:
  """The image as viewers (and OpenCV's imread) show it: EXIF orientation
  applied, so an infrared and a visible frame match as the user sees them."""
  if _orientation(image) in (1, None):
    return image
  return ImageOps.exif_transpose(image)


def _to_array(image: Image.Image, sixteen_bit_rule: SixteenBitRule,
              name: str) -> tuple[np.ndarray, ImageInfo]:
  """A loaded PIL image -> uint8 (H, W) grey or (H, W, 3) RGB + ImageInfo."""
  mode = image.mode
  if mode in _WIDE_MODES:
    array = np.asarray(image)
    was_16bit = True
    if mode == "I" and array.max(initial=0) <= 255 and array.min(
        initial=0) >= 0:
      # 8-bit content stored in a 32-bit container (some BMP/TIFF writers).
      array, was_16bit = array.astype(np.uint8), False
    else:
      array = _reduce_wide(array, mode, sixteen_bit_rule, name)
    return array, ImageInfo(name, was_16bit, True)
  if mode in ("L", "1"):
    # convert() copies even when the mode already matches.
    grey = image if mode == "L" else image.convert("L")
    return np.asarray(grey), ImageInfo(name, False, True)
  if mode == "LA":
    return np.asarray(image.getchannel(0)), ImageInfo(name, False, True)
  array = np.asarray(image if mode == "RGB" else image.convert("RGB"))
  return array, ImageInfo(name, False, False)


# What a decoder raises for a file it cannot read. A corrupt header can also
# claim a size past Pillow's decompression-bomb limit, which is no OSError.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                 Image.DecompressionBombError)


PIXEL_LIMIT_VARIABLE = "TEXTFUSION_MAX_IMAGE_PIXELS"


@functools.cache
def _pixel_limit() -> int | None:
  """The largest pixel count to read that the environment sets (0: none),
  or None where it sets none: Pillow's own limit applies."""
  value = os.environ.get(PIXEL_LIMIT_VARIABLE, "").strip()
  if not value:
    return None
  try:
    pixels = int(value)
    if pixels < 0:
      raise ValueError
  except ValueError:
    raise UserError(f"{PIXEL_LIMIT_VARIABLE}={value!r}: give a whole number "
                    "of pixels (0: no limit)") from None
  # `open_image` checks it exactly: Pillow's own check (at twice its limit,
  # with a warning above it) steps aside.
  Image.MAX_IMAGE_PIXELS = None
  return pixels


def apply_pixel_limit() -> None:
  """Checks the environment's pixel limit: Pillow refuses images over 2x
  Image.MAX_IMAGE_PIXELS (about 179 MP) as decompression bombs, and
  TEXTFUSION_MAX_IMAGE_PIXELS replaces that. The environment, not a flag:
  grain's worker processes read images too, and inherit it. Command-line
  tools call this first, so that a bad value is one line before any work."""
  _pixel_limit()


def open_image(source: str | os.PathLike | io.BytesIO) -> Image.Image:
  """Image.open under this project's pixel limit (see `describe_error`)."""
  limit = _pixel_limit()
  image = Image.open(source)
  width, height = image.size
  if limit and width * height > limit:
    image.close()
    raise Image.DecompressionBombError(
        f"Image size ({width * height} pixels) exceeds the limit of {limit} "
        f"pixels that {PIXEL_LIMIT_VARIABLE} sets")
  return image


def describe_error(error: BaseException) -> str:
  """A decoder's error, with the way past the decompression-bomb limit
  when that is what refused the image."""
  if isinstance(error, Image.DecompressionBombError):
    return (f"{str(error).rstrip('.')}; if the file is trusted, raise the "
            f"limit with {PIXEL_LIMIT_VARIABLE}=<pixels> (0: none)")
  return str(error)


@contextlib.contextmanager
def _decoding(name: str):
  """Turns decoder failures into one ImageReadError naming the file."""
  try:
    yield
  except UserError:  # ImageReadError, or a bad pixel limit: not the file's
    raise
  except FileNotFoundError:
    raise ImageReadError(f"{name}: file not found") from None
  except DECODE_ERRORS as error:
    raise ImageReadError(
        f"{name}: cannot decode image ({describe_error(error)})") from None


def read_image_with_info(
    path: str | os.PathLike,
    sixteen_bit_rule: SixteenBitRule = "full") -> tuple[np.ndarray, ImageInfo]:
  """Decodes `path` to uint8 (H, W) grey or (H, W, 3) RGB, with an ImageInfo."""
  path = Path(path)
  with _decoding(str(path)):
    if path.stat().st_size == 0:
      raise ImageReadError(f"{path}: empty file (0 bytes)")
    with open_image(path) as image:
      check_readable(image, str(path)).load()
      return _to_array(_upright(image), sixteen_bit_rule, str(path))


class EncodedImage:
  """An image file (a path, or its bytes from a record) decoded on demand.

  `crop` decodes the file but converts only the window to numpy: turning a
  whole decoded 1280x1024 RGB frame into an array costs ~3x its JPEG decode
  in Pillow, so a 256x256 training crop skips most of the work. The pixels
  equal the same window of `read_image` + `as_grey_u8` (channels=1) or
  `as_rgb_u8` (channels=3): every conversion here is per pixel, except
  16-bit reduction ('minmax' is per image), which takes the whole-image path.
  `np.asarray(image)` gives the whole (H, W, channels) uint8 image.
  """

  dtype = np.dtype(np.uint8)

  def __init__(self, source: str | os.PathLike | bytes, channels: int,
               sixteen_bit_rule: SixteenBitRule = "full",
               name: str | None = None):
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self._source = source if isinstance(source, bytes) else Path(source)
    self._channels, self._rule = channels, sixteen_bit_rule
    self.name = name or str(source if not isinstance(source, bytes)
                            else "<bytes>")
    self._size: tuple[int, int] | None = None

  def _open(self) -> Image.Image:
    if isinstance(self._source, bytes):
      if not self._source:
        raise ImageReadError(f"{self.name}: empty image (0 bytes)")
      return check_readable(open_image(io.BytesIO(self._source)), self.name)
    if self._source.stat().st_size == 0:
      raise ImageReadError(f"{self.name}: empty file (0 bytes)")
    return check_readable(open_image(self._source), self.name)

  @property
  def shape(self) -> tuple[int, int, int]:
    if self._size is None:
      with _decoding(self.name), self._open() as image:  # header only
        self._size = upright_size(image)
    return (*self._size, self._channels)

  @property
  def ndim(self) -> int:
    return 3

  def _shaped(self, array: np.ndarray) -> np.ndarray:
    if self._channels == 1:
      return as_grey_u8(array)[..., None]
    return as_rgb_u8(array)

  def crop(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The (height, width, channels) uint8 window at (top, left)."""
    with _decoding(self.name), self._open() as opened:
      image = _upright(opened)
      if image.mode in _WIDE_MODES:  # per-image rules: convert it all
        image.load()
        array = _to_array(image, self._rule, self.name)[0]
        return self._shaped(array[top:top + height, left:left + width])
      window = image.crop((left, top, left + width, top + height))
      return self._shaped(_to_array(window, self._rule, self.name)[0])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy
    with _decoding(self.name), self._open() as image:
      image.load()
      array = self._shaped(_to_array(_upright(image), self._rule,
                                     self.name)[0])
    return array if dtype is None else array.astype(dtype)

  def __getitem__(self, key: Any) -> np.ndarray:
    return np.asarray(self)[key]


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


# The PNG "Software" text of every image written here: an existing file
# that carries it may be replaced by a rerun, one that does not may be a
# user's source image.
SOFTWARE = "textfusion-jax"


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 image as PNG via a temporary file and an atomic rename.

  A crash mid-write therefore never leaves a truncated PNG at `path`.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  info = PngImagePlugin.PngInfo()
  info.add_text("Software", SOFTWARE)
  with files.atomic_path(path) as tmp:
    Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG",
                                                      pnginfo=info)


def written_here(path: str | os.PathLike) -> bool:
  """Whether `path` is a PNG that `write_png_atomic` wrote."""
  try:
    with open_image(path) as image:
      return (image.format == "PNG" and
              image.info.get("Software") == SOFTWARE)
  except DECODE_ERRORS:
    return False
