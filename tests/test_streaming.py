"""Beyond RAM: a TFDS dataset larger than the memory cap trains by streaming
from array_record (no `cache_in_memory`)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from input_pipeline import datasets

ROOT = Path(__file__).resolve().parents[1]
NUM_PAIRS, SIDE = 2000, 768
CAP_BYTES = 3 * 2**30


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=85)
  return buffer.getvalue()


def _write_pairs(root: Path) -> None:
  """NUM_PAIRS pairs of SIDE x SIDE JPEGs (8 distinct images, reused: the
  build and the reader still decode every file)."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:SIDE, :SIDE]
  vis, irs = [], []
  for k in range(8):
    base = 120 + 80 * np.sin(x / (9 + k)) * np.cos(y / (13 + k))
    vis.append(_jpeg(np.clip(base[..., None] * [1, 0.8, 0.6] + rng.normal(
        0, 6, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)))
    irs.append(_jpeg(np.clip(255 - base + rng.normal(0, 6, (SIDE, SIDE)),
                             0, 255).astype(np.uint8)))
  for sub in ("ir", "vi"):
    (root / sub).mkdir(parents=True)
  lines = []
  for i in range(NUM_PAIRS):
    (root / "ir" / f"{i:05d}.jpg").write_bytes(irs[i % 8])
    (root / "vi" / f"{i:05d}.jpg").write_bytes(vis[i % 8])
    lines.append(json.dumps({"name": f"{i:05d}", "captions": [f"scene {i % 8}"]}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_training_streams_a_dataset_larger_than_the_memory_cap(tmp_path):
  _write_pairs(tmp_path / "src")
  datasets.build("folders", manual_dir=tmp_path / "src",
                 data_dir=tmp_path / "tfds")
  decoded = NUM_PAIRS * SIDE * SIDE * 4  # RGB + IR uint8
  assert decoded > 1.4 * CAP_BYTES  # 4.4 GiB decoded vs a 3 GiB cap
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "streaming_main.py"),
       str(tmp_path / "tfds"), str(CAP_BYTES), str(decoded),
       str(tmp_path / "run"), str(NUM_PAIRS)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print(result)
  assert not result["decoded_fits"]  # the cap is below the decoded size
  assert result["records_seen"] == NUM_PAIRS
  # Streaming a whole epoch adds little to the first batch's peak.
  assert (result["peak_rss_mb_epoch"] - result["peak_rss_mb_first_batch"]
          < 300), result
  assert result["result"] == {"finished_at": 3}
