"""CPU demo: the README's main command (about 5 minutes on 2 cores).

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
  return config
