"""The prepared accelerator benchmark runs (CPU smoke version)."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_accelerator_suite_names_the_wheels_to_carry():
  out = subprocess.run(
      [sys.executable, "benchmarks/accelerator_suite.py", "--print_wheels"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ml_collections==" in out.stdout and "clu==" in out.stdout
