"""Builds the text encoder a config names."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from textfusion_jax.text.encoder import TextEncoder

TINY_RANDOM = "tiny-random"
# Fixed, so training, evaluation and the fuse command embed identically.
TINY_RANDOM_SEED = 0


def build_text_encoder(text_config: ml_collections.ConfigDict) -> TextEncoder:
  """'tiny-random' (no download), a local HF CLIP directory, or a hub id."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[text_config.dtype]
  if text_config.encoder == TINY_RANDOM:
    return TextEncoder.tiny_random(TINY_RANDOM_SEED, dtype=dtype)
  return TextEncoder.from_pretrained(text_config.encoder, dtype=dtype)
