"""Scores folders of fused images against their IR/VIS sources.

The library behind `python -m textfusion_jax.evaluate` (see there for flags).

Images are matched by file stem across the folders (PNG, JPG, BMP, TIFF;
grey or colour, colour turned to grey by OpenCV's rule; 16-bit scaled to 8
bits by the rules training and `fuse` read them with, `input_pipeline.
layouts`: infrared stretched per image ('minmax'), the rest by 'full'; the
files this happened to are listed). The 12
metrics of `textfusion_jax.metrics` are computed on device by one jitted,
batched function. Images keep their size (no resizing): they are zero-padded
into a few bucket shapes and the metrics ignore the padding, so a folder of
many sizes costs a few compilations, not one per size.

--baselines adds the four trivial fusions of `textfusion_jax.fusion_baselines`
(copy_vis, copy_ir, rule_mean, rule_max), computed from the IR and VIS
folders, as rows of the same table (then --fused is optional). Copying one
source outranks most published methods on MI, VIF, Qabf and SSIM; that
module's docstring gives the numbers.

Prints a markdown table of per-method means with a mean_rank column (over
EN, SD, SF, MI, SCD, VIF, Qabf, SSIM, across the table's rows), then the
per-source parts (MI_ir, MI_vis, ...; see `textfusion_jax.metrics`); --json
writes {"methods": {name: {"mean": {...}, "mean_rank": r, "per_image":
{stem: {...}}}}} and --csv one row per (method, image) plus one "mean" row
per method. Bad input (missing
stems, size mismatches, unreadable files, empty folders, ...) ends with one
`error:` line listing every problem and exit status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from textfusion_jax import errors
from textfusion_jax import fusion_baselines
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline import layouts
from textfusion_jax import metrics
from textfusion_jax import tiling

# Bucket planning (tiling.plan_buckets): an extra compilation is worth this
# many pixel-evaluations of padding (a CPU compile of the metric suite takes
# ~5-10 s, scoring ~0.2 us per pixel; accelerators favour fewer compiles).
_COMPILE_COST_PIXELS = {"cpu": 4e7}
_DEFAULT_COMPILE_COST_PIXELS = 1e9
# Decoded grey images kept from the checking pass for scoring, up to this
# many bytes (beyond it they are decoded again when scored).
_CACHE_BYTES = 1 << 30


class EvaluationInputError(errors.UserError):
  """The folders cannot be evaluated; `problems` lists every reason."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__(f"cannot evaluate ({len(self.problems)} problem"
                     f"{'s' if len(self.problems) != 1 else ''}): " +
                     "; ".join(self.problems))


@dataclasses.dataclass
class _Inputs:
  """Validated inputs: which stems, their sizes, the files per folder."""
  stems: list[str]
  sizes: dict[str, tuple[int, int]]
  ir: dict[str, Path]
  vis: dict[str, Path]
  fused: dict[str, dict[str, Path]]  # method name -> stem -> path
  sixteen_bit: list[str]
  # Keyed by (path, read as infrared): a folder given as both the IR source
  # and a --fused method is read by each rule.
  cache: dict[tuple[Path, bool], np.ndarray]

  def grey(self, path: Path, is_ir: bool = False) -> np.ndarray:
    """The decoded grey image, from the cache (once) or decoded again."""
    cached = self.cache.pop((path, is_ir), None)
    if cached is not None:
      return cached
    return _read_grey(path, is_ir)[0]


def _method_names(fused_dirs: Sequence[Path]) -> tuple[list[str], list[str]]:
  names = [d.name or str(d) for d in fused_dirs]
  problems = [
      f"--fused folders {', '.join(str(d) for d in fused_dirs if d.name == n)}"
      f" share the name {n!r}; rename one" for n in sorted(set(names))
      if names.count(n) > 1
  ]
  return names, problems


def _read_grey(path: Path, is_ir: bool) -> tuple[np.ndarray, bool]:
  # The rules the model saw the sources by (training, evaluation, fuse).
  rule = layouts.IR_16BIT_RULE if is_ir else layouts.VIS_16BIT_RULE
  image, info = image_io.read_image_with_info(path, rule)
  return image_io.as_grey_u8(image), info.was_16bit


def _validate(ir_dir: Path, vis_dir: Path, fused_dirs: Sequence[Path],
              progress: bool, problems: list[str]) -> _Inputs:
  """Reads every file once and collects all problems before any scoring.

  `problems` holds any found by the caller; all are raised together.
  """
  names, name_problems = _method_names(fused_dirs)
  problems += name_problems
  folders: dict[str, tuple[Path, dict[str, Path]]] = {}
  for label, directory in [("IR", ir_dir), ("VIS", vis_dir)] + [
      (f"fused {n!r}", d) for n, d in zip(names, fused_dirs)
  ]:
    try:
      files = image_io.list_images(directory)
    except image_io.ImageReadError as error:
      problems.append(str(error))
      continue
    if not files:
      problems.append(f"{directory}: no images (png, jpg, bmp, tif) in the "
                      f"{label} folder")
      continue
    folders[label] = (directory, files)

  all_stems = sorted(set().union(*(f for _, f in folders.values())))
  for label, (directory, files) in folders.items():
    missing = [s for s in all_stems if s not in files]
    if missing:
      shown = ", ".join(missing[:20]) + (
          f" and {len(missing) - 20} more" if len(missing) > 20 else "")
      problems.append(f"{directory}: {len(missing)} image(s) present in other "
                      f"folders are missing here: {shown}")

  sizes: dict[str, tuple[int, int]] = {}
  sixteen_bit: dict[str, None] = {}  # (ordered, each file once)
  cache: dict[tuple[Path, bool], np.ndarray] = {}
  cached_bytes = 0
  for stem in tqdm(all_stems, desc="checking", unit="image", leave=False,
                   disable=not progress):
    shapes = {}
    for label, (_, files) in folders.items():
      if stem not in files:
        continue
      try:
        grey, was_16bit = _read_grey(files[stem], label == "IR")
      except image_io.ImageReadError as error:
        problems.append(str(error))
        continue
      shapes[files[stem]] = grey.shape
      if cached_bytes + grey.nbytes <= _CACHE_BYTES:
        cache[(files[stem], label == "IR")] = grey
        cached_bytes += grey.nbytes
      if was_16bit:
        sixteen_bit[str(files[stem])] = None
    if len(set(shapes.values())) > 1:
      problems.append(f"image {stem!r} differs in size between folders: " +
                      ", ".join(f"{p} is {s[1]}x{s[0]}"
                                for p, s in shapes.items()))
    elif shapes:
      (h, w), = set(shapes.values())
      if min(h, w) < metrics.MIN_SIZE:
        problems.append(f"image {stem!r} is {w}x{h}: the metrics need at "
                        f"least {metrics.MIN_SIZE}x{metrics.MIN_SIZE} pixels")
      sizes[stem] = (h, w)
  if problems:
    raise EvaluationInputError(problems)
  return _Inputs(
      stems=all_stems, sizes=sizes, ir=folders["IR"][1],
      vis=folders["VIS"][1], sixteen_bit=list(sixteen_bit), cache=cache,
      fused={n: folders[f"fused {n!r}"][1] for n in names})


def _pad_batch(images: Sequence[np.ndarray], shape: tuple[int, int],
               batch_size: int) -> np.ndarray:
  """Zero-pads grey uint8 images into a (batch_size, H, W) array."""
  batch = np.zeros((batch_size,) + shape, np.uint8)
  for i, image in enumerate(images):
    batch[i, :image.shape[0], :image.shape[1]] = image
  return batch


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _score(inputs: _Inputs, batch_size: int, progress: bool,
           baselines: bool = False) -> dict[str, dict[str, dict[str, float]]]:
  """method -> stem -> metric -> value, scored bucket by bucket on device.

  With `baselines`, the trivial fusions of the sources are scored too.
  """
  rules = fusion_baselines.TRIVIAL_RULES if baselines else ()
  cost = _COMPILE_COST_PIXELS.get(jax.default_backend(),
                                  _DEFAULT_COMPILE_COST_PIXELS)
  buckets = tiling.plan_buckets(inputs.sizes, batch_size, cost)
  per_image: dict[str, dict[str, dict[str, float]]] = {
      name: {} for name in (*inputs.fused, *rules)}
  with tqdm(total=len(inputs.stems) * len(per_image), desc="scoring",
            unit="triple", disable=not progress) as bar:
    for shape, stems in buckets.items():
      for chunk in _chunks(stems, batch_size):
        sizes = np.zeros((batch_size, 2), np.int32)
        # Padding slots get a full-size valid region of zeros: finite values
        # that are dropped below.
        sizes[:] = shape
        sizes[:len(chunk)] = [inputs.sizes[s] for s in chunk]
        ir = _pad_batch([inputs.grey(inputs.ir[s], is_ir=True)
                         for s in chunk], shape, batch_size)
        vis = _pad_batch([inputs.grey(inputs.vis[s]) for s in chunk], shape,
                         batch_size)
        candidates = {
            name: _pad_batch([inputs.grey(files[s]) for s in chunk], shape,
                             batch_size)
            for name, files in inputs.fused.items()}
        ir_f, vis_f = ir.astype(np.float32), vis.astype(np.float32)
        # Whole grey levels: uint8 like the folders, so one compilation.
        candidates.update({
            rule: fusion_baselines.trivial_fusion(rule, ir_f, vis_f).astype(
                np.uint8) for rule in rules})
        for name, fused in candidates.items():
          values = jax.device_get(
              metrics.batched_all_metrics(fused, ir, vis, sizes))
          for i, stem in enumerate(chunk):
            per_image[name][stem] = {
                m: float(values[m][i]) for m in metrics.ALL_METRIC_NAMES}
          bar.update(len(chunk))
  return per_image


def _summarise(per_image: Mapping[str, Mapping[str, Mapping[str, float]]]
              ) -> dict[str, dict]:
  result = {}
  for name, images in per_image.items():
    mean = {m: float(np.mean([v[m] for v in images.values()]))
            for m in metrics.ALL_METRIC_NAMES}
    result[name] = {"mean": mean,
                    "per_image": {s: dict(images[s]) for s in sorted(images)}}
  ranks = fusion_baselines.mean_ranks(
      {name: values["mean"] for name, values in result.items()})
  for name, rank in ranks.items():
    result[name][fusion_baselines.MEAN_RANK] = rank
  return {"methods": result}


def _evaluate(ir_dir, vis_dir, fused_dirs, batch_size: int, progress: bool,
              problems: Sequence[str] = (), baselines: bool = False
              ) -> tuple[dict, list[str]]:
  problems = list(problems)
  if batch_size < 1:
    problems.append(f"batch size must be >= 1, got {batch_size}")
  if not fused_dirs and not baselines:
    problems.append("no fused folders given (and no --baselines)")
  clashes = sorted({Path(d).name for d in fused_dirs} &
                   set(fusion_baselines.TRIVIAL_RULES)) if baselines else []
  problems += [f"--fused folder name {n!r} clashes with a --baselines row; "
               "rename the folder" for n in clashes]
  inputs = _validate(Path(ir_dir), Path(vis_dir), [Path(d) for d in fused_dirs],
                     progress, problems)
  result = _summarise(_score(inputs, batch_size, progress, baselines))
  return result, inputs.sixteen_bit


def evaluate_folders(ir_dir: str | os.PathLike, vis_dir: str | os.PathLike,
                     fused_dirs: Sequence[str | os.PathLike], *,
                     batch_size: int = 8, progress: bool = False,
                     baselines: bool = False) -> dict:
  """Scores each fused folder against the sources; the --json structure.

  Returns {"methods": {<fused folder name or trivial rule>: {"mean": {metric:
  value}, "mean_rank": rank, "per_image": {stem: {metric: value}}}}}, metrics
  keyed by `metrics.ALL_METRIC_NAMES`. Raises EvaluationInputError (listing
  every problem) for bad input.
  """
  return _evaluate(ir_dir, vis_dir, fused_dirs, batch_size, progress,
                   baselines=baselines)[0]


def markdown_table(result: Mapping, names: Sequence[str] = metrics.METRIC_NAMES
                   ) -> str:
  """One row per method with the mean of each of `names` (and mean_rank)."""
  return fusion_baselines.markdown_table(
      {method: values["mean"] for method, values in result["methods"].items()},
      names, with_rank=tuple(names) == metrics.METRIC_NAMES)


def _csv_text(result: Mapping) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["method", "image", *metrics.ALL_METRIC_NAMES])
  for method, values in result["methods"].items():
    for stem, row in values["per_image"].items():
      writer.writerow([method, stem, *(repr(row[m])
                                       for m in metrics.ALL_METRIC_NAMES)])
    writer.writerow([method, "mean", *(repr(values["mean"][m])
                                       for m in metrics.ALL_METRIC_NAMES)])
  return out.getvalue()


def _image_among_inputs(path: Path, folders: Sequence[Path], flag: str
                        ) -> str | None:
  """A table written as an image file in a scored folder would replace a
  source (or be scored as one next time)."""
  if path.suffix.lower() not in image_io.IMAGE_SUFFIXES:
    return None
  for folder in folders:
    if path.resolve().parent == Path(folder).resolve():
      return (f"{flag} {path} is an image path in the scored folder "
              f"{folder}; write the table elsewhere (e.g. a .json file)")
  return None


def score_and_report(ir: Path, vis: Path, fused: Sequence[Path],
                     baselines: bool, json_path: Path | None,
                     csv_path: Path | None, batch_size: int) -> None:
  """What `python -m textfusion_jax.evaluate` does: score, print, write."""
  if ir.resolve() == vis.resolve():
    raise errors.UserError(f"--ir {ir} and --vis {vis} are the same folder; "
                           "every fusion would be scored against one source "
                           "twice")
  out_problems = [problem for flag, path in (("json", json_path),
                                             ("csv", csv_path))
                  if path is not None
                  for problem in [files.unwritable_reason(path, f"--{flag}") or
                                  _image_among_inputs(path, (ir, vis, *fused),
                                                      f"--{flag}")]
                  if problem]
  if json_path and csv_path and json_path.resolve() == csv_path.resolve():
    out_problems.append(f"--json and --csv are the same file {json_path}; "
                        "the CSV would replace the JSON")
  # A file that changes after it was checked raises ImageReadError, also a
  # UserError: one line either way.
  result, sixteen_bit = _evaluate(ir, vis, fused, batch_size, True,
                                  out_problems, baselines=baselines)
  if sixteen_bit:
    print(image_io.sixteen_bit_note(sixteen_bit))
  print(markdown_table(result))
  print("\nper-source parts (MI, VIF, SSIM, Qabf: _ir + _vis = total; CC: "
        "their mean):")
  print(markdown_table(result, metrics.SOURCE_PART_NAMES))
  for path, text in ((json_path, lambda: files.json_text(result, indent=1)),
                     (csv_path, lambda: _csv_text(result))):
    if path:
      try:
        files.write_text_atomic(path, text().rstrip("\n") + "\n")
      except OSError as error:
        raise errors.UserError(f"{path}: cannot write ("
                               f"{error.strerror or error})") from error
