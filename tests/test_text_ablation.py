"""Tests of the paired true-vs-shuffled comparison in benchmarks/text_ablation."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "text_ablation.py"


@pytest.fixture(scope="module")
def ablation():
  spec = importlib.util.spec_from_file_location("text_ablation", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("text_ablation", module)
  spec.loader.exec_module(module)
  return module


def _result(l1, psnr, en):
  names = [f"img{i}" for i in range(len(l1))]
  return {"restoration_per_image": {n: {"target_L1": a, "clean_PSNR": b}
                                    for n, a, b in zip(names, l1, psnr)},
          "per_image": {n: {"EN": e} for n, e in zip(names, en)}}


def test_paired_differences_count_wins_in_the_right_direction(ablation):
  true = _result([10.0, 12.0, 20.0], [20.0, 21.0, 15.0], [7.0, 7.0, 7.0])
  shuffled = _result([11.0, 14.0, 19.0], [19.0, 20.0, 16.0], [6.0, 8.0, 6.0])
  rows = ablation.paired_differences(true, shuffled)
  l1 = rows["target_L1"]
  assert l1["lower_is_better"] and l1["true_better"] == 2
  np.testing.assert_allclose(l1["diff"], np.mean([-1.0, -2.0, 1.0]))
  np.testing.assert_allclose(l1["stderr"],
                             np.std([-1.0, -2.0, 1.0], ddof=1) / np.sqrt(3))
  assert rows["clean_PSNR"]["true_better"] == 2
  assert not rows["EN"]["lower_is_better"] and rows["EN"]["true_better"] == 2
  text = ablation.table(rows)
  assert text.index("target_L1") < text.index("| EN")
  assert "2/3" in text


def test_only_shared_images_are_paired(ablation):
  true = _result([1.0, 2.0], [30.0, 30.0], [5.0, 5.0])
  shuffled = _result([3.0], [20.0], [4.0])
  assert ablation.paired_differences(true, shuffled)["target_L1"][
      "images"] == 1


def test_latest_eval_reads_the_newest_step_and_names_a_missing_run(
    ablation, tmp_path):
  for step, value in ((100, 1.0), (300, 3.0), (20, 0.5)):
    out = tmp_path / "run" / "eval" / str(step)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"v": value}))
  assert ablation.latest_eval(tmp_path / "run") == {"v": 3.0}
  with pytest.raises(FileNotFoundError, match="missing"):
    ablation.latest_eval(tmp_path / "missing")
