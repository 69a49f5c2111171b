"""Runs tiny-preset train steps on a 4x2 mesh and on one device; prints JSON.

Executed by tests/test_sharding.py in a subprocess, because the 8 fake CPU
devices must be requested (XLA_FLAGS) before JAX initialises.
"""

import json
import sys

import jax
import numpy as np

from configs import tiny
from textfusion_jax import sharding as sharding_lib
from textfusion_jax import train_step


def _batches(config, count):
  rng = np.random.default_rng(0)
  size, batch = config.data.crop_size, config.train.batch_size
  for _ in range(count):
    yield {"vis": rng.random((batch, size, size, 3), np.float32),
           "ir": rng.random((batch, size, size, 1), np.float32),
           "text_emb": rng.standard_normal(
               (batch, config.model.text_dim)).astype(np.float32)}


def run(config, mesh, steps):
  """Trains `steps` steps; returns the state, per-step scalars and facts
  about the batch and the compiled step."""
  trainer = train_step.ShardedTrainer(config, mesh)
  with jax.set_mesh(mesh):
    state = trainer.init_state(jax.random.key(0))
    initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    seen = {"loss": [], "grad_norm": [], "learning_rate": []}
    facts, compiled = {}, None
    for batch in _batches(config, steps):
      batch = sharding_lib.global_batch(batch, trainer.batch_sharding)
      if compiled is None:
        # Compiled once: its HLO is inspected and it runs every step.
        compiled = trainer.jitted_train_step.lower(
            state, batch, jax.random.key(1), None).compile()
        facts = {
            "batch_spec": [list(a) if isinstance(a, tuple) else a
                           for a in batch["vis"].sharding.spec],
            "batch_rows_per_device": sorted(
                {s.data.shape[0] for s in batch["vis"].addressable_shards}),
            "hlo_ops": collective_ops(compiled.as_text()),
        }
      state, metrics = compiled(state, batch, jax.random.key(1), None)
      for key, value in metrics.compute().items():
        if key in seen:
          seen[key].append(float(value))
  moved = max(float(np.max(np.abs(np.asarray(a) - b)))
              for a, b in zip(jax.tree.leaves(state.params), initial))
  facts["max_param_movement"] = moved
  return state, seen, facts


def collective_ops(hlo: str) -> dict[str, int]:
  """How often each cross-device collective appears in compiled HLO text."""
  return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
          for op in ("all-gather", "reduce-scatter", "all-reduce",
                     "all-to-all", "collective-permute")}


def sharded_fraction(tree):
  """(leaves split over fsdp, all leaves, bytes on device 0 / total bytes)."""
  leaves = jax.tree.leaves(tree)
  split = [x for x in leaves
           if any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a)
                  for a in x.sharding.spec)]
  local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  total = sum(x.nbytes for x in leaves)
  return len(split), len(leaves), local / total


def main():
  config = tiny.get_config()
  config.sharding_rules = [("channels_out", "fsdp")]
  # At init the fused chroma equals the visible chroma, so the colour loss's
  # L1 sits on its kink and the signs of its gradient (which reaches only
  # vis_correction) follow rounding. Leave it out of a reduction-order test.
  config.loss.color = 0.0
  # A non-zero learning rate from the first step: every step moves params.
  config.optim.warmup_steps = 0
  steps = 3
  mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 2})
  state, seen, facts = run(config, mesh, steps)
  single = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  single_state, single_seen, single_facts = run(config, single, steps)
  max_param_diff = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(state.params),
                      jax.tree.leaves(single_state.params)))
  json.dump({"devices": len(jax.devices()), "mesh": dict(mesh.shape),
             "sharded": seen, "single": single_seen,
             "params_split": sharded_fraction(state.params),
             "opt_split": sharded_fraction(state.opt_state),
             "max_param_diff": max_param_diff,
             "max_param_movement": single_facts["max_param_movement"],
             "batch_spec": facts["batch_spec"],
             "batch_rows_per_device": facts["batch_rows_per_device"],
             "hlo_ops": facts["hlo_ops"],
             "single_hlo_ops": single_facts["hlo_ops"]}, sys.stdout)


if __name__ == "__main__":
  main()
