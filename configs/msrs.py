"""MSRS from its official layout ({train,test}/{ir,vi}), built as TFDS.

Build once:
  python -m input_pipeline.build_dataset --dataset ivf_pairs/msrs \
      --manual_dir /data/MSRS --data_dir /data/tfds
Train:
  python train.py --config configs/msrs.py --workdir runs/msrs \
      --config.data.tfds_data_dir=/data/tfds
"""

import ml_collections

from configs import llvip


def get_config() -> ml_collections.ConfigDict:
  config = llvip.get_config()
  config.data.tfds_name = "ivf_pairs/msrs"
  config.eval.max_images = 0  # MSRS test: 361 pairs of 640x480.
  config.eval.batch_size = 8
  return config
