"""Prints the record ids one process of a multi-process job trains on.

Run by tests/test_multihost.py, once per process:
  python -m tests.multihost_data_main COORDINATOR NUM_PROCESSES PROCESS_ID BATCHES
Joins the job, builds the tiny config's training stream and prints, as JSON,
the `record_index` of every example of its first BATCHES batches.
"""

import json
import sys

import input_pipeline
from configs import tiny
from textfusion_jax import distributed
from textfusion_jax.text import encoder as text_encoder


def main() -> None:
  coordinator, count, index, batches = sys.argv[1:5]
  distributed.initialize(coordinator, int(count), int(index), timeout_s=60)
  config = tiny.get_config()
  inputs = input_pipeline.create_datasets(
      config, lambda: text_encoder.from_config(config.text))
  stream = inputs.train_iter_at(0)
  seen = [int(i) for _ in range(int(batches))
          for i in next(stream)["record_index"]]
  print(json.dumps({"process": int(index), "record_index": seen}))


if __name__ == "__main__":
  main()
