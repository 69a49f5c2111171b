"""Pretraining on a weighted mixture of TFDS datasets, then fine-tuning on one.

The README section "Pretraining on a mixture of datasets" builds the two
datasets this config names (the shared LLVIP and MSRS samples, 80/20
train/test splits) and embeds their captions; then:
  python train.py --config configs/mixture.py --workdir runs/mix/pretrain \
      --config.text.encoder=runs/tiny_clip --config.text.embeddings_dir=runs/mix/embeddings
Fine-tune on MSRS alone from the pretrained parameters:
  python train.py --config configs/mixture.py --workdir runs/mix/finetune \
      --config.text.encoder=runs/tiny_clip --config.text.embeddings_dir=runs/mix/embeddings \
      --config.data.mixture="(('tfds:ivf_pairs/folders@runs/mix/msrs', 1.0),)" \
      --config.train.init_from=runs/mix/pretrain
Records stream from array_record (no cache_in_memory), so the datasets may be
larger than RAM; metrics.json reports each dataset's test split apart.
"""

import ml_collections

from configs import real_pairs


def get_config() -> ml_collections.ConfigDict:
  config = real_pairs.get_config()
  config.data.source = "mixture"
  config.data.mixture = (("tfds:ivf_pairs/folders@runs/mix/llvip", 3.0),
                         ("tfds:ivf_pairs/folders@runs/mix/msrs", 1.0))
  config.data.eval_dir = ""
  config.data.cache_in_memory = False
  config.train.num_steps = 40
  config.optim.warmup_steps = 10  # real_pairs' 100 would outlast the run
  config.train.checkpoint_every = 20
  return config
