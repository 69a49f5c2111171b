"""Does the prompt steer the fusion? True vs shuffled vs empty condition prompts.

  python benchmarks/text_effect.py --checkpoint pretrained/textfusion-small-degraded \
      [--out runs/text_effect] [--seed 0] [--shuffle_seed S] [--report R.md] \
      [--figure docs/prompt_control.png] [--pairs DIR[,DIR...] --split SPLIT] \
      [--wiener_kind KIND] [--ir_contrast F]

On the 20 held-out TNO pairs of ../shared/data/ivf_samples/tno, or on the
pairs of --pairs (folders with ir/ and vi/, joined by ',') at --split (a
split or slice such as 'train[80%:]', as config.data.eval_split reads a
folder): configs/real_pairs_degraded_validation.py's validation pairs, on
which a change is chosen before TNO measures it. Pairs of several folders
are named '<folder>_<stem>'. Their infrared images have more contrast than
their visible ones, TNO's less; --ir_contrast 0.6 gives them TNO's profile
(README: a model that won 7/8 on them won 4/8 so, and 5/8 on TNO).

1. A degraded copy of every visible image (`input_pipeline.degradations`,
   fixed --seed): each kind's level drawn uniformly from 0-3, redrawn until at
   least one kind is at level 2 or more; its true condition sentence.
2. Reference: the model's fusion of the clean pair under "clean visible
   image".
3. The degraded pair fused under its true sentence, under another pair's
   different sentence (a fixed derangement that gives no pair its own
   words: "shuffled") and under the empty prompt
   (CLIP's embedding of "", i.e. start and end tokens only).
4. Per pair: PSNR (RGB, 8-bit) of each fusion to the reference, and the 8
   ranked metrics (EN, SD, SF, MI, SCD, VIF, Qabf, SSIM) against the clean
   sources; printed as paired differences with standard errors.
   The reference itself is scored too: it is what the true sentence asks
   for, so where it loses a metric to the shuffled prompts, the true prompt
   can win that metric only by beating its own target.
   So is the Wiener target: the model's fusion, under "clean visible image",
   of the clean visible image reduced to what survives the noise, the most a
   restorer can hope for: its contrast scaled by the degraded input's
   Wiener gain S / (S + N) over the whole image (`degradations.wiener_gain`;
   squared with --wiener_kind=contrast_squared), or with
   --wiener_kind=spectral filtered by S / (S + N) per spatial frequency
   (`degradations.wiener_filter`); by default as the model was trained.
   Means of every fusion, with the trivial rows (copies of each clean
   source, mean and max rules, a copy of the degraded visible image).
   Per source: MI, VIF, Qabf and SSIM are sums of a part against each
   source, and a fusion nearer a copy of either scores higher; their
   parts, true (and reference) minus shuffled, say which source each keeps.
5. Prompt control: every degraded pair fused under "heavily underexposed
   visible image" and under "clean visible image"; the first should be the
   brighter (mean grey level).

--figure draws one degraded pair (the first with underexposure at level 2 or
more) fused under three prompts beside the clean-input result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import bundle
from textfusion_jax import errors
from input_pipeline import datasets
from input_pipeline import degradations
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline import sources
from input_pipeline.layouts import DEFAULT_SPLIT
from input_pipeline.captions import derangement
from textfusion_jax import fusion_baselines
from textfusion_jax import inference
from textfusion_jax import paired_comparison
from textfusion_jax import score_folders

TNO = Path(__file__).resolve().parents[2] / "shared/data/ivf_samples/tno"
BRIGHT_PROMPT = "heavily underexposed visible image"
# This script's folders under --out (each scored whole), besides sources/.
OUTPUT_FOLDERS = ("reference", "wiener_target", "true", "shuffled", "empty",
                  "degraded_vi")
# The ranked metrics that sum a part per source (textfusion_jax/metrics.py).
SUMMED_METRICS = ("MI", "VIF", "Qabf", "SSIM")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Bundle or workdir.")
_OUT = flags.DEFINE_string("out", "runs/text_effect", "Output folder.")
_WIENER_KIND = flags.DEFINE_enum(
    "wiener_kind", None, degradations.WIENER_KINDS,
    "How the Wiener target row keeps what survives the noise "
    "(`degradations.wiener_target`); default: as the checkpoint was trained "
    "(config.data.degradations.wiener_kind when its wiener_target is on), "
    "else 'contrast'.")
_IR_CONTRAST = flags.DEFINE_float(
    "ir_contrast", 1.0, "Scale each infrared image's contrast around its mean "
    "by this factor (`degradations.shrink_contrast`) before fusing, and "
    "score against the scaled image: the validation pairs' infrared images "
    "have more contrast than their visible ones, TNO's less (0.6 turns the "
    "validation pairs' SD 46.5 against 35.8 into 27.9 against 35.8).")
flags.register_validator(
    "ir_contrast", lambda value: 0.0 < value <= 1.0,
    "must be in (0, 1]: a factor that lowers the contrast")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the degradations.",
                             lower_bound=0)
_SHUFFLE_SEED = flags.DEFINE_integer(
    "shuffle_seed", None, "Seed of the derangement (default: --seed); to see "
    "how much the true-vs-shuffled figures depend on which wrong sentences "
    "were drawn.", lower_bound=0)
_REPORT = flags.DEFINE_string("report", None, "Write the report here.")
_FIGURE = flags.DEFINE_string("figure", None, "Write the figure here.")
_PAIRS = flags.DEFINE_string(
    "pairs", str(TNO), "Folders of pairs (ir/, vi/), joined by ','.")
_SPLIT = flags.DEFINE_string(
    "split", "train", "Split of --pairs: a name, or a slice such as "
    "'train[80%:]' (an undivided folder is all 'train').")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N pairs, in the "
                              "order of --pairs (a smoke test; 0 = all).")


def degraded_levels(count: int, seed: int) -> list[degradations.Levels]:
  """Per pair, levels with at least one kind at 2 or more."""
  out = []
  for i in range(count):
    rng = np.random.default_rng([seed, i])
    while True:
      levels = tuple(int(l) for l in rng.integers(0, 4, 3))
      if max(levels) >= 2:
        break
    out.append(levels)
  return out


def shuffled_sentences(true: list[str], seed: int) -> list[str]:
  """Another pair's sentence for every pair, never its own sentence.

  A derangement of the pairs (the first seed from `seed` on whose
  derangement gives no pair the same words, as two pairs can share levels):
  a pair prompted with its own sentence would measure nothing.
  """
  for attempt in range(1000):
    order = derangement(len(true), seed + attempt)
    shuffled = [true[j] for j in order]
    if all(a != b for a, b in zip(true, shuffled)):
      return shuffled
  same = sorted({t for t in true if true.count(t) > 1})
  raise errors.UserError(
      f"no derangement gives every pair another sentence (pairs share "
      f"{'; '.join(repr(t) for t in same)}); try another --seed or a "
      "larger --limit")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def grey_mean(rgb: np.ndarray) -> float:
  return float(image_io.rgb_to_grey_u8(rgb).mean())


def per_source_lines(per_image: dict[str, dict], key: str,
                     what: str) -> list[str]:
  """`key`'s fusions minus the shuffled prompts' on each part of the summed
  metrics.

  MI, VIF, Qabf and SSIM add a fused-vs-infrared part to a
  fused-vs-visible part, so a fusion nearer a copy of either source scores
  higher. The parts say which source a prompt's fusion keeps.
  """
  parts = [f"{m}_{s}" for s in ("vis", "ir") for m in SUMMED_METRICS]
  rows = paired_comparison.paired_differences(per_image[key],
                                              per_image["shuffled"], parts)
  wins = {s: [m for m in SUMMED_METRICS if rows[f"{m}_{s}"]["diff"] > 0]
          for s in ("vis", "ir")}
  return [f"{what} minus shuffled prompts per source (X_vis: fusion against "
          "the clean visible image, X_ir: against the infrared; MI, VIF, "
          "Qabf and SSIM are their sums):", "",
          paired_comparison.markdown_table(rows, (key, "shuffled"),
                                           subject=key), "",
          *(f"- {source} parts: {key} better on {len(wins[s])}/"
            f"{len(SUMMED_METRICS)} ({', '.join(wins[s]) or 'none'})"
            for s, source in (("vis", "visible"), ("ir", "infrared"))), ""]


def evaluation_pairs(roots: str, split: str, out: Path
                     ) -> list[inference.Pair]:
  """The pairs of the folders `roots` (joined by ',') at `split`, each named
  by its stem, or '<folder>_<stem>' when there are several folders."""
  folders = [Path(r.strip()) for r in roots.split(",") if r.strip()]
  if not folders:
    raise errors.UserError("--pairs is empty")
  for folder in folders:
    if not folder.is_dir():
      raise errors.UserError(f"--pairs {folder}: no such folder")
  pairs = []
  for folder in folders:
    prefix = f"{folder.resolve().name}_" if len(folders) > 1 else ""
    source = datasets.PairedFolderSource(
        folder, split=sources.folder_split(folder, split))
    # Numbers in natural order (2 before 10): a pair's index draws its
    # degradation levels.
    pairs += [inference.Pair(f"{prefix}{p.name}", Path(p.ir), Path(p.vi),
                             out / f"{prefix}{p.name}.png")
              for p in sorted(source.pairs,
                              key=lambda p: inference.natural_key(p.name))]
  names = [p.name for p in pairs]
  if len(set(names)) != len(names):
    raise errors.UserError(f"--pairs {roots}: two folders have the same "
                           "name, so their pairs' names repeat")
  return pairs


def describe(roots: str, split: str) -> str:
  """'TNO', or the folders' names (and split, where one is read), for the
  report's title."""
  folders = [Path(r.strip()).resolve() for r in roots.split(",") if r.strip()]
  whole = all(sources.folder_split(f, split) == DEFAULT_SPLIT
              for f in folders)
  if folders == [TNO.resolve()] and whole:
    return "TNO"
  return "+".join(f.name for f in folders) + ("" if whole else f" ({split})")


def trained_wiener_kind(config) -> str:
  """The Wiener target kind a checkpoint's config trained toward, or
  'contrast' (the default) when it trained toward none."""
  spec = config.data.get("degradations") or {}
  if spec.get("wiener_target", False):
    return spec.get("wiener_kind", "contrast")
  return "contrast"


def remove_stale_images(folder: Path, keep: set[str]) -> None:
  """Deletes the images in this script's output `folder` whose stems are
  not in `keep`."""
  if folder.is_dir():
    for stem, path in image_io.list_images(folder).items():
      if stem not in keep:
        path.unlink()


def main(argv) -> None:
  del argv
  if _LIMIT.value < 0 or _LIMIT.value == 1:
    raise errors.UserError(f"--limit={_LIMIT.value}: must be 0 (all pairs) "
                           "or at least 2 (the shuffled prompts need two)")
  files.check_writable({"--report": _REPORT.value,
                       "--figure": _FIGURE.value})
  out = Path(_OUT.value)
  bundle.check_not_inside_a_sealed_folder(out, itself_too=True)
  files.check_own_folder(out, frozenset(OUTPUT_FOLDERS + ("sources",)),
                         "text_effect output")
  pairs = evaluation_pairs(_PAIRS.value, _SPLIT.value, out / "reference")
  where = describe(_PAIRS.value, _SPLIT.value)
  pairs = pairs[:_LIMIT.value] if _LIMIT.value else pairs
  if len(pairs) < 2:
    raise errors.UserError(f"--pairs {_PAIRS.value} at --split {_SPLIT.value}"
                           f" holds {len(pairs)} pair(s): the shuffled "
                           "prompts need two")
  names = [p.name for p in pairs]
  levels = degraded_levels(len(pairs), _SEED.value)
  true = [degradations.condition_sentence(l) for l in levels]
  shuffle_seed = (_SEED.value if _SHUFFLE_SEED.value is None
                  else _SHUFFLE_SEED.value)
  shuffled = shuffled_sentences(true, shuffle_seed)  # before the model loads
  # The figure shows prompt control: the first heavily underexposed pair,
  # else the most underexposed one.
  figure_index = next((i for i, l in enumerate(levels) if l[0] >= 2),
                      max(range(len(levels)), key=lambda i: levels[i][0]))
  fuser = inference.Fuser.load(_CHECKPOINT.value)
  wiener_kind = _WIENER_KIND.value or trained_wiener_kind(fuser.config)
  # The folders are scored whole: fusions an earlier run (of more pairs)
  # left there would be scored with these.
  for folder in OUTPUT_FOLDERS:
    remove_stale_images(out / folder, {p.name for p in pairs})
  # Copies of the sources keep their file type, so a stem kept from another
  # set of pairs may be another file: start them afresh.
  for folder in ("sources/ir", "sources/vi"):
    remove_stale_images(out / folder, set())
  # Each pair at its own bucket shape, as fuse and tno_report run it.
  shapes = inference.bucket_shapes(inference.check_sizes(pairs),
                                   inference.DEFAULT_TILE)
  encoder = fuser.encoder
  embed = lambda texts: encoder.encode(texts)
  empty = encoder.encode_ids(encoder.tokenize([""])[0])[0]
  clean_emb, bright_emb = embed([degradations.CLEAN, BRIGHT_PROMPT])
  prompts = {"true": embed(true), "shuffled": embed(shuffled),
             "empty": [empty] * len(pairs)}

  fused: dict[str, dict[str, np.ndarray]] = {k: {} for k in
                                             ("reference", "wiener_target",
                                              *prompts)}
  brighter, figure_rows = [], None
  for i, pair in enumerate(pairs):
    vis, ir = inference.load_pair(pair)
    vis_u8 = np.rint(vis * 255).astype(np.uint8)
    if _IR_CONTRAST.value != 1.0:
      ir_u8 = degradations.shrink_contrast(
          np.rint(ir * 255).astype(np.uint8), _IR_CONTRAST.value)
      ir = ir_u8.astype(np.float32) / 255
      image_io.write_png_atomic(out / "sources" / "ir" / f"{pair.name}.png",
                                ir_u8)
    rng = np.random.default_rng([_SEED.value, i, 1])
    params = degradations.draw_parameters(levels[i], rng)
    bad = degradations.apply(vis_u8, params, rng)  # = degrade(vis_u8, ...)
    image_io.write_png_atomic(out / "degraded_vi" / f"{pair.name}.png", bad)
    bad = bad.astype(np.float32) / 255
    fuse = lambda v, emb, pad=shapes[pair.name]: fuser.fuse(v, ir, emb,
                                                            pad_to=pad)
    fused["reference"][pair.name] = fuse(vis, clean_emb)
    survives = degradations.wiener_target(vis_u8, vis_u8, params,
                                          wiener_kind)
    fused["wiener_target"][pair.name] = fuse(
        survives.astype(np.float32) / 255, clean_emb)
    for key, embs in prompts.items():
      fused[key][pair.name] = fuse(bad, embs[i])
    under_bright = fuse(bad, bright_emb)
    under_clean = fuse(bad, clean_emb)
    brighter.append(grey_mean(under_bright) - grey_mean(under_clean))
    if i == figure_index:
      figure_rows = (pair.name, [bad, ir, under_clean, under_bright,
                                 fused["true"][pair.name],
                                 fused["reference"][pair.name]],
                     [f"degraded visible ({'TNO ' * (where == 'TNO')}"
                      f"{pair.name})", "infrared", '"clean visible image"',
                      f'"{BRIGHT_PROMPT}"', f'true: "{true[i]}"',
                      "clean input (reference)"])
  for key, images in fused.items():
    for name, image in images.items():
      image_io.write_png_atomic(out / key / f"{name}.png", image)

  # The clean sources of the pairs used, as the folders to score against.
  for pair in pairs:
    for kind, src in (("ir", pair.ir), ("vi", pair.vis)):
      if kind == "ir" and _IR_CONTRAST.value != 1.0:
        continue  # the scaled image, written above
      dst = out / "sources" / kind / f"{pair.name}{Path(src).suffix}"
      dst.parent.mkdir(parents=True, exist_ok=True)
      dst.write_bytes(Path(src).read_bytes())
  ceilings = ("reference", "wiener_target")
  scored = (*prompts, *ceilings)
  # With the trivial fusions of the clean sources and a copy of the
  # degraded visible image: the rows every quality table shows.
  evaluation = score_folders.evaluate_folders(
      out / "sources" / "ir", out / "sources" / "vi",
      [out / k for k in (*scored, "degraded_vi")], baselines=True)
  result = evaluation["methods"]
  per_image = {k: dict(result[k]["per_image"]) for k in scored}
  for k in prompts:
    for name in names:
      per_image[k][name]["PSNR_ref"] = psnr(fused[k][name],
                                            fused["reference"][name])
  # CC is shown beside the 8 ranked metrics (not counted in the wins).
  metrics = ("PSNR_ref",) + fusion_baselines.RANKED_METRICS + ("CC",)
  lines = [f"### Text effect on {len(pairs)} degraded {where} pairs "
           + (f"(infrared contrast x{_IR_CONTRAST.value:g}) "
              if _IR_CONTRAST.value != 1.0 else "")
           + f"(checkpoint "
           f"`{_CHECKPOINT.value}`, seed {_SEED.value}"
           + ("" if shuffle_seed == _SEED.value
              else f", derangement seed {shuffle_seed}") + ")", "",
           "Levels (underexposure, noise, haze) per pair: " + ", ".join(
               f"{n} {l}" for n, l in zip(names, levels)), ""]
  for other in ("shuffled", "empty"):
    rows = paired_comparison.paired_differences(per_image["true"],
                                                per_image[other], metrics)
    wins = [m for m in fusion_baselines.RANKED_METRICS if rows[m]["diff"] > 0]
    psnr_row = rows["PSNR_ref"]
    by_1db = sum(per_image["true"][n]["PSNR_ref"] -
                 per_image[other][n]["PSNR_ref"] >= 1.0 for n in names)
    lines += [f"True minus {other} prompts (PSNR_ref: to the clean-input "
              "fusion; metrics against the clean sources):", "",
              paired_comparison.markdown_table(rows, ("true", other)), "",
              f"- PSNR_ref: true {psnr_row['diff']:+.2f} dB "
              f"(s.e. {psnr_row['stderr']:.2f}), better on "
              f"{psnr_row['true_better']}/{psnr_row['images']} pairs, by "
              f"1 dB or more on {by_1db}/{len(names)}",
              f"- true better on {len(wins)}/8 metrics: "
              f"{', '.join(wins) or 'none'}", ""]
  lines += ["Means over the pairs against the clean sources (degraded_vi: "
            "a copy of the degraded visible image; copy_*, rule_*: trivial "
            "fusions of the clean sources):", "",
            score_folders.markdown_table(evaluation), ""]
  lines += per_source_lines(per_image, "true", "True sentence")
  lines += per_source_lines(per_image, "reference", "Clean-input reference")
  for key, what in (("reference", "Clean-input reference (what the true "
                     "sentence asks for)"),
                    ("wiener_target", f"Wiener target ({wiener_kind}: the "
                     "clean visible image reduced to what survives the "
                     "noise, fused)")):
    ceiling = paired_comparison.paired_differences(
        per_image[key], per_image["shuffled"],
        fusion_baselines.RANKED_METRICS)
    lines += [f"{what} minus shuffled prompts, against the same clean "
              "sources: " + ", ".join(
                  f"{m} {r['diff']:+.3g} (s.e. {r['stderr']:.2g})"
                  for m, r in ceiling.items()),
              f"- it beats the shuffled prompts on "
              f"{sum(r['diff'] > 0 for r in ceiling.values())}/8 metrics", ""]
  brighter = np.array(brighter)
  lines.append(
      f"Prompt control: under \"{BRIGHT_PROMPT}\" the fusion is brighter than "
      f"under \"{degradations.CLEAN}\" on {int(np.sum(brighter > 0))}/"
      f"{len(brighter)} degraded pairs (mean grey difference "
      f"{brighter.mean():+.1f} levels, s.e. "
      f"{brighter.std(ddof=1) / np.sqrt(len(brighter)):.1f}).")
  text = "\n".join(lines) + "\n"
  print(text)
  if _REPORT.value:
    files.write_text_atomic(_REPORT.value, text)
  if _FIGURE.value:
    write_figure(Path(_FIGURE.value), *figure_rows)
    print(f"wrote {_FIGURE.value}")


def write_figure(path: Path, name: str, images: list[np.ndarray],  # pylint: disable=unused-argument
                 titles: list[str], width: int = 320) -> None:
  """One row: the images scaled to `width`, each under its title."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  tiles = []
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      image = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, -1)
    pil = Image.fromarray(image)
    height = round(pil.height * width / pil.width)
    tiles.append(np.asarray(pil.resize((width, height))))
  gap, header = 6, 34
  canvas = Image.new("RGB", ((width + gap) * len(tiles),
                             header + tiles[0].shape[0]), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (tile, title) in enumerate(zip(tiles, titles)):
    x = k * (width + gap)
    canvas.paste(Image.fromarray(tile), (x, header))
    words, line = title.split(), ""
    rows = []
    for word in words:  # wrap to the tile width
      if len(line) + len(word) > width // 7:
        rows.append(line)
        line = ""
      line = f"{line} {word}".strip()
    rows.append(line)
    for r, text in enumerate(rows[:2]):
      draw.text((x + 2, 2 + 14 * r), text, fill="black")
  image_io.write_png_atomic(path, np.asarray(canvas))


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  errors.run_cli(main)
