"""CPU demo: the README's main command (240 steps took 6m15s from a fresh clone, install included; 300 steps at ~1.07 s/step add about a minute).

Run:
  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo
Text ablation (captions shuffled across pairs):
  python train.py --config configs/demo.py --workdir /tmp/textfusion_demo_shuffled \
      --config.data.shuffle_captions_across_pairs=True
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.train.num_steps = 300  # ~1.1 s/step on 2 cores: fits the 10-minute budget.
  config.train.checkpoint_every = 100
  config.train.eval_every = 0  # Evaluate once, at the end.
  config.optim.warmup_steps = 20
  return config
