"""Train steps on 8 fake CPU devices (4x2 data x fsdp mesh) vs one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from textfusion_jax import sharding as sharding_lib
from tests import xla_test_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_run():
  env = dict(os.environ,
             XLA_FLAGS=xla_test_flags.host_devices(8),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-m", "tests.sharded_steps_main"],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_runs_on_4x2_mesh(sharded_run):
  assert sharded_run["devices"] == 8
  assert sharded_run["mesh"] == {"data": 4, "fsdp": 2}


def test_params_and_optimizer_state_are_sharded(sharded_run):
  split, total, local_fraction = sharded_run["params_split"]
  assert split > total // 2, sharded_run["params_split"]
  # FSDP over 2 devices: each holds about half of the parameter bytes (the
  # few replicated leaves are biases and norms).
  assert 0.45 < local_fraction < 0.6, sharded_run["params_split"]
  opt_split, opt_total, opt_local = sharded_run["opt_split"]
  assert opt_split >= 2 * split  # Adam's mu and nu follow the params.
  assert 0.45 < opt_local < 0.6, sharded_run["opt_split"]


def test_batch_is_split_over_data_and_fsdp(sharded_run):
  assert sharded_run["batch_spec"][0] == ["data", "fsdp"]
  assert sharded_run["batch_rows_per_device"] == [1]  # batch 8 on 8 devices


def test_compiled_step_holds_the_fsdp_collectives(sharded_run):
  ops = sharded_run["hlo_ops"]
  assert ops["all-gather"] > 0, ops  # sharded params gathered for compute
  # Gradients summed over the batch axes (scattered to the param shards).
  assert ops["reduce-scatter"] + ops["all-reduce"] > 0, ops
  # One device: no collectives at all.
  assert not any(sharded_run["single_hlo_ops"].values())


def test_training_matches_single_device(sharded_run):
  sharded, single = sharded_run["sharded"], sharded_run["single"]
  assert all(lr > 0 for lr in single["learning_rate"])  # steps from step 1
  # Same data, same init: only the reduction order differs (float32).
  np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=2e-6)
  np.testing.assert_allclose(sharded["grad_norm"], single["grad_norm"],
                             rtol=1e-5)
  # Against how far the parameters moved, not an absolute tolerance. Adam
  # divides each gradient entry by its own running magnitude, so where a
  # gradient is near zero a float32 reordering of its sum moves the update by
  # far more than 1e-5: measured 1.1e-3 of the movement on 2-core AMD EPYC
  # CPUs (earlier CI machines: under 1e-3). A sharding bug (an unsummed or
  # doubled gradient shard, a misplaced update) is of the order of the
  # movement itself.
  assert sharded_run["max_param_movement"] > 1e-3
  assert (sharded_run["max_param_diff"] <
          1e-2 * sharded_run["max_param_movement"]), sharded_run


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match="at most one axis"):
    sharding_lib.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs"):
    sharding_lib.make_mesh({"data": 3, "fsdp": 5})


def test_sharding_rules_override_from_the_command_line():
  """ml_collections overrides tuples, not lists: the default is a tuple."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  # (ml_collections reads the overrides from the process's own argv.)
  parse = ("import sys; from absl import flags; "
           "from ml_collections import config_flags; "
           "config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); "
           "print(flags.FLAGS.config.sharding_rules)")
  out = subprocess.run([sys.executable, "-c", parse, "--config",
                        "configs/tiny.py",
                        "--config.sharding_rules=(('channels_in', 'fsdp'),)"],
                       capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "(('channels_in', 'fsdp'),)"


@pytest.mark.parametrize("rules, message", [
    ([("channel_out", "fsdp")], "'channel_out' is not a parameter axis"),
    ([("channels_out", "fsdb")], "names mesh axis 'fsdb'"),
    (["channels_out"], "is not a pair"),
    ((("channels_out", "fsdp"), ("channels_in", "fsdp")),
     r"axes \('channels_in', 'channels_out'\) would use a mesh axis twice"),
])
def test_mistyped_sharding_rules_are_named(rules, message):
  # A rule that matched nothing used to replicate every parameter silently.
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from textfusion_jax import train_step  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.sharding_rules = rules
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  with pytest.raises(sharding_lib.UserError, match=message):
    train_step.ShardedTrainer(config, mesh)


def test_batches_from_grain_workers_are_not_aliased_by_jax():
  """jax on CPU aliases page-aligned host memory: a batch in grain's shared
  memory stayed alive past grain's cleanup ("leaked shared_memory objects"
  at exit). Such a batch is copied; a plain array is passed as it is."""
  import jax  # pylint: disable=g-import-not-at-top
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  values = np.arange(4096, dtype=np.float32).reshape(8, 512)
  in_shm = shared_memory_array.open_from_shm(
      shared_memory_array.copy_to_shm(values))
  assert isinstance(in_shm, shared_memory_array.SharedMemoryArray)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  batch = sharding_lib.global_batch({"x": in_shm}, sharding)
  np.testing.assert_array_equal(np.asarray(batch["x"]), values)
  assert (batch["x"].addressable_data(0).unsafe_buffer_pointer() !=
          in_shm.ctypes.data)
  del in_shm
