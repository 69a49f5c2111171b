"""Trivial fusion rules and the mean-rank table that keeps fusion honest.

Every quality table of this project shows four fusions computed from the
sources alone, beside the methods it compares:

  copy_vis   grey(VIS) returned unchanged
  copy_ir    IR returned unchanged
  rule_mean  round((IR + grey(VIS)) / 2)
  rule_max   max(IR, grey(VIS))

Why: MI, VIF, Qabf and SSIM are sums over the two sources, and copying one
source maxes its half. On the 20 held-out TNO pairs of ../shared (reference
evaluator conventions, `python -m textfusion_jax.evaluate --baselines`),
copying the visible image scores MI 5.19, VIF 1.02, Qabf 0.594, SSIM 0.968,
SD 48.4 and EN 6.97, against SeAFusion's (a strong published method) 1.85,
0.666, 0.471, 0.941, 45.0 and 7.18: the copy wins 5 of the 8 metrics of
CDDFuse's table (EN, SD, SF, MI, SCD, VIF, Qabf, SSIM) and, by mean rank over
those 8, ranks ahead of SeAFusion. The metrics that punish copying are SCD
(copy_vis 0.87, copy_ir 0.72, SeAFusion 1.73) and CC (both copies 0.34,
SeAFusion 0.49); rule_mean's CC is usually near the top (the sum of the
two correlations peaks at F proportional to ir / std(ir) + vis / std(vis),
which the plain mean equals only when the two spreads are equal). So read a table by SCD and CC
first, and compare methods with the trivial rows in the same table.

`mean_ranks` ranks every row of a table on each of `RANKED_METRICS` (higher
is better for all eight; rank 1 is best, ties share the average rank) and
averages the ranks per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

TRIVIAL_RULES = ("copy_vis", "copy_ir", "rule_mean", "rule_max")
# The 8 metrics of CDDFuse's comparison table, all "higher is better".
RANKED_METRICS = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")
MEAN_RANK = "mean_rank"


def trivial_fusion(rule: str, ir_grey, vis_grey):
  """The `rule` fusion of grey levels (numpy or jax arrays, 0..255), as
  float32.

  Rounds half to even, as numpy and jax both do.
  """
  xp = np if isinstance(ir_grey, np.ndarray) else jnp
  # uint8 sums would wrap before the halving (200 + 100 -> 44).
  ir_grey, vis_grey = (xp.asarray(x, xp.float32) for x in (ir_grey, vis_grey))
  if rule == "copy_vis":
    return vis_grey
  if rule == "copy_ir":
    return ir_grey
  if rule == "rule_mean":
    return xp.round((ir_grey + vis_grey) / 2.0)
  if rule == "rule_max":
    return xp.maximum(ir_grey, vis_grey)
  raise ValueError(f"unknown trivial fusion {rule!r}; use one of "
                   f"{TRIVIAL_RULES}")


def mean_ranks(rows: Mapping[str, Mapping[str, float]],
               metric_names: Sequence[str] = RANKED_METRICS
               ) -> dict[str, float]:
  """Row name -> mean over `metric_names` of its rank among all rows."""
  names = list(rows)
  if not names:
    return {}
  total = np.zeros(len(names))
  for metric in metric_names:
    values = np.array([rows[n][metric] for n in names], np.float64)
    # Rank 1 for the highest value; ties share the average of their ranks.
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(names))
    ranks[order] = np.arange(1, len(names) + 1)
    for value in np.unique(values):
      tied = values == value
      ranks[tied] = ranks[tied].mean()
    total += ranks
  return {n: float(t / len(metric_names)) for n, t in zip(names, total)}


def markdown_table(rows: Mapping[str, Mapping[str, float]],
                   columns: Sequence[str], *, with_rank: bool = True,
                   digits: int = 4) -> str:
  """One row per method; a mean_rank column (over RANKED_METRICS) last."""
  ranks = (mean_ranks(rows) if with_rank and
           all(set(RANKED_METRICS) <= set(r) for r in rows.values()) else {})
  header = list(columns) + ([MEAN_RANK] if ranks else [])
  lines = ["| method | " + " | ".join(header) + " |",
           "|---|" + "---|" * len(header)]
  for name, row in rows.items():
    cells = [f"{row[c]:.{digits}g}" if c in row else "-" for c in columns]
    if ranks:
      cells.append(f"{ranks[name]:.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
