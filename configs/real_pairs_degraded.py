"""Real pairs with captioned degradations: prompts that steer the fusion.

The real_pairs config, but each training crop's visible image is degraded
(underexposure, noise, haze, each at level 0-3; `input_pipeline/degradations.py`)
and the prompt is the condition sentence that names what was done, e.g.
"heavily underexposed, slightly noisy visible image"; the losses target the
clean crop. In-training evaluation fuses the clean TNO pairs under
"clean visible image".
  python train.py --config configs/real_pairs_degraded.py --workdir runs/real_pairs_degraded
"""

import ml_collections

from configs import real_pairs


def get_config() -> ml_collections.ConfigDict:
  config = real_pairs.get_config()
  config.data.degradations.enabled = True
  config.data.degradations.renamed_prob = 0.4
  # Smoothed visible copies for the head to mix in where the prompt names
  # noise (textfusion_jax/model.py).
  config.model.vis_smoothing_sigmas = (1.0, 2.0, 4.0)
  return config
