"""Tests of the paired true-vs-shuffled comparison (text ablation, TNO report)."""

import json

import numpy as np
import pytest

from textfusion_jax import paired_comparison
from input_pipeline.errors import UserError


def _per_image(**columns):
  names = [f"img{i}" for i in range(len(next(iter(columns.values()))))]
  return {n: {m: v[i] for m, v in columns.items()} for i, n in enumerate(names)}


def test_paired_differences_count_wins_in_the_right_direction():
  true = _per_image(target_L1=[10.0, 12.0, 20.0], EN=[7.0, 7.0, 7.0])
  shuffled = _per_image(target_L1=[11.0, 14.0, 19.0], EN=[6.0, 8.0, 6.0])
  rows = paired_comparison.paired_differences(true, shuffled)
  l1 = rows["target_L1"]
  assert l1["lower_is_better"] and l1["true_better"] == 2
  np.testing.assert_allclose(l1["diff"], np.mean([-1.0, -2.0, 1.0]))
  np.testing.assert_allclose(l1["stderr"],
                             np.std([-1.0, -2.0, 1.0], ddof=1) / np.sqrt(3))
  assert not rows["EN"]["lower_is_better"] and rows["EN"]["true_better"] == 2
  text = paired_comparison.markdown_table(rows)
  assert "| target_L1 (lower is better) | 14 | 14.67 | -0.667" in text
  assert "| EN (higher is better) | 7 | 6.667 | +0.333" in text
  assert text.count("2/3") == 2


def test_only_shared_images_are_paired_and_names_select_metrics():
  true = _per_image(target_L1=[1.0, 2.0], EN=[5.0, 5.0])
  shuffled = {"img1": {"target_L1": 3.0, "EN": 4.0}}
  rows = paired_comparison.paired_differences(true, shuffled, ["EN"])
  assert list(rows) == ["EN"] and rows["EN"]["images"] == 1
  assert rows["EN"]["diff"] == 1.0 and np.isnan(rows["EN"]["stderr"])
  assert paired_comparison.paired_differences(true, {}) == {}


def test_runs_are_compared_at_their_newest_shared_step(tmp_path):
  """A finished run is not paired with an interrupted one's older step."""
  for run, steps in (("true", (100, 300, 600)), ("shuffled", (100, 300))):
    for step in steps:
      out = tmp_path / run / "eval" / str(step)
      out.mkdir(parents=True)
      (out / "metrics.json").write_text(json.dumps({"v": step, "run": run}))
  step, (true, shuffled) = paired_comparison.latest_shared_eval(
      tmp_path / "true", tmp_path / "shuffled")
  assert step == 300 and true == {"v": 300, "run": "true"}
  assert shuffled == {"v": 300, "run": "shuffled"}
  assert paired_comparison.latest_shared_eval(tmp_path / "true")[0] == 600
  with pytest.raises(UserError, match="no eval/<step>/metrics.json under "
                     ".*missing"):
    paired_comparison.latest_shared_eval(tmp_path / "true",
                                         tmp_path / "missing")
  (tmp_path / "late" / "eval" / "900").mkdir(parents=True)
  (tmp_path / "late" / "eval" / "900" / "metrics.json").write_text("{}")
  with pytest.raises(UserError, match=r"share no evaluated step \(.*true: "
                     r"\[100, 300, 600\]; .*late: \[900\]\)"):
    paired_comparison.latest_shared_eval(tmp_path / "true",
                                         tmp_path / "late")
