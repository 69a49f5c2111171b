"""One-line errors for command-line entry points.

User mistakes (bad flags, config keys, paths, data, checkpoints) end with
`error: <message>` on stderr and exit status 2, not a traceback. Set TEXTFUSION_DEBUG=1 to see the
full traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import app
from absl import flags


class UserError(ValueError):
  """A problem with the user's input, reported as one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
  # Imported lazily so this module stays importable on its own.
  from textfusion_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from textfusion_jax import image_io  # pylint: disable=g-import-not-at-top
  from textfusion_jax import train_lib  # pylint: disable=g-import-not-at-top
  return (UserError, checkpointing.CheckpointError, image_io.ImageReadError,
          train_lib.NonFiniteLossError, FileNotFoundError, ValueError)


def fail(message: str, status: int = 2) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Turns user-facing exceptions into `error: ...` and exit status 2."""
  try:
    yield
  except _user_error_types() as error:  # pylint: disable=catching-non-exception
    if os.environ.get("TEXTFUSION_DEBUG"):
      raise
    fail(str(error) or type(error).__name__)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error))
  except (AttributeError, KeyError) as error:
    # ml_collections reports an unknown override as a nested Key/AttributeError.
    text = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    field = next((a.split("=")[0].lstrip("-") for a in argv[1:]
                  if a.startswith("--config.") and
                  re.search(r"'(\w+)'", text) and
                  re.search(r"'(\w+)'", text).group(1) in a), None)
    fail(f"unknown config field {field or text}: {text}")
  return []  # unreachable; fail exits


def run_absl_app(main: Callable[[list[str]], None],
                 argv: Sequence[str]) -> None:
  app.run(main, argv=list(argv), flags_parser=_parse_flags)


def run_cli(main: Callable[[list[str]], None]) -> None:
  """Runs an absl `main` on sys.argv with one-line user errors."""

  def guarded(argv: list[str]) -> None:
    with one_line_errors():
      main(argv)

  run_absl_app(guarded, sys.argv)
