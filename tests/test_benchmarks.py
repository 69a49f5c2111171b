"""The prepared accelerator benchmark runs (CPU smoke version)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_suite_smoke(tmp_path):
  out_file = tmp_path / "suite.md"
  out = subprocess.run(
      [sys.executable, "benchmarks/accelerator_suite.py", "--smoke",
       f"--out={out_file}"], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  table = out_file.read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  # Header plus one row per part: inference, metrics, text, training.
  assert len(rows) == 5, table
  for word in ("inference", "metrics", "text", "train"):
    assert any(word in row for row in rows[1:]), (word, table)
  assert "captions/s" in table and "img/s" in table and "ms" in table
  # Where a GPU run's time goes: the training compile is reported at once.
  assert "  train batch 2 (remat): compiled in " in out.stdout
  # MFU's FLOPs are the model's: the smoke step is lowered without remat too.
  assert "model GFLOP/step" in table and "train 64x64, batch 2, bf16, remat" \
      in table, table


def test_accelerator_suite_runs_the_parts_asked_for():
  out = subprocess.run(
      [sys.executable, "benchmarks/accelerator_suite.py", "--smoke",
       "--parts=metrics,bogus"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "error: --parts: unknown bogus (choose from inference, metrics, text, "
      "train)")
  out = subprocess.run(
      [sys.executable, "benchmarks/accelerator_suite.py", "--smoke",
       "--parts=metrics"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| ")]
  assert len(rows) == 2 and "metrics" in rows[1], out.stdout


def test_accelerator_suite_names_the_wheels_to_carry():
  out = subprocess.run(
      [sys.executable, "benchmarks/accelerator_suite.py", "--print_wheels"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ml_collections==" in out.stdout and "clu==" in out.stdout


def _table_rows(report: str, first_cell: str) -> dict[str, list[str]]:
  """Rows of the markdown table whose header starts with `first_cell`."""
  lines = report.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith(f"| {first_cell} |"))
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("| "):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = dict(zip(header, cells))
  return rows


def test_text_effect_shows_trivial_rows_and_per_source_parts(shared_dir,
                                                             tmp_path):
  del shared_dir  # the TNO pairs it degrades
  report = tmp_path / "report.md"
  # Left by an earlier run of more pairs: not scored with this run's.
  stale = [tmp_path / "out" / d / "99.png" for d in ("true", "sources/vi")]
  for path in stale:
    path.parent.mkdir(parents=True)
    path.write_bytes((ROOT / "docs" / "prompt_control.png").read_bytes())
  out = subprocess.run(
      [sys.executable, "benchmarks/text_effect.py",
       "--checkpoint=pretrained/textfusion-small-degraded", "--limit=2",
       f"--out={tmp_path / 'out'}", f"--report={report}",
       f"--figure={tmp_path / 'figure.png'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  text = report.read_text()
  assert not any(path.exists() for path in stale)
  assert (tmp_path / "figure.png").stat().st_size > 0
  assert "on 2 degraded TNO pairs" in text
  # TNO's pairs in natural order, each index drawing its levels: the
  # README's figures are of these.
  assert "per pair: 1 (3, 2, 2), 2 (2, 3, 3)\n" in text
  means = _table_rows(text, "method")
  for row in ("true", "shuffled", "empty", "reference", "wiener_target",
              "degraded_vi", "copy_vis", "copy_ir", "rule_mean", "rule_max"):
    assert row in means, (row, text)
  assert "SCD" in means["true"] and "CC" in means["true"]
  # The per-source table of the true sentence: its parts add up to the
  # summed metric of the means table (both printed to 4 significant digits).
  source_table = text[text.index("True sentence minus shuffled"):]
  parts = {k.split()[0]: v for k, v in
           _table_rows(source_table, "number").items()}
  for metric in ("MI", "VIF", "Qabf", "SSIM"):
    total = float(parts[f"{metric}_vis"]["true"]) + float(
        parts[f"{metric}_ir"]["true"])
    assert abs(total - float(means["true"][metric])) < 2e-3 * max(
        1.0, abs(total)), (metric, total, means["true"][metric])
  assert "visible parts: true better on" in text
  assert "infrared parts: reference better on" in text
  # The shipped model trained toward no Wiener target: the default kind.
  assert "Wiener target (contrast: " in text


def test_text_effect_measures_a_validation_slice_of_other_folders(tmp_path):
  """--pairs and --split: the validation pairs of
  configs/real_pairs_degraded_validation.py, so that a change is chosen
  without looking at TNO."""
  from tests.test_train import _write_folder_dataset  # pylint: disable=g-import-not-at-top
  folders = [_write_folder_dataset(tmp_path / "a", ["1", "2", "10"], 0),
             _write_folder_dataset(tmp_path / "b", ["1", "2", "3"], 1)]
  report = tmp_path / "report.md"
  # An earlier run's copy of another source under a kept stem: two images
  # of one stem stopped the scoring after every pair was fused.
  stale = tmp_path / "out" / "sources" / "vi" / "a_2.jpg"
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b"not this run's")
  out = subprocess.run(
      [sys.executable, "benchmarks/text_effect.py",
       "--checkpoint=pretrained/textfusion-small-degraded",
       f"--pairs={','.join(map(str, folders))}", "--split=train[1:]",
       "--wiener_kind=spectral", "--ir_contrast=0.5",
       f"--out={tmp_path / 'out'}", f"--report={report}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  text = report.read_text()
  # The slice is taken in the training pipeline's (string) stem order, so
  # a's '1' is left out; pairs are then numbered in natural order.
  assert "on 4 degraded a+b (train[1:]) pairs (infrared contrast x0.5)" in text
  levels = text[text.index("Levels"):].splitlines()[0]
  assert [part.split()[0] for part in levels.split(": ")[1].split(", ")
          if part[0].isalpha()] == ["a_2", "a_10", "b_2", "b_3"]
  assert sorted(p.name for p in (tmp_path / "out/sources/vi").iterdir()) == [
      "a_10.png", "a_2.png", "b_2.png", "b_3.png"]
  assert "true better on" in text
  assert "Wiener target (spectral: " in text
  # Fused and scored with the infrared images' contrast halved.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in ("a_2", "b_3"):
    scaled = np.asarray(Image.open(tmp_path / "out/sources/ir" /
                                   f"{name}.png"), float)
    folder, stem = name.split("_")
    original = np.asarray(Image.open(tmp_path / folder / "ir" /
                                     f"{stem}.png").convert("L"), float)
    assert abs(scaled.std() - original.std() / 2) < 1.0
    assert abs(scaled.mean() - original.mean()) < 1.0


@pytest.mark.parametrize("args, expected", [
    # Both pairs drawn at (2, 1, 1): no derangement can give either another
    # sentence. Refused before the model loads (it was a ValueError
    # traceback).
    (("--limit=2", "--seed=19"), "no derangement gives every pair another "
     "sentence (pairs share 'moderately underexposed, slightly noisy, "
     "slightly hazy visible image')"),
    (("--seed=-1",), "flag --seed=-1: -1 is not a non-negative integer"),
    (("--pairs=/nonexistent/val",), "--pairs /nonexistent/val: no such "
     "folder"),
    (("--split=train[:1]",), "tno at --split train[:1] holds 1 pair(s): the "
     "shuffled prompts need two"),
    (("--out=pretrained/textfusion-small-degraded/effect",),
     "/pretrained/textfusion-small-degraded/effect is inside"),
    (("--out=README.md",), "README.md is a file; give a folder for the "
     "text_effect output"),
    (("--ir_contrast=0",), "flag --ir_contrast=0.0: must be in (0, 1]")])
def test_text_effect_bad_seeds_are_one_line(shared_dir, tmp_path, args,
                                            expected):
  del shared_dir
  out = subprocess.run(
      [sys.executable, "benchmarks/text_effect.py",
       "--checkpoint=pretrained/textfusion-small-degraded",
       f"--out={tmp_path / 'out'}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
