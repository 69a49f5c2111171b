"""End-to-end training on the tiny config: outputs, resume, bad input."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from input_pipeline import image_io
from textfusion_jax import checkpointing
from textfusion_jax import evaluators
from textfusion_jax import metrics as metrics_lib
from textfusion_jax import train_loop
from textfusion_jax import train_step
from textfusion_jax import sharding as sharding_lib

ROOT = Path(__file__).resolve().parents[1]


def _params(workdir: Path, config) -> dict:
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  trainer = train_step.ShardedTrainer(config, mesh)
  manager = checkpointing.make_manager(workdir, save_interval_steps=1,
                                       max_to_keep=None, async_save=False)
  state, step = checkpointing.restore(manager, trainer.abstract_state())
  return step, jax.device_get(state.params)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  result = train_loop.train_and_evaluate(tiny.get_config(), str(workdir))
  return workdir, result


def test_outputs_written(full_run):
  workdir, result = full_run
  config = tiny.get_config()
  steps = config.train.num_steps
  metrics_json = json.loads(
      (workdir / "eval" / str(steps) / "metrics.json").read_text())
  for method in evaluators.METHODS:
    assert set(metrics_json[method]) == set(metrics_lib.ALL_METRIC_NAMES)
    assert all(np.isfinite(v) for v in metrics_json[method].values())
  assert set(metrics_json["mean_rank"]) == set(evaluators.METHODS)
  pngs = list((workdir / "eval" / str(steps)).glob("*.png"))
  assert len(pngs) == config.data.eval_size
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  logged = [json.loads(line) for line in lines]
  assert {"train/loss", "train/grad_norm", "train/param_norm"} <= set(
      logged[0])
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  saved = checkpointing.load_saved_config(workdir)
  assert saved.model.dim == config.model.dim
  assert result["num_images"] == config.data.eval_size
  # Synthetic data: restoration errors against the clean scene, per image too.
  assert set(metrics_json["restoration"]) == {"target_L1", "clean_PSNR",
                                              "color_L1"}
  assert len(metrics_json["restoration_per_image"]) == config.data.eval_size


def test_restoration_errors_against_the_clean_scene():
  rng = np.random.default_rng(0)
  clean = rng.uniform(0.2, 0.8, (6, 7, 3))
  clean_u8 = np.rint(clean * 255).astype(np.uint8)
  ir = np.zeros((6, 7, 1))
  exact = evaluators._restoration_errors(clean_u8, ir, clean)
  assert exact["color_L1"] == 0 and exact["clean_PSNR"] > 90
  # A grey shift of 10 levels moves Y by 10 and leaves CbCr unchanged.
  shifted = evaluators._restoration_errors(clean_u8 + 10, ir, clean)
  assert abs(shifted["color_L1"]) < 1e-9
  np.testing.assert_allclose(shifted["target_L1"], 10, atol=0.6)
  # Adding 20 to blue only: Cb moves by 0.5 * 20, Cr by -0.081312 * 20.
  bluer = clean_u8.copy()
  bluer[..., 2] += 20
  np.testing.assert_allclose(
      evaluators._restoration_errors(bluer, ir, clean)["color_L1"],
      (10 + 0.081312 * 20) / 2, rtol=1e-9)


def test_saved_eval_image_of_a_grey_visible_image_is_grey(tmp_path):
  """The text-driven per-channel correction tinted a grey pair's saved
  fusion (its metrics score the luma); `fuse` writes such pairs grey, and
  so does the evaluation now, at the luma it scored. A colour pair keeps
  its colour."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  grey = np.repeat(rng.uniform(0.2, 0.8, (2, 48, 48, 1)), 3, axis=-1)
  colour = rng.uniform(0.2, 0.8, (2, 48, 48, 3))
  tint = jnp.asarray([1.0, 0.9, 0.7])

  def apply_fn(params, vis, ir, text_emb, valid_size):
    del params, ir, text_emb, valid_size
    return vis * tint

  batches = [{"vis": np.stack([grey[0], colour[0]]).astype(np.float32),
              "ir": rng.uniform(0, 1, (2, 48, 48, 1)).astype(np.float32),
              "text_emb": np.zeros((2, 4), np.float32),
              "name": ["grey", "colour"]}]
  evaluator = evaluators.FusionEvaluator(
      apply_fn, lambda: batches, lambda b: jax.tree.map(jnp.asarray, b),
      tmp_path, save_images=2)
  evaluator.evaluate(None, step=1)
  saved = {name: np.asarray(Image.open(tmp_path / "eval" / "1" /
                                       f"{name}.png"))
           for name in ("grey", "colour")}
  tinted = np.rint(np.clip(grey[0] * np.asarray(tint), 0, 1) * 255
                   ).astype(np.uint8)
  expected = image_io.rgb_to_grey_u8(tinted)
  for channel in range(3):
    np.testing.assert_array_equal(saved["grey"][..., channel], expected)
  assert np.abs(saved["colour"][..., 0].astype(int) -
                saved["colour"][..., 2]).max() > 10


def test_trivial_rows_scored_on_same_images(full_run):
  _, result = full_run
  # max(IR, VIS) has at least the mean's dynamic range on every image.
  assert result["rule_max"]["SD"] >= result["rule_mean"]["SD"] - 1e-6
  # A copy is its own source: its half of SSIM and CC is exactly 1.
  assert result["copy_vis"]["CC_vis"] == pytest.approx(1.0, abs=1e-5)
  assert result["copy_ir"]["SSIM_ir"] == pytest.approx(1.0, abs=1e-5)


def _write_folder_dataset(root: Path, names, seed: int) -> Path:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for sub in ("ir", "vi"):
    (root / sub).mkdir(parents=True)
  lines = []
  for i, name in enumerate(names):
    h, w = (48, 64) if i % 2 else (56, 52)
    y, x = np.mgrid[:h, :w]
    base = 120 + 60 * np.sin(x / 5 + i) * np.cos(y / 4)
    ir = np.clip(base + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)
    vis = np.clip(base[..., None] * [1, 0.8, 0.6] +
                  rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(ir).save(root / "ir" / f"{name}.png")
    Image.fromarray(vis).save(root / "vi" / f"{name}.png")
    lines.append(json.dumps({"name": name, "captions": [f"scene {name}"]}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return root


def test_in_training_metrics_equal_the_evaluate_cli(tmp_path):
  """metrics.json rows == `evaluate --baselines` on the PNGs it wrote."""
  from textfusion_jax import score_folders  # pylint: disable=g-import-not-at-top
  train_dir = _write_folder_dataset(tmp_path / "train", "abcdef", 0)
  eval_dir = _write_folder_dataset(tmp_path / "held", ["p", "q", "r"], 1)
  config = tiny.get_config()
  config.data.source = "folder"
  config.data.train_dir = str(train_dir)
  config.data.eval_dir = str(eval_dir)
  config.train.num_steps = 2
  config.eval.batch_size = 1
  config.eval.pad_multiple = 32
  workdir = tmp_path / "run"
  train_loop.train_and_evaluate(config, str(workdir))
  saved = json.loads((workdir / "eval" / "2" / "metrics.json").read_text())
  fused_dir = tmp_path / "model"
  fused_dir.mkdir()
  # In-training names are '<dataset>/<stem>': eval/2/held/p.png.
  for png in (workdir / "eval" / "2").rglob("*.png"):
    (fused_dir / png.name).write_bytes(png.read_bytes())
  cli = score_folders.evaluate_folders(eval_dir / "ir", eval_dir / "vi",
                                  [fused_dir], baselines=True)["methods"]
  assert sorted(cli["model"]["per_image"]) == ["p", "q", "r"]
  for method in evaluators.METHODS:
    for name in metrics_lib.ALL_METRIC_NAMES:
      assert saved[method][name] == pytest.approx(
          cli[method]["mean"][name], rel=2e-5, abs=1e-5), (method, name)
    assert saved["mean_rank"][method] == cli[method]["mean_rank"]


def test_resume_equals_uninterrupted(full_run, tmp_path):
  workdir_full, _ = full_run
  config = tiny.get_config()
  config.train.stop_after_steps = 3
  out = train_loop.train_and_evaluate(config, str(tmp_path))
  assert out == {"stopped_at": 3}
  config.train.stop_after_steps = 0
  train_loop.train_and_evaluate(config, str(tmp_path))
  step_a, params_a = _params(workdir_full, config)
  step_b, params_b = _params(tmp_path, config)
  assert step_a == step_b == config.train.num_steps
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  # A fresh start from step 0 would also end with these parameters; the run
  # record and the logged steps prove the second run began at step 3.
  segments = json.loads((tmp_path / "run_info.json").read_text())["segments"]
  assert [(s["start_step"], s["end_step"]) for s in segments] == [
      (0, 3), (3, config.train.num_steps)]
  def losses(workdir):
    lines = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["train/loss"] for line in lines
            if "train/loss" in line}

  # Step 3, where the first segment stopped, is logged too (as is step 1,
  # orbax's first checkpoint); a restart from 0 would log step 2 twice.
  assert list(losses(tmp_path)) == [1, 2, 3, 4, 6]
  # The same windows as the straight run: checkpoint steps (3) end one
  # (the resumed step 4 averaged step 4 alone, the straight run's 3 and 4).
  assert losses(tmp_path) == pytest.approx(losses(workdir_full), rel=1e-6)


def _tensorboard_purge_steps(logdir: Path) -> list[int]:
  """Steps of the session-start (purge) events in `logdir`'s event files
  (TFRecord framing: length, its CRC, the Event, its CRC)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 16 + length
      if event.HasField("session_log"):
        steps.append(event.step)
  return steps


def test_resume_drops_metric_lines_logged_after_the_checkpoint(tmp_path):
  from textfusion_jax import metric_writer  # pylint: disable=g-import-not-at-top
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                          for s in (2, 4, 6, 8)) + '{"step": 1')  # torn line
  writer = metric_writer.MetricWriter(tmp_path, start_step=4)
  writer.write_scalars(6, {"train/loss": 0.5})
  writer.close()
  logged = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in logged] == [
      (2, 1.0), (4, 1.0), (6, 0.5)]
  # TensorBoard hides the crashed run's points after step 4 too (they
  # stayed beside the new ones).
  assert _tensorboard_purge_steps(tmp_path / "tensorboard") == [5]
  # An evaluation-only rerun at step 6 replaces that step's evaluation, not
  # its training record.
  with open(path, "a", encoding="utf-8") as handle:
    handle.write(json.dumps({"step": 6, "eval/model/EN": 7.0}) + "\n")
  writer = metric_writer.MetricWriter(tmp_path, start_step=6,
                                      replace_evaluation=True)
  writer.write_scalars(6, {"eval/model/EN": 7.5})
  writer.close()
  logged = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r.get("eval/model/EN") for r in logged if r["step"] == 6] == [
      None, 7.5]


def _train_cli(*args, env=None):
  """train.py with configs/tiny.py, unless `args` name another --config."""
  config = [] if "--config" in args else ["--config", "configs/tiny.py"]
  return subprocess.run(
      [sys.executable, "train.py", *config, *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, **(env or {})), check=False)


@pytest.mark.parametrize("arg, expected", [
    ("--config.train.num_stepz=3", "unknown config field "
     "config.train.num_stepz: 'num_stepz' Did you mean"),
    # No near name: the field is still named with its section.
    ("--config.data.foo=1", "unknown config field config.data.foo")])
def test_unknown_config_key_is_one_line(tmp_path, arg, expected):
  out = _train_cli("--workdir", str(tmp_path), arg)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], out.stderr
  assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("args, expect", [
    (("--config.train.log_every=0",), "config.train.log_every=0"),
    (("--config.train.batch_size=-2",), "config.train.batch_size=-2"),
    (("--config.model.dim=7",), "config.model.dim=7"),
    # A None default that the command line can still set.
    (("--config.model.attention_impl=cudnn",),
     "attention_impl='cudnn' needs config.model.dtype='bfloat16'"),
    (("--config", "configs/missing.py"), "--config configs/missing.py"),
    (("--config", "{tmp}/no_get_config.py"), "defines no get_config()"),
    (("--config", "{tmp}/syntax_error.py"), "syntax_error.py:2: "),
    # Passes the config checks, fails reading the data.
    (("--config.data.source=folder", "--config.data.train_dir=/nonexistent"),
     "/nonexistent"),
])
def test_bad_config_values_are_one_line_and_write_nothing(tmp_path, args,
                                                          expect):
  (tmp_path / "no_get_config.py").write_text("NUM_STEPS = 3\n")
  (tmp_path / "syntax_error.py").write_text("\ndef get_config(:\n")
  args = [a.format(tmp=tmp_path) for a in args]
  out = _train_cli("--workdir", str(tmp_path / "run"), *args)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and expect in lines[0], out.stderr[-2000:]
  # No config.json: a corrected command in the same workdir is not refused
  # as "written by an incompatible config".
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("field, value", [("seed", -1),
                                          ("data.crop_size", 0),
                                          ("eval.batch_size", 0),
                                          # orbax would delete every one
                                          ("train.keep_checkpoints", 0)])
def test_config_checks_name_the_field(field, value):
  config = tiny.get_config()
  parent, _, name = ("config." + field).rpartition(".")
  setattr(eval(parent, {"config": config}), name, value)  # pylint: disable=eval-used
  with pytest.raises(train_loop.errors.UserError,
                     match=rf"config.{field}={value}: must be an integer"):
    train_loop.check_config(config)


def test_fusing_from_a_folder_that_is_not_a_run_is_one_line(full_run,
                                                          tmp_path):
  """A Hugging Face folder (a config.json of its own), or a run's config
  without checkpoints: one line, and nothing is created there."""
  from textfusion_jax import inference  # pylint: disable=g-import-not-at-top
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"not a textfusion run's config \(no model, data"):
    inference.Fuser.load(str(hf))
  never = tmp_path / "never"
  never.mkdir()
  (never / "config.json").write_text(
      (full_run[0] / "config.json").read_text())
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no checkpoints/"):
    inference.Fuser.load(str(never))
  assert sorted(p.name for p in never.iterdir()) == ["config.json"]


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  out = _train_cli("--workdir", str(blocker / "sub"))
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "cannot be written" in lines[0], out.stderr


def test_incompatible_checkpoint_is_one_line(full_run):
  workdir, _ = full_run
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  config_before = (workdir / "config.json").read_text()
  for override, expect in (("--config.model.dim=16", "model.dim"),
                           ("--config.text.encoder=openai/clip-vit-base-patch32",
                            "trained with text encoder 'tiny-random'")):
    out = _train_cli("--workdir", str(workdir), override)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], out.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert (workdir / "config.json").read_text() == config_before


def test_non_finite_loss_or_gradient_stops_and_keeps_checkpoint(
    full_run, tmp_path, monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path)
  shutil.copytree(full_run[0], tmp_path)  # trained to step 6
  config = tiny.get_config()
  config.train.num_steps = 8
  # The bad step is the last of a segment that neither logs nor saves on
  # its own: it is still checked before the segment's final save.
  config.train.stop_after_steps = 1
  config.train.log_every = config.train.checkpoint_every = 100

  # A finite loss whose gradient is NaN (an overflow in the backward pass).
  @jax.custom_vjp
  def nan_gradient(x):
    return x

  nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))
  fusion_loss = train_step.losses.fusion_loss
  with monkeypatch.context() as patch:
    patch.setattr(train_step.losses, "fusion_loss",
                  lambda *a, **k: (lambda total, parts: (
                      nan_gradient(total), parts))(*fusion_loss(*a, **k)))
    with pytest.raises(train_loop.NonFiniteLossError,
                       match=r"non-finite gradient norm nan \(loss [0-9.]+\) "
                       r"at step 7"):
      train_loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints" / "7").exists()
    # The step itself skips that update (not only the loop's check).
    mesh = sharding_lib.make_mesh(config.mesh)
    trainer = train_step.ShardedTrainer(config, mesh)
    rng = np.random.default_rng(0)
    size, count = config.data.crop_size, config.train.batch_size
    batch = {"vis": rng.random((count, size, size, 3), np.float32),
             "ir": rng.random((count, size, size, 1), np.float32),
             "text_emb": rng.standard_normal(
                 (count, config.model.text_dim)).astype(np.float32)}
    with jax.set_mesh(mesh):
      state = trainer.init_state(jax.random.key(0))
      before = jax.device_get(state.params)
      state, metrics = trainer.jitted_train_step(
          state, sharding_lib.global_batch(batch, trainer.batch_sharding),
          jax.random.key(1), None)
      logged = metrics.compute()
    assert np.isfinite(float(logged["loss"]))
    assert np.isnan(float(logged["grad_norm"]))
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 before)

  # A NaN loss goes through the same check (a divergent run's, without
  # compiling another one).
  with pytest.raises(train_loop.NonFiniteLossError,
                     match=r"non-finite loss nan at step 7; .* step 6 in .*"
                     r"resume with a lower --config.optim.learning_rate"):
    train_loop._check_finite((float("nan"), 1.0), 7,  # pylint: disable=protected-access
                             checkpointing.make_manager(
                                 tmp_path, save_interval_steps=1,
                                 max_to_keep=None, async_save=False),
                             tmp_path)
  step, params = _params(tmp_path, tiny.get_config())
  assert step == 6
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_logged_param_norm_is_the_saved_checkpoints(full_run):
  import optax  # pylint: disable=g-import-not-at-top
  workdir, _ = full_run
  config = tiny.get_config()
  step, params = _params(workdir, config)
  logged = [json.loads(line) for line in
            (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in logged if "train/param_norm" in r][-1]
  assert last["step"] == step
  np.testing.assert_allclose(last["train/param_norm"],
                             float(optax.tree.norm(params)), rtol=1e-6)


def test_init_from_starts_at_the_source_parameters(full_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  source, _ = full_run
  config = tiny.get_config()
  # A copy, deleted below: a resume no longer reads init_from.
  shutil.copytree(source, tmp_path / "source")
  config.train.init_from = str(tmp_path / "source")
  # Two updates (the first at warmup's learning rate 0), with the source
  # run's schedule, so the compiled step is the one already cached.
  config.train.stop_after_steps = 2
  assert train_loop.train_and_evaluate(config, str(tmp_path / "tuned")) == {
      "stopped_at": 2}
  _, source_params = _params(source, config)
  step, tuned = _params(tmp_path / "tuned", config)
  assert step == 2
  moved = [float(np.max(np.abs(a - b))) for a, b in
           zip(jax.tree.leaves(source_params), jax.tree.leaves(tuned))]
  # A few AdamW steps (~lr each) from the source weights, not from a fresh
  # init (which differs by O(0.1) everywhere).
  assert 0 < max(moved) < 1e-2, max(moved)
  shutil.rmtree(tmp_path / "source")
  with pytest.raises(checkpointing.CheckpointError, match="no such bundle"):
    train_loop.check_config(config)
  train_loop.check_config(config, resuming=checkpointing.has_checkpoint(
      tmp_path / "tuned"))


def test_a_resumed_run_keeps_the_reference_it_started_with(full_run,
                                                           tmp_path):
  """The reference is copied into the workdir when the run starts: a
  resume trains toward that copy even after the reference's own folder
  trained on or was deleted; a damaged copy is refused; a changed
  reference_from becomes the run's reference."""
  # pylint: disable=g-import-not-at-top
  import shutil
  from textfusion_jax import bundle
  from textfusion_jax import inference
  from textfusion_jax import run_record
  source, _ = full_run
  shutil.copytree(source, tmp_path / "source")
  config = tiny.get_config()
  config.loss.reference = 10.0
  config.train.reference_from = str(tmp_path / "source")
  trainer = train_step.ShardedTrainer(
      config, sharding_lib.make_mesh(dict(config.mesh)))
  run = tmp_path / "run"
  run.mkdir()
  _, record, to_copy = train_loop.reference_params(trainer, config, run,
                                                   resuming=False)
  assert record["step"] == 6 and to_copy is not None
  train_loop.record_start(config, run, 0, None, record, to_copy)
  assert run_record.load(run)["reference"] == record
  shutil.rmtree(tmp_path / "source")
  placed, resumed, to_copy = train_loop.reference_params(trainer, config, run,
                                                         resuming=True)
  assert resumed == record and to_copy is None
  assert bundle.params_fingerprint(jax.tree.map(np.asarray, placed)) == (
      bundle.params_fingerprint(inference.Fuser.load(str(source), 6).params))
  bundle.save_params(run / train_loop.REFERENCE_COPY,
                     inference.Fuser.load(str(source), 3).params)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"reference_params.safetensors: not the reference "
                     "this run trained toward"):
    train_loop.reference_params(trainer, config, run, resuming=True)
  config.train.reference_from = str(source)  # changed: loaded afresh
  _, changed, to_copy = train_loop.reference_params(trainer, config, run,
                                                    resuming=True)
  assert changed["source"] == str(source) and to_copy is not None
  # A lost copy, while the reference's own run trained on: the target
  # moved to its newer step without a word.
  trains_on = tmp_path / "trains_on"
  shutil.copytree(source, trains_on)
  shutil.rmtree(trains_on / "checkpoints" / "6")
  config.train.reference_from = str(trains_on)
  run = tmp_path / "run2"
  run.mkdir()
  _, record, to_copy = train_loop.reference_params(trainer, config, run,
                                                   resuming=False)
  assert record["step"] == 3
  train_loop.record_start(config, run, 0, None, record, to_copy)
  shutil.copytree(source / "checkpoints" / "6", trains_on / "checkpoints" / "6")
  (run / train_loop.REFERENCE_COPY).unlink()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"reference_params.safetensors: missing, and .* "
                     r"now holds step 6, not the reference this run trained "
                     r"toward \(step 3"):
    train_loop.reference_params(trainer, config, run, resuming=True)


def test_init_from_errors_are_one_line(full_run, tmp_path):
  source, _ = full_run
  out = _train_cli("--workdir", str(tmp_path / "a"),
                   f"--config.train.init_from={tmp_path / 'missing'}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert "config.train.init_from=" in lines[0] and "missing" in lines[0]
  out = _train_cli("--workdir", str(tmp_path / "b"),
                   f"--config.train.init_from={source}",
                   "--config.model.dim=16")
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert "model.dim" in lines[0] and "init_from" in lines[0]
  # A workdir whose run never checkpointed: refused before anything is read.
  empty = tmp_path / "never_ran"
  empty.mkdir()
  (empty / "config.json").write_text((source / "config.json").read_text())
  out = _train_cli("--workdir", str(tmp_path / "c"),
                   f"--config.train.init_from={empty}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert "no checkpoint" in lines[0] and not (tmp_path / "c").exists()


def test_reference_model_errors_name_the_field(full_run, tmp_path):
  source, _ = full_run
  config = tiny.get_config()
  config.loss.reference = 10.0
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"config.loss.reference=10.0 needs "
                     r"config.train.reference_from"):
    train_loop.check_param_sources(config)
  config.train.reference_from = str(tmp_path / "missing")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"config.train.reference_from=.*missing.*: no such"):
    train_loop.check_param_sources(config)
  config.train.reference_from = str(source)
  config.model.dim = 16
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"model.dim.*reference_from"):
    train_loop.check_param_sources(config)


def test_text_dtype_and_batch_split_are_checked_by_name():
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from textfusion_jax.text import encoder as text_encoder  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.text.dtype = "float16"
  with pytest.raises(train_loop.errors.UserError,
                     match=r"config.text.dtype='float16': must be one of "
                     "float32, bfloat16"):
    text_encoder.from_config(config.text)
  eight = SimpleNamespace(size=8, shape={"data": 4, "fsdp": 2})
  config.train.batch_size = 12
  with pytest.raises(train_loop.errors.UserError,
                     match=r"config.train.batch_size=12 does not split over "
                     r"the mesh's 8 devices"):
    train_loop.check_batch_fits_mesh(config, eight)
  config.train.batch_size = 16
  train_loop.check_batch_fits_mesh(config, eight)


def test_corrupt_run_files_are_one_line(full_run, tmp_path):
  """A cut-short data position or run record names the file; guessing the
  data position would resume at the wrong example."""
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(full_run[0], workdir)
  step = tiny.get_config().train.num_steps
  manager = checkpointing.make_manager(workdir, save_interval_steps=1,
                                       max_to_keep=None, async_save=False)
  assert checkpointing.restore_data_position(manager, step) == {
      "examples_seen": step * 8, "global_batch_size": 8}
  position = workdir / "checkpoints" / str(step) / "data" / "metadata"
  position.write_text(position.read_text()[:10])
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf"{position}: unreadable data position"):
    checkpointing.restore_data_position(manager, step)
  record = workdir / run_record.RUN_INFO
  record.write_text(record.read_text()[:20])
  with pytest.raises(train_loop.errors.UserError,
                     match=rf"{record}: not valid JSON"):
    run_record.load(workdir)
  # Damaged tensor data: one line naming the step, not tensorstore's trace.
  data_files = [p for p in (workdir / "checkpoints" / str(step) /
                            "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[:100])
  trainer = train_step.ShardedTrainer(
      tiny.get_config(), sharding_lib.make_mesh({"data": -1, "fsdp": 1}))
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf"checkpoints/{step}: unreadable \(damaged or "
                     r"cut short\?\); move this step's folder aside"):
    checkpointing.restore(manager, trainer.abstract_state(), step=step)
  manager.close()


def test_a_run_that_fails_before_its_first_step_keeps_the_old_record(
    full_run, tmp_path, monkeypatch):
  """config.json and run_info.json describe the checkpoints until the new
  run's first step has compiled; a changed schedule is announced."""
  import logging  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from textfusion_jax import distributed  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(full_run[0], workdir)
  before = {name: (workdir / name).read_text()
            for name in ("config.json", "run_info.json")}

  def fail_at(name):
    if name == "train_step_compiled":
      raise RuntimeError("out of memory (simulated)")

  monkeypatch.setattr(distributed, "barrier", fail_at)
  # The failed run closes its checkpoint manager and metric writer (it used
  # to leave the manager's threads running in the caller's process).
  from textfusion_jax import metric_writer  # pylint: disable=g-import-not-at-top
  closed = []
  make_manager, close_writer = (checkpointing.make_manager,
                                metric_writer.MetricWriter.close)

  def spied_manager(*args, **kwargs):
    manager = make_manager(*args, **kwargs)
    close_manager = manager.close
    manager.close = lambda: (closed.append("manager"), close_manager())
    return manager

  monkeypatch.setattr(checkpointing, "make_manager", spied_manager)
  create_datasets = train_loop.create_datasets

  def spied_datasets(*args):
    inputs = create_datasets(*args)
    train_iter_at = inputs.train_iter_at

    def spied_iter_at(start):
      train_iter = train_iter_at(start)
      close_iter = train_iter.close
      train_iter.close = lambda: (closed.append("inputs"), close_iter())
      return train_iter

    return dataclasses.replace(inputs, train_iter_at=spied_iter_at)

  monkeypatch.setattr(train_loop, "create_datasets", spied_datasets)
  monkeypatch.setattr(metric_writer.MetricWriter, "close",
                      lambda self: (closed.append("writer"),
                                    close_writer(self)))
  config = tiny.get_config()
  config.train.num_steps += 2
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger(train_loop.__name__).addHandler(handler)
  try:
    with pytest.raises(RuntimeError, match="simulated"):
      train_loop.train_and_evaluate(config, str(workdir))
  finally:
    logging.getLogger(train_loop.__name__).removeHandler(handler)
  assert {name: (workdir / name).read_text() for name in before} == before
  assert any("train.num_steps 6 -> 8" in r.getMessage() for r in records)
  # The input pipeline's too: grain's workers and shared memory were left
  # to the garbage collector ("leaked shared_memory objects" at exit).
  assert closed == ["writer", "inputs", "manager"]


def test_orbax_logs_a_refused_write_in_one_line(tmp_path):
  """Orbax's save threads logged a full disk with a traceback each: on a
  2 MB tmpfs, 340 lines above the one-line error. Other errors, and other
  libraries' records (a device out-of-memory error), keep theirs."""
  import logging  # pylint: disable=g-import-not-at-top
  import sys as system  # pylint: disable=g-import-not-at-top
  checkpointing.make_manager(tmp_path, save_interval_steps=1, max_to_keep=1)
  logger = logging.getLogger("absl")
  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  logger.addHandler(handler)
  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint",
                            "future.py")
  try:
    for error, where in (
        (ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": No '
                    'space left on device\nmore'), orbax_file),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), orbax_file),
        (ValueError("a bug"), orbax_file),
        (ValueError("RESOURCE_EXHAUSTED: Out of memory\nallocations: ..."),
         __file__)):
      try:
        raise error
      except Exception:  # pylint: disable=broad-except
        logger.handle(logger.makeRecord("absl", logging.ERROR, where, 1,
                                        "Save thread %s failed", ("t",),
                                        system.exc_info()))
  finally:
    logger.removeHandler(handler)
  full, quota, bug, other = seen
  assert full.getMessage() == ('Save thread t failed: RESOURCE_EXHAUSTED: '
                               'Error writing local file "x": No space left '
                               'on device')
  assert not full.exc_info and not full.exc_text
  assert quota.getMessage().endswith("Disk quota exceeded")
  assert not quota.exc_info
  assert bug.exc_info and bug.getMessage() == "Save thread t failed"
  assert other.exc_info and other.getMessage() == "Save thread t failed"


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_saved_steps(
    full_run, tmp_path, monkeypatch):
  """Tensorstore reports a full disk as ValueError('RESOURCE_EXHAUSTED: ...')
  (an OSError from orbax's own metadata writes): either is one line naming
  the checkpoint folder and the intact steps, and a failing run_info.json
  write or writer close after it does not hide it. (Measured on a 3 MB
  tmpfs: rc 2, this line, and a rerun with space resumes from step 2.)"""
  import errno  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from input_pipeline import files  # pylint: disable=g-import-not-at-top
  from textfusion_jax import metric_writer  # pylint: disable=g-import-not-at-top
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(full_run[0], workdir)
  steps = tiny.get_config().train.num_steps
  record = (workdir / run_record.RUN_INFO).read_text()
  config = tiny.get_config()
  config.train.num_steps = steps + 2
  config.train.checkpoint_every = 1
  save = ocp.CheckpointManager.save

  def full_disk_save(self, step, *args, **kwargs):
    if step == steps + 2:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": '
                       "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_save)
  finish = run_record.finish

  def finish_on_a_full_disk(workdir, info, end, seconds):
    del seconds
    finished.append(end)
    with files.atomic_path(Path(workdir) / run_record.RUN_INFO) as tmp:
      tmp.write_text("{")
      raise OSError(errno.ENOSPC, "No space left on device")

  finished = []
  monkeypatch.setattr(run_record, "finish", finish_on_a_full_disk)
  monkeypatch.setattr(metric_writer.MetricWriter, "close", lambda self: (
      _ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
  with pytest.raises(checkpointing.CheckpointError) as failure:
    train_loop.train_and_evaluate(config, str(workdir))
  message = str(failure.value)
  assert message.startswith(
      f"{workdir}/checkpoints: writing a checkpoint failed (no space left on "
      "the device or quota exceeded, RESOURCE_EXHAUSTED); the steps saved "
      "before (")
  assert message.endswith(
      f"{steps}, {steps + 1}) are intact: free space (or fix the folder's "
      "permissions) and rerun to resume")
  assert failure.value.exit_now  # no shutdown tracebacks after the line
  # The segment ends at its last checkpoint; recording that failed on the
  # full disk, so run_info.json keeps the segment's (complete) start record.
  assert finished == [steps + 1]
  segments = json.loads((workdir / run_record.RUN_INFO).read_text())[
      "segments"]
  assert len(segments) == len(json.loads(record)["segments"]) + 1
  assert segments[-1]["start_step"] == segments[-1]["end_step"] == steps
  monkeypatch.setattr(run_record, "finish", finish)
  manager = checkpointing.make_manager(workdir, save_interval_steps=1,
                                       max_to_keep=None)
  assert manager.latest_step() == steps + 1
  # orbax's OSError (no file name) from a wait: the same line.
  manager.wait_until_finished = lambda: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, "No space left on device"))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoints: writing a checkpoint failed \(No "
                     r"space left on device\); the steps saved before "):
    checkpointing.wait(manager)
  manager.wait_until_finished = lambda: (_ for _ in ()).throw(
      ValueError("INVALID_ARGUMENT: a bug, not the machine"))
  with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
    checkpointing.wait(manager)
  del manager.wait_until_finished
  manager.close()


def test_an_atomic_write_on_a_full_disk_names_the_file(tmp_path):
  import errno  # pylint: disable=g-import-not-at-top
  from input_pipeline import files  # pylint: disable=g-import-not-at-top
  path = tmp_path / "run_info.json"
  path.write_text("old")
  with pytest.raises(OSError) as failure:
    with files.atomic_path(path) as tmp:
      tmp.write_text("half")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert failure.value.filename == str(path)
  assert failure.value.errno == errno.ENOSPC
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]


def test_eval_every_includes_the_last_step_without_an_end_evaluation():
  config = tiny.get_config()
  config.train.num_steps, config.train.eval_every = 6, 2
  due = lambda: [s for s in range(1, 7)
                 if train_loop.evaluates_in_loop(config, s)]
  assert due() == [2, 4]  # step 6: the end evaluation follows the loop
  config.eval.at_end = False
  assert due() == [2, 4, 6]
  config.train.eval_every = 0
  assert not due()


@pytest.mark.parametrize("field, value", [
    ("optim.learning_rate", -1.0), ("optim.learning_rate", float("nan")),
    ("optim.b2", 1.0), ("optim.grad_clip_norm", 0.0),
    ("optim.warmup_steps", -5), ("eval.max_images", -1),
    ("eval.pad_multiple", -4), ("eval.save_images", -1),
    # A negative loss weight would maximise its term; NaN surfaced only as
    # a non-finite loss after compilation.
    ("loss.ssim", -1.0), ("loss.intensity", float("nan")),
    ("loss.gradient", float("inf")),
    # These were tracebacks from numpy or grain.
    ("data.train_size", 0), ("data.prefetch_buffer_size", -1),
    ("data.worker_count", -1)])
def test_optimizer_and_eval_values_are_checked_by_name(field, value):
  config = tiny.get_config()
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(train_loop.errors.UserError,
                     match=rf"config.{field}={value!r}: must be"):
    train_loop.check_config(config)


def test_settings_that_would_do_nothing_are_refused_or_warned(caplog):
  config = tiny.get_config()
  config.optim.warmup_steps = 7  # of 6 steps: never at peak, never decays
  with caplog.at_level("WARNING"):
    train_loop.check_config(config)  # a smoke run of a long config: allowed
  assert any("config.optim.warmup_steps=7 is more than "
             "config.train.num_steps=6" in r.getMessage()
             for r in caplog.records)
  config.optim.warmup_steps = 6
  config.data.shuffle_captions_across_pairs = True
  config.data.eval_size = 1  # the derangement failed after training
  with pytest.raises(train_loop.errors.UserError,
                     match=r"config.data.eval_size=1: shuffling captions "
                     "across pairs needs at least 2"):
    train_loop.check_config(config)
  config.data.eval_size = 2
  train_loop.check_config(config)
  config.data.degradations.enabled = True  # prompts: condition sentences
  with pytest.raises(train_loop.errors.UserError,
                     match=r"shuffle_captions_across_pairs has no effect "
                     r"with config.data.degradations.enabled"):
    train_loop.check_config(config)


def test_a_text_dtype_change_on_resume_is_announced():
  import ml_collections  # pylint: disable=g-import-not-at-top
  saved = ml_collections.ConfigDict(json.loads(
      checkpointing.config_to_json(tiny.get_config())))
  current = tiny.get_config()
  current.text.dtype = "bfloat16"
  assert checkpointing.changed_training_fields(saved, current) == [
      "text.dtype 'float32' -> 'bfloat16'"]


def test_a_field_added_since_a_run_was_saved_is_no_change_at_its_default():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  saved = ml_collections.ConfigDict(json.loads(
      checkpointing.config_to_json(tiny.get_config())))
  del saved.data.degradations["renamed_kinds"]  # as a run saved before it
  current = tiny.get_config()
  assert checkpointing.changed_training_fields(
      saved, current, default.get_config()) == []
  # Without the defaults (and with another value) it is a change.
  assert checkpointing.changed_training_fields(saved, current) == [
      "data.degradations.renamed_kinds None -> ['underexposed', 'hazy']"]
  current.data.degradations.renamed_kinds = ("noisy",)
  assert checkpointing.changed_training_fields(
      saved, current, default.get_config()) == [
          "data.degradations.renamed_kinds ['underexposed', 'hazy'] -> "
          "['noisy']"]


@pytest.mark.parametrize("field, value, expect", [
    ("ffn", "foo", "config.model.ffn='foo': must be one of"),
    ("input_stride", 0, "config.model.input_stride=0: must be a whole"),
    ("dim", 0, "config.model.dim=0: must be a whole number >= 2"),
    ("heads", (0, 2), r"config.model.heads=\(0, 2\): each must be a whole"),
    ("ffn_expansion", 0.0, "config.model.ffn_expansion=0.0: must be > 0"),
    ("text_hidden", 0, "config.model.text_hidden=0: must be a whole"),
    ("max_kv_tokens", -4, "config.model.max_kv_tokens=-4: must be a whole"),
    # m >= 1 would let the visible gain m + (1 - m) exp(gamma) go negative.
    ("text_vis_min_gain", 1.5, "config.model.text_vis_min_gain=1.5: must be"),
    ("attention_impl", "flash", "config.model.attention_impl='flash': must"),
    ("attention_impl", "cudnn", "needs config.model.dtype='bfloat16'")])
def test_model_values_are_checked_by_name(field, value, expect):
  """Each used to surface as a ZeroDivisionError, a ValueError deep in a
  layer, a bad forward pass or (min gain) a silently inverted image."""
  config = tiny.get_config()
  config.model[field] = value
  with pytest.raises(train_loop.errors.UserError, match=expect):
    train_loop.check_config(config)


def test_a_non_bool_remat_read_back_from_json_is_one_line():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  # As a hand-edited config.json reads back ("false" would count as True).
  config.model = ml_collections.ConfigDict(
      {**config.model.to_dict(), "remat": "false"})
  with pytest.raises(train_loop.errors.UserError,
                     match="config.model.remat='false': must be True or "
                     "False"):
    train_loop.check_config(config)


def test_cudnn_attention_needs_a_gpu_to_train_but_its_model_fuses_anywhere():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from textfusion_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.attention_impl = "cudnn"
  config.model.dtype = "bfloat16"
  if jax.default_backend() == "gpu":
    pytest.skip("checks the non-GPU path")
  with pytest.raises(train_loop.errors.UserError,
                     match=r"attention_impl='cudnn' needs a GPU; this run's "
                     "backend is 'cpu'"):
    train_loop.check_config(config)
  net = model_lib.FusionNet(config.model, rngs=nnx.Rngs(0))
  out = net(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 1)),
            jnp.zeros((1, config.model.text_dim)))
  assert out.shape == (1, 32, 32, 3)


def test_compute_settings_may_change_on_resume_and_are_announced():
  """dtype, attention kernel, K/V pooling and remat leave the parameters as
  they are: a float32 run may go on in bfloat16 (it was refused as an
  incompatible config)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  # As a workdir's config.json reads back.
  saved = ml_collections.ConfigDict(json.loads(
      checkpointing.config_to_json(tiny.get_config())))
  current = tiny.get_config()
  current.model.dtype = "bfloat16"
  current.model.max_kv_tokens = 0
  # Rematerialisation changes only memory and speed: not even announced.
  current.model.remat = True
  checkpointing.check_compatible(saved, current, "w")
  assert checkpointing.changed_training_fields(saved, current) == [
      "model.dtype 'float32' -> 'bfloat16'", "model.max_kv_tokens 256 -> 0"]
  # A workdir written before model.remat existed.
  del saved.model["remat"]
  checkpointing.check_compatible(saved, current, "w")
  current.model.dim = 16
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"model.dim: checkpoint 8 != config 16"):
    checkpointing.check_compatible(saved, current, "w")


def test_mesh_axis_sizes_below_one_are_one_line():
  from textfusion_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  for shape in ({"data": 0, "fsdp": -1}, {"data": -1, "fsdp": 0}):
    with pytest.raises(train_loop.errors.UserError,
                       match=r"each axis size must be >= 1 or -1"):
      sharding_lib.make_mesh(shape)


def test_a_workdir_whose_run_saved_no_checkpoint_starts_afresh(tmp_path):
  """A run that failed at its first step left config.json and run_info.json
  but no checkpoint: a new run there is not held to that config, and its
  record names its own data and text encoder."""
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  failed = tiny.get_config()
  failed.model.dim = 16
  train_loop.record_start(failed, tmp_path, 0, "an-encoder-fingerprint")
  (tmp_path / "checkpoints").mkdir()
  config = tiny.get_config()
  assert train_loop.setup_workdir(config, str(tmp_path)) == tmp_path
  train_loop.record_start(config, tmp_path, 0, None)
  info = run_record.load(tmp_path)
  assert "text_encoder" not in info  # not the failed run's encoder
  assert info["data"] == run_record.data_fingerprint(config)
  assert len(info["segments"]) == 2
  assert checkpointing.load_saved_config(tmp_path).model.dim == 8
  # Once a step is saved, the config is held again.
  (tmp_path / "checkpoints" / "3").mkdir()
  with pytest.raises(checkpointing.CheckpointError, match=r"model.dim"):
    train_loop.setup_workdir(failed, str(tmp_path))


def test_a_bundle_or_clip_folder_given_as_workdir_is_refused(tmp_path,
                                                             monkeypatch):
  """Training into a bundle overwrote its config.json (the bundle then
  failed its manifest check); into a CLIP folder, the CLIP's config.json."""
  from textfusion_jax.text import tiny_clip  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  fake_bundle = tmp_path / "bundle"
  fake_bundle.mkdir()
  (fake_bundle / "manifest.json").write_text("{}")
  with pytest.raises(train_loop.errors.UserError,
                     match=rf"--workdir {fake_bundle} holds a manifest.json "
                     r"\(a model bundle or caption store\)"):
    train_loop.setup_workdir(config, str(fake_bundle))
  # A bucket URL became a local folder 'gs:' (each host its own).
  monkeypatch.chdir(tmp_path)
  with pytest.raises(train_loop.errors.UserError,
                     match=r"--workdir gs://b/run: URLs are not supported; "
                     "mount the bucket"):
    train_loop.setup_workdir(config, "gs://b/run")
  assert not (tmp_path / "gs:").exists()
  clip = tiny_clip.save_tiny_random_clip(tmp_path / "clip")
  before = (clip / "config.json").read_text()
  with pytest.raises(checkpointing.CheckpointError,
                     match="not a textfusion run's config"):
    train_loop.setup_workdir(config, str(clip))
  assert (clip / "config.json").read_text() == before


def test_an_interrupted_segment_ends_at_its_last_checkpoint(tmp_path,
                                                            monkeypatch):
  """run_info.json's segment ends where a resume starts (step 3's
  checkpoint), not at the step reached when Ctrl-C came (4)."""
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  log_scalars = train_loop._log_scalars  # pylint: disable=protected-access

  def interrupt_at_4(writer, step, *args):
    if step == 4:
      raise KeyboardInterrupt
    return log_scalars(writer, step, *args)

  monkeypatch.setattr(train_loop, "_log_scalars", interrupt_at_4)
  with pytest.raises(KeyboardInterrupt):
    train_loop.train_and_evaluate(tiny.get_config(), str(tmp_path))
  segment = run_record.load(tmp_path)["segments"][-1]
  assert (segment["start_step"], segment["end_step"]) == (0, 3)
  assert checkpointing.has_checkpoint(tmp_path)


def test_sigterm_saves_and_stops_and_the_run_resumes_exactly(full_run,
                                                             tmp_path,
                                                             monkeypatch):
  """SIGTERM (a scheduler's preemption notice) killed the run where it
  stood: up to checkpoint_every steps lost, a stray temporary checkpoint,
  and a segment on record as 'evaluation only'. Now the step in flight
  finishes, is saved, and the run stops with status 143."""
  import signal  # pylint: disable=g-import-not-at-top
  from textfusion_jax import run_record  # pylint: disable=g-import-not-at-top
  log_scalars = train_loop._log_scalars  # pylint: disable=protected-access

  def sigterm_at_4(writer, step, *args):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return log_scalars(writer, step, *args)

  before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(train_loop, "_log_scalars", sigterm_at_4)
  finish_segment = train_loop._finish_segment  # pylint: disable=protected-access
  saved_when_recorded = []

  def finish_after_the_save(workdir, info, manager, start, end, seconds):
    # The save came after the record: a kill in between (the grace period
    # running out) left a segment ending at a step never saved.
    saved_when_recorded.append((end, (workdir / "checkpoints" / str(end)
                                      ).is_dir()))
    return finish_segment(workdir, info, manager, start, end, seconds)

  monkeypatch.setattr(train_loop, "_finish_segment", finish_after_the_save)
  with pytest.raises(train_loop.Preempted,
                     match=r"stopped by SIGTERM after step 5 of 6, saved in "
                     r".*checkpoints; rerun the same command to resume") as e:
    train_loop.train_and_evaluate(tiny.get_config(), str(tmp_path))
  assert e.value.status == 143
  assert saved_when_recorded == [(5, True)]
  assert signal.getsignal(signal.SIGTERM) == before
  segment = run_record.load(tmp_path)["segments"][-1]
  assert (segment["start_step"], segment["end_step"]) == (0, 5)
  assert 5 in checkpointing.make_manager(
      tmp_path, save_interval_steps=1, max_to_keep=None,
      create=False).all_steps()
  monkeypatch.setattr(train_loop, "_log_scalars", log_scalars)
  config = tiny.get_config()
  config.eval.at_end = False
  train_loop.train_and_evaluate(config, str(tmp_path))
  for a, b in zip(jax.tree.leaves(_params(full_run[0], config)[1]),
                  jax.tree.leaves(_params(tmp_path, config)[1])):
    np.testing.assert_array_equal(a, b)


def test_a_killed_segment_and_changed_data_are_on_the_model_card(tmp_path):
  """A segment killed without a word (SIGKILL) was carded 'evaluation only'
  and its steps left out; a resume on other data kept the first data's
  fingerprint, so the card contradicted the bundle's config."""
  # pylint: disable=g-import-not-at-top
  from textfusion_jax import run_bundle
  from textfusion_jax import run_record
  config = tiny.get_config()
  run_record.start(tmp_path, config, 0)  # killed: never finished
  first_data = run_record.load(tmp_path)["data"]
  info = run_record.start(tmp_path, config, 3)  # resumes from step 3
  run_record.finish(tmp_path, info, 6, 1.0)
  config.data.train_size = 32
  info = run_record.start(tmp_path, config, 6)
  run_record.finish(tmp_path, info, 8, 1.0)
  config.data.train_size = 64  # failed before a step: never trained on
  info = run_record.start(tmp_path, config, 8)
  run_record.finish(tmp_path, info, 8, 0.0)
  config.data.train_size = 32
  run_record.start(tmp_path, config, 8)  # killed before its first save
  info = run_record.start(tmp_path, config, 8)
  run_record.finish(tmp_path, info, 9, 1.0)
  info = run_record.load(tmp_path)
  first, second, third, failed, killed, last = info["segments"]
  assert (first["end_step"], first["interrupted"]) == (3, True)
  assert "running" not in first and "data" not in second
  assert info["data"] == first_data
  assert third["data"] == run_record.data_fingerprint(config) != first_data
  assert "data" in failed and "data" not in killed and "data" not in last
  assert killed["interrupted"] and killed["end_step"] == 8
  card = run_bundle.model_card(config, info, 9, "")
  assert "# steps 0-3 (killed: time not recorded)" in card
  assert "# killed before its first checkpoint" in card
  assert card.count("- Data from step") == 1
  assert (f"- Data from step 6: source `synthetic`, "
          f"{third['data'].get('files', 0)} files, sha256 "
          f"`{third['data']['sha256']}`") in card



def test_a_second_sigterm_ends_a_stuck_run():
  """The first SIGTERM waits for the step in flight; a run stuck before it
  (a hung input pipeline) is ended by the second, as by SIGTERM before."""
  import signal  # pylint: disable=g-import-not-at-top
  code = ("import os, signal, time\n"
          "from textfusion_jax import train_loop\n"
          "notice = train_loop.PreemptionNotice()\n"
          "os.kill(os.getpid(), signal.SIGTERM)\n"
          "assert notice.reached(1)\n"
          "print('first heard', flush=True)\n"
          "os.kill(os.getpid(), signal.SIGTERM)\n"
          "time.sleep(30)\n"
          "print('survived')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == -signal.SIGTERM, out.stderr[-2000:]
  assert out.stdout == "first heard\n"
