"""Block-sparse ISM attention for TPUs (Pallas TPU), with the interface of the GPU kernel.

    out_BTHD = attention(q_BTHD, k_BSKD, v_BSKD, ranges)

The same tile classification as on GPU (:mod:`ism_jax.attention.tiles`): the forward and dq passes walk,
per query tile, the run of key tiles read off ``k_lo, k_hi``; the dk/dv pass walks, per key tile, the run
of query tiles read off ``q_lo, q_hi``; fully visible tiles run without the elementwise mask and the rest
of the ``[T, T]`` plane is never touched. Runs reach the kernels by scalar prefetch. Kernels:
:mod:`ism_jax.attention.tpu_kernels`. Accumulation and softmax statistics are float32; GQA dk/dv sum over
the group inside the dk/dv kernel. The wrapper moves heads before time (TPU block shapes), pads the
sequence to the tile multiple (padding rows see only themselves) and, on hardware, the head dimension to
a multiple of 128 with zeros. ``interpret=True`` runs the kernels in Pallas interpret mode (CPU tests).

**Forward-only path** (:func:`attention_forward`, inference): a query chunk of ``T`` rows over a KV cache of
``S`` slots (a prefill over the cache, a decode step), ``T != S`` allowed, per-query ranges ``k_lo, k_hi``
only, no backward pass. The forward kernel runs with the ``G = H / K`` query heads of each KV head packed
into rows ``(t, g)``, so a decode step's few rows share each K/V tile, and it reads the cache in place: the
``[B, S, K, D]`` cache is viewed as ``[B, S, K * D]`` and each KV head's ``[block_kv, D]`` tiles are taken
from it (no transposed copy per call; a head dimension that is not a multiple of 128 is padded, which does
copy). Key tiles past each row tile's largest ``k_hi`` are never fetched.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from ism_jax.attention import tiles, tpu_kernels
from ism_jax.attention.tpu_kernels import TpuTuning
from ism_jax.masks import MaskRanges

_LANES = 128

_SUBLANES = 8

# Default tiles of the training kernel per TPU generation (device-kind substring, first match wins), for long
# sequences; :func:`default_tuning` clamps them to the sequence. Chosen from published guidance, not yet run
# on TPU hardware (docs/KERNELS.md, "TPU tile sizes"): 128-wide tiles leave a v5e mostly idle, so v5e gets
# 512-row tiles over 1024 columns, v6e (256-wide MXUs) 1024 x 1024; float32 score tiles of that size stay
# within the default scoped VMEM, so no kernel raises vmem_limit_bytes.
_V5E_TILES = TpuTuning(block_q=512, block_kv=1024, dq_block_q=512, dq_block_kv=1024, dkv_block_kv=512,
                       dkv_block_q=1024)
_V6E_TILES = TpuTuning(block_q=1024, block_kv=1024, dq_block_q=1024, dq_block_kv=1024, dkv_block_kv=1024,
                       dkv_block_q=1024)
TILES_BY_DEVICE_KIND = (("TPU v5 lite", _V5E_TILES), ("TPU v5e", _V5E_TILES), ("TPU v6 lite", _V6E_TILES),
                        ("TPU v6e", _V6E_TILES))

__all__ = ["TILES_BY_DEVICE_KIND", "TpuTuning", "attention", "attention_forward", "default_tuning"]


def device_kind() -> str:
  """The device kind the kernel is built for: the current abstract mesh's (lowering for a TPU from another
  host), else that of ``jax.devices()[0]``."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "device_kind", None):
    return device.device_kind
  return jax.devices()[0].device_kind


def default_tuning(length: int, kind: str | None = None) -> TpuTuning:
  """The tiles of :data:`TILES_BY_DEVICE_KIND` for ``kind`` (default :func:`device_kind`; ``TpuTuning()``
  for other kinds), each clamped to the largest power-of-two multiple of 128 not above ``length`` (at least
  128), so a short sequence is not padded to a long tile."""
  kind = device_kind() if kind is None else kind
  tuning = next((t for name, t in TILES_BY_DEVICE_KIND if name.lower() in kind.lower()), TpuTuning())
  cap = _LANES
  while cap * 2 <= length:
    cap *= 2
  return TpuTuning(**{f.name: min(getattr(tuning, f.name), cap) for f in dataclasses.fields(TpuTuning)})


def _row_multiple(tuning: TpuTuning) -> int:
  return math.lcm(tuning.block_q, tuning.block_kv, tuning.dq_block_q, tuning.dq_block_kv,
                  tuning.dkv_block_kv, tuning.dkv_block_q)


def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
              scale: float | None = None, tuning: TpuTuning | None = None,
              interpret: bool = False) -> jax.Array:
  """Masked attention ``[B, T, H, D]`` from the range form of the mask; differentiable in q, k, v.

  Args:
    q_BTHD: queries ``[B, T, H, D]``.
    k_BSKD, v_BSKD: keys and values ``[B, T, K, D]``, ``H % K == 0``.
    ranges: ``MaskRanges`` with all four arrays ``[B, T]`` int32.
    scale: logit scale, default ``D ** -0.5``.
    tuning: tile sizes (:class:`TpuTuning`); default :func:`default_tuning` of the device kind and ``T``.
    interpret: run in Pallas interpret mode (any backend).

  Returns:
    ``[B, T, H, D]`` in ``q``'s dtype.
  """
  tiles.check_kernel_inputs("pallas_tpu", q_BTHD, k_BSKD, v_BSKD, ranges)
  length, head_dim = q_BTHD.shape[1], q_BTHD.shape[3]
  tuning = default_tuning(length) if tuning is None else tuning
  scale = head_dim ** -0.5 if scale is None else float(scale)
  multiple = _row_multiple(tuning)
  padded_len = -(-length // multiple) * multiple
  padded_dim = head_dim if interpret else -(-head_dim // _LANES) * _LANES

  def heads_first(x):
    return tiles.pad_axis(tiles.pad_axis(x, 1, padded_len), 3, padded_dim).transpose(0, 2, 1, 3)

  r = tiles.pad_ranges(ranges, padded_len)
  out = _attention(heads_first(q_BTHD), heads_first(k_BSKD), heads_first(v_BSKD), r.k_lo, r.k_hi, r.q_lo,
                   r.q_hi, scale, tuning, interpret)
  return out.transpose(0, 2, 1, 3)[:, :length, :, :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, _ = _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)
  return out


def _bounds(lo, hi, row_tile: int, col_tile: int) -> jax.Array:
  return tiles.tile_bounds(lo, hi, row_tile=row_tile, col_tile=col_tile).reshape(-1)


def _forward(q, k, v, k_lo, k_hi, scale, tuning: TpuTuning, interpret):
  bounds = _bounds(k_lo, k_hi, tuning.block_q, tuning.block_kv)
  return tpu_kernels.forward(q, k, v, k_lo[..., None], k_hi[..., None], bounds, scale=scale, tuning=tuning,
                             interpret=interpret)


def _attention_fwd(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, lse = tiles.name_residuals(*_forward(q, k, v, k_lo, k_hi, scale, tuning, interpret))
  return out, (q, k, v, out, lse, k_lo, k_hi, q_lo, q_hi)


def _attention_bwd(scale, tuning: TpuTuning, interpret, residuals, dout):
  q, k, v, out, lse, k_lo, k_hi, q_lo, q_hi = residuals
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True)
  dout = dout.astype(q.dtype)
  lo, hi = k_lo[..., None], k_hi[..., None]
  kwargs = dict(scale=scale, tuning=tuning, interpret=interpret)
  dq_bounds = _bounds(k_lo, k_hi, tuning.dq_block_q, tuning.dq_block_kv)
  dq = tpu_kernels.dq_pass(q, k, v, dout, lse, delta, lo, hi, dq_bounds, **kwargs)
  dkv_bounds = _bounds(q_lo, q_hi, tuning.dkv_block_kv, tuning.dkv_block_q)
  dk, dv = tpu_kernels.dkv_pass(q, k, v, dout, lse, delta, lo, hi, dkv_bounds, **kwargs)
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------------------
# Forward-only path: a query chunk over a KV cache (inference).
# ----------------------------------------------------------------------------------------------------------


def forward_only_tiles(rows: int, keys: int, tuning: TpuTuning = TpuTuning()) -> tuple[int, int]:
  """``(block_q, block_kv)`` of :func:`attention_forward` for ``rows`` packed query rows over ``keys`` slots.

  ``block_q``: ``tuning.block_q``, or the rows rounded up to the 8 sublanes when fewer (a decode step's
  ``G`` rows do not pad to 512). ``block_kv``: ``tuning.block_kv``, or 128 (a whole number of lanes) when
  that divides the key axis and ``tuning.block_kv`` does not, so the cache is not padded.
  """
  block_q = min(tuning.block_q, -(-rows // _SUBLANES) * _SUBLANES)
  block_kv = tuning.block_kv
  if keys % block_kv and keys % _LANES == 0:
    block_kv = _LANES
  return block_q, block_kv


def attention_forward(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
                      scale: float | None = None, tuning: TpuTuning = TpuTuning(),
                      interpret: bool = False) -> jax.Array:
  """Forward-only masked attention of a query chunk over a key axis of any length (inference).

  Query ``t`` sees keys ``k_lo[b, t] <= s < k_hi[b, t]`` (key coordinates, e.g. cache slots); ``q_lo`` and
  ``q_hi`` are ignored. Rows ``(t, g)`` of each KV head are padded to the row tile repeating the last row's
  range (ranges stay non-decreasing, as the tile bounds need); keys are padded to the key tile only when it
  does not divide ``S`` (see :func:`forward_only_tiles`).

  Args:
    q_BTHD: queries ``[B, T, H, D]``.
    k_BSKD, v_BSKD: keys and values ``[B, S, K, D]``, ``H % K == 0``, ``S`` independent of ``T``.
    ranges: ``MaskRanges`` with ``k_lo, k_hi`` ``[B, T]`` int, non-decreasing along ``T``. Values are
      clipped to ``[0, S]``; a row with an empty range gives zeros (as the dense oracle does).
    scale: logit scale, default ``D ** -0.5``.
    tuning: ``block_q`` and ``block_kv`` are used.
    interpret: run in Pallas interpret mode (any backend).

  Returns:
    ``[B, T, H, D]`` in ``q``'s dtype. Not differentiable: ``jax.grad`` raises ``NotImplementedError``.
  """
  tiles.check_forward_only_inputs("pallas_tpu", q_BTHD, k_BSKD, v_BSKD, ranges)
  batch, length, heads, head_dim = q_BTHD.shape
  keys, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  group = heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else float(scale)
  rows = length * group
  block_q, block_kv = forward_only_tiles(rows, keys, tuning)
  padded_rows = -(-rows // block_q) * block_q
  padded_keys = -(-keys // block_kv) * block_kv
  dim = head_dim if interpret else -(-head_dim // _LANES) * _LANES

  # Rows (t, g): the group's query heads of one KV head, each with its query's range.
  q_BKRD = q_BTHD.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  q_BKRD = tiles.pad_axis(tiles.pad_axis(q_BKRD.reshape(batch, kv_heads, rows, head_dim), 2, padded_rows),
                          3, dim)
  k_lo_BR = jnp.repeat(jnp.clip(ranges.k_lo.astype(jnp.int32), 0, keys), group, axis=1)
  k_hi_BR = jnp.repeat(jnp.clip(ranges.k_hi.astype(jnp.int32), 0, keys), group, axis=1)
  k_lo_BR, k_hi_BR = tiles.pad_rows_repeating_last(k_lo_BR, k_hi_BR, padded_rows)
  bounds = _bounds(k_lo_BR, k_hi_BR, block_q, block_kv)

  def cache_view(x):  # [B, S, K, D] -> [B, S', K * D'], a free reshape unless S or D need padding
    return tiles.pad_axis(tiles.pad_axis(x, 1, padded_keys), 3, dim).reshape(batch, padded_keys, -1)

  out = _forward_only(q_BKRD, cache_view(k_BSKD), cache_view(v_BSKD), k_lo_BR[..., None], k_hi_BR[..., None],
                      bounds, scale, block_q, block_kv, interpret)
  out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, length, group, head_dim)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _forward_only(q, k, v, lo, hi, bounds, scale, block_q, block_kv, interpret):
  return tpu_kernels.forward_only(q, k, v, lo, hi, bounds, scale=scale, block_q=block_q, block_kv=block_kv,
                                  interpret=interpret)


def _forward_only_fwd(q, k, v, lo, hi, bounds, scale, block_q, block_kv, interpret):
  return _forward_only(q, k, v, lo, hi, bounds, scale, block_q, block_kv, interpret), None


def _forward_only_bwd(scale, block_q, block_kv, interpret, residuals, cotangents):
  del scale, block_q, block_kv, interpret, residuals, cotangents
  raise NotImplementedError(
      "pallas_tpu's forward-only attention (query length != key length, or ranges without q_lo/q_hi: "
      "prefill over a KV cache, decoding) has no backward pass; differentiate calls with equal query and "
      "key lengths and all four ranges (ism_jax.masks.make_attention_ranges), which run the training kernel"
  )


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)
