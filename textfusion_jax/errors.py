"""One-line errors for command-line entry points.

User mistakes (bad flags, config keys, paths, data, checkpoints) raise
`UserError` (or a subclass) and end with `error: <message>` on stderr and exit
status 2; a missing file (FileNotFoundError) too, and an OSError from the
machine's state (a full disk, a read-only folder). Ctrl-C ends with one line
and status 130. Anything else, a ValueError from a library included, is a
bug and keeps its traceback. Set TEXTFUSION_DEBUG=1 to see the traceback of
user errors as well.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import app
from absl import flags

from input_pipeline.errors import UserError

__all__ = ["UserError", "fail", "one_line_errors", "run_absl_app", "run_cli"]


def fail(message: str, status: int = 2, *, exit_now: bool = False) -> None:
  """Prints `error: message` and exits; `exit_now` skips interpreter
  shutdown, where background threads of a failed library call would print
  tracebacks after the line."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  if exit_now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Turns user-facing exceptions into `error: ...` and exit status 2."""
  try:
    yield
  except (UserError, FileNotFoundError) as error:
    if os.environ.get("TEXTFUSION_DEBUG"):
      raise
    fail(str(error) or type(error).__name__,
         status=getattr(error, "status", 2),
         exit_now=getattr(error, "exit_now", False))
  except OSError as error:
    # A full disk, a read-only folder, a quota: the machine's state, not a
    # bug; the writers leave nothing half-written behind.
    if error.errno not in ENVIRONMENT_ERRNOS or os.environ.get(
        "TEXTFUSION_DEBUG"):
      raise
    where = f"{error.filename}: " if error.filename else ""
    fail(f"{where}{error.strerror or error}")
  except KeyboardInterrupt:
    if os.environ.get("TEXTFUSION_DEBUG"):
      raise
    # Outputs are written whole or not at all, and training resumes from
    # its last checkpoint: a rerun carries on.
    fail("interrupted; what was written is complete, rerun to carry on",
         status=130)


ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.EIO, errno.ENAMETOOLONG})


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error))
  except SyntaxError as error:  # a config file that does not parse
    fail(f"{error.filename}:{error.lineno}: {error.msg} (a config file must "
         "be Python defining get_config())")
  except (AttributeError, KeyError) as error:
    if "get_config" in str(error):
      path = _config_file_argument(argv) or "the config file"
      fail(f"--config {path} defines no get_config()")
    # ml_collections reports an unknown override as a nested Key/AttributeError.
    text = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    # The key is quoted when ml_collections suggests a near name, else the
    # message is the bare key.
    quoted = re.search(r"'(\w+)'", text)
    key = quoted.group(1) if quoted else text.split()[0] if text else ""
    field = next((path for path in (a.split("=")[0].lstrip("-")
                                    for a in argv[1:]
                                    if a.startswith("--config."))
                  if key in path.split(".")), None)
    hint = text if quoted else ""
    fail(f"unknown config field {field or key}" + (f": {hint}" if hint
                                                    else ""))
  return []  # unreachable; fail exits


def _config_file_argument(argv: Sequence[str]) -> str | None:
  """The value of --config (either form) in `argv`, if given."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def run_absl_app(main: Callable[[list[str]], None],
                 argv: Sequence[str]) -> None:
  app.run(main, argv=list(argv), flags_parser=_parse_flags)


def run_cli(main: Callable[[list[str]], None], *,
            positional: bool = False) -> None:
  """Runs an absl `main` on sys.argv with one-line user errors.

  --help (-h) prints the CLI module's docstring and its own flags, and exits
  0, however it was started (`python -m ...` or an installed console script,
  where absl's own help would list the flags of the script wrapper). Unless
  `positional`, words that are not flags are refused: absl hands them to
  `main`, so an unquoted `--text two words` would silently mean "two".
  """
  if any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:]):
    module = sys.modules[main.__module__]
    print((module.__doc__ or "").strip() + "\n\nflags:\n" +
          flags.FLAGS.module_help(module.__name__))
    sys.exit(0)

  def guarded(argv: list[str]) -> None:
    with one_line_errors():
      from input_pipeline import image_io  # pylint: disable=g-import-not-at-top
      image_io.apply_pixel_limit()
      if len(argv) > 1 and not positional:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags "
                        "take one word: quote a value with spaces)")
      main(argv)

  run_absl_app(guarded, sys.argv)
