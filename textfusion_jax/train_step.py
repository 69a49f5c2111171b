"""Train state, optimizer and the pure train step, jitted with shardings.

(No `from __future__ import annotations`: clu reads the metric annotations.)
"""


import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh

from textfusion_jax import losses
from textfusion_jax import model as model_lib
from textfusion_jax import sharding as sharding_lib

PyTree = Any

# Initialisers run once, so their compile time is all that matters: without
# LLVM's optimisations XLA:CPU compiles the tiny preset's 188 random arrays in
# 11 s instead of 27 s (2 cores); values moved by at most 1.2e-7 (measured).
_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _run_once(fn: Callable[..., Any], out_shardings: Any, *args: Any) -> Any:
  """`jax.jit(fn, out_shardings=...)(*args)`, compiled for a single call."""
  jitted = jax.jit(fn, out_shardings=out_shardings)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    return jitted(*args)  # traced (e.g. by eval_shape): nothing is compiled
  return jitted.lower(*args).compile(_RUN_ONCE_COMPILER_OPTIONS)(*args)


@flax.struct.dataclass
class TrainState:
  """Everything a train step updates; plain dicts so checkpoints stay portable."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  loss_intensity: clu_metrics.Average.from_output("loss_intensity")
  loss_gradient: clu_metrics.Average.from_output("loss_gradient")
  loss_ssim: clu_metrics.Average.from_output("loss_ssim")
  loss_color: clu_metrics.Average.from_output("loss_color")
  loss_complementarity: clu_metrics.Average.from_output(
      "loss_complementarity")
  loss_reference: clu_metrics.Average.from_output("loss_reference")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  param_norm: clu_metrics.LastValue.from_output("param_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup then cosine decay to `final_lr_fraction` of the peak."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.optim.learning_rate,
      warmup_steps=config.optim.warmup_steps,
      decay_steps=max(config.train.num_steps, config.optim.warmup_steps + 1),
      end_value=config.optim.learning_rate * config.optim.final_lr_fraction)


def make_optimizer(config: ml_collections.ConfigDict
                  ) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.optim.b1,
                  b2=config.optim.b2,
                  weight_decay=config.optim.weight_decay))


class ShardedTrainer:
  """Builds the sharded state and the jitted train/apply functions.

  The nnx graph definition is static; only plain dict pytrees cross jit
  boundaries, so the same functions serve training, evaluation, checkpoint
  restore and the fuse command.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    self.config = config
    self.mesh = mesh
    self.optimizer = make_optimizer(config)
    self.graphdef, abstract_params = model_lib.abstract_model(config.model)
    rules = sharding_lib.resolve_rules(config.sharding_rules)
    # Optimizer moments keep the params' Variable metadata, so one rule set
    # shards params and optimizer state alike.
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    self.state_shardings = TrainState(
        step=sharding_lib.replicated(mesh),
        params=_to_plain(sharding_lib.logical_shardings(
            abstract_params, rules, mesh)),
        opt_state=_to_plain(sharding_lib.logical_shardings(
            abstract_opt, rules, mesh)))
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    self.loss_weights = dict(config.loss)
    # The frozen reference model (config.train.reference_from) is a 4th
    # argument of the train step, sharded like the params; None without it.
    self.reference_shardings = (self.state_shardings.params
                                if self.loss_weights.get("reference") else None)

  # -- state ------------------------------------------------------------------

  def init_state(self, rng: jax.Array,
                 text_stats: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> TrainState:
    """Initialises parameters directly in their shards (no host copy).

    text_stats: optional (mean, std) of the training caption embeddings,
    folded into the text MLPs (`model.fold_text_standardization`).
    """

    def init(rng, text_stats):
      model = model_lib.build(self.config.model, rng)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      if text_stats is not None:
        params = model_lib.fold_text_standardization(params, *text_stats)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=_to_plain(self.optimizer.init(params)))

    return _run_once(init, self.state_shardings, rng, text_stats)

  def state_from_params(self, params: PyTree) -> TrainState:
    """Step 0 with these params and a fresh optimizer, in their shards."""

    def init(params):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=_to_plain(self.optimizer.init(params)))

    return _run_once(init, self.state_shardings, params)

  def place_params(self, params: PyTree) -> PyTree:
    """Host params (e.g. a loaded bundle's) in this trainer's param shards."""
    return jax.jit(lambda p: p,
                   out_shardings=self.state_shardings.params)(params)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings, as orbax restore targets."""
    shapes = jax.eval_shape(self.init_state, jax.random.key(0))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.state_shardings)

  # -- functions --------------------------------------------------------------

  def apply(self, params: PyTree, vis: jax.Array, ir: jax.Array,
            text_emb: jax.Array, valid_size: jax.Array | None = None
            ) -> jax.Array:
    return apply(self.graphdef, params, vis, ir, text_emb, valid_size)

  @functools.cached_property
  def jitted_train_step(self) -> Callable[..., tuple[TrainState, TrainMetrics]]:
    """`train_step` bound to this model, jitted with shardings and donation:
    (state, batch, rng, reference_params) -> (state, metrics)."""
    replicated = sharding_lib.replicated(self.mesh)
    return jax.jit(
        functools.partial(train_step, graphdef=self.graphdef,
                          optimizer=self.optimizer,
                          schedule=learning_rate_schedule(self.config),
                          loss_weights=self.loss_weights),
        in_shardings=(self.state_shardings, self.batch_sharding, replicated,
                      self.reference_shardings),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))


def apply(graphdef: nnx.GraphDef, params: PyTree, vis: jax.Array,
          ir: jax.Array, text_emb: jax.Array,
          valid_size: jax.Array | None = None) -> jax.Array:
  """The fused RGB image of the model `graphdef` with `params`."""
  return nnx.merge(graphdef, params)(vis, ir, text_emb, valid_size)


def reference_fusion(graphdef: nnx.GraphDef, reference_params: PyTree,
                     batch: Mapping[str, jax.Array]) -> jax.Array:
  """The 'reference' loss term's target: the frozen model's fusion, under
  "clean visible image", of the target crop ('vis_clean'), or, when the
  batch has 'reference_affine' (config.data.degradations.renamed_reference
  'prompted_fusion'), of the true target 'reference_vis', mapped per
  channel by that scale and offset to what the crop's prompt asks for."""
  if "reference_affine" not in batch:
    return apply(graphdef, reference_params, batch["vis_clean"], batch["ir"],
                 batch["text_emb_clean"])
  fused = apply(graphdef, reference_params, batch["reference_vis"],
                batch["ir"], batch["text_emb_clean"])
  affine = batch["reference_affine"].astype(jnp.float32)[:, :, None, None, :]
  return jnp.clip(fused.astype(jnp.float32) * affine[:, 0] + affine[:, 1],
                  0.0, 1.0).astype(fused.dtype)


def train_step(state: TrainState, batch: Mapping[str, jax.Array],
               rng: jax.Array, reference_params: PyTree | None = None, *,
               graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, loss_weights: Mapping[str, float]
               ) -> tuple[TrainState, TrainMetrics]:
  """One AdamW step. A non-finite loss or gradient leaves the state unchanged.

  rng is the run's base key; the step's own key is fold_in(rng, step), so it
  does not depend on restarts. The model is deterministic today; the key is
  there for stochastic layers (drop-path, noise augmentation).

  reference_params: a frozen model (same graph) for the 'reference' loss
  term; its fusion of the target crop under "clean visible image" is the
  target (`reference_fusion`). A frozen model, not this one: pulled
  towards its own clean-input fusion (a target that moves with it), a
  fine-tuned model drifted: the intensity loss doubled within 1000 steps
  and clean-pair SCD fell to 1.76 (README, "Prompts on degraded real
  pairs").
  """
  del rng  # jax.random.fold_in(rng, state.step) once a layer needs it

  def loss_fn(params):
    fused = apply(graphdef, params, batch["vis"], batch["ir"],
                  batch["text_emb"])
    reference = None
    if loss_weights.get("reference"):  # a static float: no extra pass at 0
      reference = jax.lax.stop_gradient(reference_fusion(
          graphdef, reference_params, batch))
    return losses.fusion_loss(fused, batch["vis"], batch["ir"], loss_weights,
                              vis_target=batch.get("vis_clean"),
                              reference=reference)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # A finite loss can still have inf/NaN gradients (an overflow in the
  # backward pass); applying them would poison every later step.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      TrainState(step=state.step + 1, params=params, opt_state=opt_state),
      state)
  metrics = TrainMetrics.single_from_model_output(
      loss=loss,
      **{f"loss_{name}": value for name, value in parts.items()},
      grad_norm=grad_norm,
      # After the update: the norm of the checkpoint saved at this step.
      param_norm=optax.tree.norm(new_state.params),
      learning_rate=schedule(state.step))
  return new_state, metrics


def _to_plain(tree: PyTree) -> PyTree:
  """nnx.State (possibly nested inside optax tuples) -> plain dicts."""
  return jax.tree.map(
      lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.State))
