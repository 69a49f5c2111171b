"""What a training run was: command, commit, data fingerprint and wall time.

`<workdir>/run_info.json` is written by process 0 when training starts and
updated when it stops; a resumed run appends a segment. `export` turns it
into a model card, so a bundle says exactly what produced it:

  {"data": {"source": ..., "sha256": ..., "files": N, "roots": [...]},
   "text_encoder": {"source": ..., "fingerprint": ...},
   "reference": {"source": ..., "step": N, "fingerprint": ...},  (if any)
   "seed": 0, "segments": [{"argv": [...], "commit": "<sha>[+dirty]",
   "start_step": 0, "end_step": 600, "train_seconds": 312.4}, ...]}

The data fingerprint is the sha256 over the sorted relative paths and the
sha256 of every file under each training root (images and captions), so two
copies of the same data give the same fingerprint wherever they live. For
built TFDS records it covers file names and sizes only (they can be huge);
a mixture covers each of its sources so, with their weights; for the
synthetic source it is the sha256 of the generator's config. Folders sliced
by config.data.train_split ('train[:80%]') add the split to the hash and
the record. A run
that stops early (preempted, interrupted, non-finite loss) still records the
steps and time it did.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections

from input_pipeline import files
from input_pipeline.errors import UserError
from input_pipeline.layouts import DEFAULT_SPLIT, SPLITS_FILE

RUN_INFO = "run_info.json"
_REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
  """HEAD of the checkout this code runs from, '+dirty' if modified."""
  try:
    head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"],
                          capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown (not a git checkout)"
  return head + ("+dirty" if dirty else "")


def _hash_tree(root: Path, digest: Any) -> int:
  count = 0
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    file_digest = hashlib.sha256()
    with open(path, "rb") as handle:
      for block in iter(lambda: handle.read(1 << 20), b""):
        file_digest.update(block)
    digest.update(f"{path.relative_to(root).as_posix()}\0"
                  f"{file_digest.hexdigest()}\n".encode())
    count += 1
  return count


def _hash_folder(root: Path, digest: Any) -> int:
  digest.update(f"root {Path(root).name}\n".encode())
  return _hash_tree(Path(root), digest)


def _hash_build(name: str, data_dir: str, digest: Any) -> tuple[Path, int]:
  """A built TFDS dataset by its files' names and sizes: built records can be
  terabytes, and a rebuild of other data changes both."""
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  root = datasets.built_folder(name, data_dir)
  paths = sorted(p for p in root.rglob("*") if p.is_file())
  if not paths:  # the run reads it, so it exists: a wrong path is a bug here
    raise UserError(f"data fingerprint: no files under {root}")
  for path in paths:
    digest.update(f"{path.relative_to(root).as_posix()}\0"
                  f"{path.stat().st_size}\n".encode())
  return root, len(paths)


def data_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Fingerprint of the training data a config reads (see module doc)."""
  data = config.data
  digest = hashlib.sha256()
  if data.source == "folder":
    roots = [r.strip() for r in data.train_dir.split(",") if r.strip()]
    count = sum(_hash_folder(Path(root), digest) for root in roots)
    info = {"source": "folder", "roots": roots, "files": count}
    # Only a slice of undivided folders ('train[:80%]'): fingerprints of
    # runs that read folders whole, or at a splits.json split, stay as
    # they were recorded (a resume compares them).
    from input_pipeline import sources  # pylint: disable=g-import-not-at-top
    if any(not (Path(root) / SPLITS_FILE).is_file() and
           sources.folder_split(root, data.train_split) != DEFAULT_SPLIT
           for root in roots):
      digest.update(f"split {data.train_split}\n".encode())
      info["split"] = data.train_split
    return {**info, "sha256": digest.hexdigest()}
  if data.source == "tfds":
    root, count = _hash_build(data.tfds_name, data.tfds_data_dir, digest)
    return {"source": "tfds", "roots": [str(root)], "files": count,
            "split": data.train_split, "hashes": "names and sizes",
            "sha256": digest.hexdigest()}
  if data.source == "mixture":
    from input_pipeline import sources  # pylint: disable=g-import-not-at-top
    roots, count = [], 0
    for spec, weight in sources.check_mixture(data.mixture):
      digest.update(f"source weight {weight!r}\n".encode())
      if spec.startswith("tfds:"):
        name, _, data_dir = spec[len("tfds:"):].partition("@")
        root, files_in = _hash_build(name, data_dir or data.tfds_data_dir,
                                     digest)
      else:
        root, files_in = Path(spec), _hash_folder(Path(spec), digest)
      roots.append(str(root))
      count += files_in
    return {"source": "mixture", "roots": roots, "files": count,
            "split": data.train_split,
            "hashes": "folders by contents, builds by names and sizes",
            "sha256": digest.hexdigest()}
  description = json.dumps(data.to_dict(), sort_keys=True, default=str)
  digest.update(f"{description}\nseed {config.seed}".encode())
  return {"source": data.source, "roots": [], "files": 0,
          "sha256": digest.hexdigest()}


def _write(workdir: Path, info: dict[str, Any]) -> None:
  files.write_text_atomic(workdir / RUN_INFO,
                          json.dumps(info, indent=1, sort_keys=True) + "\n")


def load(workdir: str | os.PathLike) -> dict[str, Any]:
  path = Path(workdir) / RUN_INFO
  return files.read_json(path) if path.is_file() else {}


def check_text_encoder(info: dict[str, Any], fingerprint: str | None,
                       encoder: str, workdir: Any) -> None:
  """UserError if the run recorded another text encoder `fingerprint` than
  the one `encoder` (config.text.encoder) now loads: the folder's contents
  changed since training."""
  trained_with = info.get("text_encoder", {})
  recorded = trained_with.get("fingerprint")
  if recorded is not None and fingerprint is not None and (
      recorded != fingerprint):
    source = trained_with.get("source", "?")
    now = ("now holds other weights or another tokenizer" if source == encoder
           else "computes other embeddings")
    raise UserError(
        f"{workdir}: trained with text encoder {source!r} (fingerprint "
        f"{recorded}), but {encoder!r} {now} (fingerprint {fingerprint}); "
        "use the encoder the run was trained with")


def start(workdir: Path, config: ml_collections.ConfigDict,
          start_step: int, text_encoder_fingerprint: str | None = None,
          reference: dict[str, Any] | None = None) -> dict[str, Any]:
  """Records a new segment (and the data fingerprint on the first; the text
  encoder's when the run starts at step 0; `reference`, the frozen model
  this segment trains toward, whenever given)."""
  info = load(workdir)
  data = data_fingerprint(config)
  if "data" not in info or start_step == 0:
    # (A run at step 0 trains from scratch: an earlier attempt there that
    # saved no checkpoint may have used other data or another encoder.)
    info["data"] = data
  _close_unfinished_segment(info, start_step)
  changed = (_data_at(info, len(info.get("segments", []))) != data
             and start_step > 0)
  # Only a fresh run knows the encoder it trains with: a resumed run from
  # before fingerprints were recorded may meet another one now.
  if start_step == 0:
    info.pop("text_encoder", None)
    if text_encoder_fingerprint is not None:
      info["text_encoder"] = {"source": config.text.encoder,
                              "fingerprint": text_encoder_fingerprint}
  if start_step == 0:
    info.pop("reference", None)
  if reference is not None:  # the one this segment trains toward
    info["reference"] = reference
  info["seed"] = config.seed
  segment = {"argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
             "commit": git_commit(), "start_step": start_step,
             "end_step": start_step, "train_seconds": 0.0,
             "running": True}  # until `finish`
  if changed:  # a resume on other data: the card must say so
    segment["data"] = data
  info.setdefault("segments", []).append(segment)
  _write(workdir, info)
  return info


def trained(segment: dict[str, Any]) -> bool:
  """Whether a segment trained any step (not evaluation only, not failed
  or killed before its first checkpoint)."""
  return segment["end_step"] > segment["start_step"]


def _data_at(info: dict[str, Any], segment: int) -> dict[str, Any] | None:
  """The data the segments before `segment` last trained on."""
  for earlier in reversed(info.get("segments", [])[:segment]):
    if "data" in earlier and trained(earlier):
      return earlier["data"]
  return info.get("data")


def _close_unfinished_segment(info: dict[str, Any], start_step: int) -> None:
  """A segment killed without a word (SIGKILL, a lost machine) never
  recorded its end: it trained at least to the checkpoint this run resumes
  from. Its time is unknown."""
  segments = info.get("segments", [])
  if segments and segments[-1].pop("running", False):
    last = segments[-1]
    last.update(end_step=max(start_step, last["start_step"]),
                interrupted=True)


def finish(workdir: Path, info: dict[str, Any], end_step: int,
           train_seconds: float) -> None:
  info["segments"][-1].pop("running", None)
  info["segments"][-1].update(end_step=end_step,
                              train_seconds=round(train_seconds, 1))
  _write(workdir, info)


def total_train_seconds(info: dict[str, Any]) -> float:
  return float(sum(s.get("train_seconds", 0.0)
                   for s in info.get("segments", [])))
