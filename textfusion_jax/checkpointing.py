"""Orbax checkpoints of the train state and data position, config alongside.

Layout of a workdir:
  config.json              the full config that wrote the checkpoints
  checkpoints/<step>/      orbax: `state` (TrainState pytree, sharded) and
                           `data` (JSON: examples seen, global batch size)

Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never shows up as a restorable step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from input_pipeline import files
from textfusion_jax import errors

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"  # Orbax step folders, under the workdir.
# Config sections whose change makes old parameters unusable.
ARCHITECTURE_KEYS = ("model",)
# ... except these model fields: how the same parameters are computed with
# (a float32 run may go on in bfloat16, or with cuDNN's attention).
COMPUTE_FIELDS = ("model.dtype", "model.attention_impl", "model.max_kv_tokens",
                  "model.remat")


class CheckpointError(errors.UserError):
  """A checkpoint is missing, unreadable or from an incompatible config."""


def ensure_writable_workdir(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed and proves it is writable (one-line error)."""
  workdir = Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    # Unique per call: processes on other hosts may share a PID.
    probe = workdir / f".write-probe-{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink(missing_ok=True)
  except OSError as error:
    raise CheckpointError(
        f"workdir {workdir} cannot be written: {error.strerror or error}"
    ) from None
  return workdir


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a finished checkpoint step (Orbax names a step
  folder by its number once it is complete)."""
  directory = Path(workdir) / CHECKPOINT_DIR
  return directory.is_dir() and any(
      p.name.isdecimal() and p.is_dir() for p in directory.iterdir())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def load_saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config saved beside a workdir's checkpoints."""
  path = Path(workdir) / CONFIG_FILE
  if not Path(workdir).exists():
    raise CheckpointError(f"{workdir}: no such bundle or workdir")
  if not path.is_file():
    raise CheckpointError(f"{workdir}: no {CONFIG_FILE}; not a textfusion "
                          "training workdir")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path}: unreadable config ({error})") from None
  # e.g. a Hugging Face folder, or a bundle's text_encoder/, given by mistake
  missing = [k for k in _RUN_CONFIG_SECTIONS
             if not isinstance(saved, dict) or not isinstance(saved.get(k),
                                                              dict)]
  if missing:
    raise CheckpointError(
        f"{path}: not a textfusion run's config (no {', '.join(missing)} "
        "section); give a training workdir or a model bundle")
  return ml_collections.ConfigDict(saved)


# Sections every run's config.json has (configs/default.py).
_RUN_CONFIG_SECTIONS = ("model", "data", "text", "train", "optim")


def check_compatible(saved: ml_collections.ConfigDict,
                     current: ml_collections.ConfigDict, workdir: Any,
                     remedy: str = "use a fresh --workdir or the same model "
                     "config") -> None:
  """Raises a one-line error naming every architecture field that differs."""
  saved_flat = _flatten({k: saved.to_dict().get(k) for k in ARCHITECTURE_KEYS})
  current_flat = _flatten(
      {k: json.loads(config_to_json(current)).get(k) for k in ARCHITECTURE_KEYS})
  diffs = [
      f"{key}: checkpoint {saved_flat.get(key)!r} != config "
      f"{current_flat.get(key)!r}"
      for key in sorted(set(saved_flat) | set(current_flat))
      if saved_flat.get(key) != current_flat.get(key)
      and key not in COMPUTE_FIELDS
  ]
  if diffs:
    raise CheckpointError(
        f"checkpoint in {workdir} was written by an incompatible config ("
        + "; ".join(diffs) + f"); {remedy}")


# Fields whose change on resume alters what the remaining steps do (the
# learning-rate schedule follows optim.* and train.num_steps).
_TRAINING_FIELDS = ("seed", "optim.", "loss.", "data.", "train.num_steps",
                    "train.batch_size", "train.init_from",
                    "train.reference_from", "text.dtype", *COMPUTE_FIELDS)
# ... except those that change only how fast the same data arrives.
_THROUGHPUT_FIELDS = ("data.worker_count", "data.prefetch_buffer_size",
                      "data.cache_in_memory", "model.remat")


def changed_training_fields(
    saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
    defaults: ml_collections.ConfigDict | None = None) -> list[str]:
  """'field: saved -> current' for each training field that differs.

  A field missing from `saved` (a run written before the field existed ran
  with its default) is not a change while `current` keeps its value in
  `defaults` (configs/default.py)."""
  saved_flat = _flatten(saved.to_dict())
  current_flat = _flatten(json.loads(config_to_json(current)))
  default_flat = ({} if defaults is None else
                  _flatten(json.loads(config_to_json(defaults))))
  for key, value in default_flat.items():
    saved_flat.setdefault(key, value)
  return [f"{key} {saved_flat.get(key)!r} -> {current_flat.get(key)!r}"
          for key in sorted(set(saved_flat) | set(current_flat))
          if key.startswith(_TRAINING_FIELDS)
          and not key.startswith(_THROUGHPUT_FIELDS)
          and saved_flat.get(key) != current_flat.get(key)]


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (a crash never leaves half a file)."""
  files.write_text_atomic(workdir / CONFIG_FILE, config_to_json(config))


def make_manager(workdir: str | os.PathLike, *, save_interval_steps: int,
                 max_to_keep: int, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  """A manager of `workdir`'s checkpoints; create=False only reads (a
  workdir without CHECKPOINT_DIR is then an error, and nothing is made)."""
  directory = Path(workdir).absolute() / CHECKPOINT_DIR
  if not create and not directory.is_dir():
    raise CheckpointError(f"{workdir}: no {CHECKPOINT_DIR}/ (no checkpoint "
                          "saved yet)")
  _shorten_orbax_write_failure_logs()
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      create=create)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_position: Mapping[str, int] | None = None, *,
         force: bool = False) -> bool:
  """Saves state (async, every process writing its shards) at `step`.

  data_position: where the input stream stands, e.g. {"examples_seen": n,
  "global_batch_size": b}. The training batches are a pure function of the
  global position (`input_pipeline.pipeline.make_train_dataset`), so this
  small JSON, not per-process iterator files, resumes the data on any
  process count.
  """
  items = {"state": ocp.args.StandardSave(state)}
  if data_position is not None:
    items["data"] = ocp.args.JsonSave(dict(data_position))
  with _write_failures_named(manager):
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves; a failed one is a one-line error."""
  with _write_failures_named(manager):
    manager.wait_until_finished()


def close(manager: ocp.CheckpointManager) -> None:
  """Finishes the pending saves and stops the manager's threads."""
  with _write_failures_named(manager):
    manager.close()


# Tensorstore reports a full disk or quota as ValueError("RESOURCE_EXHAUSTED:
# ..."), a read-only folder as PERMISSION_DENIED; orbax's own metadata writes
# raise the OSError.
_TENSORSTORE_WRITE_FAILURES = {
    "RESOURCE_EXHAUSTED": "no space left on the device or quota exceeded",
    "PERMISSION_DENIED": "permission denied"}


def _write_failure_reason(error: BaseException) -> str | None:
  """Why the machine refused a write (full disk, quota, read-only), or None
  for any other error."""
  if isinstance(error, OSError):
    return ((error.strerror or str(error))
            if error.errno in errors.ENVIRONMENT_ERRNOS else None)
  text = str(error).strip()
  code = next((code for code in _TENSORSTORE_WRITE_FAILURES
               if text.startswith(code)), None)
  return (None if code is None
          else f"{_TENSORSTORE_WRITE_FAILURES[code]}, {code}")


@contextlib.contextmanager
def _write_failures_named(manager: ocp.CheckpointManager) -> Iterator[None]:
  """A save that the machine refuses (full disk, quota, read-only) becomes
  one line naming the checkpoint folder. Orbax writes each step to a
  temporary folder and renames it when complete, so the steps saved before
  it are intact."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    reason = _write_failure_reason(error)
    if reason is None:
      raise
    _raise_write_failure(manager, reason, error)


class _WriteFailureLogsInOneLine(logging.Filter):
  """Orbax's save threads log a refused write (full disk, quota) with a
  traceback each, some 60 lines apiece above the one-line error: each of
  orbax's is kept as one line, the error's first line appended (others'
  records, e.g. a device out-of-memory error, are left whole)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if (isinstance(error, BaseException) and
        f"{os.sep}orbax{os.sep}" in record.pathname and
        _write_failure_reason(error) is not None):
      first_line = (str(error).strip().splitlines() or [""])[0]
      message = record.getMessage()
      if first_line not in message:
        message = f"{message}: {first_line}"
      record.msg, record.args = message, None
      record.exc_info = record.exc_text = None
    return True


def _shorten_orbax_write_failure_logs() -> None:
  logger = logging.getLogger("absl")  # where orbax's absl.logging goes
  if not any(isinstance(f, _WriteFailureLogsInOneLine)
             for f in logger.filters):
    logger.addFilter(_WriteFailureLogsInOneLine())


def _raise_write_failure(manager: ocp.CheckpointManager, reason: str,
                         error: BaseException) -> None:
  saved = sorted(int(step) for step in manager.all_steps())
  kept = (f"the steps saved before ({', '.join(map(str, saved))}) are intact"
          if saved else "no step had been saved")
  failure = CheckpointError(
      f"{manager.directory}: writing a checkpoint failed ({reason}); {kept}: "
      "free space (or fix the folder's permissions) and rerun to resume")
  # Orbax's and tensorstore's writes still in flight log a traceback each
  # while the interpreter shuts down: a CLI ends at once after the line.
  failure.exit_now = True
  raise failure from error


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[Any, int]:
  """Restores (state, step) straight into `abstract_state`'s shardings.

  Every leaf is read by the devices that hold its shards on the current
  mesh, whatever mesh or process count wrote it: no process assembles a
  full host copy.
  """
  step = _existing_step(manager, step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as error:  # pylint: disable=broad-except
    # Other shapes or names raise these; damaged tensor data comes back from
    # tensorstore as a bare Exception (or an OUT_OF_RANGE/DATA_LOSS error).
    text = str(error).strip()
    damaged = not isinstance(error, (KeyError, TypeError)) and (
        type(error) in (Exception, RuntimeError) or any(
            mark in text for mark in ("OUT_OF_RANGE", "DATA_LOSS",
                                      "Encountered error while reading")))
    first_line = text.splitlines()[0].split(" See full TensorStore")[0] if (
        text) else ""
    failure = CheckpointError(
        f"{manager.directory}/{step}: " +
        ("unreadable (damaged or cut short?); move this step's folder aside "
         "to resume from an earlier one" if damaged else
         "cannot restore into this model") +
        f" ({type(error).__name__}: {first_line[:300]})")
    # Tensorstore's reads still in flight report a closed event loop, one
    # traceback each, for seconds: a CLI ends at once after the line.
    failure.exit_now = damaged
    raise failure from None
  return restored["state"], step


def restore_data_position(manager: ocp.CheckpointManager, step: int
                          ) -> dict[str, int] | None:
  """The data position saved with `step`, or None if it has none.

  Checkpoints written before data positions hold grain iterator files
  there instead (no JSON `metadata` file); they consumed one batch per
  step, which the caller assumes for None. A position file that cannot be
  read is an error: guessing would resume the data at the wrong example.
  """
  path = Path(manager.directory) / str(step) / "data" / "metadata"
  if not path.exists():
    return None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore()))
    position = dict(restored["data"])
    int(position["examples_seen"])
  except (ValueError, KeyError, TypeError, OSError) as error:
    raise CheckpointError(
        f"{path}: unreadable data position ({type(error).__name__}); restore "
        "the file or resume from another step") from None
  return position


def _existing_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{manager.directory}: no checkpoint to restore")
  if step not in manager.all_steps():
    raise CheckpointError(
        f"{manager.directory}: no checkpoint for step {step} (have "
        f"{sorted(manager.all_steps())})")
  return step
