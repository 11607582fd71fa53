"""The preallocated KV cache of a batch of dialogues, laid out and sharded like the model.

The cache is what :func:`init_cache` builds: one :class:`ism_jax.model.LayerCache` per layer
(or one with a leading ``layers`` axis when the model scans its layers), keys and values of shape
``[B, S, K, Dh]``. Slot ``s`` of row ``b`` holds the keys and values of position ``s`` of dialogue ``b``;
how many slots a row uses is tracked by the engine, not stored here.

Sharding follows the logical-axis rules of :mod:`ism_jax.sharding`: ``batch`` over ``data``/``fsdp``,
``kv_heads`` over ``tensor`` (like the attention projections that fill the cache), ``length`` and
``head_dim`` unsplit.

A prefill that starts every row at slot 0 only needs the first ``W`` slots; :func:`window` cuts the slot axis
and :func:`put_window` writes such a view back, so that attention runs over ``W`` keys instead of ``S``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ism_jax import sharding
from ism_jax.model import LayerCache, ModelConfig

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")
_SLOT_AXIS = -3  # every cache array is [..., B, S, K, Dh]


def _logical_axes(config: ModelConfig) -> tuple[str, ...]:
  return ("layers", *CACHE_AXES) if config.scan_layers else CACHE_AXES


def init_cache(config: ModelConfig, batch_size: int, cache_len: int, dtype: Any = None):
  """A zeroed KV cache: a list of :class:`LayerCache` (or one stacked on a leading axis when scanned)."""
  dtype = config.dtype if dtype is None else dtype
  shape = (batch_size, cache_len, config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    shape = (config.num_layers, *shape)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  return [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


def cache_shardings(config: ModelConfig, batch_size: int, max_len: int, mesh: Mesh, dtype: Any = None):
  """A tree like the cache of ``NamedSharding``s from the logical axes (mesh axes that do not divide drop,
  with a warning)."""
  abstract = jax.eval_shape(lambda: init_cache(config, batch_size, max_len, dtype))
  shape = jax.tree.leaves(abstract)[0].shape  # every key and value array has this shape
  spec, drops = sharding.spec_with_drops(_logical_axes(config), shape, dict(mesh.shape))
  sharding.warn_replicated(f"KV cache on mesh {dict(mesh.shape)}", [("keys and values", shape, drops)])
  return jax.tree.map(lambda _: NamedSharding(mesh, spec), abstract)


def allocate(config: ModelConfig, batch_size: int, max_len: int, mesh: Mesh | None = None,
             dtype: Any = None):
  """A zeroed cache of ``max_len`` slots for ``batch_size`` dialogues, created already sharded on ``mesh``.

  Returns:
    A list of ``num_layers`` :class:`~ism_jax.model.LayerCache` (``[B, S, K, Dh]`` each), or one stacked
    ``[L, B, S, K, Dh]`` when ``config.scan_layers``. ``dtype`` defaults to the compute dtype.
  """
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
  make = lambda: init_cache(config, batch_size, max_len, dtype)
  if mesh is None:
    return make()
  with jax.set_mesh(mesh):
    return jax.jit(make, out_shardings=cache_shardings(config, batch_size, max_len, mesh, dtype))()


def slot_bytes(config: ModelConfig, max_len: int, dtype: Any = None) -> int:
  """Bytes of keys and values one row of the cache (one conversation of ``max_len`` slots) takes."""
  itemsize = jnp.dtype(config.dtype if dtype is None else dtype).itemsize
  return 2 * config.num_layers * max_len * config.num_kv_heads * config.head_dim * itemsize


def num_slots(cache) -> int:
  """``S``, the number of slots per row."""
  return int(jax.tree.leaves(cache)[0].shape[_SLOT_AXIS])


def window(cache, length: int):
  """The first ``length`` slots of every row (a copy inside jit; ``length`` is static)."""
  return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, length, axis=x.ndim + _SLOT_AXIS), cache)


def put_window(cache, view):
  """Writes a :func:`window` view back into slots ``[0, W)`` of ``cache``."""
  def put(x, v):
    return jax.lax.dynamic_update_slice_in_dim(x, v, 0, axis=x.ndim + _SLOT_AXIS)
  return jax.tree.map(put, cache, view)
