"""Atomic file writes: a reader never sees a half-written file.

The one helper every writer in both packages uses (eval PNGs and JSON,
configs, run records, caption stores, score tables).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from input_pipeline.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling of `path` that replaces it on success.

  The parent folder is created. On an exception `path` keeps its old
  contents (or stays absent) and the temporary file is removed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as error:
    # A full disk fails a write with no file name: name the destination.
    if error.filename is None and error.errno is not None:
      raise OSError(error.errno, error.strerror, str(path)) from error
    raise
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def json_safe(value: Any) -> Any:
  """`value` with each non-finite float as the string "inf", "-inf" or "nan".

  JSON has no such numbers: json.dumps would write the bare words Infinity
  and NaN, which strict readers (jq, JavaScript, Go) refuse. PSNR is
  infinite for an identical image. Python reads the strings back with
  float().
  """
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def json_text(value: Any, **dumps_kwargs) -> str:
  """Standard JSON for `value` (see json_safe)."""
  return json.dumps(json_safe(value), allow_nan=False, **dumps_kwargs)


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _restore_non_finite(value: Any) -> Any:
  if isinstance(value, str):
    return _NON_FINITE.get(value, value)
  if isinstance(value, dict):
    return {k: _restore_non_finite(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_restore_non_finite(v) for v in value]
  return value


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file's contents; UserError naming the file if it is not JSON
  (e.g. cut short by a full disk or a killed copy)."""
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path}: not valid JSON ({error})") from None


def read_json_numbers(path: str | os.PathLike) -> Any:
  """A JSON file written by json_text whose values are numbers: "inf",
  "-inf" and "nan" become floats again."""
  return _restore_non_finite(read_json(path))


def unwritable_reason(path: str | os.PathLike, flag: str) -> str | None:
  """Why `path` cannot take a new file (a folder is there, or its parent is
  missing or read-only), naming `flag`; None if it can. Checked before
  long work, so that the work is not lost at the end."""
  path = Path(path)
  if path.is_dir():
    return f"{flag} {path} is a folder; give a file path"
  if not path.parent.is_dir():
    return f"{flag} {path}: folder {path.parent} does not exist"
  if not os.access(path.parent, os.W_OK):
    return f"{flag} {path}: folder {path.parent} is not writable"
  return None


def check_writable(paths: dict[str, str | os.PathLike | None]) -> None:
  """UserError naming every flag -> path (None: not given) that cannot take
  a new file; checked before long work."""
  problems = [problem for flag, path in paths.items() if path
              for problem in [unwritable_reason(path, flag)] if problem]
  if problems:
    raise UserError("; ".join(problems))


def check_own_folder(out: str | os.PathLike, allowed: frozenset[str],
                     what: str) -> None:
  """One line unless `out` is missing, or a folder holding only entries in
  `allowed` (what the writer itself puts there): a file, or anyone else's
  folder (a bundle, a training run), is never written into."""
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"{out} is a file; give a folder for the {what}")
  others = sorted(p.name for p in out.iterdir()
                  if p.name not in allowed) if out.is_dir() else []
  if others:
    listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    raise UserError(f"{out} holds files that are not a {what}'s ({listed}); "
                    "choose a new or empty folder")


def give_plain_modes(root: str | os.PathLike) -> None:
  """Gives `root` and everything in it the modes a plain copy would have
  (mkdtemp and safetensors' writer make entries private): for folders that
  are written beside, then moved into place, to be shared."""
  umask = os.umask(0)
  os.umask(umask)
  root = Path(root)
  for path in [root, *root.rglob("*")]:
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _exchange(a: Path, b: Path) -> bool:
  """Swaps two directories in one step (Linux renameat2 RENAME_EXCHANGE);
  False where the system or file system cannot."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # glibc < 2.28, or another libc
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
               rename_exchange) == 0:
    return True
  error = ctypes.get_errno()
  if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False  # e.g. a file system without exchange
  raise OSError(error, os.strerror(error), str(b))


def replace_directory(new: str | os.PathLike, target: str | os.PathLike
                      ) -> None:
  """Moves the complete directory `new` to `target`, replacing what is
  there only now: in one step where Linux allows (no reader ever finds
  `target` missing), else by two renames, the old one put back if the
  second fails."""
  new, target = Path(new), Path(target)
  if target.exists() and _exchange(new, target):
    shutil.rmtree(new)  # now the previous contents
    return
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  if target.exists():
    os.replace(target, old)
  try:
    os.replace(new, target)
  except OSError:
    if old.exists():
      os.replace(old, target)
    raise
  if old.exists():
    shutil.rmtree(old)
