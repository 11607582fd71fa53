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

``interpret=True`` runs the same kernels in Pallas' GPU interpret mode on CPU (for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ism_jax.attention import gpu_backward, gpu_forward, tiles
from ism_jax.attention.gpu_common import GpuTuning
from ism_jax.masks import MaskRanges

_HEAD_DIM_MULTIPLE = 64


def _check(q_BTHD, k_BSKD, v_BSKD, ranges: MaskRanges) -> None:
  if q_BTHD.shape[1] != k_BSKD.shape[1] or k_BSKD.shape != v_BSKD.shape:
    raise ValueError(f"pallas_gpu attention needs equal query and key lengths and k, v of one shape; got q "
                     f"{q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape}")
  if q_BTHD.shape[2] % k_BSKD.shape[2]:
    raise ValueError(f"{q_BTHD.shape[2]} query heads are not a multiple of {k_BSKD.shape[2]} KV heads")
  if ranges.q_lo is None or ranges.q_hi is None:
    raise ValueError("pallas_gpu attention needs the per-key ranges q_lo, q_hi (make_attention_ranges)")


def _pad_axis(x, axis: int, size: int):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


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
  _check(q_BTHD, k_BSKD, v_BSKD, ranges)
  batch, length, heads, head_dim = q_BTHD.shape
  scale = head_dim ** -0.5 if scale is None else float(scale)
  out_dtype = q_BTHD.dtype
  compute_dtype = out_dtype
  if jnp.dtype(out_dtype) == jnp.float32 and not interpret:
    compute_dtype = jnp.bfloat16
  padded_len = -(-length // tuning.row_multiple) * tuning.row_multiple
  padded_dim = -(-head_dim // _HEAD_DIM_MULTIPLE) * _HEAD_DIM_MULTIPLE

  def prepare(x):
    return _pad_axis(_pad_axis(x.astype(compute_dtype), 1, padded_len), 3, padded_dim)

  r = tiles.pad_ranges(ranges, padded_len)
  out = _attention(prepare(q_BTHD), prepare(k_BSKD), prepare(v_BSKD), r.k_lo, r.k_hi, r.q_lo, r.q_hi,
                   scale, tuning, interpret)
  return out[:, :length, :, :head_dim].astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, _ = _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)
  return out


def _forward(q, k, v, k_lo, k_hi, scale, tuning: GpuTuning, interpret):
  bounds = tiles.tile_bounds(k_lo, k_hi, row_tile=tuning.block_q, col_tile=tuning.block_kv)
  return gpu_forward.forward(q, k, v, k_lo, k_hi, bounds, scale=scale, tuning=tuning, interpret=interpret)


def _attention_fwd(q, k, v, k_lo, k_hi, q_lo, q_hi, scale, tuning, interpret):
  out, lse = _forward(q, k, v, k_lo, k_hi, scale, tuning, interpret)
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
