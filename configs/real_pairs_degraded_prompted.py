"""Third stage of the degraded model: a wrong sentence asks for what it names.

Fine-tunes the shipped second stage (pretrained/textfusion-small-degraded,
configs/real_pairs_degraded_refine.py) against itself, frozen, as the
reference. Every target is reduced to what survives its degradation
(data.degradations.wiener_target): the true sentence's fusion is pulled
toward the reference's fusion of the Wiener target. A renamed prompt (one or
two of the underexposure and haze levels redrawn, as shuffled or mistyped
sentences differ in several: data.degradations.renamed_max_kinds) is pulled
toward that fusion mis-exposed and hazed as the prompt says
(data.degradations.renamed_reference). The shipped
pretrained/textfusion-small-degraded-prompted is this run; its clean-input
fusion kept the second stage's clean TNO targets (README):
  python train.py --config configs/real_pairs_degraded_prompted.py --workdir runs/real_pairs_degraded_prompted
From scratch, after the first two stages (configs/real_pairs_degraded_refine.py):
  python train.py --config configs/real_pairs_degraded_prompted.py --workdir runs/real_pairs_degraded_prompted \
      --config.train.init_from=runs/real_pairs_degraded_refine --config.train.reference_from=runs/real_pairs_degraded_refine
Then export it and measure it on degraded and on clean TNO pairs:
  python -m textfusion_jax.export --workdir runs/real_pairs_degraded_prompted --out DIR
  python benchmarks/text_effect.py --checkpoint DIR
  python benchmarks/tno_report.py --checkpoint DIR --prompt "clean visible image"
"""

import ml_collections

from configs import real_pairs_degraded_refine

SECOND_STAGE = "pretrained/textfusion-small-degraded"


def get_config() -> ml_collections.ConfigDict:
  config = real_pairs_degraded_refine.get_config()
  config.train.init_from = SECOND_STAGE
  config.train.reference_from = SECOND_STAGE
  config.data.degradations.renamed_reference = "prompted_fusion"
  config.data.degradations.wiener_target = True
  config.data.degradations.renamed_max_kinds = 2
  # 1500 steps (the refine stage's): 14m40s on 2 idle CPU cores.
  return config
