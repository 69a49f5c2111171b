"""Tests of the paired true-vs-shuffled comparison (text ablation, TNO report)."""

import json

import numpy as np
import pytest

from textfusion_jax import paired_comparison


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


def test_latest_eval_reads_the_newest_step_and_names_a_missing_run(tmp_path):
  for step, value in ((100, 1.0), (300, 3.0), (20, 0.5)):
    out = tmp_path / "run" / "eval" / str(step)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"v": value}))
  assert paired_comparison.latest_eval(tmp_path / "run") == {"v": 3.0}
  with pytest.raises(FileNotFoundError, match="missing"):
    paired_comparison.latest_eval(tmp_path / "missing")
