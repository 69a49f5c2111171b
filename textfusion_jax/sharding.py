"""Device mesh, logical-axis sharding rules and global batch assembly.

Parameters carry logical axis names (see `textfusion_jax.model`); a config's
`sharding_rules` maps them to mesh axes. Batches are split over every mesh
axis at once (data parallel x FSDP), so FSDP shards parameters and optimizer
state while each device still sees a distinct slice of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from textfusion_jax.errors import UserError

MeshShape = Mapping[str, int]


def make_mesh(mesh_shape: MeshShape,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh from {axis_name: size}; one size may be -1 (= the rest).

  Axes are `Auto` because Flax convolutions do not support explicit-axis
  sharding in this JAX version.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(mesh_shape.keys())
  sizes = [int(s) for s in mesh_shape.values()]
  if any(s < 1 and s != -1 for s in sizes):
    raise UserError(f"mesh: each axis size must be >= 1 or -1 (the rest), "
                    f"got {dict(mesh_shape)}")
  if sizes.count(-1) > 1:
    raise UserError(f"mesh: at most one axis may be -1, got {dict(mesh_shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"mesh: {len(devices)} devices cannot fill "
                       f"{dict(mesh_shape)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"mesh: shape {dict(zip(names, sizes))} needs "
                     f"{int(np.prod(sizes))} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int],
                       mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (those dims replicate)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in axes_tuple]))
    fitted.append(axes if dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_to_mesh_spec(logical_axes: Sequence[str | None] | None,
                         rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """Maps logical axis names to mesh axes; names without a rule replicate."""
  table = dict(rules)
  return PartitionSpec(*(table.get(name) if name is not None else None
                         for name in (logical_axes or ())))


def logical_shardings(abstract_state: Any, rules: Sequence[tuple[str, Any]],
                      mesh: Mesh) -> Any:
  """NamedShardings for an nnx State of (abstract) Variables.

  Variables annotated with `nnx.with_partitioning` are mapped through `rules`;
  anything else, and any dim that its mesh axes do not divide, is replicated.
  """
  rules = resolve_rules(rules)
  is_variable = lambda x: isinstance(x, nnx.Variable)

  def logical_axes(variable: Any) -> Sequence[str | None]:
    return ((variable.get_metadata().get("out_sharding")
             if is_variable(variable) else None) or ())

  used = {name for v in jax.tree.leaves(abstract_state, is_leaf=is_variable)
          for name in logical_axes(v) if name is not None}
  _check_rules(rules, used, mesh)

  def to_sharding(variable: Any) -> NamedSharding:
    spec = logical_to_mesh_spec(logical_axes(variable), rules)
    taken = [a for axes in spec if axes is not None
             for a in (axes if isinstance(axes, tuple) else (axes,))]
    if len(taken) != len(set(taken)):  # (JAX would raise DuplicateSpecError)
      raise UserError(
          f"config.sharding_rules: a parameter with axes "
          f"{tuple(logical_axes(variable))} would use a mesh axis twice "
          f"({spec}); map its axes to different mesh axes")
    return NamedSharding(mesh, _fit_spec_to_shape(spec, variable.shape, mesh))

  return jax.tree.map(to_sharding, abstract_state, is_leaf=is_variable)


def _check_rules(rules: Sequence[tuple[str, Any]], used: set[str],
                 mesh: Mesh) -> None:
  """A mistyped rule would silently replicate everything: name it."""
  for logical, physical in rules:
    if logical not in used:
      raise UserError(
          f"config.sharding_rules: {logical!r} is not a parameter axis of "
          f"this model (it has {', '.join(sorted(used))})")
    for axis in (physical if isinstance(physical, tuple) else (physical,)):
      if axis is not None and axis not in mesh.axis_names:
        raise UserError(
            f"config.sharding_rules: ({logical!r}, {physical!r}) names mesh "
            f"axis {axis!r}, but the mesh has {', '.join(mesh.axis_names)}")


def resolve_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from the command line) to tuples."""
  resolved = []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2:
      raise UserError(f"config.sharding_rules: {rule!r} is not a pair "
                      "(logical axis, mesh axis or None)")
    logical, physical = rule
    if isinstance(physical, list):
      physical = tuple(physical)
    resolved.append((logical, physical))
  return tuple(resolved)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over all mesh axes."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(tree: Any) -> Any:
  """numpy copies of (possibly multi-process) arrays, on every process.

  A batch-sharded array of a multi-process job is not addressable from one
  process; its shards are gathered first.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local_batch: Mapping[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global sharded jax.Arrays."""
  return {
      key: jax.make_array_from_process_local_data(sharding, _owned(value))
      for key, value in local_batch.items()
  }


def _owned(value: Any) -> np.ndarray:
  """A plain ndarray. An ndarray subclass, grain's shared-memory arrays from
  its worker processes, is copied: jax on CPU aliases host memory, which
  kept that shared memory alive past grain's cleanup ("leaked
  shared_memory objects" at exit)."""
  if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
    return np.array(value)
  return np.asarray(value)
