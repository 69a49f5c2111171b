"""Tiny model and data for tests and smoke runs (seconds on a CPU).

Run:
  python train.py --config configs/tiny.py --workdir /tmp/textfusion_tiny
"""

import ml_collections

from configs import default
from textfusion_jax import model as model_lib


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = model_lib.model_config("tiny")
  config.model.text_dim = 64
  config.data.train_size = 16
  config.data.eval_size = 8
  config.data.image_height = 48
  config.data.image_width = 64
  config.data.crop_size = 32
  config.train.num_steps = 6
  config.train.batch_size = 8
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.train.eval_every = 0
  config.optim.warmup_steps = 2
  config.eval.batch_size = 8
  config.eval.save_images = 2
  return config
