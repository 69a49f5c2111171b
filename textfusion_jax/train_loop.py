"""Training and evaluation loop, split into plainly named phases.

  check_config -> setup_workdir -> make_mesh -> check_batch_fits_mesh ->
  build_trainer -> create_datasets -> restore_or_init -> train loop (its first
  step compiled: record_start; then log, checkpoint, evaluate) -> final
  evaluation
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

import input_pipeline
from input_pipeline import degradations
from input_pipeline import sources
from textfusion_jax import bundle
from textfusion_jax import checkpointing
from textfusion_jax import distributed
from textfusion_jax import evaluators
from textfusion_jax import inference
from textfusion_jax import metric_writer
from textfusion_jax import model as model_lib
from textfusion_jax import run_record
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import train_step
from textfusion_jax.text import encoder as text_encoder
from textfusion_jax import errors

log = logging.getLogger(__name__)


class NonFiniteLossError(errors.UserError):
  """A NaN/Inf loss or gradient; the last good checkpoint is kept."""


class Preempted(errors.UserError):
  """SIGTERM (a scheduler's preemption notice): stopped after saving."""
  status = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM death


class PreemptionNotice:
  """Whether the job was told to stop (SIGTERM), agreed across processes.

  One process: a SIGTERM handler sets a flag, read after each step.
  Several: JAX's preemption service (on with `jax.distributed`) catches the
  SIGTERM any of them gets and names one step at which all stop, so their
  collective save meets (`multihost_utils.reached_preemption_sync_point`).
  """

  def __init__(self):
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    state = jax_distributed.global_state
    # (Without the service, jax_enable_preemption_service=False, each
    # process hears only its own SIGTERM, as a single process does.)
    self._multi = (state.client is not None and
                   state.preemption_sync_manager is not None)
    self._received = False
    self._previous = None
    # Only the main thread may set handlers (a library caller may train
    # from another: it then keeps SIGTERM's default).
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    if self._received:  # a second notice: the loop is stuck, so go
      self.close()
      os.kill(os.getpid(), signum)
    self._received = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self) -> None:
    """Back to the previous SIGTERM handling (after the loop: a SIGTERM
    during the final evaluation ends the run as it did before)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# -- phases -------------------------------------------------------------------


# train.* fields that must be positive / non-negative integers.
_POSITIVE_TRAIN_FIELDS = ("num_steps", "batch_size", "log_every",
                          "checkpoint_every", "keep_checkpoints")
_NON_NEGATIVE_TRAIN_FIELDS = ("eval_every", "stop_after_steps")


def _check_optimizer(optim: ml_collections.ConfigDict) -> None:
  """The AdamW settings: a negative rate would ascend the loss."""
  for field, test, wanted in (
      ("learning_rate", lambda v: v > 0, "> 0"),
      ("final_lr_fraction", lambda v: v >= 0, ">= 0"),
      ("weight_decay", lambda v: v >= 0, ">= 0"),
      ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
      ("grad_clip_norm", lambda v: v > 0, "> 0")):
    value = optim.get(field)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or
        not math.isfinite(value) or not test(value)):
      raise errors.UserError(f"config.optim.{field}={value!r}: must be a "
                             f"finite number {wanted}")


def _check_data_fields(data: ml_collections.ConfigDict) -> None:
  for field, least in (("train_size", 1), ("eval_size", 1),
                       ("image_height", 1), ("image_width", 1),
                       ("worker_count", 0), ("prefetch_buffer_size", 1)):
    value = data.get(field, least)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise errors.UserError(f"config.data.{field}={value!r}: must be an "
                             f"integer >= {least}")
  if data.get("mixture") and data.get("source") != "mixture":
    raise errors.UserError(
        f"config.data.mixture is set but config.data.source="
        f"{data.get('source')!r}: a mixture is read only with "
        "config.data.source='mixture'")
  if data.get("shuffle_captions_across_pairs"):
    if data.get("degradations", {}).get("enabled"):
      # Every training prompt is then the crop's condition sentence, and
      # evaluation's is "clean visible image": the ablation would change
      # nothing.
      raise errors.UserError(
          "config.data.shuffle_captions_across_pairs has no effect with "
          "config.data.degradations.enabled (the prompts are condition "
          "sentences); for wrong prompts use "
          "config.data.degradations.renamed_prob")
    if data.source == "synthetic" and data.eval_size < 2:
      raise errors.UserError(
          f"config.data.eval_size={data.eval_size}: shuffling captions "
          "across pairs needs at least 2 eval scenes")


def _check_loss_weights(loss: ml_collections.ConfigDict) -> None:
  """A negative weight would maximise its term; NaN would only show as a
  non-finite loss after compilation."""
  for field, value in loss.items():
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or
        not math.isfinite(value) or value < 0):
      raise errors.UserError(f"config.loss.{field}={value!r}: must be a "
                             "finite number >= 0")


def check_config(config: ml_collections.ConfigDict,
                 resuming: bool = False) -> None:
  """One-line errors for bad values, before anything is read or written;
  `resuming` a run, its init_from is no longer read."""
  model_lib.validate_config(config.model)
  if (config.model.get("attention_impl") == "cudnn" and
      jax.default_backend() != "gpu"):
    raise errors.UserError(
        "config.model.attention_impl='cudnn' needs a GPU; this run's "
        f"backend is {jax.default_backend()!r} (leave the field unset for "
        "XLA's attention)")
  for fields, least in ((_POSITIVE_TRAIN_FIELDS, 1),
                        (_NON_NEGATIVE_TRAIN_FIELDS, 0)):
    for field in fields:
      value = config.train.get(field)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise errors.UserError(
            f"config.train.{field}={value!r}: must be an integer >= {least}")
  for field, value, least in (("config.seed", config.seed, 0),
                              ("config.data.crop_size",
                               config.data.crop_size, 1),
                              ("config.eval.batch_size",
                               config.eval.batch_size, 1),
                              ("config.eval.max_images",
                               config.eval.get("max_images", 0), 0),
                              ("config.eval.pad_multiple",
                               config.eval.get("pad_multiple", 1), 1),
                              ("config.eval.save_images",
                               config.eval.get("save_images", 0), 0),
                              ("config.optim.warmup_steps",
                               config.optim.warmup_steps, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise errors.UserError(f"{field}={value!r}: must be an integer >= "
                             f"{least}")
  _check_optimizer(config.optim)
  if config.optim.warmup_steps > config.train.num_steps:
    # Allowed for short smoke runs of a long config, but never silent.
    log.warning("config.optim.warmup_steps=%d is more than "
                "config.train.num_steps=%d: the learning rate never reaches "
                "its peak (%g) nor decays", config.optim.warmup_steps,
                config.train.num_steps, config.optim.learning_rate)
  _check_data_fields(config.data)
  _check_loss_weights(config.loss)
  if config.data.get("degradations", {}).get("enabled"):
    degradations.check_level_probs(config.data.degradations.level_probs,
                                   "config.data.degradations.level_probs")
  check_param_sources(config, skip=("init_from",) if resuming else ())


def setup_workdir(config: ml_collections.ConfigDict, workdir: str) -> Path:
  """Checks the workdir and a previous run's config; writes nothing there
  but the directory itself (`record_start` writes the config once the run
  has started)."""
  if "://" in str(workdir):
    # pathlib would make 'gs://b/run' a local folder 'gs:/b/run': each host
    # would checkpoint to its own disk.
    raise errors.UserError(
        f"--workdir {workdir}: URLs are not supported; mount the bucket as a "
        "folder every process sees (e.g. gcsfuse) and give its path")
  if bundle.is_bundle(workdir):
    # Training would overwrite its config.json and break its manifest.
    raise errors.UserError(
        f"--workdir {workdir} holds a {bundle.MANIFEST} (a model bundle or "
        "caption store), not a training run; train from a bundle with "
        "--config.train.init_from and a new --workdir")
  path = checkpointing.ensure_writable_workdir(workdir)
  if not checkpointing.has_checkpoint(path):
    if (path / checkpointing.CONFIG_FILE).exists():
      # Someone else's config.json (a CLIP folder) is refused, not replaced.
      checkpointing.load_saved_config(path)
      log.info("%s: the earlier run there saved no checkpoint; starting "
               "afresh", path)
    return path
  if (path / checkpointing.CONFIG_FILE).exists():
    saved = checkpointing.load_saved_config(path)
    checkpointing.check_compatible(saved, config, path)
    from configs import default  # pylint: disable=g-import-not-at-top
    changed = checkpointing.changed_training_fields(saved, config,
                                                    default.get_config())
    if changed and jax.process_index() == 0:
      # Allowed (extending a run is common), but the schedule jumps.
      log.warning("Resuming %s with changed settings (the remaining steps "
                  "follow the new values): %s", path, "; ".join(changed))
    # The model's text MLPs were trained on this encoder's embeddings. A run
    # that recorded what its encoder computes may find it in another local
    # folder (a moved or copied checkpoint; create_datasets compares the
    # fingerprints); otherwise the name must match.
    was = saved.get("text", {}).get("encoder")
    moved = (Path(config.text.encoder).is_dir() and "fingerprint" in
             run_record.load(path).get("text_encoder", {}))
    if was is not None and not moved and not sources.same_text_encoder(
        was, config.text.encoder):
      raise checkpointing.CheckpointError(
          f"checkpoint in {path} was trained with text encoder {was!r}, not "
          f"config.text.encoder={config.text.encoder!r}; resume with the "
          "same encoder or use a fresh --workdir")
  return path


def check_batch_fits_mesh(config: ml_collections.ConfigDict,
                          mesh: Any) -> None:
  """A training batch is split evenly over every device of the mesh (eval
  batches are padded to fit)."""
  if config.train.batch_size % mesh.size:
    raise errors.UserError(
        f"config.train.batch_size={config.train.batch_size} does not split "
        f"over the mesh's {mesh.size} devices ({dict(mesh.shape)}); use a "
        f"multiple of {mesh.size}")


def record_start(config: ml_collections.ConfigDict, workdir: Path,
                 start_step: int, encoder_fingerprint: str | None,
                 reference: dict[str, Any] | None = None,
                 reference_to_copy: Any = None) -> dict[str, Any] | None:
  """Writes config.json and opens a run_info segment (process 0), once the
  run is known to start: after its first train step compiled, or before an
  evaluation-only run. A run that fails earlier leaves an earlier run's
  config (the one its checkpoints were written by) and record as they were.
  Returns the segment record, None on other processes."""
  if jax.process_index() != 0:
    return None
  checkpointing.write_config(workdir, config)
  if reference_to_copy is not None:  # before run_info.json names it
    bundle.save_params(workdir / REFERENCE_COPY, reference_to_copy)
  return run_record.start(workdir, config, start_step, encoder_fingerprint,
                          reference)


def create_datasets(config: ml_collections.ConfigDict, workdir: Path
                    ) -> input_pipeline.Datasets:
  """The datasets, after checking that the text encoder is the one the run
  in `workdir` trained with (before captions are embedded with it)."""
  encoder = text_encoder.from_config(config.text)
  if checkpointing.has_checkpoint(workdir):  # (else nothing was trained)
    run_record.check_text_encoder(run_record.load(workdir),
                                  encoder.fingerprint, config.text.encoder,
                                  workdir)
  return input_pipeline.create_datasets(config, lambda: encoder)


def restore_or_init(trainer: train_step.ShardedTrainer, manager: Any,
                    inputs: input_pipeline.Datasets, config: ml_collections.ConfigDict
                    ) -> tuple[train_step.TrainState, int, int]:
  """(state, step, first global batch): resume this workdir's run, else
  start from config.train.init_from or from scratch.

  The state restores straight into this run's shardings, whatever mesh or
  process count wrote it; the data resume at the saved global position.
  """
  if manager.latest_step() is not None:
    state, step = checkpointing.restore(manager, trainer.abstract_state())
    start_batch = resume_batch(
        checkpointing.restore_data_position(manager, step), step,
        config.train.batch_size)
    log.info("Resumed from step %d (global batch %d)", step, start_batch)
    return state, step, start_batch
  if config.train.get("init_from"):
    return init_from_pretrained(trainer, config), 0, 0
  text_stats = (inputs.text_stats if config.text.standardize_at_init
                else None)
  return trainer.init_state(jax.random.key(config.seed), text_stats), 0, 0


def data_position(batches_seen: int, global_batch_size: int) -> dict[str, int]:
  return {"examples_seen": batches_seen * global_batch_size,
          "global_batch_size": global_batch_size}


def resume_batch(position: Mapping[str, int] | None, step: int,
                 global_batch_size: int) -> int:
  """The global batch to resume at, for this run's batch size."""
  if position is None:  # written before data positions: one batch per step
    return step
  seen = int(position["examples_seen"])
  if seen % global_batch_size:
    raise checkpointing.CheckpointError(
        f"checkpoint step {step} stopped after {seen} training examples "
        f"(train.batch_size={position['global_batch_size']}), which "
        f"train.batch_size={global_batch_size} does not divide; resume with "
        "a batch size that does")
  return seen // global_batch_size


# A sentence both text encoders embed, to check they are the same encoder.
_TEXT_PROBE = "a person walking on a road at night"


# Fields naming a bundle or workdir whose parameters a run loads.
_PARAM_SOURCES = ("init_from", "reference_from")


def check_param_sources(config: ml_collections.ConfigDict,
                        skip: Sequence[str] = ()) -> None:
  """Fails early (before data or workdir are touched) on a bad init_from or
  reference_from (unless in `skip`), or a reference loss without its
  reference model."""
  weight = config.loss.get("reference", 0.0)
  if weight and not config.train.get("reference_from"):
    raise checkpointing.CheckpointError(
        f"config.loss.reference={weight!r} needs config.train.reference_from "
        "(the bundle or workdir whose clean-input fusion is the target)")
  for field in _PARAM_SOURCES:
    path = config.train.get(field)
    if not path or field in skip:
      continue
    if not Path(path).exists():
      raise checkpointing.CheckpointError(
          f"config.train.{field}={path!r}: no such bundle or workdir")
    if bundle.is_bundle(path):
      saved = bundle.load_config(path)
    else:
      saved = checkpointing.load_saved_config(path)
      steps = Path(path) / checkpointing.CHECKPOINT_DIR
      if not (steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())):
        raise checkpointing.CheckpointError(
            f"config.train.{field}={path!r}: a workdir with no checkpoint "
            f"in {steps}")
    checkpointing.check_compatible(
        saved, config, path,
        remedy=f"config.train.{field} needs the same model config")


def load_source_params(config: ml_collections.ConfigDict, field: str,
                       step: int | None = None) -> tuple[Any, int]:
  """(host params, step) of config.train.<field> (a workdir at `step`, else
  its latest), which must embed text as this run's encoder does (the prompts
  it is given come from this encoder)."""
  path = config.train[field]
  source = inference.Fuser.load(path, step)
  ours = text_encoder.from_config(config.text).encode([_TEXT_PROBE])
  theirs = source.encoder.encode([_TEXT_PROBE])
  if not np.allclose(ours, theirs, atol=1e-4):
    raise checkpointing.CheckpointError(
        f"config.train.{field}={path!r} was trained with another text "
        f"encoder than config.text.encoder={config.text.encoder!r} (they embed"
        " the same sentence differently); use its encoder")
  log.info("config.train.%s: %s (step %d)", field, path, source.step)
  return source.params, source.step


def init_from_pretrained(trainer: train_step.ShardedTrainer,
                         config: ml_collections.ConfigDict
                         ) -> train_step.TrainState:
  """Fine-tuning: the params of config.train.init_from, a fresh optimizer."""
  return trainer.state_from_params(load_source_params(config, "init_from")[0])


# The frozen reference's parameters, copied into the workdir when a run
# starts toward it: resuming never depends on the reference's own folder
# (its run may train on and rotate that step away, or be deleted).
REFERENCE_COPY = "reference_params.safetensors"


def reference_params(trainer: train_step.ShardedTrainer,
                     config: ml_collections.ConfigDict, workdir: Path,
                     resuming: bool
                     ) -> tuple[Any, dict[str, Any] | None, Any]:
  """(params in their shards, record, host params to copy or None) of the
  frozen reference model, or (None, None, None) without `loss.reference`.

  A resumed run keeps the reference it started with, from its workdir's
  copy (checked by fingerprint), so the loss target never moves between
  segments; a changed `train.reference_from` (announced with the other
  changed settings) is loaded afresh and becomes the run's reference."""
  if not config.loss.get("reference", 0.0):
    return None, None, None
  path = str(config.train.reference_from)
  recorded = run_record.load(workdir).get("reference") if resuming else None
  copy = workdir / REFERENCE_COPY
  if recorded and recorded.get("source") == path and copy.is_file():
    _, like = model_lib.abstract_model(config.model)
    params = bundle.load_params(copy, nnx.to_pure_dict(like))
    if bundle.params_fingerprint(params) != recorded.get("fingerprint"):
      raise checkpointing.CheckpointError(
          f"{copy}: not the reference this run trained toward (fingerprint "
          f"{recorded.get('fingerprint')} in run_info.json); restore it, or "
          "train in a fresh --workdir")
    log.info("config.train.reference_from: the copy in %s of %s (step %s), "
             "made when this run started", workdir, path, recorded.get("step"))
    return trainer.place_params(params), recorded, None
  params, step = load_source_params(config, "reference_from")
  record = {"source": path, "step": int(step),
            "fingerprint": bundle.params_fingerprint(params)}
  if (recorded and recorded.get("source") == path and
      record["fingerprint"] != recorded.get("fingerprint")):
    # The copy is gone and the source has trained on: loading it would
    # move the loss target mid-run.
    raise checkpointing.CheckpointError(
        f"{copy}: missing, and {path} now holds step {step}, not the "
        f"reference this run trained toward (step {recorded.get('step')}, "
        f"fingerprint {recorded.get('fingerprint')} in run_info.json); "
        "restore the copy, or train in a fresh --workdir")
  return trainer.place_params(params), record, params


def _to_global_eval(mesh: Any) -> Callable[[Mapping[str, np.ndarray]], Any]:
  """Eval data is identical on every process; each takes its own shards."""
  sharding = sharding_lib.batch_sharding(mesh)

  def put(batch):
    return {k: jax.make_array_from_callback(
        np.shape(v), sharding, lambda index, v=v: np.asarray(v)[index])
            for k, v in batch.items()}

  return put


def _log_scalars(writer: metric_writer.MetricWriter, step: int,
                 metrics: train_step.TrainMetrics, steps_per_sec: float) -> dict:
  scalars = {f"train/{k}": float(v) for k, v in metrics.compute().items()}
  scalars["train/steps_per_sec"] = steps_per_sec
  writer.write_scalars(step, scalars)
  return scalars


def _eval_and_log(evaluator: evaluators.FusionEvaluator,
                  writer: metric_writer.MetricWriter,
                  params: Any, step: int) -> dict:
  result = evaluator.evaluate(params, step)
  scalars = {f"eval/{method}/{k}": v for method in evaluators.METHODS
             for k, v in result[method].items()}
  scalars.update({f"eval/restoration/{k}": v
                  for k, v in result.get("restoration", {}).items()})
  scalars.update({f"eval/{dataset}/{method}/{k}": v
                  for dataset, summary in result.get("per_dataset", {}).items()
                  for method in evaluators.METHODS
                  for k, v in summary[method].items()})
  writer.write_scalars(step, scalars)
  # One entry per sample: eval images may differ in size.
  writer.write_images(step, {f"eval/fused/{i}": image[None]
                             for i, image in enumerate(result["samples"])})
  return result


def stop_at_step(config: ml_collections.ConfigDict, start_step: int) -> int:
  """Where this segment stops: train.num_steps, or earlier with
  train.stop_after_steps (a preemption stand-in: stop as a killed job
  would, after saving)."""
  num_steps = config.train.num_steps
  after = config.train.stop_after_steps
  return min(num_steps, start_step + after) if after else num_steps


def evaluates_in_loop(config: ml_collections.ConfigDict, step: int) -> bool:
  """An evaluation every train.eval_every steps, except at the last step
  when the end evaluation (eval.at_end) follows the loop."""
  every = config.train.eval_every
  at_end = (step == config.train.num_steps and
            config.eval.get("at_end", True))
  return bool(every) and step % every == 0 and not at_end


def _check_finite(loss_and_grad_norm: tuple[Any, Any], step: int,
                  manager: Any, workdir: Path) -> None:
  # One transfer of both scalars (the previous step's: already computed).
  loss, grad_norm = (float(x) for x in jax.device_get(loss_and_grad_norm))
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    what = (f"loss {loss}" if not math.isfinite(loss) else
            f"gradient norm {grad_norm} (loss {loss})")
    latest = manager.latest_step()
    kept = (f"Last good checkpoint: step {latest} in "
            f"{workdir / checkpointing.CHECKPOINT_DIR}" if latest is not None
            else "No checkpoint was saved yet")
    # A rerun replays the same batches to the same failure: name a change.
    raise NonFiniteLossError(
        f"non-finite {what} at step {step}; stopped without applying it. "
        f"{kept}; a rerun replays the same batches, so resume with a lower "
        "--config.optim.learning_rate (or float32 compute, "
        "--config.model.dtype=float32)")


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:300]


def _finish_segment(workdir: Path, info: dict[str, Any],
                    manager: Any, start_step: int, end_step: int | None,
                    seconds: float) -> None:
  """Records the segment's end in run_info.json.

  end_step None: stopped by an error or Ctrl-C, the segment ends where a
  resume starts (its last checkpoint, not the step reached), and failing to
  record it (a full disk fails both) is logged instead of hiding the error.
  """
  if end_step is not None:
    run_record.finish(workdir, info, end_step, seconds)
    return
  end = max(manager.latest_step() or start_step, start_step)
  try:
    run_record.finish(workdir, info, end, seconds)
  except Exception as error:  # pylint: disable=broad-except
    log.warning("Could not record this segment's end (step %d) after the "
                "failure: %s", end, _one_line(error))


def _closer(close: Callable[[], None],
            what: str) -> Callable[..., bool]:
  """An ExitStack exit callback running `close`; after a failure, a failure
  to close (a full disk fails both) is logged rather than hiding the first."""

  def exit_callback(exc_type, exc, traceback) -> bool:
    del exc_type, traceback
    try:
      close()
    except Exception as error:  # pylint: disable=broad-except
      if exc is None:
        raise
      log.warning("Closing %s after the failure failed too: %s", what,
                  _one_line(error))
    return False

  return exit_callback


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible) and evaluates."""
  check_config(config, resuming=checkpointing.has_checkpoint(workdir))
  workdir_path = setup_workdir(config, workdir)
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  log.info("Mesh: %s", dict(mesh.shape))
  check_batch_fits_mesh(config, mesh)
  trainer = train_step.ShardedTrainer(config, mesh)  # checks sharding_rules
  inputs = create_datasets(config, workdir_path)
  manager = checkpointing.make_manager(
      workdir_path, save_interval_steps=config.train.checkpoint_every,
      max_to_keep=config.train.keep_checkpoints)
  # Closed however the run ends (the writer first), so a library caller
  # whose run fails keeps no checkpoint threads or unflushed event files.
  with contextlib.ExitStack() as cleanup:
    cleanup.push(_closer(lambda: checkpointing.close(manager),
                         "the checkpoint manager"))
    state, start_step, batches_seen = restore_or_init(trainer, manager, inputs,
                                                     config)
    reference, reference_record, reference_to_copy = reference_params(
        trainer, config, workdir_path, resuming=start_step > 0)
    train_iter = inputs.train_iter_at(batches_seen)
    # grain's worker processes and their shared memory go with it; left to
    # the garbage collector, a failed run's traceback kept them alive to
    # exit ("leaked shared_memory objects").
    close_train_iter = getattr(train_iter, "close", lambda: None)
    cleanup.push(_closer(close_train_iter, "the input pipeline"))
    batch_size = config.train.batch_size
    writer = metric_writer.MetricWriter(
        workdir_path, start_step,
        replace_evaluation=start_step >= stop_at_step(config, start_step))
    cleanup.push(_closer(writer.close, "the metric writer"))
    preemption = PreemptionNotice()
    cleanup.callback(preemption.close)
    evaluator = evaluators.FusionEvaluator(
        trainer.apply, inputs.eval_batches, _to_global_eval(mesh), workdir_path,
        save_images=config.eval.save_images,
        pad_multiple=config.eval.pad_multiple, row_multiple=mesh.size)
    base_rng = jax.random.key(config.seed + 1)
    num_steps = config.train.num_steps
    stop_at = stop_at_step(config, start_step)

    info = None
    if start_step >= stop_at:  # nothing to train: an evaluation-only run
      info = record_start(config, workdir_path, start_step,
                          inputs.text_encoder_fingerprint, reference_record,
                          reference_to_copy)
    loop_start = time.time()
    with jax.set_mesh(mesh):
      step_fn = None
      pending = None
      last_log_time, last_log_step = time.time(), start_step
      # Compilation and evaluations inside a log window: not training time.
      paused = 0.0
      progress = tqdm(total=num_steps, initial=start_step, unit="step",
                      disable=jax.process_index() != 0, dynamic_ncols=True)
      step = start_step
      last_loss_and_grad_norm = None
      completed = preempted = False
      try:
        while step < stop_at:
          batch = sharding_lib.global_batch(next(train_iter),
                                            trainer.batch_sharding)
          if step_fn is None:
            # Compiled ahead, then all processes start it together.
            compile_start = time.time()
            step_fn = trainer.jitted_train_step.lower(
                state, batch, base_rng, reference).compile()
            distributed.barrier("train_step_compiled")
            paused += time.time() - compile_start
            info = record_start(config, workdir_path, start_step,
                                inputs.text_encoder_fingerprint,
                                reference_record, reference_to_copy)
          state, step_metrics = step_fn(state, batch, base_rng, reference)
          step += 1
          batches_seen += 1
          # Checking the previous step's loss keeps one step in flight.
          if last_loss_and_grad_norm is not None:
            _check_finite(last_loss_and_grad_norm, step - 1, manager,
                          workdir_path)
          last_loss_and_grad_norm = (step_metrics.loss.compute(),
                                     step_metrics.grad_norm.compute())
          pending = (step_metrics if pending is None else
                     pending.merge(step_metrics))
          progress.update(1)
          preempted = preemption.reached(step)
          # The segment's last step too: its loss is checked before the
          # final save and logged, even when a preemption stops it early.
          # And every checkpoint step: a resume from it then logs the same
          # windows as a straight run.
          is_log_step = (step % config.train.log_every == 0 or
                         step == stop_at or manager.should_save(step) or
                         preempted)
          if is_log_step:
            _check_finite(last_loss_and_grad_norm, step, manager, workdir_path)
            now = time.time()
            rate = (step - last_log_step) / max(now - last_log_time - paused,
                                                1e-9)
            scalars = _log_scalars(writer, step, pending, rate)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
            pending, last_log_time, last_log_step = None, now, step
            paused = 0.0
          # Preempted: saved at once (the grace period is short) and
          # awaited below before the segment's end is recorded.
          checkpointing.save(manager, step, state,
                             data_position(batches_seen, batch_size),
                             force=preempted)
          if preempted:
            break
          if evaluates_in_loop(config, step):
            eval_start = time.time()
            _eval_and_log(evaluator, writer, state.params, step)
            paused += time.time() - eval_start
        completed = True
      finally:
        preemption.close()
        progress.close()
        saved = False
        try:
          checkpointing.wait(manager)
          saved = True
        finally:
          if info is not None:
            _finish_segment(workdir_path, info, manager, start_step,
                            step if completed and saved else None,
                            time.time() - loop_start)
      close_train_iter()  # its workers would compete with the evaluation
      if manager.latest_step() != step:
        checkpointing.save(manager, step, state,
                           data_position(batches_seen, batch_size), force=True)
        checkpointing.wait(manager)
      if preempted:
        raise Preempted(
            f"stopped by SIGTERM after step {step} of {num_steps}, saved in "
            f"{workdir_path / checkpointing.CHECKPOINT_DIR}; rerun the same "
            "command to resume")
      if step < num_steps:
        log.warning("Stopped at step %d of %d (train.stop_after_steps)", step,
                    num_steps)
        return {"stopped_at": step}
      if not config.eval.get("at_end", True):
        return {"finished_at": step}
      result = _eval_and_log(evaluator, writer, state.params, step)
  if jax.process_index() == 0:
    print(f"\nEvaluation at step {step} on {result['num_images']} images "
          f"(workdir {workdir_path}/eval/{step}):")
    print(evaluators.comparison_table(result))
    if "restoration" in result:
      print("restoration (synthetic ground truth): " + ", ".join(
          f"{k} {v:.4g}" for k, v in result["restoration"].items()))
  return result
