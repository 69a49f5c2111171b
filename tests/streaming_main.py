"""Trains from TFDS records under a memory cap (run by test_streaming.py).

  python tests/streaming_main.py DATA_DIR CAP_BYTES DECODED_BYTES WORKDIR

Sets RLIMIT_DATA (the process's heap and private mappings) to CAP_BYTES,
shows that the dataset's decoded size DECODED_BYTES cannot be allocated under
it, streams one full epoch of training batches without `cache_in_memory`,
then trains 3 steps. Prints one JSON line of what it measured.
"""

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
  data_dir, cap, decoded, workdir = (sys.argv[1], int(sys.argv[2]),
                                     int(sys.argv[3]), sys.argv[4])
  resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
  try:
    np.ones(decoded, np.uint8)
    decoded_fits = True
  except MemoryError:
    decoded_fits = False

  from configs import tiny
  from input_pipeline import create_datasets
  from textfusion_jax import train_loop
  from textfusion_jax.text import encoder as text_encoder
  config = tiny.get_config()
  config.data.source = "tfds"
  config.data.tfds_name = "ivf_pairs/folders"
  config.data.tfds_data_dir = data_dir
  config.data.eval_split = "train"
  config.data.cache_in_memory = False
  # The tiny config's 32x32 crops, batch 8: a first XLA:CPU compile keeps
  # ~1 GB of the heap; the cap is for the data, not the compiler.
  config.train.num_steps = 3
  config.eval.at_end = False
  inputs = create_datasets(config,
                           lambda: text_encoder.from_config(config.text))
  stream = inputs.train_iter_at(0)
  batch = next(stream)
  rss_first_batch = peak_rss_mb()
  seen = set(batch["record_index"].tolist())
  num_records = int(sys.argv[5])
  while len(seen) < num_records:  # one epoch: every record decoded once
    seen.update(next(stream)["record_index"].tolist())
  rss_epoch = peak_rss_mb()
  result = train_loop.train_and_evaluate(config, workdir)
  print(json.dumps({"decoded_fits": decoded_fits, "records_seen": len(seen),
                    "peak_rss_mb_first_batch": rss_first_batch,
                    "peak_rss_mb_epoch": rss_epoch,
                    "peak_rss_mb_end": peak_rss_mb(), "result": result}))


if __name__ == "__main__":
  main()
