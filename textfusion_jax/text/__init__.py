"""CLIP text encoding: the NNX text tower, checkpoint loading, caption stores.

Modules (imported lazily, so `caption_store` stays cheap for input pipelines):

  clip_text       the Flax NNX CLIP text tower with projection
  weight_map      Hugging Face weight names <-> tower parameters
  hf_checkpoint   reading HF checkpoint directories / hub ids
  encoder         `TextEncoder`: captions -> embeddings (jit, buckets, mesh)
  tiny_clip       a tiny random tower and tokenizer; `save_tiny_random_clip`
  caption_files   reading captions.jsonl files
  caption_store   `CaptionEmbeddings`: precomputed embeddings on disk
  embed_captions  the CLI that writes caption stores
"""

import importlib

_EXPORTS = {
    "TextEncoder": "encoder",
    "CaptionEmbeddings": "caption_store",
    "save_tiny_random_clip": "tiny_clip",
}


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
