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
describe: `evaluation._restoration_errors`) and for the 12 fusion metrics.
Writes the same to WORKDIR/text_ablation.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textfusion_jax import errors  # pylint: disable=g-import-not-at-top
from textfusion_jax import metrics as metrics_lib
from textfusion_jax import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root for the 'true' and 'shuffled' runs.")
flags.DEFINE_bool("compare_only", False, "Compare existing runs; no training.")
config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.",
                                lock_config=True)
flags.mark_flags_as_required(["workdir"])

# Lower is better for these; higher for every other number compared.
_LOWER_IS_BETTER = {"target_L1", "color_L1", "MSE"}
RUNS = ("true", "shuffled")


def latest_eval(workdir: Path) -> dict:
  evals = workdir / "eval"
  steps = sorted(int(p.name) for p in evals.iterdir()
                 if p.name.isdigit() and (p / "metrics.json").exists()
                 ) if evals.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"no eval/<step>/metrics.json under {workdir}")
  return json.loads((workdir / "eval" / str(steps[-1]) /
                     "metrics.json").read_text())


def paired_differences(true: dict, shuffled: dict) -> dict[str, dict]:
  """Per-image true - shuffled statistics for every shared number."""
  out = {}
  for key in ("restoration_per_image", "per_image"):
    a, b = true.get(key, {}), shuffled.get(key, {})
    names = sorted(set(a) & set(b))
    if not names:
      continue
    for metric in a[names[0]]:
      x = np.array([a[n][metric] for n in names])
      y = np.array([b[n][metric] for n in names])
      diff = x - y
      better = diff < 0 if metric in _LOWER_IS_BETTER else diff > 0
      out[metric] = {
          "true": float(x.mean()), "shuffled": float(y.mean()),
          "diff": float(diff.mean()),
          "stderr": float(diff.std(ddof=1) / np.sqrt(len(names)))
                    if len(names) > 1 else float("nan"),
          "true_better": int(better.sum()), "images": len(names),
          "lower_is_better": metric in _LOWER_IS_BETTER}
  return out


def table(rows: dict[str, dict]) -> str:
  lines = ["| number | true captions | shuffled | true - shuffled (s.e.) "
           "| images where true is better |", "|---|---|---|---|---|"]
  order = [m for m in ("target_L1", "clean_PSNR", "color_L1") if m in rows]
  order += [m for m in metrics_lib.METRIC_NAMES if m in rows]
  for m in order:
    r = rows[m]
    arrow = "lower" if r["lower_is_better"] else "higher"
    lines.append(f"| {m} ({arrow} is better) | {r['true']:.4g} | "
                 f"{r['shuffled']:.4g} | {r['diff']:+.3g} ({r['stderr']:.2g})"
                 f" | {r['true_better']}/{r['images']} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  root = Path(FLAGS.workdir)
  with errors.one_line_errors():
    for run in RUNS:
      if FLAGS.compare_only:
        continue
      config = FLAGS.config.copy_and_resolve_references()
      config.data.shuffle_captions_across_pairs = run == "shuffled"
      print(f"\n== training with {run} captions: {root / run}")
      train_lib.train_and_evaluate(config, str(root / run))
    rows = paired_differences(*(latest_eval(root / run) for run in RUNS))
  (root / "text_ablation.json").write_text(json.dumps(rows, indent=2))
  print("\nText ablation, paired over the eval images:\n" + table(rows))


if __name__ == "__main__":
  errors.run_absl_app(main, sys.argv)
