"""LLVIP from its official layout, built as a TFDS dataset.

Build once (manual_dir holds infrared/{train,test} and visible/{train,test}):
  python -m input_pipeline.build_dataset --dataset ivf_pairs/llvip \
      --manual_dir /data/LLVIP --data_dir /data/tfds
Train (a GPU host; the base model, CLIP ViT-B/32 embeddings):
  python train.py --config configs/llvip.py --workdir runs/llvip \
      --config.data.tfds_data_dir=/data/tfds \
      --config.text.encoder=openai/clip-vit-base-patch32
"""

import ml_collections

from configs import default
from textfusion_jax import model as model_lib


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = model_lib.model_config("base")
  config.text.encoder = "openai/clip-vit-base-patch32"
  config.data.source = "tfds"
  config.data.tfds_name = "ivf_pairs/llvip"
  config.data.tfds_data_dir = "~/tensorflow_datasets"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.crop_size = 96  # Text-IF's recipe.
  config.data.worker_count = 4
  config.optim.learning_rate = 1e-4  # Text-IF: AdamW 1e-4, wd 0.05.
  config.optim.warmup_steps = 1000
  config.train.batch_size = 8
  config.train.num_steps = 100_000
  config.train.checkpoint_every = 2000
  config.train.eval_every = 10_000
  config.eval.max_images = 50  # LLVIP test has 3463 frames of 1280x1024.
  config.eval.batch_size = 1
  return config
