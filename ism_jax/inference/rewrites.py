"""Serving-time rewrites of a trained :class:`~ism_jax.model.Transformer`: the same network, fewer kernels.

    served = fuse_projections(unstack_layers(model))     # what Engine does by default

Both return a new model with copied parameters (placed by the logical-axis rules when the input is on a
mesh) and leave the input untouched; logits agree with the original to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ism_jax import sharding
from ism_jax.model import ModelConfig, Transformer


def _rebuild(model: Transformer, config: ModelConfig, value_of) -> Transformer:
  """A model of ``config`` whose parameter at each path is ``value_of(path, flat)``, where ``flat`` maps the
  paths of ``model``'s parameters to their values; placed by the rules table when those are on a mesh."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  flat = {path: variable[...] for path, variable in nnx.to_flat_state(nnx.state(model))}
  mesh = getattr(next(iter(flat.values())).sharding, "mesh", None)

  def place(variable, value):
    if mesh is not None and not mesh.empty:
      spec = sharding.logical_to_spec(variable.logical_axes, value.shape, dict(mesh.shape))
      value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
    return variable.replace(value)

  new = [(path, place(variable, value_of(path, flat))) for path, variable in nnx.to_flat_state(abstract)]
  return nnx.merge(graphdef, nnx.from_flat_state(new))


def unstack_layers(model: Transformer) -> Transformer:
  """The same network with scanned layers turned into a list of blocks (returned as is when not scanned).

  Serving prefers unrolled layers: a scanned step runs as a device-side loop whose every iteration slices
  its weights out of the stacked arrays and launches its kernels one by one, while an unrolled step is one
  straight sequence of kernels that the compiler can fuse across layers and capture as a CUDA graph. The
  parameters are copied (layer ``i`` of every stacked ``[L, ...]`` array).
  """
  if not model.config.scan_layers:
    return model

  def layer_value(path, flat):
    if path[0] == "blocks":  # ("blocks", i, *rest) <- ("blocks", *rest)[i]
      return flat[("blocks", *path[2:])][path[1]]
    return flat[path]

  return _rebuild(model, dataclasses.replace(model.config, scan_layers=False), layer_value)


def fuse_projections(model: Transformer) -> Transformer:
  """The same network with ``fused_projections``: q/k/v weights (and biases) concatenated per KV head into
  ``qkv_proj [..., D, K, G + 2, Dh]`` and gate/up stacked into ``gate_up_proj [..., D, 2, M]`` (copies).

  One matmul instead of three, and one instead of two, run faster for the short chunks of serving and
  halve the kernel launches of the projections. Returned as is when already fused.
  """
  if model.config.fused_projections:
    return model
  kv_heads = model.config.num_kv_heads

  def grouped(q, k, v):  # q [..., H, Dh], k and v [..., K, Dh] -> [..., K, G + 2, Dh]
    q = q.reshape(*q.shape[:-2], kv_heads, -1, q.shape[-1])
    return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)

  def fused_value(path, flat):
    *module, name = path
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "qkv_bias": ("q_bias", "k_bias", "v_bias")}
    if name in parts:
      return grouped(*(flat[(*module, part)] for part in parts[name]))
    if name == "gate_up_proj":
      return jnp.stack([flat[(*module, "gate_proj")], flat[(*module, "up_proj")]], axis=-2)
    return flat[path]

  return _rebuild(model, dataclasses.replace(model.config, fused_projections=True), fused_value)
