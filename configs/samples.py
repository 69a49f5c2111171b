"""Real pairs: train on a folder laid out like ../shared/data/ivf_samples.

Trains the `small` model on the LLVIP, MSRS and RoadScene sample pairs with
their captions and evaluates on the held-out TNO pairs:
  python train.py --config configs/samples.py --workdir runs/samples
Other folders (each with ir/, vi/ and captions.jsonl):
  python train.py --config configs/samples.py --workdir runs/mine \
      --config.data.train_dir=/data/a,/data/b --config.data.eval_dir=/data/c
With precomputed CLIP embeddings (python -m textfusion_jax.text.embed_captions):
  ... --config.text.embeddings_dir=runs/embeddings
"""

import ml_collections

from configs import default

SAMPLES = "../shared/data/ivf_samples"


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.source = "folder"
  config.data.train_dir = ",".join(
      f"{SAMPLES}/{name}" for name in ("llvip", "msrs", "roadscene"))
  config.data.eval_dir = f"{SAMPLES}/tno"
  config.data.cache_in_memory = True  # 100 pairs fit in RAM easily.
  config.train.num_steps = 250  # ~6 minutes on 2 idle CPU cores.
  config.train.checkpoint_every = 125
  config.train.eval_every = 0
  config.optim.warmup_steps = 50
  config.eval.batch_size = 1  # TNO sizes all differ.
  config.eval.pad_multiple = 128  # 8 TNO sizes -> 6 compiled shapes.
  return config
