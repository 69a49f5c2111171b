"""Real pairs: the shipped model, trained on the shared sample pairs.

Trains the `small` model on the LLVIP, MSRS and RoadScene pairs of
../shared/data/ivf_samples with their captions and evaluates it on the 20
held-out TNO pairs (never trained on) beside the trivial fusions:
  python train.py --config configs/real_pairs.py --workdir runs/real_pairs
Then export it as a bundle and compare it with SeAFusion on TNO:
  python -m textfusion_jax.export --workdir runs/real_pairs --out DIR
  python benchmarks/tno_report.py --checkpoint DIR
Other folders (each with ir/, vi/ and captions.jsonl):
  python train.py --config configs/real_pairs.py --workdir runs/mine \
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
  # About 45 minutes on 2 idle CPU cores (1.5-2 steps/s), 60 with setup and
  # the final TNO evaluation at most.
  config.train.num_steps = 4000
  config.train.checkpoint_every = 500
  config.train.eval_every = 0
  config.optim.warmup_steps = 100
  config.eval.batch_size = 1  # TNO sizes all differ.
  config.eval.pad_multiple = 128  # 8 TNO sizes -> 6 compiled shapes.
  return config
