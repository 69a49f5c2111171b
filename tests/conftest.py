"""Shared test setup.

A persistent XLA compilation cache lets the many small train/eval programs
that several tests build compile once per CI run instead of once per test.
"""

import os
import tempfile
from pathlib import Path

import jax
import pytest

from configs import tiny
from tests import xla_test_flags

_CACHE = Path(os.environ.get(
    "TEXTFUSION_TEST_JIT_CACHE",
    Path(tempfile.gettempdir()) / "textfusion_jax_test_jit_cache"))
# Environment variables too, so the CLI subprocesses share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Before any test starts JAX's backend, which reads XLA_FLAGS once.
os.environ["XLA_FLAGS"] = xla_test_flags.flags_for_tests()
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"needs the shared data at {SHARED} (absent outside this "
                "workspace)")
  return SHARED


def pytest_configure(config):
  """Under CI (CI=true) the shared data must be there: no silent skips."""
  del config
  if os.environ.get("CI", "").lower() == "true" and not SHARED.is_dir():
    raise pytest.UsageError(
        f"CI=true but the shared data is missing at {SHARED}; the tests that "
        "need it would be skipped")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
  """A 2-step tiny training run (with its evaluation); tests only read it."""
  from textfusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tiny_run")
  config = tiny.get_config()
  config.train.num_steps = 2
  config.data.eval_size = 2
  config.eval.batch_size = 2
  train_loop.train_and_evaluate(config, str(path))
  return path


# Test files that take minutes (subprocess launches, compiling the train step
# on fake multi-device meshes), slowest first as measured on 2 cores. They are
# collected first so that README's test command (`pytest -n 2 --dist loadfile
# --no-loadscope-reorder`; without that flag xdist starts the files with the
# most tests first, which left these few-test, slowest files for the end)
# starts them first and the short files fill in around them; the order of the
# tests inside each file is unchanged.
_SLOW_FILES_FIRST = ("test_multihost.py", "test_train.py", "test_fuse.py",
                     "test_degradations.py", "test_sharding.py",
                     "test_model.py", "test_benchmarks.py", "test_export.py",
                     "test_streaming.py", "test_metrics.py",
                     "test_embed_captions.py", "test_mixture.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
