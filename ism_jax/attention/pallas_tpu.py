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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ism_jax.attention import tiles, tpu_kernels
from ism_jax.attention.tpu_kernels import TpuTuning
from ism_jax.masks import MaskRanges

_LANES = 128

__all__ = ["TpuTuning", "attention"]


def _row_multiple(tuning: TpuTuning) -> int:
  return math.lcm(tuning.block_q, tuning.block_kv, tuning.dq_block_q, tuning.dq_block_kv,
                  tuning.dkv_block_kv, tuning.dkv_block_q)


def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, ranges: MaskRanges, *,
              scale: float | None = None, tuning: TpuTuning = TpuTuning(),
              interpret: bool = False) -> jax.Array:
  """Masked attention ``[B, T, H, D]`` from the range form of the mask; differentiable in q, k, v.

  Args:
    q_BTHD: queries ``[B, T, H, D]``.
    k_BSKD, v_BSKD: keys and values ``[B, T, K, D]``, ``H % K == 0``.
    ranges: ``MaskRanges`` with all four arrays ``[B, T]`` int32.
    scale: logit scale, default ``D ** -0.5``.
    tuning: tile sizes (:class:`TpuTuning`).
    interpret: run in Pallas interpret mode (any backend).

  Returns:
    ``[B, T, H, D]`` in ``q``'s dtype.
  """
  tiles.check_kernel_inputs("pallas_tpu", q_BTHD, k_BSKD, v_BSKD, ranges)
  length, head_dim = q_BTHD.shape[1], q_BTHD.shape[3]
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
  out, lse = _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)
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
