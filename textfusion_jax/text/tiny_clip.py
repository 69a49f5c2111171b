"""A tiny, randomly initialised CLIP text tower that needs no downloads.

Used by the demo and the tests, and by other parts of the project that need a
real Hugging Face style checkpoint directory to load (`save_tiny_random_clip`).

The tokenizer is built the way OpenAI built CLIP's: the 256 byte symbols of
GPT-2's byte-to-unicode table, the same symbols with the end-of-word suffix
`</w>`, then the results of byte-pair merges, then `<|startoftext|>` and
`<|endoftext|>` (so end-of-text has the largest id, which the legacy pooling
rule relies on). The merges are learned here, deterministically, from a small
built-in English word list, so common words are single tokens while any other
text still tokenizes through the byte symbols.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from absl import flags

from input_pipeline import files
from textfusion_jax import bundle
from textfusion_jax import errors

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
LEGACY_EOS_TOKEN_ID = 2  # What HF CLIP configs said before transformers#24773.

# Common English words plus the vocabulary of scene descriptions of
# infrared-visible pairs. Order does not matter; counts weight the merges.
_WORDS = """
a an the this that these those there here it its is are was were be been being
am do does did has have had having not no nor and or but if then so than too
very can could will would shall should may might must of in on at by for with
without about above below under over between among through during before after
since until into onto from to up down out off near far across along around
behind beside beyond inside outside toward towards against upon within while
one two three four five six seven eight nine ten many several some few each
every all both other another more most less least first second third last next
only just also still even again almost already always never often sometimes
i you he she we they me him her us them my your his our their who what which
where when why how whose whom person people man men woman women child children
boy girl pedestrian pedestrians walker walkers cyclist cyclists rider riders
driver group crowd figure figures body bodies head heads arm arms leg legs
face hand hands car cars vehicle vehicles truck trucks bus buses van vans
bicycle bicycles bike bikes motorcycle motorcycles scooter train boat ship
plane road roads street streets lane lanes sidewalk sidewalks crosswalk
crossing intersection corner curb pavement highway bridge tunnel path parking
lot traffic light lights signal sign signs pole poles lamp lamps post fence
wall walls gate door doors window windows roof building buildings house houses
shop store office tower tree trees bush bushes grass field forest hill hills
mountain mountains river lake water sea sky cloud clouds smoke fog rain snow
ground floor surface shadow shadows edge edges line lines shape shapes object
objects scene scenes image images picture photo view camera frame background
foreground left right center middle top bottom front back side sides distance
night day evening morning dark darkness dim bright brightly lit light glow
glare hot warm cold cool heat thermal infrared visible color colour colors
grey gray black white red green blue yellow orange clear clearly faint
faintly sharp blurry detail details texture textures contrast visible
salient stand stands standing walk walks walking run runs running ride rides
riding drive drives driving park parked parking sit sits sitting wait waits
waiting cross crosses move moves moving stop stops stopped turn turns show
shows showing appear appears appearing see seen look looks make makes made
hidden hide hides stand out outline outlines silhouette silhouettes small
large big little long short tall wide narrow high low new old empty busy
open closed quiet dense heavy thin thick distant nearby close closer far
whole part parts half side partially mostly nearly behind soldier soldiers
military jeep tank helicopter smoke bench chair table box bag umbrella dog
dogs cat animal animals bird birds
""".split()


@functools.cache
def _byte_symbols() -> tuple[str, ...]:
  """GPT-2's reversible map from the 256 byte values to printable unicode."""
  printable = (list(range(ord("!"), ord("~") + 1)) +
               list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  codepoints = {b: b for b in printable}
  extra = 0
  for b in range(256):
    if b not in codepoints:
      codepoints[b] = 256 + extra
      extra += 1
  return tuple(chr(codepoints[b]) for b in range(256))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
  """Byte-pair merges learned from `words`, most frequent pair first.

  Ties break on the pair itself (lexicographically smallest wins), so the
  result does not depend on hashing or insertion order.
  """
  symbols = _byte_symbols()
  word_counts = collections.Counter(words)
  spelled = []
  for word in sorted(word_counts):
    chars = [symbols[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    spelled.append(chars)
  counts = [word_counts[w] for w in sorted(word_counts)]

  pair_counts: collections.Counter = collections.Counter()
  for chars, count in zip(spelled, counts):
    for pair in zip(chars, chars[1:]):
      pair_counts[pair] += count

  merges = []
  while len(merges) < num_merges:
    pair_counts += collections.Counter()  # drops pairs whose count hit 0
    if not pair_counts:
      break
    best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
    merges.append(best)
    joined = best[0] + best[1]
    for i, (chars, count) in enumerate(zip(spelled, counts)):
      if best[0] not in chars or len(chars) < 2:
        continue
      merged, j = [], 0
      while j < len(chars):
        if j + 1 < len(chars) and (chars[j], chars[j + 1]) == best:
          merged.append(joined)
          j += 2
        else:
          merged.append(chars[j])
          j += 1
      if len(merged) == len(chars):
        continue
      for pair in zip(chars, chars[1:]):
        pair_counts[pair] -= count
      for pair in zip(merged, merged[1:]):
        pair_counts[pair] += count
      spelled[i] = merged
  return merges


@functools.cache
def tiny_vocab_and_merges(
    num_merges: int = 2000) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP-style vocab (token -> id) and merges for the built-in word list."""
  merges = learn_merges(_WORDS, num_merges)
  symbols = _byte_symbols()
  tokens = list(symbols) + [s + END_OF_WORD for s in symbols]
  tokens += [a + b for a, b in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  return {t: i for i, t in enumerate(tokens)}, merges


def tiny_tokenizer():
  """A transformers CLIPTokenizer over the tiny vocab (built in-process)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  vocab, merges = tiny_vocab_and_merges()
  # CLIPTokenizer(vocab_file=...) is ignored by transformers 5; pass the data.
  return CLIPTokenizer(vocab=dict(vocab), merges=list(merges),
                       model_max_length=77)


def tiny_text_config(*, legacy_eos: bool = False,
                     hidden_act: str = "quick_gelu"):
  """A transformers CLIPTextConfig for the tiny tower.

  `legacy_eos` writes eos_token_id = 2 as CLIP configs did before
  transformers#24773, which switches pooling to argmax(input_ids).
  """
  from transformers import CLIPTextConfig  # pylint: disable=g-import-not-at-top
  vocab, _ = tiny_vocab_and_merges()
  return CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
      projection_dim=64, num_hidden_layers=2, num_attention_heads=2,
      max_position_embeddings=77, hidden_act=hidden_act,
      bos_token_id=vocab[BOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
      eos_token_id=LEGACY_EOS_TOKEN_ID if legacy_eos else vocab[EOS_TOKEN],
      architectures=["CLIPTextModelWithProjection"])


def save_tiny_random_clip(directory: str | os.PathLike, *, seed: int = 0,
                          legacy_eos: bool = False,
                          hidden_act: str = "quick_gelu") -> Path:
  """Writes a tiny random CLIPTextModelWithProjection in Hugging Face format.

  Writes config.json, model.safetensors (HF key names, float32), vocab.json,
  merges.txt, tokenizer.json and tokenizer_config.json to `directory`, without
  torch, so that code and tests can go through `TextEncoder.from_pretrained`
  (and transformers can load it too). Returns the directory.
  """
  # pylint: disable=g-import-not-at-top
  from textfusion_jax.text import clip_text
  from textfusion_jax.text import hf_checkpoint
  directory = Path(directory)
  hf_config = tiny_text_config(legacy_eos=legacy_eos, hidden_act=hidden_act)
  model = clip_text.random_tower(
      clip_text.ClipTextConfig.from_hf(hf_config), seed=seed)
  hf_checkpoint.save(model, tiny_tokenizer(), directory)
  vocab, merges = tiny_vocab_and_merges()
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return directory


def save_random_vit_b32_text(directory: str | os.PathLike, *,
                             seed: int = 0) -> Path:
  """Random weights of CLIP ViT-B/32's text tower in Hugging Face format.

  The real architecture (width 512, 12 layers, 8 heads, MLP 2048,
  projection 512, vocab 49408) with the tiny tokenizer, for speed
  measurements: time does not depend on the weights, and the real ones
  cannot be downloaded here. Both `TextEncoder.from_pretrained` and
  transformers' CLIPTextModelWithProjection load the directory.
  """
  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig
  from textfusion_jax.text import clip_text
  from textfusion_jax.text import hf_checkpoint
  vocab, _ = tiny_vocab_and_merges()
  eos = vocab[EOS_TOKEN]
  hf_config = CLIPTextConfig(
      vocab_size=49408, hidden_size=512, intermediate_size=2048,
      projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
      max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=vocab[BOS_TOKEN], pad_token_id=eos, eos_token_id=eos,
      architectures=["CLIPTextModelWithProjection"])
  model = clip_text.random_tower(clip_text.ClipTextConfig.from_hf(hf_config),
                                 seed=seed)
  directory = Path(directory)
  hf_checkpoint.save(model, tiny_tokenizer(), directory)
  return directory


def check_out(out: Path) -> None:
  """One line unless `out` is new, empty or a CLIP text model folder outside
  a bundle: a workdir's or a bundle's files are never written into."""
  files.check_own_folder(out, _CLIP_FILES, "CLIP text model")
  bundle.check_not_inside_a_sealed_folder(out, flag="")


def _same_files(a: Path, b: Path) -> bool:
  names = lambda d: sorted(p.name for p in d.iterdir())
  return names(a) == names(b) and all(
      (a / n).read_bytes() == (b / n).read_bytes() for n in names(a))


def main(argv: list[str]) -> None:
  """`python -m textfusion_jax.text.tiny_clip OUT_DIR [--seed N]
  [--overwrite]`."""
  if len(argv) != 2:
    raise errors.UserError("usage: python -m textfusion_jax.text.tiny_clip "
                           "OUT_DIR [--seed N] [--overwrite]")
  out = Path(argv[1]).resolve()  # '.' has no name to stage beside
  check_out(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Written beside, then swapped in whole: a failed write (a full disk)
  # leaves no half model and keeps the old one.
  staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    save_tiny_random_clip(staging, seed=flags.FLAGS.seed)
    files.give_plain_modes(staging)
    if out.is_dir() and any(out.iterdir()):
      if _same_files(staging, out):  # a rerun: nothing to change
        print(out)
        return
      if not flags.FLAGS.overwrite:
        # Real weights may live there under the same file names.
        raise errors.UserError(
            f"{out} already holds another CLIP text model; pass --overwrite "
            "to replace it, or choose a new folder")
    files.replace_directory(staging, out)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  print(out)


_CLIP_FILES = frozenset({"config.json", "merges.txt", "model.safetensors",
                         "tokenizer.json", "tokenizer_config.json",
                         "vocab.json", "special_tokens_map.json"})


if __name__ == "__main__":
  # Defined only when run: library users (tests, the encoder) import this
  # module beside CLIs that have a --seed of their own.
  flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
  flags.DEFINE_bool("overwrite", False, "Replace another CLIP text model "
                    "already in OUT_DIR (the same one is kept as it is).")
  errors.run_cli(main, positional=True)
