"""Multi-process training on loopback, and restoring onto other meshes.

Each job runs `train.py` in subprocesses whose fake CPU device count is set
through XLA_FLAGS before JAX starts:

  two_process   2 processes x 4 devices, mesh data=4 x fsdp=2, 4 steps
  resumed       step 2 of two_process, continued by 1 process on 2 devices
                (data=2, fsdp=1) to step 4

From the same step-2 state, the one-process continuation must reproduce the
two-process run's steps 3 and 4: the same examples (step 3's loss) and the
same globally summed gradient (step 4's loss and the step-4 parameters).
A process that trained on its local gradient, or on the other process's
examples, moves the parameters by the order of a whole update.

Every launch has a deadline; on failure or timeout all its processes are
killed, so a stuck coordinator cannot hang the suite.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from textfusion_jax import checkpointing
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import train_step
from tests import xla_test_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# Each launch compiles the tiny train step for its mesh; on a loaded 2-core
# CI machine the 2-process launch has taken over 420 s.
_TIMEOUT_S = 900
_OVERRIDES = (f"--config.train.num_steps={STEPS}",
              "--config.train.checkpoint_every=2",
              "--config.train.keep_checkpoints=5",
              "--config.train.log_every=1")


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
              XLA_FLAGS=xla_test_flags.host_devices(devices))


def launch(commands: list[list[str]], devices: int,
           timeout_s: float = _TIMEOUT_S) -> list[str]:
  """Runs the commands together; all are killed if one fails or time runs
  out. Returns their stdouts."""
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
           for cmd in commands]
  deadline = time.monotonic() + timeout_s
  outputs = [None] * len(procs)
  try:
    while any(o is None for o in outputs):
      for i, proc in enumerate(procs):
        if outputs[i] is None and proc.poll() is not None:
          outputs[i] = proc.communicate()
          if proc.returncode != 0:
            raise AssertionError(f"process {i} of {commands[i]} failed "
                                 f"(rc {proc.returncode}):\n"
                                 f"{outputs[i][1][-3000:]}")
      if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout_s} s: {commands}")
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return [out for out, _ in outputs]


def _train(workdir: Path, mesh: tuple[int, int], *extra: str) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/tiny.py",
          "--workdir", str(workdir), f"--config.mesh.data={mesh[0]}",
          f"--config.mesh.fsdp={mesh[1]}", *_OVERRIDES, *extra]


def _job(workdir: Path, processes: int, mesh: tuple[int, int],
         *extra: str) -> list[list[str]]:
  if processes == 1:
    return [_train(workdir, mesh, *extra)]
  address = f"127.0.0.1:{_free_port()}"
  return [_train(workdir, mesh, "--coordinator_address", address,
                 "--num_processes", str(processes), "--process_id", str(i),
                 "--initialization_timeout", "120")
          for i in range(processes)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  # Eval batches of 3 rows on 8 devices: each is padded to 8 rows.
  launch(_job(root / "two_process", 2, (4, 2), "--config.eval.batch_size=3"),
         devices=4)
  # The continuation skips the final evaluation (the 2-process job's is the
  # one tested).
  no_eval = "--config.eval.at_end=False"
  # Resume the 2-process job's step-2 checkpoint on 1 process, 2 devices.
  shutil.copytree(root / "two_process", root / "resumed")
  shutil.rmtree(root / "resumed" / "checkpoints" / str(STEPS))
  (root / "resumed" / "metrics.jsonl").unlink()
  launch(_job(root / "resumed", 1, (2, 1), no_eval), devices=2)
  return root


def _params(workdir: Path, step: int = STEPS) -> list[np.ndarray]:
  """Restored onto this process's own (1-device) mesh."""
  config = tiny.get_config()
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  trainer = train_step.ShardedTrainer(config, mesh)
  manager = checkpointing.make_manager(workdir, save_interval_steps=1,
                                       max_to_keep=None, async_save=False)
  state, restored = checkpointing.restore(manager, trainer.abstract_state(),
                                          step=step)
  assert restored == step
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _train_log(workdir: Path) -> dict[int, dict]:
  lines = [json.loads(line) for line in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  return {line["step"]: line for line in lines if "train/loss" in line}


def test_one_process_continues_the_two_process_run_exactly(jobs):
  two, resumed = _train_log(jobs / "two_process"), _train_log(
      jobs / "resumed")
  assert sorted(two) == list(range(1, STEPS + 1))
  assert sorted(resumed) == [3, 4]  # started at the saved step, not at 0
  for step in (3, 4):
    # Same state and data position; only the mesh and the reduction order
    # differ.
    assert resumed[step]["train/loss"] == pytest.approx(
        two[step]["train/loss"], rel=1e-4)
  # A data stream restarted at batch 0 would have given step 1's loss.
  assert resumed[3]["train/loss"] != pytest.approx(two[1]["train/loss"],
                                                   rel=1e-4)
  start = _params(jobs / "two_process", step=2)
  ended_two = _params(jobs / "two_process")
  ended_one = _params(jobs / "resumed")
  assert len(ended_two) == len(ended_one) == len(start)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(ended_two, start))
  differ = max(float(np.max(np.abs(a - b)))
               for a, b in zip(ended_two, ended_one))
  # Adam divides by each entry's running magnitude, so a reordered float32
  # sum moves near-zero-gradient entries by ~1e-3 of the movement (see
  # test_sharding); a wrong gradient moves them by its order.
  assert moved > 1e-4, moved
  assert differ < 1e-2 * moved, (differ, moved)


def test_only_process_zero_writes_outputs(jobs):
  workdir = jobs / "two_process"
  segments = json.loads((workdir / "run_info.json").read_text())["segments"]
  assert len(segments) == 1  # one writer, not one per process
  assert len(_train_log(workdir)) == STEPS  # each step logged once
  result = json.loads(
      (workdir / "eval" / str(STEPS) / "metrics.json").read_text())
  # Every image of the tiny eval set once; no padded row scored.
  assert result["num_images"] == len(result["per_image"]) == 8
  assert len(list((workdir / "eval" / str(STEPS)).glob("*.png"))) == 8
  steps = {int(p.name) for p in (workdir / "checkpoints").iterdir()
           if p.name.isdigit()}
  assert {2, STEPS} <= steps  # (orbax also keeps the first step it sees)


def test_resume_records_its_segment(jobs):
  segments = json.loads(
      (jobs / "resumed" / "run_info.json").read_text())["segments"]
  assert [(s["start_step"], s["end_step"]) for s in segments][-1] == (2, STEPS)


def test_processes_see_disjoint_examples_covering_the_epoch():
  config = tiny.get_config()
  batches = config.data.train_size // config.train.batch_size  # one epoch
  address = f"127.0.0.1:{_free_port()}"
  outs = launch([[sys.executable, "-m", "tests.multihost_data_main", address,
                  "2", str(i), str(batches)] for i in range(2)], devices=4,
                timeout_s=180)
  seen = {}
  for out in outs:
    result = json.loads(out.strip().splitlines()[-1])
    seen[result["process"]] = result["record_index"]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(config.data.train_size))


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"], "also needs --coordinator_address"),
    (["--coordinator_address", "127.0.0.1:1", "--num_processes", "2",
      "--process_id", "2"], "--process_id=2 is out of range"),
    (["--coordinator_address", "127.0.0.1", "--num_processes", "2",
      "--process_id", "1"], "expected HOST:PORT"),
    (["--multihost", "--process_id", "0"], "drop --multihost"),
    (["--config.mesh.data=3"], "needs 3 devices, have 1"),
    (["--multihost"], "detected no multi-process job"),
])
def test_bad_job_flags_are_one_line(tmp_path, flags, message):
  out = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py",
       "--workdir", str(tmp_path / "w"), *flags], cwd=ROOT, env=_env(1),
      capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize("process_id,expected", [
    # A worker whose coordinator never starts.
    ("1", "cannot reach the coordinator"),
    # Process 0 whose workers never join: JAX would abort it with a fatal
    # C++ error (SIGABRT, a stack dump) at its deadline.
    ("0", "the job's 2 processes (coordinator 127.0.0.1:"),
])
def test_a_job_that_never_forms_fails_within_the_timeout(tmp_path, process_id,
                                                         expected):
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py",
       "--workdir", str(tmp_path / "w"), "--coordinator_address",
       f"127.0.0.1:{_free_port()}", "--num_processes", "2", "--process_id",
       process_id, "--initialization_timeout", "3"], cwd=ROOT, env=_env(1),
      capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
  assert time.monotonic() - start < 60
  assert not (tmp_path / "w").exists()


def test_sigterm_to_one_process_stops_the_whole_job_at_one_saved_step(
    tmp_path):
  """A pod scheduler may notify a single host: every process must stop
  after the same step (JAX's preemption sync point), save it, and exit with
  status 143, not hang in a collective or stop one step apart."""
  workdir = tmp_path / "w"
  # Later overrides win over _OVERRIDES' 4 steps and checkpoints every 2.
  commands = [cmd + ["--config.train.num_steps=1000",
                     "--config.train.checkpoint_every=1000",
                     "--config.eval.at_end=False"]
              for cmd in _job(workdir, 2, (2, 2))]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
           for cmd in commands]
  try:
    deadline = time.monotonic() + _TIMEOUT_S
    metrics = workdir / "metrics.jsonl"
    # Training is under way once steps 1 and 2 are logged.
    while not (metrics.is_file() and
               len(metrics.read_text().splitlines()) >= 2):
      assert all(p.poll() is None for p in procs), procs[0].communicate()[1]
      assert time.monotonic() < deadline, "the job never trained"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=120)[1] for p in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  assert [p.returncode for p in procs] == [143, 143], errors[1][-3000:]
  stopped = [re.search(r"stopped by SIGTERM after step (\d+) of 1000",
                       err) for err in errors]
  assert all(stopped), errors
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step
  assert (workdir / "checkpoints" / str(step)).is_dir()
  segment = json.loads((workdir / "run_info.json").read_text())["segments"][-1]
  assert (segment["start_step"], segment["end_step"]) == (0, step)
