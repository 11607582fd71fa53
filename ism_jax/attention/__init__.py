"""One attention entry point, many implementations.

    out_BTHD = attention(q_BTHD, k_BSKD, v_BSKD, ranges, impl="auto")

``ranges`` is an :class:`ism_jax.masks.MaskRanges` (the O(T) mask form), so every implementation serves
all three mask kinds. Implementations:

===============  ===============================================================================
``xla``          dense ``[B, T, S]`` mask, plain XLA (reference; any backend)
``xla_chunked``  query chunks under ``jax.checkpoint``; never builds the full ``[T, S]`` mask (CPU default)
``pallas_gpu``   block-sparse Pallas (Mosaic GPU) kernel for NVIDIA Hopper GPUs (GPU default)
``pallas_tpu``   block-sparse Pallas kernel for TPUs (TPU default)
===============  ===============================================================================

``impl="auto"`` picks by the default backend. The differentiable Pallas kernels need both range pairs
(``q_lo``/``q_hi`` for the backward pass) and equal query and key lengths. Calls that do not fit them (a
prefill over a KV cache, a decode step) run the kernel's forward-only path (per-query ranges, any key
length, no backward): :func:`ism_jax.attention.pallas_gpu.attention_forward` on GPU,
:func:`ism_jax.attention.pallas_tpu.attention_forward` on TPU.

Under a multi-device mesh (``jax.set_mesh``) the XLA paths are partitioned by the compiler, but a Pallas
kernel is opaque to it; so the kernels run under ``jax.shard_map``: every device attends over its own
rows (batch split over the ``batch`` mesh axes) and, where query and KV heads both divide the ``tensor``
axis, its own heads. Attention never mixes rows or heads, so no communication is needed.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
from jax.sharding import PartitionSpec

from ism_jax import sharding
from ism_jax.attention.xla import chunked_attention, dense_attention
from ism_jax.masks import MaskRanges

IMPLEMENTATIONS = ("auto", "xla", "xla_chunked", "pallas_gpu", "pallas_tpu")

# Kernel modules are imported lazily: they pull in backend-specific Pallas code.
_KERNEL_MODULES = {
    "pallas_gpu": "ism_jax.attention.pallas_gpu",
    "pallas_tpu": "ism_jax.attention.pallas_tpu",
}
_AUTO_BY_BACKEND = {"cpu": "xla_chunked", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_impl(impl: str) -> str:
  """Maps ``"auto"`` to the implementation for the default backend; validates names."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    return _AUTO_BY_BACKEND.get(jax.default_backend(), "xla_chunked")
  return impl


def key_window(impl: str, visible: int, available: int) -> int:
  """How many of ``available`` cached keys to hand :func:`attention` when no query sees past key ``visible``.

  The dense XLA paths pay for every key they are given, so they get the first ``visible`` only. The
  forward-only kernels (GPU and TPU) read only the keys below each query's ``k_hi`` (the GPU one shares them
  out among its key splits), so they take all ``available`` keys (one program for every fill of the cache).
  """
  return available if resolve_impl(impl) in ("pallas_gpu", "pallas_tpu") else visible


def _implementation(impl: str) -> Callable:
  if impl == "xla":
    return dense_attention
  if impl == "xla_chunked":
    return chunked_attention
  return importlib.import_module(_KERNEL_MODULES[impl]).attention


def per_device(kernel: Callable, q_BTHD, k_BSKD, v_BSKD, ranges: MaskRanges, **kwargs) -> jax.Array:
  """Runs ``kernel`` on each device's rows and heads under the current mesh (directly without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BTHD, k_BSKD, v_BSKD, ranges, **kwargs)
  mesh_shape = dict(mesh.shape)
  q_spec = sharding.logical_to_spec(("batch", "length", "heads", None), q_BTHD.shape, mesh_shape)
  kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", None), k_BSKD.shape, mesh_shape)
  if q_spec[2] != kv_spec[2]:  # heads split only where query and KV heads split alike
    q_spec = PartitionSpec(q_spec[0], None, None, None)
    kv_spec = PartitionSpec(kv_spec[0], None, None, None)
  rows = PartitionSpec(q_spec[0], None)
  ranges_spec = MaskRanges(*(None if x is None else rows for x in (ranges.k_lo, ranges.k_hi, ranges.q_lo,
                                                                    ranges.q_hi)))
  run = jax.shard_map(lambda q, k, v, r: kernel(q, k, v, r, **kwargs), mesh=mesh,
                      in_specs=(q_spec, kv_spec, kv_spec, ranges_spec), out_specs=q_spec, check_vma=False)
  return run(q_BTHD, k_BSKD, v_BSKD, ranges)


def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
              impl: str = "auto", scale: float | None = None) -> jax.Array:
  """Masked multi-head attention with grouped KV heads.

  Args:
    q_BTHD: queries ``[batch, query_len, heads, head_dim]``.
    k_BSKD, v_BSKD: keys and values ``[batch, key_len, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    ranges: the mask as per-query key ranges (and per-key query ranges for the differentiable kernels).
    impl: one of ``IMPLEMENTATIONS``.
    scale: logit scale, default ``head_dim ** -0.5``.

  Returns:
    ``[batch, query_len, heads, head_dim]`` in ``q``'s dtype.
  """
  if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
    raise ValueError(
        f"attention expects q [B, T, H, D] and k, v [B, S, K, D] of equal shape; got q {q_BTHD.shape}, "
        f"k {k_BSKD.shape}, v {v_BSKD.shape}"
    )
  if ranges.k_lo.shape != q_BTHD.shape[:2]:
    raise ValueError(f"ranges.k_lo has shape {ranges.k_lo.shape}, expected {q_BTHD.shape[:2]}")
  impl = resolve_impl(impl)
  kernel_fits = ranges.q_lo is not None and ranges.q_hi is not None and q_BTHD.shape[1] == k_BSKD.shape[1]
  if impl.startswith("pallas") and not kernel_fits:
    forward_only = importlib.import_module(_KERNEL_MODULES[impl]).attention_forward
    return per_device(forward_only, q_BTHD, k_BSKD, v_BSKD, ranges, scale=scale)
  if impl.startswith("pallas"):
    return per_device(_implementation(impl), q_BTHD, k_BSKD, v_BSKD, ranges, scale=scale)
  return _implementation(impl)(q_BTHD, k_BSKD, v_BSKD, ranges, scale=scale)


__all__ = [
    "IMPLEMENTATIONS", "attention", "chunked_attention", "dense_attention", "key_window", "per_device",
    "resolve_impl",
]
