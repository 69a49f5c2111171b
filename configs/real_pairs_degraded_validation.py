"""The degraded model on a validation split: choose variants without TNO.

TNO's 20 pairs are the test set, so a change to the degraded model must be
chosen on other pairs. This trains both stages (real_pairs_degraded, then
real_pairs_degraded_refine) on the first 80% of each LLVIP, MSRS and
RoadScene folder's pairs in stem order (80 pairs) and evaluates on the last
20% (20 pairs; stems sort as strings, so the shared folders hold out their
stems 39, 4, 40 and 5-9, or MSRS's 6-9):
  python train.py --config configs/real_pairs_degraded_validation.py --workdir runs/validation_s1
  python train.py --config configs/real_pairs_degraded_validation.py:refine --workdir runs/validation_s2
Then measure the text effect on the validation pairs (not TNO):
  python -m textfusion_jax.export --workdir runs/validation_s2 --out runs/validation_s2_bundle
  python benchmarks/text_effect.py --checkpoint runs/validation_s2_bundle \
      --pairs ../shared/data/ivf_samples/llvip,../shared/data/ivf_samples/msrs,../shared/data/ivf_samples/roadscene \
      --split 'train[80%:]' --out runs/text_effect_validation
and once more with --ir_contrast 0.6: these pairs' infrared images have
more contrast than their visible ones, TNO's less, and two variants that
won here lost on TNO (README).
A variant is a command-line override of either stage; only a variant that
beats this baseline on the validation pairs is worth a TNO measurement.
The slices are positions in stem order: a pair added to or dropped from a
folder moves the boundary (the data fingerprint then changes too).
"""

from pathlib import Path

import ml_collections

from configs import real_pairs_degraded
from configs import real_pairs_degraded_refine

FIRST_STAGE = "runs/validation_s1"
STAGES = {"stage1": real_pairs_degraded, "refine": real_pairs_degraded_refine}


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f"{Path(__file__).name}:{stage}: no such stage; use "
                     f"{' or '.join(STAGES)}")
  config = STAGES[stage].get_config()
  config.data.train_split = "train[:80%]"  # of every folder of train_dir
  config.data.eval_dir = config.data.train_dir
  config.data.eval_split = "train[80%:]"  # the rest: no pair in both
  if stage == "refine":
    config.train.init_from = FIRST_STAGE
    config.train.reference_from = FIRST_STAGE
  return config
