"""Does the text matter? Trains with true and with shuffled captions, compares.

  python benchmarks/text_ablation.py --config configs/demo.py --workdir runs/ablation
  python benchmarks/text_ablation.py --config configs/demo.py --workdir runs/ablation --compare_only

Trains `--config` twice, into WORKDIR/true and WORKDIR/shuffled, the second
with `data.shuffle_captions_across_pairs=True` (every pair is trained and
evaluated with another pair's captions, a fixed derangement). Both runs are
otherwise identical: same seed, same images, crops and order. Existing
workdirs resume (or, when finished, just re-evaluate), so an interrupted
ablation continues; `--compare_only` skips training.

Prints, per image of the shared eval set, paired differences true - shuffled:
the mean, its standard error and how many images the true captions win, for
the restoration errors against the clean synthetic scene (what the captions
describe: `evaluators._restoration_errors`) and for the 12 fusion metrics.
Writes the same to WORKDIR/text_ablation.json ({"step", "rows"}; runs are
compared at the newest step both evaluated).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from input_pipeline import files  # pylint: disable=g-import-not-at-top
from textfusion_jax import errors
from textfusion_jax import metrics as metrics_lib
from textfusion_jax import paired_comparison
from textfusion_jax import train_loop

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root for the 'true' and 'shuffled' runs.")
flags.DEFINE_bool("compare_only", False, "Compare existing runs; no training.")
config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.",
                                lock_config=True)
flags.mark_flags_as_required(["workdir"])

RUNS = ("true", "shuffled")
_RESTORATION_ORDER = ("target_L1", "clean_PSNR", "color_L1")


def compare(true: dict, shuffled: dict) -> dict[str, dict]:
  """Restoration errors first, then the fusion metrics, each paired."""
  rows = paired_comparison.paired_differences(
      true.get("restoration_per_image", {}),
      shuffled.get("restoration_per_image", {}))
  rows = {m: rows[m] for m in _RESTORATION_ORDER if m in rows}
  metrics = paired_comparison.paired_differences(
      true.get("per_image", {}), shuffled.get("per_image", {}))
  rows.update((m, metrics[m]) for m in metrics_lib.METRIC_NAMES
              if m in metrics)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  root = Path(FLAGS.workdir)
  with errors.one_line_errors():
    configs = {}
    for run in RUNS:
      configs[run] = FLAGS.config.copy_and_resolve_references()
      configs[run].data.shuffle_captions_across_pairs = run == "shuffled"
      # Both checked first: a bad shuffled config would otherwise fail only
      # after the true-caption run trained.
      train_loop.check_config(configs[run])
    for run in RUNS:
      if FLAGS.compare_only:
        continue
      print(f"\n== training with {run} captions: {root / run}")
      train_loop.train_and_evaluate(configs[run], str(root / run))
    step, evaluations = paired_comparison.latest_shared_eval(
        *(root / run for run in RUNS))
    rows = compare(*evaluations)
  files.write_text_atomic(root / "text_ablation.json",
                          files.json_text({"step": step, "rows": rows},
                                          indent=2) + "\n")
  print(f"\nText ablation at step {step}, paired over the eval images:\n" +
        paired_comparison.markdown_table(rows))


if __name__ == "__main__":
  errors.run_absl_app(main, sys.argv)
