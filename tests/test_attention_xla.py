"""The chunked XLA attention equals the dense reference, forward and gradients, on packed batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ism_jax.attention import attention, chunked_attention, dense_attention, resolve_impl
from ism_jax.masks import make_attention_mask, make_attention_ranges


def _qkv(key, batch, length, heads, kv_heads, dim):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (batch, length, heads, dim)),
          jax.random.normal(kk, (batch, length, kv_heads, dim)),
          jax.random.normal(kv, (batch, length, kv_heads, dim)))


def _naive(q, k, v, mask):
  """Textbook attention with an explicit boolean mask, heads repeated for GQA."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("kind", ["ism", "prefix"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_dense_matches_textbook_attention(packed_batch, kind, kv_heads):
  types, ids = jnp.asarray(packed_batch["segment_types"]), jnp.asarray(packed_batch["segment_ids"])
  q, k, v = _qkv(jax.random.key(0), *types.shape, 4, kv_heads, 8)
  out = dense_attention(q, k, v, make_attention_ranges(types, ids, kind))
  expected = _naive(q, k, v, make_attention_mask(types, ids, kind))
  np.testing.assert_allclose(out, expected, atol=2e-5)


def test_chunked_matches_dense_forward_and_gradients(packed_batch):
  types, ids = jnp.asarray(packed_batch["segment_types"]), jnp.asarray(packed_batch["segment_ids"])
  ranges = make_attention_ranges(types, ids, "ism")
  q, k, v = _qkv(jax.random.key(1), *types.shape, 4, 2, 8)
  cotangent = jax.random.normal(jax.random.key(2), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, ranges) * cotangent)

  chunked = lambda q, k, v, r: chunked_attention(q, k, v, r, chunk_size=16)  # 48 = 3 chunks
  np.testing.assert_allclose(chunked(q, k, v, ranges), dense_attention(q, k, v, ranges), atol=1e-5)
  grads_dense = jax.grad(lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
  grads_chunked = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
  for name, gd, gc in zip("qkv", grads_dense, grads_chunked):
    np.testing.assert_allclose(gc, gd, atol=1e-5, err_msg=f"d{name}")


def test_chunked_handles_length_not_divisible_by_chunk():
  types = jnp.array([[1] * 5 + [2] * 7 + [1] * 3 + [2] * 4 + [0] * 2])  # T = 21
  ranges = make_attention_ranges(types)
  q, k, v = _qkv(jax.random.key(3), 1, 21, 2, 2, 4)
  np.testing.assert_allclose(chunked_attention(q, k, v, ranges, chunk_size=8),
                             dense_attention(q, k, v, ranges), atol=1e-5)


def test_dispatch():
  assert resolve_impl("auto") == "xla_chunked"  # the tests run on CPU
  with pytest.raises(ValueError, match="attention impl must be one of"):
    resolve_impl("flash")
  types = jnp.array([[1, 1, 2, 2]])
  q, k, v = _qkv(jax.random.key(4), 1, 4, 2, 1, 4)
  ranges = make_attention_ranges(types)
  np.testing.assert_allclose(attention(q, k, v, ranges, impl="auto"), dense_attention(q, k, v, ranges),
                             atol=1e-6)
  with pytest.raises(ValueError, match="attention expects q"):
    attention(q[0], k, v, ranges)
