"""Device mesh and the logical-axis rules table.

Every parameter carries ``logical_axes`` metadata (e.g. ``("embed", "mlp")``); activations are constrained by
logical names at block boundaries. One small table maps logical names to mesh axes:

==========  ====================  ==========================================================
logical     mesh axes             why
==========  ====================  ==========================================================
batch       ("data", "fsdp")      data parallel; FSDP shards the batch like data parallelism
embed       "fsdp"                parameters are sharded (ZeRO-3 style) over the fsdp axis
heads       "tensor"              Megatron-style tensor parallelism of attention
kv_heads    "tensor"
mlp         "tensor"              ... and of the MLP
vocab       "tensor"
length      None                  sequences are not split
==========  ====================  ==========================================================

A mesh axis that does not divide a dimension is dropped for that array (e.g. 2 KV heads on tensor=4 stay
replicated), so every config runs on every mesh; for parameters and the KV cache this is logged once, as a
warning naming each array, its shape and the mesh axis.

The same code runs on 1 CPU, on 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a GPU host, on a TPU slice, and multi-host after
``jax.distributed.initialize()``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = tuple[str | None, ...]
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("act_embed", None),
)

_log = logging.getLogger(__name__)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ``Mesh(('data', 'fsdp', 'tensor'))`` over ``devices`` (default: all). One size may be ``-1``."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: at most one may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh sizes {tuple(sizes)} do not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices, found {len(devices)}"
    )
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise KeyError(f"logical axis {name!r} has no rule; known: {[r[0] for r in rules]}")


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None, rules: Rules | None = None) -> PartitionSpec:
  """``PartitionSpec`` for an array with these logical axes.

  With ``shape`` and ``mesh_shape`` given, mesh axes that do not divide their dimension are dropped, and a
  mesh axis is used at most once per array.
  """
  return spec_with_drops(logical_axes, shape, mesh_shape, rules)[0]


def spec_with_drops(logical_axes: LogicalAxes, shape: Sequence[int] | None, mesh_shape: dict[str, int] | None,
                    rules: Rules | None = None) -> tuple[PartitionSpec, list[str]]:
  """The spec of :func:`logical_to_spec` and, for each mesh axis dropped because it does not divide its
  dimension, a phrase like ``"kv_heads (dim 1 of size 2) on tensor=4"``."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec, drops = [], []
  for dim, name in enumerate(logical_axes):
    axes = []
    size = 1
    for axis in _mesh_axes_for(name, rules):
      axis_size = 1 if mesh_shape is None else mesh_shape.get(axis, 1)
      if axis in used or axis_size == 1:
        continue
      if shape is not None and shape[dim] % (size * axis_size):
        drops.append(f"{name} (dim {dim} of size {shape[dim]}) on {axis}={axis_size}")
        continue
      axes.append(axis)
      size *= axis_size
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec), drops


def warn_replicated(what: str, drops: list[tuple[str, tuple[int, ...], list[str]]]) -> None:
  """Logs once, as one warning, the arrays that stay replicated along mesh axes that do not divide them.

  ``drops`` holds ``(array name, shape, phrases)`` with phrases from :func:`spec_with_drops`; nothing is
  logged when no array lost an axis.
  """
  lost = [(name, shape, phrases) for name, shape, phrases in drops if phrases]
  if lost:
    lines = "; ".join(f"{name} {tuple(shape)}: {', '.join(phrases)}" for name, shape, phrases in lost)
    _log.warning("%s: %d arrays are replicated along mesh axes that do not divide them (memory is not "
                 "split there): %s", what, len(lost), lines)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """``with_sharding_constraint`` by logical names under the current mesh; a no-op without one."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape)))


def variable_spec(variable: nnx.Variable, mesh: Mesh) -> PartitionSpec:
  """The ``PartitionSpec`` of one NNX variable from its ``logical_axes`` metadata (replicated if none)."""
  return _variablespec_with_drops(variable, mesh)[0]


def _variablespec_with_drops(variable: nnx.Variable, mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
  axes = variable.get_metadata().get("logical_axes")
  if axes is None:
    return PartitionSpec(), []
  return spec_with_drops(axes, variable.shape, dict(mesh.shape), None)


def _path_name(path) -> str:
  """``blocks.0.attn.k_proj`` for a tree path of dict keys and sequence indices."""
  return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A tree like ``state`` of ``NamedSharding``s, from each variable's logical axes.

  Parameters that stay replicated along a mesh axis that does not divide them are logged (one warning).
  """
  drops = []

  def sharding_of(path, variable):
    spec, phrases = _variablespec_with_drops(variable, mesh)
    drops.append((_path_name(path), variable.shape, phrases))
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(sharding_of, state,
                                               is_leaf=lambda x: isinstance(x, nnx.Variable))
  warn_replicated(f"parameters on mesh {dict(mesh.shape)}", drops)
  return shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[batch, length, ...]`` input array: batch over data and fsdp."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, dict(mesh.shape)))


def create_sharded(factory, mesh: Mesh):
  """Builds an NNX module with every parameter created directly in its sharded layout.

  ``factory`` is a no-argument function returning the module (e.g. ``lambda: Transformer(cfg, rngs=...)``).
  The module is first traced abstractly to read each variable's logical axes, then initialised inside one
  ``jax.jit`` whose outputs carry those shardings, so no device ever holds a full unsharded copy.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(factory())

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)
