"""A model against SeAFusion and the trivial fusions on the 20 held-out TNO pairs.

  python benchmarks/tno_report.py --checkpoint pretrained/textfusion-small \
      [--out runs/tno_report] [--figure docs/tno_fused.png] [--report R.md]

Fuses the TNO pairs of ../shared/data/ivf_samples/tno (never trained on) with
each pair's own caption (--caption_index) and again with the captions
shuffled across pairs (a fixed derangement), scores both, SeAFusion's
released-weights outputs (../shared/data/anchors/tno20/SeAFusion) and the
four trivial fusions with `textfusion_jax.score_folders`, and prints:

* the table of the model, SeAFusion and the trivial rows with mean ranks
  (over EN, SD, SF, MI, SCD, VIF, Qabf, SSIM), and the per-source parts;
* how many of those 8 metrics the model beats SeAFusion on, and the fusion
  checks (SCD >= 1.80, CC >= 0.50, mean rank above SeAFusion, rule_mean and
  rule_max);
* true minus shuffled captions, per metric: mean paired difference, its
  standard error and on how many pairs the true caption is higher;
* fuse time per pair after compilation.

--figure writes visible | IR | SeAFusion | fused for TNO 1, 2, 3 and 17,
whose captions name a person seen only in the thermal image; --report writes
the printed markdown to a file (e.g. for `export --report`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from textfusion_jax import errors
from textfusion_jax import score_folders
from textfusion_jax import inference
from textfusion_jax import fusion_baselines
from input_pipeline import files
from input_pipeline import image_io
from input_pipeline.captions import derangement
from textfusion_jax import metrics
from textfusion_jax import paired_comparison

SHARED = Path(__file__).resolve().parents[2] / "shared"
TNO = SHARED / "data" / "ivf_samples" / "tno"
SEAFUSION = SHARED / "data" / "anchors" / "tno20" / "SeAFusion"
FIGURE_PAIRS = ("1", "2", "3", "17")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Model bundle or training workdir.")
_OUT = flags.DEFINE_string("out", "runs/tno_report",
                           "Folder for the fused images.")
_FIGURE = flags.DEFINE_string("figure", None, "Write the comparison figure.")
_REPORT = flags.DEFINE_string("report", None, "Write the markdown here too.")
_CAPTION_INDEX = flags.DEFINE_integer("caption_index", 0,
                                      "Which caption of each pair to use.",
                                      lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the caption derangement.",
                             lower_bound=0)
_PROMPT = flags.DEFINE_string(
    "prompt", None, "One prompt for every pair instead of its caption (e.g. "
    "'clean visible image' for a model trained on condition sentences); "
    "skips the shuffled-caption comparison.")


def fuse_folder(fuser: inference.Fuser, pairs, prompts
                ) -> tuple[list[float], list[float]]:
  """Fuses every pair; returns the seconds of the pairs fused at a shape
  compiled already and of the first pair of each shape."""
  result = inference.fuse_pairs(fuser, pairs, fuser.encoder.encode(prompts))
  if result.failed:
    raise errors.UserError("; ".join(result.failed))
  return result.times()


def checks(rows: dict) -> str:
  model, sea = rows["model"]["mean"], rows["SeAFusion"]["mean"]
  wins = [m for m in fusion_baselines.RANKED_METRICS if model[m] > sea[m]]
  rank = {m: v["mean_rank"] for m, v in rows.items()}
  above = all(rank["model"] < rank[m]
              for m in ("SeAFusion", "rule_mean", "rule_max"))
  return "\n".join([
      f"- beats SeAFusion on {len(wins)}/8: {', '.join(wins) or 'none'}",
      f"- SCD {model['SCD']:.3f} (target >= 1.80: "
      f"{'met' if model['SCD'] >= 1.80 else 'NOT met'}), CC "
      f"{model['CC']:.3f} (target >= 0.50: "
      f"{'met' if model['CC'] >= 0.50 else 'NOT met'})",
      f"- mean rank {rank['model']:.2f} vs SeAFusion "
      f"{rank['SeAFusion']:.2f}, rule_mean {rank['rule_mean']:.2f}, rule_max "
      f"{rank['rule_max']:.2f}: {'above all three' if above else 'NOT above all three'}",
  ])


def write_figure(path: Path, fused_dir: Path, width: int = 360) -> None:
  """Rows of visible | IR | SeAFusion | fused, each image scaled to `width`."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  columns = [("visible", TNO / "vi"), ("infrared", TNO / "ir"),
             ("SeAFusion", SEAFUSION), ("textfusion-jax", fused_dir)]
  gap = 4
  rows = []
  for stem in FIGURE_PAIRS:
    images = []
    for _, directory in columns:
      image = Image.fromarray(image_io.as_rgb_u8(image_io.read_image(
          image_io.list_images(directory)[stem])))
      height = round(image.height * width / image.width)
      images.append(np.asarray(image.resize((width, height),
                                            Image.Resampling.LANCZOS)))
    rows.append(np.concatenate(
        [np.pad(im, ((0, gap), (0, gap), (0, 0)), constant_values=255)
         for im in images], axis=1))
  header = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
  canvas = Image.fromarray(np.concatenate([header] + rows, axis=0))
  draw = ImageDraw.Draw(canvas)
  for i, (name, _) in enumerate(columns):
    draw.text((i * (width + gap) + 4, 4), name, fill=(0, 0, 0))
  path.parent.mkdir(parents=True, exist_ok=True)
  image_io.write_png_atomic(path, np.asarray(canvas))


def main(argv):
  del argv
  if not TNO.is_dir() or not SEAFUSION.is_dir():
    raise errors.UserError(f"needs {TNO} and {SEAFUSION}")
  if _PROMPT.value is not None and not _PROMPT.value.strip():
    # As `fuse --text ""`: an empty prompt is never a silent no-op.
    raise errors.UserError(f"--prompt={_PROMPT.value!r} is empty; give a "
                           "prompt, or leave the flag out to use the captions")
  files.check_writable({"--report": _REPORT.value,
                       "--figure": _FIGURE.value})
  out = Path(_OUT.value)
  fuser = inference.Fuser.load(_CHECKPOINT.value)
  pairs = inference.collect_pairs(str(TNO / "ir"), str(TNO / "vi"),
                             str(out / "model"))
  names = [p.name for p in pairs]
  prompts = ([_PROMPT.value] * len(names) if _PROMPT.value else
             inference.read_captions(str(TNO / "captions.jsonl"), names,
                                     _CAPTION_INDEX.value))
  if _PROMPT.value:
    fuser.encoder.check_fits([_PROMPT.value], ["--prompt"])
  seconds = fuse_folder(fuser, pairs, prompts)
  scored = [out / "model", SEAFUSION]
  if not _PROMPT.value:
    shuffled = [prompts[i] for i in derangement(len(prompts), _SEED.value)]
    shuffled_pairs = inference.collect_pairs(
        str(TNO / "ir"), str(TNO / "vi"), str(out / "shuffled"))
    fuse_folder(fuser, shuffled_pairs, shuffled)
    scored.append(out / "shuffled")

  result = score_folders.evaluate_folders(TNO / "ir", TNO / "vi", scored,
                                          baselines=True)
  runs = result["methods"]
  table_rows = {m: runs[m] for m in ("model", "SeAFusion",
                                     *fusion_baselines.TRIVIAL_RULES)}
  ranks = fusion_baselines.mean_ranks(
      {m: v["mean"] for m, v in table_rows.items()})
  for m, v in table_rows.items():
    v["mean_rank"] = ranks[m]
  steady, first = seconds
  text = "\n\n".join([
      f"### TNO, {len(pairs)} held-out pairs (checkpoint `{_CHECKPOINT.value}`"
      + (f", prompt {_PROMPT.value!r})" if _PROMPT.value else
         f", caption {_CAPTION_INDEX.value} of each pair)"),
      fusion_baselines.markdown_table(
          {m: v["mean"] for m, v in table_rows.items()},
          metrics.METRIC_NAMES[:10]),
      checks(table_rows),
      "Per-source parts:\n\n" + fusion_baselines.markdown_table(
          {m: v["mean"] for m, v in table_rows.items()},
          metrics.SOURCE_PART_NAMES, with_rank=False),
      ("True minus shuffled captions (paired over the pairs; s.e. = "
       "standard error of the mean difference):\n\n" +
       paired_comparison.markdown_table(paired_comparison.paired_differences(
           runs["model"]["per_image"], runs["shuffled"]["per_image"],
           fusion_baselines.RANKED_METRICS + ("CC",)))
       if "shuffled" in runs else
       f"Every pair fused under the prompt {_PROMPT.value!r}."),
      (f"Fuse time after compilation: median "
       f"{1000 * statistics.median(steady):.0f} ms/pair over {len(steady)} "
       f"pairs; " if steady else "") +
      f"{len(first)} shapes, the first pair of each with compilation: median "
      f"{1000 * statistics.median(first):.0f} ms.",
  ]) + "\n"
  print(text)
  if _REPORT.value:
    files.write_text_atomic(_REPORT.value, text)
  if _FIGURE.value:
    write_figure(Path(_FIGURE.value), out / "model")
    print(f"wrote {_FIGURE.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("checkpoint")
  errors.run_cli(main)
