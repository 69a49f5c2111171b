"""True minus shuffled captions, paired image by image.

Used by benchmarks/text_ablation.py (synthetic scenes, restoration errors
and fusion metrics) and benchmarks/tno_report.py (held-out TNO pairs). Each
image is its own control, so the standard error is that of the mean paired
difference, far smaller than the spread of the metrics over images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from input_pipeline import files
from input_pipeline.errors import UserError

# Lower is better for these; higher for every other number compared.
LOWER_IS_BETTER = frozenset({"target_L1", "color_L1", "MSE"})

PerImage = Mapping[str, Mapping[str, float]]  # image name -> metric -> value


def paired_differences(true: PerImage, shuffled: PerImage,
                       metric_names: Iterable[str] | None = None
                       ) -> dict[str, dict]:
  """Per metric: both means, the mean of true - shuffled, its standard error
  and the number of images where the true captions do better.

  Only images present in both runs are paired. `metric_names` defaults to
  every metric of the first shared image.
  """
  names = sorted(set(true) & set(shuffled))
  if not names:
    return {}
  out = {}
  # inf - inf (the PSNR of an exact copy) is NaN, reported as such.
  with np.errstate(invalid="ignore"):
    for metric in metric_names or true[names[0]]:
      x = np.array([true[n][metric] for n in names], np.float64)
      y = np.array([shuffled[n][metric] for n in names], np.float64)
      diff = x - y
      lower = metric in LOWER_IS_BETTER
      out[metric] = {
          "true": float(x.mean()), "shuffled": float(y.mean()),
          "diff": float(diff.mean()),
          "stderr": float(diff.std(ddof=1) / np.sqrt(len(names)))
                    if len(names) > 1 else float("nan"),
          "true_better": int(np.sum(diff < 0 if lower else diff > 0)),
          "images": len(names), "lower_is_better": lower}
  return out


def markdown_table(rows: Mapping[str, dict],
                   labels: tuple[str, str] = ("true captions", "shuffled"),
                   subject: str = "true") -> str:
  """The rows of `paired_differences`, in their order, as markdown;
  `subject` names the first run in the difference columns."""
  first, second = labels
  lines = [f"| number | {first} | {second} | {subject} - {second} (s.e.) "
           f"| images where {subject} is better |", "|---|---|---|---|---|"]
  for metric, r in rows.items():
    arrow = "lower" if r["lower_is_better"] else "higher"
    lines.append(f"| {metric} ({arrow} is better) | {r['true']:.4g} | "
                 f"{r['shuffled']:.4g} | {r['diff']:+.3g} ({r['stderr']:.2g})"
                 f" | {r['true_better']}/{r['images']} |")
  return "\n".join(lines)


def eval_steps(workdir: Path) -> list[int]:
  """The steps with an eval/<step>/metrics.json in `workdir`, ascending."""
  evals = workdir / "eval"
  return sorted(int(p.name) for p in evals.iterdir()
                if p.name.isdecimal() and (p / "metrics.json").exists()
                ) if evals.is_dir() else []


def latest_shared_eval(*workdirs: Path) -> tuple[int, list[dict]]:
  """The newest step every workdir evaluated, and each one's metrics.json
  there: a finished run is never paired with an interrupted one's earlier
  step."""
  steps = {w: eval_steps(w) for w in workdirs}
  for workdir, found in steps.items():
    if not found:
      raise UserError(f"no eval/<step>/metrics.json under {workdir}")
  shared = set.intersection(*(set(found) for found in steps.values()))
  if not shared:
    raise UserError("the runs share no evaluated step (" + "; ".join(
        f"{w}: {found}" for w, found in steps.items()) + "); finish them, "
        "or evaluate each at the same step")
  step = max(shared)
  return step, [files.read_json_numbers(w / "eval" / str(step) /
                                        "metrics.json") for w in workdirs]
