"""Block-sparse ISM attention for NVIDIA Hopper GPUs (Pallas, Mosaic GPU backend).

    out_BTHD = attention(q_BTHD, k_BSKD, v_BSKD, ranges)

Serves all three mask kinds from the O(T) ranges of :class:`ism_jax.masks.MaskRanges`; never builds a
``[T, T]`` array. Tiles are classified from the ranges (:mod:`ism_jax.attention.tiles`): fully masked
tiles are skipped, fully visible tiles run without an elementwise mask, partial tiles are masked. The
forward and dq passes take their tile runs from the per-query ranges ``k_lo, k_hi``; the dk/dv pass from
the per-key ranges ``q_lo, q_hi``. Kernels: :mod:`gpu_forward`, :mod:`gpu_backward`.

Inputs are bf16 or f16 (float32 inputs are computed in bf16, the output cast back); softmax statistics
and accumulators are float32. Grouped-query attention: ``H % K == 0``. Any length and head dimension:
the wrapper pads the sequence to the tile multiple (padding rows see only themselves) and the head
dimension to a multiple of 64 with zeros (which changes no logit and no output column), then slices.

**Forward-only path** (:func:`attention_forward`, inference): a query chunk of ``T`` rows over a key axis of
``S`` slots (a prefill over a KV cache, a decode step), ``T != S`` allowed, per-query ranges ``k_lo, k_hi``
only. The same forward kernel runs on rearranged rows: the ``G = H / K`` query heads of a KV head become
rows ``(t, g)`` (each CTA reads a K/V tile once for the whole group), and the key axis is cut into splits
whose partial results are merged by their log-sum-exp (split-KV, so that a short chunk still fills the
GPU). Tiles past each row's ``k_hi`` are never read, so a decode reads only the filled part of the cache.
It has no backward pass.

``interpret=True`` runs the same kernels in Pallas' GPU interpret mode on CPU (for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ism_jax.attention import gpu_backward, gpu_forward, tiles
from ism_jax.attention.gpu_common import COMPUTE_WGS, GpuTuning
from ism_jax.masks import MaskRanges

_HEAD_DIM_MULTIPLE = 64
# The forward-only path aims its grid at one wave of CTAs: a forward CTA holds all of an SM's registers
# (two compute warpgroups at 232, the memory warpgroup at 40), and H100 and H200 have 132 SMs.
_WAVE_CTAS = 132
_MIN_SPLIT_TILES = 2  # key tiles per split at least, so a CTA's fixed cost stays small against its work


def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
              scale: float | None = None, tuning: GpuTuning = GpuTuning(),
              interpret: bool = False) -> jax.Array:
  """Masked attention ``[B, T, H, D]`` from the range form of the mask; differentiable in q, k, v.

  Args:
    q_BTHD: queries ``[B, T, H, D]``.
    k_BSKD, v_BSKD: keys and values ``[B, T, K, D]``, ``H % K == 0``.
    ranges: ``MaskRanges`` with all four arrays ``[B, T]`` int32.
    scale: logit scale, default ``D ** -0.5``.
    tuning: tile sizes (:class:`GpuTuning`).
    interpret: run in GPU interpret mode on CPU.

  Returns:
    ``[B, T, H, D]`` in ``q``'s dtype.
  """
  tiles.check_kernel_inputs("pallas_gpu", q_BTHD, k_BSKD, v_BSKD, ranges)
  batch, length, heads, head_dim = q_BTHD.shape
  scale = head_dim ** -0.5 if scale is None else float(scale)
  out_dtype = q_BTHD.dtype
  compute_dtype = out_dtype
  if jnp.dtype(out_dtype) == jnp.float32 and not interpret:
    compute_dtype = jnp.bfloat16
  padded_len = -(-length // tuning.row_multiple) * tuning.row_multiple
  padded_dim = -(-head_dim // _HEAD_DIM_MULTIPLE) * _HEAD_DIM_MULTIPLE

  def prepare(x):
    return tiles.pad_axis(tiles.pad_axis(x.astype(compute_dtype), 1, padded_len), 3, padded_dim)

  r = tiles.pad_ranges(ranges, padded_len)
  out = _attention(prepare(q_BTHD), prepare(k_BSKD), prepare(v_BSKD), r.k_lo, r.k_hi, r.q_lo, r.q_hi,
                   scale, tuning, interpret)
  return out[:, :length, :, :head_dim].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, _ = _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)
  return out


# Jitted so that a model calling the kernel once per layer (unrolled layers) lowers it once: equal calls share
# one traced program, and lowering reuses it instead of building the Mosaic kernel again for every layer.
@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _forward(q, k, v, k_lo, k_hi, scale, tuning: GpuTuning, interpret):
  bounds = tiles.tile_bounds(k_lo, k_hi, row_tile=tuning.block_q, col_tile=tuning.block_kv)
  return gpu_forward.forward(q, k, v, k_lo, k_hi, bounds, scale=scale, tuning=tuning, interpret=interpret)


def _attention_fwd(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, lse = tiles.name_residuals(*_forward(q, k, v, k_lo, k_hi, scale, tuning, interpret))
  return out, (q, k, v, out, lse, k_lo, k_hi, q_lo, q_hi)


def _attention_bwd(scale, tuning: GpuTuning, interpret, residuals, dout):
  q, k, v, out, lse, k_lo, k_hi, q_lo, q_hi = residuals
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  dout = dout.astype(q.dtype)
  dq_bounds = tiles.tile_bounds(k_lo, k_hi, row_tile=tuning.dq_block_q, col_tile=tuning.dq_block_kv)
  dkv_bounds = tiles.tile_bounds(q_lo, q_hi, row_tile=tuning.dkv_block_kv, col_tile=tuning.dkv_block_q)
  kwargs = dict(scale=scale, tuning=tuning, interpret=interpret)
  dq = gpu_backward.dq_pass(q, k, v, dout, lse, delta, k_lo, k_hi, dq_bounds, **kwargs)
  dk, dv = gpu_backward.dkv_pass(q, k, v, dout, lse, delta, q_lo, q_hi, dkv_bounds, **kwargs)
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------------------
# Forward-only path: a query chunk over a longer key axis (inference).
# ----------------------------------------------------------------------------------------------------------


def key_split_length(rows: int, kv_heads: int, batch: int, keys: int, tuning: GpuTuning = GpuTuning()) -> int:
  """Keys per split of :func:`attention_forward`'s default: enough splits that the grid comes near one
  wave (``_WAVE_CTAS``), each at least ``_MIN_SPLIT_TILES`` key tiles.

  Args:
    rows: query rows per KV head (``T * H / K``); ``kv_heads``, ``batch``: the other grid axes.
    keys: the key axis length ``S``.
  """
  row_ctas = batch * kv_heads * -(-rows // (COMPUTE_WGS * tuning.block_q))
  key_tiles = -(-keys // tuning.block_kv)
  splits = max(1, _WAVE_CTAS // row_ctas)
  return max(_MIN_SPLIT_TILES, -(-key_tiles // splits)) * tuning.block_kv


def _grouped_rows(q_BTHD, ranges: MaskRanges, kv_heads: int, keys: int, split_rows: int, padded_dim: int):
  """Queries as rows ``(t, g)``: the group's query heads of one KV head, ``[B, R, K, D]`` padded to
  ``split_rows`` rows and ``padded_dim``; the key ranges ``[B, R]`` repeated per head and clipped to
  ``[0, keys]`` (still non-decreasing; padding rows repeat the last range)."""
  batch, length, heads, head_dim = q_BTHD.shape
  group = heads // kv_heads
  q_BRKD = q_BTHD.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 1, 3, 2, 4)
  q_BRKD = q_BRKD.reshape(batch, length * group, kv_heads, head_dim)
  q_BRKD = tiles.pad_axis(tiles.pad_axis(q_BRKD, 1, split_rows), 3, padded_dim)
  k_lo_BR = jnp.repeat(jnp.clip(ranges.k_lo.astype(jnp.int32), 0, keys), group, axis=1)
  k_hi_BR = jnp.repeat(jnp.clip(ranges.k_hi.astype(jnp.int32), 0, keys), group, axis=1)
  k_lo_BR, k_hi_BR = tiles.pad_rows_repeating_last(k_lo_BR, k_hi_BR, split_rows)
  return q_BRKD, k_lo_BR, k_hi_BR


def _split_ranges(k_lo_BR, k_hi_BR, num_splits: int, block_kv: int, padded_keys: int):
  """Per key split ``n`` the rows' key ranges clipped to the split, and whether a row sees a key in it.

  The splits share out each batch row's filled keys, ``[0, its largest k_hi)``, not the whole key axis: in a
  half-empty cache every split still has work. Split ``n`` of row ``b`` covers keys ``[first, last)``, whole
  key tiles; its rows' ranges are clipped to it and kept non-empty (one key at its edge, so that every CTA
  has a tile to walk).

  Returns:
    ``(lo_BNR, hi_BNR, seen_BNR)``, ``[B, num_splits, R]`` each (``seen`` bool).
  """
  reach_B11 = jnp.max(k_hi_BR, axis=1)[:, None, None]
  span_B11 = jnp.maximum(-(-reach_B11 // (num_splits * block_kv)), 1) * block_kv
  first_BN1 = jnp.minimum(jnp.arange(num_splits, dtype=jnp.int32)[None, :, None] * span_B11, padded_keys - 1)
  last_BN1 = jnp.minimum(first_BN1 + span_B11, padded_keys)
  lo_BNR = jnp.clip(k_lo_BR[:, None], first_BN1, last_BN1 - 1)
  hi_BNR = jnp.clip(k_hi_BR[:, None], first_BN1 + 1, last_BN1)
  seen_BNR = jnp.minimum(k_hi_BR[:, None], last_BN1) > jnp.maximum(k_lo_BR[:, None], first_BN1)
  return lo_BNR, hi_BNR, seen_BNR


def _merge_splits(out_BNRKD, lse_BKNR, seen_BNRK) -> jax.Array:
  """The key splits' partial outputs ``[B, N, R, K, D]`` merged by their log-sum-exp (base 2) ``[B, K, N, R]``
  into ``[B, R, K, D]``; splits where a row sees no key count for nothing (zeros when it sees none)."""
  if out_BNRKD.shape[1] == 1:
    return jnp.where(seen_BNRK[..., None], out_BNRKD, 0)[:, 0]
  lse_BNRK = jnp.where(seen_BNRK, lse_BKNR.transpose(0, 2, 3, 1), -jnp.inf)
  top_BRK = jnp.max(lse_BNRK, axis=1)
  top_BRK = jnp.where(jnp.isfinite(top_BRK), top_BRK, 0.0)
  weight_BNRK = jnp.exp2(lse_BNRK - top_BRK[:, None])  # 0 for splits the row has no key in
  total_BRK = jnp.sum(weight_BNRK, axis=1)
  merged = jnp.sum(weight_BNRK[..., None] * out_BNRKD.astype(jnp.float32), axis=1)
  return merged / jnp.maximum(total_BRK, jnp.finfo(jnp.float32).tiny)[..., None]


def attention_forward(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
                      scale: float | None = None, tuning: GpuTuning = GpuTuning(),
                      key_split: int | None = None, interpret: bool = False) -> jax.Array:
  """Forward-only masked attention of a query chunk over a key axis of any length (inference).

  Query ``t`` sees keys ``k_lo[b, t] <= s < k_hi[b, t]`` (key coordinates, e.g. cache slots); ``q_lo`` and
  ``q_hi`` are ignored. Key tiles past each row tile's largest ``k_hi`` are never read. The wrapper packs
  the query heads of each KV head into rows, pads rows to the CTA's 128 (repeating the last row's range, so
  the ranges stay non-decreasing), keys to the key tile (``block_kv``, or 64 when that avoids the copy) and
  the head dimension to a multiple of 64, runs the forward kernel once per key split, and merges the splits
  by their log-sum-exp. The splits share out each batch row's filled keys ``[0, max k_hi)`` in whole key
  tiles, so a mostly empty cache costs no more than a full one of the filled length. Padding copies the K/V
  window, as does casting float32 K/V to bf16 on the GPU.

  Args:
    q_BTHD: queries ``[B, T, H, D]``.
    k_BSKD, v_BSKD: keys and values ``[B, S, K, D]``, ``H % K == 0``, ``S`` independent of ``T``.
    ranges: ``MaskRanges`` with ``k_lo, k_hi`` ``[B, T]`` int, non-decreasing along ``T`` (the contract of
      :class:`MaskRanges`). Values are clipped to ``[0, S]``; a row with an empty range gives zeros (as in
      :func:`ism_jax.attention.xla.dense_attention`).
    scale: logit scale, default ``D ** -0.5``.
    tuning: tile sizes (:class:`GpuTuning`; only ``block_q``, ``block_kv`` and ``stages`` are used).
    key_split: sets the number of splits, ``ceil(S / key_split)`` (``key_split`` rounded up to the key
      tile); ``None``: :func:`key_split_length`; ``>= S``: one split.
    interpret: run in GPU interpret mode on CPU.

  Returns:
    ``[B, T, H, D]`` in ``q``'s dtype. Not differentiable: ``jax.grad`` raises ``NotImplementedError``.
  """
  tiles.check_forward_only_inputs("pallas_gpu", q_BTHD, k_BSKD, v_BSKD, ranges)
  batch, length, heads, head_dim = q_BTHD.shape
  keys, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  group = heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else float(scale)
  out_dtype = q_BTHD.dtype
  compute_dtype = jnp.bfloat16 if jnp.dtype(out_dtype) == jnp.float32 and not interpret else out_dtype
  if keys % tuning.block_kv and keys % 64 == 0:
    tuning = dataclasses.replace(tuning, block_kv=64)
  block_kv, rows = tuning.block_kv, length * group
  split_rows = -(-rows // (COMPUTE_WGS * tuning.block_q)) * (COMPUTE_WGS * tuning.block_q)  # whole CTAs
  padded_keys = -(-keys // block_kv) * block_kv
  padded_dim = -(-head_dim // _HEAD_DIM_MULTIPLE) * _HEAD_DIM_MULTIPLE
  split = key_split_length(rows, kv_heads, batch, keys, tuning) if key_split is None else key_split
  split = min(-(-split // block_kv) * block_kv, padded_keys)
  num_splits = -(-padded_keys // split)

  q_BRKD, k_lo_BR, k_hi_BR = _grouped_rows(q_BTHD.astype(compute_dtype), ranges, kv_heads, keys, split_rows,
                                           padded_dim)
  lo_BNR, hi_BNR, seen_BNR = _split_ranges(k_lo_BR, k_hi_BR, num_splits, block_kv, padded_keys)
  q_all = jnp.broadcast_to(q_BRKD[:, None], (batch, num_splits, *q_BRKD.shape[1:]))
  q_all = q_all.reshape(batch, num_splits * split_rows, kv_heads, padded_dim)
  prepare_kv = lambda x: tiles.pad_axis(tiles.pad_axis(x.astype(compute_dtype), 1, padded_keys), 3,
                                        padded_dim)
  out, lse = _forward_only(q_all, prepare_kv(k_BSKD), prepare_kv(v_BSKD), lo_BNR.reshape(batch, -1),
                           hi_BNR.reshape(batch, -1), scale, tuning, interpret)
  out_BNRKD = out.reshape(batch, num_splits, split_rows, kv_heads, padded_dim)[:, :, :rows, :, :head_dim]
  lse_BKNR = lse.reshape(batch, kv_heads, num_splits, split_rows)[..., :rows]
  out_BRKD = _merge_splits(out_BNRKD, lse_BKNR, seen_BNR[:, :, :rows, None])
  out_BTGKD = out_BRKD.reshape(batch, length, group, kv_heads, head_dim)
  return out_BTGKD.transpose(0, 1, 3, 2, 4).reshape(batch, length, heads, head_dim).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _forward_only(q, k, v, k_lo, k_hi, scale, tuning, interpret):
  return _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)


def _forward_only_fwd(q, k, v, k_lo, k_hi, scale, tuning, interpret):
  return _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret), None


def _forward_only_bwd(scale, tuning, interpret, residuals, cotangents):
  del scale, tuning, interpret, residuals, cotangents
  raise NotImplementedError(
      "pallas_gpu's forward-only attention (query length != key length, or ranges without q_lo/q_hi: "
      "prefill over a KV cache, decoding) has no backward pass; differentiate calls with equal query and "
      "key lengths and all four ranges (ism_jax.masks.make_attention_ranges), which run the training kernel"
  )


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)
