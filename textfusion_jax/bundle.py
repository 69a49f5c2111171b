"""Self-contained model bundles: write, verify, read.

A bundle is a directory that needs nothing else to fuse images:

  params.safetensors   FusionNet parameters, float32, flat dotted names
                       ('vis_encoder.levels.0.layers.0.attn.proj.kernel')
  config.json          the training config; text.encoder = 'text_encoder'
  text_encoder/        a Hugging Face CLIP directory (config.json, tokenizer
                       files, model.safetensors), loadable by transformers
  MODEL_CARD.md        what it was trained on, how, and how well it fuses
  manifest.json        sha256 and size of every other file

`verify` checks the manifest before anything is loaded: a changed, missing or
unlisted file is refused with a one-line error naming it. `export.py` writes
bundles; `fuse.py` reads them through `load`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from input_pipeline import files
from input_pipeline.errors import UserError

MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
CONFIG = "config.json"
TEXT_ENCODER = "text_encoder"
MODEL_CARD = "MODEL_CARD.md"
FORMAT = "textfusion-bundle/1"


class BundleError(UserError):
  """A bundle is incomplete, altered, or does not fit its config."""


def is_bundle(path: str | os.PathLike) -> bool:
  return (Path(path) / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files_under(root: Path) -> list[str]:
  """Every file below `root` as a sorted list of '/'-joined relative paths."""
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file() or p.is_symlink())


def manifest_of(root: Path, step: int = 0) -> dict[str, Any]:
  """The manifest of the files under `root`, for parameters of `step`."""
  files = {name: {"sha256": sha256_file(root / name),
                  "size": (root / name).stat().st_size}
           for name in _files_under(root) if name != MANIFEST}
  return {"format": FORMAT, "step": step, "files": files}


def verify(root: str | os.PathLike) -> dict[str, Any]:
  """Checks every file against manifest.json; returns the manifest.

  Raises BundleError naming the first missing, changed or unlisted file.
  """
  root = Path(root)
  path = root / MANIFEST
  if not path.is_file():
    raise BundleError(f"{root}: no {MANIFEST}; not a model bundle")
  try:
    manifest = json.loads(path.read_text())
    listed = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(listed, dict):
      raise ValueError(f"format {manifest.get('format')!r}")
  except (ValueError, KeyError, TypeError) as error:
    raise BundleError(f"{path}: unreadable manifest ({error})") from None
  present = set(_files_under(root)) - {MANIFEST}
  for name in sorted(listed):
    file = root / name
    if name not in present or not file.is_file():
      raise BundleError(f"{file}: listed in {path} but missing")
    entry = listed[name]
    if not isinstance(entry, dict):
      raise BundleError(f"{path}: unreadable manifest (entry for {name} is "
                        "not a {{sha256, size}} object)")
    if (file.stat().st_size != entry.get("size") or
        sha256_file(file) != entry.get("sha256")):
      raise BundleError(f"{file}: changed since export (sha256 or size "
                        f"differs from {path})")
  unlisted = sorted(present - set(listed))
  if unlisted:
    raise BundleError(f"{root / unlisted[0]}: not listed in {path} (a bundle "
                      "holds exactly the files its manifest names)")
  # A manifest rewritten without them would otherwise pass: every bundle
  # `write` makes holds these.
  needed = [name for name in (PARAMS, CONFIG, f"{TEXT_ENCODER}/config.json")
            if name not in listed]
  if needed:
    raise BundleError(f"{path}: does not list {', '.join(needed)}; not a "
                      "complete bundle")
  if not isinstance(manifest.get("step", 0), int):
    raise BundleError(f"{path}: unreadable manifest (step "
                      f"{manifest['step']!r} is not an integer)")
  return manifest


def _dotted_leaves(tree: Mapping[str, Any], prefix: str = ""
                   ) -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      yield from _dotted_leaves(value, f"{name}.")
    else:
      yield name, value


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Nested parameter dict -> {'a.b.0.kernel': float32 array}."""
  return {name: np.ascontiguousarray(np.asarray(value, np.float32))
          for name, value in _dotted_leaves(params)}


def params_fingerprint(params: Mapping[str, Any]) -> str:
  """sha256 of the parameters' names, shapes and float32 values: the same
  model whether it came from a bundle or a workdir step."""
  digest = hashlib.sha256()
  for name, value in sorted(flatten_params(params).items()):
    digest.update(f"{name} {value.shape}\n".encode())
    digest.update(memoryview(value))
  return digest.hexdigest()[:32]


def unflatten_params(flat: Mapping[str, np.ndarray], like: Mapping[str, Any],
                     source: Path) -> dict[str, Any]:
  """`flat` shaped as the nested dict `like` (abstract arrays), checked.

  Raises BundleError naming `source` and the first names or shapes that do
  not match, e.g. when a bundle's config and parameters disagree.
  """
  expected = flatten_params_shapes(like)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(n for n in set(expected) & set(flat)
                 if tuple(flat[n].shape) != expected[n])
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
      parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: "
                   f"{tuple(flat[wrong[0]].shape)} != {expected[wrong[0]]})")
    raise BundleError(f"{source}: parameters do not fit the model its config "
                      f"describes: {'; '.join(parts)}")

  def build(tree, prefix):
    return {key: (build(value, f"{prefix}{key}.")
                  if isinstance(value, Mapping) else flat[f"{prefix}{key}"])
            for key, value in tree.items()}

  return build(like, "")


def flatten_params_shapes(tree: Mapping[str, Any]
                          ) -> dict[str, tuple[int, ...]]:
  """{'a.b.0.kernel': shape} of a nested dict of arrays or ShapeDtypeStructs."""
  return {name: tuple(value.shape) for name, value in _dotted_leaves(tree)}


def check_not_inside_a_sealed_folder(out: str | os.PathLike, *,
                                     itself_too: bool = False,
                                     flag: str = "--out") -> None:
  """One line if `out` lies inside a bundle or caption store (which hold
  exactly the files their manifest names: one more file breaks them) or a
  training run's checkpoints/; with `itself_too`, also if `out` is one."""
  from textfusion_jax import checkpointing  # pylint: disable=g-import-not-at-top
  out = Path(out).absolute()
  named = f"{flag} {out}" if flag else str(out)
  for folder in [out] * itself_too + list(out.parents):
    if is_bundle(folder):
      where = "holds" if folder == out else f"is inside {folder}, which holds"
      raise BundleError(f"{named} {where} a {MANIFEST} (a model bundle or "
                        "caption store lists exactly its files; one more "
                        "breaks it): choose a path outside it")
    if folder.name == checkpointing.CHECKPOINT_DIR and (
        folder.parent / checkpointing.CONFIG_FILE).is_file():
      raise BundleError(f"{named} is inside the training run "
                        f"{folder.parent}'s checkpoints: choose a path "
                        "outside it")


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
  """One line unless `out` is new, or a bundle and `overwrite` is given:
  another run's bundle (a shipped model) is never replaced unasked, and
  anything else is never replaced; nor is anything written inside a bundle
  or a run's checkpoints. A symbolic link is refused: replacing it would
  replace the link, not the bundle it points to."""
  out = Path(out)
  if out.is_symlink():
    raise BundleError(f"--out {out} is a symbolic link (to {os.readlink(out)}"
                      "); give the folder itself")
  check_not_inside_a_sealed_folder(out)
  if out.exists() and not is_bundle(out):
    raise BundleError(f"{out} exists and is not a model bundle; choose a new "
                      "--out")
  if out.exists() and not overwrite:
    raise BundleError(f"--out {out} is already a model bundle; pass "
                      "--overwrite to replace it, or choose a new --out")


def write(out: str | os.PathLike, *, params: Mapping[str, Any], step: int,
          config: ml_collections.ConfigDict, text_encoder_writer: Any,
          model_card: str, overwrite: bool = False) -> Path:
  """Writes a bundle to `out` atomically (a temporary sibling, then rename;
  an existing bundle is swapped out in one step where Linux allows).

  `text_encoder_writer(directory)` fills text_encoder/. An existing `out` is
  replaced only if it is itself a bundle and `overwrite` is given, and only
  once the new one is complete (`check_out`).
  """
  # pylint: disable=g-import-not-at-top
  import safetensors.numpy
  from textfusion_jax import checkpointing
  out = Path(out)
  check_out(out, overwrite)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  except OSError as error:
    raise BundleError(f"{out}: cannot write ({error.strerror or error})"
                      ) from None
  try:
    safetensors.numpy.save_file(flatten_params(params), tmp / PARAMS,
                                metadata={"format": "np"})
    (tmp / CONFIG).write_text(checkpointing.config_to_json(config) + "\n")
    text_encoder_writer(tmp / TEXT_ENCODER)
    (tmp / MODEL_CARD).write_text(model_card)
    (tmp / MANIFEST).write_text(
        json.dumps(manifest_of(tmp, step), indent=1, sort_keys=True) + "\n")
    files.give_plain_modes(tmp)  # a bundle is for sharing
    files.replace_directory(tmp, out)
  except (OSError, safetensors.SafetensorError) as error:
    raise BundleError(f"{out}: cannot write "
                      f"({getattr(error, 'strerror', None) or error})"
                      ) from None
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out


def load(root: str | os.PathLike, like_params: Mapping[str, Any]
         ) -> dict[str, Any]:
  """Parameters of a verified bundle, shaped like `like_params`."""
  return load_params(Path(root) / PARAMS, like_params)


def load_params(path: str | os.PathLike, like_params: Mapping[str, Any]
                ) -> dict[str, Any]:
  """Parameters saved by `save_params` (or a bundle's), shaped like
  `like_params`."""
  # pylint: disable=g-import-not-at-top
  import safetensors
  path = Path(path)
  try:
    with safetensors.safe_open(path, framework="numpy") as handle:
      flat = {k: handle.get_tensor(k) for k in handle.keys()}
  except Exception as error:  # pylint: disable=broad-except
    # safetensors raises its own error types for corrupt headers.
    raise BundleError(f"{path}: unreadable ({error})") from None
  return unflatten_params(flat, like_params, path)


def save_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
  """Writes parameters as a safetensors file, whole or not at all."""
  # pylint: disable=g-import-not-at-top
  import safetensors
  import safetensors.numpy
  try:
    with files.atomic_path(path) as tmp:
      safetensors.numpy.save_file(flatten_params(params), tmp,
                                  metadata={"format": "np"})
  except safetensors.SafetensorError as error:  # e.g. a full disk
    raise BundleError(f"{path}: cannot write ({error})") from None


def load_config(root: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(root) / CONFIG
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as error:
    raise BundleError(f"{path}: unreadable config ({error})") from None
  # The bundle's own text tower, wherever the bundle was moved to.
  config.text.encoder = str(Path(root) / TEXT_ENCODER)
  config.text.embeddings_dir = ""
  return config
