"""CLIP text encoding: the NNX text tower, checkpoint loading, embedding.

Modules (imported lazily: importing the package loads no model code):

  clip_text       the Flax NNX CLIP text tower with projection
  weight_map      Hugging Face weight names <-> tower parameters
  hf_checkpoint   reading HF checkpoint directories / hub ids
  encoder         `TextEncoder`: captions -> embeddings (jit, buckets, mesh)
  tiny_clip       a tiny random tower and tokenizer; `save_tiny_random_clip`
  caption_embedding  caption files -> a caption store (sharded, resumable)
  embed_captions  the CLI of caption_embedding
"""

import importlib

_EXPORTS = {
    "TextEncoder": "encoder",
    "save_tiny_random_clip": "tiny_clip",
}


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
