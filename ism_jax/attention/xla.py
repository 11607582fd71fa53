"""Reference attention in plain XLA: a dense-mask version and a query-chunked, memory-efficient version.

Shapes: ``q_BTHD`` queries, ``k_BSKD`` / ``v_BSKD`` keys and values with ``K`` KV heads (grouped-query
attention: ``H = K * G``). The mask comes from :class:`ism_jax.masks.MaskRanges`: query ``t`` sees keys
``k_lo[b, t] <= s < k_hi[b, t]``. Logits and softmax are computed in float32; the output has ``q``'s dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ism_jax.masks import MaskRanges

_MASKED = -1e30  # finite, so a row with no visible key gives zeros instead of NaN


def _grouped(q_BTHD: jax.Array, num_kv_heads: int) -> jax.Array:
  batch, length, heads, dim = q_BTHD.shape
  if heads % num_kv_heads:
    raise ValueError(f"{heads} query heads are not a multiple of {num_kv_heads} KV heads")
  return q_BTHD.reshape(batch, length, num_kv_heads, heads // num_kv_heads, dim)


def _masked_softmax_attention(q_BTKGD, k_BSKD, v_BSKD, k_lo_BT, k_hi_BT, scale):
  """Attention of a block of queries over all keys, mask from the per-query key ranges."""
  logits_BKGTS = jnp.einsum(
      "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
  ) * scale
  keys_S = jnp.arange(k_BSKD.shape[1], dtype=jnp.int32)
  visible_BTS = (k_lo_BT[:, :, None] <= keys_S) & (keys_S < k_hi_BT[:, :, None])
  logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  probs_BKGTS = jnp.where(visible_BTS[:, None, None], probs_BKGTS, 0.0)
  return jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                    preferred_element_type=jnp.float32)


def dense_attention(q_BTHD, k_BSKD, v_BSKD, ranges: MaskRanges, *, scale: float | None = None):
  """Attention with the whole ``[B, T, S]`` mask materialised (reference; fine for short sequences)."""
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  q_BTKGD = _grouped(q_BTHD, k_BSKD.shape[2])
  out = _masked_softmax_attention(q_BTKGD, k_BSKD, v_BSKD, ranges.k_lo, ranges.k_hi, scale)
  return out.reshape(q_BTHD.shape).astype(q_BTHD.dtype)


def chunked_attention(q_BTHD, k_BSKD, v_BSKD, ranges: MaskRanges, *, scale: float | None = None,
                      chunk_size: int = 512):
  """Memory-efficient attention: queries are processed ``chunk_size`` at a time under ``jax.checkpoint``.

  Peak memory is ``O(B * H * chunk_size * S)`` in the forward and backward passes instead of
  ``O(B * H * T * S)``; the ``[T, S]`` mask never exists. Used on CPU for long inputs.
  """
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  batch, length, heads, dim = q_BTHD.shape
  if length <= chunk_size:
    return dense_attention(q_BTHD, k_BSKD, v_BSKD, ranges, scale=scale)
  num_chunks = -(-length // chunk_size)
  padded = num_chunks * chunk_size
  pad = padded - length
  q_BTKGD = _grouped(q_BTHD, k_BSKD.shape[2])
  # Padded query rows see key 0 only; they are sliced away below.
  q_BTKGD = jnp.pad(q_BTKGD, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  k_lo = jnp.pad(ranges.k_lo, ((0, 0), (0, pad)))
  k_hi = jnp.pad(ranges.k_hi, ((0, 0), (0, pad)), constant_values=1)

  def to_chunks(x):  # [B, T', ...] -> [N, B, C, ...]
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one_chunk(q_chunk, lo_chunk, hi_chunk):
    return _masked_softmax_attention(q_chunk, k_BSKD, v_BSKD, lo_chunk, hi_chunk, scale)

  out = jax.lax.map(lambda xs: one_chunk(*xs), (to_chunks(q_BTKGD), to_chunks(k_lo), to_chunks(k_hi)))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, dim)[:, :length]
  return out.astype(q_BTHD.dtype)
