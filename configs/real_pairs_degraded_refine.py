"""Second stage of the degraded model: fuse as if the visible image were clean.

Fine-tunes a trained real_pairs_degraded run with the 'reference' loss: the
fusion of a degraded crop under its condition sentence is pulled towards
what the first-stage model (frozen) makes of the crop's target under "clean
visible image" (L1; textfusion_jax/losses.py; the target of a renamed
prompt: config.data.degradations.renamed_reference). The reference is frozen:
against its own clean fusion (a target that moves with it) a fine-tuned
model drifted (intensity loss doubled, clean TNO SCD fell to 1.76).
  python train.py --config configs/real_pairs_degraded.py --workdir runs/real_pairs_degraded
  python train.py --config configs/real_pairs_degraded_refine.py --workdir runs/real_pairs_degraded_refine
Then export it and measure the text effect:
  python -m textfusion_jax.export --workdir runs/real_pairs_degraded_refine --out DIR
  python benchmarks/text_effect.py --checkpoint DIR
"""

import ml_collections

from configs import real_pairs_degraded

FIRST_STAGE = "runs/real_pairs_degraded"


def get_config() -> ml_collections.ConfigDict:
  config = real_pairs_degraded.get_config()
  config.loss.reference = 10.0
  config.train.init_from = FIRST_STAGE
  config.train.reference_from = FIRST_STAGE
  # About 17 minutes on 2 idle CPU cores (1.5 steps/s).
  config.train.num_steps = 1500
  config.optim.learning_rate = 3e-4
  return config
